"""Layer-wise adapters on a tiny Llama: one config everywhere is attach_adapters, mixed plans route each group's
mix to its own layers only, None layers stay untouched, and save/load round-trips exactly."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_llm import tiny_llama
from torch import nn
from torch.testing import assert_close

from recadapt.adapters import (
    ADAPTER_WEIGHTS,
    LAYERWISE_PLAN,
    AdapterConfig,
    AdapterLayer,
    BottleneckConfig,
    BottleneckLayer,
    CFLoRALayer,
    LayerwiseAdaptedModel,
    LoRAConfig,
    LoRALayer,
    MoELoRALayer,
    attach_adapters,
    attach_layerwise,
    decoder_layers,
    load_adapters,
    load_layerwise,
    make_config,
    read_layerwise_plan,
    save_layerwise,
)

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, HIDDEN, D, N_LAYERS = 40, 32, 6, 5
KINDS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4},
    "moe-lora": {"r": 4, "cond_dim": D, "n_experts": 2, "gate_width": 8},
    "personal-lora": {"r": 4, "cond_dim": D, "n_members": 3, "gate_dropout": 0.0},
    "cf-lora": {"r": 4, "cond_dim": D},
    "bottleneck": {"r": 4},
}


def base(seed: int = 0) -> nn.Module:
    return tiny_llama(VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, seed=seed)


def mixed_plan() -> dict[int, AdapterConfig | None]:
    """Different kinds and ranks per layer, two conditioned groups with their own conditioners."""
    return {
        0: LoRAConfig(r=4),
        1: make_config("moe-lora", r=16, cond_dim=D, n_experts=4, gate="mlp", gate_width=8),
        2: None,
        3: BottleneckConfig(r=8, target_modules=["up_proj", "down_proj"]),
        4: make_config("cf-lora", r=4, cond_dim=D),
    }


def randomize(model: nn.Module, seed: int) -> None:
    """Random B everywhere (zero at init) and conditioners moved off their init, so every weight matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator))
        for group in model.adapter_groups():
            for p in group.conditioner.parameters() if group.conditioner is not None else []:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def ids(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cond(batch: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_config_for_every_layer_is_attach_adapters(kind: str) -> None:
    config = make_config(kind, **KINDS[kind])
    torch.manual_seed(0)
    reference = attach_adapters(base(), config).eval()
    torch.manual_seed(0)
    model = attach_layerwise(base(), dict.fromkeys(range(N_LAYERS), config)).eval()
    assert [g.name for g in model.adapter_groups()] == ["layers_0_1_2_3_4"]
    ours, theirs = model.adapter_state_dict(), reference.adapter_state_dict()
    renamed = {k.replace("conditioner.layers_0_1_2_3_4.", "conditioner."): v for k, v in ours.items()}
    assert list(renamed) == list(theirs)  # same layers, same order
    assert all(torch.equal(renamed[k], theirs[k]) for k in theirs)  # same seed, same inits
    randomize(reference, seed=5)
    randomize(model, seed=5)
    c = None if not config.needs_cond else cond()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids(), cond=c).logits, reference(input_ids=ids(), cond=c).logits)
    lrs = {g["name"]: g["lr"] for g in model.param_groups(1e-3)}
    expected = {g["name"]: g["lr"] for g in reference.param_groups(1e-3)}
    assert lrs == {k.replace("conditioner", "conditioner.layers_0_1_2_3_4"): v for k, v in expected.items()}


def test_mixed_plan_builds_each_layers_kind_and_leaves_none_layers_untouched() -> None:
    original = base()
    untouched = {name: m for name, m in original.named_modules() if ".layers.2." in name}
    model = attach_layerwise(original, mixed_plan())
    path, blocks = decoder_layers(model.base_model)
    assert path == "model.layers" and len(blocks) == N_LAYERS
    expected = {
        0: (LoRALayer, 7, 4),
        1: (MoELoRALayer, 7, 16),
        3: (BottleneckLayer, 2, 8),
        4: (CFLoRALayer, 7, 4),
    }
    for index, (cls, count, r) in expected.items():
        layers = [m for m in blocks[index].modules() if isinstance(m, AdapterLayer)]
        assert len(layers) == count and all(type(m) is cls and m.r == r for m in layers), index
    assert not any(isinstance(m, AdapterLayer) for m in blocks[2].modules())
    assert {name: m for name, m in model.base_model.named_modules() if ".layers.2." in name} == untouched
    assert not any(p.requires_grad for p in blocks[2].parameters())
    assert len(model.adapter_layers) == 7 + 7 + 2 + 7
    assert sorted(model.conditioners) == ["layers_1", "layers_4"]  # lora and bottleneck have none
    assert model.plan == mixed_plan()
    with torch.no_grad():  # B = 0 everywhere: the base model's output
        out = model(input_ids=ids(), cond=cond()).logits
        assert torch.equal(out, base()(input_ids=ids()).logits)


