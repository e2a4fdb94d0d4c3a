"""Adapters attached to a tiny Llama: explicit conditioning, PEFT parity, gradients, save/load, one training step."""

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
    ADAPTER_WEIGHTS,
    AdaptedModel,
    AdapterLayer,
    LoRAConfig,
    attach_adapters,
    load_adapters,
    load_lora_weights,
    make_config,
    save_adapters,
)

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, HIDDEN, D, R = 40, 32, 6, 4
N_TARGETS = 2 * 7  # two decoder layers, seven projections each
KINDS: dict[str, dict[str, Any]] = {
    "lora": {},
    "moe-lora": {"cond_dim": D, "n_experts": 2, "gate_width": 8},
    "personal-lora": {"cond_dim": D, "n_members": 3, "gate_dropout": 0.0},
    "cf-lora": {"cond_dim": D},
}
CONDITIONED = [k for k in KINDS if k != "lora"]


def adapted(kind: str, *, seed: int = 0, randomize: bool = True, **values: Any) -> AdaptedModel:
    """A tiny Llama with ``kind`` attached; ``randomize`` makes B (zero at init) random so every path matters."""
    torch.manual_seed(seed)
    model = attach_adapters(
        tiny_llama(VOCAB, hidden_size=HIDDEN), make_config(kind, r=R, **{**KINDS[kind], **values})
    )
    return randomize_lora_b(model, seed + 1) if randomize else model.eval()


def ids(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cond_for(kind: str, batch: int = 2, seed: int = 4) -> torch.Tensor | None:
    return None if kind == "lora" else torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model: AdaptedModel) -> bool:
    return all(not layer._forward_pre_hooks for layer in model.adapter_layers.values())


