"""Full-ranking evaluation helpers: the most-popular reference row."""

from __future__ import annotations

import pandas as pd
import pytest

from recadapt.tasks.fullrank import popularity_report


def test_popularity_ranks_by_training_counts_with_seen_items_excluded() -> None:
    # training counts (histories and targets): item 0: 0, item 1: 4, item 2: 3, item 3: 2
    train = pd.DataFrame({"history": [[1, 1, 1, 1], [2, 2, 2]], "target": [3, 3], "user_id": [0, 1]})
    # user 0 has seen item 1, so item 3 comes second (after 2); user 1 has seen 2, so item 1 is first
    test = pd.DataFrame({"history": [[1], [2]], "target": [3, 1], "user_id": [0, 1]})
    report = popularity_report(train, test, n_items=4, n_boot=10)
    assert report["HR@1"].value == pytest.approx(0.5)
    assert report["MRR"].value == pytest.approx((1 / 2 + 1) / 2)
