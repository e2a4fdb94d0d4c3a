"""The k-core filter and dataset statistics."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import from_sequences, random_dataset

from recadapt.data.filters import dataset_stats, format_stats, kcore


def test_kcore_repeats_until_stable_and_makes_ids_dense() -> None:
    # k=2: item 3 has one interaction; dropping it leaves user 2 with one, which drops item 4's second use
    seqs = {
        0: [(0, 1, 5.0), (1, 2, 4.0), (2, 3, 3.0)],
        1: [(0, 1, 5.0), (1, 2, 4.0), (2, 3, 3.0), (4, 4, 1.0)],
        2: [(3, 1, 2.0), (4, 2, 2.0)],
    }
    ds = from_sequences(seqs, n_items=6)
    core = kcore(ds, 2)
    assert core.n_users == 2 and core.n_items == 3
    assert core.items["raw_id"].tolist() == ds.items["raw_id"].iloc[[0, 1, 2]].tolist()
    inter = core.interactions
    assert inter["user_id"].tolist() == [0, 0, 0, 1, 1, 1] and inter["item_id"].tolist() == [0, 1, 2] * 2
    assert kcore(ds, 1) is ds


def test_kcore_holds_on_random_data() -> None:
    ds = random_dataset(n_users=300, n_items=400, mean_len=12, seed=4)
    core = kcore(ds, 5)
    per_user = np.bincount(core.interactions["user_id"], minlength=core.n_users)
    per_item = np.bincount(core.interactions["item_id"], minlength=core.n_items)
    assert per_user.min() >= 5 and per_item.min() >= 5
    assert 0 < len(core.interactions) < len(ds.interactions)
    # nothing that meets k was dropped: the k-core is the largest such subgraph, so filtering it again is a no-op
    again = kcore(core, 5)
    assert len(again.interactions) == len(core.interactions)


def test_kcore_refuses_a_published_split() -> None:
    ds = random_dataset(seed=1)
    ds.presplit = {"next-item": {"test": ds.interactions.head(0)}}
    with pytest.raises(ValueError, match="published split"):
        kcore(ds, 5)


def test_stats_hand_example() -> None:
    seqs = {0: [(0, 1, 5.0), (1, 2, 4.0)], 1: [(0, 3, 1.0)], 2: [(2, 4, 2.0), (0, 5, 3.0), (1, 6, 3.0)]}
    stats = dataset_stats(from_sequences(seqs, n_items=4))  # item 3 never used: not counted
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 3, 6)
    assert stats["density"] == pytest.approx(6 / 9)
    assert (
        stats["per_user"]["min"] == 1 and stats["per_user"]["max"] == 3 and stats["per_user"]["median"] == 2
    )
    assert stats["per_item"]["mean"] == pytest.approx(2.0) and stats["time_span"] == [1, 6]
    text = format_stats(stats)
    assert "interactions  6" in text and "66.6667%" in text and "an order, not times" in text
