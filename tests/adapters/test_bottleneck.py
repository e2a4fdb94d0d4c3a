"""The ``bottleneck`` kind: a parallel B GELU(A x) beside each projection, starting as the base model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_llm import tiny_llama
from torch import nn
from torch.testing import assert_close

from recadapt.adapters import (
    AdaptedModel,
    BottleneckConfig,
    BottleneckLayer,
    LoRAConfig,
    LoRALayer,
    attach_adapters,
    config_from_dict,
    load_adapters,
    make_config,
    save_adapters,
)

pytestmark = pytest.mark.usefixtures("single_thread")

IN, OUT, R, VOCAB, HIDDEN = 12, 10, 4, 40, 32
F64 = torch.float64


def ids(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_layer_starts_as_the_base_and_computes_the_scaled_bottleneck() -> None:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, dtype=F64)
    layer = BottleneckLayer(base, BottleneckConfig(r=R, alpha=8.0))
    x = torch.randn(3, 5, IN, dtype=F64)
    assert layer.lora_A.shape == (R, IN) and layer.lora_B.shape == (OUT, R)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + 2.0 * F.gelu(x @ layer.lora_A.T) @ layer.lora_B.T  # alpha / r = 8 / 4
    assert_close(layer(x), expected)
    lora = LoRALayer(base, LoRAConfig(r=R, alpha=8.0))  # the same weights without the nonlinearity differ
    with torch.no_grad():
        lora.lora_A.copy_(layer.lora_A)
        lora.lora_B.copy_(layer.lora_B)
    assert not torch.allclose(lora(x), layer(x))


def test_registered_with_a_round_tripping_config() -> None:
    config = make_config("bottleneck", r=8, alpha=16.0, target_modules="up_proj")
    assert isinstance(config, BottleneckConfig) and not config.needs_cond and config.scaling == 2.0
    assert config_from_dict(config.to_dict()) == config


def test_attached_model_starts_as_the_base_takes_no_cond_and_trains_a_then_b() -> None:
    base = tiny_llama(VOCAB, hidden_size=HIDDEN, logit_scale=20.0)
    torch.manual_seed(0)
    model = attach_adapters(tiny_llama(VOCAB, hidden_size=HIDDEN, logit_scale=20.0), BottleneckConfig(r=R))
    assert len(model.adapter_layers) == 14 and model.conditioner is None
    assert all(isinstance(layer, BottleneckLayer) for layer in model.adapter_layers.values())
    tokens = ids(batch=4, length=12)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, base(input_ids=tokens).logits)
    with pytest.raises(ValueError, match="not conditioned"):
        model(input_ids=tokens, cond=torch.randn(4, 6))
    groups = model.param_groups(1e-2)
    assert [g["name"] for g in groups] == ["adapter"]
    optimizer = torch.optim.AdamW(groups)

    def loss() -> torch.Tensor:
        return model(input_ids=tokens, labels=tokens).loss

    before = loss()
    before.backward()
    layers = list(model.adapter_layers.values())
    # B = 0 at init: B gets gradient at once, A only once B has moved (as in LoRA)
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in layers)
    assert all(layer.lora_A.grad is None or torch.count_nonzero(layer.lora_A.grad) == 0 for layer in layers)
    optimizer.step()
    optimizer.zero_grad()
    after = loss()
    assert after < before.detach() - 1e-3
    after.backward()
    for name, layer in model.adapter_layers.items():
        for key, p in layer.adapter_parameters().items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{key}"
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if ".lora_" not in n)


def test_save_then_load_gives_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = attach_adapters(tiny_llama(VOCAB, hidden_size=HIDDEN), BottleneckConfig(r=R, alpha=8.0)).eval()
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.lora_B.normal_(std=0.3)
    folder = save_adapters(model, tmp_path / "adapter")
    reloaded = load_adapters(tiny_llama(VOCAB, hidden_size=HIDDEN), folder).eval()
    assert isinstance(reloaded, AdaptedModel) and reloaded.adapter_config == model.adapter_config
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
        assert torch.equal(reloaded(input_ids=ids()).logits, expected)
        assert not torch.allclose(tiny_llama(VOCAB, hidden_size=HIDDEN)(input_ids=ids()).logits, expected)


def test_the_llm_recipe_accepts_the_kind() -> None:
    from recadapt.adapters.build import attach_adapter
    from recadapt.train.config import LLMConfig

    llm = LLMConfig(adapter="bottleneck", lora_r=R, lora_target_modules=["q_proj", "v_proj"])
    model = attach_adapter(tiny_llama(VOCAB, hidden_size=HIDDEN), llm)
    assert isinstance(model, AdaptedModel) and isinstance(model.adapter_config, BottleneckConfig)
    assert model.adapter_config.r == R and model.adapter_config.alpha == llm.lora_alpha
    assert len(model.adapter_layers) == 4