@pytest.mark.parametrize("kind", list(KINDS))
def test_attach_freezes_the_base_replaces_every_target_and_starts_as_the_base(kind: str) -> None:
    base = tiny_llama(VOCAB, hidden_size=HIDDEN)
    model = adapted(kind, randomize=False)
    layers = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == len(model.adapter_layers) == N_TARGETS
    assert all(not p.requires_grad for n, p in model.base_model.named_parameters() if ".lora_" not in n)
    trainable = {id(p) for group in model.param_groups(1e-3) for p in group["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.config is model.base_model.config
    assert model.get_input_embeddings() is model.base_model.get_input_embeddings()
    with torch.no_grad():
        out = model(input_ids=ids(), cond=cond_for(kind)).logits
        assert torch.equal(out, base(input_ids=ids()).logits)  # B = 0: exactly the base model
    with pytest.raises(ValueError, match="already has adapter layers"):
        attach_adapters(model.base_model, make_config(kind, **KINDS[kind]))


def test_unknown_targets_are_refused_with_the_available_names() -> None:
    with pytest.raises(ValueError, match="'q_proj'"):
        attach_adapters(tiny_llama(VOCAB, hidden_size=HIDDEN), LoRAConfig(target_modules=["query"]))
    model = attach_adapters(
        tiny_llama(VOCAB, hidden_size=HIDDEN), LoRAConfig(target_modules=["q_proj", "v_proj"])
    )
    assert sorted({name.rsplit(".", 1)[1] for name in model.adapter_layers}) == ["q_proj", "v_proj"]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT
def test_lora_matches_peft_on_the_same_weights() -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    ours = adapted("lora", randomize=False, alpha=8.0, dropout=0.1)
    theirs = get_peft_model(
        tiny_llama(VOCAB, hidden_size=HIDDEN),
        PeftLoraConfig(
            r=R, lora_alpha=8, lora_dropout=0.1, target_modules=list(ours.adapter_config.target_modules)
        ),
    ).eval()
    generator = torch.Generator().manual_seed(5)
    copied = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if name in ours.adapter_layers:
                layer = ours.adapter_layers[name]
                module.lora_B["default"].weight.normal_(generator=generator)
                layer.lora_A.copy_(module.lora_A["default"].weight)
                layer.lora_B.copy_(module.lora_B["default"].weight)
                copied += 1
        assert copied == N_TARGETS
        expected = theirs(input_ids=ids()).logits
        assert_close(ours(input_ids=ids()).logits, expected)
        assert not torch.allclose(expected, tiny_llama(VOCAB, hidden_size=HIDDEN)(input_ids=ids()).logits)


@pytest.mark.parametrize("kind", CONDITIONED)
def test_each_row_depends_on_its_own_cond_only(kind: str) -> None:
    model = adapted(kind)
    tokens, cond = ids(), cond_for(kind)
    with torch.no_grad():
        both = model(input_ids=tokens, cond=cond).logits
        for row in range(2):
            alone = model(input_ids=tokens[row : row + 1], cond=cond[row : row + 1]).logits
            assert_close(both[row], alone[0])
        same_input = tokens[:1].expand(2, -1)
        out = model(input_ids=same_input, cond=cond).logits
        assert not torch.allclose(out[0], out[1], atol=1e-4)  # two conds, two outputs
        swapped = model(input_ids=same_input, cond=cond.flip(0)).logits
        assert_close(swapped, out.flip(0))
        one_cond = model(input_ids=tokens, cond=cond[:1]).logits  # one cond row applies to every row
        assert_close(one_cond, model(input_ids=tokens, cond=cond[:1].expand(2, -1)).logits)
    assert no_hooks_left(model)


@pytest.mark.parametrize("kind", CONDITIONED)
def test_missing_or_wrong_cond_raises_and_leaves_no_hooks(kind: str) -> None:
    model = adapted(kind)
    with pytest.raises(ValueError, match="needs cond"):
        model(input_ids=ids())
    with pytest.raises(ValueError, match=r"cond must be \[batch, 6\]"):
        model(input_ids=ids(), cond=torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="repeat_interleave"):
        model(input_ids=ids(), cond=torch.randn(3, D))  # raised inside a layer, with the hooks in place
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match="cond="):  # the base model alone has no mix to give the layers
        model.base_model(input_ids=ids())
    with pytest.raises(ValueError, match="not conditioned"):
        adapted("lora")(input_ids=ids(), cond=torch.randn(2, D))


@pytest.mark.parametrize("kind", CONDITIONED)
def test_the_conditioner_runs_once_per_call_and_decoding_with_a_cache_matches(kind: str) -> None:
    model = adapted(kind)
    calls = []
    model.conditioner.register_forward_hook(lambda *_: calls.append(1))
    tokens, cond = ids(length=10), cond_for(kind)
    with torch.no_grad():
        full = model(input_ids=tokens, cond=cond).logits
        assert len(calls) == 1
        prefix = model(input_ids=tokens[:, :7], cond=cond, use_cache=True)
        step = model(
            input_ids=tokens[:, 7:], past_key_values=prefix.past_key_values, cond=cond, use_cache=True
        )
    assert_close(step.logits, full[:, 7:], atol=1e-5, rtol=1e-4)
    calls.clear()
    generated = model.generate(input_ids=tokens[:, :5], cond=cond, max_new_tokens=4, do_sample=False)
    assert len(calls) == 1 and no_hooks_left(model)
    sequence = tokens[:, :5]
    with torch.no_grad():
        for _ in range(4):  # greedy without a cache, the cond applied at every step
            next_token = model(input_ids=sequence, cond=cond).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_autocast_runs_in_bf16_and_stays_close_to_fp32(kind: str) -> None:
    model = adapted(kind)
    with torch.no_grad():  # moderate updates: large ones make even the merged weights drift a lot in bf16
        for layer in model.adapter_layers.values():
            layer.lora_B.mul_(0.1)
    tokens, cond = ids(), cond_for(kind)
    with torch.no_grad():
        expected = model.eval()(input_ids=tokens, cond=cond).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=tokens, labels=tokens, cond=cond)
    assert out.logits.dtype == torch.bfloat16
    assert_close(out.logits.float(), expected, atol=0.05 * float(expected.abs().max()), rtol=0)
    out.loss.backward()
    trainable = [p for group in model.param_groups(1.0) for p in group["params"]]
    assert all(
        p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in trainable
    )


@pytest.mark.parametrize("kind", CONDITIONED)
def test_gradient_checkpointing_is_refused_not_silently_wrong(kind: str) -> None:
    model = adapted(kind).train()
    model.base_model.activation_checkpointing_enable()
    loss = model(input_ids=ids(), labels=ids(), cond=cond_for(kind)).loss
    with pytest.raises(ValueError, match="gradient checkpointing"):
        loss.backward()  # the recomputation runs after the call, without the mix


@pytest.mark.parametrize("kind", CONDITIONED)
def test_gradients_reach_the_adapters_and_the_conditioner_not_the_base(kind: str) -> None:
    model = adapted(kind).train()
    model(input_ids=ids(), labels=ids(), cond=cond_for(kind)).loss.backward()
    for name, p in model.conditioner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, layer in model.adapter_layers.items():
        for key, p in layer.adapter_parameters().items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{key}"
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if ".lora_" not in n)
    groups = {g["name"]: g for g in model.param_groups(1e-3)}
    expected_lr = 0.3e-3 if kind == "moe-lora" else 1e-3  # iLoRA's gate trains at 0.3 x the base lr
    assert groups["conditioner"]["lr"] == pytest.approx(expected_lr) and groups["adapter"]["lr"] == 1e-3


