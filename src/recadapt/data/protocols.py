"""The three evaluation protocols: ``Dataset`` -> ``Split`` (train / valid / test sample frames).

Every protocol is a pure, deterministic function of the dataset and its parameters, so a split can be rebuilt
bit-for-bit and is persisted once (:mod:`recadapt.data.prepare`) for every method to be scored on.

* :func:`next_item` - LLaRA / iLoRA: users split 8:1:1, sliding-window training samples, the last item of each
  held-out user as the target among 20 persisted candidates.
* :func:`ctr` - ReLLa family: interactions split 8:1:1 by global time, label = rating > 3, the user's whole
  earlier history, and a fixed permutation of the training rows for nested few-shot subsets.
* :func:`full_ranking` - Laser / DARec: leave-one-out per user over the whole catalogue.
* :func:`sampled_ranking` - LLMRank, P5 and most sequential-recommendation papers: the same leave-one-out
  split, each target ranked among N sampled negatives (default 19) persisted with the split.

Sample schemas are those of ``docs/architecture.md``. List columns come back from pandas as object columns of
read-only ``int64``/``float64`` NumPy arrays (what ``pd.read_parquet`` returns too), oldest item first, real
items only. Everything is vectorised over interactions (NumPy / Arrow offsets): there is no Python loop per
interaction or per user, so a 25M-interaction dataset splits in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from recadapt.data.arrays import (
    _compress_lists,
    _frame,
    _tail,
    _windows,
    list_array,
    list_offsets_values,
    to_list_array,
)
from recadapt.data.candidates import draw_candidates
from recadapt.data.schema import Dataset
from recadapt.data.splits import (
    _STREAM_CANDIDATES,
    _STREAM_SHOTS,
    _STREAM_USERS,
    CTR,
    FULL_RANKING,
    NEXT_ITEM,
    PARTS,
    SAMPLED_RANKING,
    Split,
    _by_user_time,
    _check_ratios,
    _groups,
    _presplit_parts,
    _presplit_samples,
    _require,
    _rng,
    _Samples,
    _split_sizes,
)

# Uncapped ctr histories grow with the square of user activity; refuse beyond this many items (ML-100K: 10M).
_MAX_CTR_HISTORY_VALUES = 1 << 27


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


# ----------------------------------------------------------------------------------------------------------
# sampled ranking (leave-one-out among sampled negatives: LLMRank, P5, SASRec-style tables)
# ----------------------------------------------------------------------------------------------------------

NEGATIVE_SAMPLERS = ("uniform", "popularity")


def sampled_ranking(
    ds: Dataset,
    seed: int = 0,
    n_negatives: int = 19,
    negatives: str = "uniform",
    min_interactions: int = 5,
) -> Split:
    """Leave-one-out per user in time order, each target ranked among itself and ``n_negatives`` negatives.

    The samples are :func:`full_ranking`'s (test = (seq[:-1], seq[-1]), valid = (seq[:-2], seq[-2]), train =
    (seq[:-3], seq[-3]), expanded into prefixes by CRM trainers), plus a ``candidates`` column: the target and
    ``n_negatives`` distinct items the user never interacted with (none of the whole sequence, future items
    included; with a published split, none of the row's history or target), shuffled. ``negatives``:
    ``uniform`` over those items, or ``popularity``: successive draws weighted by each item's count in the
    valid part's histories (the interactions before every user's last two), so an item no user has in
    training is never a negative. Drawn once with ``seed`` (one stream per part) and persisted, so every
    method ranks the same lists. ``ds.presplit["full-ranking"]`` (e.g. a RecBole split) is used as is.
    """
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
    if negatives not in NEGATIVE_SAMPLERS:
        raise ValueError(f"negatives must be one of {NEGATIVE_SAMPLERS}, got {negatives!r}")
    loo = full_ranking(ds, min_interactions=min_interactions)
    params = {
        "seed": seed,
        "n_negatives": n_negatives,
        "negatives": negatives,
        "min_interactions": min_interactions,
    }
    weights = None
    if negatives == "popularity":
        _, seen = list_offsets_values(to_list_array(loo.parts["valid"]["history"]))
        weights = np.bincount(seen, minlength=ds.n_items).astype(np.float64)
    test = loo.parts["test"]
    whole = None  # each user's whole sequence (test history + target) when the split is derived here
    if not loo.stats["presplit"]:
        offsets, values = list_offsets_values(to_list_array(test["history"]))
        whole = _windows_with_targets(offsets, values, test["target"].to_numpy(np.int64))
    parts = {}
    for part in PARTS:
        frame = loo.parts[part]
        target = frame["target"].to_numpy(np.int64)
        # excluded items: the whole sequence (the same users in the same order in every part) or the row's own
        excluded = whole if whole is not None else to_list_array(frame["history"])
        rng = _rng(seed, _STREAM_CANDIDATES[part])
        candidates = draw_candidates(excluded, target, ds.n_items, n_negatives + 1, rng, weights=weights)
        columns = {"user_id": frame["user_id"].to_numpy(np.int64), "history": to_list_array(frame["history"])}
        columns |= {"target": target, "candidates": to_list_array(candidates)}
        parts[part] = _frame(columns)
    return Split(SAMPLED_RANKING, params, parts, dict(loo.stats))


def _windows_with_targets(offsets: np.ndarray, values: np.ndarray, targets: np.ndarray) -> pa.Array:
    """Each row's list with its target appended (a user's whole sequence from the test row)."""
    lengths = np.diff(offsets)
    new_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=new_offsets[1:])
    out = np.empty(new_offsets[-1], dtype=np.int64)
    is_target = np.zeros(len(out), dtype=bool)
    is_target[new_offsets[1:] - 1] = True
    out[is_target] = targets
    out[~is_target] = values
    return list_array(new_offsets, out)


PROTOCOLS = {NEXT_ITEM: next_item, CTR: ctr, FULL_RANKING: full_ranking, SAMPLED_RANKING: sampled_ranking}
