"""Plain LoRA: ``delta = B A x`` (scaled by alpha / r), the same for every instance; the reference the
personalized kinds reduce to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.adapters.base import AdapterConfig, AdapterLayer, kaiming_uniform_


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA of rank ``r``; takes no ``cond``.

    ``peft_init``: draw the initial A exactly as PEFT does (it builds A and B as ``nn.Linear`` layers, each drawing
    a default init, then draws A again), so a run trained with PEFT's LoRA before recadapt's kind replaced it starts
    from the same weights and reproduces its numbers. Off, A is drawn once (the other kinds' convention).
    """

    kind: ClassVar[str] = "lora"
    peft_init: bool = False


class LoRALayer(AdapterLayer):
    """``lora_A`` [r, in] kaiming-uniform, ``lora_B`` [out, r] zeros (like PEFT), so the adapted model starts
    as the base model."""

    def __init__(self, base_layer: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        self.lora_A = kaiming_uniform_(self.new_parameter(self.r, self.in_features))
        # PEFT's two nn.Linear default inits, then its reset of A (see LoRAConfig); the lora kind only, since the
        # other kinds reuse this layer with configs that have no such field
        if getattr(config, "peft_init", False):
            kaiming_uniform_(self.new_parameter(self.out_features, self.r))
            kaiming_uniform_(self.lora_A)
        self.lora_B = nn.init.zeros_(self.new_parameter(self.out_features, self.r))

    def delta(self, x: Tensor, mix: Tensor | None) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


def no_conditioner(config: AdapterConfig) -> None:
    """LoRA has nothing per instance to compute."""
    return None
