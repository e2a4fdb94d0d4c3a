"""Reference row for full ranking: rank every item by its training popularity (seen items excluded), on the same
fixed test subset the LLM runs use. It tells how much of a low score is what any model learns first.

    .venv/bin/python experiments/popularity.py --dataset ml-100k --samples 200 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

from recadapt.data.store import ensure_prepared
from recadapt.tasks.fullrank import popularity_report, subset


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
    test = subset(prepared.parts["test"], args.samples, 0)
    report = popularity_report(prepared.parts["train"], test, prepared.n_items, args.n_boot)
    print(f"most popular, {args.dataset}, {len(test)} test users")
    for name in ("HR@10", "NDCG@10", "MRR", "HR@50"):
        print(f"  {name:<8} {report[name]}")


if __name__ == "__main__":
    main()