def test_cf_lora_from_a_trained_lora_starts_as_it_and_trains_only_g(tmp_path: Path) -> None:
    lora = adapted("lora", alpha=8.0)
    save_adapters(lora, tmp_path / "lora")
    tokens, cond = ids(), cond_for("cf-lora")
    exact = adapted("cf-lora", randomize=False, alpha=8.0, freeze_ab=True, g_init_std=0.0)  # G = I exactly
    load_lora_weights(exact, tmp_path / "lora")
    with torch.no_grad():
        assert_close(exact(input_ids=tokens, cond=cond).logits, lora(input_ids=tokens).logits)
    cf = adapted(
        "cf-lora", randomize=False, alpha=8.0, freeze_ab=True
    )  # G = I + O(1e-3): all of G's net trains
    load_lora_weights(cf, lora)
    cf.train()
    cf(input_ids=tokens, labels=tokens, cond=cond).loss.backward()
    assert all(
        p.grad is None for layer in cf.adapter_layers.values() for p in layer.adapter_parameters().values()
    )
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cf.conditioner.parameters())
    assert [g["name"] for g in cf.param_groups(1e-3)] == ["conditioner"]
    with pytest.raises(ValueError, match="alpha"):
        load_lora_weights(adapted("cf-lora", alpha=4.0), lora)
    with pytest.raises(ValueError, match="shape"):
        load_lora_weights(adapted("personal-lora", alpha=8.0), lora)
    with pytest.raises(ValueError, match="must be a 'lora' adapter"):
        load_lora_weights(adapted("cf-lora", alpha=8.0), cf)


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_then_load_gives_identical_logits(kind: str, tmp_path: Path) -> None:
    model = adapted(kind, seed=7)
    with torch.no_grad():  # move the conditioner off its init too
        for p in model.conditioner.parameters() if model.conditioner is not None else []:
            p.add_(0.05 * torch.randn_like(p))
    folder = save_adapters(model, tmp_path / "adapter")
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    assert set(state) == set(model.adapter_state_dict())
    assert not any("base_layer" in key or "embed" in key for key in state)  # adapter and conditioner only
    saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert saved["kind"] == kind and saved["config"]["r"] == R
    reloaded = load_adapters(tiny_llama(VOCAB, hidden_size=HIDDEN), folder).eval()
    assert reloaded.adapter_config == model.adapter_config
    with torch.no_grad():
        expected = model(input_ids=ids(), cond=cond_for(kind)).logits
        assert torch.equal(reloaded(input_ids=ids(), cond=cond_for(kind)).logits, expected)
        fresh = adapted(kind, seed=8)  # other weights: the comparison above can fail
        assert not torch.allclose(fresh(input_ids=ids(), cond=cond_for(kind)).logits, expected)
    other = "lora" if kind != "lora" else "cf-lora"
    with pytest.raises(ValueError, match="do not match"):
        adapted(other).load_adapter_state_dict(state)


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_optimizer_step_reduces_a_toy_loss(kind: str) -> None:
    torch.manual_seed(0)
    model = attach_adapters(
        tiny_llama(VOCAB, hidden_size=HIDDEN, logit_scale=20.0), make_config(kind, r=R, **KINDS[kind])
    )
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2))
    tokens, cond = ids(batch=4, length=12), cond_for(kind, batch=4)

    def loss() -> torch.Tensor:
        return model(input_ids=tokens, labels=tokens, cond=cond).loss

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before.detach() - 1e-3


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT
def test_cf_lora_starts_from_a_peft_lora_folder(tmp_path) -> None:
    """The LLM recipe saves ``lora`` runs in PEFT's format; CFLoRA with G = I then reproduces that LoRA."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(3)
    targets = list(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(
        tiny_llama(VOCAB, hidden_size=HIDDEN), PeftLoraConfig(r=R, lora_alpha=8, target_modules=targets)
    ).eval()
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.normal_()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    cf = adapted("cf-lora", randomize=False, alpha=8.0, g_init_std=0.0, target_modules=targets)
    load_lora_weights(cf, tmp_path / "peft")
    tokens, cond = ids(), cond_for("cf-lora")
    with torch.no_grad():
        assert_close(cf(input_ids=tokens, cond=cond).logits, peft_model(input_ids=tokens).logits)
    wrong_rank = attach_adapters(
        tiny_llama(VOCAB, hidden_size=HIDDEN), make_config("cf-lora", r=2 * R, alpha=8.0, cond_dim=D)
    )
    with pytest.raises(ValueError, match="r=4"):
        load_lora_weights(wrong_rank, tmp_path / "peft")
