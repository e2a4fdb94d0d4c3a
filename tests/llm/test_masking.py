"""Context masking against brute force on a tiny Llama (eager and sdpa): every token's hidden state under the 4-D
mask equals what it gets when each layer lets it read only its allowed tokens."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

import pytest
import torch
from tiny_llm import tiny_llama
from torch import nn
from torch.testing import assert_close

from recadapt.llm.masking import context_allowed, context_attention_mask, segment_ids_from_spans

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, T = 40, 12
IMPLEMENTATIONS = ["eager", "sdpa"]
# three rows, right-padded to 12 tokens: instruction (0) and history items (1, 2, ...), an item at the very start
SEGMENTS = torch.tensor(
    [
        [0, 0, 1, 1, 1, 0, 2, 2, 0, 3, 3, 0],
        [1, 1, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0],
    ]
)
LENGTHS = [12, 8, 5]
MASK = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])


def allowed_by_rule(segments: list[int], mask: list[int], q: int) -> list[int]:
    """Brute force of the rules, token by token: the text tokens query ``q`` may read (q included)."""
    if not mask[q]:
        return [q]
    if segments[q] == 0:
        return [k for k in range(q + 1) if mask[k]]
    return [k for k in range(q + 1) if mask[k] and segments[k] == segments[q]]


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (len(LENGTHS), T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def layerwise_reference(
    model: nn.Module, tokens: torch.Tensor, allowed: dict[int, list[int]]
) -> torch.Tensor:
    """Final hidden states [T, H] of one row, layer by layer: token q's output at a layer is the decoder layer run
    on the previous layer's states of q's allowed tokens (q last, original positions), last position kept. The
    last token of a sequence reads all of it whatever the implementation's causal default, so no mask is needed.
    """
    inner = model.model
    h = inner.embed_tokens(tokens)
    for layer in inner.layers:
        new = h.clone()
        for q, keys in allowed.items():
            sub = h[keys][None]
            positions = torch.tensor(keys)[None]
            embeddings = inner.rotary_emb(sub, position_ids=positions)
            new[q] = layer(sub, position_ids=positions, position_embeddings=embeddings)[0, -1]
        h = new
    return inner.norm(h)


def test_allowed_matches_the_rules_with_a_prefix_and_padded_slots() -> None:
    prefix_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    allowed = context_allowed(SEGMENTS, MASK, prefix_len=3, prefix_mask=prefix_mask)
    assert allowed.shape == (3, T, 3 + T) and allowed.dtype == torch.bool
    for b in range(3):
        for q in range(T):
            expected = torch.zeros(3 + T, dtype=torch.bool)
            expected[[3 + k for k in allowed_by_rule(SEGMENTS[b].tolist(), MASK[b].tolist(), q)]] = True
            if MASK[b, q]:
                expected[:3] = prefix_mask[b].bool()
            assert torch.equal(allowed[b, q], expected), (b, q)
    every_slot = context_allowed(SEGMENTS, MASK, prefix_len=2)
    assert torch.equal(every_slot[..., :2], MASK.bool()[:, :, None].expand(3, T, 2))


def test_mask_format_is_additive_float_and_refuses_bad_input() -> None:
    mask = context_attention_mask(SEGMENTS, MASK, prefix_len=2, dtype=torch.bfloat16)
    assert mask.shape == (3, 1, T, 2 + T) and mask.dtype == torch.bfloat16
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}
    allowed = context_allowed(SEGMENTS, MASK, prefix_len=2)
    assert torch.equal(mask[:, 0] == 0, allowed)
    with pytest.raises(ValueError, match="floating"):
        context_attention_mask(SEGMENTS, MASK, dtype=torch.bool)
    with pytest.raises(ValueError, match=">= 0"):
        context_allowed(SEGMENTS - 1, MASK)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        context_allowed(SEGMENTS, MASK[:, :5])
    with pytest.raises(ValueError, match="prefix_mask"):
        context_allowed(SEGMENTS, MASK, prefix_len=2, prefix_mask=torch.ones(3, 3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked_hidden_states_equal_the_layerwise_brute_force(implementation: str) -> None:
    model = tiny_llama(VOCAB, attn_implementation=implementation).eval()
    assert model.config._attn_implementation == implementation
    tokens = ids()
    positions = torch.arange(T).expand(3, -1)
    mask = context_attention_mask(SEGMENTS, MASK)
    with torch.no_grad():
        out = model.model(input_ids=tokens, attention_mask=mask, position_ids=positions).last_hidden_state
    assert not out.isnan().any()  # padded rows see themselves
    for b, n in enumerate(LENGTHS):
        allowed = {q: allowed_by_rule(SEGMENTS[b].tolist(), MASK[b].tolist(), q) for q in range(n)}
        expected = layerwise_reference(model, tokens[b], allowed)
        assert_close(out[b, :n], expected[:n], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the mask matters: a plain causal run differs on the items' tokens
        causal = model.model(input_ids=tokens, attention_mask=MASK).last_hidden_state
    assert not torch.allclose(causal[0, :12], out[0, :12], atol=1e-4)
    assert_close(causal[0, :2], out[0, :2], atol=1e-5, rtol=1e-4)  # before the first item: the same


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_an_items_tokens_are_encoded_as_the_item_alone(implementation: str) -> None:
    """DARec's point: an item token's state is that of the item's tokens run alone at their positions."""
    model = tiny_llama(VOCAB, attn_implementation=implementation).eval()
    tokens = ids(seed=5)
    with torch.no_grad():
        out = model.model(
            input_ids=tokens,
            attention_mask=context_attention_mask(SEGMENTS, MASK),
            position_ids=torch.arange(T).expand(3, -1),
        ).last_hidden_state
        for b, n in enumerate(LENGTHS):
            for q in range(n):
                if SEGMENTS[b, q] == 0:
                    continue
                keys = allowed_by_rule(SEGMENTS[b].tolist(), MASK[b].tolist(), q)
                alone = model.model(input_ids=tokens[b, keys][None], position_ids=torch.tensor(keys)[None])
                assert_close(out[b, q], alone.last_hidden_state[0, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_all_context_segments_reproduce_the_models_own_padding_mask(implementation: str) -> None:
    model = tiny_llama(VOCAB, attn_implementation=implementation).eval()
    tokens, zeros = ids(seed=7), torch.zeros_like(SEGMENTS)
    with torch.no_grad():
        ours = model(
            input_ids=tokens,
            attention_mask=context_attention_mask(zeros, MASK),
            position_ids=torch.arange(T).expand(3, -1),
        ).logits
        theirs = model(input_ids=tokens, attention_mask=MASK).logits
    for b, n in enumerate(LENGTHS):
        assert_close(ours[b, :n], theirs[b, :n], atol=1e-5, rtol=1e-4)


def test_segment_ids_from_spans() -> None:
    segments = segment_ids_from_spans([[(2, 5), (6, 8), (9, 11)], [(0, 2), (3, 6)], [(1, 3), (4, 5)]], T)
    assert torch.equal(segments[0], SEGMENTS[0]) and torch.equal(segments[2], SEGMENTS[2])
    assert torch.equal(segments[1], SEGMENTS[1])
    with pytest.raises(ValueError, match="overlaps"):
        segment_ids_from_spans([[(0, 3), (2, 4)]], T)
    with pytest.raises(ValueError, match="outside"):
        segment_ids_from_spans([[(10, 13)]], T)
