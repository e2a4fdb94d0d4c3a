"""RecLoRA's personalized LoRA: a bank of N_m meta-LoRAs mixed per user by soft weights from the CRM's user
representation, ``A_u = sum_k w_k A_k``, ``B_u = sum_k w_k B_k``, ``delta = B_u A_u x``.

The mixed matrices multiply (not the members' products), so the user's LoRA is one rank-r LoRA and each
member interacts with every other: in ReLLaX's decomposed view ``G = (w w^T) kron I``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from recadapt.adapters.base import AdapterLayer, ConditionedConfig, cast_like, kaiming_uniform_


@dataclass
class PersonalLoRAConfig(ConditionedConfig):
    """``n_members`` meta-LoRAs of rank ``r`` each (published: 8 or 16); the gate is LayerNorm ->
    Linear(-> ``gate_hidden``) -> ReLU -> Dropout(``gate_dropout``) -> Linear(-> N_m), divided by
    ``temperature`` (published: 1, 5, 10 or 15) before the softmax.

    ``init``: ``member`` (published) draws each member's A like a lone LoRA's, so the mix of N_m independent
    members that a near-uniform gate forms starts sqrt(N_m) times smaller than a LoRA's A and the user's LoRA
    learns that much slower at first; ``mix`` draws the members sqrt(N_m) wider, so the uniform mix starts at a
    LoRA's scale (what ``moe-lora`` gets by construction). B starts at 0 either way: the model starts unchanged."""

    kind: ClassVar[str] = "personal-lora"

    n_members: int = 8
    gate_hidden: int = 60
    gate_dropout: float = 0.1
    temperature: float = 1.0
    init: str = "member"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_members < 1 or self.gate_hidden < 1:
            raise ValueError(
                f"n_members and gate_hidden must be >= 1, got {self.n_members}, {self.gate_hidden}"
            )
        if not 0 <= self.gate_dropout < 1:
            raise ValueError(f"gate_dropout must be in [0, 1), got {self.gate_dropout}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.init not in ("member", "mix"):
            raise ValueError(f"init must be 'member' or 'mix', got {self.init!r}")


class PersonalLoRALayer(AdapterLayer):
    """``lora_A`` [N, r, in] and ``lora_B`` [N, out, r], each member initialised like a LoRA (A kaiming, B 0).

    Per call: one [b, N] x [N, r*in] matmul forms every row's A_u (and likewise B_u), then two batched matmuls
    apply them; ``mix`` is the weights w [b, N]. Forming A_u costs b*N*r*in, against b*t*r*in for applying it,
    so the bank adds about N / t to the LoRA's cost instead of N times it (mixing the members' outputs would).
    """

    needs_mix = True

    def __init__(self, base_layer: nn.Linear, config: PersonalLoRAConfig) -> None:
        super().__init__(base_layer, config)
        self.n_members = config.n_members
        self.lora_A = kaiming_uniform_(self.new_parameter(self.n_members, self.r, self.in_features))
        if config.init == "mix":
            with torch.no_grad():
                self.lora_A.mul_(self.n_members**0.5)
        self.lora_B = nn.init.zeros_(self.new_parameter(self.n_members, self.out_features, self.r))

    def delta(self, x: Tensor, mix: Tensor | None) -> Tensor:
        assert mix is not None  # checked in forward
        w = cast_like(mix, self.lora_A)
        a_u = (w @ self.lora_A.flatten(1)).view(-1, self.r, self.in_features)  # [b, r, in]
        b_u = (w @ self.lora_B.flatten(1)).view(-1, self.out_features, self.r)  # [b, out, r]
        rows = x.reshape(x.size(0), -1, self.in_features)  # [b, t, in]: one instance's tokens share A_u, B_u
        h = torch.matmul(rows, a_u.transpose(1, 2))
        return torch.matmul(h, b_u.transpose(1, 2)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_members={self.n_members}"


class PersonalGate(nn.Module):
    """cond [b, cond_dim] -> member weights w [b, N_m] = softmax(MLP(LayerNorm(u)) / temperature)."""

    def __init__(self, config: PersonalLoRAConfig) -> None:
        super().__init__()
        self.cond_dim = config.cond_dim
        self.temperature = config.temperature
        self.net = nn.Sequential(
            nn.LayerNorm(config.cond_dim),
            nn.Linear(config.cond_dim, config.gate_hidden),
            nn.ReLU(),
            nn.Dropout(config.gate_dropout),
            nn.Linear(config.gate_hidden, config.n_members),
        )

    def forward(self, cond: Tensor) -> Tensor:
        logits = self.net(cond) / self.temperature
        return torch.softmax(logits, -1, dtype=torch.promote_types(logits.dtype, torch.float32))
