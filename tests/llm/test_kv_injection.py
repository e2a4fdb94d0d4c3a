"""Collaborative KV injection on a tiny Llama: shapes, gradients into the injector, hidden CF slots change
nothing, the 2-D and 4-D mask paths agree, and layer 0's attention equals a hand computation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

from types import SimpleNamespace

import pytest
import torch
from tiny_llm import tiny_llama
from torch.testing import assert_close
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from recadapt.adapters import MoELoRAConfig, attach_adapters
from recadapt.llm.kv_injection import CFKeyValueInjector, forward_with_cf_prefix
from recadapt.llm.masking import context_attention_mask

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, HIDDEN, CF_DIM, M, T = 40, 32, 6, 3, 7
IMPLEMENTATIONS = ["eager", "sdpa"]
LENGTHS = [7, 4]
MASK = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def cf_vectors(seed: int = 4) -> torch.Tensor:
    return torch.randn(2, M, CF_DIM, generator=torch.Generator().manual_seed(seed))


def injector_for(model: torch.nn.Module, seed: int = 0, **kwargs: object) -> CFKeyValueInjector:
    torch.manual_seed(seed)
    return CFKeyValueInjector(CF_DIM, model.config, hidden=16, **kwargs)


def test_shapes_follow_the_config() -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN)
    injector = injector_for(model)
    assert (injector.n_layers, injector.n_kv_heads, injector.head_dim) == (2, 2, 8)
    keys, values = injector(cf_vectors())
    assert keys.shape == values.shape == (2, 2, 2, M, 8)  # [layers, B, kv heads, M, head_dim]
    assert not torch.equal(keys, values)
    cache = injector.cache(cf_vectors(), config=model.config, dtype=torch.float64)
    assert isinstance(cache, DynamicCache) and len(cache.layers) == 2
    for layer in range(2):
        assert cache.get_seq_length(layer) == M
        assert torch.equal(cache.layers[layer].keys, keys[layer].double())
    wide = SimpleNamespace(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=None, hidden_size=32
    )
    assert CFKeyValueInjector(CF_DIM, wide).n_kv_heads == 4 and CFKeyValueInjector(CF_DIM, wide).head_dim == 8
    explicit = CFKeyValueInjector(
        CF_DIM, SimpleNamespace(**{**vars(wide), "head_dim": 16}), activation="gelu"
    )
    assert explicit.head_dim == 16 and explicit(torch.randn(1, 2, CF_DIM))[0].shape == (3, 1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"cf must be \[B, M, 6\]"):
        injector(torch.randn(2, CF_DIM))
    with pytest.raises(ValueError, match="activation"):
        CFKeyValueInjector(CF_DIM, wide, activation="relu")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_hidden_cf_slots_change_nothing(implementation: str) -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN, attn_implementation=implementation).eval()
    injector = injector_for(model)
    tokens, hidden = ids(), torch.zeros(2, M)
    with torch.no_grad():
        plain = model(input_ids=tokens, attention_mask=MASK).logits
        masked_2d = forward_with_cf_prefix(
            model, injector, cf_vectors(), input_ids=tokens, attention_mask=MASK, cf_mask=hidden
        ).logits
        mask_4d = context_attention_mask(torch.zeros_like(MASK), MASK, prefix_len=M, prefix_mask=hidden)
        masked_4d = forward_with_cf_prefix(
            model, injector, cf_vectors(), input_ids=tokens, attention_mask=mask_4d
        ).logits
        shown = forward_with_cf_prefix(model, injector, cf_vectors(), input_ids=tokens, attention_mask=MASK)
    for b, n in enumerate(LENGTHS):
        assert_close(masked_2d[b, :n], plain[b, :n], atol=1e-5, rtol=1e-4)
        assert_close(masked_4d[b, :n], plain[b, :n], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(shown.logits[b, :n], plain[b, :n], atol=1e-4)  # visible slots matter
    assert shown.past_key_values.get_seq_length() == M + T


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_2d_and_4d_mask_paths_agree_and_rows_read_their_own_slots(implementation: str) -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN, attn_implementation=implementation).eval()
    injector = injector_for(model)
    tokens, cf = ids(), cf_vectors()
    slot_mask = torch.tensor([[1, 1, 1], [1, 0, 1]])  # row 1's second history item is padding
    with torch.no_grad():
        two_d = forward_with_cf_prefix(
            model, injector, cf, input_ids=tokens, attention_mask=MASK, cf_mask=slot_mask
        ).logits
        four_d = forward_with_cf_prefix(
            model,
            injector,
            cf,
            input_ids=tokens,
            attention_mask=context_attention_mask(
                torch.zeros_like(MASK), MASK, prefix_len=M, prefix_mask=slot_mask
            ),
        ).logits
        for b, n in enumerate(LENGTHS):
            assert_close(four_d[b, :n], two_d[b, :n], atol=1e-5, rtol=1e-4)
            alone = forward_with_cf_prefix(
                model,
                injector,
                cf[b : b + 1],
                input_ids=tokens[b : b + 1, :n],
                cf_mask=slot_mask[b : b + 1],
            ).logits
            assert_close(alone[0], two_d[b, :n], atol=1e-5, rtol=1e-4)
        changed = cf.clone()
        changed[1, 1] += 5.0  # a hidden slot: nothing changes
        assert_close(
            forward_with_cf_prefix(
                model, injector, changed, input_ids=tokens, attention_mask=MASK, cf_mask=slot_mask
            ).logits,
            two_d,
        )


def test_left_padding_gets_positions_from_zero() -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN).eval()
    injector = injector_for(model)
    tokens, cf = ids(), cf_vectors()
    left = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = forward_with_cf_prefix(model, injector, cf[:1], input_ids=tokens[:1], attention_mask=left)
        alone = forward_with_cf_prefix(model, injector, cf[:1], input_ids=tokens[:1, 3:])
    assert_close(padded.logits[0, 3:], alone.logits[0], atol=1e-5, rtol=1e-4)


def test_gradients_reach_the_injector_through_the_cache() -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN, logit_scale=20.0)
    model.requires_grad_(False)
    injector = injector_for(model)
    tokens = ids()
    out = forward_with_cf_prefix(
        model, injector, cf_vectors(), input_ids=tokens, attention_mask=MASK, labels=tokens
    )
    out.loss.backward()
    for name, p in injector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer = torch.optim.AdamW(injector.parameters(), lr=1e-2)
    optimizer.step()
    with torch.no_grad():
        after = forward_with_cf_prefix(
            model, injector, cf_vectors(), input_ids=tokens, attention_mask=MASK, labels=tokens
        ).loss
    assert after < out.loss.detach()


def test_an_adapted_model_takes_cond_through_the_call() -> None:
    torch.manual_seed(0)
    adapted = attach_adapters(
        tiny_llama(VOCAB, hidden_size=HIDDEN), MoELoRAConfig(r=4, n_experts=2, cond_dim=5)
    )
    injector = injector_for(adapted)
    tokens = ids()
    out = forward_with_cf_prefix(
        adapted,
        injector,
        cf_vectors(),
        input_ids=tokens,
        attention_mask=MASK,
        labels=tokens,
        cond=torch.randn(2, 5),
    )
    out.loss.backward()
    assert all(p.grad is not None for p in adapted.conditioner.parameters())
    assert all(p.grad is not None for p in injector.parameters())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_slots_take_the_models_dtype_on_bf16_and_under_autocast(implementation: str) -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN, attn_implementation=implementation).eval()
    injector = injector_for(model)  # fp32: a bf16 model refuses fp32 keys unless they are cast
    with torch.no_grad():
        expected = forward_with_cf_prefix(model, injector, cf_vectors(), input_ids=ids()).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = forward_with_cf_prefix(model, injector, cf_vectors(), input_ids=ids()).logits
        low = forward_with_cf_prefix(model.to(torch.bfloat16), injector, cf_vectors(), input_ids=ids())
    assert auto.dtype == low.logits.dtype == torch.bfloat16
    assert low.past_key_values.layers[0].keys.dtype == torch.bfloat16
    for out in (auto, low.logits):
        assert_close(out.float(), expected, atol=0.05 * float(expected.abs().max()), rtol=0)


def test_layer_zero_attention_equals_a_hand_computation() -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN, attn_implementation="eager").eval()
    injector = injector_for(model)
    tokens, cf = ids(), cf_vectors()
    captured = {}
    attention = model.model.layers[0].self_attn
    attention.register_forward_hook(lambda m, args, out: captured.__setitem__("out", out[0]))
    with torch.no_grad():
        forward_with_cf_prefix(model, injector, cf, input_ids=tokens, attention_mask=MASK)
        keys, values = injector(cf)
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens))
        positions = (MASK.cumsum(-1) - 1).clamp(min=0)
        cos, sin = model.model.rotary_emb(x, position_ids=positions)
        heads, kv_heads, dim = 4, 2, 8

        def split(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(2, T, n, dim).transpose(1, 2)

        q, k = apply_rotary_pos_emb(
            split(attention.q_proj(x), heads), split(attention.k_proj(x), kv_heads), cos, sin
        )
        k = torch.cat([keys[0], k], dim=2).repeat_interleave(heads // kv_heads, dim=1)  # slots: no rotation
        v = torch.cat([values[0], split(attention.v_proj(x), kv_heads)], dim=2).repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / dim**0.5
        allowed = torch.ones(2, T, M + T, dtype=torch.bool)
        allowed[:, :, M:] = torch.tril(torch.ones(T, T, dtype=torch.bool)) & MASK.bool()[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        expected = attention.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, heads * dim))
    for b, n in enumerate(LENGTHS):
        assert_close(captured["out"][b, :n], expected[b, :n], atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_refused() -> None:
    model = tiny_llama(VOCAB, hidden_size=HIDDEN)
    injector = injector_for(model)
    with pytest.raises(ValueError, match="exactly one"):
        forward_with_cf_prefix(model, injector, cf_vectors())
    with pytest.raises(ValueError, match="one row per text row"):
        forward_with_cf_prefix(model, injector, cf_vectors()[:1], input_ids=ids())
    with pytest.raises(ValueError, match=r"\[B, 1, T, M \+ T\]"):
        forward_with_cf_prefix(
            model, injector, cf_vectors(), input_ids=ids(), attention_mask=torch.zeros(2, 1, T, T)
        )
    mask_4d = context_attention_mask(torch.zeros_like(MASK), MASK, prefix_len=M)
    with pytest.raises(ValueError, match="prefix_mask"):
        forward_with_cf_prefix(
            model, injector, cf_vectors(), input_ids=ids(), attention_mask=mask_4d, cf_mask=torch.ones(2, M)
        )
    with pytest.raises(ValueError, match=r"cf_mask must be \[B, M\]"):
        forward_with_cf_prefix(model, injector, cf_vectors(), input_ids=ids(), cf_mask=torch.ones(2, M + 1))