def test_mixed_plan_hands_each_group_its_own_mix_and_trains_every_group() -> None:
    model = attach_layerwise(base(), mixed_plan())
    randomize(model, seed=6)
    seen: dict[str, tuple[int, ...] | None] = {}
    for name, layer in model.adapter_layers.items():
        layer.register_forward_hook(  # runs after the model's pre-hooks: sees the kwargs the layer got
            lambda m, args, kwargs, out, name=name: seen.__setitem__(
                name, tuple(kwargs["mix"].shape) if "mix" in kwargs else None
            ),
            with_kwargs=True,
        )
    model.train()
    model(input_ids=ids(), labels=ids(), cond=cond()).loss.backward()
    shapes = {(name.split(".")[2], shape) for name, shape in seen.items()}
    assert shapes == {("0", None), ("1", (2, 4)), ("3", None), ("4", (2, 4, 4))}  # gate [b, K], G [b, r, r]
    assert len(seen) == len(model.adapter_layers)
    for name, layer in model.adapter_layers.items():
        for key, p in layer.adapter_parameters().items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{key}"
    for name, conditioner in model.conditioners.items():
        for key, p in conditioner.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{key}"
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if ".lora_" not in n)
    groups = {g["name"]: g for g in model.param_groups(1e-3)}
    assert sorted(groups) == ["adapter", "conditioner.layers_1", "conditioner.layers_4"]
    assert groups["conditioner.layers_1"]["lr"] == pytest.approx(0.3e-3)  # moe-lora's gate scale
    assert groups["conditioner.layers_4"]["lr"] == pytest.approx(1e-3)
    trainable = {id(p) for g in groups.values() for p in g["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}


def test_each_row_depends_on_its_own_cond_and_cond_is_checked() -> None:
    model = attach_layerwise(base(), mixed_plan()).eval()
    randomize(model, seed=7)
    tokens, c = ids(), cond()
    with torch.no_grad():
        both = model(input_ids=tokens, cond=c).logits
        for row in range(2):
            alone = model(input_ids=tokens[row : row + 1], cond=c[row : row + 1]).logits
            assert_close(both[row], alone[0])
        same = tokens[:1].expand(2, -1)
        out = model(input_ids=same, cond=c).logits
        assert not torch.allclose(out[0], out[1], atol=1e-4)
    with pytest.raises(ValueError, match="needs cond"):
        model(input_ids=tokens)
    with pytest.raises(ValueError, match=r"cond must be \[batch, 6\]"):
        model(input_ids=tokens, cond=torch.randn(2, D + 1))
    assert all(not layer._forward_pre_hooks for layer in model.adapter_layers.values())
    unconditioned = attach_layerwise(base(), {0: LoRAConfig(r=4), 3: BottleneckConfig(r=8)})
    assert len(unconditioned.conditioners) == 0
    with pytest.raises(ValueError, match="not conditioned"):
        unconditioned(input_ids=tokens, cond=c)


def test_equal_configs_share_a_group_and_one_conditioner() -> None:
    moe = make_config("moe-lora", **KINDS["moe-lora"])
    plan = {0: moe, 1: LoRAConfig(r=4), 3: make_config("moe-lora", **KINDS["moe-lora"])}
    model = attach_layerwise(base(), plan)
    assert [g.name for g in model.adapter_groups()] == ["layers_0_3", "layers_1"]
    assert list(model.conditioners) == ["layers_0_3"]
    assert len(model.group_layers["layers_0_3"]) == 14


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match=r"layer indices in \[0, 5\)"):
        attach_layerwise(base(), {5: LoRAConfig()})
    with pytest.raises(ValueError, match="adapts no layer"):
        attach_layerwise(base(), {0: None, 1: None})
    with pytest.raises(ValueError, match="one cond_dim"):
        attach_layerwise(
            base(), {0: make_config("cf-lora", cond_dim=4), 1: make_config("moe-lora", cond_dim=8)}
        )
    with pytest.raises(ValueError, match="no module matches"):
        attach_layerwise(base(), {0: LoRAConfig(target_modules=["query"])})
    with pytest.raises(TypeError, match="AdapterConfig or None"):
        attach_layerwise(base(), {0: {"kind": "lora"}})  # type: ignore[dict-item]
    model = attach_layerwise(base(), {0: LoRAConfig()})
    with pytest.raises(ValueError, match="already has adapter layers"):
        attach_layerwise(model.base_model, {1: LoRAConfig()})


def test_save_then_load_gives_identical_outputs(tmp_path: Path) -> None:
    model = attach_layerwise(base(), mixed_plan()).eval()
    randomize(model, seed=8)
    folder = save_layerwise(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_WEIGHTS, LAYERWISE_PLAN])
    saved = json.loads((folder / LAYERWISE_PLAN).read_text())
    assert saved["plan"]["2"] is None and saved["plan"]["1"]["kind"] == "moe-lora"
    assert read_layerwise_plan(folder) == mixed_plan()
    reloaded = load_layerwise(base(), folder).eval()
    assert isinstance(reloaded, LayerwiseAdaptedModel) and reloaded.plan == model.plan
    with torch.no_grad():
        expected = model(input_ids=ids(), cond=cond()).logits
        assert torch.equal(reloaded(input_ids=ids(), cond=cond()).logits, expected)
        other = attach_layerwise(base(), mixed_plan()).eval()
        randomize(other, seed=9)
        assert not torch.allclose(other(input_ids=ids(), cond=cond()).logits, expected)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapters(base(), folder)  # a layer-wise folder is not a single-kind one
    with pytest.raises(ValueError, match="do not match"):
        attach_layerwise(base(), {0: LoRAConfig(r=4)}).load_adapter_state_dict(model.adapter_state_dict())
