"""The three evaluation protocols: ``Dataset`` -> ``Split`` (train / valid / test sample frames).

Every protocol is a pure, deterministic function of the dataset and its parameters, so a split can be rebuilt
bit-for-bit and is persisted once (:mod:`recadapt.data.prepare`) for every method to be scored on.

* :func:`next_item` - LLaRA / iLoRA: users split 8:1:1, sliding-window training samples, the last item of each
  held-out user as the target among 20 persisted candidates.
* :func:`ctr` - ReLLa family: interactions split 8:1:1 by global time, label = rating > 3, the user's whole
  earlier history, and a fixed permutation of the training rows for nested few-shot subsets.
* :func:`full_ranking` - Laser / DARec: leave-one-out per user over the whole catalogue.

Sample schemas are those of ``docs/architecture.md``. List columns come back from pandas as object columns of
read-only ``int64``/``float64`` NumPy arrays (what ``pd.read_parquet`` returns too), oldest item first, real
items only. Everything is vectorised over interactions (NumPy / Arrow offsets): there is no Python loop per
interaction or per user, so a 25M-interaction dataset splits in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from recadapt.data.schema import Dataset

PARTS = ("train", "valid", "test")
NEXT_ITEM, CTR, FULL_RANKING = "next-item", "ctr", "full-ranking"

# Independent random streams, so changing how one quantity is drawn never changes another.
_STREAM_USERS, _STREAM_SHOTS = 0, 1
_STREAM_CANDIDATES = {"train": 2, "valid": 3, "test": 4}

# Rows with at least this many times more eligible items than negatives use rejection sampling (a few rounds);
# rows with less slack are sampled exactly.
_DENSE_FACTOR = 2

_INT32_MAX = np.iinfo(np.int32).max
# Uncapped ctr histories grow with the square of user activity; refuse beyond this many items (ML-100K: 10M).
_MAX_CTR_HISTORY_VALUES = 1 << 27


@dataclass
class Split:
    """A protocol's samples.

    protocol: ``"next-item"``, ``"ctr"`` or ``"full-ranking"``.
    params: every parameter the split depends on (JSON-able), recorded in the manifest.
    parts: ``train`` / ``valid`` / ``test`` sample frames (schemas: ``docs/architecture.md``); read-only.
    stats: facts about the result that are not parameters (users dropped, whether a published split was used).
    """

    protocol: str
    params: dict[str, Any]
    parts: dict[str, pd.DataFrame]
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Arrow list helpers (shared with recadapt.data.batching)
# ----------------------------------------------------------------------------------------------------------


def to_list_array(obj: Any, value_type: pa.DataType | None = None) -> pa.Array:
    """Normalise a list column to one Arrow list array (no nulls).

    Accepts an Arrow (chunked) list array, a pandas Series (object column of arrays/lists or ``ArrowDtype``),
    a sequence of arrays, or a 2-D NumPy matrix. Conversion of object columns happens in Arrow's C++ code,
    not in a Python loop.
    """
    value_type = pa.int64() if value_type is None else value_type
    if isinstance(obj, np.ndarray) and obj.ndim == 2:
        n, k = obj.shape
        values = pa.array(np.ascontiguousarray(obj).reshape(-1), type=value_type)
        return list_array(np.arange(n + 1, dtype=np.int64) * k, values)
    if isinstance(obj, pd.Series):
        # ArrowDtype columns convert without copying; object columns go through Arrow's C++ converter.
        is_arrow = isinstance(obj.dtype, pd.ArrowDtype)
        obj = pa.array(obj) if is_arrow else pa.array(obj.to_numpy(), type=pa.list_(value_type))
    elif not isinstance(obj, (pa.Array, pa.ChunkedArray)):
        obj = pa.array(obj, type=pa.list_(value_type))
    if isinstance(obj, pa.ChunkedArray):
        obj = obj.combine_chunks() if obj.num_chunks != 1 else obj.chunk(0)
    if not (pa.types.is_list(obj.type) or pa.types.is_large_list(obj.type)):
        raise TypeError(f"expected a list column, got Arrow type {obj.type}")
    if obj.null_count:
        raise ValueError(f"list column has {obj.null_count} null rows; use empty lists instead")
    if obj.type.value_type != value_type:
        obj = obj.cast(
            pa.large_list(value_type) if pa.types.is_large_list(obj.type) else pa.list_(value_type)
        )
    return obj


def list_offsets_values(lists: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-based ``int64`` offsets (N+1) and the flat values of a list array, zero-copy where possible."""
    offsets = np.asarray(lists.offsets).astype(np.int64, copy=False)
    start, stop = int(offsets[0]), int(offsets[-1])
    child = lists.values.slice(start, stop - start)
    if child.null_count:
        raise ValueError(f"list column has {child.null_count} null values")
    values = child.to_numpy(zero_copy_only=False)
    return offsets - start if start else offsets, values


