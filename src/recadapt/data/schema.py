"""The one in-memory schema every dataset reader produces.

Ids are dense 0-based integers assigned by the reader (``raw_id`` keeps the original token).
``PAD = n_items`` is the padding item id used in every padded history tensor (LLaRA's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

# Column contracts (extra columns are allowed and kept).
INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "raw_id", "title")
USER_COLUMNS = ("user_id", "raw_id")


@dataclass
class Dataset:
    """Interactions, items with text and users with attributes, plus any published split.

    interactions: one row per event; ``user_id``/``item_id`` int64, ``rating`` float64 (NaN when the source has
        none; implicit data), ``timestamp`` int64 (seconds, or a within-user order when the source has no time).
        Sorted by (user_id, timestamp, original line order).
    items: ``item_id`` (0..n_items-1, every id present), ``raw_id`` (str), ``title`` (str), optional text attributes
        (for example ``genres``, ``tags``: str, '|' joined).
    users: ``user_id`` (0..n_users-1), ``raw_id`` (str), optional attributes (``age``, ``gender``, ``occupation``).
    presplit: a published split used as is by a protocol, keyed by protocol name then by part name
        (``train``/``valid``/``test``); the frames follow the protocol's sample schema
        (see :mod:`recadapt.data.protocols`).
    sources: path -> SHA-256 of every source file read (recorded in manifests).
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    domain: str = "item"  # "movie", "artist", "game" or "item": selects prompt templates later
    presplit: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def pad_id(self) -> int:
        return self.n_items

    def validate(self) -> None:
        """Check the column contracts and id ranges; raises ``ValueError`` naming the table and column."""
        for table, cols in (
            ("interactions", INTERACTION_COLUMNS),
            ("items", ITEM_COLUMNS),
            ("users", USER_COLUMNS),
        ):
            frame = getattr(self, table)
            missing = [c for c in cols if c not in frame.columns]
            if missing:
                raise ValueError(f"dataset {self.name}: table '{table}' lacks columns {missing}")
        if not (self.items["item_id"].to_numpy() == range(len(self.items))).all():
            raise ValueError(f"dataset {self.name}: items.item_id must be 0..n_items-1 in order")
        if not (self.users["user_id"].to_numpy() == range(len(self.users))).all():
            raise ValueError(f"dataset {self.name}: users.user_id must be 0..n_users-1 in order")
        inter = self.interactions
        if len(inter):
            if inter["item_id"].min() < 0 or inter["item_id"].max() >= self.n_items:
                raise ValueError(f"dataset {self.name}: interactions.item_id out of range")
            if inter["user_id"].min() < 0 or inter["user_id"].max() >= self.n_users:
                raise ValueError(f"dataset {self.name}: interactions.user_id out of range")
