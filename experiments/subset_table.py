"""A results table (``.md``, ``.csv``, ``.png``) of LLM runs next to CRM runs scored on the same test rows.

An LLM run evaluates a fixed subset of the test part (``llm.eval_samples``); the CRM runs are re-evaluated here on
exactly that subset (:func:`recadapt.train.crm.evaluate_run` with ``samples``), so every row of the table is
measured on the same samples. Rows group runs by model (seeds aggregate); ``--label-by-name`` groups LLM runs by
their run name without the ``-s<seed>`` suffix instead, so ablations of one method get rows of their own.

    .venv/bin/python experiments/subset_table.py runs/llm/tallrec-ml-1m-ctr-ctr-s0 \\
        --crm runs/crm/sasrec-ml-1m-ctr-ctr-s{0,1,2} runs/crm/din-ml-1m-ctr-ctr-s{0,1,2} \\
        --out docs/results/ctr_ml1m_table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recadapt.report import load_runs, write_runs_report
from recadapt.train.config import load_config
from recadapt.train.crm import evaluate_run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "llm_runs", nargs="+", help="LLM CTR run directories (all with the same eval_samples)"
    )
    parser.add_argument("--crm", nargs="+", default=[], help="CRM run directories on the same dataset")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="CTR on ml-1m-ctr")
    parser.add_argument("--label-by-name", action="store_true", help="one row per run name (ablations)")
    args = parser.parse_args()
    llm_runs = load_runs([Path(r) for r in args.llm_runs], label_by_name=args.label_by_name)
    samples = {r["test_samples"] for r in llm_runs}
    if len(samples) != 1:
        raise SystemExit(f"the LLM runs were evaluated on different numbers of samples: {sorted(samples)}")
    n = samples.pop()
    runs = list(llm_runs)
    for run_dir in map(Path, args.crm):
        if (run_dir / "metrics.json").exists():
            payload = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        else:  # stopped early (budget): its best epoch so far, labelled as such
            config = load_config(run_dir / "config.yaml")
            payload = {
                "run": run_dir.name,
                "model": f"{config.model_name} (unfinished)",
                "dataset": config.data.dataset,
                "protocol": config.data.protocol,
                "seed": config.train.seed,
            }
        report = evaluate_run(run_dir, samples=n)
        runs.append({**payload, "test_samples": n, "test": {k: v.to_dict() for k, v in report.items()}})
        headline = "AUC" if "AUC" in report else "NDCG@10"
        print(f"{run_dir}: {headline} {report[headline]} on the {n}-sample subset")
    write_runs_report(runs, Path(args.out), args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
