"""Serving a trained run: :func:`load` -> :class:`Recommender` (in Python), ``recadapt recommend`` (the command
line) and ``recadapt serve`` (HTTP, :mod:`recadapt.serving.http`)."""

from recadapt.serving.catalogue import Recommendation, RequestError
from recadapt.serving.recommender import Query, Recommender, load, load_pipeline

__all__ = ["Query", "Recommendation", "Recommender", "RequestError", "load", "load_pipeline"]
