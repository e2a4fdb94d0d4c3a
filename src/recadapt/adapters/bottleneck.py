"""A parallel bottleneck adapter (He et al.'s "unified view" of PEFT): ``delta = B GELU(A x)`` beside each frozen
projection, scaled by alpha / r like LoRA. The nonlinearity is the only difference from LoRA, so it isolates
whether a non-linear update helps at the same width and parameter count; it takes no ``cond``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from recadapt.adapters.base import AdapterConfig, AdapterLayer, kaiming_uniform_


@dataclass
class BottleneckConfig(AdapterConfig):
    """A bottleneck of width ``r`` (the down-projection's output size); takes no ``cond``."""

    kind: ClassVar[str] = "bottleneck"


class BottleneckLayer(AdapterLayer):
    """``lora_A`` [r, in] (down, kaiming-uniform) and ``lora_B`` [out, r] (up, zeros): the update starts at zero,
    so the adapted model starts as the base model, while A's random init gives B a gradient from the first step.
    The LoRA names keep the shared machinery (dtype checks, state dict layout) working unchanged."""

    def __init__(self, base_layer: nn.Linear, config: BottleneckConfig) -> None:
        super().__init__(base_layer, config)
        self.lora_A = kaiming_uniform_(self.new_parameter(self.r, self.in_features))
        self.lora_B = nn.init.zeros_(self.new_parameter(self.out_features, self.r))

    def delta(self, x: Tensor, mix: Tensor | None) -> Tensor:
        return F.linear(F.gelu(F.linear(x, self.lora_A)), self.lora_B)
