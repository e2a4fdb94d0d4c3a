"""The learnability suite: does each method learn the signal a synthetic dataset puts where it claims to look?

Every synthetic variant (:mod:`recadapt.data.synth`) hides one user taste in one place: ``text`` in the titles,
``cf`` only in co-occurrence, ``long`` only in the history older than the prompt, ``ctr`` in Yes/No labels that
only co-occurrence explains. ``long-text`` is ``long`` with titles that name their genre: the taste is still
hidden from the prompt, but a text-only item side (the RecLoRA paper's) can read each candidate's genre.
``cf-large`` is ``cf`` with LastFM's catalogue size (20 genres x 230 items) and 4,000 users.

This script writes the datasets, trains SASRec on each, trains the chosen LLM rows at
one fixed CPU budget, and then runs the **shuffled-CRM probe** on every method that reads a CRM: the same trained
run evaluated with item ids permuted on the CRM's side (``recadapt eval RUN --shuffle-crm``). A method that uses
its collaborative input must get worse under the probe; one that scores the same ignores it.

Resumable: every dataset, run and probe is a file under ``--out``; run the same command again and it continues
(a finished run or probe is read back, not recomputed). Prints one table and writes it as ``.md``/``.csv`` and a
plot under ``--out`` (``--doc PREFIX`` copies them to e.g. ``docs/results/learnability``)::

    .venv/bin/python benchmarks/learnability.py --list
    .venv/bin/python benchmarks/learnability.py --rows 'cf/*'          # the rows of one variant
    .venv/bin/python benchmarks/learnability.py --rows cf/llara cf/llara+scaled --doc docs/results/learnability

Budget (the default, ~7 minutes a next-item LLM row on 2 CPU cores): 256 training samples, 32 optimizer steps of
8 samples (one epoch), SmolLM2-135M; evaluation on the 100 test users of the 1,000-user datasets, score mode.
``--samples N --steps M`` trains the chosen rows at another budget, as separate runs (``RUN-NxM``, key
``variant/label@NxM``); ``--table-only`` lists every budget trained.

Full-ranking rows (``cf/laser``, ``cf/darec``) rank all 500 items on the leave-one-out split of the same data
for 100 test users, with their papers' CRM (BERT4Rec for Laser, SASRec for DARec) and epoch-based stages over
the same 256 samples; beside them SASRec (full ranking, same users) and the most-popular ranking.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES, DEFAULT_STEPS = 256, 32
CHANCE = {"next-item": 1 / 20, "ctr": 0.5, "full-ranking": 10 / 500}  # HR@10 of a random ranking of 500 items
FULL_RANKING_USERS = 100  # test users a full-ranking row ranks the whole catalogue for (the LLM is the cost)


@dataclass(frozen=True)
class Row:
    """One trained run of the suite: ``variant/label``, the method's config and overrides on top of the budget."""

    variant: str
    label: str
    method: str
    overrides: tuple[str, ...] = ()
    samples: int = DEFAULT_SAMPLES
    steps: int = DEFAULT_STEPS
    full_ranking: bool = False  # Laser and DARec: the whole catalogue ranked, on the leave-one-out split
    crm_model: str = ""  # the CRM the row reads instead of its method's default (DIN: target-aware cond)

    @property
    def default_budget(self) -> bool:
        return (self.samples, self.steps) == (DEFAULT_SAMPLES, DEFAULT_STEPS)

    @property
    def key(self) -> str:
        budget = "" if self.default_budget else f"@{self.samples}x{self.steps}"
        return f"{self.variant}/{self.label}{budget}"

    @property
    def protocol(self) -> str:
        if self.full_ranking:
            return "full-ranking"
        return "ctr" if self.variant == "ctr" else "next-item"

    @property
    def crm(self) -> str:
        """The CRM the row reads: ``crm_model`` if set, else BERT4Rec for Laser, as in the paper, and SASRec
        otherwise (SASRec is every row's reference)."""
        return self.crm_model or ("bert4rec" if self.method == "laser" else "sasrec")

    @property
    def run_name(self) -> str:
        """``llara-scaled-cf``; a run at another budget than the default gets ``-1024x128`` appended."""
        budget = "" if self.default_budget else f"-{self.samples}x{self.steps}"
        return f"{self.label.replace('+', '-')}-{self.variant}{budget}"

    def with_budget(self, samples: int, steps: int) -> Row:
        return replace(self, samples=samples, steps=steps)

    def trained_budgets(self, out: Path) -> list[Row]:
        """This row at every budget trained under ``out`` (for ``--table-only``), the default first."""
        base = replace(self, samples=DEFAULT_SAMPLES, steps=DEFAULT_STEPS).run_name
        rows = [self.with_budget(DEFAULT_SAMPLES, DEFAULT_STEPS)]
        for folder in sorted((out / "runs").glob(f"{base}-*x*")):
            found = re.fullmatch(rf"{re.escape(base)}-(\d+)x(\d+)", folder.name)
            if found:
                rows.append(self.with_budget(int(found[1]), int(found[2])))
        return [r for r in rows if (out / "runs" / r.run_name / "metrics.json").exists()]


