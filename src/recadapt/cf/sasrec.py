"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018, arXiv 1808.09781).

Item and learned positional embeddings feed a stack of causal self-attention blocks; the hidden state at the
most recent position is the sequence representation, scored against the (shared) item embedding table.
Histories are left-padded to exactly ``max_len``, so the most recent item always sits at the last position and
gets the same positional embedding, whatever padding the caller used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from recadapt.cf.base import Batch, CRMConfig, SequentialRecommender


@dataclass
class SASRecConfig(CRMConfig):
    """SASRec hyper-parameters (paper defaults: 2 blocks, 1 head, dropout 0.2 on dense data)."""

    n_layers: int = 2
    n_heads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.n_heads < 1 or self.hidden_size % self.n_heads:
            raise ValueError(f"n_heads must divide hidden_size={self.hidden_size}, got {self.n_heads}")


class SASRec(SequentialRecommender):
    """Causal transformer over the item history; representation = output at the most recent position."""

    name: ClassVar[str] = "sasrec"
    config_class: ClassVar[type[CRMConfig]] = SASRecConfig
    config: SASRecConfig

    def __init__(self, n_items: int, n_users: int = 0, config: SASRecConfig | None = None) -> None:
        super().__init__(n_items, n_users, config)
        d = self.config.hidden_size
        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=self.pad_id)
        self.position_embedding = nn.Embedding(self.config.max_len, d)
        self.embedding_dropout = nn.Dropout(self.config.dropout)
        # Pre-LN blocks as in the paper (LayerNorm before attention and before the feed-forward, residuals
        # around both); the paper's point-wise feed-forward keeps width d and uses ReLU.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                self.config.n_heads,
                dim_feedforward=d,
                dropout=self.config.dropout,
                activation="relu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(self.config.n_layers)
        )
        self.final_norm = nn.LayerNorm(d)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_id].zero_()

    def encode(self, history: Tensor) -> Tensor:
        """Hidden states FloatTensor[B, max_len, d] of the history left-padded (or cut) to ``max_len``.

        The output at position t depends only on the items at positions <= t (causal masking).
        """
        history = self.fit_history(history, self.config.max_len)
        length = history.size(1)
        is_item = history != self.pad_id  # [B, L]
        positions = torch.arange(length, device=history.device)

        scale = math.sqrt(self.config.hidden_size)
        x = self.item_embedding(history) * scale + self.position_embedding(positions)
        x = self.embedding_dropout(x) * is_item[..., None]

        # Query t may attend to key s <= t when s holds an item. Every query may also attend to itself, so a
        # padding query (and a history that is all padding) never has an empty attention row, whose softmax
        # would be NaN. Item queries never see padding: it precedes them, and their own position is an item.
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=history.device)
        allowed = (causal & is_item[:, None, :]) | itself  # [B, L, L]
        # Per-head masks [B * heads, L, L], True = blocked.
        blocked = (~allowed).repeat_interleave(self.config.n_heads, dim=0)
        for block in self.blocks:
            # Zeroing padding after each block (as the paper's code does) keeps padding states from drifting.
            x = block(x, src_mask=blocked) * is_item[..., None]
        return self.final_norm(x)

    def sequence_representation(self, batch: Batch) -> Tensor:
        return self.encode(batch["history"])[:, -1]

    def history_states(self, batch: Batch) -> tuple[Tensor, Tensor]:
        history = self.fit_history(batch["history"], self.config.max_len)
        return self.encode(history), history != self.pad_id
