"""The LLM training recipe end to end on the committed RecBole ``patterns`` fixture with a tiny random Llama saved
as a local model folder (offline): training, checkpoints, SIGKILL + resume, LLaRA's injection, NaN stop."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

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
from score_spy import record_raw_scores
from tiny_llm import byte_tokenizer, save_tiny_backbone, tiny_llama

from recadapt.cli import main
from recadapt.errors import ConfigError
from recadapt.train.config import LLMConfig, load_config

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "recbole" / "patterns" / "patterns"
TINY_RUN = [
    "train.num_threads=1",
    "train.n_boot=50",
    "llm.train_samples=32",
    "llm.batch_size=4",
    "llm.grad_accum=2",  # 8 micro-batches an epoch -> 4 optimizer steps an epoch
    "llm.epochs=2",
    "llm.lr=1e-2",
    "llm.checkpoint_every=3",  # the first checkpoint falls mid-epoch (step 3 of 4)
    "llm.log_every=1",
    "llm.eval_modes=[constrained,score]",
    "llm.eval_batch_size=12",
]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny backbone folder and a prepared-split folder shared by the module's runs."""
    root = tmp_path_factory.mktemp("llm")
    save_tiny_backbone(root / "backbone")
    return root


def _args(workdir: Path, method: str, run: str, *extra: str, protocol: str = "next-item") -> list[str]:
    return [
        "train",
        "--config",
        str(REPO / "configs" / f"{method}.yaml"),
        f"--dataset=recbole:{FIXTURE}",
        f"--protocol={protocol}",
        f"data.prepared_dir={workdir / 'prepared'}",
        f"output_dir={workdir / 'runs'}",
        f"name={run}",
        f"llm.backbone={workdir / 'backbone'}",
        *TINY_RUN,
        *extra,
    ]


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def _log(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _train_tiny_crm(workdir: Path, name: str, *overrides: str, model: str = "sasrec") -> Path:
    """A one-epoch 16-d SASRec (or ``model``) on the fixture (the CRM LLaRA, iLoRA, RecLoRA and ReLLaX read);
    its run dir."""
    from recadapt.train.crm import train_crm

    config = load_config(
        REPO / "configs" / f"{model}.yaml",
        [
            f"data.dataset=recbole:{FIXTURE}",
            f"data.prepared_dir={workdir / 'prepared'}",
            f"output_dir={workdir / 'runs'}",
            f"name={name}",
            "model.hidden_size=16",
            "train.epochs=1",
            "train.n_boot=10",
            *overrides,
        ],
    )
    train_crm(config, progress=False)
    return workdir / "runs" / name


def test_tallrec_trains_and_writes_metrics_checkpoints_and_logs(workdir: Path, capsys) -> None:
    assert main(_args(workdir, "tallrec", "tallrec", "llm.eval_modes=[constrained,score,generate]")) == 0
    run_dir = workdir / "runs" / "tallrec"
    metrics = _metrics(run_dir)
    assert (
        metrics["model"] == "tallrec" and metrics["optimizer_steps"] == 8 and metrics["train_samples"] == 32
    )
    assert metrics["ranking_mode"] == "constrained" and metrics["test_samples"] == 12
    assert set(metrics["test_by_mode"]) == {"constrained", "score", "generate"}
    assert metrics["test"] == metrics["test_by_mode"]["constrained"]
    for mode, report in metrics["test_by_mode"].items():
        # a mode that names one candidate defines HitRatio@1 only; score ranks all 20
        expected = {"HR@1", "ValidRatio"} if mode != "score" else {"HR@1", "NDCG@10", "MRR", "ValidRatio"}
        assert expected <= set(report), mode
        if mode != "score":
            assert set(report) == {"HR@1", "ValidRatio"}, mode
        for name in expected:
            estimate = report[name]
            assert estimate["low"] <= estimate["value"] <= estimate["high"], (mode, name)
    assert metrics["test_by_mode"]["score"]["ValidRatio"]["value"] == 1.0
    assert (
        metrics["test_by_mode"]["generate"]["HR@1"]["value"]
        <= metrics["test_by_mode"]["generate"]["ValidRatio"]["value"]
    )

    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["finished"] and state["step"] == 8
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
    ):
        assert (run_dir / "checkpoint" / name).is_file(), name
    adapter = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k), "LoRA B never trained"
    assert [int(row["step"]) for row in _log(run_dir)] == list(range(1, 9))
    assert {"train/loss", "train/lr", "train/tokens_per_second"} <= set(_log(run_dir)[0])
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events"
    printed = capsys.readouterr().out
    assert "8 optimizer steps, ranking mode constrained" in printed and "test HR@1" in printed

    # a finished run returns its metrics without training again; new evaluation settings only re-evaluate
    assert main(_args(workdir, "tallrec", "tallrec", "llm.eval_modes=[constrained,score,generate]")) == 0
    assert _metrics(run_dir) == metrics
    assert main(_args(workdir, "tallrec", "tallrec", "llm.eval_modes=[score]")) == 0
    again = _metrics(run_dir)
    assert again["ranking_mode"] == "score" and again["optimizer_steps"] == 8
    assert again["test"] == metrics["test_by_mode"]["score"]  # the same trained weights
    assert [int(row["step"]) for row in _log(run_dir)] == list(range(1, 9))

    # a training-relevant change is refused, and the refusal leaves the finished run's config.yaml alone
    saved = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert main(_args(workdir, "tallrec", "tallrec", "llm.lora_r=4")) != 0
    assert "different training config" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == saved


