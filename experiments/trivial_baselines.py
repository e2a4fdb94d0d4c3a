"""Counting baselines that need no training: how much signal a shortcut gets on the LLM experiments' test sets.

    .venv/bin/python experiments/trivial_baselines.py --data-dir ../shared/data --out docs/results/trivial_baselines.md

- next-item (LastFM, the 20 persisted candidates): rank the candidates by how often each was a training target
  ("most popular"; ties broken at random, seed 0).
- CTR (ml-1m-ctr): predict the positive rate of the target item, or of the user, counted from training labels
  (Laplace-smoothed: (positives + 1) / (samples + 2)): once from the whole train part (what a CRM sees) and once from
  the few-shot set of N samples the LLMs train on. Scored on the 500-sample subset the LLM runs use and on the full
  test part.

Metrics and CIs are the library's (bootstrap over users, 1,000 resamples).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from recadapt.data.store import ensure_prepared
from recadapt.tasks.evaluate import evaluation_rows
from recadapt.tasks.metrics import Estimate, ctr_report, ranking_report, target_ranks


def most_popular(data_dir: str | None, seed: int) -> dict[str, Estimate]:
    prepared = ensure_prepared("lastfm", "next-item", data_root=data_dir)
    counts = Counter(int(t) for t in prepared.parts["train"]["target"])
    test = prepared.parts["test"]
    candidates = np.stack([np.asarray(c, dtype=np.int64) for c in test["candidates"]])
    popularity = np.vectorize(lambda i: counts.get(int(i), 0))(candidates).astype(np.float64)
    scores = popularity + np.random.default_rng(seed).random(popularity.shape) * 1e-3  # random tie-break
    target_index = (candidates == test["target"].to_numpy()[:, None]).argmax(1)
    ranks = target_ranks(scores, target_index)
    return ranking_report(ranks, test["user_id"].to_numpy(), ks=(1, 10))


def positive_rate(train: pd.DataFrame, key: str, test: pd.DataFrame) -> np.ndarray:
    """(positives + 1) / (samples + 2) of each test row's ``key`` (item or user) in ``train``."""
    stats = train.groupby(key)["label"].agg(["sum", "count"])
    joined = test[[key]].join(stats, on=key)
    return ((joined["sum"].fillna(0) + 1) / (joined["count"].fillna(0) + 2)).to_numpy()


def ctr_rows(data_dir: str | None, shots: list[int], eval_samples: int) -> list[tuple[str, str, dict]]:
    prepared = ensure_prepared("ml-1m-ctr", "ctr", data_root=data_dir)
    train, test = prepared.parts["train"], prepared.parts["test"]
    split_seed = int(prepared.manifest.get("split_seed", 0))
    subsets = {
        f"{eval_samples} test samples": test.iloc[evaluation_rows(len(test), eval_samples, split_seed)],
        f"all {len(test):,} test samples": test,
    }
    sources = {"all train rows": train} | {f"{n} shots": train[train["shot_rank"] < n] for n in shots}
    rows = []
    for subset_name, part in subsets.items():
        labels, users = part["label"].to_numpy(), part["user_id"].to_numpy()
        for key, what in (("target", "item"), ("user_id", "user")):
            for source_name, source in sources.items():
                probs = positive_rate(source, key, part)
                rows.append(
                    (f"{what} positive rate ({source_name})", subset_name, ctr_report(labels, probs, users))
                )
    return rows


def fmt(estimate: Estimate) -> str:
    return f"{estimate.value:.4f} [{estimate.low:.4f}, {estimate.high:.4f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--shots", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)

    report = most_popular(args.data_dir, seed=0)
    lines = [
        "## LastFM next-item, 122 test users, 20 candidates (random pick: HR@1 0.0500, NDCG@10 0.2272)",
        "",
        "| baseline | HR@1 [95% CI] | NDCG@10 [95% CI] |",
        "|---|---|---|",
        f"| most popular (training-target counts) | {fmt(report['HR@1'])} | {fmt(report['NDCG@10'])} |",
        "",
        "## ml-1m-ctr",
        "",
        "| baseline | test set | AUC [95% CI] | LogLoss [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, subset, metrics in ctr_rows(args.data_dir, args.shots, args.eval_samples):
        lines.append(f"| {name} | {subset} | {fmt(metrics['AUC'])} | {fmt(metrics['LogLoss'])} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        header = (
            "# Counting baselines on the LLM experiments' test sets\n\n"
            "No training: what a shortcut (popularity, an item's or a user's positive rate) gets. Written by\n"
            f"`.venv/bin/python experiments/trivial_baselines.py --data-dir ../shared/data --out {args.out}`\n"
            "(deterministic: the persisted splits, tie-break seed 0, bootstrap seed 0).\n\n"
        )
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(header + text + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
