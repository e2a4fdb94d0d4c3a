"""Adapter layers against their decomposed views: exact equivalences between kinds on random float64 inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from recadapt.adapters import (
    CFLoRAConfig,
    CFLoRALayer,
    InteractionNet,
    LoRAConfig,
    LoRALayer,
    MoEGate,
    MoELoRAConfig,
    MoELoRALayer,
    PersonalLoRAConfig,
    PersonalLoRALayer,
    adapter_kind,
    config_from_dict,
    make_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")

IN, OUT, R, BATCH, T, D = 12, 10, 4, 3, 5, 6
F64 = torch.float64


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, dtype=F64)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(BATCH, T, IN, dtype=F64, generator=torch.Generator().manual_seed(1))


def randomize(layer: nn.Module, seed: int = 2) -> nn.Module:
    """Random A and B (B is zero at init, which would make every update vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator))
    return layer


def lora_like(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, alpha: float) -> LoRALayer:
    layer = LoRALayer(base, LoRAConfig(r=a.shape[0], alpha=alpha))
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return layer


def test_lora_is_base_plus_scaled_low_rank_update_and_starts_at_zero(
    base: nn.Linear, x: torch.Tensor
) -> None:
    layer = LoRALayer(base, LoRAConfig(r=R, alpha=8.0))
    assert layer.lora_A.dtype == F64 and torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer(x), base(x))
    randomize(layer)
    expected = base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    assert_close(layer(x), expected)


def test_moe_lora_with_one_expert_equals_lora(base: nn.Linear, x: torch.Tensor) -> None:
    config = MoELoRAConfig(r=R, alpha=8.0, n_experts=1, cond_dim=D)
    moe = randomize(MoELoRALayer(base, config))
    lora = lora_like(base, moe.lora_A, moe.lora_B, alpha=8.0)
    gate = MoEGate(config).to(F64)(torch.randn(BATCH, D, dtype=F64))  # a softmax over one expert: exactly 1
    assert_close(moe(x, mix=gate), lora(x))


def test_moe_lora_with_a_uniform_gate_equals_lora_of_the_full_rank(base: nn.Linear, x: torch.Tensor) -> None:
    """The published scaling alpha / (r / K) makes g_k = 1/K reproduce LoRA at alpha / r."""
    moe = randomize(MoELoRALayer(base, MoELoRAConfig(r=R, alpha=8.0, n_experts=2, cond_dim=D)))
    lora = lora_like(base, moe.lora_A, moe.lora_B, alpha=8.0)
    assert_close(moe(x, mix=torch.full((BATCH, 2), 0.5, dtype=F64)), lora(x))
    assert not torch.allclose(moe(x, mix=torch.tensor([[0.9, 0.1]] * BATCH, dtype=F64)), lora(x))


def test_moe_lora_is_the_gated_sum_of_its_experts(base: nn.Linear, x: torch.Tensor) -> None:
    k = 2
    moe = randomize(MoELoRALayer(base, MoELoRAConfig(r=R, alpha=8.0, n_experts=k, cond_dim=D)))
    gate = torch.softmax(torch.randn(BATCH, k, dtype=F64), -1)
    scaling = 8.0 / (R / k)
    expected = base(x)
    for e, (a, b) in enumerate(zip(moe.lora_A.chunk(k, 0), moe.lora_B.chunk(k, 1), strict=True)):
        expected = expected + scaling * gate[:, e, None, None] * (x @ a.T @ b.T)
    assert_close(moe(x, mix=gate), expected)


def test_cf_lora_with_identity_g_equals_lora(base: nn.Linear, x: torch.Tensor) -> None:
    config = CFLoRAConfig(r=R, alpha=8.0, cond_dim=D, g_init_std=0.0)
    cf = randomize(CFLoRALayer(base, config))
    lora = lora_like(base, cf.lora_A, cf.lora_B, alpha=8.0)
    assert_close(cf(x, mix=torch.eye(R, dtype=F64).expand(BATCH, R, R)), lora(x))
    g_at_init = InteractionNet(config).to(F64)(torch.randn(BATCH, D, dtype=F64))
    assert torch.equal(g_at_init, torch.eye(R, dtype=F64).expand(BATCH, R, R))  # zero weights: exactly I
    assert_close(cf(x, mix=g_at_init), lora(x))


