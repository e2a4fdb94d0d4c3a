"""BERT4Rec: bidirectional transformer trained with the cloze task (Sun et al., CIKM 2019, arXiv 1904.06690).

Training masks random items and predicts them from both sides. The sequence trained on is
``history + [target]`` (left-padded to ``max_len``): each history item becomes ``[MASK]`` with probability
``mask_prob`` and the target is always masked, so every batch also trains the inference situation. At
inference ``[MASK]`` is appended after the history and its output is the sequence representation. Outputs
pass the paper's projection head (Linear -> GELU -> LayerNorm) and are scored against the shared item
embeddings plus a per-item bias.

``[MASK]`` is the extra id ``n_items + 1``, so the input table has ``n_items + 2`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.cf.base import Batch, CRMConfig, SequentialRecommender


@dataclass
class BERT4RecConfig(CRMConfig):
    """BERT4Rec hyper-parameters (paper: 2 layers, 2 heads, dropout 0.1, mask proportion 0.2 on ML-1M)."""

    dropout: float = 0.1
    n_layers: int = 2
    n_heads: int = 2
    mask_prob: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (history plus [MASK]), got {self.max_len}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.n_heads < 1 or self.hidden_size % self.n_heads:
            raise ValueError(f"n_heads must divide hidden_size={self.hidden_size}, got {self.n_heads}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")


class BERT4Rec(SequentialRecommender):
    """Bidirectional transformer; representation = head output at a ``[MASK]`` appended to the history."""

    name: ClassVar[str] = "bert4rec"
    config_class: ClassVar[type[CRMConfig]] = BERT4RecConfig
    config: BERT4RecConfig

    def __init__(self, n_items: int, n_users: int = 0, config: BERT4RecConfig | None = None) -> None:
        super().__init__(n_items, n_users, config)
        d = self.config.hidden_size
        self.mask_id = n_items + 1
        self.item_embedding = nn.Embedding(n_items + 2, d, padding_idx=self.pad_id)
        self.position_embedding = nn.Embedding(self.config.max_len, d)
        self.embedding_norm = nn.LayerNorm(d)
        self.embedding_dropout = nn.Dropout(self.config.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                self.config.n_heads,
                dim_feedforward=4 * d,
                dropout=self.config.dropout,
                activation="gelu",
                batch_first=True,
            )
            for _ in range(self.config.n_layers)
        )
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_id].zero_()

    def encode(self, tokens: Tensor) -> Tensor:
        """Head outputs FloatTensor[B, max_len, d] for ids LongTensor[B, max_len] (items, PAD or MASK)."""
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.item_embedding(tokens) + self.position_embedding(positions)
        x = self.embedding_dropout(self.embedding_norm(x))
        # Keys at padding are hidden from every query. No attention row is empty: the last position always
        # holds [MASK] or the target.
        padding = tokens == self.pad_id
        for block in self.blocks:
            x = block(x, src_key_padding_mask=padding)
        return self.head(x)

    def sequence_representation(self, batch: Batch) -> Tensor:
        history = self.fit_history(batch["history"], self.config.max_len - 1)
        mask_column = torch.full_like(history[:, :1], self.mask_id)
        return self.encode(torch.cat([history, mask_column], dim=1))[:, -1]

    def history_states(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Outputs at the history items and at the appended ``[MASK]`` (so no row is empty)."""
        history = self.fit_history(batch["history"], self.config.max_len - 1)
        tokens = torch.cat([history, torch.full_like(history[:, :1], self.mask_id)], dim=1)
        return self.encode(tokens), tokens != self.pad_id

    def loss(self, batch: Batch) -> Tensor:
        """Cloze loss on ``history + [target]``; the base BCE for CTR batches (which carry ``label``)."""
        if "label" in batch:
            return self.ctr_loss(batch)
        history = self.fit_history(batch["history"], self.config.max_len - 1)
        tokens = torch.cat([history, batch["target"][:, None]], dim=1)
        drawn = torch.rand(tokens.shape, device=tokens.device) < self.config.mask_prob
        masked = drawn & (tokens != self.pad_id)
        masked[:, -1] = True
        hidden = self.encode(tokens.masked_fill(masked, self.mask_id))[masked]  # [n_masked, d]
        logits = hidden @ self.item_embeddings().T + self.item_bias
        return F.cross_entropy(logits, tokens[masked])
