"""Laser's M-Former: shapes, routing over real history items only, padding and empty-history safety, gradient
flow through top-1 routing, and the Switch load-balancing loss."""

from __future__ import annotations

import pytest
import torch

from recadapt.llm.mformer import MFormer, MFormerConfig, count_parameters, switch_balance_loss

pytestmark = pytest.mark.usefixtures("single_thread")

CRM_DIM = 16
LLM_HIDDEN = 24
B, N = 4, 6


def _config(**overrides: object) -> MFormerConfig:
    values: dict[str, object] = dict(
        crm_dim=CRM_DIM, llm_hidden=LLM_HIDDEN, n_experts=4, n_queries=3, n_blocks=3, hidden=16, n_heads=2
    )
    values.update(overrides)
    return MFormerConfig(**values)  # type: ignore[arg-type]


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded histories of lengths 6, 3, 1 and 0 (an empty row)."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(B, N, CRM_DIM, generator=generator)
    lengths = torch.tensor([6, 3, 1, 0])
    mask = torch.arange(N)[None, :] >= N - lengths[:, None]
    return states, mask


def _model(**overrides: object) -> MFormer:
    torch.manual_seed(0)
    return MFormer(_config(**overrides))


def test_output_shapes_and_routing() -> None:
    model = _model().eval()
    out = model(*_inputs())
    assert out.prefix.shape == (B, 3, LLM_HIDDEN)
    assert out.router_probs.shape == (B, 4)
    assert out.expert_index.shape == (B,) and out.expert_index.dtype == torch.long
    assert torch.equal(out.expert_index, out.router_probs.argmax(-1))
    torch.testing.assert_close(out.router_probs.sum(-1), torch.ones(B))
    assert out.balance_loss.dim() == 0 and 0 < out.balance_loss.item() <= 4  # K


def test_gradient_reaches_queries_router_blocks_and_projection() -> None:
    model = _model(dropout=0.0).train()
    out = model(*_inputs())
    (out.prefix.square().mean() + 0.01 * out.balance_loss).backward()
    named = dict(model.named_parameters())
    for name in ("queries", "router.weight", "blocks.0.cross_attn.in_proj_bias", "out_proj.weight"):
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    for i, block in enumerate(model.blocks):
        for p in block.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"block {i}"
    # the router also learns from the LM-side loss alone, through the p_i scaling of the chosen queries
    model.zero_grad()
    model(*_inputs()).prefix.square().mean().backward()
    assert model.router is not None and model.router.weight.grad is not None
    assert model.router.weight.grad.abs().sum() > 0


def test_cross_attention_in_alternate_blocks() -> None:
    model = _model(n_blocks=4)
    assert [block.cross_attn is not None for block in model.blocks] == [True, False, True, False]


def test_without_moe_single_query_set_no_router_zero_balance_loss() -> None:
    model = _model(use_moe=False).eval()
    assert model.router is None and model.queries.shape[0] == 1
    assert not any("router" in name for name, _ in model.named_parameters())
    out = model(*_inputs())
    assert out.balance_loss.item() == 0.0
    assert torch.equal(out.expert_index, torch.zeros(B, dtype=torch.long))
    assert out.router_probs.shape == (B, 1) and torch.all(out.router_probs == 1)
    assert torch.isfinite(out.prefix).all()


def test_padding_invariance_in_eval_mode() -> None:
    model = _model().eval()
    states, mask = _inputs()
    extra = 5
    noise = 100 * torch.randn(B, extra, CRM_DIM)  # large, so any leak would show
    padded_states = torch.cat([noise, states], 1)
    padded_mask = torch.cat([torch.zeros(B, extra, dtype=torch.bool), mask], 1)
    with torch.no_grad():
        short, long = model(states, mask), model(padded_states, padded_mask)
    torch.testing.assert_close(long.prefix, short.prefix, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long.router_probs, short.router_probs)
    assert torch.equal(long.expert_index, short.expert_index)
    # changing the values at padded positions does not matter either
    with torch.no_grad():
        again = model(torch.where(padded_mask[..., None], padded_states, -padded_states), padded_mask)
    torch.testing.assert_close(again.prefix, long.prefix)