def test_cf_lora_block_diagonal_g_equals_moe_lora(base: nn.Linear, x: torch.Tensor) -> None:
    """G = blockdiag(g_1 I, ..., g_K I) is MoE-LoRA; the factor K is MoE-LoRA's scaling alpha / (r/K) against
    CFLoRA's alpha / r."""
    k = 2
    moe = randomize(MoELoRALayer(base, MoELoRAConfig(r=R, alpha=8.0, n_experts=k, cond_dim=D)))
    cf = CFLoRALayer(base, CFLoRAConfig(r=R, alpha=8.0, cond_dim=D))
    with torch.no_grad():
        cf.lora_A.copy_(moe.lora_A)
        cf.lora_B.copy_(moe.lora_B)
    gate = torch.softmax(torch.randn(BATCH, k, dtype=F64), -1)
    g = torch.diag_embed(k * gate.repeat_interleave(R // k, dim=1))  # [b, r, r]
    assert_close(cf(x, mix=g), moe(x, mix=gate))


def test_cf_lora_is_the_sum_over_all_atom_pairs(base: nn.Linear, x: torch.Tensor) -> None:
    cf = randomize(CFLoRALayer(base, CFLoRAConfig(r=R, alpha=8.0, cond_dim=D)))
    g = torch.randn(BATCH, R, R, dtype=F64)
    # delta W_u = sum_ij G_ij b_i a_j^T for each row u
    delta_w = torch.einsum("uij,oi,jn->uon", g, cf.lora_B, cf.lora_A)
    expected = base(x) + 2.0 * torch.einsum("uon,utn->uto", delta_w, x)
    assert_close(cf(x, mix=g), expected)


def test_personal_lora_with_one_hot_weights_is_that_members_lora(base: nn.Linear, x: torch.Tensor) -> None:
    n = 3
    personal = randomize(PersonalLoRALayer(base, PersonalLoRAConfig(r=R, alpha=8.0, n_members=n, cond_dim=D)))
    members = torch.tensor([2, 0, 1])
    out = personal(x, mix=torch.nn.functional.one_hot(members, n).to(F64))
    for row, k in enumerate(members.tolist()):
        lora = lora_like(base, personal.lora_A[k], personal.lora_B[k], alpha=8.0)
        assert_close(out[row], lora(x[row]))


def test_personal_lora_multiplies_the_mixed_matrices_not_the_mixed_products(
    base: nn.Linear, x: torch.Tensor
) -> None:
    n = 3
    personal = randomize(PersonalLoRALayer(base, PersonalLoRAConfig(r=R, alpha=8.0, n_members=n, cond_dim=D)))
    w = torch.softmax(torch.randn(BATCH, n, dtype=F64), -1)
    a_u = torch.einsum("un,nri->uri", w, personal.lora_A)
    b_u = torch.einsum("un,nor->uor", w, personal.lora_B)
    expected = base(x) + 2.0 * torch.einsum("uti,uri,uor->uto", x, a_u, b_u)
    assert_close(personal(x, mix=w), expected)
    mixed_products = base(x) + 2.0 * torch.einsum(
        "un,uti,nri,nor->uto", w, x, personal.lora_A, personal.lora_B
    )
    assert not torch.allclose(personal(x, mix=w), mixed_products)


@pytest.mark.parametrize(("init", "expected_ratio"), [("member", 8**-0.5), ("mix", 1.0)])
def test_personal_lora_init_sets_the_scale_of_the_uniform_mix(init: str, expected_ratio: float) -> None:
    """``member`` (published): the uniform mix of 8 members' A is sqrt(8) smaller than a lone LoRA's A;
    ``mix``: it has a LoRA's scale. B is zero either way, so the adapted layer starts as the base layer."""
    torch.manual_seed(0)
    wide = nn.Linear(256, 64)
    personal = PersonalLoRALayer(wide, PersonalLoRAConfig(r=16, n_members=8, cond_dim=D, init=init))
    lora = LoRALayer(wide, LoRAConfig(r=16))
    uniform_mix = personal.lora_A.detach().mean(0)
    ratio = float(uniform_mix.std() / lora.lora_A.detach().std())
    assert ratio == pytest.approx(expected_ratio, rel=0.1)
    assert not personal.lora_B.any()
    with pytest.raises(ValueError, match="init must be"):
        PersonalLoRAConfig(cond_dim=D, init="xavier")


def test_personal_lora_is_cf_lora_with_the_kronecker_interaction(base: nn.Linear, x: torch.Tensor) -> None:
    """ReLLaX's decomposed view of RecLoRA: the bank stacked into one rank N*r LoRA with G = (w w^T) kron I."""
    n = 3
    personal = randomize(PersonalLoRALayer(base, PersonalLoRAConfig(r=R, alpha=8.0, n_members=n, cond_dim=D)))
    cf = CFLoRALayer(base, CFLoRAConfig(r=n * R, alpha=8.0 * n, cond_dim=D))  # same scaling alpha / r
    with torch.no_grad():
        cf.lora_A.copy_(personal.lora_A.reshape(n * R, IN))
        cf.lora_B.copy_(personal.lora_B.permute(1, 0, 2).reshape(OUT, n * R))
    w = torch.softmax(torch.randn(BATCH, n, dtype=F64), -1)
    g = torch.stack([torch.kron(torch.outer(row, row), torch.eye(R, dtype=F64)) for row in w])
    assert_close(cf(x, mix=g), personal(x, mix=w))


MIXES = {
    "moe-lora": lambda b: torch.softmax(torch.randn(b, 2, dtype=F64), -1),
    "personal-lora": lambda b: torch.softmax(torch.randn(b, 3, dtype=F64), -1),
    "cf-lora": lambda b: torch.randn(b, R, R, dtype=F64),
}
CONFIGS = {
    "moe-lora": {"n_experts": 2},
    "personal-lora": {"n_members": 3},
    "cf-lora": {},
}


def _conditioned_layer(kind: str, base: nn.Linear) -> nn.Module:
    config = make_config(kind, r=R, alpha=8.0, cond_dim=D, **CONFIGS[kind])
    return randomize(adapter_kind(kind).layer(base, config))


@pytest.mark.parametrize("kind", list(MIXES))
def test_mix_is_per_row_and_broadcasts_over_any_token_dims(kind: str, base: nn.Linear) -> None:
    layer = _conditioned_layer(kind, base)
    mix = MIXES[kind](BATCH)
    x4 = torch.randn(BATCH, 2, T, IN, dtype=F64)
    out4 = layer(x4, mix=mix)
    assert out4.shape == (BATCH, 2, T, OUT)
    for row in range(BATCH):
        one = layer(x4[row : row + 1], mix=mix[row : row + 1])
        assert_close(out4[row : row + 1], one)
        assert_close(layer(x4[row, 1, 3][None], mix=mix[row : row + 1])[0], out4[row, 1, 3])  # 2-D input
    # one cond row applies to every input row
    assert_close(layer(x4, mix=mix[:1]), layer(x4, mix=mix[:1].expand(BATCH, *mix.shape[1:])))
    # different rows of mix give different outputs for the same input
    same = x4[:1].expand(BATCH, -1, -1, -1)
    out = layer(same, mix=mix)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("kind", list(MIXES))
def test_missing_or_mismatched_mix_raises(kind: str, base: nn.Linear, x: torch.Tensor) -> None:
    layer = _conditioned_layer(kind, base)
    with pytest.raises(ValueError, match="cond="):
        layer(x)
    with pytest.raises(ValueError, match="repeat_interleave"):
        layer(x, mix=MIXES[kind](BATCH + 1))


@pytest.mark.parametrize("kind", ["lora", *MIXES])
def test_low_precision_base_keeps_fp32_adapters_and_its_output_dtype(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).to(torch.bfloat16)
    values = {"r": R, **({"cond_dim": D, **CONFIGS[kind]} if kind != "lora" else {})}
    layer = randomize(adapter_kind(kind).layer(base, make_config(kind, **values)))
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters().values())
    x = torch.randn(BATCH, T, IN).to(torch.bfloat16)
    mix = MIXES[kind](BATCH).float() if kind != "lora" else None
    out = layer(x, mix=mix)
    assert out.dtype == torch.bfloat16
    reference = nn.Linear(IN, OUT)
    reference.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
    layer.base_layer = reference
    expected = layer(x.float(), mix=mix)
    atol = 0.02 * float(expected.detach().abs().max())  # bf16 keeps about 3 significant digits
    assert_close(out.float(), expected, atol=atol, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = layer(x.float(), mix=mix if mix is None else mix.to(torch.bfloat16))
    assert auto.dtype == torch.bfloat16
    assert_close(auto.float(), expected, atol=atol, rtol=0)


def test_configs_validate_and_round_trip() -> None:
    with pytest.raises(ValueError, match="known kinds: lora, moe-lora, personal-lora, cf-lora"):
        make_config("dora")
    with pytest.raises(ValueError, match="unknown fields"):
        make_config("lora", n_experts=4)
    with pytest.raises(ValueError, match="divide r"):
        MoELoRAConfig(r=8, n_experts=3)
    with pytest.raises(ValueError, match="gate must be one of"):
        MoELoRAConfig(gate="transformer")
    with pytest.raises(ValueError, match="temperature"):
        PersonalLoRAConfig(temperature=0)
    with pytest.raises(ValueError, match="kind"):
        config_from_dict({"r": 8})
    for kind in ("lora", "moe-lora", "personal-lora", "cf-lora"):
        config = make_config(kind, r=4, target_modules="q_proj")
        assert config.target_modules == ["q_proj"]
        assert config_from_dict(config.to_dict()) == config
    assert MoELoRAConfig(r=8, alpha=32, n_experts=4).scaling == 16.0  # alpha / (r / K)
    assert MoELoRAConfig().conditioner_lr_scale == 0.3


def test_cnn_gate_has_tens_of_thousands_of_parameters_and_the_mlp_gate_works() -> None:
    cnn = MoEGate(MoELoRAConfig(cond_dim=64, n_experts=4))
    assert 10_000 < sum(p.numel() for p in cnn.parameters()) < 100_000
    for gate in (cnn, MoEGate(MoELoRAConfig(cond_dim=64, n_experts=4, gate="mlp"))):
        g = gate(torch.randn(5, 64))
        assert g.shape == (5, 4)
        assert_close(g.sum(-1), torch.ones(5))
        assert not torch.allclose(g[0], g[1])  # depends on the instance
