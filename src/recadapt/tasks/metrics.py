"""Ranking and CTR metrics with bootstrap confidence intervals over test users.

Per-sample metric values are first averaged within each user, then users are resampled with replacement
(``n_boot`` times) to get a percentile 95% interval, so a user with many test samples does not count as many
independent draws. AUC and LogLoss are recomputed on each resample with the users' multiplicities as weights.

AUC is undefined when the evaluated labels hold one class only (a small or filtered subset): it is then NaN
with a ``note`` saying why, never a number such as 0.5, and a resample holding one class is left out of the
interval, with a note saying how many were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_BOOTSTRAP = 1000


@dataclass(frozen=True)
class Estimate:
    """A metric value with its bootstrap 95% confidence interval.

    ``note`` explains an undefined value (NaN) or an interval from fewer resamples than asked; it is printed
    and serialized with the numbers, so a report cannot show them without it.
    """

    value: float
    low: float
    high: float
    note: str = ""

    @property
    def defined(self) -> bool:
        return not math.isnan(self.value)

    def __str__(self) -> str:
        text = f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]" if self.defined else "undefined"
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict[str, float | str]:
        """``value``, ``low``, ``high`` (NaN when undefined), plus ``note`` when there is one."""
        out: dict[str, float | str] = asdict(self)
        if not self.note:
            del out["note"]
        return out


# ---------------------------------------------------------------------------------------------------------------
# per-sample ranking metrics


def target_ranks(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """0-based rank of the target among each row's scores; ties count against the target.

    Pessimistic ties matter: an untrained model that scores every candidate equally must get HitRatio 0, not 1.
    NaN scores rank last.
    """
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    target_index = np.asarray(target_index, dtype=np.int64)
    target_score = scores[np.arange(len(scores)), target_index][:, None]
    at_least = (scores >= target_score).sum(axis=1)
    return (at_least - 1).astype(np.int64)


def hit_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """1.0 where the target is in the top k. With one relevant item HitRatio@K equals Recall@K."""
    return (np.asarray(ranks) < k).astype(np.float64)


recall_at_k = hit_at_k


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """1 / log2(rank + 2) inside the top k, else 0 (one relevant item, so the ideal DCG is 1)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def reciprocal_rank(ranks: np.ndarray) -> np.ndarray:
    return 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)


# ---------------------------------------------------------------------------------------------------------------
# CTR metrics (weighted, so the bootstrap can reuse them)