# recadapt's improved injection, measured against the papers' recipe in the same rows (docs/results/learnability.md)
SCALED = ("llm.projector=scaled",)
HYBRID = ("llm.curriculum=hybrid",)
BEFORE = ("llm.item_placement=before",)
LISTWISE = ("llm.objective=both",)
RELLAX = ("llm.history=recent", "llm.eval_samples=0")
NEXT_ITEM = {
    "zero-shot": ("zero-shot", ()),
    "tallrec": ("tallrec", ()),
    "llara": ("llara", ()),
    "llara+scaled": ("llara", SCALED),
    "llara+vocab": ("llara", ("llm.projector=vocab",)),
    "llara+scaled+hybrid": ("llara", (*SCALED, *HYBRID)),
    "llara+before": ("llara", BEFORE),
    "llara+hybrid+before": ("llara", (*HYBRID, *BEFORE)),
    "llara+scaled+before": ("llara", (*SCALED, *BEFORE)),
    "llara+scaled+hybrid+before": ("llara", (*SCALED, *HYBRID, *BEFORE)),
    "llara+scaled+hybrid+listwise": ("llara", (*SCALED, *HYBRID, *LISTWISE)),
    "llara+scaled+hybrid+before+listwise": ("llara", (*SCALED, *HYBRID, *BEFORE, *LISTWISE)),
    "llara+hybrid+before+listwise": ("llara", (*HYBRID, *BEFORE, *LISTWISE)),
    "llara+scaled+before+listwise": ("llara", (*SCALED, *BEFORE, *LISTWISE)),
    "ilora": ("ilora", ()),
    "ilora+scaled": ("ilora", SCALED),
    "ilora+scaled+hybrid+before": ("ilora", (*SCALED, *HYBRID, *BEFORE)),
    "ilora+scaled+hybrid+before+listwise": ("ilora", (*SCALED, *HYBRID, *BEFORE, *LISTWISE)),
    "rellax": ("rellax", RELLAX),
    "rellax+scaled": ("rellax", (*RELLAX, *SCALED)),
    "rellax+scaled+hybrid+before": ("rellax", (*RELLAX, *SCALED, *HYBRID, *BEFORE)),
    "rellax+scaled+hybrid+before+listwise": ("rellax", (*RELLAX, *SCALED, *HYBRID, *BEFORE, *LISTWISE)),
    "reclora": ("reclora", ("llm.eval_samples=0",)),
    # the paper's RecLoRA with a sharper gate (temperature 0.2): trained at 1 its gate stays near uniform
    "reclora+sharp": (
        "reclora",
        ("llm.eval_samples=0", "llm.adapter_options={n_members: 8, temperature: 0.2}"),
    ),
    # the same with the larger published bank (16 members): 8 members map several of the 20 genres to one
    "reclora+sharp16": (
        "reclora",
        ("llm.eval_samples=0", "llm.adapter_options={n_members: 16, temperature: 0.2}"),
    ),
    # the same, a second training seed (same data, samples and CRM)
    "reclora+sharp16+seed1": (
        "reclora",
        ("llm.eval_samples=0", "llm.adapter_options={n_members: 16, temperature: 0.2}", "train.seed=1"),
    ),
    # the paper's RecLoRA with the bank drawn so that its near-uniform mix starts at a LoRA's scale
    "reclora+mix": (
        "reclora",
        ("llm.eval_samples=0", "llm.adapter_options={n_members: 8, temperature: 1.0, init: mix}"),
    ),
    # the paper's RecLoRA with its gate at 10x the learning rate: the members' B start at 0, so the gate's gradient
    # starts at 0 and the members stay nearly one LoRA (benchmarks/gate_spread.py: their spread)
    "reclora+gatelr": (
        "reclora",
        (
            "llm.eval_samples=0",
            "llm.adapter_options={n_members: 8, temperature: 1.0, conditioner_lr_scale: 10.0}",
        ),
    ),
    # RecLoRA's user side (a personal LoRA mixed by the CRM's view of the whole history) with LLaRA's item side
    # (the candidates' CRM embeddings before their titles) and recadapt's recipe
    "reclora+hybrid": (
        "llara",
        (*SCALED, *HYBRID, *BEFORE, *LISTWISE, "llm.adapter=personal-lora", "llm.cond_history_len=60"),
    ),
    # the same with the conditioning CRM's user vector (SASRec over the long history) also as a prompt token
    "reclora+hybrid+user": (
        "llara",
        (
            *SCALED,
            *HYBRID,
            *BEFORE,
            *LISTWISE,
            "llm.adapter=personal-lora",
            "llm.cond_history_len=60",
            "llm.user_token=true",
        ),
    ),
    # the same with a sharper gate (temperature 0.2, below the published 1-15): trained at temperature 1 the
    # gate stays at its near-uniform start (benchmarks/gate_spread.py), so every user gets nearly one LoRA
    "reclora+hybrid+sharp": (
        "llara",
        (
            *SCALED,
            *HYBRID,
            *BEFORE,
            *LISTWISE,
            "llm.adapter=personal-lora",
            "llm.cond_history_len=60",
            "llm.adapter_options={n_members: 8, temperature: 0.2}",
        ),
    ),
}
CTR = {
    "zero-shot": ("zero-shot", ()),
    "tallrec": ("tallrec", ()),
    "ilora+scaled": ("ilora", SCALED),
    "reclora": ("reclora", ("llm.eval_samples=0",)),
    "rellax+scaled": ("rellax", (*RELLAX, *SCALED)),
    "ilora+scaled+hybrid+before": ("ilora", (*SCALED, *HYBRID, *BEFORE)),
    "rellax+scaled+hybrid+before": ("rellax", (*RELLAX, *SCALED, *HYBRID, *BEFORE)),
    # ReLLaX at iLoRA's learning rate (configs/rellax.yaml: 1e-3 for the LoRA and the projector)
    "rellax+scaled+hybrid+before+lr5e-4": (
        "rellax",
        (*RELLAX, *SCALED, *HYBRID, *BEFORE, "llm.lr=5e-4", "llm.projector_lr=5e-4"),
    ),
    # RecLoRA's user side with LLaRA's item side: on ctr the target's genre is visible only in its CRM embedding,
    # which the paper's RecLoRA (a target-free user vector, titles as text) never reads
    # (iLoRA's config: LLaRA's has no ctr prompt)
    "reclora+hybrid": (
        "ilora",
        (
            *SCALED,
            *HYBRID,
            *BEFORE,
            "llm.adapter=personal-lora",
            "llm.adapter_options={n_members: 8, temperature: 1.0}",
            "llm.cond_history_len=60",
        ),
    ),
    # the same with the bank drawn so that its near-uniform mix starts at a LoRA's scale (init: mix)
    "reclora+hybrid+mix": (
        "ilora",
        (
            *SCALED,
            *HYBRID,
            *BEFORE,
            "llm.adapter=personal-lora",
            "llm.adapter_options={n_members: 8, temperature: 1.0, init: mix}",
            "llm.cond_history_len=60",
        ),
    ),
}
# RecLoRA's gate on a target-aware CRM (DIN, standing in for the paper's SIM): the user's representation with
# respect to the item the prompt asks about, so its LoRA can depend on whether this user likes this item
CTR_DIN = {
    "reclora+din": ("reclora", ("llm.eval_samples=0", "llm.cond=crm-target")),
    "reclora+din+seed1": ("reclora", ("llm.eval_samples=0", "llm.cond=crm-target", "train.seed=1")),
    "reclora+din+sharp16": (
        "reclora",
        (
            "llm.eval_samples=0",
            "llm.cond=crm-target",
            "llm.adapter_options={n_members: 16, temperature: 0.2}",
        ),
    ),
}
# the papers' recipes (configs/*.yaml), and DARec with recadapt's collaborative item side
FULL_RANKING = {
    "laser": ("laser", ()),
    "darec": ("darec", ()),
    "darec+itemcf": ("darec", ("model.item_cf=true",)),
}


