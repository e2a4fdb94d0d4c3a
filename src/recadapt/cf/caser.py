"""Caser: convolutional sequence embedding (Tang & Wang, WSDM 2018, arXiv 1809.07426).

The last L items form an L x d "image". Horizontal filters of heights 1..L, max-pooled over time, capture
union-level and point-level sequential patterns; vertical filters take weighted sums over the L rows. Their
concatenation passes a fully connected layer to z (width d). With users, the paper scores items with
``W'[z; P_u] + b'``: here the representation is ``[z; P_u]`` (width 2d) and ``W'`` is a separate output item
table of that width, which :meth:`Caser.item_embeddings` returns (``embedding_dim`` is then 2d).

User embeddings are only trained for users seen in training: build with ``n_users=0`` (or ``use_user=False``)
when evaluation users are disjoint from training users, as in LLaRA's user split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from recadapt.cf.base import Batch, CRMConfig, SequentialRecommender


@dataclass
class CaserConfig(CRMConfig):
    """Caser hyper-parameters. ``max_len`` is the paper's window L (5); ``n_h``/``n_v`` count the filters."""

    max_len: int = 5
    n_h: int = 16
    n_v: int = 4
    use_user: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_h < 1 or self.n_v < 1:
            raise ValueError(f"n_h and n_v must be >= 1, got n_h={self.n_h}, n_v={self.n_v}")


class Caser(SequentialRecommender):
    """Horizontal and vertical convolutions over the last ``max_len`` item embeddings."""

    name: ClassVar[str] = "caser"
    config_class: ClassVar[type[CRMConfig]] = CaserConfig
    config: CaserConfig

    def __init__(self, n_items: int, n_users: int = 0, config: CaserConfig | None = None) -> None:
        super().__init__(n_items, n_users, config)
        d, window = self.config.hidden_size, self.config.max_len
        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=self.pad_id)
        self.horizontal = nn.ModuleList(nn.Conv2d(1, self.config.n_h, (h, d)) for h in range(1, window + 1))
        self.vertical = nn.Conv2d(1, self.config.n_v, (window, 1))
        self.dropout = nn.Dropout(self.config.dropout)
        self.fc = nn.Linear(self.config.n_h * window + self.config.n_v * d, d)
        self.use_user = self.config.use_user and n_users > 0
        self.user_embedding = nn.Embedding(n_users, d) if self.use_user else None
        self.output_embedding = nn.Embedding(n_items, self.embedding_dim)
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        # Embeddings ~ N(0, 1/d) as in the paper's code. Zero biases for the ReLU layers: with such small
        # inputs a default (uniform) bias alone decides the sign, so a filter drawn with a negative bias would
        # start dead.
        for table in (self.item_embedding, self.output_embedding, self.user_embedding):
            if table is not None:
                nn.init.normal_(table.weight, std=1.0 / table.embedding_dim)
        for layer in (*self.horizontal, self.vertical, self.fc):
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_id].zero_()

    @property
    def embedding_dim(self) -> int:
        """``d``, or ``2d`` when the user embedding is concatenated to z."""
        return self.config.hidden_size * (2 if self.use_user else 1)

    def item_embeddings(self) -> Tensor:
        return self.output_embedding.weight

    def sequence_representation(self, batch: Batch) -> Tensor:
        history = self.fit_history(batch["history"], self.config.max_len)
        image = self.item_embedding(history)[:, None]  # [B, 1, L, d]; padding rows are zero

        # A horizontal filter of height h slides over L - h + 1 windows; max-pooling keeps its best match.
        horizontal = [torch.relu(conv(image)).squeeze(3).amax(dim=2) for conv in self.horizontal]  # [B, n_h]
        vertical = self.vertical(image).flatten(1)  # [B, n_v * d]
        z = torch.relu(self.fc(self.dropout(torch.cat([*horizontal, vertical], dim=1))))
        if self.user_embedding is None:
            return z
        return torch.cat([z, self.user_embedding(self.user_ids(batch))], dim=1)
