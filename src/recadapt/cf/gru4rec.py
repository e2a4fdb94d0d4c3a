"""GRU4Rec: session-based recommendation with recurrent networks (Hidasi et al., ICLR 2016, arXiv 1511.06939).

Item embeddings run through a GRU; its final hidden state, projected to the embedding width, is the sequence
representation, scored against the (shared) item embedding table, as in RecBole's GRU4Rec.

Padding: a GRU updates its state on every step, even on a zero input, so running it over left padding would
make the representation depend on the amount of padding. Instead each history is moved to the front of its row
and packed with its true length (``pack_padded_sequence``): the GRU sees exactly the real items, and the final
state belongs to the most recent one. A history without items keeps the zero initial state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from recadapt.cf.base import Batch, CRMConfig, SequentialRecommender


@dataclass
class GRU4RecConfig(CRMConfig):
    """GRU4Rec hyper-parameters: one GRU layer of ``hidden_size`` units by default."""

    n_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")


class GRU4Rec(SequentialRecommender):
    """GRU over the item history; representation = linear map of the last hidden state."""

    name: ClassVar[str] = "gru4rec"
    config_class: ClassVar[type[CRMConfig]] = GRU4RecConfig
    config: GRU4RecConfig

    def __init__(self, n_items: int, n_users: int = 0, config: GRU4RecConfig | None = None) -> None:
        super().__init__(n_items, n_users, config)
        d = self.config.hidden_size
        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=self.pad_id)
        self.embedding_dropout = nn.Dropout(self.config.dropout)
        self.gru = nn.GRU(d, d, num_layers=self.config.n_layers, batch_first=True)
        self.output = nn.Linear(d, d)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_id].zero_()

    def sequence_representation(self, batch: Batch) -> Tensor:
        history = self.fit_history(batch["history"], self.config.max_len)
        length = history.size(1)
        n_real = (history != self.pad_id).sum(dim=1)  # [B]; histories are left-padded, items fill the tail

        # Row b's items move from positions [L - n_b, L) to [0, n_b); what follows them is never read.
        source = torch.arange(length, device=history.device) + (length - n_real)[:, None]
        front_aligned = history.gather(1, source.clamp(max=length - 1))
        x = self.embedding_dropout(self.item_embedding(front_aligned))

        lengths = n_real.clamp(min=1).cpu()  # packing needs >= 1 step; empty rows are reset below
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, last_hidden = self.gru(packed)  # [n_layers, B, d], in the original batch order
        state = last_hidden[-1] * (n_real > 0)[:, None]  # empty histories: the zero initial state
        return self.output(state)