def next_item_rows(variant: str, *labels: str) -> tuple[Row, ...]:
    """``variant``'s rows for some of the next-item labels."""
    return tuple(Row(variant, label, *NEXT_ITEM[label]) for label in labels)


ROWS: tuple[Row, ...] = (
    *(Row(v, label, m, o) for v in ("text", "cf") for label, (m, o) in NEXT_ITEM.items()),
    *next_item_rows(
        "long",
        "tallrec",
        "llara+scaled",
        "reclora",
        "reclora+sharp16",
        "reclora+hybrid",
        "reclora+hybrid+user",
        "reclora+hybrid+sharp",
    ),
    # the RecLoRA paper's setting: text titles (the LLM reads each candidate's genre), the taste only in the
    # history the CRM reads; its gate is the one path from that taste to the LLM
    *next_item_rows(
        "long-text",
        "tallrec",
        "reclora",
        "reclora+sharp",
        "reclora+sharp16",
        "reclora+sharp16+seed1",
        "reclora+mix",
        "reclora+gatelr",
    ),
    # `cf` at LastFM's catalogue size: does the fixed path survive 4,600 items at this budget?
    *next_item_rows(
        "cf-large", "tallrec", "llara+scaled+hybrid+before+listwise", "rellax+scaled+hybrid+before+listwise"
    ),
    *(Row("ctr", label, m, o) for label, (m, o) in CTR.items()),
    *(Row("ctr", label, m, o, crm_model="din") for label, (m, o) in CTR_DIN.items()),
    *(Row("cf", label, m, o, full_ranking=True) for label, (m, o) in FULL_RANKING.items()),
)


