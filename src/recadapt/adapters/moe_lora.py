"""iLoRA's instance-wise LoRA: a rank-r LoRA split into K experts of rank r/K, mixed by one dense softmax gate
per instance, computed from the CRM's sequence representation and shared by every adapted layer.

``delta = sum_k g_k B_k A_k x`` with scaling alpha / (r/K), as published: under a uniform gate (g_k = 1/K) the
update is exactly a plain LoRA of rank r with scaling alpha / r, so K = 1, or an untrained gate, starts where
LoRA does. In the decomposed view of ReLLaX this is ``G = blockdiag(K g_1 I, ..., K g_K I)`` at scaling alpha / r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.adapters.base import ConditionedConfig, broadcast_rows, cast_like
from recadapt.adapters.lora import LoRALayer

GATE_NETWORKS = ("cnn", "mlp")


@dataclass
class MoELoRAConfig(ConditionedConfig):
    """``n_experts`` experts of rank ``r / n_experts``. ``gate``: ``cnn`` (a small 1-D residual CNN over the
    cond vector, the published shape) or ``mlp``; ``gate_width`` is the CNN's channels or the MLP's hidden units,
    ``gate_blocks`` the CNN's residual blocks. The gate trains at 0.3 x the base learning rate (published)."""

    kind: ClassVar[str] = "moe-lora"

    n_experts: int = 4
    gate: str = "cnn"
    gate_width: int = 64
    gate_blocks: int = 2
    conditioner_lr_scale: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_experts < 1 or self.r % self.n_experts:
            raise ValueError(f"n_experts must be >= 1 and divide r = {self.r}, got {self.n_experts}")
        if self.gate not in GATE_NETWORKS:
            raise ValueError(f"gate must be one of {GATE_NETWORKS}, got {self.gate!r}")
        if self.gate_width < 1 or self.gate_blocks < 0:
            raise ValueError(
                f"gate_width must be >= 1 and gate_blocks >= 0, got {self.gate_width}, {self.gate_blocks}"
            )

    @property
    def scaling(self) -> float:
        """alpha / (r / K): the per-expert rank, so that a uniform gate reproduces LoRA at alpha / r."""
        return self.alpha * self.n_experts / self.r


class MoELoRALayer(LoRALayer):
    """One ``lora_A`` [r, in] and ``lora_B`` [out, r] whose row / column blocks of r/K are the experts; the
    r-dim intermediate ``A x`` is multiplied block-wise by the instance's gate, then ``B`` maps it out. One
    matmul each way, as cheap as LoRA; ``mix`` is the gate [b, K]."""

    needs_mix = True

    def __init__(self, base_layer: nn.Linear, config: MoELoRAConfig) -> None:
        super().__init__(base_layer, config)
        self.n_experts = config.n_experts

    def delta(self, x: Tensor, mix: Tensor | None) -> Tensor:
        assert mix is not None  # checked in forward
        h = F.linear(x, self.lora_A)
        gate = broadcast_rows(cast_like(mix, h), h).unsqueeze(-1)  # [b, 1.., K, 1]
        h = (h.unflatten(-1, (self.n_experts, -1)) * gate).flatten(-2)
        return F.linear(h, self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_experts={self.n_experts}"


class ResidualBlock(nn.Module):
    """Conv1d -> GELU -> Conv1d, added to the input, then GELU (length-preserving, kernel 3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x + self.conv2(F.gelu(self.conv1(x))))


class CNNGate(nn.Module):
    """Gate logits from a 1-D residual CNN that reads the LayerNormed cond [b, d] as a one-channel signal of
    length d: a Conv1d stem to ``channels``, ``blocks`` residual blocks, average pooling to 8 positions, and a
    linear head to K logits. About 52K parameters at the defaults (d = 64, 64 channels, 2 blocks, K = 4).
    The LayerNorm makes the gate indifferent to the CRM's embedding scale."""

    POOLED = 8

    def __init__(self, cond_dim: int, n_experts: int, channels: int, blocks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cond_dim)
        self.stem = nn.Conv1d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.pool = nn.AdaptiveAvgPool1d(self.POOLED)
        self.head = nn.Linear(channels * self.POOLED, n_experts)

    def forward(self, cond: Tensor) -> Tensor:
        x = F.gelu(self.stem(self.norm(cond).unsqueeze(1)))  # [b, C, d]
        return self.head(self.pool(self.blocks(x)).flatten(1))


class MLPGate(nn.Sequential):
    """Gate logits from LayerNorm -> Linear(d -> hidden) -> GELU -> Linear(hidden -> K)."""

    def __init__(self, cond_dim: int, n_experts: int, hidden: int) -> None:
        super().__init__(
            nn.LayerNorm(cond_dim), nn.Linear(cond_dim, hidden), nn.GELU(), nn.Linear(hidden, n_experts)
        )


class MoEGate(nn.Module):
    """cond [b, cond_dim] -> dense softmax gate [b, K] (no top-k, no load-balancing loss, as published)."""

    def __init__(self, config: MoELoRAConfig) -> None:
        super().__init__()
        self.cond_dim = config.cond_dim
        if config.gate == "cnn":
            self.net: nn.Module = CNNGate(
                config.cond_dim, config.n_experts, config.gate_width, config.gate_blocks
            )
        else:
            self.net = MLPGate(config.cond_dim, config.n_experts, config.gate_width)

    def forward(self, cond: Tensor) -> Tensor:
        logits = self.net(cond)
        return torch.softmax(logits, -1, dtype=torch.promote_types(logits.dtype, torch.float32))
