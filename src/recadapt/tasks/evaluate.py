"""Score a conventional recommender on a persisted protocol part and report metrics with CIs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from recadapt.data.arrays import list_offsets_values, to_list_array
from recadapt.data.batching import pad_histories
from recadapt.data.splits import CANDIDATE_PROTOCOLS
from recadapt.tasks.metrics import Estimate, ctr_report, ranking_report, target_ranks

RANKING_KS = {"next-item": (1, 5, 10), "full-ranking": (1, 5, 10, 20, 50), "sampled-ranking": (1, 5, 10, 20)}
_STREAM_EVAL = 13  # the random stream of evaluation subsets (shared by every method)


def evaluation_rows(n: int, n_samples: int, split_seed: int) -> np.ndarray:
    """All ``n`` rows of a part, or a fixed random subset of ``n_samples`` of them: the same rows for every method
    (LLM or CRM) evaluated with the same ``n_samples``, so subset results compare like for like."""
    if n_samples <= 0 or n_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([split_seed, _STREAM_EVAL]).choice(n, n_samples, replace=False))


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _candidate_matrix(part: pd.DataFrame) -> np.ndarray:
    return np.stack(part["candidates"].to_numpy()).astype(np.int64)


def _history_mask_coordinates(histories: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every history item, for excluding seen items in full ranking."""
    offsets, items = list_offsets_values(to_list_array(histories))
    rows = np.repeat(np.arange(len(histories)), np.diff(offsets))
    return rows, items.astype(np.int64)


@torch.no_grad()
def crm_scores(
    model: torch.nn.Module,
    part: pd.DataFrame,
    protocol: str,
    n_items: int,
    max_len: int,
    batch_size: int = 512,
) -> np.ndarray:
    """Model outputs per protocol: candidate logits [N, C] (next-item, sampled-ranking), catalogue logits with
    seen items set to -inf [N, n_items] (full-ranking), or click probabilities [N] (ctr)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # where the model lives
    history = torch.from_numpy(pad_histories(part["history"], max_len, n_items))
    target = torch.from_numpy(part["target"].to_numpy(np.int64, copy=True))
    user_id = torch.from_numpy(part["user_id"].to_numpy(np.int64, copy=True))
    outputs = []
    if protocol in CANDIDATE_PROTOCOLS:
        candidates = torch.from_numpy(_candidate_matrix(part))
    if protocol == "full-ranking":
        rows, items = _history_mask_coordinates(part["history"])
        row_starts = np.searchsorted(rows, np.arange(len(part) + 1))
    for sl in _batches(len(part), batch_size):
        batch = {"history": history[sl], "target": target[sl], "user_id": user_id[sl]}
        batch = {k: v.to(device) for k, v in batch.items()}
        if protocol in CANDIDATE_PROTOCOLS:
            outputs.append(model.score_candidates(batch, candidates[sl].to(device)).float().cpu().numpy())
        elif protocol == "ctr":
            logits = model.score_candidates(batch, batch["target"][:, None])[:, 0]
            outputs.append(torch.sigmoid(logits).float().cpu().numpy())
        else:
            scores = model.score_all(batch).float().cpu().contiguous().numpy()  # written in place below
            lo, hi = row_starts[sl.start], row_starts[sl.stop]
            seen_rows, seen_items = rows[lo:hi] - sl.start, items[lo:hi]
            keep = seen_items != target.numpy()[sl][seen_rows]  # never hide the target itself
            scores[seen_rows[keep], seen_items[keep]] = -np.inf
            outputs.append(scores)
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def report_from_scores(
    scores: np.ndarray, part: pd.DataFrame, protocol: str, n_boot: int = 1000, seed: int = 0
) -> dict[str, Estimate]:
    """Metrics with bootstrap CIs over users for protocol outputs produced by :func:`crm_scores`."""
    users = part["user_id"].to_numpy()
    if protocol == "ctr":
        return ctr_report(part["label"].to_numpy(), scores, users, n_boot=n_boot, seed=seed)
    if protocol in CANDIDATE_PROTOCOLS:
        target_index = (_candidate_matrix(part) == part["target"].to_numpy()[:, None]).argmax(axis=1)
    else:
        target_index = part["target"].to_numpy()
    ranks = target_ranks(scores, target_index)
    report = ranking_report(ranks, users, ks=RANKING_KS[protocol], n_boot=n_boot, seed=seed)
    if protocol in CANDIDATE_PROTOCOLS:
        report["ValidRatio"] = Estimate(1.0, 1.0, 1.0)  # a scorer always names exactly one candidate
    return report


def evaluate_crm(
    model: torch.nn.Module,
    part: pd.DataFrame,
    protocol: str,
    n_items: int,
    max_len: int,
    batch_size: int = 512,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Estimate]:
    scores = crm_scores(model, part, protocol, n_items, max_len, batch_size)
    return report_from_scores(scores, part, protocol, n_boot=n_boot, seed=seed)


def monitor_metric(protocol: str, requested: str = "auto") -> str:
    """The validation metric used for early stopping."""
    if requested != "auto":
        return requested
    return "AUC" if protocol == "ctr" else "NDCG@10"
