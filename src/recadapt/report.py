"""Results tables and plots from finished runs: mean +- std over seeds, each seed with its bootstrap CI."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from recadapt.io import write_text_atomic

ONE_CANDIDATE_MODES = ("generate", "constrained")
REPORTED = {
    "next-item": ("HR@1", "NDCG@10", "ValidRatio"),
    "ctr": ("AUC", "LogLoss", "Accuracy"),
    "full-ranking": ("HR@10", "NDCG@10", "MRR"),
    "sampled-ranking": ("HR@1", "NDCG@10", "MRR"),
}


def load_runs(run_dirs: list[Path], *, label_by_name: bool = False) -> list[dict[str, Any]]:
    """The runs' ``metrics.json``; an LLM run ranked in several modes becomes one run per mode, named
    ``model (mode)``, so every mode gets its own row.

    Rows group runs by model, so seeds aggregate. ``label_by_name`` groups them by run name without its
    ``-s<seed>`` suffix instead, so ablations of one model (``ilora-k2-...-s0``) get rows of their own.
    """
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: run has not finished (no metrics.json)")
        run = json.loads(path.read_text(encoding="utf-8"))
        if label_by_name:
            run["model"] = re.sub(r"-s\d+$", "", run.get("run") or Path(run_dir).name)
        by_mode = run.get("test_by_mode")
        if not by_mode:
            runs.append(run)
            continue
        for mode, report in by_mode.items():
            if (
                mode in ONE_CANDIDATE_MODES
            ):  # they name one candidate: HitRatio@1 only (runs before 11/2026 had more)
                report = {k: v for k, v in report.items() if k in ("HR@1", "ValidRatio")}
            runs.append({**run, "model": f"{run['model']} ({mode})", "test": report})
    return runs


def _budget(runs: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of what each trained LLM run cost (samples, optimizer steps, tokens, wall time)."""
    seen: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in runs:
        if "optimizer_steps" in run:
            seen.setdefault((run["dataset"], run["model"].split(" (")[0], run["seed"]), run)
    if not seen:
        return []
    out = [
        "Training budget (one process; train time summed over the processes of a resumed run, — where unknown):",
        "",
        "| dataset | model | seed | train samples | optimizer steps | train tokens | train time | test samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, model, seed), run in sorted(seen.items()):
        out.append(
            f"| {dataset} | {model} | {seed} | {run.get('train_samples', 0):,} | {run['optimizer_steps']} | "
            f"{run.get('train_tokens', 0):,} | {train_time(run)} | {run['test_samples']} |"
        )
    return [*out, ""]


def train_time(metrics: dict[str, Any]) -> str:
    """A run's training time in minutes: summed over its processes (``train_seconds``), "—" where that is
    unknown (resumed from a checkpoint older than the record); metrics files older than the record give their
    last process's time, which for a run that was never interrupted is the whole."""
    seconds = metrics.get("train_seconds", metrics.get("train_seconds_this_process", 0.0))
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def _cell(value: float, text: str) -> str:
    return "—" if np.isnan(value) else text


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, protocol, model): per metric mean, std, and the per-seed values with CIs."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run["protocol"], run["model"])].append(run)
    rows = []
    for (dataset, protocol, model), members in sorted(groups.items()):
        members.sort(key=lambda r: r["seed"])
        row: dict[str, Any] = {
            "dataset": dataset,
            "protocol": protocol,
            "model": model,
            "seeds": [m["seed"] for m in members],
            "test_samples": members[0]["test_samples"],
        }
        for metric in REPORTED[protocol]:
            # a run may not define every metric (an LLM that names one candidate has no NDCG@10)
            missing = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
            per_seed = [m["test"].get(metric, missing) for m in members]
            values = np.array([e["value"] for e in per_seed])
            row[metric] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "per_seed": per_seed,
            }
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]], title: str) -> str:
    out = [f"# {title}", ""]
    by_task: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[(row["dataset"], row["protocol"])].append(row)
    for (dataset, protocol), members in by_task.items():
        metrics = REPORTED[protocol]
        out += [f"## {dataset} / {protocol} ({members[0]['test_samples']} test samples)", ""]
        out.append("| model | seeds | " + " | ".join(f"{m} (mean ± std)" for m in metrics) + " |")
        out.append("|---|---|" + "---|" * len(metrics))
        for row in members:
            cells = [_cell(row[m]["mean"], f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}") for m in metrics]
            out.append(f"| {row['model']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        out += ["", "Per seed, with the bootstrap 95% confidence interval over test users:", ""]
        out.append("| model | seed | " + " | ".join(metrics) + " |")
        out.append("|---|---|" + "---|" * len(metrics))
        for row in members:
            for i, seed in enumerate(row["seeds"]):
                cells = []
                for m in metrics:
                    e = row[m]["per_seed"][i]
                    text = _cell(e["value"], f"{e['value']:.4f} [{e['low']:.4f}, {e['high']:.4f}]")
                    if e.get("note"):  # why a value is undefined, or its interval from fewer resamples
                        text = f"{'undefined' if text == '—' else text} ({e['note']})"
                    cells.append(text)
                out.append(f"| {row['model']} | {seed} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _csv(rows: list[dict[str, Any]]) -> str:
    lines = ["dataset,protocol,model,metric,mean,std,n_seeds,per_seed_values"]
    for row in rows:
        for metric in REPORTED[row["protocol"]]:
            stats = row[metric]
            seeds = " ".join(f"{e['value']:.6f}" for e in stats["per_seed"])
            lines.append(
                f"{row['dataset']},{row['protocol']},{row['model']},{metric},{stats['mean']:.6f},"
                f"{stats['std']:.6f},{len(row['seeds'])},{seeds}"
            )
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per (dataset, protocol): the primary metric per model, seeds as dots, mean with std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({(r["dataset"], r["protocol"]) for r in rows})
    widths = [max(3.6, 0.5 * sum((r["dataset"], r["protocol"]) == t for r in rows)) for t in tasks]
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(sum(widths), 3.8), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, (dataset, protocol) in zip(axes[0], tasks, strict=False):
        members = [r for r in rows if (r["dataset"], r["protocol"]) == (dataset, protocol)]
        metric = REPORTED[protocol][0] if protocol != "full-ranking" else "NDCG@10"
        x = np.arange(len(members))
        means = [r[metric]["mean"] for r in members]
        stds = [r[metric]["std"] for r in members]
        ax.bar(x, means, yerr=stds, capsize=4, color="#8fb3d9", edgecolor="#2b5d8a")
        for i, r in enumerate(members):
            vals = [e["value"] for e in r[metric]["per_seed"]]
            ax.scatter(np.full(len(vals), i), vals, color="#1b1b1b", s=10, zorder=3)
            if len(vals) == 1:  # one seed: show its bootstrap CI instead of a spread over seeds
                e = r[metric]["per_seed"][0]
                ax.errorbar(
                    i,
                    e["value"],
                    yerr=[[e["value"] - e["low"]], [e["high"] - e["value"]]],
                    color="#1b1b1b",
                    capsize=3,
                    lw=1,
                )
        ax.set_xticks(x, [r["model"] for r in members], rotation=30, ha="right")
        ax.set_title(f"{dataset}\n{protocol}", fontsize=9)
        ax.set_ylabel(metric)
        if metric == "AUC":  # 0.5 is chance: start the axis there so differences are visible
            ax.set_ylim(0.5, max(0.55, max(m + s for m, s in zip(means, stds, strict=True)) + 0.02))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(
    run_dirs: list[Path], out: Path, title: str = "Results", *, label_by_name: bool = False
) -> list[dict[str, Any]]:
    """Write ``out`` (Markdown), ``out.csv`` and ``out.png`` from finished runs (rows as :func:`load_runs`)."""
    return write_runs_report(load_runs(run_dirs, label_by_name=label_by_name), out, title)


def write_runs_report(runs: list[dict[str, Any]], out: Path, title: str = "Results") -> list[dict[str, Any]]:
    """:func:`write_report` from run payloads (``metrics.json`` dicts, e.g. re-evaluated on a subset)."""
    rows = summarize(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = _markdown(rows, title) + "\n" + "\n".join(_budget(runs))
    write_text_atomic(out, body + f"\n![{title}]({out.with_suffix('.png').name})\n")
    write_text_atomic(out.with_suffix(".csv"), _csv(rows))
    plot_rows(rows, out.with_suffix(".png"))
    return rows
