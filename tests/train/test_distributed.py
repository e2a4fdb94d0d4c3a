"""Several processes, one run: ``recadapt train --processes 2`` (torchrun, CPU gloo) against one process with the
same global batch. The updates must be the ones a single process computes (to float tolerance), every file is
written once, and every test row is scored once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_llm import save_tiny_backbone

from recadapt.train.distributed import shard

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "recbole" / "patterns" / "patterns"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_backbone(root / "backbone")
    return root


def _train(workdir: Path, name: str, processes: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``recadapt train`` in a fresh interpreter (the process group is per process), one thread per process."""
    command = [sys.executable, "-m", "recadapt.cli", "-q", "train", "--processes", str(processes), *args]
    command += [f"data.prepared_dir={workdir / 'prepared'}", f"output_dir={workdir / 'runs'}", f"name={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _log(run_dir: Path, name: str = "log.csv") -> list[dict[str, str]]:
    with (run_dir / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _sasrec_args() -> list[str]:
    """A 16-d SASRec on the fixture."""
    config = str(REPO / "configs" / "sasrec.yaml")
    return [
        "--config",
        config,
        f"--dataset=recbole:{FIXTURE}",
        "--protocol=next-item",
        "model.hidden_size=16",
    ]


def _llm_args(workdir: Path, method: str, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / f"{method}.yaml"),
        f"--dataset=recbole:{FIXTURE}",
        "--protocol=next-item",
        f"llm.backbone={workdir / 'backbone'}",
        "train.n_boot=20",
        "llm.train_samples=30",  # 8 micro-batches of 4 (the last of 2) an epoch
        "llm.batch_size=4",
        "llm.grad_accum=2",
        "llm.epochs=2",
        "llm.lr=1e-2",
        "llm.checkpoint_every=3",
        "llm.log_every=1",
        "llm.eval_modes=[score]",
        "llm.eval_batch_size=12",
        "llm.lora_dropout=0",  # dropout draws differ between one and two processes
        "llm.precision=no",  # fp32: bf16 rounding would depend on how rows are grouped
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["generative", "listwise"])
def test_two_llm_processes_train_the_weights_one_process_trains(workdir: Path, objective: str) -> None:
    args = _llm_args(workdir, "tallrec", f"llm.objective={objective}")
    _train(workdir, f"tallrec-{objective}-1", 1, *args)
    two = _train(workdir, f"tallrec-{objective}-2", 2, *args)
    runs = workdir / "runs"
    a = load_file(str(runs / f"tallrec-{objective}-1" / "final" / "adapter_model.safetensors"))
    b = load_file(str(runs / f"tallrec-{objective}-2" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved < 1e-4, f"2 processes trained other weights (max difference {moved:.2e})"
    first, second = (
        json.loads((runs / f"tallrec-{objective}-{n}" / "metrics.json").read_text()) for n in (1, 2)
    )
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["optimizer_steps"] == second["optimizer_steps"] == 8
    assert first["test_samples"] == second["test_samples"]  # every test row scored, once
    assert first["train_tokens"] == second["train_tokens"]
    assert second["test"]["AnswerNLL"]["value"] == pytest.approx(
        first["test"]["AnswerNLL"]["value"], rel=1e-4
    )
    log_one, log_two = _log(runs / f"tallrec-{objective}-1"), _log(runs / f"tallrec-{objective}-2")
    assert [r["step"] for r in log_two] == [str(s) for s in range(1, 9)]  # one writer: no repeated rows
    for r1, r2 in zip(log_one, log_two, strict=True):
        assert float(r2["train/loss"]) == pytest.approx(float(r1["train/loss"]), rel=1e-4)
    assert two.stdout.count("optimizer steps") == 1, "only rank 0 prints the summary"


@pytest.mark.slow
def test_two_crm_processes_train_the_model_one_process_trains(workdir: Path) -> None:
    args = [
        *_sasrec_args(),
        "model.dropout=0",
        "train.epochs=3",
        "train.n_boot=20",
        "train.batch_size=7",  # shares of 4 and 3 rows
    ]
    _train(workdir, "sasrec-1", 1, *args)
    _train(workdir, "sasrec-2", 2, *args)
    runs = workdir / "runs"
    (file_one,), (file_two,) = ((runs / f"sasrec-{n}" / "best").glob("*.safetensors") for n in (1, 2))
    a, b = load_file(str(file_one)), load_file(str(file_two))
    for key in a:
        tensor_a, tensor_b = a[key], b[key]
        if key.endswith("self_attn.in_proj_bias"):
            # the key bias (middle third) has an exactly zero gradient (softmax ignores a per-query constant):
            # Adam divides float noise by its tiny running scale there, so only the query and value parts compare
            third = len(tensor_a) // 3
            keep = torch.cat([torch.arange(third), torch.arange(2 * third, 3 * third)])
            tensor_a, tensor_b = tensor_a[keep], tensor_b[keep]
        torch.testing.assert_close(tensor_b, tensor_a, rtol=0, atol=1e-4, msg=key)
    for r1, r2 in zip(_log(runs / "sasrec-1"), _log(runs / "sasrec-2"), strict=True):
        assert float(r2["train/loss"]) == pytest.approx(float(r1["train/loss"]), rel=1e-5)
        assert r2["valid/NDCG@10"] == r1["valid/NDCG@10"]
    first, second = (json.loads((runs / f"sasrec-{n}" / "metrics.json").read_text()) for n in (1, 2))
    assert (first["processes"], second["processes"]) == (1, 2)
    assert second["test"] == first["test"]


def test_shares_cover_a_batch_once_in_order() -> None:
    batch = np.arange(7)
    for world in (1, 2, 3, 8):
        parts = [shard(batch, rank, world) for rank in range(world)]
        assert np.array_equal(np.concatenate(parts), batch)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_resuming_with_another_process_count_is_refused(workdir: Path) -> None:
    args = _llm_args(workdir, "tallrec", "llm.epochs=1")
    _train(workdir, "resume-count", 1, *args)
    run_dir = workdir / "runs" / "resume-count"
    (run_dir / "metrics.json").unlink()  # as if killed after training, before the report
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps({**state, "num_processes": 2}))
    command = [sys.executable, "-m", "recadapt.cli", "train", *args]
    command += [
        f"data.prepared_dir={workdir / 'prepared'}",
        f"output_dir={workdir / 'runs'}",
        "name=resume-count",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "written by 2 processes, this run has 1" in done.stderr


def test_fsdp_shards_the_frozen_layers_and_leaves_the_adapters_whole(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "tests" / "fsdp_probe.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["layers"] == 2  # the tiny Llama's two decoder layers
    for name, numel in ranks[0]["full"].items():
        held = [r["held"][name] for r in ranks]
        if "lora_" in name:  # trainable: whole in every process
            assert held == [numel, numel] and ranks[0]["kinds"][name] == "Parameter", name
        elif ".layers." in name:  # frozen decoder weights: split, each row in one process
            assert sum(held) == numel and max(held) < numel and ranks[0]["kinds"][name] == "DTensor", name
        else:  # embeddings, final norm, output layer: outside the layers, whole
            assert held == [numel, numel], name


@pytest.mark.slow
def test_llara_with_fsdp_on_two_processes_trains_what_one_process_trains(workdir: Path) -> None:
    _train(workdir, "crm-for-llara", 1, *_sasrec_args(), "train.epochs=1", "train.n_boot=10")
    hybrid = [f"llm.crm_run={workdir / 'runs' / 'crm-for-llara'}", "llm.curriculum=hybrid"]
    args = _llm_args(workdir, "llara", *hybrid, "llm.objective=listwise", "llm.train_samples=9")
    _train(workdir, "llara-1", 1, *args)
    _train(workdir, "llara-fsdp-2", 2, *args, "llm.fsdp=true")
    for file in ("adapter_model.safetensors", "projector.safetensors"):
        a = load_file(str(workdir / "runs" / "llara-1" / "final" / file))
        b = load_file(str(workdir / "runs" / "llara-fsdp-2" / "final" / file))
        assert a.keys() == b.keys()
        moved = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert moved < 1e-4, f"{file}: FSDP on 2 processes trained other weights ({moved:.2e})"
    first, second = (
        json.loads((workdir / "runs" / run / "metrics.json").read_text())
        for run in ("llara-1", "llara-fsdp-2")
    )
    assert second["processes"] == 2 and second["test_samples"] == first["test_samples"]
    assert second["test"]["AnswerNLL"]["value"] == pytest.approx(
        first["test"]["AnswerNLL"]["value"], rel=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["darec", "laser"])
def test_two_full_ranking_processes_train_what_one_process_trains(workdir: Path, method: str) -> None:
    crm = workdir / "runs" / "sasrec-full"
    if not (crm / "metrics.json").exists():
        full = [*_sasrec_args(), "data.protocol=full-ranking", "model.max_len=10", "train.max_len=10"]
        _train(workdir, "sasrec-full", 1, *full, "train.epochs=1", "train.n_boot=10")
    args = [
        "--config",
        str(REPO / "configs" / f"{method}.yaml"),
        f"--dataset=recbole:{FIXTURE}",
        "--protocol=full-ranking",
        f"llm.backbone={workdir / 'backbone'}",
        f"llm.crm_run={crm}",
        "train.n_boot=20",
        "llm.train_samples=30",
        "llm.batch_size=4",  # the last micro-batch of 2 rows: shares of 1
        "llm.grad_accum=2",
        "llm.epochs=1",
        "llm.lr=1e-2",
        "llm.eval_samples=30",
        "llm.eval_batch_size=16",
        "model.valid_samples=20",
        "llm.lora_dropout=0",  # dropout draws differ between one and two processes
    ]
    if method == "laser":  # also no M-Former dropout, and no Switch balance loss: it is computed per share
        args += ["model.dropout=0", "model.balance_weight=0"]
    _train(workdir, f"{method}-1", 1, *args)
    two = _train(workdir, f"{method}-2", 2, *args)
    runs = workdir / "runs"
    a = load_file(str(runs / f"{method}-1" / "best" / "trainable.safetensors"))
    b = load_file(str(runs / f"{method}-2" / "best" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4, msg=key)
    first, second = (json.loads((runs / f"{method}-{n}" / "metrics.json").read_text()) for n in (1, 2))
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["optimizer_steps"] == second["optimizer_steps"]
    assert first["test_samples"] == second["test_samples"] and first["train_tokens"] == second["train_tokens"]
    for metric, value in first["test"].items():
        assert second["test"][metric]["value"] == pytest.approx(value["value"], abs=1e-6), metric
    assert two.stdout.count("optimizer steps") == 1