def budget(row: Row) -> tuple[str, ...]:
    """The fixed CPU budget a trained row gets: ``row.samples`` training samples, ``row.steps`` optimizer steps
    of 8 samples, score-mode evaluation; ``llm.crm_run`` is filled in by the caller. Full-ranking rows train
    their config's epochs over ``row.samples`` (their stages are epoch-based) and rank for a fixed user subset."""
    if row.full_ranking:
        return (
            f"llm.train_samples={row.samples}",
            "llm.batch_size=4",
            "llm.grad_accum=2",
            "llm.checkpoint_every=8",
            f"llm.eval_samples={FULL_RANKING_USERS}",
        )
    common = (
        f"llm.train_samples={row.samples}",
        f"llm.max_steps={row.steps}",
        "llm.batch_size=4",
        "llm.grad_accum=2",
        "llm.checkpoint_every=8",
        "llm.eval_modes=[score]",
    )
    return () if row.method == "zero-shot" else common


def run(command: list[str], log: Path) -> None:
    """Run a recadapt command, its output appended to ``log``; a failure stops the suite naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"failed (exit {done.returncode}): {' '.join(command)}; see {log}")


def recadapt(*args: str) -> list[str]:
    """The CLI in this interpreter; ``sys.exit(main())`` so a refused command's exit status reaches ``run``."""
    return [
        sys.executable,
        "-c",
        "import sys; from recadapt.cli import main; sys.exit(main())",
        "--quiet",
        *args,
    ]


