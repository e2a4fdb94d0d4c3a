"""Protocol splits: hand-computed examples, invariants on random data, determinism, published splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from synthetic import from_sequences, random_dataset

from recadapt.data.arrays import to_list_array
from recadapt.data.candidates import draw_candidates
from recadapt.data.protocols import ctr, few_shot, full_ranking, next_item
from recadapt.data.schema import Dataset
from recadapt.data.splits import PARTS, _split_sizes


def _lists(column: pd.Series) -> list[list]:
    return [list(x) for x in column]


def _assert_parts_equal(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for part in PARTS:
        assert list(a[part].columns) == list(b[part].columns)
        for col in a[part].columns:
            left, right = a[part][col], b[part][col]
            if left.dtype == object:
                assert _lists(left) == _lists(right), (part, col)
            else:
                np.testing.assert_array_equal(left.to_numpy(), right.to_numpy())


# ------------------------------------------------------------------------------------------------------------
# next-item
# ------------------------------------------------------------------------------------------------------------


def test_split_sizes_match_published_llara_counts() -> None:
    assert _split_sizes(943, (0.8, 0.1, 0.1)) == (754, 94, 95)  # ML-100K
    assert _split_sizes(1220, (0.8, 0.1, 0.1)) == (976, 122, 122)  # LastFM
    assert _split_sizes(10, (0.7, 0.2, 0.1)) == (7, 2, 1)


def test_next_item_training_prefixes_hand_example() -> None:
    # user 0: 6 items -> samples at positions 3, 4, 5; user 1: 14 items -> 3..13; user 2: 3 items -> none.
    seqs = {
        0: [(10 + k, k, 4.0) for k in range(6)],
        1: [(20 + k, 100 + k, 4.0) for k in range(14)],
        2: [(40 + k, k, 4.0) for k in range(3)],
    }
    ds = from_sequences(seqs, n_items=60)
    split = next_item(ds, ratios=(1.0, 0.0, 0.0))
    train = split.parts["train"]
    assert len(split.parts["valid"]) == len(split.parts["test"]) == 0
    assert train["user_id"].tolist() == [0] * 3 + [1] * 11
    assert train["target"].tolist() == [13, 14, 15, *range(23, 34)]
    assert _lists(train["history"])[:3] == [[10, 11, 12], [10, 11, 12, 13], [10, 11, 12, 13, 14]]
    assert _lists(train["history"])[3] == [20, 21, 22]
    assert _lists(train["history"])[-1] == list(range(23, 33))  # the 10 items before the last
    assert max(len(h) for h in train["history"]) == 10
    assert split.stats == {"presplit": False, "users": {"train": 3, "valid": 0, "test": 0}}


def test_next_item_evaluation_users_give_their_last_item() -> None:
    seqs = {0: [(k, k, 1.0) for k in range(4)], 1: [(k, k, 1.0) for k in range(3)]}
    seqs |= {2: [(k, k, 1.0) for k in range(15)]}
    ds = from_sequences(seqs, n_items=40)
    test = next_item(ds, ratios=(0.0, 0.0, 1.0)).parts["test"]
    # user 1 has only 2 history items before its last one: skipped.
    assert test["user_id"].tolist() == [0, 2]
    assert test["target"].tolist() == [3, 14]
    assert _lists(test["history"]) == [[0, 1, 2], list(range(4, 14))]


def test_next_item_users_are_disjoint_and_split_by_ratio() -> None:
    ds = random_dataset(n_users=200, mean_len=8, seed=3)
    split = next_item(ds, seed=5)
    users = {p: set(split.parts[p]["user_id"]) for p in PARTS}
    assert not users["train"] & users["valid"] and not users["train"] & users["test"]
    assert not users["valid"] & users["test"]
    assert split.stats["users"] == {"train": 160, "valid": 20, "test": 20}
    for part in ("valid", "test"):
        assert split.parts[part]["user_id"].is_unique
    lengths = np.array([len(h) for p in PARTS for h in split.parts[p]["history"]])
    assert lengths.min() >= 3 and lengths.max() <= 10


def test_next_item_is_deterministic_and_seed_dependent() -> None:
    ds = random_dataset(seed=1)
    a, b, c = next_item(ds, seed=7), next_item(ds, seed=7), next_item(ds, seed=8)
    _assert_parts_equal(a.parts, b.parts)
    assert (
        a.params
        == b.params
        == {
            "seed": 7,
            "history_len": 10,
            "min_history": 3,
            "n_candidates": 20,
            "ratios": [0.8, 0.1, 0.1],
        }
    )
    assert set(a.parts["test"]["user_id"]) != set(c.parts["test"]["user_id"])


def _check_candidates(frame: pd.DataFrame, n_items: int, n_candidates: int = 20) -> None:
    for history, target, cands in zip(frame["history"], frame["target"], frame["candidates"], strict=True):
        cands = np.asarray(cands)
        assert len(cands) == n_candidates
        assert len(set(cands.tolist())) == n_candidates
        assert (cands == target).sum() == 1
        assert cands.min() >= 0 and cands.max() < n_items
        negatives = set(cands.tolist()) - {int(target)}
        assert not negatives & set(np.asarray(history).tolist())


def test_next_item_candidate_invariants() -> None:
    ds = random_dataset(n_users=80, n_items=150, seed=2)
    split = next_item(ds, seed=0)
    for part in PARTS:
        _check_candidates(split.parts[part], ds.n_items)
    # The target's slot is shuffled, not always first.
    train = split.parts["train"]
    slots = [list(c).index(t) for c, t in zip(train["candidates"], train["target"], strict=True)]
    assert len(set(slots)) > 10


def test_candidates_on_a_tiny_catalogue_use_every_eligible_item() -> None:
    # 30 items, 10 distinct history items + target: exactly 19 eligible negatives, all of which must be used.
    histories = [list(range(k, k + 10)) for k in range(20)]
    targets = np.array([(k + 15) % 30 for k in range(20)])
    cands = draw_candidates(histories, targets, 30, 20, np.random.default_rng(0))
    for history, target, row in zip(histories, targets, cands, strict=True):
        assert sorted(row.tolist()) == sorted(set(range(30)) - set(history) | {int(target)})


def test_candidates_error_when_catalogue_too_small() -> None:
    with pytest.raises(ValueError, match="catalogue too small"):
        draw_candidates([list(range(10))], np.array([10]), 29, 20, np.random.default_rng(0))
    ds = from_sequences({0: [(k, k, 1.0) for k in range(12)]}, n_items=15)
    with pytest.raises(ValueError, match="catalogue too small"):
        next_item(ds, ratios=(1.0, 0.0, 0.0))


def test_candidates_reject_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="history item ids"):
        draw_candidates([[1, 99]], np.array([0]), 50, 5, np.random.default_rng(0))


@pytest.mark.parametrize("n_candidates", [5, 30])  # 5: rejection sampling; 30: exact (dense) sampling
def test_negatives_are_uniform_over_eligible_items(n_candidates: int) -> None:
    n_rows, n_items = 6000, 50
    history = to_list_array([[1, 2]] * n_rows)
    targets = np.zeros(n_rows, dtype=np.int64)
    cands = draw_candidates(history, targets, n_items, n_candidates, np.random.default_rng(11))
    counts = np.bincount(cands.ravel(), minlength=n_items)
    assert counts[0] == n_rows and counts[1] == counts[2] == 0
    expected = n_rows * (n_candidates - 1) / 47
    chi2 = float((((counts[3:] - expected) ** 2) / expected).sum())
    assert chi2 < 100  # 46 degrees of freedom: P(chi2 > 100) < 1e-5 under uniformity
    # The target lands in every slot about equally often.
    slots = np.bincount(np.argmax(cands == 0, axis=1), minlength=n_candidates) / n_rows
    assert np.abs(slots * n_candidates - 1).max() < 0.25


def test_next_item_uses_a_published_split() -> None:
    ds = random_dataset(n_users=10, n_items=40, seed=4)
    test = pd.DataFrame(
        {
            "user_id": [0, 1, 2],
            "history": [list(range(12)), [5, 6], [7, 8, 9]],
            "target": [30, 31, 32],
            "next_rating": [4.0, 5.0, 3.0],
        }
    )
    ds.presplit = {"next-item": {"test": test}}
    split = next_item(ds, seed=3)
    assert split.stats["presplit"] is True
    assert len(split.parts["train"]) == len(split.parts["valid"]) == 0
    out = split.parts["test"]
    assert out["user_id"].tolist() == [0, 2]  # the row with 2 history items is skipped
    assert _lists(out["history"]) == [list(range(2, 12)), [7, 8, 9]]
    assert out["next_rating"].tolist() == [4.0, 3.0]
    assert list(out.columns[:4]) == ["user_id", "history", "target", "candidates"]
    _check_candidates(out, ds.n_items)


def test_protocols_reject_bad_ratios() -> None:
    ds = random_dataset()
    with pytest.raises(ValueError, match="ratios"):
        next_item(ds, ratios=(0.8, 0.1))
    with pytest.raises(ValueError, match="ratios"):
        ctr(ds, ratios=(0.5, 0.1, 0.1))


# ------------------------------------------------------------------------------------------------------------
# ctr
# ------------------------------------------------------------------------------------------------------------


def test_ctr_hand_example() -> None:
    seqs = {
        0: [(1, 10, 5.0), (2, 30, 2.0), (3, 50, 4.0)],
        1: [(4, 20, 3.0), (5, 40, 4.0)],
    }
    ds = from_sequences(seqs, n_items=10)
    split = ctr(ds, ratios=(0.6, 0.2, 0.2))
    train, valid, test = (split.parts[p] for p in PARTS)
    assert train["target"].tolist() == [1, 4, 2] and valid["target"].tolist() == [5]
    assert test["target"].tolist() == [3]
    assert train["label"].tolist() == [1, 0, 0] and train["label"].dtype == np.int8
    assert _lists(train["history"]) == [[], [], [1]]
    assert _lists(test["history"]) == [[1, 2]] and _lists(test["history_ratings"]) == [[5.0, 2.0]]
    assert _lists(valid["history"]) == [[4]]
    assert sorted(train["shot_rank"]) == [0, 1, 2]


def test_ctr_history_holds_exactly_the_earlier_interactions() -> None:
    ds = random_dataset(n_users=30, mean_len=10, seed=5)
    split = ctr(ds, seed=2)
    frames = [split.parts[p].assign(part=p) for p in PARTS]
    samples = pd.concat(frames, ignore_index=True)
    n = len(ds.interactions)
    assert [len(split.parts[p]) for p in PARTS] == list(_split_sizes(n, (0.8, 0.1, 0.1)))
    # Global time order across parts.
    keys = list(zip(samples["timestamp"], samples["user_id"], samples["target"], strict=True))
    assert keys == sorted(keys)
    seen: dict[int, list[tuple[int, float]]] = {}
    for row in samples.itertuples():
        earlier = seen.setdefault(row.user_id, [])
        assert list(row.history) == [i for i, _ in earlier]
        assert list(row.history_ratings) == [r for _, r in earlier]
        assert row.label == int(row.rating > 3)
        earlier.append((row.target, row.rating))


def test_ctr_max_history_keeps_the_most_recent() -> None:
    ds = random_dataset(n_users=20, seed=6)
    full, capped = ctr(ds), ctr(ds, max_history=4)
    for part in PARTS:
        for a, b in zip(full.parts[part]["history"], capped.parts[part]["history"], strict=True):
            assert list(b) == list(a)[-4:]


def test_ctr_shot_rank_and_nested_few_shot_sets() -> None:
    ds = random_dataset(seed=7)
    train = ctr(ds, seed=4).parts["train"]
    assert sorted(train["shot_rank"]) == list(range(len(train)))
    assert train["shot_rank"].tolist() != sorted(train["shot_rank"])
    small, large = few_shot(train, 16), few_shot(train, 64)
    assert small["shot_rank"].tolist() == list(range(16))
    pd.testing.assert_frame_equal(large.iloc[:16].reset_index(drop=True), small)
    assert ctr(ds, seed=4).parts["train"]["shot_rank"].tolist() == train["shot_rank"].tolist()
    assert ctr(ds, seed=5).parts["train"]["shot_rank"].tolist() != train["shot_rank"].tolist()
    with pytest.raises(ValueError, match="cannot take"):
        few_shot(train, len(train) + 1)


def test_ctr_needs_ratings() -> None:
    ds = random_dataset(seed=8)
    ds.interactions.loc[3, "rating"] = np.nan
    with pytest.raises(ValueError, match="need ratings"):
        ctr(ds)


def test_ctr_uses_a_published_split() -> None:
    ds = random_dataset(n_users=10, n_items=40, seed=9)
    frame = pd.DataFrame(
        {
            "user_id": [0, 1],
            "target": [3, 4],
            "label": [1, 0],
            "timestamp": [5, 6],
            "history": [[1, 2, 3], []],
            "title": ["Item 3", "Item 4"],
        }
    )
    ds.presplit = {"ctr": {"train": frame, "valid": frame, "test": frame}}
    split = ctr(ds, seed=1, max_history=2)
    train = split.parts["train"]
    assert split.stats["presplit"] is True
    assert _lists(train["history"]) == [[2, 3], []]
    assert np.isnan(train["rating"]).all() and np.isnan(train["history_ratings"][0]).all()
    assert sorted(train["shot_rank"]) == [0, 1] and "shot_rank" not in split.parts["test"]
    assert train["title"].tolist() == ["Item 3", "Item 4"]


# ------------------------------------------------------------------------------------------------------------
# full ranking
# ------------------------------------------------------------------------------------------------------------


def test_full_ranking_leave_one_out_hand_example() -> None:
    seqs = {
        0: [
            (5, 3, 1.0),
            (1, 1, 1.0),
            (2, 2, 1.0),
            (7, 5, 1.0),
            (4, 4, 1.0),
            (9, 6, 1.0),
        ],  # time order 1 2 5 4 7 9
        1: [(1, 1, 1.0), (2, 2, 1.0), (3, 3, 1.0), (4, 4, 1.0)],  # 4 < 5 interactions: dropped
        2: [(0, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (3, 4, 1.0), (4, 5, 1.0)],
    }
    split = full_ranking(from_sequences(seqs, n_items=10))
    test, valid, train = (split.parts[p] for p in ("test", "valid", "train"))
    assert test["user_id"].tolist() == valid["user_id"].tolist() == train["user_id"].tolist() == [0, 2]
    assert _lists(test["history"]) == [[1, 2, 5, 4, 7], [0, 1, 2, 3]] and test["target"].tolist() == [9, 4]
    assert _lists(valid["history"]) == [[1, 2, 5, 4], [0, 1, 2]] and valid["target"].tolist() == [7, 3]
    assert _lists(train["history"]) == [[1, 2, 5], [0, 1]] and train["target"].tolist() == [4, 2]
    assert split.stats == {"presplit": False, "users": 2, "users_dropped": 1}
    assert split.params == {"min_interactions": 5}


def test_full_ranking_matches_a_reference_and_ignores_row_order() -> None:
    ds = random_dataset(n_users=50, seed=10)
    inter = ds.interactions.copy()
    inter["timestamp"] = np.random.default_rng(0).permutation(len(inter))  # unique times: order is total
    ds.interactions = inter.sort_values(["user_id", "timestamp"]).reset_index(drop=True)
    split = full_ranking(ds, min_interactions=6)
    shuffled = Dataset(ds.name, inter.sample(frac=1.0, random_state=1), ds.items, ds.users)
    _assert_parts_equal(split.parts, full_ranking(shuffled, min_interactions=6).parts)
    expected = {p: [] for p in PARTS}
    for user, group in ds.interactions.groupby("user_id"):
        seq = group.sort_values("timestamp")["item_id"].tolist()
        if len(seq) < 6:
            continue
        for drop, part in ((3, "train"), (2, "valid"), (1, "test")):
            expected[part].append((user, seq[:-drop], seq[-drop]))
    for part in PARTS:
        got = split.parts[part]
        assert list(zip(got["user_id"], _lists(got["history"]), got["target"], strict=True)) == expected[part]


def test_full_ranking_uses_a_published_split_and_checks_arguments() -> None:
    ds = random_dataset(seed=11)
    test = pd.DataFrame({"user_id": [1], "history": [[1, 2]], "target": [3]})
    ds.presplit = {"full-ranking": {"test": test}}
    split = full_ranking(ds)
    assert split.stats == {"presplit": True}
    assert _lists(split.parts["test"]["history"]) == [[1, 2]] and len(split.parts["train"]) == 0
    with pytest.raises(ValueError, match="min_interactions"):
        full_ranking(ds, min_interactions=2)
    ds.presplit = {"full-ranking": {"train": test}}
    with pytest.raises(ValueError, match="'test' part"):
        full_ranking(ds)


def test_to_list_array_accepts_common_inputs() -> None:
    expected = [[1, 2], [], [3]]
    inputs = [
        pd.Series([np.array([1, 2]), np.array([], dtype=np.int64), np.array([3])]),
        expected,
        pa.chunked_array([pa.array([[1, 2]]), pa.array([[], [3]])]),
        pa.array([[0], [1, 2], [], [3]]).slice(1),
        pd.Series(pa.array(expected), dtype=pd.ArrowDtype(pa.list_(pa.int64()))),
        pd.Series(pa.chunked_array([[[1, 2]], [[], [3]]]), dtype=pd.ArrowDtype(pa.list_(pa.int64()))),
        np.array([[1, 2], [], [3]], dtype=object),
    ]
    for value in inputs:
        assert to_list_array(value).to_pylist() == expected
    assert to_list_array(np.array([[1, 2], [3, 4]])).to_pylist() == [[1, 2], [3, 4]]
    assert to_list_array([[1.5]], pa.float64()).type == pa.list_(pa.float64())
    with pytest.raises(ValueError, match="null"):
        to_list_array([[1], None])
    with pytest.raises(TypeError, match="list column"):
        to_list_array(pa.array([1, 2]))


def test_ctr_refuses_huge_uncapped_histories(monkeypatch: pytest.MonkeyPatch) -> None:
    from recadapt.data import protocols

    ds = random_dataset(seed=12)
    monkeypatch.setattr(protocols, "_MAX_CTR_HISTORY_VALUES", len(ds.interactions))  # max_history=1 fits
    with pytest.raises(ValueError, match="set max_history"):
        ctr(ds)
    assert len(ctr(ds, max_history=1).parts["train"])
