"""The contract every conventional recommender (CRM) in :mod:`recadapt.cf` implements.

A CRM turns a batch of item-id histories into scores over items. The LLM methods built on top of it use
only this contract: the sequence (user) representation and the item embeddings condition the LLM, and the
scores make every CRM a baseline as well. See ``docs/architecture.md`` ("CRM contract", "Ids and padding").

Batch layout (a mapping of tensors):

- ``history``: LongTensor[B, L], **left-padded** with ``PAD = n_items``, oldest first, so the most recent item
  is at position -1. A row may be all padding (a user without history); models still return finite values.
- ``target``: LongTensor[B], the item to predict (next-item) or to judge (CTR).
- ``candidates``: LongTensor[B, C], optional, items to rank.
- ``label``: FloatTensor[B], present for CTR data only: 1 if the user liked ``target``.
- ``user_id``: LongTensor[B], optional unless a model is built with user embeddings.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = Mapping[str, Tensor]


@dataclass
class CRMConfig:
    """Hyper-parameters shared by all CRMs. Each model extends this with its own fields.

    Attributes:
        hidden_size: width of item embeddings and of the sequence representation.
        dropout: dropout probability used throughout the model.
        max_len: the model sees at most this many of the most recent history items.
    """

    hidden_size: int = 64
    dropout: float = 0.2
    max_len: int = 50

    def __post_init__(self) -> None:
        self._check_types()
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")

    def _check_types(self) -> None:
        """Reject values of the wrong type (configs come from YAML, JSON and command-line overrides).

        Lists become tuples (JSON has no tuples, and a config must equal itself after a save/load round trip)
        and ints become floats where a float is expected; bools are not accepted as numbers.
        """
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value, expected = getattr(self, field.name), hints[field.name]
            if isinstance(value, list):
                value = tuple(value)
            if expected is float and type(value) is int:
                value = float(value)
            if not _matches(value, expected):
                wanted = expected.__name__ if isinstance(expected, type) else str(expected)
                raise ValueError(f"{type(self).__name__}.{field.name} must be {wanted}, got {value!r}")
            setattr(self, field.name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CRMConfig:
        """Build from keyword values, rejecting unknown keys with a message that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def _matches(value: Any, expected: Any) -> bool:
    """``isinstance`` for config field types (int, float, bool, str, tuple[T, ...]); a bool is no number."""
    if typing.get_origin(expected) is tuple:
        item = typing.get_args(expected)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    return isinstance(value, expected) and (expected is bool or not isinstance(value, bool))