def list_array(offsets: np.ndarray, values: np.ndarray | pa.Array) -> pa.Array:
    """A list array from offsets and flat values (64-bit offsets only when 32 bits cannot hold them)."""
    if not isinstance(values, pa.Array):
        values = pa.array(values)
    if len(offsets) and offsets[-1] > _INT32_MAX:
        return pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), values)
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), values)


def _tail(offsets: np.ndarray, values: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last ``max_len`` values of every list (``max_len <= 0``: keep all)."""
    lengths = np.diff(offsets)
    if max_len <= 0 or not len(lengths) or lengths.max() <= max_len:
        return offsets, values
    keep = np.minimum(lengths, max_len)
    new_offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=new_offsets[1:])
    return new_offsets, values[_window_index(offsets[1:], keep, new_offsets)]


def _window_index(ends: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Flat gather index of windows ``[end - length, end)`` laid out at ``offsets`` (``offsets = cumsum``)."""
    total = int(offsets[-1])
    index = np.arange(total, dtype=np.int64)
    index += np.repeat(ends - lengths - offsets[:-1], lengths)
    return index


def _windows(values: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """List array whose row i is ``values[ends[i] - lengths[i] : ends[i]]``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return list_array(offsets, values[_window_index(ends, lengths, offsets)])


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


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


def _frame(columns: dict[str, np.ndarray | pa.Array]) -> pd.DataFrame:
    """A pandas frame from NumPy / Arrow columns; list columns become object columns of NumPy views."""
    arrays = {k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()}
    return pa.table(arrays).to_pandas()


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


# ----------------------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------------------


def draw_candidates(
    histories: Any,
    targets: np.ndarray,
    n_items: int,
    n_candidates: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Candidates ``(N, n_candidates)``: the target once plus distinct uniform negatives, shuffled per row.

    Negatives are drawn uniformly without replacement from the items that are neither in the row's history nor
    the target. Vectorised rejection sampling: all slots are drawn at once, and only slots that hit an
    excluded item or repeat an earlier slot are redrawn (a relabelling argument shows the resulting set is
    uniform). Rows with little slack (few eligible items) are sampled exactly from a random ordering of the
    catalogue instead, so tiny catalogues never spin.
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    offsets, hist = list_offsets_values(to_list_array(histories))
    targets = np.asarray(targets, dtype=np.int64)
    n_rows, n_neg = len(targets), n_candidates - 1
    if len(offsets) - 1 != n_rows:
        raise ValueError(f"{len(offsets) - 1} histories but {n_rows} targets")
    for name, ids in (("history", hist), ("target", targets)):
        if len(ids) and (ids.min() < 0 or ids.max() >= n_items):
            raise ValueError(f"{name} item ids must lie in [0, {n_items}); found {ids.min()}..{ids.max()}")
    if n_rows == 0:
        return np.zeros((0, n_candidates), dtype=np.int64)
    if n_neg == 0:
        return targets[:, None].copy()

    # Sorted unique (row, item) keys of every excluded pair; their count per row gives each row's slack.
    rows = np.arange(n_rows, dtype=np.int64)
    excluded = np.concatenate((np.repeat(rows, np.diff(offsets)) * n_items + hist, rows * n_items + targets))
    excluded.sort()  # sort + neighbour mask: several times faster than np.unique's hashing here
    excluded = excluded[np.concatenate(([True], excluded[1:] != excluded[:-1]))]
    available = n_items - np.bincount(excluded // n_items, minlength=n_rows)
    if available.min() < n_neg:
        row = int(available.argmin())
        raise ValueError(
            f"catalogue too small for {n_candidates} candidates: {n_items} items, but sample {row} has only "
            f"{available[row]} items outside its history and target ({n_neg} negatives needed)"
        )

    negatives = np.empty((n_rows, n_neg), dtype=np.int64)
    dense = available < _DENSE_FACTOR * n_neg
    if dense.any():
        negatives[dense] = _draw_dense(np.flatnonzero(dense), excluded, n_items, n_neg, rng)
    sparse = np.flatnonzero(~dense)
    if len(sparse):
        negatives[sparse] = _draw_rejection(sparse, excluded, n_items, n_neg, rng)

    return rng.permuted(np.concatenate((targets[:, None], negatives), axis=1), axis=1)


def _draw_rejection(
    rows: np.ndarray, excluded: np.ndarray, n_items: int, n_neg: int, rng: np.random.Generator
) -> np.ndarray:
    out = rng.integers(0, n_items, size=(len(rows), n_neg), dtype=np.int64)
    todo = np.arange(len(rows))
    while len(todo):
        block = out[todo]
        keys = rows[todo, None] * n_items + block
        pos = np.minimum(np.searchsorted(excluded, keys), len(excluded) - 1)
        bad = excluded[pos] == keys
        for slot in range(1, n_neg):  # a slot repeating an earlier slot of its row is redrawn
            bad[:, slot] |= (block[:, :slot] == block[:, slot, None]).any(axis=1)
        n_bad = int(bad.sum())
        if n_bad == 0:
            break
        block[bad] = rng.integers(0, n_items, size=n_bad, dtype=np.int64)
        out[todo] = block
        todo = todo[bad.any(axis=1)]
    return out


def _draw_dense(
    rows: np.ndarray, excluded: np.ndarray, n_items: int, n_neg: int, rng: np.random.Generator
) -> np.ndarray:
    """Exact sampling: the n_neg eligible items with the smallest uniform random keys.

    Only used for rows with little slack, hence small catalogues; row chunks bound the memory anyway.
    """
    out = np.empty((len(rows), n_neg), dtype=np.int64)
    chunk = max(1, (1 << 22) // n_items)
    ex_row, ex_item = excluded // n_items, excluded % n_items
    for lo in range(0, len(rows), chunk):
        sub = rows[lo : lo + chunk]
        keys = rng.random((len(sub), n_items))
        first, last = np.searchsorted(ex_row, sub[0], "left"), np.searchsorted(ex_row, sub[-1], "right")
        sel_row, sel_item = ex_row[first:last], ex_item[first:last]
        hit = np.isin(sel_row, sub)
        keys[np.searchsorted(sub, sel_row[hit]), sel_item[hit]] = np.inf
        out[lo : lo + chunk] = np.argpartition(keys, n_neg - 1, axis=1)[:, :n_neg]
    return out


# ----------------------------------------------------------------------------------------------------------
# next-item (LLaRA / iLoRA)
# ----------------------------------------------------------------------------------------------------------


def next_item(
    ds: Dataset,
    seed: int = 0,
    history_len: int = 10,
    min_history: int = 3,
    n_candidates: int = 20,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
) -> Split:
    """LLaRA / iLoRA next-item prediction among ``n_candidates`` candidates.

    Users (those with interactions) are shuffled with ``seed`` and split by ``ratios`` (floor, floor, rest).
    Training users give one sample per position of their time-ordered sequence (history = up to
    ``history_len`` items before it); validation and test users give one sample each, their last item. Samples
    with fewer than ``min_history`` history items are skipped. A published split
    (``ds.presplit["next-item"]``) is used as is apart from that filter and the history truncation; missing
    parts (published test-only splits) are empty. Candidates are drawn once here, with ``seed``, and
    persisted, so every method is scored on the same ones.
    """
    ratios = _check_ratios(ratios)
    if history_len < 1 or min_history < 0 or min_history > history_len:
        raise ValueError(
            f"need 0 <= min_history <= history_len and history_len >= 1, got {min_history}, {history_len}"
        )
    params = {
        "seed": seed,
        "history_len": history_len,
        "min_history": min_history,
        "n_candidates": n_candidates,
        "ratios": list(ratios),
    }
    presplit = _presplit_parts(ds, NEXT_ITEM)
    samples: dict[str, _Samples] = {}
    stats: dict[str, Any] = {"presplit": presplit is not None}
    if presplit is not None:
        for part in PARTS:
            published = _presplit_samples(presplit.get(part), NEXT_ITEM, part, drop=("candidates",))
            offsets, values = list_offsets_values(published.history)
            keep = np.diff(offsets) >= min_history
            offsets, values = _tail(*_compress_lists(offsets, values, keep), history_len)
            samples[part] = published.take(np.flatnonzero(keep), list_array(offsets, values))
        stats["rows_skipped"] = {
            p: int(len(presplit[p]) - len(samples[p].user)) for p in PARTS if p in presplit
        }
    else:
        user, item, _ = _by_user_time(ds)
        starts, counts = _groups(user)
        n_tr, n_va, _ = _split_sizes(len(starts), ratios)
        order = _rng(seed, _STREAM_USERS).permutation(len(starts))
        rank = np.empty_like(order)  # each user's place in the shuffled order
        rank[order] = np.arange(len(order))
        group_part = (rank >= n_tr).astype(np.int64) + (rank >= n_tr + n_va)
        pos = np.arange(len(user), dtype=np.int64) - np.repeat(starts, counts)
        train_rows = np.repeat(group_part == 0, counts) & (pos >= min_history)
        for index, part in enumerate(PARTS):
            if part == "train":
                at = np.flatnonzero(train_rows)
            else:
                last = starts + counts - 1
                at = last[(group_part == index) & (counts - 1 >= min_history)]
            lengths = np.minimum(pos[at], history_len)
            samples[part] = _Samples(user[at], _windows(item, at, lengths), item[at])
        stats["users"] = {p: int(n) for p, n in zip(PARTS, np.bincount(group_part, minlength=3), strict=True)}

    parts = {}
    for part, sample in samples.items():
        rng = _rng(seed, _STREAM_CANDIDATES[part])
        candidates = draw_candidates(sample.history, sample.target, ds.n_items, n_candidates, rng)
        parts[part] = sample.frame(candidates=to_list_array(candidates))
    return Split(NEXT_ITEM, params, parts, stats)


def _compress_lists(
    offsets: np.ndarray, values: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Drop the lists where ``keep`` is false."""
    lengths = np.diff(offsets)
    if keep.all():
        return offsets, values
    new_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=new_offsets[1:])
    return new_offsets, values[np.repeat(keep, lengths)]


# ----------------------------------------------------------------------------------------------------------
# ctr (ReLLa family)
# ----------------------------------------------------------------------------------------------------------


def ctr(
    ds: Dataset,
    seed: int = 0,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    like_threshold: float = 3.0,
    max_history: int = 0,
) -> Split:
    """ReLLa-style click-through-rate prediction: label = rating > ``like_threshold``.

    All interactions are ordered by (timestamp, user_id, item_id) (stable) and split by position with
    ``ratios``, so validation and test are never earlier in time than training. A sample's history is every
    earlier interaction of the same user in that global order, across parts (a test sample sees the user's
    training items), with their ratings; ``max_history > 0`` keeps only the most recent ones. Without a cap
    the history columns grow with the square of a user's activity, so beyond 2**27 history items in all this
    refuses and asks for ``max_history``.

    Training rows get ``shot_rank``, their position in one permutation drawn with ``seed``: the N-shot
    training set is ``shot_rank < N`` (:func:`few_shot`), so smaller sets are subsets of larger ones. A
    published split (``ds.presplit["ctr"]``) is used as is (``max_history`` still applies; missing ``rating``
    / ``history_ratings`` are filled with NaN).
    """
    ratios = _check_ratios(ratios)
    if max_history < 0:
        raise ValueError(f"max_history must be >= 0 (0 = unlimited), got {max_history}")
    params = {
        "seed": seed,
        "ratios": list(ratios),
        "like_threshold": like_threshold,
        "max_history": max_history,
    }
    presplit = _presplit_parts(ds, CTR)
    if presplit is not None:
        parts = {p: _ctr_presplit_part(presplit.get(p), p, max_history) for p in PARTS}
        stats: dict[str, Any] = {"presplit": True}
    else:
        parts = _ctr_derive(ds, ratios, like_threshold, max_history)
        stats = {"presplit": False}
    train = parts["train"]
    shot_rank = np.empty(len(train), dtype=np.int64)
    shot_rank[_rng(seed, _STREAM_SHOTS).permutation(len(train))] = np.arange(len(train), dtype=np.int64)
    train["shot_rank"] = shot_rank
    stats["positive_rate"] = {
        p: round(float(f["label"].mean()), 6) if len(f) else None for p, f in parts.items()
    }
    return Split(CTR, params, parts, stats)


_CTR_COLUMNS = ("user_id", "target", "label", "rating", "timestamp", "history", "history_ratings")


def _ctr_derive(
    ds: Dataset, ratios: tuple[float, float, float], like_threshold: float, max_history: int
) -> dict[str, pd.DataFrame]:
    inter = ds.interactions
    user = inter["user_id"].to_numpy(np.int64)
    item = inter["item_id"].to_numpy(np.int64)
    ts = inter["timestamp"].to_numpy(np.int64)
    rating = inter["rating"].to_numpy(np.float64)
    n_missing = int(np.isnan(rating).sum())
    if n_missing:
        raise ValueError(
            f"dataset {ds.name}: ctr labels need ratings, but {n_missing} interactions have none"
        )
    order = np.lexsort((item, user, ts))  # global time order; stable, so exact duplicates keep line order
    user, item, ts, rating = user[order], item[order], ts[order], rating[order]

    # Group by user keeping global order; a sample's history is the window ending at its place in its group.
    by_user = np.argsort(user, kind="stable")
    place = np.empty_like(by_user)
    place[by_user] = np.arange(len(by_user), dtype=np.int64)
    starts, counts = _groups(user[by_user])
    pos = place - np.repeat(starts, counts)[place]
    lengths = pos if max_history <= 0 else np.minimum(pos, max_history)
    if int(lengths.sum()) > _MAX_CTR_HISTORY_VALUES:
        raise ValueError(
            f"dataset {ds.name}: uncapped ctr histories would hold {int(lengths.sum()):,} items "
            f"(limit {_MAX_CTR_HISTORY_VALUES:,}, about 1 GiB per list column); set max_history, e.g. 50"
        )
    history = _windows(item[by_user], place, lengths)
    history_ratings = _windows(rating[by_user], place, lengths)
    del by_user, pos

    n_tr, n_va, _ = _split_sizes(len(user), ratios)
    bounds = {"train": (0, n_tr), "valid": (n_tr, n_tr + n_va), "test": (n_tr + n_va, len(user))}
    label = (rating > like_threshold).astype(np.int8)
    parts = {}
    for part, (lo, hi) in bounds.items():
        parts[part] = _frame(
            {
                "user_id": user[lo:hi],
                "target": item[lo:hi],
                "label": label[lo:hi],
                "rating": rating[lo:hi],
                "timestamp": ts[lo:hi],
                "history": history.slice(lo, hi - lo),
                "history_ratings": history_ratings.slice(lo, hi - lo),
            }
        )
    return parts


def _ctr_presplit_part(frame: pd.DataFrame | None, part: str, max_history: int) -> pd.DataFrame:
    if frame is None:
        empty = list_array(np.zeros(1, np.int64), np.zeros(0, np.int64))
        columns: dict[str, Any] = {
            "user_id": np.zeros(0, np.int64),
            "target": np.zeros(0, np.int64),
            "label": np.zeros(0, np.int8),
            "rating": np.zeros(0, np.float64),
            "timestamp": np.zeros(0, np.int64),
            "history": empty,
            "history_ratings": list_array(np.zeros(1, np.int64), np.zeros(0, np.float64)),
        }
        return _frame(columns)
    _require(frame, ("user_id", "target", "label", "timestamp", "history"), f"presplit['{CTR}']['{part}']")
    offsets, hist = list_offsets_values(to_list_array(frame["history"]))
    if "history_ratings" in frame.columns:
        r_offsets, hist_ratings = list_offsets_values(to_list_array(frame["history_ratings"], pa.float64()))
        if not np.array_equal(r_offsets, offsets):
            raise ValueError(f"presplit['{CTR}']['{part}']: history_ratings and history differ in length")
    else:
        hist_ratings = np.full(len(hist), np.nan)
    new_offsets, hist = _tail(offsets, hist, max_history)
    _, hist_ratings = _tail(offsets, hist_ratings, max_history)
    rating = (
        frame["rating"].to_numpy(np.float64) if "rating" in frame.columns else np.full(len(frame), np.nan)
    )
    out = _frame(
        {
            "user_id": frame["user_id"].to_numpy(np.int64),
            "target": frame["target"].to_numpy(np.int64),
            "label": frame["label"].to_numpy(np.int8),
            "rating": rating,
            "timestamp": frame["timestamp"].to_numpy(np.int64),
            "history": list_array(new_offsets, hist),
            "history_ratings": list_array(new_offsets, hist_ratings),
        }
    )
    extra = frame.drop(columns=[*_CTR_COLUMNS, "shot_rank"], errors="ignore")
    return out if not len(extra.columns) else pd.concat([out, extra.reset_index(drop=True)], axis=1)


def few_shot(train: pd.DataFrame, n: int) -> pd.DataFrame:
    """The N-shot training set: the first ``n`` rows of the split's fixed permutation (``shot_rank < n``).

    Rows come in permutation order, so ``few_shot(train, m)`` is a prefix of ``few_shot(train, n)`` for m <=
    n.
    """
    if "shot_rank" not in train.columns:
        raise ValueError("few_shot needs a ctr training frame with a 'shot_rank' column")
    if not 0 <= n <= len(train):
        raise ValueError(f"cannot take {n} shots from {len(train)} training samples")
    rank = train["shot_rank"].to_numpy()
    rows = np.argsort(rank, kind="stable")[:n]
    return train.iloc[rows].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# full ranking (Laser / DARec)
# ----------------------------------------------------------------------------------------------------------


def full_ranking(ds: Dataset, min_interactions: int = 5) -> Split:
    """Leave-one-out over the whole catalogue, per user in time order.

    With a user's sequence ``seq``: test = (seq[:-1], seq[-1]), valid = (seq[:-2], seq[-2]), train =
    (seq[:-3], seq[-3]); trainers expand the training row into one sample per prefix
    (:func:`recadapt.data.batching.expand_prefixes`). Users with fewer than ``min_interactions`` interactions
    are dropped (their number is in ``stats["users_dropped"]``). A published split
    (``ds.presplit["full-ranking"]``) is used as is. Built with masks and offsets only: linear time, no
    per-user Python work.
    """
    if min_interactions < 3:
        raise ValueError(
            f"min_interactions must be >= 3 (one train, valid and test target), got {min_interactions}"
        )
    params = {"min_interactions": min_interactions}
    presplit = _presplit_parts(ds, FULL_RANKING)
    if presplit is not None:
        parts = {p: _presplit_samples(presplit.get(p), FULL_RANKING, p).frame() for p in PARTS}
        return Split(FULL_RANKING, params, parts, {"presplit": True})

    user, item, _ = _by_user_time(ds)
    starts, counts = _groups(user)
    kept = counts >= min_interactions
    k_starts, k_counts = starts[kept], counts[kept]
    users = user[k_starts]
    # Items remaining in the user's sequence from each position on (1 for the last item).
    remaining = np.repeat(starts + counts, counts)
    remaining -= np.arange(len(user), dtype=np.int64)
    remaining[~np.repeat(kept, counts)] = 0
    parts = {}
    for drop, part in ((3, "train"), (2, "valid"), (1, "test")):
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(k_counts - drop, out=offsets[1:])
        parts[part] = _frame(
            {
                "user_id": users,
                "history": list_array(offsets, item[remaining > drop]),
                "target": item[k_starts + k_counts - drop],
            }
        )
    stats = {"presplit": False, "users": int(kept.sum()), "users_dropped": int((~kept).sum())}
    return Split(FULL_RANKING, params, parts, stats)


PROTOCOLS = {NEXT_ITEM: next_item, CTR: ctr, FULL_RANKING: full_ranking}
