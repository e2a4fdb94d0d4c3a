"""The one table of adapter kinds: name -> (config dataclass, layer class, conditioner builder)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from recadapt.adapters.base import AdapterConfig, AdapterLayer
from recadapt.adapters.bottleneck import BottleneckConfig, BottleneckLayer
from recadapt.adapters.cf_lora import CFLoRAConfig, CFLoRALayer, InteractionNet
from recadapt.adapters.lora import LoRAConfig, LoRALayer, no_conditioner
from recadapt.adapters.moe_lora import MoEGate, MoELoRAConfig, MoELoRALayer
from recadapt.adapters.personal_lora import PersonalGate, PersonalLoRAConfig, PersonalLoRALayer


@dataclass(frozen=True)
class AdapterKind:
    """How to build one kind: its config, the layer that replaces each target ``nn.Linear``, and the
    model-level conditioner (``cond`` -> the layers' ``mix``; None for kinds without per-instance input)."""

    config: type[AdapterConfig]
    layer: type[AdapterLayer]
    conditioner: Callable[[Any], nn.Module | None]

    @property
    def supports_gradient_checkpointing(self) -> bool:
        """Whether the backward may recompute this kind's layers outside the forward call: only when they need
        no per-call mix (plain ``lora``, ``bottleneck``), else the rerun layers would find none."""
        return self.config.supports_gradient_checkpointing and not self.layer.needs_mix


ADAPTERS: dict[str, AdapterKind] = {
    LoRAConfig.kind: AdapterKind(LoRAConfig, LoRALayer, no_conditioner),
    MoELoRAConfig.kind: AdapterKind(MoELoRAConfig, MoELoRALayer, MoEGate),
    PersonalLoRAConfig.kind: AdapterKind(PersonalLoRAConfig, PersonalLoRALayer, PersonalGate),
    CFLoRAConfig.kind: AdapterKind(CFLoRAConfig, CFLoRALayer, InteractionNet),
    BottleneckConfig.kind: AdapterKind(BottleneckConfig, BottleneckLayer, no_conditioner),
}


def adapter_kind(kind: str) -> AdapterKind:
    """The registry row of ``kind``; an unknown name raises a ValueError listing the known ones."""
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"unknown adapter kind {kind!r}; known kinds: {', '.join(ADAPTERS)}") from None


def make_config(kind: str, **values: Any) -> AdapterConfig:
    """The typed config of ``kind`` from keyword values; unknown fields raise a ValueError naming them."""
    cls = adapter_kind(kind).config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown fields for adapter kind {kind!r}: {unknown}; known: {sorted(known)}")
    return cls(**values)


def config_from_dict(payload: Mapping[str, Any]) -> AdapterConfig:
    """Inverse of :meth:`AdapterConfig.to_dict`: ``{"kind": ..., field: value, ...}``."""
    values = dict(payload)
    if "kind" not in values:
        raise ValueError(f"an adapter config needs a 'kind' (one of {', '.join(ADAPTERS)})")
    return make_config(str(values.pop("kind")), **values)