def test_empty_history_rows_are_finite_in_forward_and_backward() -> None:
    model = _model().train()
    states, _ = _inputs()
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, -2:] = True  # one real row beside three empty ones
    out = model(states, mask)
    assert torch.isfinite(out.prefix).all() and torch.isfinite(out.router_probs).all()
    torch.testing.assert_close(out.router_probs[1:], torch.full((B - 1, 4), 0.25))  # zero logits: uniform
    (out.prefix.sum() + out.balance_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    all_empty = model(states, torch.zeros(B, N, dtype=torch.bool))
    assert torch.isfinite(all_empty.prefix).all()


def test_routing_aggregates_only_real_items() -> None:
    """A padded item whose logits would dominate the average must not flip the chosen expert."""
    model = _model().eval()
    assert model.router is not None
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.zero_()
        model.router.weight[1, 0] = 1.0  # feature 0 votes for expert 1
        model.router.weight[3, 1] = 1.0  # feature 1 votes for expert 3
    states = torch.zeros(1, 3, CRM_DIM)
    states[0, 0, 1] = 50.0  # the padded (oldest) position votes strongly for expert 3
    states[0, 1:, 0] = 1.0  # the two real items vote for expert 1
    mask = torch.tensor([[False, True, True]])
    assert model(states, mask).expert_index.item() == 1
    assert model(states, torch.ones_like(mask)).expert_index.item() == 3  # the padded item would flip it


def test_deterministic_in_eval_mode() -> None:
    model = _model().eval()
    with torch.no_grad():
        first, second = model(*_inputs()), model(*_inputs())
    assert torch.equal(first.prefix, second.prefix)
    assert torch.equal(first.expert_index, second.expert_index)


def test_switch_balance_loss_uniform_and_collapsed() -> None:
    k = 4
    uniform = switch_balance_loss(torch.full((8, k), 1 / k), torch.arange(8) % k, k)
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    collapsed_probs = torch.zeros(8, k)
    collapsed_probs[:, 2] = 1.0
    collapsed = switch_balance_loss(collapsed_probs, torch.full((8,), 2), k)
    torch.testing.assert_close(collapsed, torch.tensor(float(k)))
    skewed_probs = torch.softmax(torch.tensor([[2.0, 0.0, 0.0, 0.0]]).expand(8, -1), -1)
    assert switch_balance_loss(skewed_probs, torch.zeros(8, dtype=torch.long), k) > 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"crm_dim": 0},
        {"n_experts": 0},
        {"n_queries": 0},
        {"n_blocks": 0},
        {"hidden": 10, "n_heads": 3},
        {"dropout": 1.0},
        {"use_moe": 1},
        {"balance_weight": -0.1},
        {"hidden": True},
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _config(**overrides)


def test_forward_rejects_bad_inputs() -> None:
    model = _model()
    states, mask = _inputs()
    with pytest.raises(ValueError, match="crm_states"):
        model(states[..., :-1], mask)
    with pytest.raises(ValueError, match="history_mask"):
        model(states, mask.long())
    with pytest.raises(ValueError, match="history_mask"):
        model(states, mask[:, 1:])


def test_count_parameters_matches_the_module_and_paper_sizes() -> None:
    config = _config()
    assert count_parameters(config) == sum(p.numel() for p in MFormer(config).parameters())
    paper = dict(crm_dim=64, n_experts=8, n_queries=32, n_blocks=12, hidden=768, n_heads=12)
    assert count_parameters(MFormerConfig(llm_hidden=4096, **paper)) == 96_098_440  # type: ignore[arg-type]
    assert count_parameters(MFormerConfig(llm_hidden=576, **paper)) == 93_391_560  # type: ignore[arg-type]
