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

from recadapt.cli import main
from recadapt.errors import ConfigError
from recadapt.train.config import load_config

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

    assert main(interrupted) == 0
    assert main(_args(workdir, "laser", "straight")) == 0
    resumed, straight = _metrics(run_dir), _metrics(workdir / "runs" / "straight")
    assert resumed["test"] == straight["test"] and resumed["best"] == straight["best"]
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