# a suite variant -> the synthetic dataset (`recadapt data synth` options): ``long-text`` is ``long`` with genre
# titles; ``cf-large`` is ``cf`` with LastFM's catalogue size (4,600 items) and 4x the users, so SASRec still
# sees each item in ~13 sequences: a catalogue too large for the LLM's budget, with a CRM of nearly `cf`'s strength
SYNTH: dict[str, dict[str, Any]] = {v: {"variant": v} for v in ("text", "cf", "long", "ctr")}
SYNTH["long-text"] = {"variant": "long", "titles": "genre"}
SYNTH["cf-large"] = {"variant": "cf", "n_users": 4000, "items_per_genre": 230}
SYNTH_FLAGS = {
    "variant": "--variant",
    "titles": "--titles",
    "n_users": "--users",
    "n_genres": "--genres",
    "items_per_genre": "--items-per-genre",
    "seed": "--seed",
}


def dataset(out: Path, variant: str) -> str:
    from recadapt.data.synth import SynthSpec

    name = SynthSpec(**SYNTH[variant]).name
    folder = out / "data" / name
    if not (folder / f"{name}.inter").exists():
        flags = [str(x) for key, value in SYNTH[variant].items() for x in (SYNTH_FLAGS[key], value)]
        run(recadapt("data", "synth", *flags, "--out", str(out / "data")), out / "logs" / "data.log")
    return f"recbole:{folder / name}"


# `long` hides the genre in the history older than the prompt's 10 items: its split persists this many history
# items per sample (data.history_len), and its CRM reads them all; prompts still show train.max_len = 10
LONG_HISTORY = 30


def common_args(out: Path, variant: str, *, crm: bool = False) -> tuple[str, ...]:
    args: tuple[str, ...] = (f"output_dir={out / 'runs'}", f"data.prepared_dir={out / 'prepared'}")
    if SYNTH[variant]["variant"] == "long":
        args += (f"data.history_len={LONG_HISTORY}",)
        if crm:
            args += (f"train.max_len={LONG_HISTORY}", f"model.max_len={LONG_HISTORY}")
    return args


def crm_run(out: Path, row: Row) -> Path:
    """The row's CRM trained on its variant and protocol (what the LLM row reads, and the reference row):
    ``sasrec-cf``, ``bert4rec-cf-full-ranking``..."""
    name = f"{row.crm}-{row.variant}" + ("-full-ranking" if row.full_ranking else "")
    run_dir = out / "runs" / name
    if not (run_dir / "metrics.json").exists():
        run(
            recadapt(
                "train", "--config", str(REPO / "configs" / f"{row.crm}.yaml"),
                "--dataset", dataset(out, row.variant), "--protocol", row.protocol,
                *common_args(out, row.variant, crm=True), f"name={name}",
            ),
            out / "logs" / f"{name}.log",
        )  # fmt: skip
    return run_dir


def reference(out: Path, row: Row) -> dict[str, Any]:
    """SASRec's test report on the users the row is scored on (for full ranking: re-scored on the same
    ``FULL_RANKING_USERS``, kept in ``RUN/test-N.json``), and the most-popular ranking's for full ranking."""
    sasrec = crm_run(out, Row(row.variant, "sasrec", "sasrec", full_ranking=row.full_ranking))
    if not row.full_ranking:
        return {"sasrec": json.loads((sasrec / "metrics.json").read_text(encoding="utf-8"))["test"]}
    from recadapt.data.store import ensure_prepared
    from recadapt.io import write_json_atomic
    from recadapt.tasks.fullrank import popularity_report, subset
    from recadapt.train.config import load_config
    from recadapt.train.crm import evaluate_run

    path = sasrec / f"test-{FULL_RANKING_USERS}.json"
    if not path.exists():
        report = evaluate_run(sasrec, part="test", samples=FULL_RANKING_USERS)
        write_json_atomic(path, {k: v.to_dict() for k, v in report.items()})
    data = load_config(sasrec / "config.yaml").data
    prepared = ensure_prepared(data.dataset, data.protocol, out_root=data.prepared_dir, seed=data.split_seed)
    test = subset(prepared.parts["test"], FULL_RANKING_USERS, data.split_seed)
    popular = popularity_report(prepared.parts["train"], test, prepared.n_items, n_boot=1000)
    return {
        "sasrec": json.loads(path.read_text(encoding="utf-8")),
        "popular": {k: v.to_dict() for k, v in popular.items()},
    }


