"""The one contract of full-ranking LLM recommenders (Laser, DARec), in the spirit of RecBole's model contract.

A model embeds users from their item histories and the catalogue from item data; scores are ``logits(user,
table)``; training minimises cross-entropy of the true next item over the whole catalogue plus the model's auxiliary
loss. The recipe (:mod:`recadapt.train.fullrank`) needs nothing else, so the two papers' systems share one loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Stage:
    """A training stage of a full-ranking method: ``epochs`` epochs; ``refresh``: recompute an LLM-made item table
    at each epoch (else use the best one). Laser trains in two stages, DARec in one."""

    name: str
    epochs: int
    refresh: bool = True


class FullRankingModel(nn.Module):
    """Base class: subclasses implement :meth:`user_embeddings`, :meth:`item_table` and :meth:`logits`.

    ``table_needs_llm``: True when :meth:`item_table` runs the LLM over the catalogue (Laser). The recipe then
    computes the table without gradients once per epoch (or once, frozen) instead of at every step.
    """

    table_needs_llm: ClassVar[bool] = False

    def user_embeddings(self, histories: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """FloatTensor[B, d] for item-id histories (oldest first), and an auxiliary loss (a scalar, 0 if none)."""
        raise NotImplementedError

    def item_table(self, progress: bool = False) -> Tensor:
        """FloatTensor[n_items, d]: every item of the catalogue."""
        raise NotImplementedError

    def logits(self, users: Tensor, table: Tensor) -> Tensor:
        """FloatTensor[B, n_items]: the scores that rank the catalogue (and enter the softmax loss)."""
        raise NotImplementedError

    def loss(self, histories: Sequence[np.ndarray], targets: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
        """(total loss, auxiliary part): softmax cross-entropy of ``targets`` over the catalogue + auxiliary."""
        users, auxiliary = self.user_embeddings(histories)
        ranking = F.cross_entropy(self.logits(users, table.to(users.dtype)).float(), targets.to(users.device))
        return ranking + auxiliary, auxiliary

    def prompt_tokens(self, histories: Sequence[np.ndarray]) -> int:
        """LLM input tokens of these histories' prompts (throughput logs and the budget table)."""
        prompts = getattr(self, "prompts", None)
        return sum(len(prompts.prompt(h)[0]) + 1 for h in histories) if prompts is not None else 0

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the parameters that train (the frozen LLM and CRM are not saved with a run)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}
