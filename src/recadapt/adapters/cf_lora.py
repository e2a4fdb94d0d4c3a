"""ReLLaX's component fully-interactive LoRA (CFLoRA): ``delta = B G(u) A x`` (scaled by alpha / r) with a
full r x r matrix G(u) per instance, so every atom pair b_i a_j^T of the LoRA can be mixed for the user.

Plain LoRA is G = I, iLoRA's MoE-LoRA a block-diagonal G and RecLoRA's mixing G = (w w^T) kron I (the tests check
the first two). As in ReLLaX's code, A and B can start from a trained ``lora`` adapter and stay frozen
(``freeze_ab`` with :func:`recadapt.adapters.load_lora_weights`), so only G's network trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.adapters.base import ConditionedConfig, cast_like
from recadapt.adapters.lora import LoRALayer


@dataclass
class CFLoRAConfig(ConditionedConfig):
    """``freeze_ab``: A and B get no gradient (copy a trained LoRA into them first, see
    :func:`~recadapt.adapters.load_lora_weights`). ``g_init_std``: the std of G's last weight at init (G starts
    at I plus a deviation of about this size, see :class:`InteractionNet`)."""

    kind: ClassVar[str] = "cf-lora"

    freeze_ab: bool = False
    g_init_std: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.g_init_std < 0:
            raise ValueError(f"g_init_std must be >= 0, got {self.g_init_std}")


class CFLoRALayer(LoRALayer):
    """LoRA's ``lora_A`` [r, in] and ``lora_B`` [out, r] with the instance's G [b, r, r] (``mix``) applied to
    the r-dim intermediate: ``A x``, one batched r x r product, then ``B``."""

    needs_mix = True

    def __init__(self, base_layer: nn.Linear, config: CFLoRAConfig) -> None:
        super().__init__(base_layer, config)
        if config.freeze_ab:
            self.lora_A.requires_grad_(False)
            self.lora_B.requires_grad_(False)

    def delta(self, x: Tensor, mix: Tensor | None) -> Tensor:
        assert mix is not None  # checked in forward
        h = F.linear(x, self.lora_A)
        rows = h.reshape(h.size(0), -1, self.r)  # [b, t, r]
        h = torch.matmul(rows, cast_like(mix, h).transpose(1, 2)).view(h.shape)  # h_i <- sum_j G_ij h_j
        return F.linear(h, self.lora_B)


class InteractionNet(nn.Module):
    """cond [b, cond_dim] -> G [b, r, r] = reshape(Linear(2r^2 -> r^2)(GELU(Linear(d -> 2r^2)(LayerNorm(u))))).

    The last Linear starts with bias = vec(I) and weights of std ``g_init_std`` (about 0), so G(u) starts near
    the identity for every user and CFLoRA starts as the LoRA it was built on: a random G would scramble the
    trained atoms and throw away the copied adapter's quality at step 0, while G = I leaves training to learn
    only each user's deviation. The weights are small rather than zero so that the first Linear gets gradient
    from the first step (with zeros it would get none until the last one moved).
    """

    def __init__(self, config: CFLoRAConfig) -> None:
        super().__init__()
        self.cond_dim = config.cond_dim
        self.r = config.r
        r2 = config.r * config.r
        self.net = nn.Sequential(
            nn.LayerNorm(config.cond_dim),
            nn.Linear(config.cond_dim, 2 * r2),
            nn.GELU(),
            nn.Linear(2 * r2, r2),
        )
        last = self.net[-1]
        with torch.no_grad():
            nn.init.normal_(last.weight, std=config.g_init_std)
            last.bias.copy_(torch.eye(config.r).flatten())

    def forward(self, cond: Tensor) -> Tensor:
        return self.net(cond).view(-1, self.r, self.r)
