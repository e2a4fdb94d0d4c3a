"""Synthetic ``Dataset`` builders for protocol, persistence and batching tests (no real data needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from recadapt.data.schema import Dataset


def _tables(n_users: int, n_items: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items, dtype=np.int64),
            "raw_id": [f"i{i}" for i in range(n_items)],
            "title": [f"Item {i}" for i in range(n_items)],
            "genres": ["Drama|Comedy" if i % 2 else "Action" for i in range(n_items)],
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(n_users, dtype=np.int64),
            "raw_id": [f"u{u}" for u in range(n_users)],
            "age": np.arange(n_users, dtype=np.int64) % 50 + 18,
        }
    )
    return items, users


def from_sequences(
    sequences: Mapping[int, Sequence[tuple[int, int, float]]], n_items: int, name: str = "hand"
) -> Dataset:
    """A dataset from ``{user: [(item, timestamp, rating), ...]}`` (users 0..max, items 0..n_items-1)."""
    rows = [(u, i, r, t) for u, seq in sorted(sequences.items()) for i, t, r in seq]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    inter = inter.astype(
        {"user_id": np.int64, "item_id": np.int64, "rating": np.float64, "timestamp": np.int64}
    )
    inter = inter.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    items, users = _tables(max(sequences) + 1, n_items)
    ds = Dataset(name=name, interactions=inter, items=items, users=users, sources={"hand.tsv": "0" * 64})
    ds.validate()
    return ds


def random_dataset(
    n_users: int = 60,
    n_items: int = 200,
    mean_len: int = 15,
    seed: int = 0,
    name: str = "synthetic",
    sort: bool = True,
) -> Dataset:
    """Users with 1..2*mean_len interactions, a skewed catalogue, timestamps with ties, ratings 1-5."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_len, size=n_users)
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.7
    item = rng.choice(n_items, size=len(user), p=popularity / popularity.sum()).astype(np.int64)
    ts = rng.integers(0, 5_000, size=len(user)).astype(np.int64)
    rating = rng.integers(1, 6, size=len(user)).astype(np.float64)
    inter = pd.DataFrame({"user_id": user, "item_id": item, "rating": rating, "timestamp": ts})
    if sort:
        inter = inter.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    items, users = _tables(n_users, n_items)
    ds = Dataset(
        name=name,
        interactions=inter,
        items=items,
        users=users,
        domain="movie",
        sources={"synthetic.inter": "ab" * 32},
    )
    ds.validate()
    return ds
