import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recadapt.tasks import metrics as M


def brute_force_auc(labels, scores):
    pos = [s for s, y in zip(scores, labels, strict=False) if y]
    neg = [s for s, y in zip(scores, labels, strict=False) if not y]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    return sum(pairs) / len(pairs)


def test_target_ranks_pessimistic_ties():
    scores = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    ranks = M.target_ranks(scores, np.array([2, 0, 0]))
    assert ranks.tolist() == [1, 2, 0]


def test_ranking_metrics_values():
    ranks = np.array([0, 1, 4, 10])
    assert M.hit_at_k(ranks, 1).tolist() == [1, 0, 0, 0]
    assert M.hit_at_k(ranks, 5).tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(M.ndcg_at_k(ranks, 5), [1.0, 1 / math.log2(3), 1 / math.log2(6), 0.0])
    np.testing.assert_allclose(M.reciprocal_rank(ranks), [1.0, 0.5, 0.2, 1 / 11])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=40).filter(
        lambda rows: 0 < sum(y for y, _ in rows) < len(rows)
    )
)
def test_auc_matches_pairwise_definition(rows):
    labels = np.array([y for y, _ in rows])
    scores = np.array([s for _, s in rows], dtype=float)
    assert M.auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))


def test_auc_single_class_is_nan():
    assert math.isnan(M.auc(np.array([1, 1]), np.array([0.2, 0.3])))


@pytest.mark.parametrize(("label", "which"), [(1, "positive"), (0, "negative")])
def test_auc_of_one_class_is_reported_undefined(label: int, which: str) -> None:
    """A subset with one class has no AUC: NaN with a note that says so, printed and serialized."""
    est = M.ctr_report(np.full(6, label), np.linspace(0.1, 0.9, 6), np.arange(6), n_boot=50)["AUC"]
    assert not est.defined and math.isnan(est.value) and math.isnan(est.low) and math.isnan(est.high)
    assert est.note == f"all 6 labels are {which}: AUC needs both classes"
    assert str(est) == f"undefined (all 6 labels are {which}: AUC needs both classes)"
    assert est.to_dict()["note"] == est.note


def test_auc_interval_counts_one_class_resamples() -> None:
    """With one negative among six users a third of the resamples lack it: the interval says it used fewer."""
    labels, scores = np.array([1, 0, 1, 1, 1, 1]), np.array([0.9, 0.2, 0.6, 0.7, 0.5, 0.4])
    est = M.auc_with_ci(labels, scores, np.arange(6), n_boot=200)
    assert est.defined and est.value == pytest.approx(1.0)
    used, total, undefined = (int(n) for n in re.findall(r"\d+", est.note))
    assert total == 200 and used + undefined == 200 and 30 < undefined < 110, est.note
    assert est.note in str(est)
    well_mixed = M.auc_with_ci(np.arange(40) % 2, np.arange(40.0), np.arange(40), n_boot=100)
    assert well_mixed.note == "" and "note" not in well_mixed.to_dict()


def test_logloss_and_accuracy():
    labels = np.array([1, 0])
    probs = np.array([0.8, 0.4])
    assert M.logloss(labels, probs) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert M.accuracy_per_sample(labels, probs).tolist() == [1.0, 1.0]


def test_mean_with_ci_averages_within_users_first():
    values = np.array([1.0, 1.0, 1.0, 0.0])
    users = np.array([7, 7, 7, 9])
    est = M.mean_with_ci(values, users, n_boot=200)
    assert est.value == pytest.approx(0.5)
    assert 0.0 <= est.low <= est.value <= est.high <= 1.0


def test_ci_narrows_with_more_users_and_covers_truth():
    rng = np.random.default_rng(0)
    small = M.mean_with_ci(rng.random(50) < 0.3, n_boot=500)
    large = M.mean_with_ci(rng.random(5000) < 0.3, n_boot=500)
    assert (large.high - large.low) < (small.high - small.low) / 3
    assert large.low < 0.3 < large.high


def test_bootstrap_is_deterministic_for_a_seed():
    v = np.random.default_rng(1).random(100)
    assert M.mean_with_ci(v, seed=3) == M.mean_with_ci(v, seed=3)


def test_auc_with_ci_brackets_point_estimate():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.5
    scores = labels + rng.normal(0, 1, 400)
    users = rng.integers(0, 40, 400)
    est = M.auc_with_ci(labels, scores, users, n_boot=300)
    assert est.value == pytest.approx(brute_force_auc(labels, scores))
    assert est.low < est.value < est.high
    assert 0.6 < est.value < 0.9


def test_pooled_mean_weights_samples_not_users():
    est = M.pooled_mean_with_ci(np.array([1.0, 1.0, 1.0, 0.0]), np.array([7, 7, 7, 9]), n_boot=100)
    assert est.value == pytest.approx(0.75)


def test_aggregate_seeds():
    agg = M.aggregate_seeds([{"HR@1": 0.2}, {"HR@1": 0.4}])
    assert agg["HR@1"][0] == pytest.approx(0.3)
    assert agg["HR@1"][1] == pytest.approx(np.std([0.2, 0.4], ddof=1))


def test_reports_have_expected_keys():
    rep = M.ranking_report(np.array([0, 3, 30]), np.array([0, 1, 2]), ks=(1, 10), n_boot=50)
    assert set(rep) == {"HR@1", "NDCG@1", "HR@10", "NDCG@10", "MRR"}
    assert rep["HR@10"].value == pytest.approx(2 / 3)
    ctr = M.ctr_report(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.6, 0.7]), np.arange(4), n_boot=50)
    assert ctr["AUC"].value == pytest.approx(0.75)
