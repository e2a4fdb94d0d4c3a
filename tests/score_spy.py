"""A spy on the LLM evaluation's raw scores, for tests that compare another path with it. Imported as
``score_spy`` (``tests/`` is on sys.path)."""

from __future__ import annotations

from typing import Any

import numpy as np


def record_raw_scores(monkeypatch) -> list[np.ndarray]:
    """A list that collects every raw score evaluation computes: candidate scores (next-item), p(Yes) (ctr)."""
    import recadapt.llm.ranking as ranking

    recorded: list[np.ndarray] = []
    rank, yes = ranking.rank_candidates, ranking.yes_probability

    def rank_spy(*args: Any, **kwargs: Any) -> Any:
        result = rank(*args, **kwargs)
        recorded.append(result.scores.copy())
        return result

    def yes_spy(*args: Any, **kwargs: Any) -> Any:
        result = yes(*args, **kwargs)
        recorded.append(result.numpy().copy())
        return result

    monkeypatch.setattr(ranking, "rank_candidates", rank_spy)
    monkeypatch.setattr(ranking, "yes_probability", yes_spy)
    return recorded
