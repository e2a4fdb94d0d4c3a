"""Shared pieces of every adapter kind: the config fields, the adapted-layer base class and a few checks.

An adapted linear layer computes ``y = W0 x + scaling * delta(x, mix)``. ``mix`` is the per-instance quantity of
the kind (a gate, mixing weights, an interaction matrix), computed once per forward by the model-level
conditioner from ``cond`` and handed to every layer as an explicit keyword argument
(:class:`recadapt.adapters.model.AdaptedModel`). Layers never keep it between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from recadapt.adapters.dropout import FastDropout


def default_targets() -> list[str]:
    """Every attention and MLP projection of a Llama-style decoder (LLaRA/iLoRA's choice)."""
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterConfig:
    """Fields every kind shares. ``target_modules`` are matched against module names by suffix
    (``q_proj`` matches ``model.layers.0.self_attn.q_proj``); only ``nn.Linear`` modules are adapted.

    ``supports_gradient_checkpointing``: the layers' output depends on their input and weights only, so the
    backward may rerun them after the call (see :func:`~recadapt.adapters.model.enable_gradient_checkpointing`).
    """

    kind: ClassVar[str] = ""
    needs_cond: ClassVar[bool] = False
    supports_gradient_checkpointing: ClassVar[bool] = True

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=default_targets)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """The factor on the low-rank update: alpha / r, as in LoRA and PEFT."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (``kind`` included), for ``adapter_config.json``."""
        payload: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            payload[f.name] = list(value) if isinstance(value, list | tuple) else value
        return payload


@dataclass
class ConditionedConfig(AdapterConfig):
    """Fields of the kinds whose update depends on a per-instance ``cond`` [batch, cond_dim] (a CRM's sequence
    representation or user vector). ``conditioner_lr_scale`` multiplies the base learning rate for the
    conditioner's parameters (see :meth:`~recadapt.adapters.model.AdaptedModel.param_groups`). No gradient
    checkpointing: the layers get their mix through hooks that exist only during the call, and the backward's
    recomputation runs after it."""

    needs_cond: ClassVar[bool] = True
    supports_gradient_checkpointing: ClassVar[bool] = False

    cond_dim: int = 64
    conditioner_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cond_dim < 1:
            raise ValueError(f"cond_dim must be >= 1, got {self.cond_dim}")
        if self.conditioner_lr_scale <= 0:
            raise ValueError(f"conditioner_lr_scale must be > 0, got {self.conditioner_lr_scale}")


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters keep fp32 (or fp64) master weights even on a bf16/fp16 base, like PEFT's default: low-precision
    LoRA weights lose small updates. Autocast still runs their matmuls in low precision."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def kaiming_uniform_(weight: Tensor) -> Tensor:
    """LoRA's init for A (PEFT's and nn.Linear's default: kaiming-uniform with a = sqrt(5)), member by member
    over any leading bank dimension, so each member of a bank is initialised exactly like a lone LoRA."""
    with torch.no_grad():
        for member in weight.view(-1, *weight.shape[-2:]):
            nn.init.kaiming_uniform_(member, a=math.sqrt(5))
    return weight


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a kind's low-rank update.

    Subclasses create ``lora_A`` and ``lora_B`` (any further parameters too) and define :meth:`delta`, the
    unscaled update of ``x`` (already through dropout) given ``mix``; the scaling is fused into the final
    addition, one kernel instead of two per layer. Adapter parameters live on the base weight's device, in
    :func:`adapter_dtype` of it.
    """

    needs_mix: ClassVar[bool] = False
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = config.r
        self.scaling = config.scaling
        self.dropout: nn.Module = FastDropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def new_parameter(self, *shape: int) -> nn.Parameter:
        """An uninitialised parameter on the base layer's device, in the adapter dtype."""
        weight = self.base_layer.weight
        return nn.Parameter(torch.empty(*shape, device=weight.device, dtype=adapter_dtype(weight)))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters by name (what is saved), without the base layer's."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("base_layer.")}

    def forward(self, x: Tensor, *, mix: Tensor | None = None) -> Tensor:
        """``W0 x + scaling * delta(dropout(x), mix)``; ``mix`` comes from the model's conditioner."""
        if self.needs_mix:
            check_mix(mix, x, type(self).__name__)
        result = self.base_layer(x)
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # e.g. a bf16 base without autocast: the update runs in fp32
        delta = self.delta(self.dropout(x), mix)
        return torch.add(result, delta.to(result.dtype), alpha=self.scaling)

    def delta(self, x: Tensor, mix: Tensor | None) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"


def check_mix(mix: Tensor | None, x: Tensor, layer: str) -> None:
    """A conditioned layer needs ``mix`` with x's batch size, or batch 1 (one instance for every row).

    When a batch is expanded after conditioning is known (e.g. one copy of a prompt per candidate when scoring),
    the caller must expand ``cond`` the same way (``cond.repeat_interleave(n_candidates, 0)``): a larger x batch
    is never broadcast silently, because tiling and interleaving would both be plausible and only one is right.
    """
    if mix is None:
        raise ValueError(
            f"{layer} needs the per-instance mix: call the AdaptedModel with cond=... (the conditioning vectors), "
            "not the base model directly; gradient checkpointing, which reruns layers after the call, is "
            "unsupported for conditioned kinds"
        )
    if mix.size(0) not in (x.size(0), 1):
        raise ValueError(
            f"{layer}: cond has batch {mix.size(0)} but the layer input has batch {x.size(0)}; pass one cond row "
            "per input row (expand cond the way the inputs were expanded, e.g. repeat_interleave per candidate)"
        )


def broadcast_rows(mix: Tensor, like: Tensor) -> Tensor:
    """``mix`` [b, ...] viewed as [b, 1, ..., 1, ...] so it broadcasts over ``like``'s middle (token) dims."""
    middle = like.dim() - 2
    return mix.view(mix.size(0), *([1] * middle), *mix.shape[1:])


def cast_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in ``ref``'s dtype, unless they match or autocast is on (then the model already cast the mix to the
    autocast dtype, and matmuls pick their own): a mixed-dtype product would otherwise fail or promote."""
    if t.dtype == ref.dtype or torch.is_autocast_enabled(ref.device.type):
        return t
    return t.to(ref.dtype)
