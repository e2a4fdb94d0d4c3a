import numpy as np
import pandas as pd
import pytest
import torch

from recadapt.tasks.evaluate import crm_scores, report_from_scores


class FixedScores(torch.nn.Module):
    """Scores item i with i (so the highest id ranks first), whatever the history."""

    def __init__(self, n_items: int) -> None:
        super().__init__()
        self.n_items = n_items

    def score_all(self, batch):
        return torch.arange(self.n_items, dtype=torch.float32).expand(len(batch["history"]), -1)

    def score_candidates(self, batch, candidates):
        return candidates.float()


def test_full_ranking_hides_seen_items_but_never_the_target():
    part = pd.DataFrame(
        {"user_id": [0, 1], "history": [np.array([9, 8]), np.array([9, 5])], "target": [7, 5]}
    )
    scores = crm_scores(FixedScores(10), part, "full-ranking", n_items=10, max_len=4)
    assert np.isneginf(scores[0, [8, 9]]).all() and scores[0, 7] == 7
    assert np.isneginf(scores[1, 9]) and scores[1, 5] == 5  # item 5 is both seen and the target
    report = report_from_scores(scores, part, "full-ranking", n_boot=10)
    assert report["HR@1"].value == pytest.approx(0.5)  # user 0: target 7 is now first; user 1: 8, 7, 6 beat 5
    assert report["MRR"].value == pytest.approx((1 + 1 / 4) / 2)


def test_next_item_ranks_within_candidates():
    part = pd.DataFrame(
        {
            "user_id": [0, 1],
            "history": [np.array([1]), np.array([2])],
            "target": [30, 3],
            "candidates": [np.array([3, 30, 4]), np.array([3, 30, 4])],
        }
    )
    scores = crm_scores(FixedScores(40), part, "next-item", n_items=40, max_len=4)
    report = report_from_scores(scores, part, "next-item", n_boot=10)
    assert report["HR@1"].value == pytest.approx(0.5)
    assert report["ValidRatio"].value == 1.0


def test_ctr_probabilities_are_sigmoid_of_target_logit():
    part = pd.DataFrame(
        {"user_id": [0, 1], "history": [np.array([1]), np.array([2])], "target": [0, 2], "label": [0, 1]}
    )
    probs = crm_scores(FixedScores(3), part, "ctr", n_items=3, max_len=2)
    np.testing.assert_allclose(probs, torch.sigmoid(torch.tensor([0.0, 2.0])).numpy())
    assert report_from_scores(probs, part, "ctr", n_boot=10)["AUC"].value == 1.0


def test_evaluation_rows_are_a_fixed_sorted_subset_or_everything():
    from recadapt.tasks.evaluate import evaluation_rows

    np.testing.assert_array_equal(evaluation_rows(10, 0, 0), np.arange(10))
    np.testing.assert_array_equal(evaluation_rows(10, 50, 0), np.arange(10))
    rows = evaluation_rows(1000, 100, 0)
    assert len(set(rows.tolist())) == 100 and (np.diff(rows) > 0).all() and rows.max() < 1000
    np.testing.assert_array_equal(rows, evaluation_rows(1000, 100, 0))
    assert not np.array_equal(rows, evaluation_rows(1000, 100, 1))  # another split seed, another subset