def _weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of ``weights`` ([n_weightings, N]); ties in score count one half (Mann-Whitney)."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    pos = labels[order].astype(bool)
    weights = np.atleast_2d(weights)[:, order]
    # group tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_pos = np.add.reduceat(np.where(pos, weights, 0.0), starts, axis=1)
    w_neg = np.add.reduceat(np.where(pos, 0.0, weights), starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    total_pos, total_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    concordant = (w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((total_pos > 0) & (total_neg > 0), concordant / (total_pos * total_neg), np.nan)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    return float(_weighted_auc(labels, scores, np.ones((1, len(labels))))[0])


def _clipped(probs: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    return np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)


def logloss_per_sample(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    p = _clipped(probs)
    y = np.asarray(labels, dtype=np.float64)
    return -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(logloss_per_sample(labels, probs).mean())


def accuracy_per_sample(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return ((np.asarray(probs) >= threshold) == np.asarray(labels).astype(bool)).astype(np.float64)


def valid_ratio(valid: np.ndarray) -> float:
    """Share of LLM outputs that name exactly one candidate (the papers' ValidRatio)."""
    return float(np.asarray(valid, dtype=np.float64).mean())


# ---------------------------------------------------------------------------------------------------------------
# bootstrap over users


def _user_resample_counts(groups: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (per-sample user index, [n_boot, n_users] multiplicities of each user in each resample)."""
    _, user_index = np.unique(groups, return_inverse=True)
    n_users = int(user_index.max()) + 1 if len(user_index) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_users, size=(n_boot, n_users))
    counts = np.zeros((n_boot, n_users), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_users), draws.ravel()), 1.0)
    return user_index, counts


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mean_with_ci(
    values: np.ndarray, groups: np.ndarray | None = None, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> Estimate:
    """Mean over users of the per-user mean of ``values``, with a bootstrap 95% CI over users.

    ``groups`` holds each sample's user id; ``None`` treats every sample as its own user.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return Estimate(math.nan, math.nan, math.nan)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    user_index, counts = _user_resample_counts(groups, n_boot, seed)
    n_users = counts.shape[1]
    per_user = np.bincount(user_index, weights=values, minlength=n_users) / np.bincount(
        user_index, minlength=n_users
    )
    boot = counts @ per_user / counts.sum(axis=1)
    return Estimate(float(per_user.mean()), *_percentile_interval(boot))


def _one_class_note(labels: np.ndarray) -> str:
    which = "positive" if np.asarray(labels).astype(bool).all() else "negative"
    return f"all {len(labels)} labels are {which}: AUC needs both classes"


def auc_with_ci(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> Estimate:
    """Pooled AUC over all samples, with a bootstrap CI from resampling users (weights = multiplicities).

    Undefined (NaN, with a note) when the labels hold one class; resamples holding one class are left out of
    the interval and counted in the note.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    value = auc(labels, scores)
    if math.isnan(value):
        return Estimate(
            math.nan, math.nan, math.nan, _one_class_note(labels) if len(labels) else "no samples"
        )
    user_index, counts = _user_resample_counts(np.asarray(groups), n_boot, seed)
    chunks = [
        _weighted_auc(labels, scores, counts[i : i + 100][:, user_index]) for i in range(0, n_boot, 100)
    ]
    boot = np.concatenate(chunks) if chunks else np.zeros(0)
    undefined = int(np.isnan(boot).sum())
    note = (
        f"CI from {len(boot) - undefined} of {len(boot)} resamples; {undefined} held one class"
        if undefined
        else ""
    )
    return Estimate(value, *_percentile_interval(boot), note)


def pooled_mean_with_ci(
    values: np.ndarray, groups: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> Estimate:
    """Mean over all samples (as LogLoss and accuracy are reported), with a CI from resampling users."""
    values = np.asarray(values, dtype=np.float64)
    user_index, counts = _user_resample_counts(np.asarray(groups), n_boot, seed)
    n_users = counts.shape[1]
    sums = np.bincount(user_index, weights=values, minlength=n_users)
    sizes = np.bincount(user_index, minlength=n_users).astype(np.float64)
    boot = (counts @ sums) / (counts @ sizes)
    return Estimate(float(values.mean()), *_percentile_interval(boot))


# ---------------------------------------------------------------------------------------------------------------
# metric bundles per protocol


def ranking_report(
    ranks: np.ndarray,
    users: np.ndarray,
    ks: Sequence[int] = (1, 5, 10, 20),
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Estimate]:
    """HitRatio@K, NDCG@K and MRR from 0-based target ranks."""
    report: dict[str, Estimate] = {}
    for k in ks:
        report[f"HR@{k}"] = mean_with_ci(hit_at_k(ranks, k), users, n_boot, seed)
        report[f"NDCG@{k}"] = mean_with_ci(ndcg_at_k(ranks, k), users, n_boot, seed)
    report["MRR"] = mean_with_ci(reciprocal_rank(ranks), users, n_boot, seed)
    return report


def ctr_report(
    labels: np.ndarray, probs: np.ndarray, users: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> dict[str, Estimate]:
    """AUC, LogLoss and accuracy (threshold 0.5) of predicted click probabilities."""
    return {
        "AUC": auc_with_ci(labels, probs, users, n_boot, seed),
        "LogLoss": pooled_mean_with_ci(logloss_per_sample(labels, probs), users, n_boot, seed),
        "Accuracy": pooled_mean_with_ci(accuracy_per_sample(labels, probs), users, n_boot, seed),
    }


def aggregate_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation of each metric over runs with different seeds."""
    keys = sorted(set().union(*[set(r) for r in runs])) if runs else []
    out: dict[str, tuple[float, float]] = {}
    for key in keys:
        vals = np.array([r[key] for r in runs if key in r], dtype=np.float64)
        std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[key] = (float(vals.mean()), std)
    return out
