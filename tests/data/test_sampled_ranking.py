"""The sampled-ranking protocol: leave-one-out targets among persisted sampled negatives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import from_sequences, random_dataset

from recadapt.data.arrays import to_list_array
from recadapt.data.candidates import draw_candidates
from recadapt.data.prepare import load_prepared, prepare, split_dirname
from recadapt.data.protocols import full_ranking, sampled_ranking
from recadapt.data.splits import PARTS


def _whole_sequences(split) -> dict[int, set[int]]:
    test = split.parts["test"]
    return {
        int(u): {*map(int, h), int(t)}
        for u, h, t in zip(test["user_id"], test["history"], test["target"], strict=True)
    }


def test_samples_are_full_rankings_with_candidates_outside_the_whole_sequence() -> None:
    ds = random_dataset(n_users=80, n_items=120, seed=3)
    split = sampled_ranking(ds, seed=0, n_negatives=9)
    loo = full_ranking(ds)
    seen = _whole_sequences(split)
    for part in PARTS:
        frame, reference = split.parts[part], loo.parts[part]
        assert frame["user_id"].tolist() == reference["user_id"].tolist()
        assert frame["target"].tolist() == reference["target"].tolist()
        assert [h.tolist() for h in frame["history"]] == [h.tolist() for h in reference["history"]]
        for user, target, candidates in zip(
            frame["user_id"], frame["target"], frame["candidates"], strict=True
        ):
            assert len(candidates) == 10 and len(set(candidates.tolist())) == 10
            assert list(candidates).count(target) == 1
            # never an item of the user's sequence, later items (the valid and test targets) included
            assert not (set(candidates.tolist()) - {int(target)}) & seen[int(user)]
    assert split.params == {"seed": 0, "n_negatives": 9, "negatives": "uniform", "min_interactions": 5}


def test_hand_example_excludes_future_items_from_training_candidates() -> None:
    # user 0 sees items 0..4; with 8 items and 3 negatives the training row's candidates must come from 5, 6, 7
    seqs = {0: [(i, i, 1.0) for i in range(5)], 1: [(i, i, 1.0) for i in (7, 6, 5, 4, 3)]}
    split = sampled_ranking(from_sequences(seqs, n_items=8), n_negatives=3)
    train = split.parts["train"]
    assert train["target"].tolist() == [2, 5]
    assert sorted(train["candidates"][0].tolist()) == [2, 5, 6, 7]
    assert sorted(train["candidates"][1].tolist()) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="catalogue too small"):
        sampled_ranking(from_sequences(seqs, n_items=8), n_negatives=4)


def test_deterministic_and_seed_dependent() -> None:
    ds = random_dataset(n_users=50, n_items=300, seed=1)
    a, b, c = (sampled_ranking(ds, seed=s) for s in (0, 0, 1))
    for part in PARTS:
        first, again, other = (np.stack(x.parts[part]["candidates"]) for x in (a, b, c))
        assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_popularity_negatives_follow_the_weights_and_skip_weightless_items() -> None:
    n_rows, n_items = 20_000, 12
    weights = np.array([0, 0, 1, 2, 3, 4, 5, 6, 0, 7, 8, 9], dtype=np.float64)
    history = to_list_array([[2]] * n_rows)  # item 2 excluded, target 0 (weightless but always present)
    targets = np.zeros(n_rows, dtype=np.int64)
    cands = draw_candidates(history, targets, n_items, 2, np.random.default_rng(5), weights=weights)
    negatives = np.where(cands[:, 0] == 0, cands[:, 1], cands[:, 0])
    counts = np.bincount(negatives, minlength=n_items)
    assert counts[[0, 1, 2, 8]].tolist() == [0, 0, 0, 0]
    eligible = np.array([3, 4, 5, 6, 7, 9, 10, 11])
    expected = n_rows * weights[eligible] / weights[eligible].sum()
    chi2 = float(((counts[eligible] - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 7 degrees of freedom: P(chi2 > 30) < 1e-4 when the draw follows the weights
    # successive draws without replacement: distinct per row, never the target or an excluded item
    many = draw_candidates(history, targets, n_items, 8, np.random.default_rng(6), weights=weights)
    assert all(len(set(row)) == 8 for row in many.tolist())
    assert set(np.unique(many).tolist()) <= {0, *eligible.tolist()}
    with pytest.raises(ValueError, match="with a positive weight"):
        draw_candidates(history, targets, n_items, 10, np.random.default_rng(6), weights=weights)


def test_popularity_weights_are_the_training_counts() -> None:
    # every user's last two items (valid and test targets) never count: item 9 is only ever a last item
    seqs = {u: [(i, t, 1.0) for t, i in enumerate((1, 2, 3, 4, 9))] for u in range(3)}
    seqs[3] = [(i, t, 1.0) for t, i in enumerate((5, 6, 7, 8, 0))]
    split = sampled_ranking(from_sequences(seqs, n_items=20), n_negatives=2, negatives="popularity")
    drawn = {int(i) for part in PARTS for row in split.parts[part]["candidates"] for i in row}
    targets = {int(t) for part in PARTS for t in split.parts[part]["target"]}
    assert drawn - targets <= {1, 2, 3, 5, 6, 7}  # items in some valid history, i.e. with a training count


def test_prepared_directory_names_non_default_parameters(tmp_path) -> None:
    ds = random_dataset(n_users=40, n_items=100, seed=2, name="toy")
    assert split_dirname("sampled-ranking", {"n_negatives": 19}) == "sampled-ranking"
    assert split_dirname("sampled-ranking", {"negatives": "popularity", "n_negatives": 49}) == (
        "sampled-ranking__n_negatives-49__negatives-popularity"
    )
    default = prepare(ds, "sampled-ranking", tmp_path)
    popular = prepare(ds, "sampled-ranking", tmp_path, negatives="popularity")
    assert default.name == "sampled-ranking" and popular.name == "sampled-ranking__negatives-popularity"
    loaded = load_prepared(popular)
    assert json.loads((popular / "manifest.json").read_text())["params"]["negatives"] == "popularity"
    assert len(loaded.parts["test"]["candidates"][0]) == 20
