"""Personalized LoRA adapters behind one interface: ``lora``, ``moe-lora`` (iLoRA), ``personal-lora`` (RecLoRA),
``cf-lora`` (ReLLaX's CFLoRA) and ``bottleneck`` (a parallel bottleneck adapter); :func:`attach_layerwise` mixes
kinds and ranks per decoder layer.

    model = attach_adapters(base_model, MoELoRAConfig(r=8, alpha=32, n_experts=4, cond_dim=64))
    optimizer = torch.optim.AdamW(model.param_groups(lr=5e-4))
    loss = model(input_ids=ids, labels=labels, cond=sequence_repr).loss
    save_adapters(model, run_dir / "adapter")
    model = load_adapters(fresh_base_model, run_dir / "adapter")

A plain ``lora`` model also saves as PEFT does (``save_peft_lora(model, folder, "HuggingFaceTB/SmolLM2-135M")``,
read by ``peft.PeftModel.from_pretrained`` and by :func:`load_adapters`), and kinds without per-call state
(``lora``, ``bottleneck``) train with ``enable_gradient_checkpointing(model)``.

Each kind is a config dataclass, a layer class and a conditioner registered once in :data:`ADAPTERS`. The
per-instance conditioning is an explicit ``cond`` argument of every call, never state kept between calls.
"""

from recadapt.adapters.base import AdapterConfig, AdapterLayer, ConditionedConfig, default_targets
from recadapt.adapters.bottleneck import BottleneckConfig, BottleneckLayer
from recadapt.adapters.cf_lora import CFLoRAConfig, CFLoRALayer, InteractionNet
from recadapt.adapters.layerwise import (
    LAYERWISE_PLAN,
    LayerwiseAdaptedModel,
    attach_layerwise,
    decoder_layers,
    load_layerwise,
    read_layerwise_plan,
    save_layerwise,
)
from recadapt.adapters.lora import LoRAConfig, LoRALayer
from recadapt.adapters.model import (
    AdaptedModel,
    AdaptedModelBase,
    AdapterGroup,
    attach_adapters,
    enable_gradient_checkpointing,
)
from recadapt.adapters.moe_lora import MoEGate, MoELoRAConfig, MoELoRALayer
from recadapt.adapters.personal_lora import PersonalGate, PersonalLoRAConfig, PersonalLoRALayer
from recadapt.adapters.registry import ADAPTERS, AdapterKind, adapter_kind, config_from_dict, make_config
from recadapt.adapters.storage import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapters,
    load_lora_weights,
    read_adapter_config,
    save_adapters,
    save_peft_lora,
)

__all__ = [
    "ADAPTERS",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdaptedModel",
    "AdaptedModelBase",
    "AdapterConfig",
    "AdapterGroup",
    "AdapterKind",
    "AdapterLayer",
    "BottleneckConfig",
    "BottleneckLayer",
    "CFLoRAConfig",
    "CFLoRALayer",
    "ConditionedConfig",
    "InteractionNet",
    "LAYERWISE_PLAN",
    "LayerwiseAdaptedModel",
    "LoRAConfig",
    "LoRALayer",
    "MoEGate",
    "MoELoRAConfig",
    "MoELoRALayer",
    "PersonalGate",
    "PersonalLoRAConfig",
    "PersonalLoRALayer",
    "adapter_kind",
    "attach_adapters",
    "attach_layerwise",
    "config_from_dict",
    "decoder_layers",
    "default_targets",
    "enable_gradient_checkpointing",
    "load_adapters",
    "load_layerwise",
    "load_lora_weights",
    "make_config",
    "read_adapter_config",
    "read_layerwise_plan",
    "save_adapters",
    "save_layerwise",
    "save_peft_lora",
]
