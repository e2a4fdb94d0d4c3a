"""recadapt's ``lora`` kind in PEFT's place: its folders load in PEFT with the same logits and back, and the kinds
without per-call state train with gradient checkpointing (same loss and gradients, each layer rerun in the
backward), while the conditioned kinds are refused up front."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_llm import randomize_lora_b, tiny_llama
from torch.testing import assert_close

from recadapt.adapters import (
    ADAPTER_CONFIG,
    ADAPTERS,
    AdaptedModel,
    LoRAConfig,
    MoELoRAConfig,
    attach_adapters,
    attach_layerwise,
    enable_gradient_checkpointing,
    load_adapters,
    load_lora_weights,
    make_config,
    save_adapters,
    save_peft_lora,
)
from recadapt.adapters.storage import PEFT_WEIGHTS

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # PEFT
]

VOCAB, HIDDEN, D, R = 40, 32, 6, 4
CONDITIONED: dict[str, dict[str, Any]] = {
    "moe-lora": {"cond_dim": D, "n_experts": 2, "gate_width": 8},
    "personal-lora": {"cond_dim": D, "n_members": 3, "gate_dropout": 0.0},
    "cf-lora": {"cond_dim": D},
}


def base() -> torch.nn.Module:
    return tiny_llama(VOCAB, hidden_size=HIDDEN)


def adapted(kind: str = "lora", *, seed: int = 0, randomize: bool = True, **values: Any) -> AdaptedModel:
    """``kind`` on a tiny Llama; ``randomize`` makes B (zero at init) random so the update matters."""
    torch.manual_seed(seed)
    model = attach_adapters(base(), make_config(kind, r=R, **{**CONDITIONED.get(kind, {}), **values}))
    return randomize_lora_b(model, seed + 1) if randomize else model.eval()


def ids(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_a_saved_lora_loads_in_peft_with_the_same_logits_and_back(tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    ours = adapted(alpha=8.0, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    folder = save_peft_lora(ours, tmp_path / "final", "HuggingFaceTB/SmolLM2-135M")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "base_model_name_or_path")} == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
    }
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (R, 8, 0.1)
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    saved = load_file(str(folder / PEFT_WEIGHTS))
    assert len(saved) == 2 * len(ours.adapter_layers) == 2 * 2 * 3
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in saved

    theirs = PeftModel.from_pretrained(base(), str(folder)).eval()
    assert theirs.peft_config["default"].lora_dropout == 0.1
    assert set(get_peft_model_state_dict(theirs, save_embedding_layers=False)) == set(
        saved
    )  # PEFT's own key names, nothing missing
    tokens = ids()
    with torch.no_grad():
        expected = ours(input_ids=tokens).logits
        assert_close(theirs(input_ids=tokens).logits, expected, rtol=1e-6, atol=1e-6)  # equal here
        assert not torch.allclose(base()(input_ids=tokens).logits, expected, atol=1e-3)

        reloaded = load_adapters(base(), folder).eval()  # recadapt reads its PEFT folder as a lora kind
        assert reloaded.adapter_config == ours.adapter_config
        assert torch.equal(reloaded(input_ids=tokens).logits, expected)
        copied = adapted(randomize=False, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
        load_lora_weights(copied, folder)
        assert torch.equal(copied(input_ids=tokens).logits, expected)

        theirs.save_pretrained(
            str(tmp_path / "by-peft"), save_embedding_layers=False
        )  # and a folder PEFT wrote reads back the same
        assert torch.equal(
            load_adapters(base(), tmp_path / "by-peft").eval()(input_ids=tokens).logits, expected
        )

    (folder / "projector.safetensors").write_bytes(
        b"kept"
    )  # the recipe keeps its projector beside the adapter
    save_peft_lora(ours, folder)
    assert (folder / "projector.safetensors").read_bytes() == b"kept"
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] is None
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("kind", ["bottleneck", "moe-lora"])
def test_only_plain_lora_is_saved_for_peft(kind: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"plain 'lora'.*{kind}"):
        save_peft_lora(adapted(kind), tmp_path / "final")
    plan = {0: LoRAConfig(r=R), 1: LoRAConfig(r=2 * R)}
    with pytest.raises(ValueError, match="plain 'lora' AdaptedModel"):
        save_peft_lora(attach_layerwise(base(), plan), tmp_path / "final")  # type: ignore[arg-type]
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("bias", "all"), ("alpha_pattern", {"q_proj": 2}), ("modules_to_save", ["lm_head"]), ("use_dora", True)],
)
def test_a_peft_lora_that_is_not_plain_lora_is_refused(option: str, value: Any, tmp_path: Path) -> None:
    folder = save_peft_lora(adapted(), tmp_path / "final")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, option: value}))
    with pytest.raises(ValueError, match=option if option != "use_dora" else "DoRA"):
        load_adapters(base(), folder)


def test_gradient_checkpointing_is_a_capability_of_the_kind() -> None:
    capable = {name: kind.supports_gradient_checkpointing for name, kind in ADAPTERS.items()}
    assert {name: capable[name] for name in ("lora", "bottleneck", *CONDITIONED)} == {
        "lora": True,
        "bottleneck": True,
        "moe-lora": False,
        "personal-lora": False,
        "cf-lora": False,
    }


def _step(model: AdaptedModel, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(11)  # the same dropout masks in both runs
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_reruns_each_layer(kind: str) -> None:
    tokens = ids(length=12)
    results, calls = [], []
    for checkpointing in (False, True):
        model = adapted(kind, dropout=0.3).train()  # same seed: the same weights in both runs
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls.clear()
        # a module inside the layer, hooked on entry: the recomputation runs the layer's body again (not its
        # hooked __call__) and may stop as soon as it has what the backward needs, before the module returns
        model.base_model.model.layers[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        results.append(_step(model, tokens))
        assert len(calls) == (2 if checkpointing else 1)
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    assert_close(ckpt_loss, plain_loss)  # the recomputation replays the dropout masks
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == 2 * 2 * 7
    for name, grad in plain_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", list(CONDITIONED))
def test_gradient_checkpointing_is_refused_for_conditioned_kinds(kind: str) -> None:
    from recadapt.adapters.build import enable_gradient_checkpointing as recipe_enable

    model = adapted(kind)
    for enable in (enable_gradient_checkpointing, recipe_enable):
        with pytest.raises(ValueError, match=f"unsupported for adapter kind '{kind}'"):
            enable(model)
    assert not model.base_model.is_activation_checkpointing
    mixed = attach_layerwise(base(), {0: LoRAConfig(r=R), 1: MoELoRAConfig(r=R, cond_dim=D)})
    with pytest.raises(ValueError, match="'moe-lora'"):
        enable_gradient_checkpointing(mixed)


def test_a_saved_lora_still_round_trips_through_save_adapters(tmp_path: Path) -> None:
    """The recadapt format stays the one for every kind; the PEFT one is an extra for ``lora``."""
    model = adapted()
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
        reloaded = load_adapters(base(), save_adapters(model, tmp_path / "adapter")).eval()
        assert torch.equal(reloaded(input_ids=ids()).logits, expected)


def test_peft_init_trains_exactly_as_peft_lora_did() -> None:
    """The recipe's ``lora`` left PEFT for this kind with ``peft_init``: from the same seed it draws PEFT's initial
    A, and with the same dropout draws and AdamW steps its losses are PEFT's to the bit, so runs and results
    trained before the switch reproduce."""
    from recadapt.adapters.build import with_lora
    from recadapt.train.config import LLMConfig

    llm = LLMConfig(lora_r=4, lora_dropout=0.3)
    tokens = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))

    def losses(build) -> list[float]:
        model = build(tiny_llama(300, logit_scale=4.0))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        out = []
        for step in range(4):
            torch.manual_seed(100 + step)  # the recipe reseeds dropout per step
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    def peft(base: torch.nn.Module) -> torch.nn.Module:
        torch.manual_seed(0)
        return with_lora(base, llm)

    def ours(base: torch.nn.Module) -> torch.nn.Module:
        torch.manual_seed(0)
        config = LoRAConfig(
            r=4, alpha=32.0, dropout=0.3, target_modules=llm.lora_target_modules, peft_init=True
        )
        return attach_adapters(base, config)

    expected = losses(peft)
    assert losses(ours) == expected and expected[0] != expected[-1]
