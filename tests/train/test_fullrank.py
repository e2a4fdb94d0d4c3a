"""The full-ranking recipe (Laser, DARec) end to end on the RecBole ``patterns`` fixture with a tiny random Llama and
a one-epoch BERT4Rec: training stages, model selection, metrics, eval, SIGKILL + resume, config errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kill_at_step import KILLER
from safetensors.torch import load_file
from tiny_llm import save_tiny_backbone
from torch import Tensor

from recadapt.cli import main
from recadapt.errors import ConfigError
from recadapt.train.config import load_config
from recadapt.train.fullrank import check_config

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "recbole" / "patterns" / "patterns"
TINY = [
    "train.num_threads=1",
    "train.n_boot=20",
    "llm.train_samples=32",
    "llm.batch_size=4",
    "llm.grad_accum=2",  # 8 micro-batches an epoch -> 4 optimizer steps an epoch
    "llm.lr=1e-2",
    "llm.checkpoint_every=3",  # mid-epoch (step 3) and end-of-epoch (step 4) checkpoints
    "llm.log_every=1",
    "llm.eval_samples=30",
    "llm.eval_batch_size=16",
    "model.valid_samples=20",
]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recadapt.train.crm import train_crm

    root = tmp_path_factory.mktemp("fullrank")
    save_tiny_backbone(root / "backbone")
    for crm in ("bert4rec", "sasrec"):
        config = load_config(
            REPO / "configs" / f"{crm}.yaml",
            [
                f"data.dataset=recbole:{FIXTURE}",
                "data.protocol=full-ranking",
                f"data.prepared_dir={root / 'prepared'}",
                f"output_dir={root / 'runs'}",
                f"name={crm}",
                "model.hidden_size=16",
                "model.max_len=10",
                "train.max_len=10",
                "train.epochs=1",
                "train.n_boot=10",
            ],
        )
        train_crm(config, progress=False)
    return root


def _overrides(workdir: Path, method: str, run: str, *extra: str) -> list[str]:
    crm = "bert4rec" if method == "laser" else "sasrec"
    return [
        f"data.dataset=recbole:{FIXTURE}",
        f"data.prepared_dir={workdir / 'prepared'}",
        f"output_dir={workdir / 'runs'}",
        f"name={run}",
        f"llm.backbone={workdir / 'backbone'}",
        f"llm.crm_run={workdir / 'runs' / crm}",
        *TINY,
        *extra,
    ]


def _args(workdir: Path, method: str, run: str, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(REPO / "configs" / f"{method}.yaml"),
        *_overrides(workdir, method, run, *extra),
    ]


def _config(workdir: Path, method: str, run: str, *extra: str):
    return load_config(REPO / "configs" / f"{method}.yaml", _overrides(workdir, method, run, *extra))


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def _log(run_dir: Path, name: str = "log.csv") -> list[dict[str, str]]:
    with (run_dir / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_laser_trains_two_stages_selects_on_validation_and_reloads(workdir: Path, capsys) -> None:
    assert main(_args(workdir, "laser", "laser")) == 0
    run_dir = workdir / "runs" / "laser"
    metrics = _metrics(run_dir)
    assert metrics["optimizer_steps"] == 12  # (2 + 1) epochs x 4 steps
    assert metrics["test_samples"] == 30 and metrics["train_samples"] == 32
    assert metrics["best"].startswith(("stage 1", "stage 2"))
    for name in ("HR@10", "NDCG@10", "MRR", "HR@50"):
        estimate = metrics["test"][name]
        assert 0 <= estimate["low"] <= estimate["value"] <= estimate["high"] <= 1, name
    assert [int(row["step"]) for row in _log(run_dir, "valid.csv")] == [4, 8, 12]  # one per epoch
    table = load_file(str(run_dir / "best" / "item_table.safetensors"))["table"]
    assert table.shape == (60, 32) and torch.isfinite(table).all()  # every item, tiny hidden size 32
    weights = load_file(str(run_dir / "best" / "trainable.safetensors"))
    assert "suffix" in weights and any(k.startswith("mformer.") for k in weights)
    assert not any(k.startswith(("llm.", "crm.")) for k in weights), "frozen parts are not saved"

    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    reloaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reloaded == metrics["test"]


def test_laser_ablations_switch_parts_off(workdir: Path) -> None:
    assert main(_args(workdir, "laser", "no-prefix", "model.use_prefix=false", "model.stage1_epochs=1")) == 0
    weights = load_file(str(workdir / "runs" / "no-prefix" / "best" / "trainable.safetensors"))
    assert set(weights) == {"suffix"}
    assert main(_args(workdir, "laser", "no-stage1", "model.stage1_epochs=0", "model.stage2_epochs=1")) == 0
    metrics = _metrics(workdir / "runs" / "no-stage1")
    assert metrics["optimizer_steps"] == 4 and metrics["best"].startswith("stage 2")
    assert main(_args(workdir, "laser", "no-moe", "model.use_moe=false", "model.stage1_epochs=1")) == 0
    log_rows = _log(workdir / "runs" / "no-moe")
    assert all(float(r["train/aux_loss"]) == 0.0 for r in log_rows if r.get("train/aux_loss"))


def test_laser_user_embedding_does_not_depend_on_batch_padding(workdir: Path) -> None:
    from recadapt.train.fullrank import build_run

    model, _, _ = build_run(_config(workdir, "laser", "padding"), progress=False)
    model.eval()
    short, long = np.array([3]), np.array([5, 7, 9, 11, 13, 15])
    with torch.no_grad():
        alone, _ = model.user_embeddings([short])
        batched, _ = model.user_embeddings([short, long])
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-4, atol=1e-5)


def test_sigkill_then_resume_matches_an_uninterrupted_run(workdir: Path) -> None:
    interrupted = _args(workdir, "laser", "interrupted")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECADAPT_TEST_KILL_AT_STEP": "7"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *interrupted], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    run_dir = workdir / "runs" / "interrupted"
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    # killed at step 7 of the second stage-1 epoch; its last checkpoint is step 6 (mid-epoch, batch 4 of 8)
    assert (state["stage"], state["epoch"], state["batch"], state["step"]) == (0, 1, 4, 6)
    # a checkpoint from before the run's time was recorded: the resumed run's total is unknown, not understated
    assert state.pop("train_seconds") > 0
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps(state))

    assert main(interrupted) == 0
    assert main(_args(workdir, "laser", "straight")) == 0
    resumed, straight = _metrics(run_dir), _metrics(workdir / "runs" / "straight")
    assert resumed["test"] == straight["test"] and resumed["best"] == straight["best"]
    assert resumed["train_seconds"] is None and straight["train_seconds"] > 0
    resumed_log, straight_log = _log(run_dir), _log(workdir / "runs" / "straight")
    assert [r["train/loss"] for r in resumed_log] == [r["train/loss"] for r in straight_log]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.protocol=next-item", "data.protocol"),
        ("model.n_expert=4", "model.n_expert"),
        ("llm.eval_modes=[score]", "llm.eval_modes"),
        ("model.temperature=0", "model"),
    ],
)
def test_config_errors_name_the_field(workdir: Path, override: str, field: str) -> None:
    from recadapt.train.fullrank import build_run, check_config

    config = _config(workdir, "laser", "bad", override)
    with pytest.raises(ConfigError) as err:
        check_config(config)
        build_run(config, progress=False)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("run", "extra", "present", "absent"),
    [
        (
            "darec",
            [],
            ["injector.", "seq_token", "user_proj.", "item_proj.", "lora_A"],
            ["crm.", "item_cf_proj."],
        ),
        ("darec-itemcf", ["model.item_cf=true"], ["item_cf_proj.", "item_proj."], ["crm."]),
        ("darec-mixed", ["model.adapter_plan=moe-lora:4,bottleneck:8"], ["conditioner", "lora_A"], []),
        (
            "darec-nocf",
            ["model.cf_injection=false", "model.context_masking=false"],
            ["seq_token"],
            ["injector."],
        ),
        ("darec-frozen", ["model.adapter_plan=none"], ["injector."], ["lora_A"]),
    ],
)
def test_darec_trains_with_its_parts_switched(
    workdir: Path, run: str, extra: list[str], present: list[str], absent: list[str]
) -> None:
    assert main(_args(workdir, "darec", run, "llm.epochs=1", *extra)) == 0
    metrics = _metrics(workdir / "runs" / run)
    assert metrics["optimizer_steps"] == 4
    assert 0 <= metrics["test"]["NDCG@10"]["value"] <= 1
    keys = set(load_file(str(workdir / "runs" / run / "best" / "trainable.safetensors")))
    for prefix in present:
        assert any(prefix in k for k in keys), (prefix, sorted(keys)[:10])
    for prefix in absent:
        assert not any(prefix in k for k in keys), prefix


def test_darec_item_side_reads_the_crm_at_the_text_vectors_scale(workdir: Path) -> None:
    """With ``model.item_cf`` the CRM table enters standardised to the text vectors' per-feature RMS: the table does
    not depend on the CRM's embedding scale, and the collaborative part starts as large as the text part (raw, the
    text vectors swamped it and the table could not tell synth-cf's genres apart)."""
    from recadapt.train.fullrank import build_run

    model, _, _ = build_run(_config(workdir, "darec", "darec-balance", "model.item_cf=true"), progress=False)
    seen: list[Tensor] = []
    model.item_cf_proj.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        table = model.item_table()
        model.crm.item_embedding.weight.mul_(100.0)
        model._balance_item_sources(model.crm)
        rescaled = model.item_table()
    torch.testing.assert_close(rescaled, table, rtol=1e-4, atol=1e-5)
    text_rms = model.item_text.pow(2).mean().sqrt()
    torch.testing.assert_close(seen[0].mean(0), torch.zeros_like(seen[0][0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(seen[0].std(0), text_rms.expand(seen[0].size(1)), rtol=1e-4, atol=1e-6)


def test_darec_plan_is_validated() -> None:
    from recadapt.methods.darec import parse_plan

    assert parse_plan("lora:8", 3) == [("lora", 8)] * 3
    assert parse_plan("none, moe-lora:4", 2) == [None, ("moe-lora", 4)]
    for bad in ("lora", "lora:0", "dora:8", ""):
        with pytest.raises(ValueError, match="adapter_plan"):
            parse_plan(bad, 2)
    with pytest.raises(ValueError, match="3 entries"):
        parse_plan("lora:4,none,lora:8", 2)


def test_adapter_search_resumes_an_interrupted_study(workdir: Path) -> None:
    import time

    import optuna

    from recadapt.train.search import open_study

    overrides = _overrides(
        workdir,
        "darec",
        "study",
        "model.search_train_samples=8",  # 2 micro-batches -> 1 optimizer step per trial
        "model.search_valid_samples=10",
        "model.search_groups=2",
        "model.search_heartbeat=1",
    )
    search = ["search", "--config", str(REPO / "configs" / "darec.yaml"), "--no-final"]
    # the first trial's process dies mid-training: its trial stays RUNNING, with a heartbeat that stops
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECADAPT_TEST_KILL_AT_STEP": "1"}
    argv = [*search, "--trials", "2", *overrides]
    killed = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    config = load_config(REPO / "configs" / "darec.yaml", overrides)
    (dead,) = open_study(config).trials
    assert dead.state == optuna.trial.TrialState.RUNNING
    time.sleep(2.5)  # past the grace period (2 heartbeats)

    assert main(argv) == 0  # the dead trial is failed and retried with the same plan
    trials = open_study(config).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    complete = [(t.number, t.params, t.value) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert dead.params and len(complete) == 2
    assert any(params == dead.params for _, params, _ in complete), "the dead trial's plan was retried"
    run_dir = workdir / "runs" / "study"
    stamps = {d: (d / "metrics.json").stat().st_mtime_ns for d in (run_dir / "trials").iterdir()}

    assert main([*search, "--trials", "3", *overrides]) == 0  # resumed: one more trial, earlier ones kept
    trials = open_study(config).trials
    again = [(t.number, t.params, t.value) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert again[:2] == complete and len(again) == 3
    for directory, stamp in stamps.items():  # earlier trials were not trained again
        assert (directory / "metrics.json").stat().st_mtime_ns == stamp
    history = (run_dir / "search_history.csv").read_text().splitlines()
    assert len(history) == 4 and (run_dir / "search_history.png").exists()
    best = max(again, key=lambda c: c[2])
    assert (run_dir / "best_plan.txt").read_text().strip() == trials[best[0]].user_attrs["plan"]


@pytest.mark.parametrize("method", ["laser", "darec"])
def test_the_shuffled_crm_probe_reaches_the_full_ranking_methods(
    workdir: Path, monkeypatch, capsys, method: str
) -> None:
    """``recadapt eval RUN --shuffle-crm`` on Laser (M-Former over BERT4Rec states, item table recomputed) and
    DARec (injected SASRec slots): the user embeddings move, and an evaluation without it reproduces the run.
    Whether a trained method ranks *worse* is what the learnability suite measures."""
    import recadapt.train.fullrank as fullrank

    recorded: list[np.ndarray] = []
    rank_part = fullrank.rank_part

    def recording(model, part, table, max_len, batch_size, n_boot, **kwargs):
        from recadapt.tasks.fullrank import history_arrays

        model.eval()
        with torch.no_grad():
            users, _ = model.user_embeddings(history_arrays(part["history"], max_len)[:batch_size])
            recorded.append(users.float().numpy())  # the user side alone: Laser's table is recomputed
        return rank_part(model, part, table, max_len, batch_size, n_boot, **kwargs)

    run = f"{method}-probe"
    short = ("model.stage1_epochs=1",) if method == "laser" else ("llm.epochs=1",)
    assert main(_args(workdir, method, run, *short)) == 0
    monkeypatch.setattr(fullrank, "rank_part", recording)
    reports = {}
    for flags in ((), ("--shuffle-crm",)):
        capsys.readouterr()
        assert main(["eval", str(workdir / "runs" / run), "--json", *flags]) == 0
        reports[flags] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reports[()] == _metrics(workdir / "runs" / run)["test"]
    plain, shuffled = recorded
    assert plain.shape == shuffled.shape and not np.allclose(plain, shuffled, atol=1e-3)


def test_laser_ranks_only_the_sampled_candidates_under_sampled_ranking(workdir: Path, capsys) -> None:
    """A catalogue model scores every item; under sampled-ranking only the persisted candidates are ranked, so
    with 10 candidates HR@10 is 1 and the list's metrics stop at K = 20."""
    overrides = ("data.protocol=sampled-ranking", "data.n_negatives=9")
    assert main(_args(workdir, "laser", "laser-sampled", *overrides)) == 0
    run_dir = workdir / "runs" / "laser-sampled"
    metrics = _metrics(run_dir)
    assert metrics["protocol"] == "sampled-ranking"
    assert set(metrics["test"]) == {"MRR", *(f"{m}@{k}" for m in ("HR", "NDCG") for k in (1, 5, 10, 20))}
    assert metrics["test"]["HR@10"]["value"] == 1.0 and metrics["test"]["HR@1"]["value"] < 1.0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics["test"]
    with pytest.raises(ConfigError, match="full-ranking or sampled-ranking, not next-item"):
        check_config(_config(workdir, "laser", "laser-next", "data.protocol=next-item"))
