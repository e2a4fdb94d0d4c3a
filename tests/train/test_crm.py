"""End-to-end CRM training through the CLI on the committed RecBole ``patterns`` fixture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recadapt.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "recbole" / "patterns" / "patterns"
TINY_SASREC = ["model.name=sasrec", "model.hidden_size=16", "model.max_len=10", "train.max_len=10"]


def _args(tmp_path: Path, protocol: str, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(Path(__file__).resolve().parents[2] / "configs" / "sasrec.yaml"),
        f"--dataset=recbole:{FIXTURE}",
        f"--protocol={protocol}",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"output_dir={tmp_path / 'runs'}",
        "train.n_boot=100",
        "train.batch_size=64",
        *TINY_SASREC,
        *extra,
    ]


@pytest.mark.parametrize(
    ("protocol", "metric", "chance"),
    [
        ("next-item", "HR@1", 1 / 20),
        ("full-ranking", "HR@10", 10 / 60),
        ("ctr", "AUC", 0.5),
        ("sampled-ranking", "HR@1", 1 / 20),
    ],
)
def test_train_and_eval_beat_chance(tmp_path: Path, capsys, protocol: str, metric: str, chance: float):
    assert main(_args(tmp_path, protocol, "train.epochs=15", "train.patience=0", "train.lr=5e-3")) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    estimate = metrics["test"][metric]
    assert estimate["low"] <= estimate["value"] <= estimate["high"]
    assert estimate["value"] > chance + 0.1, f"{protocol}: {metric} {estimate} is not above chance {chance}"
    for name in (
        "config.yaml",
        "log.csv",
        "best/model.safetensors",
        "best/config.json",
        "checkpoint/state.json",
    ):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events"
    # `recadapt eval RUN_DIR` reproduces the recorded test metric from the saved best model
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--n-boot", "100", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed[metric]["value"] == pytest.approx(estimate["value"])
    # --samples N: the fixed subset an LLM run with llm.eval_samples=N is scored on, the same on every call
    subsets = []
    for _ in range(2):
        assert main(["eval", str(run_dir), "--n-boot", "20", "--samples", "7", "--json"]) == 0
        subsets.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])[metric]["value"])
    assert subsets[0] == subsets[1]
    # sampled-ranking: the same model on popularity-sampled candidates, a split of its own beside the uniform one
    if protocol == "sampled-ranking":
        assert main(["eval", str(run_dir), "--n-boot", "20", "--negatives", "popularity", "--json"]) == 0
        popular = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert set(popular) == set(metrics["test"]) and popular["HR@20"]["value"] == 1.0
        assert any(popular[k]["value"] != metrics["test"][k]["value"] for k in popular)  # other candidates
        assert {p.name for p in (tmp_path / "prepared").glob("*/sampled-ranking*")} == {
            "sampled-ranking",
            "sampled-ranking__negatives-popularity",
        }
    else:
        assert main(["eval", str(run_dir), "--negatives", "popularity"]) != 0
        assert "apply to sampled-ranking runs" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(tmp_path: Path, capsys):
    assert main(_args(tmp_path, "next-item", "train.epochs=many")) == 2
    assert "train.epochs" in capsys.readouterr().err


def _wait_for_epoch(state: Path, epoch: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state.exists():
            try:
                if json.loads(state.read_text())["epoch"] >= epoch:
                    return
            except (json.JSONDecodeError, KeyError):
                pass  # the file is replaced atomically, but be tolerant of a racing read
        assert process.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path):
    common = _args(tmp_path, "next-item", "train.epochs=25", "train.patience=0", "train.lr=5e-3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "recadapt.cli", *common, "name=interrupted"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "interrupted"
    _wait_for_epoch(run_dir / "checkpoint" / "state.json", 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["epoch"] < 25 and state["train_seconds"] > 0
    # the run's training time goes on from the checkpoint's (set to 1000 s, so the sum is recognisable)
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps({**state, "train_seconds": 1000.0}))

    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0  # resumes from the checkpoint
    assert main([*common, "name=straight"]) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    straight = json.loads((tmp_path / "runs" / "straight" / "metrics.json").read_text())
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["test"] == straight["test"]
    assert 1000.0 < resumed["train_seconds"] <= 1000.0 + resumed["train_seconds_this_process"]
    with (run_dir / "log.csv").open() as handle:
        epochs = [int(line.split(",")[0]) for line in handle.readlines()[1:]]
    assert epochs == list(range(1, 26)), "the resumed log must continue, not repeat, epochs"


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path, capsys, monkeypatch):
    import torch

    from recadapt.cf.sasrec import SASRec

    monkeypatch.setattr(SASRec, "loss", lambda self, batch: torch.tensor(float("nan"), requires_grad=True))
    assert main(_args(tmp_path, "next-item", "train.epochs=2")) == 2
    err = capsys.readouterr().err
    assert "loss is nan at epoch 1, step 0" in err and "train.lr" in err


def _log_epochs(run_dir: Path) -> list[int]:
    with (run_dir / "log.csv").open() as handle:
        return [int(line.split(",")[0]) for line in handle.readlines()[1:]]


@pytest.mark.parametrize("where", ["write", "rename"])
def test_sigkill_while_writing_a_checkpoint_resumes_to_identical_metrics(tmp_path: Path, where: str):
    """Killed inside the third checkpoint write (after epoch 3's log row), either while its files are written
    or between the two renames that replace the old checkpoint where no atomic exchange exists: the same command
    restores the last complete checkpoint (epoch 2), drops the half-written folders and the log row of the lost
    epoch, and ends with the metrics of an uninterrupted run."""
    from kill_in_checkpoint import KILL_IN_CHECKPOINT

    common = _args(tmp_path, "next-item", "train.epochs=5", "train.patience=0", "train.lr=5e-3")
    env = {
        **os.environ,
        "RECADAPT_TEST_KILL_IN": where,
        "RECADAPT_TEST_KILL_NTH": "3" if where == "write" else "2",
    }
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_CHECKPOINT, *common, "name=interrupted"], env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    run_dir = tmp_path / "runs" / "interrupted"
    assert _log_epochs(run_dir) == [1, 2, 3]
    leftovers = sorted(p.name.split("-")[0] for p in run_dir.glob(".checkpoint.*"))
    if where == "write":
        assert leftovers == [".checkpoint.tmp"]
        assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["epoch"] == 2
    else:
        assert leftovers == [".checkpoint.old", ".checkpoint.tmp"] or leftovers == [".checkpoint.old"]
        assert not (run_dir / "checkpoint").exists(), "the kill fell where neither checkpoint is in place"

    assert main([*common, "name=interrupted"]) == 0
    assert main([*common, "name=straight"]) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    straight = json.loads((tmp_path / "runs" / "straight" / "metrics.json").read_text())
    assert resumed["test"] == straight["test"] and resumed["best_epoch"] == straight["best_epoch"]
    assert _log_epochs(run_dir) == [1, 2, 3, 4, 5], "the lost epoch's row is dropped, not repeated"
    assert not list(run_dir.glob(".*.tmp-*")) and not list(run_dir.glob(".*.old-*"))


def test_resuming_under_a_changed_config_is_refused_and_leaves_the_run_alone(tmp_path: Path, capsys):
    common = _args(tmp_path, "next-item", "train.patience=0", "name=run")
    assert main([*common, "train.epochs=2"]) == 0
    run_dir = tmp_path / "runs" / "run"
    config, metrics = (run_dir / "config.yaml").read_bytes(), (run_dir / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main([*common, "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "different training config" in err and "--restart" in err
    assert (run_dir / "config.yaml").read_bytes() == config, "a refused run must not rewrite config.yaml"
    assert (run_dir / "metrics.json").read_bytes() == metrics
    # settings that do not shape training are no reason to refuse; a new n_boot re-evaluates the test part
    assert main([*common, "train.epochs=2", "train.n_boot=20", "train.num_threads=1"]) == 0
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["evaluation"] == {"n_boot": 20} and again["epochs_run"] == 2
    # --restart starts over under the new config
    assert main([*common, "train.epochs=3", "--restart"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 3
    assert _log_epochs(run_dir) == [1, 2, 3]


def test_a_damaged_checkpoint_is_a_one_line_error_with_the_restart_hint(tmp_path: Path, capsys):
    common = _args(tmp_path, "next-item", "train.patience=0", "name=run")
    assert main([*common, "train.epochs=2"]) == 0
    run_dir = tmp_path / "runs" / "run"
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps({**state, "finished": False, "epoch": 1}))
    (run_dir / "checkpoint" / "optimizer.pt").write_bytes(os.urandom(4096))
    capsys.readouterr()
    assert main([*common, "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert (
        f"{run_dir / 'checkpoint'}: cannot resume from this checkpoint (optimizer.pt is not a tensor file"
        in err[0]
        and "--restart" in err[0]
    )
    assert main([*common, "train.epochs=2", "--restart"]) == 0


def test_an_undefined_validation_metric_still_keeps_a_best_model():
    """``NaN > best`` is always false: before, a run whose validation AUC was undefined never saved ``best/``
    and failed when testing it."""
    from recadapt.train.crm import TrainerState, improves

    nan = float("nan")
    assert improves(nan, TrainerState())  # the first epoch is kept whatever its value
    assert improves(0.6, TrainerState(best_value=nan, best_epoch=1))  # a defined value beats an undefined one
    assert not improves(nan, TrainerState(best_value=0.6, best_epoch=1))
    assert not improves(0.5, TrainerState(best_value=0.6, best_epoch=1))
    assert improves(0.7, TrainerState(best_value=0.6, best_epoch=1))