def train_row(out: Path, row: Row) -> Path:
    run_dir = out / "runs" / row.run_name
    if not (run_dir / "metrics.json").exists():
        crm = crm_run(out, row)
        overrides = (*budget(row), *row.overrides)
        if row.method != "zero-shot" and row.method != "tallrec":
            overrides = (f"llm.crm_run={crm}", *overrides)
        started = time.time()
        run(
            recadapt(
                "train", "--config", str(REPO / "configs" / f"{row.method}.yaml"),
                "--dataset", dataset(out, row.variant), "--protocol", row.protocol,
                *common_args(out, row.variant), f"name={row.run_name}", *overrides,
            ),
            out / "logs" / f"{row.run_name}.log",
        )  # fmt: skip
        print(f"{row.key}: trained in {(time.time() - started) / 60:.1f} min", flush=True)
    return run_dir


def uses_crm(run_dir: Path) -> bool:
    from recadapt.train.config import load_config

    llm = load_config(run_dir / "config.yaml").llm
    return bool(llm and llm.crm_run)


def probe(run_dir: Path) -> dict[str, Any] | None:
    """The shuffled-CRM evaluation of a run that reads a CRM, kept in ``RUN/probe-shuffled.json``."""
    path = run_dir / "probe-shuffled.json"
    if not uses_crm(run_dir):
        return None
    if not path.exists():
        from recadapt.io import write_json_atomic
        from recadapt.methods.registry import method
        from recadapt.train.config import load_config

        if method(load_config(run_dir / "config.yaml").model_name).recipe == "fullrank":
            from recadapt.train.fullrank import evaluate_fullrank_run

            report = evaluate_fullrank_run(run_dir, shuffle_crm=True)
        else:
            from recadapt.train.llm import evaluate_llm_run

            reports = evaluate_llm_run(run_dir, modes=["score"], progress=False, shuffle_crm=True)
            report = next(iter(reports.values()))
        write_json_atomic(path, {k: v.to_dict() for k, v in report.items()})
    return json.loads(path.read_text(encoding="utf-8"))


def headline(protocol: str) -> tuple[str, str]:
    """(metric, loss) of a protocol: HR@1 and the answer NLL per token, AUC and LogLoss, or HR@10 (and MRR in
    the loss columns: full ranking has no answer loss)."""
    return {"ctr": ("AUC", "LogLoss"), "full-ranking": ("HR@10", "MRR")}.get(protocol, ("HR@1", "AnswerNLL"))


