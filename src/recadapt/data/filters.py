"""Dataset filters and statistics: the k-core filter and the numbers papers report about their data.

Both work on interaction arrays (bincounts and masks, no Python loop per user), so ML-25M filters in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from recadapt.data.schema import Dataset


def kcore(ds: Dataset, k: int) -> Dataset:
    """The ``k``-core of ``ds``: interactions of users and items with at least ``k`` interactions each, applied
    until no user or item falls below ``k`` (removing an item can push a user below it, and back).

    Users and items left without interactions are dropped and the ids made dense again in their old order;
    ``raw_id`` keeps the source ids. ``k <= 1`` returns ``ds`` unchanged. A published split refers to the old
    ids, so a dataset carrying one is refused.
    """
    if k <= 1:
        return ds
    if ds.presplit:
        raise ValueError(
            f"dataset {ds.name}: a k-core filter would change the published split {sorted(ds.presplit)}; "
            "filter the interactions before splitting, or use the published split as is"
        )
    inter = ds.interactions
    user = inter["user_id"].to_numpy(np.int64)
    item = inter["item_id"].to_numpy(np.int64)
    keep = np.ones(len(user), dtype=bool)
    while True:
        user_counts = np.bincount(user[keep], minlength=ds.n_users)
        item_counts = np.bincount(item[keep], minlength=ds.n_items)
        drop = keep & ((user_counts[user] < k) | (item_counts[item] < k))
        if not drop.any():
            break
        keep &= ~drop
    kept_users = np.flatnonzero(np.bincount(user[keep], minlength=ds.n_users))
    kept_items = np.flatnonzero(np.bincount(item[keep], minlength=ds.n_items))
    new_user = np.full(ds.n_users, -1, dtype=np.int64)
    new_user[kept_users] = np.arange(len(kept_users))
    new_item = np.full(ds.n_items, -1, dtype=np.int64)
    new_item[kept_items] = np.arange(len(kept_items))
    filtered = inter.loc[keep].reset_index(drop=True)
    filtered["user_id"] = new_user[user[keep]]
    filtered["item_id"] = new_item[item[keep]]
    items = ds.items.iloc[kept_items].reset_index(drop=True)
    items["item_id"] = np.arange(len(items), dtype=np.int64)
    users = ds.users.iloc[kept_users].reset_index(drop=True)
    users["user_id"] = np.arange(len(users), dtype=np.int64)
    out = dataclasses.replace(ds, interactions=filtered, items=items, users=users)
    out.validate()
    return out


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    """Users, items, interactions, density and the distribution of interactions per user and per item (the
    table every paper prints); only users and items with at least one interaction count."""
    inter = ds.interactions
    per_user = np.bincount(inter["user_id"].to_numpy(np.int64), minlength=ds.n_users)
    per_item = np.bincount(inter["item_id"].to_numpy(np.int64), minlength=ds.n_items)
    per_user, per_item = per_user[per_user > 0], per_item[per_item > 0]
    n_users, n_items, n = len(per_user), len(per_item), len(inter)

    def spread(counts: np.ndarray) -> dict[str, float]:
        if not len(counts):
            return {}
        q = np.percentile(counts, [10, 25, 50, 75, 90])
        return {
            "min": int(counts.min()),
            "p10": float(q[0]),
            "p25": float(q[1]),
            "median": float(q[2]),
            "mean": float(counts.mean()),
            "p75": float(q[3]),
            "p90": float(q[4]),
            "max": int(counts.max()),
        }

    rating = inter["rating"].to_numpy(np.float64) if "rating" in inter else np.zeros(0)
    stats: dict[str, Any] = {
        "dataset": ds.name,
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "density": n / (n_users * n_items) if n_users and n_items else 0.0,
        "per_user": spread(per_user),
        "per_item": spread(per_item),
        "rated": int(np.isfinite(rating).sum()),
    }
    if len(inter):
        ts = inter["timestamp"].to_numpy(np.int64)
        stats["time_span"] = [int(ts.min()), int(ts.max())]
    return stats


_YEAR_1973 = (
    100_000_000  # timestamps below this are taken as orders (e.g. LastFM's published split), not seconds
)


def format_stats(stats: dict[str, Any]) -> str:
    """The statistics as an aligned text table."""
    lines = [
        f"dataset       {stats['dataset']}",
        f"users         {stats['users']:,}",
        f"items         {stats['items']:,}",
        f"interactions  {stats['interactions']:,}",
        f"density       {stats['density']:.4%}",
        f"rated         {stats['rated']:,}",
    ]
    if "time_span" in stats:
        lo, hi = stats["time_span"]
        if lo >= _YEAR_1973:  # unix seconds
            lo, hi = (pd.Timestamp(t, unit="s").strftime("%Y-%m-%d") for t in (lo, hi))
            lines.append(f"time span     {lo} .. {hi}")
        else:
            lines.append(f"timestamps    {lo} .. {hi} (an order, not times)")
    header = "              " + " ".join(
        f"{k:>8}" for k in ("min", "p10", "p25", "median", "mean", "p75", "p90", "max")
    )
    lines.append(header)
    for label, key in (("per user", "per_user"), ("per item", "per_item")):
        row = stats[key]
        if row:
            cells = " ".join(f"{row[k]:>8.1f}" if isinstance(row[k], float) else f"{row[k]:>8,}" for k in row)
            lines.append(f"{label:<14}{cells}")
    return "\n".join(lines)
