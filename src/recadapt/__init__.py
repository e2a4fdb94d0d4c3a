"""recadapt: adapt large language models to recommendation, personalized per user."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from recadapt.serving import Recommender


def load(path: Any, **options: Any) -> Recommender:
    """A trained run (or a retrieve-then-rank pipeline YAML) as a :class:`~recadapt.serving.Recommender`:
    ``recadapt.load("runs/sasrec-ml-100k-next-item-s0").recommend(["50", "172"], k=10)``. Imported lazily so
    ``import recadapt`` stays light; see :func:`recadapt.serving.load` for the options."""
    from recadapt.serving import load as load_recommender

    return load_recommender(path, **options)