def fmt(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    v, lo, hi = entry["value"], entry.get("low"), entry.get("high")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table_row(out: Path, row: Row) -> dict[str, Any]:
    run_dir = out / "runs" / row.run_name
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    references = reference(out, row)
    metric, loss = headline(row.protocol)
    test = metrics["test"]
    shuffled = probe(run_dir)
    return {
        "row": row.key,
        "method": row.method,
        "variant": row.variant,
        "samples": metrics.get("train_samples", 0),
        "steps": metrics.get("optimizer_steps", 0),
        "minutes": round(metrics.get("train_seconds", 0.0) / 60, 1),
        "metric": metric,
        "value": test.get(metric, {}).get("value"),
        "result": fmt(test.get(metric)),
        "sasrec": fmt(references["sasrec"].get(metric)),
        "popular": fmt(references["popular"].get(metric)) if "popular" in references else "-",
        "chance": CHANCE[row.protocol],
        "panel": f"{row.variant}, full ranking" if row.full_ranking else row.variant,
        "shuffled": fmt(shuffled.get(metric)) if shuffled else "n/a (no CRM input)",
        "shuffled_value": shuffled.get(metric, {}).get("value") if shuffled else None,
        "loss": fmt(test.get(loss)),
        "loss_shuffled": fmt(shuffled.get(loss)) if shuffled else "-",
        "precision": metrics.get("precision", ""),
    }


COLUMNS = (
    ("row", "row"),
    ("samples", "samples"),
    ("steps", "steps"),
    ("minutes", "train min"),
    ("metric", "metric"),
    ("result", "result [95% CI]"),
    ("shuffled", "shuffled CRM"),
    ("loss", "loss (NLL/token, LogLoss; MRR)"),
    ("loss_shuffled", "loss, shuffled CRM"),
    ("sasrec", "SASRec"),
    ("popular", "most popular"),
    ("chance", "chance"),
)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[key]) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Each row's metric (bar) beside its shuffled-CRM value (hatched) and chance (line), one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["panel"] for r in rows))
    fig, axes = plt.subplots(
        1, len(variants), figsize=(4 + 2.2 * len(rows) / max(len(variants), 1), 4), squeeze=False
    )
    for ax, variant in zip(axes[0], variants, strict=True):
        mine = [r for r in rows if r["panel"] == variant]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["value"] or 0 for r in mine], 0.4, label="trained")
        ax.bar(
            [x + 0.2 for x in xs],
            [r["shuffled_value"] or 0 for r in mine],
            0.4,
            hatch="//",
            label="shuffled CRM",
        )
        ax.axhline(mine[0]["chance"], color="grey", linestyle="--", label="chance")
        ax.set_xticks(list(xs), [r["row"].split("/", 1)[1] for r in mine], rotation=40, ha="right")
        ax.set_title(f"{variant} ({mine[0]['metric']})")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def write(rows: list[dict[str, Any]], prefix: Path) -> None:
    from recadapt.io import write_text_atomic

    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(prefix.with_suffix(".md"), markdown(rows))
    with open(prefix.with_suffix(".csv.tmp"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(prefix.with_suffix(".csv.tmp"), prefix.with_suffix(".csv"))
    plot(rows, prefix.with_suffix(".png"))


def merged(prefix: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``PREFIX.csv`` with each of ``rows`` replacing the one of the same key (in its place) or
    appended: a table built up across machines, whose run directories are not all here."""
    path = prefix.with_suffix(".csv")
    if not path.exists():
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
    for entry in kept:  # the CSV holds text; the plot needs the numbers back
        for key in ("value", "shuffled_value", "chance"):
            entry[key] = float(entry[key]) if entry.get(key) else None
    fresh = {r["row"]: r for r in rows}
    out = [fresh.pop(entry["row"], entry) for entry in kept]
    return out + list(fresh.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "learnability")
    parser.add_argument(
        "--rows", nargs="+", default=["*"], help="row keys or globs (variant/label); see --list"
    )
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--doc", type=Path, help="also write the table, CSV and plot to this prefix")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --doc: keep the rows already in PREFIX.csv (trained elsewhere), replacing those re-run here",
    )
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--table-only", action="store_true", help="tabulate the rows already trained")
    args = parser.parse_args()
    chosen = [r for r in ROWS if any(fnmatch.fnmatchcase(r.key, pattern) for pattern in args.rows)]
    if args.list or not chosen:
        for r in ROWS:
            print(f"{r.key:42s} {r.method:8s} {r.protocol:13s} {' '.join(r.overrides)}")
        if not chosen:
            raise SystemExit(f"no row matches {args.rows}")
        return
    args.out = args.out.resolve()
    results = []
    if args.table_only:
        chosen = [r for row in chosen for r in row.trained_budgets(args.out)]
    else:
        chosen = [r.with_budget(args.samples, args.steps) for r in chosen]
    for row in chosen:
        train_row(args.out, row)
        results.append(table_row(args.out, row))
        print(
            f"{row.key}: {results[-1]['metric']} {results[-1]['result']}, shuffled {results[-1]['shuffled']}",
            flush=True,
        )
    if not results:
        raise SystemExit("nothing trained yet among the chosen rows")
    print(markdown(results), end="")
    write(results, args.out / "learnability")
    if args.doc:
        write(merged(args.doc, results) if args.merge else results, args.doc)
        print(f"wrote {args.doc}.md, .csv, .png")


if __name__ == "__main__":
    main()