class SequentialRecommender(nn.Module):
    """Base class of all CRMs: an ``nn.Module`` scoring items from a left-padded item-id history.

    Subclasses set ``name`` (the registry key) and ``config_class``, build their layers in ``__init__`` and
    implement :meth:`sequence_representation`, plus :meth:`item_embeddings` when their output item table is
    not the input table ``self.item_embedding``. The default scorers take the dot product of the sequence
    representation with the item embeddings, plus ``self.item_bias`` when a model sets one.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[CRMConfig]] = CRMConfig
    # Every model embeds history ids with a table of n_items + 1 rows; its padding row (PAD = n_items) is 0.
    item_embedding: nn.Embedding

    def __init__(self, n_items: int, n_users: int = 0, config: CRMConfig | None = None) -> None:
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        if n_users < 0:
            raise ValueError(f"n_users must be >= 0, got {n_users}")
        config = self.config_class() if config is None else config
        if type(config) is not self.config_class:
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.n_items = n_items
        self.n_users = n_users
        self.config = config
        # Optional per-item output bias: subclasses that want one assign an nn.Parameter of shape [n_items].
        self.item_bias: nn.Parameter | None
        self.register_parameter("item_bias", None)

    @property
    def pad_id(self) -> int:
        """Padding item id (``n_items``, LLaRA's convention); embedding tables have a zero row for it."""
        return self.n_items

    @property
    def embedding_dim(self) -> int:
        """Width ``d`` of :meth:`sequence_representation` and :meth:`item_embeddings`."""
        return self.config.hidden_size

    # The contract.

    def sequence_representation(self, batch: Batch) -> Tensor:
        """FloatTensor[B, d]: the vector summarising each history, in the space of :meth:`item_embeddings`."""
        raise NotImplementedError

    def user_representation(self, batch: Batch) -> Tensor:
        """FloatTensor[B, d]: the user vector that conditions an LLM (default: sequence representation)."""
        return self.sequence_representation(batch)

    # A target-aware CRM (DIN) overrides both: a representation of the user with respect to one target item, what
    # a CTR adapter may condition on when the label depends on the target (llm.cond=crm-target).
    target_aware: ClassVar[bool] = False

    @property
    def target_representation_dim(self) -> int:
        """Width of :meth:`target_representation`."""
        raise NotImplementedError(f"{self.name} has no target-aware representation")

    def target_representation(self, batch: Batch, target: Tensor) -> Tensor:
        """FloatTensor[B, k]: the user's representation with respect to ``target`` (LongTensor[B])."""
        raise NotImplementedError(f"{self.name} has no target-aware representation")

    def history_states(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-item states FloatTensor[B, N, d] of the history and BoolTensor[B, N] marking real positions.

        Laser's M-Former cross-attends to these (its C_u). Default: the input embeddings of the most recent
        ``max_len`` items; models with a sequence encoder return its per-position outputs instead.
        """
        history = self.fit_history(batch["history"], self.config.max_len)
        return self.item_embedding(history), history != self.pad_id

    def item_embeddings(self) -> Tensor:
        """FloatTensor[n_items, d]: the output item table (padding row excluded)."""
        return self.item_embedding.weight[: self.n_items]

    def score_all(self, batch: Batch) -> Tensor:
        """FloatTensor[B, n_items]: logits over the whole catalogue."""
        scores = self.sequence_representation(batch) @ self.item_embeddings().T
        return scores if self.item_bias is None else scores + self.item_bias

    def score_candidates(self, batch: Batch, candidates: Tensor) -> Tensor:
        """FloatTensor[B, C]: logits of ``candidates`` (LongTensor[B, C]), ``score_all`` gathered there."""
        representation = self.sequence_representation(batch)
        scores = torch.einsum("bd,bcd->bc", representation, self.item_embeddings()[candidates])
        return scores if self.item_bias is None else scores + self.item_bias[candidates]

    def loss(self, batch: Batch) -> Tensor:
        """Scalar loss: BCE on the target's logit for CTR batches, else cross-entropy over the catalogue."""
        if "label" in batch:
            return self.ctr_loss(batch)
        return F.cross_entropy(self.score_all(batch), batch["target"])

    def ctr_loss(self, batch: Batch) -> Tensor:
        """Binary cross-entropy of the target's logit against ``batch["label"]``."""
        logits = self.score_candidates(batch, batch["target"][:, None]).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))

    # Helpers for subclasses.

    def fit_history(self, history: Tensor, length: int) -> Tensor:
        """Left-pad with PAD, or keep the ``length`` most recent items, so position -1 stays the latest item.

        Models with positional parameters see every history at a fixed length, which makes their output
        independent of how much padding the caller added.
        """
        if history.dim() != 2:
            raise ValueError(f"history must be a [B, L] tensor, got shape {tuple(history.shape)}")
        current = history.size(1)
        if current >= length:
            return history[:, current - length :]
        return F.pad(history, (length - current, 0), value=self.pad_id)

    def user_ids(self, batch: Batch) -> Tensor:
        """``batch["user_id"]``, with a clear error for models built with user embeddings."""
        if "user_id" not in batch:
            raise KeyError(f"{type(self).__name__} has user embeddings: the batch needs 'user_id'")
        return batch["user_id"]

    def extra_repr(self) -> str:
        return f"n_items={self.n_items}, n_users={self.n_users}"
