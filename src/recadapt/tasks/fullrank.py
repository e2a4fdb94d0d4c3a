"""Evaluation of a full-ranking LLM recommender (Laser, DARec): every user's target ranked over the whole
catalogue by the model's user embedding against its item table, seen items excluded, as CRM full ranking does;
under sampled-ranking (parts with a ``candidates`` column) only among the persisted candidates."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from recadapt.data.arrays import list_offsets_values, to_list_array
from recadapt.methods.base import FullRankingModel
from recadapt.progress import progress_bar
from recadapt.tasks.evaluate import RANKING_KS, evaluation_rows
from recadapt.tasks.metrics import Estimate, ranking_report, target_ranks


def history_arrays(histories: Any, max_len: int) -> list[np.ndarray]:
    """Each history's ``max_len`` most recent items (oldest first) as int64 arrays."""
    offsets, values = list_offsets_values(to_list_array(histories))
    values = values.astype(np.int64, copy=False)
    return [values[max(lo, hi - max_len) : hi] for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]


def mask_seen_items(scores: np.ndarray, part: pd.DataFrame) -> np.ndarray:
    """Scores with every history item of a row set to -inf (its target excepted), as CRM full ranking does."""
    offsets, items = list_offsets_values(to_list_array(part["history"]))
    rows = np.repeat(np.arange(len(part)), np.diff(offsets))
    items = items.astype(np.int64)
    keep = items != part["target"].to_numpy()[rows]
    scores[rows[keep], items[keep]] = -np.inf
    return scores


def rank_part(
    model: FullRankingModel,
    part: pd.DataFrame,
    table: Tensor,
    max_len: int,
    batch_size: int,
    n_boot: int,
    *,
    progress: bool = False,
    desc: str = "ranking",
) -> dict[str, Estimate]:
    """HR@K, NDCG@K and MRR of ``part``'s users over the whole catalogue (seen items excluded)."""
    scores = catalogue_scores(model, part, table, max_len, batch_size, progress=progress, desc=desc)
    return ranking_metrics(scores, part, n_boot)


@torch.no_grad()
def catalogue_scores(
    model: FullRankingModel,
    part: pd.DataFrame,
    table: Tensor,
    max_len: int,
    batch_size: int,
    *,
    progress: bool = False,
    desc: str = "ranking",
) -> np.ndarray:
    """Every item's score for each of ``part``'s users, ``[N, n_items]``."""
    model.eval()
    histories = history_arrays(part["history"], max_len)
    scores = []
    for start in progress_bar(range(0, len(part), batch_size), desc=desc, enabled=progress, leave=False):
        users, _ = model.user_embeddings(histories[start : start + batch_size])
        scores.append(model.logits(users, table).float().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros((0, len(table)), dtype=np.float32)


def ranking_metrics(scores: np.ndarray, part: pd.DataFrame, n_boot: int) -> dict[str, Estimate]:
    """Ranking metrics from catalogue scores ``[N, n_items]``: over the catalogue with seen items excluded, or,
    for a sampled-ranking part, among each row's candidates (which never hold a seen item)."""
    users = part["user_id"].to_numpy()
    if "candidates" not in part.columns:
        ranks = target_ranks(mask_seen_items(scores, part), part["target"].to_numpy())
        return ranking_report(ranks, users, ks=RANKING_KS["full-ranking"], n_boot=n_boot)
    candidates = np.stack(part["candidates"].to_numpy()).astype(np.int64)
    target_index = (candidates == part["target"].to_numpy()[:, None]).argmax(axis=1)
    ranks = target_ranks(np.take_along_axis(scores, candidates, axis=1), target_index)
    return ranking_report(ranks, users, ks=RANKING_KS["sampled-ranking"], n_boot=n_boot)


def subset(part: pd.DataFrame, n: int, split_seed: int) -> pd.DataFrame:
    return part.iloc[evaluation_rows(len(part), n, split_seed)].reset_index(drop=True)


def popularity_report(
    train: pd.DataFrame, part: pd.DataFrame, n_items: int, n_boot: int
) -> dict[str, Estimate]:
    """The most-popular reference: every item ranked by its training count (histories and targets), seen items
    excluded (or among the candidates, under sampled-ranking). What any model learns first, so a method below it
    has learned nothing personal."""
    _, items = list_offsets_values(to_list_array(train["history"]))
    counts = np.bincount(np.concatenate([items, train["target"].to_numpy()]), minlength=n_items)
    return ranking_metrics(np.tile(counts.astype(np.float64), (len(part), 1)), part, n_boot)
