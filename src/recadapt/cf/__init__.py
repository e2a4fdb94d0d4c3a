"""Conventional recommenders (CRMs) behind one contract, :class:`SequentialRecommender`.

Build one by name with :func:`build_crm`; save and load with :func:`save_crm` / :func:`load_crm`.
"""

from __future__ import annotations

from typing import Any

from recadapt.cf.base import Batch, CRMConfig, SequentialRecommender
from recadapt.cf.bert4rec import BERT4Rec, BERT4RecConfig
from recadapt.cf.caser import Caser, CaserConfig
from recadapt.cf.checkpoint import CheckpointError, load_crm, save_crm
from recadapt.cf.din import DIN, DINConfig
from recadapt.cf.gru4rec import GRU4Rec, GRU4RecConfig
from recadapt.cf.sasrec import SASRec, SASRecConfig

CRM_REGISTRY: dict[str, type[SequentialRecommender]] = {
    model.name: model for model in (SASRec, GRU4Rec, Caser, BERT4Rec, DIN)
}


def build_crm(name: str, n_items: int, n_users: int = 0, **config: Any) -> SequentialRecommender:
    """Build the registered CRM ``name`` for ``n_items`` items (and ``n_users`` users) from config keywords.

    Raises ValueError for an unknown name or config field, listing the valid ones.
    """
    if name not in CRM_REGISTRY:
        raise ValueError(f"unknown CRM {name!r}; registered: {sorted(CRM_REGISTRY)}")
    model_class = CRM_REGISTRY[name]
    return model_class(n_items, n_users, model_class.config_class.from_dict(config))


__all__ = [
    "BERT4Rec",
    "BERT4RecConfig",
    "Batch",
    "CRMConfig",
    "CRM_REGISTRY",
    "Caser",
    "CaserConfig",
    "CheckpointError",
    "DIN",
    "DINConfig",
    "GRU4Rec",
    "GRU4RecConfig",
    "SASRec",
    "SASRecConfig",
    "SequentialRecommender",
    "build_crm",
    "load_crm",
    "save_crm",
]
