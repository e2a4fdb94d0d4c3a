"""What every protocol returns (:class:`Split`) and the pieces they share: seeded streams, ratio splits, user
grouping and published (presplit) parts. The protocols themselves are in :mod:`recadapt.data.protocols`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from recadapt.data.arrays import _frame, list_array, to_list_array
from recadapt.data.schema import Dataset

PARTS = ("train", "valid", "test")
NEXT_ITEM, CTR, FULL_RANKING = "next-item", "ctr", "full-ranking"
SAMPLED_RANKING = "sampled-ranking"
# protocols whose samples carry a persisted ``candidates`` list (the target among sampled negatives): every
# method ranks exactly those, so they share one evaluation path
CANDIDATE_PROTOCOLS = (NEXT_ITEM, SAMPLED_RANKING)

# Independent random streams, so changing how one quantity is drawn never changes another.
_STREAM_USERS, _STREAM_SHOTS = 0, 1
_STREAM_CANDIDATES = {"train": 2, "valid": 3, "test": 4}


@dataclass
class Split:
    """A protocol's samples.

    protocol: ``"next-item"``, ``"ctr"``, ``"full-ranking"`` or ``"sampled-ranking"``.
    params: every parameter the split depends on (JSON-able), recorded in the manifest.
    parts: ``train`` / ``valid`` / ``test`` sample frames (schemas: ``docs/architecture.md``); read-only.
    stats: facts about the result that are not parameters (users dropped, whether a published split was used).
    """

    protocol: str
    params: dict[str, Any]
    parts: dict[str, pd.DataFrame]
    stats: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream,))))


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(f"ratios must be three non-negative fractions summing to 1, got {tuple(ratios)}")
    return float(ratios[0]), float(ratios[1]), float(ratios[2])


def _split_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """floor(r_train * n), floor(r_valid * n), rest: 943 users -> 754 / 94 / 95, as in LLaRA's split."""
    n_train = math.floor(ratios[0] * n + 1e-9)
    n_valid = min(math.floor(ratios[1] * n + 1e-9), n - n_train)
    return n_train, n_valid, n - n_train - n_valid


def _by_user_time(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """user, item and timestamp arrays in (user, timestamp, original order) order.

    Readers already sort this way (the Dataset contract), so usually this only verifies it in O(N).
    """
    inter = ds.interactions
    user = inter["user_id"].to_numpy(np.int64)
    item = inter["item_id"].to_numpy(np.int64)
    ts = inter["timestamp"].to_numpy(np.int64)
    if len(user) > 1:
        du = np.diff(user)
        if not ((du > 0) | ((du == 0) & (np.diff(ts) >= 0))).all():
            order = np.lexsort((ts, user))  # stable: equal (user, timestamp) keep their line order
            user, item, ts = user[order], item[order], ts[order]
    return user, item, ts


def _groups(user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal user ids in a user-grouped array."""
    if not len(user):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], user[1:] != user[:-1])))
    counts = np.diff(np.append(starts, len(user)))
    return starts, counts


def _require(frame: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{where} lacks columns {missing} (has {list(frame.columns)})")


def _presplit_parts(ds: Dataset, protocol: str) -> dict[str, pd.DataFrame] | None:
    parts = ds.presplit.get(protocol)
    if parts is None:
        return None
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or "test" not in parts:
        raise ValueError(
            f"dataset {ds.name}: presplit['{protocol}'] must have a 'test' part and only parts {PARTS}, "
            f"has {sorted(parts)}"
        )
    return parts


@dataclass
class _Samples:
    """(user, history, target) samples before they become a frame, plus extra published columns."""

    user: np.ndarray
    history: pa.Array
    target: np.ndarray
    extra: pd.DataFrame | None = None

    def take(self, rows: np.ndarray, history: pa.Array) -> _Samples:
        """The given rows, with their (already selected) histories."""
        extra = None if self.extra is None else self.extra.iloc[rows].reset_index(drop=True)
        return _Samples(self.user[rows], history, self.target[rows], extra)

    def frame(self, **columns: pa.Array) -> pd.DataFrame:
        out = _frame({"user_id": self.user, "history": self.history, "target": self.target, **columns})
        if self.extra is None or not len(self.extra.columns):
            return out
        return pd.concat([out, self.extra], axis=1)


def _presplit_samples(
    frame: pd.DataFrame | None, protocol: str, part: str, drop: Sequence[str] = ()
) -> _Samples:
    """A published part in the sample schema's types (empty when the part was not published)."""
    if frame is None:
        empty = np.zeros(0, np.int64)
        return _Samples(empty, list_array(np.zeros(1, np.int64), empty), empty)
    _require(frame, ("user_id", "history", "target"), f"presplit['{protocol}']['{part}']")
    extra = frame.drop(columns=["user_id", "history", "target", *drop], errors="ignore")
    return _Samples(
        frame["user_id"].to_numpy(np.int64),
        to_list_array(frame["history"]),
        frame["target"].to_numpy(np.int64),
        extra.reset_index(drop=True),
    )
