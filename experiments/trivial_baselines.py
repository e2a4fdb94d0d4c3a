"""Counting baselines that need no training: how much signal a shortcut gets on the LLM experiments' test sets.

    .venv/bin/python experiments/trivial_baselines.py --data-dir ../shared/data --out docs/results/trivial_baselines.md

- next-item (LastFM, the 20 persisted candidates), ties broken at random (seed 0): rank the candidates
  - by how often each was a training target ("most popular");
  - by how often their HetRec tags (the first 3 or 5, as ``llm.item_tags`` shows them) occur among the history's
    (content similarity);
  - by how close their ids are to a history item's (LLaRA's ids follow HetRec's crawl order, so neighbouring ids
    were first met in the same user's list: a proxy of co-listening);
  - by the cosine between their and the last history item's embeddings in a trained SASRec (``--crm-run``; what
    LLaRA's hybrid prompts carry). This row is a trained model, not a count; it shows the signal is there.
- CTR (ml-1m-ctr): predict the positive rate of the target item, or of the user, counted from training labels
  (Laplace-smoothed: (positives + 1) / (samples + 2)): once from the whole train part (what a CRM sees) and once from
  the few-shot set of N samples the LLMs train on. Scored on the 500-sample subset the LLM runs use and on the full
  test part.

Metrics and CIs are the library's (bootstrap over users, 1,000 resamples).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
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


def _candidate_ranking(
    data_dir: str | None, score: Callable[[np.ndarray, np.ndarray], np.ndarray], seed: int
):
    """HR/NDCG of ranking every LastFM test row's 20 candidates by ``score(history, candidates)`` (higher first;
    ties broken at random with ``seed``)."""
    prepared = ensure_prepared("lastfm", "next-item", data_root=data_dir)
    test = prepared.parts["test"]
    candidates = np.stack([np.asarray(c, dtype=np.int64) for c in test["candidates"]])
    scores = np.stack(
        [score(np.asarray(h, dtype=np.int64), c) for h, c in zip(test["history"], candidates, strict=True)]
    ).astype(np.float64)
    scores += np.random.default_rng(seed).random(scores.shape) * 1e-6
    target_index = (candidates == test["target"].to_numpy()[:, None]).argmax(1)
    return ranking_report(target_ranks(scores, target_index), test["user_id"].to_numpy(), ks=(1, 10))


def tag_overlap(data_dir: str | None, n_tags: int, seed: int) -> dict[str, Estimate]:
    """Content: a candidate's score is how many times its first ``n_tags`` HetRec tags occur among the history's
    (the tags ``llm.item_tags=n_tags`` writes into the prompts)."""
    from recadapt.llm.samples import item_tag_lists

    prepared = ensure_prepared("lastfm", "next-item", data_root=data_dir)
    tags = [t[:n_tags] for t in item_tag_lists(prepared.items, prepared.n_items)]

    def score(history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        profile = Counter(tag for item in history for tag in tags[int(item)])
        return np.array([sum(profile[tag] for tag in tags[int(c)]) for c in candidates])

    return _candidate_ranking(data_dir, score, seed)


def id_proximity(data_dir: str | None, seed: int) -> dict[str, Estimate]:
    """Minus the distance from a candidate's id to the nearest history id. LLaRA's LastFM ids follow HetRec's
    artist ids, numbered as the crawl met them, user by user: artists first seen in one user's list are neighbours."""
    return _candidate_ranking(data_dir, lambda h, c: -np.abs(c[:, None] - h[None, :]).min(axis=1), seed)


def crm_item_similarity(data_dir: str | None, crm_run: Path, seed: int) -> dict[str, Estimate]:
    """Cosine between a candidate's and the last history item's embeddings in a trained CRM (what LLaRA's hybrid
    prompts hand the LLM, before the projector)."""
    import torch

    from recadapt.cf.checkpoint import load_crm

    table = torch.nn.functional.normalize(
        load_crm(crm_run / "best").item_embeddings().detach(), dim=-1
    ).numpy()
    return _candidate_ranking(data_dir, lambda h, c: table[c] @ table[h[-1]], seed)


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
    parser.add_argument(
        "--crm-run",
        type=Path,
        default=Path("runs/crm/sasrec-lastfm-next-item-s0"),
        help="a trained LastFM CRM run for the item-embedding row (skipped when absent)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)

    next_item = {"most popular (training-target counts)": most_popular(args.data_dir, seed=0)}
    for n_tags in (3, 5):
        next_item[f"tag overlap, {n_tags} HetRec tags per artist (content)"] = tag_overlap(
            args.data_dir, n_tags, 0
        )
    next_item["id proximity (HetRec's crawl order)"] = id_proximity(args.data_dir, 0)
    if (args.crm_run / "best").is_dir():
        next_item[f"item-embedding cosine with the last history item ({args.crm_run.name})"] = (
            crm_item_similarity(args.data_dir, args.crm_run, 0)
        )
    lines = [
        "## LastFM next-item, 122 test users, 20 candidates (random pick: HR@1 0.0500, NDCG@10 0.2272)",
        "",
        "| baseline | HR@1 [95% CI] | NDCG@10 [95% CI] |",
        "|---|---|---|",
        *(f"| {name} | {fmt(r['HR@1'])} | {fmt(r['NDCG@10'])} |" for name, r in next_item.items()),
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
            "No training: what a shortcut (popularity, tag overlap, id order, an item's or a user's positive rate)\n"
            "gets, plus one trained signal (a CRM's item embeddings). Written by\n"
            f"`.venv/bin/python experiments/trivial_baselines.py --data-dir ../shared/data --out {args.out}`\n"
            "(deterministic: the persisted splits, tie-break seed 0, bootstrap seed 0).\n\n"
        )
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(header + text + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
