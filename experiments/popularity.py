"""Reference row for full ranking: rank every item by its training popularity (seen items excluded), on the same
fixed test subset the LLM runs use. It tells how much of a low score is what any model learns first.

    .venv/bin/python experiments/popularity.py --dataset ml-100k --samples 200 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import numpy as np

from recadapt.data.arrays import list_offsets_values, to_list_array
from recadapt.data.store import ensure_prepared
from recadapt.tasks.evaluate import RANKING_KS, evaluation_rows
from recadapt.tasks.fullrank import mask_seen_items
from recadapt.tasks.metrics import ranking_report, target_ranks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--samples", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    prepared = ensure_prepared(args.dataset, "full-ranking", data_root=args.data_dir)
    train = prepared.parts["train"]
    _, items = list_offsets_values(to_list_array(train["history"]))
    counts = np.bincount(np.concatenate([items, train["target"].to_numpy()]), minlength=prepared.n_items)
    test = prepared.parts["test"]
    test = test.iloc[evaluation_rows(len(test), args.samples, 0)].reset_index(drop=True)
    scores = mask_seen_items(np.tile(counts.astype(np.float64), (len(test), 1)), test)
    ranks = target_ranks(scores, test["target"].to_numpy())
    report = ranking_report(
        ranks, test["user_id"].to_numpy(), ks=RANKING_KS["full-ranking"], n_boot=args.n_boot
    )
    print(f"most popular, {args.dataset}, {len(test)} test users")
    for name in ("HR@10", "NDCG@10", "MRR", "HR@50"):
        print(f"  {name:<8} {report[name]}")


if __name__ == "__main__":
    main()