def _eval_json(run_dir: Path, capsys, *options: str) -> dict[str, Any]:
    """``recadapt eval RUN_DIR OPTIONS --json``: the JSON line it prints."""
    capsys.readouterr()
    assert main(["eval", str(run_dir), *options, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_reloads_a_trained_run_and_reproduces_its_metrics(workdir: Path, capsys) -> None:
    """The saved adapter alone (a fresh process state: backbone loaded again, LoRA rebuilt) gives the metrics
    training wrote, in any mode asked for."""
    run_dir = workdir / "runs" / "tallrec-eval"
    assert main(_args(workdir, "tallrec", "tallrec-eval", "llm.eval_modes=[constrained,score]")) == 0
    written = _metrics(run_dir)["test_by_mode"]
    assert _eval_json(run_dir, capsys, "--mode", "constrained") == {"constrained": written["constrained"]}
    assert _eval_json(run_dir, capsys) == written  # the run's own modes by default
    generate = _eval_json(run_dir, capsys, "--mode", "generate")["generate"]
    assert set(generate) == {"HR@1", "ValidRatio"}
    assert generate["HR@1"]["value"] <= generate["ValidRatio"]["value"]
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--mode", "score"]) == 0
    assert "test score HR@1" in capsys.readouterr().out
    # without the adapter there is nothing to evaluate, and the message says so
    (run_dir / "final" / "adapter_model.safetensors").unlink()
    assert main(["eval", str(run_dir), "--mode", "score"]) == 2
    printed = capsys.readouterr().err
    assert "no trained adapter" in printed and "adapter_model.safetensors" in printed


def test_answer_only_loss_equals_the_models_labels_loss(workdir: Path) -> None:
    """The loss computed from the answer positions alone is the model's full ``labels`` loss, gradients too."""
    from recadapt.llm.backbone import load_backbone
    from recadapt.llm.encoding import ItemTokenizer
    from recadapt.llm.prompts import Prompt
    from recadapt.train.llm_loop import forward_loss as _forward_loss

    backbone = load_backbone(str(workdir / "backbone"))
    model = backbone.model.train()
    encoder = ItemTokenizer(backbone.tokenizer, model=model)
    prompts = [Prompt(text="a short prompt"), Prompt(text="a rather longer prompt than the first one")]
    batch = encoder.encode(prompts, ["yes", "the answer"])
    ours = _forward_loss(model, batch, None)
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    reference = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
    ).loss
    reference.backward()
    torch.testing.assert_close(ours, reference)
    for ours_grad, p in zip(grads, (p for p in model.parameters() if p.grad is not None), strict=True):
        torch.testing.assert_close(ours_grad, p.grad, rtol=1e-4, atol=1e-6)


def test_loss_decreases_on_a_repeated_tiny_batch(workdir: Path) -> None:
    extra = ["llm.train_samples=4", "llm.grad_accum=1", "llm.epochs=12", "llm.warmup_ratio=0", "llm.lr=3e-2"]
    assert main(_args(workdir, "tallrec", "repeat", *extra, "llm.eval_modes=[score]")) == 0
    losses = [float(row["train/loss"]) for row in _log(workdir / "runs" / "repeat")]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_sigkill_then_resume_matches_an_uninterrupted_run(workdir: Path) -> None:
    interrupted = _args(workdir, "tallrec", "interrupted", "llm.lora_dropout=0.3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECADAPT_TEST_KILL_AT_STEP": "5"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *interrupted], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    run_dir = workdir / "runs" / "interrupted"
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    # killed at step 5; the last checkpoint is step 3, mid-way through the first epoch
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["finished"]) == (3, 0, 6, False)
    assert [int(row["step"]) for row in _log(run_dir)] == [1, 2, 3, 4]
    assert state["train_seconds"] > 0
    # the run's training time goes on from the checkpoint's (set to 1000 s here, so the sum is recognisable)
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps({**state, "train_seconds": 1000.0}))

    assert main(interrupted) == 0  # same command: resumes at the checkpoint's batch
    assert main(_args(workdir, "tallrec", "straight", "llm.lora_dropout=0.3")) == 0
    straight_dir = workdir / "runs" / "straight"
    resumed, straight = _metrics(run_dir), _metrics(straight_dir)
    assert resumed["optimizer_steps"] == straight["optimizer_steps"] == 8
    assert 1000.0 < resumed["train_seconds"] <= 1000.0 + resumed["train_seconds_this_process"]
    assert 0 < straight["train_seconds"] <= straight["train_seconds_this_process"]
    assert resumed["test"] == straight["test"]
    assert resumed["test_by_mode"] == straight["test_by_mode"]
    resumed_log, straight_log = _log(run_dir), _log(straight_dir)
    assert [int(row["step"]) for row in resumed_log] == list(range(1, 9)), "the log must continue, not repeat"
    assert [row["train/loss"] for row in resumed_log] == [row["train/loss"] for row in straight_log]
    a = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    b = load_file(str(straight_dir / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_training(workdir: Path) -> None:
    extra = ("llm.lora_dropout=0.3", "llm.eval_modes=[score]")
    assert main(_args(workdir, "tallrec", "plain-grad", *extra)) == 0
    assert main(_args(workdir, "tallrec", "ckpt-grad", *extra, "llm.gradient_checkpointing=true")) == 0
    plain_dir, ckpt_dir = workdir / "runs" / "plain-grad", workdir / "runs" / "ckpt-grad"
    plain_losses = [float(row["train/loss"]) for row in _log(plain_dir)]
    ckpt_losses = [float(row["train/loss"]) for row in _log(ckpt_dir)]
    assert len(plain_losses) == 8
    # the recomputation replays the dropout masks (RNG state restored), so only float reassociation may differ
    np.testing.assert_allclose(ckpt_losses, plain_losses, rtol=1e-5)
    a = load_file(str(plain_dir / "final" / "adapter_model.safetensors"))
    b = load_file(str(ckpt_dir / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    from recadapt.train.llm import _check_config

    config = load_config(
        REPO / "configs" / "ilora.yaml", ["llm.gradient_checkpointing=true", "llm.crm_run=x"]
    )
    with pytest.raises(ConfigError, match="llm.gradient_checkpointing' adapter moe-lora does not support it"):
        _check_config(config, config.llm)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_each_layer_in_the_backward(checkpointing: bool) -> None:
    from recadapt.adapters.build import enable_gradient_checkpointing, with_lora

    model = with_lora(tiny_llama(64), LLMConfig())
    if checkpointing:
        enable_gradient_checkpointing(model)
    calls = []
    # a module inside the layer, hooked on entry: the recomputation runs the layer's body again (not its hooked
    # __call__) and stops as soon as it has what the backward needs, possibly before the module returns
    model.get_base_model().model.layers[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == (2 if checkpointing else 1)


def test_llara_injects_projected_crm_embeddings(workdir: Path, monkeypatch, capsys) -> None:
    import recadapt.llm.injection as injection

    _train_tiny_crm(workdir, "sasrec")

    calls: list[tuple[bool, int, torch.Tensor]] = []
    embed = injection.embed_with_items

    def spy(embedding, input_ids, positions, item_ids, item_table, projector):
        out = embed(embedding, input_ids, positions, item_ids, item_table, projector)
        first_weight = next(projector.parameters())
        calls.append(
            (first_weight.requires_grad and torch.is_grad_enabled(), len(item_ids), first_weight.clone())
        )
        rows, cols = positions.unbind(1)
        expected = projector(item_table[item_ids]).to(out.dtype)
        assert torch.allclose(out[rows, cols], expected)  # the placeholders carry the projected CRM rows
        assert item_table.shape[1] == 16
        return out

    monkeypatch.setattr(injection, "embed_with_items", spy)
    args = _args(
        workdir, "llara", "llara", f"llm.crm_run={workdir / 'runs' / 'sasrec'}", "llm.projector_lr=1e-2"
    )
    assert main(args) == 0
    run_dir = workdir / "runs" / "llara"
    training = [c for c in calls if c[0]]
    evaluation = [c for c in calls if not c[0]]
    assert training, "the curriculum never chose a hybrid batch"
    assert evaluation and all(n > 0 for _, n, _ in evaluation), "evaluation must use hybrid prompts"
    assert all(n > 0 for _, n, _ in training)
    p_hybrid = [float(row["train/p_hybrid"]) for row in _log(run_dir)]
    assert p_hybrid == [step / 8 for step in range(8)]  # LLaRA's curriculum: p = step / total_steps
    # the projector trained: its final weights differ from those of its first hybrid batch
    final = load_file(str(run_dir / "final" / "projector.safetensors"))
    assert not torch.equal(final["net.0.weight"], training[0][2])
    assert "HR@1" in _metrics(run_dir)["test"]
    # a reloaded LLaRA run (adapter + projector + the CRM's item table) reproduces its metrics
    calls.clear()
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--mode", "score", "--json"]) == 0
    reloaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reloaded == {"score": _metrics(run_dir)["test_by_mode"]["score"]}
    assert calls and all(n > 0 for _, n, _ in calls), "evaluation must use hybrid prompts"


def test_ilora_trains_a_gated_moe_lora_and_reloads(workdir: Path, capsys) -> None:
    """iLoRA end to end: the gate sees each row's SASRec sequence representation, trains (at its own learning
    rate), and a reloaded run reproduces its metrics; the random-vector ablation runs through the same path."""
    from recadapt.adapters import MoELoRAConfig

    crm_run = _train_tiny_crm(workdir, "sasrec-ilora")
    options = ["llm.adapter_options={n_experts: 2, gate: mlp, gate_width: 8}", "llm.projector_lr=1e-2"]
    assert main(_args(workdir, "ilora", "ilora", f"llm.crm_run={crm_run}", *options)) == 0
    run_dir = workdir / "runs" / "ilora"
    metrics = _metrics(run_dir)
    assert metrics["model"] == "ilora" and metrics["optimizer_steps"] == 8
    saved = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert (
        saved["kind"] == "moe-lora"
        and saved["config"]["n_experts"] == 2
        and saved["config"]["cond_dim"] == 16
    )
    weights = load_file(str(run_dir / "final" / "adapter" / "adapter.safetensors"))
    gate = {k: t for k, t in weights.items() if k.startswith("conditioner.")}
    assert gate, "the gate was not saved"
    torch.manual_seed(0)
    untrained = MoELoRAConfig(r=8, alpha=32.0, n_experts=2, gate="mlp", gate_width=8, cond_dim=16)
    from recadapt.adapters.moe_lora import MoEGate

    fresh = MoEGate(untrained).state_dict()
    assert any(not torch.equal(t, fresh[k.removeprefix("conditioner.")]) for k, t in gate.items())
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--mode", "score", "--json"]) == 0
    reloaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reloaded == {"score": metrics["test_by_mode"]["score"]}

    random_args = _args(
        workdir, "ilora", "ilora-random", f"llm.crm_run={crm_run}", "llm.cond=random", *options
    )
    assert main([*random_args, "llm.max_steps=2"]) == 0
    assert _metrics(workdir / "runs" / "ilora-random")["optimizer_steps"] == 2


def test_reclora_mixes_meta_loras_per_user_on_ctr(workdir: Path, capsys) -> None:
    """RecLoRA under CTR: a CRM trained on all data conditions a bank of meta-LoRAs, the LLM trains on a few-shot
    set, the prompt keeps the short history while the CRM reads a longer one; a reloaded run reproduces it."""

    crm_run = _train_tiny_crm(
        workdir, "sasrec-ctr", "data.protocol=ctr", "model.max_len=20", "train.max_len=20"
    )
    extra = [
        f"llm.crm_run={crm_run}",
        "llm.adapter_options={n_members: 3, gate_hidden: 8}",
        "llm.train_samples=16",
        "llm.eval_samples=40",
        "llm.checkpoint_every=50",
        "train.max_len=3",  # short history in the prompt; the CRM reads its own 20
    ]
    assert main(_args(workdir, "reclora", "reclora", *extra, protocol="ctr")) == 0
    run_dir = workdir / "runs" / "reclora"
    metrics = _metrics(run_dir)
    assert metrics["model"] == "reclora" and set(metrics["test"]) == {"AUC", "LogLoss", "Accuracy"}
    saved = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert saved["kind"] == "personal-lora" and saved["config"]["n_members"] == 3
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ctr": metrics["test"]}


def test_reclora_conditions_on_a_target_aware_crm_on_ctr(workdir: Path, monkeypatch, capsys) -> None:
    """``llm.cond=crm-target``: the gate reads DIN's representation of (long history, the prompt's target), so two
    prompts of one user about different items get different LoRAs; the run reloads, reproduces its metrics and
    feels the shuffled probe. Next-item (the target is the answer) and a CRM without one are refused."""
    din = _train_tiny_crm(
        workdir, "din-ctr", "data.protocol=ctr", "model.max_len=20", "train.max_len=20", model="din"
    )
    from recadapt.cf.runs import CondSource

    seen: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []
    call = CondSource.__call__

    def spy(self, users, histories, query_items=None):
        cond = call(self, users, histories, query_items)
        seen.append((np.asarray(users), np.asarray(query_items), cond))
        return cond

    monkeypatch.setattr(CondSource, "__call__", spy)
    extra = [
        f"llm.crm_run={din}",
        "llm.cond=crm-target",
        "llm.adapter_options={n_members: 3, gate_hidden: 8}",
        "llm.train_samples=16",
        "llm.eval_samples=40",
        "llm.checkpoint_every=50",
        "train.max_len=3",
    ]
    assert main(_args(workdir, "reclora", "reclora-target", *extra, protocol="ctr")) == 0
    users, items, cond = (np.concatenate([s[0] for s in seen]), np.concatenate([s[1] for s in seen]),
                          torch.cat([s[2] for s in seen]))  # fmt: skip
    assert (items >= 0).all() and cond.shape[1] == 80  # DIN's last hidden layer (mlp_hidden 200-80)
    same_user = [(i, j) for i in range(len(users)) for j in range(i)
                 if users[i] == users[j] and items[i] != items[j]]  # fmt: skip
    assert same_user and all(not torch.allclose(cond[i], cond[j]) for i, j in same_user)
    run_dir = workdir / "runs" / "reclora-target"
    metrics = _metrics(run_dir)
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ctr": metrics["test"]}
    assert main(["eval", str(run_dir), "--json", "--shuffle-crm"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) != {"ctr": metrics["test"]}
    capsys.readouterr()
    assert main(_args(workdir, "reclora", "reclora-target-ni", *extra)) == 2
    assert (
        "field 'llm.cond' crm-target conditions on the item a ctr prompt asks about"
        in capsys.readouterr().err
    )
    sasrec = _train_tiny_crm(workdir, "sasrec-ctr-target", "data.protocol=ctr")
    bad = _args(workdir, "reclora", "reclora-target-sasrec", *extra, f"llm.crm_run={sasrec}", protocol="ctr")
    assert main(bad) == 2
    assert "field 'llm.cond' crm-target needs a target-aware CRM run (din)" in capsys.readouterr().err


def _spy_on_records(monkeypatch, seen) -> None:
    """Record (part, row, retrieved view) of every sample built, in training and in evaluation."""
    from recadapt.llm.samples import PromptDataset

    records = PromptDataset.records

    def spy(self, keys):
        seen.extend((self.factory.part, k.row, k.retrieved) for k in keys)
        return records(self, keys)

    monkeypatch.setattr(PromptDataset, "records", spy)


def test_rella_and_rellax_retrieve_history_and_reload(workdir: Path, capsys, monkeypatch, tmp_path) -> None:
    """ReLLa: training mixes recent and retrieved views (ReiT), evaluation shows the retrieved view, the item
    vectors are cached; ReLLaX adds soft prompts and CFLoRA on the CRM's user vectors. Both reload exactly."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built: list[tuple[str, int, bool]] = []
    _spy_on_records(monkeypatch, built)
    few_shot = ["llm.train_samples=16", "llm.eval_samples=40", "llm.checkpoint_every=50", "train.max_len=3"]
    assert main(_args(workdir, "rella", "rella", *few_shot, "llm.retrieval_dim=8", protocol="ctr")) == 0
    run_dir = workdir / "runs" / "rella"
    metrics = _metrics(run_dir)
    assert metrics["model"] == "rella" and set(metrics["test"]) == {"AUC", "LogLoss", "Accuracy"}
    trained = [v for part, _, v in built if part == "train"]
    evaluated = [v for part, _, v in built if part == "test"]
    assert True in trained and False in trained, "ReiT must train on both views"
    assert evaluated and all(evaluated), "evaluation must use the retrieved view"
    cached = list((tmp_path / "cache" / "recadapt" / "retrieval").glob("*.safetensors"))
    assert len(cached) == 1
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ctr": metrics["test"]}

    _train_tiny_crm(workdir, "sasrec-ctr-rellax", "data.protocol=ctr")
    crm = f"llm.crm_run={workdir / 'runs' / 'sasrec-ctr-rellax'}"
    assert (
        main(_args(workdir, "rellax", "rellax", *few_shot, "llm.retrieval_dim=8", crm, protocol="ctr")) == 0
    )
    run_dir = workdir / "runs" / "rellax"
    metrics = _metrics(run_dir)
    saved = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert saved["kind"] == "cf-lora" and saved["config"]["cond_dim"] == 16
    assert (run_dir / "final" / "projector.safetensors").is_file()  # the soft prompts' projector
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ctr": metrics["test"]}
    # ReLLaX's recipe: CFLoRA's A and B start from the ReLLa run's (PEFT) LoRA and stay frozen
    init = [f"llm.init_lora_from={workdir / 'runs' / 'rella'}", "llm.adapter_options={freeze_ab: true}"]
    rellax_init = ["rellax", "rellax-init", *few_shot, "llm.retrieval_dim=8", crm, *init]
    assert main(_args(workdir, *rellax_init, protocol="ctr")) == 0
    ours = load_file(str(workdir / "runs" / "rellax-init" / "final" / "adapter" / "adapter.safetensors"))
    peft = load_file(str(workdir / "runs" / "rella" / "final" / "adapter_model.safetensors"))
    a_keys = [k for k in ours if k.endswith("lora_A")]
    assert a_keys and len(a_keys) == len([k for k in peft if k.endswith("lora_A.weight")])
    for key in a_keys:
        assert torch.equal(ours[key], peft[f"base_model.model.{key}.weight"]), key
    # next-item has no target to retrieve against: a clear error naming the field
    assert main(_args(workdir, "rella", "rella-next", "llm.history=retrieved")) == 2
    assert "llm.history" in capsys.readouterr().err


def test_reit_both_trains_every_sample_in_both_views(workdir: Path, monkeypatch, tmp_path) -> None:
    """ReLLa's ReiT as published: the training data is the recent-view set plus the retrieved-view set."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built: list[tuple[str, int, bool]] = []
    _spy_on_records(monkeypatch, built)
    extra = [
        "llm.train_samples=8",
        "llm.eval_samples=8",
        "llm.epochs=1",
        "train.max_len=3",
        "llm.retrieval_dim=8",
    ]
    assert main(_args(workdir, "rella", "reit-both", *extra, "llm.history=both", protocol="ctr")) == 0
    seen = [(row, view) for part, row, view in built if part == "train"]
    assert len(seen) == 16 and len(set(seen)) == 16, "each of the 8 samples once per view"
    assert {row for row, _ in seen if _} == {row for row, _ in seen if not _}
    assert _metrics(workdir / "runs" / "reit-both")["optimizer_steps"] == 2  # 16 entries / (4 x 2)


@pytest.mark.parametrize(
    ("method", "protocol"), [("ilora", "ctr"), ("reclora", "next-item"), ("rellax", "next-item")]
)
def test_personalized_methods_run_under_the_protocol_their_paper_did_not_use(
    workdir: Path, capsys, method: str, protocol: str
) -> None:
    """iLoRA on CTR, RecLoRA and ReLLaX on next-item (beyond the papers, what users compare): each trains with
    its conditioned adapter on a CRM of that protocol, and a reloaded run reproduces its metrics."""
    crm_run = _train_tiny_crm(workdir, f"sasrec-{method}-{protocol}", f"data.protocol={protocol}")
    extra = [
        f"llm.crm_run={crm_run}",
        "llm.train_samples=8",
        "llm.eval_samples=12",
        "llm.epochs=1",
        "llm.checkpoint_every=50",
        "llm.eval_modes=[score]",
        "train.max_len=3",
    ]
    if method == "rellax":
        extra.append("llm.history=recent")  # next-item has no target to retrieve against
    run = f"{method}-{protocol}"
    assert main(_args(workdir, method, run, *extra, protocol=protocol)) == 0
    metrics = _metrics(workdir / "runs" / run)
    assert metrics["model"] == method and metrics["protocol"] == protocol and metrics["optimizer_steps"] == 1
    expected = {"ilora": "moe-lora", "reclora": "personal-lora", "rellax": "cf-lora"}[method]
    saved = json.loads((workdir / "runs" / run / "final" / "adapter" / "adapter_config.json").read_text())
    assert saved["kind"] == expected and saved["config"]["cond_dim"] == 16
    capsys.readouterr()
    assert main(["eval", str(workdir / "runs" / run), "--json"]) == 0
    reloaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reloaded == (
        {"ctr": metrics["test"]} if protocol == "ctr" else {"score": metrics["test_by_mode"]["score"]}
    )


def test_zero_shot_and_ctr(workdir: Path, capsys) -> None:
    assert main(_args(workdir, "zero-shot", "zero-shot", "llm.eval_modes=[score]")) == 0
    metrics = _metrics(workdir / "runs" / "zero-shot")
    assert metrics["optimizer_steps"] == 0 and metrics["ranking_mode"] == "score"
    checkpoint = workdir / "runs" / "zero-shot" / "checkpoint"
    assert [p.name for p in checkpoint.iterdir()] == ["state.json"]  # nothing trained, the run is done

    ctr = ["llm.train_samples=16", "llm.epochs=1", "llm.eval_samples=40", "llm.checkpoint_every=50"]
    assert main(_args(workdir, "tallrec", "ctr", *ctr, protocol="ctr")) == 0
    metrics = _metrics(workdir / "runs" / "ctr")
    assert metrics["protocol"] == "ctr" and metrics["test_samples"] == 40 and metrics["train_samples"] == 16
    assert set(metrics["test"]) == {"AUC", "LogLoss", "Accuracy"}
    capsys.readouterr()
    assert main(["eval", str(workdir / "runs" / "ctr"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ctr": metrics["test"]}


def test_nan_loss_stops_with_a_clear_message(workdir: Path, capsys, monkeypatch) -> None:
    import recadapt.train.llm_loop as llm_module

    monkeypatch.setattr(llm_module, "forward_loss", lambda *_: torch.tensor(float("nan"), requires_grad=True))
    assert main(_args(workdir, "tallrec", "nan")) == 2
    err = capsys.readouterr().err
    assert "loss is nan at epoch 1, step 0" in err and "llm.lr" in err


# --- pieces -------------------------------------------------------------------------------------------------------


def test_length_bucketed_batches_cover_every_sample_once_with_little_padding() -> None:
    from recadapt.data.samplers import length_bucketed_batches

    lengths = np.random.default_rng(0).integers(10, 500, size=203)
    batches = length_bucketed_batches(lengths, 8, seed=1, epoch=0, chunk_batches=5)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert [len(b) for b in batches[:-1]] == [8] * 25 and len(batches[-1]) == 3  # the short batch goes last
    assert batches == length_bucketed_batches(lengths, 8, seed=1, epoch=0, chunk_batches=5)
    assert batches != length_bucketed_batches(lengths, 8, seed=1, epoch=1, chunk_batches=5)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    shuffled = np.random.default_rng(2).permutation(203)
    padded_random = sum(8 * lengths[shuffled[i : i + 8]].max() for i in range(0, 203, 8))
    assert padded < 0.8 * padded_random


def test_long_prompts_drop_their_oldest_history_items(workdir: Path) -> None:
    """Each sample is fitted to the budget on its own, tokenized once; the batch collated from the records is what
    encoding the fitted prompts together gives."""
    from recadapt.data.store import ensure_prepared
    from recadapt.llm.encoding import ItemTokenizer
    from recadapt.llm.samples import PromptDataset, PromptFactory, SampleKey

    prepared = ensure_prepared(f"recbole:{FIXTURE}", "next-item", out_root=workdir / "prepared")
    factory = PromptFactory(prepared, "train", "item", history_len=10)
    encoder = ItemTokenizer(byte_tokenizer())
    rows = [r for r in range(len(factory)) if factory.n_history(r) == 10][:4]
    full = encoder.encode([factory.prompt(r) for r in rows], [factory.answer(r) for r in rows])
    limit = int(full.attention_mask.sum(1).min()) - 40
    samples = PromptDataset(factory, encoder, limit)
    records = samples.records([SampleKey(r) for r in rows])
    batch = samples.training_batch(records)
    assert int(batch.attention_mask.sum(1).max()) <= limit
    for row, record in zip(rows, records, strict=True):
        kept = factory.titles[factory.histories[row][-1]]
        dropped = factory.titles[factory.histories[row][0]]
        assert kept in record.prompt.text and f"{dropped}," not in record.prompt.text.split("Choose")[0]
        assert record.n_history < 10 and record.user == factory.users[row]
    together = encoder.encode([r.prompt for r in records], [r.answer for r in records])
    assert torch.equal(batch.input_ids, together.input_ids) and torch.equal(batch.labels, together.labels)
    prompts_alone = encoder.encode([r.prompt for r in records])
    assert torch.equal(samples.prompt_batch(records).input_ids, prompts_alone.input_ids)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        PromptDataset(factory, encoder, 50)[SampleKey(rows[0])]


@pytest.mark.parametrize("protocol", ["next-item", "ctr"])
def test_conditioning_sees_the_ctr_target_and_never_a_next_item_answer(workdir: Path, protocol: str) -> None:
    """What a conditioned adapter reads besides the user and history: a ctr prompt's target (an input), and for
    prompts that list candidates nothing (-1), since their target is the answer."""
    from recadapt.data.store import ensure_prepared
    from recadapt.llm.encoding import ItemTokenizer
    from recadapt.llm.samples import PromptDataset, PromptFactory, SampleKey, conditioning_inputs

    prepared = ensure_prepared(f"recbole:{FIXTURE}", protocol, out_root=workdir / "prepared")
    factory = PromptFactory(prepared, "train", "item", history_len=3)
    records = PromptDataset(factory, ItemTokenizer(byte_tokenizer()), 4096).records(
        [SampleKey(r) for r in range(6)]
    )
    users, histories, query_items = conditioning_inputs(records)
    assert users.tolist() == factory.users[:6].tolist() and len(histories) == 6
    expected = factory.targets[:6] if protocol == "ctr" else np.full(6, -1)
    assert query_items.tolist() == expected.tolist()


def test_llm_config_errors_name_the_field(tmp_path: Path, workdir: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: tallrec\nllm:\n  eval_modes: [generate, beam]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: field 'llm.eval_modes'"):
        load_config(path)
    with pytest.raises(ConfigError, match="llm"):
        load_config(None, ["model.name=sasrec", "llm.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"<command line>: field 'llm.batch_size'"):
        load_config(None, ["model.name=tallrec", "llm.batch_size=0"])
    config = load_config(REPO / "configs" / "llara.yaml")
    assert config.llm is not None and config.llm.crm_run and config.llm.lora_r == 8
    assert "llm" not in load_config(REPO / "configs" / "sasrec.yaml").to_dict()
    # CRM-only train fields are refused for LLM runs rather than silently ignored
    from recadapt.train.llm import train_llm

    with pytest.raises(ConfigError, match="train.epochs"):
        train_llm(load_config(REPO / "configs" / "tallrec.yaml", ["train.epochs=3"]))
    with pytest.raises(ConfigError, match="llm.crm_run"):
        train_llm(load_config(REPO / "configs" / "llara.yaml", ["llm.crm_run=null"]))


def test_fingerprint_ignores_fields_at_their_defaults() -> None:
    """A field left at its default does not enter the checkpoint fingerprint (so adding fields keeps old runs
    resumable), while any change that shapes training does; the older every-field rule is still accepted, with
    and without the fields added since."""
    import dataclasses

    from recadapt.train.config import run_fingerprints
    from recadapt.train.llm import _EVAL_ONLY_FIELDS

    config = load_config(REPO / "configs" / "tallrec.yaml")
    llm = config.llm
    assert llm is not None

    def current(llm_config) -> str:
        return run_fingerprints(config, llm_config, ignore=_EVAL_ONLY_FIELDS)[0]

    base = current(llm)
    assert current(dataclasses.replace(llm, adapter="lora", cond="crm")) == base  # the defaults
    assert current(dataclasses.replace(llm, lora_r=16)) != base
    assert current(dataclasses.replace(llm, adapter="moe-lora")) != base
    assert current(dataclasses.replace(llm, eval_modes=["score"])) == base  # evaluation only
    accepted = run_fingerprints(config, llm, ignore=_EVAL_ONLY_FIELDS)
    assert len(set(accepted)) == len(accepted) == 4
    import hashlib

    def older_rule(dropped: tuple[str, ...]) -> str:
        older = dataclasses.asdict(llm)
        for name in (*dropped, *_EVAL_ONLY_FIELDS):
            del older[name]
        payload = {
            "model": config.model,
            "data": [config.data.dataset, config.data.protocol, config.data.split_seed],
            "train": [config.train.seed, config.train.max_len],
            "llm": older,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # checkpoints hashed by the older rule before llm.init_lora_from existed, and before llm.history and
    # llm.retrieval_dim did (the LastFM TALLRec and LLaRA runs of docs/results/next_item_lastfm.md)
    assert older_rule(()) in accepted
    assert older_rule(("init_lora_from",)) in accepted
    assert older_rule(("init_lora_from", "history", "retrieval_dim")) in accepted
    assert older_rule(("init_lora_from", "history")) not in accepted


def test_item_tags_describe_prompt_items_while_answers_stay_titles(shared_data: Path, tmp_path: Path) -> None:
    from recadapt.data.store import ensure_prepared
    from recadapt.llm.samples import PromptFactory, item_tag_lists

    prepared = ensure_prepared("lastfm", "next-item", data_root=shared_data, out_root=tmp_path)
    plain = PromptFactory(prepared, "test", "artist", history_len=10)
    tagged = PromptFactory(prepared, "test", "artist", history_len=10, item_tags=2)
    tags = item_tag_lists(prepared.items, prepared.n_items)
    for row in range(3):
        text = tagged.prompt(row).text
        for item in [*tagged.histories[row], *tagged.candidates[row]]:
            assert f"{plain.titles[item]} ({', '.join(tags[item][:2])})" in text
        assert plain.prompt(row).text.count("(") < text.count("(")
        assert tagged.answer(row) == plain.answer(row) == plain.titles[plain.targets[row]]
        assert tagged.prompt(row, hybrid=True).item_ids == plain.prompt(row, hybrid=True).item_ids


def test_item_tags_need_a_tags_or_genres_column(workdir: Path) -> None:
    from recadapt.data.store import ensure_prepared
    from recadapt.llm.samples import PromptFactory

    prepared = ensure_prepared(f"recbole:{FIXTURE}", "next-item", out_root=workdir / "prepared")
    prepared.items = prepared.items.drop(columns=["tags", "genres"], errors="ignore")
    with pytest.raises(ConfigError, match="llm.item_tags"):
        PromptFactory(prepared, "train", "item", history_len=10, item_tags=3)


@pytest.mark.parametrize("precision", ["bf16", "no"])
@pytest.mark.parametrize(("method", "protocol"), [("llara", "next-item"), ("ilora", "ctr")])
def test_trained_and_reloaded_runs_score_identically_in_each_precision(
    workdir: Path, monkeypatch, precision: str, method: str, protocol: str
) -> None:
    """One precision rule for both evaluation paths: the raw per-sample scores of the evaluation that ends
    training equal those of ``recadapt eval`` on the saved run, bit for bit, under bf16 autocast and in fp32.
    (Before, accelerate's autocast wrapper stayed on the trained run's projector and adapter, so a trained LLaRA
    projected its items in bf16 and the reloaded one in fp32.) ``llm.precision`` is explicit, so the test does
    not depend on whether this CPU runs bf16 natively."""
    recorded = record_raw_scores(monkeypatch)
    crm_run = _train_tiny_crm(workdir, f"sasrec-precision-{protocol}", f"data.protocol={protocol}")
    run = f"{method}-{protocol}-precision-{precision}"
    extra = [f"llm.crm_run={crm_run}", f"llm.precision={precision}", "llm.train_samples=8", "llm.epochs=1"]
    extra += ["llm.eval_samples=12", "llm.eval_modes=[score]", "llm.checkpoint_every=50"]
    assert main(_args(workdir, method, run, *extra, protocol=protocol)) == 0
    assert _metrics(workdir / "runs" / run)["precision"] == precision
    trained = np.concatenate(recorded)
    recorded.clear()
    assert main(["eval", str(workdir / "runs" / run), "--json"]) == 0
    reloaded = np.concatenate(recorded)
    assert trained.shape == reloaded.shape and trained.size > 0
    np.testing.assert_array_equal(trained, reloaded)


def test_native_bf16_detection_can_be_forced_either_way(monkeypatch) -> None:
    """``$RECADAPT_NATIVE_BF16`` makes ``llm.precision=auto`` choose as on a CPU with or without native bf16, so
    the suite runs both choices on any machine."""
    from recadapt.train.precision import select_precision

    cpu = torch.device("cpu")
    monkeypatch.setenv("RECADAPT_NATIVE_BF16", "1")
    assert select_precision(cpu)[0] == "bf16"
    monkeypatch.setenv("RECADAPT_NATIVE_BF16", "0")
    assert select_precision(cpu)[0] == "no"
    monkeypatch.setenv("RECADAPT_NATIVE_BF16", "yes")
    with pytest.raises(ValueError, match="RECADAPT_NATIVE_BF16"):
        select_precision(cpu)


@pytest.mark.parametrize(("method", "protocol"), [("llara", "next-item"), ("ilora", "ctr")])
def test_the_shuffled_crm_probe_changes_what_the_crm_feeds(
    workdir: Path, monkeypatch, capsys, method: str, protocol: str
) -> None:
    """``recadapt eval RUN --shuffle-crm`` permutes item ids on the CRM's side only (LLaRA's item table, iLoRA's
    gate input): the raw scores move, while an evaluation without it reproduces the run. Whether a trained
    method gets *worse* is what the learnability suite measures; here, that the probe reaches the model."""
    recorded = record_raw_scores(monkeypatch)
    crm_run = _train_tiny_crm(workdir, f"sasrec-shuffle-{protocol}", f"data.protocol={protocol}")
    run = f"{method}-{protocol}-shuffle"
    extra = [f"llm.crm_run={crm_run}", "llm.train_samples=8", "llm.epochs=1", "llm.eval_samples=12"]
    extra += ["llm.eval_modes=[score]", "llm.checkpoint_every=50", "llm.projector_lr=1e-2"]
    assert main(_args(workdir, method, run, *extra, protocol=protocol)) == 0
    scores = {}
    for flags in ((), ("--shuffle-crm",)):
        recorded.clear()
        assert main(["eval", str(workdir / "runs" / run), "--json", *flags]) == 0
        scores[flags] = np.concatenate(recorded)
    assert scores[()].shape == scores[("--shuffle-crm",)].shape
    assert not np.array_equal(scores[()], scores[("--shuffle-crm",)])
    capsys.readouterr()
    assert main(["eval", str(workdir / "runs" / crm_run.name), "--shuffle-crm"]) == 2
    assert "--shuffle-crm apply to LLM runs" in capsys.readouterr().err


@pytest.mark.parametrize("projector", ["scaled", "vocab"])
def test_projector_kinds_train_reload_and_feel_the_shuffled_probe(
    workdir: Path, monkeypatch, projector: str
) -> None:
    """``llm.projector`` scaled / vocab: the saved projector (with its standardisation and anchors) reproduces
    the trained run's scores bit for bit, ``AnswerNLL`` is the target's per-token NLL, and the shuffled-CRM
    probe reaches the model. ``llm.curriculum=hybrid`` trains every step on hybrid prompts."""
    recorded = record_raw_scores(monkeypatch)
    crm_run = _train_tiny_crm(workdir, f"sasrec-projector-{projector}")
    run = f"llara-projector-{projector}"
    extra = [f"llm.crm_run={crm_run}", "llm.precision=no", "llm.train_samples=8", "llm.epochs=1"]
    extra += ["llm.eval_samples=12", "llm.eval_modes=[score]", "llm.checkpoint_every=50"]
    extra += [f"llm.projector={projector}", "llm.curriculum=hybrid"]
    assert main(_args(workdir, "llara", run, *extra)) == 0
    run_dir = workdir / "runs" / run
    trained = np.concatenate(recorded)
    assert all(float(row["train/p_hybrid"]) == 1.0 for row in _log(run_dir))
    test = _metrics(run_dir)["test"]
    assert test["AnswerNLL"]["value"] > 0
    scores = {}
    for flags in ((), ("--shuffle-crm",)):
        recorded.clear()
        assert main(["eval", str(run_dir), "--json", *flags]) == 0
        scores[flags] = np.concatenate(recorded)
    np.testing.assert_array_equal(trained, scores[()])
    assert not np.array_equal(scores[()], scores[("--shuffle-crm",)])


def test_listwise_loss_is_the_cross_entropy_of_the_score_mode_scores(workdir: Path) -> None:
    """``llm.objective=listwise`` trains on exactly what score mode ranks by: in eval mode its loss is the
    cross-entropy of :func:`score_candidates`' scores with the target as the class; ``both`` adds the target's
    mean NLL per token; the gradient reaches the model."""
    from recadapt.data.store import ensure_prepared
    from recadapt.llm.backbone import load_backbone
    from recadapt.llm.encoding import ItemTokenizer
    from recadapt.llm.samples import PromptDataset, PromptFactory, SampleKey
    from recadapt.llm.scoring import score_candidates
    from recadapt.tasks.llm import prompt_inputs
    from recadapt.train.llm_loop import listwise_loss

    prepared = ensure_prepared(f"recbole:{FIXTURE}", "next-item", out_root=workdir / "prepared")
    backbone = load_backbone(str(workdir / "backbone"))
    model = backbone.model.eval()
    encoder = ItemTokenizer(backbone.tokenizer, model=model)
    factory = PromptFactory(prepared, "train", "item", history_len=5)
    samples = PromptDataset(factory, encoder, 1024)
    records = samples.records([SampleKey(r) for r in (0, 3, 7)])
    titles = [[factory.titles[i] for i in factory.candidates[r.key.row]] for r in records]
    tokens = [[encoder.answer_token_ids(t) for t in row] for row in titles]
    scores = score_candidates(model, prompt_inputs(samples.prompt_batch(records), None), tokens)
    target = torch.tensor(
        [titles[k].index(factory.titles[factory.targets[r.key.row]]) for k, r in enumerate(records)]
    )
    expected = torch.nn.functional.cross_entropy(scores, target)
    losses = {
        objective: listwise_loss(model, samples, records, None, objective=objective)
        for objective in ("listwise", "both")
    }
    torch.testing.assert_close(losses["listwise"], expected, atol=1e-5, rtol=0)
    generative = -scores.gather(1, target[:, None]).mean()
    torch.testing.assert_close(losses["both"], expected + generative, atol=1e-5, rtol=0)
    losses["listwise"].backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)


def test_the_listwise_objective_trains_every_cf_method_and_ctr_refuses_it(workdir: Path) -> None:
    """LLaRA (item tokens), iLoRA (gate) and ReLLaX (soft prompts, retrieved history) train with
    ``llm.objective=both`` and placeholders before titles: the listwise forward carries each method's inputs."""
    crm_run = _train_tiny_crm(workdir, "sasrec-listwise")
    for method, own in (("llara", []), ("ilora", []), ("rellax", ["llm.history=recent"])):
        run = f"{method}-listwise"
        extra = [f"llm.crm_run={crm_run}", "llm.train_samples=8", "llm.epochs=1", "llm.eval_samples=12"]
        extra += ["llm.eval_modes=[score]", "llm.objective=both", "llm.item_placement=before", *own]
        assert main(_args(workdir, method, run, *extra)) == 0, method
        rows = _log(workdir / "runs" / run)
        assert rows and all(np.isfinite(float(r["train/loss"])) for r in rows), method
        assert "HR@1" in _metrics(workdir / "runs" / run)["test"], method
    with pytest.raises(ConfigError, match="llm.objective"):
        from recadapt.train.llm import train_llm

        config = load_config(
            REPO / "configs" / "tallrec.yaml",
            [f"data.dataset=recbole:{FIXTURE}", "data.protocol=ctr", "llm.objective=listwise"],
        )
        train_llm(config)


def test_the_user_token_feeds_the_conditioning_crm_vector_into_the_prompt(workdir: Path, monkeypatch) -> None:
    """``llm.user_token`` (LLaRA with RecLoRA's personal LoRA): every hybrid prompt, in generative and listwise
    training and in evaluation, holds one user placeholder per row, filled from that row's CRM user vector; a
    method or adapter without a CRM user vector refuses the field."""
    from recadapt.llm.injection import ItemEmbedder
    from recadapt.llm.prompts import USER_ITEM_ID
    from recadapt.train.llm import train_llm

    seen: list[tuple[int, int, bool]] = []
    call = ItemEmbedder.__call__

    def recording(self, batch, users=None):
        rows = batch.input_ids.size(0)
        seen.append(
            (rows, int((batch.item_ids == USER_ITEM_ID).sum()), users is not None and len(users) == rows)
        )
        return call(self, batch, users)

    monkeypatch.setattr(ItemEmbedder, "__call__", recording)
    crm_run = _train_tiny_crm(workdir, "sasrec-user-token")
    extra = [f"llm.crm_run={crm_run}", "llm.train_samples=8", "llm.epochs=1", "llm.eval_samples=12"]
    extra += ["llm.eval_modes=[score]", "llm.item_placement=before", "llm.curriculum=hybrid"]
    extra += ["llm.adapter=personal-lora", "llm.adapter_options={n_members: 2}", "llm.user_token=true"]
    assert main(_args(workdir, "llara", "llara-user-token", *extra, "llm.objective=both")) == 0
    assert seen and all(placeholders == rows and given for rows, placeholders, given in seen), seen
    assert "HR@1" in _metrics(workdir / "runs" / "llara-user-token")["test"]
    for bad in (["model.name=tallrec"], ["llm.adapter=lora"], ["llm.cond=random"]):
        config = load_config(
            REPO / "configs" / "llara.yaml",
            [f"data.dataset=recbole:{FIXTURE}", "llm.adapter=personal-lora", "llm.user_token=true", *bad],
        )
        with pytest.raises(ConfigError, match="llm.user_token"):
            train_llm(config)


def test_llara_ranks_sampled_ranking_candidates_in_every_mode_and_reloads(workdir: Path, capsys) -> None:
    """Under sampled-ranking an LLM ranks the persisted leave-one-out candidates exactly as it ranks next-item's:
    every mode reports its metrics (score mode up to HR@20, the whole list) and a reloaded run reproduces them."""
    crm_run = _train_tiny_crm(workdir, "sasrec-sampled", "data.protocol=sampled-ranking")
    extra = [
        f"llm.crm_run={crm_run}",
        "llm.train_samples=8",
        "llm.eval_samples=6",
        "llm.epochs=1",
        "llm.checkpoint_every=50",
        "llm.eval_modes=[score,constrained,generate]",
        "llm.max_new_tokens=8",
        "train.max_len=3",
        "data.n_negatives=9",
    ]
    assert main(_args(workdir, "llara", "llara-sampled", *extra, protocol="sampled-ranking")) == 0
    run_dir = workdir / "runs" / "llara-sampled"
    metrics = _metrics(run_dir)
    assert metrics["protocol"] == "sampled-ranking" and metrics["test_samples"] == 6
    by_mode = metrics["test_by_mode"]
    assert set(by_mode) == {"score", "constrained", "generate"}
    assert {"HR@1", "HR@5", "HR@10", "HR@20", "NDCG@20", "MRR"} <= set(by_mode["score"])
    assert by_mode["score"]["HR@10"]["value"] == 1.0  # 10 candidates: the target is always in the top 10
    assert by_mode["constrained"]["ValidRatio"]["value"] == 1.0
    prepared = {p.name for p in (workdir / "prepared").glob("*/*")}
    assert "sampled-ranking__n_negatives-9" in prepared
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json", "--mode", "score"]) == 0
    reloaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reloaded == {"score": by_mode["score"]}


def test_validation_keeps_the_best_adapter_and_stops_early(workdir: Path) -> None:
    """llm.valid_every scores the adapter on validation rows; the final adapter is the best one, and patience
    stops the run once validations stop improving."""
    args = _args(workdir, "tallrec", "selected", "llm.valid_every=2", "llm.valid_samples=12", "llm.lr=0.3")
    assert main(args) == 0
    run_dir = workdir / "runs" / "selected"
    rows = list(csv.DictReader((run_dir / "valid.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    values = [float(r["valid/metric"]) for r in rows]
    metrics = _metrics(run_dir)
    best = max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal bests is kept
    assert metrics["model_selection"]["best_step"] == 2 * (best + 1)
    assert metrics["model_selection"]["best_valid"] == pytest.approx(values[best])
    final = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    kept = load_file(str(run_dir / "best" / "adapter_model.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)

    # patience 1: the first validation that does not improve ends the run
    assert main([*args[:-1], "name=patient", "llm.lr=0.3", "llm.patience=1"]) == 0
    patient = workdir / "runs" / "patient"
    rows = list(csv.DictReader((patient / "valid.csv").open()))
    values = [float(r["valid/metric"]) for r in rows]
    stops = next((i for i in range(1, len(values)) if values[i] <= max(values[:i])), None)
    expected_steps = 8 if stops is None else 2 * (stops + 1)
    assert _metrics(patient)["optimizer_steps"] == expected_steps
    if stops is not None:  # the kept adapter is an earlier one than the last trained
        selection = _metrics(patient)["model_selection"]
        assert selection["best_step"] < expected_steps
        final = load_file(str(patient / "final" / "adapter_model.safetensors"))
        kept = load_file(str(patient / "best" / "adapter_model.safetensors"))
        assert all(torch.equal(final[k], kept[k]) for k in final)
