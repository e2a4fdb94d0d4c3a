"""Negative sampling for candidate lists: the target plus distinct negatives per sample, uniform or weighted
(popularity-weighted negatives, as some sampled-ranking papers use).

Its own module because it is the one costly random draw of a split, vectorised with rejection sampling and an
exact fallback for small catalogues; :func:`recadapt.data.protocols.next_item` and
:func:`~recadapt.data.protocols.sampled_ranking` persist its result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recadapt.data.arrays import list_offsets_values, to_list_array

# Rows with at least this many times more eligible items than negatives use rejection sampling (a few rounds);
# rows with less slack are sampled exactly.
_DENSE_FACTOR = 2


def draw_candidates(
    histories: Any,
    targets: np.ndarray,
    n_items: int,
    n_candidates: int,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Candidates ``(N, n_candidates)``: the target once plus distinct negatives, shuffled per row.

    Negatives are drawn without replacement from the items that are neither in the row's history nor the
    target: uniformly, or with ``weights`` (one non-negative number per item, e.g. training popularity) by
    successive weighted draws (each negative drawn with probability proportional to its weight among the
    eligible items not drawn yet; :func:`_draw_weighted`).

    Uniform negatives use vectorised rejection sampling: all slots are drawn at once, and only slots that hit
    an excluded item or repeat an earlier slot are redrawn (a relabelling argument shows the resulting set is
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
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (n_items,) or not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"weights must be {n_items} finite non-negative numbers, one per item")
        positive = weights > 0  # only items with weight can be drawn: count those per row
        hits = np.bincount(excluded // n_items, weights=positive[excluded % n_items], minlength=n_rows)
        available = int(positive.sum()) - hits.astype(np.int64)
    if available.min() < n_neg:
        row = int(available.argmin())
        raise ValueError(
            f"catalogue too small for {n_candidates} candidates: {n_items} items, but sample {row} has only "
            f"{available[row]} items outside its history and target"
            + (" with a positive weight" if weights is not None else "")
            + f" ({n_neg} negatives needed)"
        )

    if weights is not None:
        negatives = _draw_weighted(excluded, weights, n_rows, n_neg, rng)
        return rng.permuted(np.concatenate((targets[:, None], negatives), axis=1), axis=1)
    negatives = np.empty((n_rows, n_neg), dtype=np.int64)
    dense = available < _DENSE_FACTOR * n_neg
    if dense.any():
        negatives[dense] = _draw_dense(np.flatnonzero(dense), excluded, n_items, n_neg, rng)
    sparse = np.flatnonzero(~dense)
    if len(sparse):
        negatives[sparse] = _draw_rejection(sparse, excluded, n_items, n_neg, rng)

    return rng.permuted(np.concatenate((targets[:, None], negatives), axis=1), axis=1)


# Weighted draws redrawn this many times before the rows still drawing switch to exact sampling.
_WEIGHTED_ROUNDS = 32


def _draw_weighted(
    excluded: np.ndarray, weights: np.ndarray, n_rows: int, n_neg: int, rng: np.random.Generator
) -> np.ndarray:
    """Successive weighted sampling without replacement, one slot at a time for all rows at once.

    Slot ``s`` is drawn from ``weights`` and redrawn where it hits an excluded item or an earlier slot; as the
    earlier slots are final, each accepted draw has exactly the conditional law of successive sampling. Rows
    whose excluded items hold most of the mass (a heavy user of the popular items) stop being redrawn after
    :data:`_WEIGHTED_ROUNDS` and are drawn exactly from their eligible items instead.
    """
    n_items = len(weights)
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0

    def draw(size: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n_items - 1)

    out = np.empty((n_rows, n_neg), dtype=np.int64)
    rows = np.arange(n_rows, dtype=np.int64)
    for slot in range(n_neg):
        todo = rows
        for _ in range(_WEIGHTED_ROUNDS):
            picks = draw(len(todo))
            keys = todo * n_items + picks
            pos = np.minimum(np.searchsorted(excluded, keys), len(excluded) - 1)
            bad = (excluded[pos] == keys) | (weights[picks] <= 0)
            bad |= (out[todo, :slot] == picks[:, None]).any(axis=1)
            out[todo[~bad], slot] = picks[~bad]
            todo = todo[bad]
            if not len(todo):
                break
        for row in todo:  # exact: renormalise over this row's eligible items
            mask = weights > 0
            lo, hi = np.searchsorted(excluded, [row * n_items, (row + 1) * n_items])
            mask[excluded[lo:hi] % n_items] = False
            mask[out[row, :slot]] = False
            p = np.where(mask, weights, 0.0)
            out[row, slot] = rng.choice(n_items, p=p / p.sum())
    return out


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
