"""Build, save and load the adapter of an LLM run from its settings: a :mod:`recadapt.adapters` kind (``lora``
among them, saved in PEFT's format so ``peft.PeftModel.from_pretrained`` reads it), plus LLaRA's projector.
:func:`with_lora` (PEFT's own LoRA) stays as the reference the benchmarks compare against.

The settings are the run's ``llm`` section, read through :class:`AdapterSettings` (the fields used here), so
this layer does not depend on the training recipe's config module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from recadapt.adapters.dropout import set_lora_dropout
from recadapt.errors import ConfigError

FINAL_DIR = "final"  # a run's trained adapter (and projector) alone
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's file names, so PeftModel.from_pretrained reads the folder
PROJECTOR_FILE = "projector.safetensors"
PERSONAL_ADAPTER_DIR = (
    "adapter"  # a recadapt.adapters kind (moe-lora, personal-lora, cf-lora): save_adapters'
)


class AdapterSettings(Protocol):
    """The ``llm`` fields that decide a run's adapter."""

    adapter: str
    adapter_options: dict[str, Any]
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: list[str]
    init_lora_from: str | None


def with_lora(backbone_model: nn.Module, llm: AdapterSettings) -> nn.Module:
    """The backbone wrapped by PEFT with the configured LoRA (the same for training and re-evaluation)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=llm.lora_r,
        lora_alpha=llm.lora_alpha,
        lora_dropout=llm.lora_dropout,
        target_modules=list(llm.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(backbone_model, lora)
    except ValueError as err:  # e.g. a target module the backbone does not have
        raise ConfigError("config", "llm.lora_target_modules", str(err)) from err
    set_lora_dropout(model)  # FastDropout: same distribution, a third of the cost on CPU
    return model


def adapter_config(llm: AdapterSettings, cond_dim: int) -> Any:
    """The recadapt.adapters config of the run's kind from the llm section; unknown options name the field."""
    from recadapt.adapters import ConditionedConfig, adapter_kind, make_config

    values: dict[str, Any] = {
        "r": llm.lora_r,
        "alpha": float(llm.lora_alpha),
        "dropout": llm.lora_dropout,
        "target_modules": list(llm.lora_target_modules),
    }
    if issubclass(adapter_kind(llm.adapter).config, ConditionedConfig):
        values["cond_dim"] = cond_dim
    if llm.adapter == "lora":  # PEFT's initial draws: runs trained before the switch reproduce (LoRAConfig)
        values["peft_init"] = True
    try:
        return make_config(llm.adapter, **values, **llm.adapter_options)
    except (TypeError, ValueError) as err:
        raise ConfigError("config", "llm.adapter_options", str(err)) from err


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Transformers' activation checkpointing on every decoder layer, non-reentrant (so the frozen embeddings need
    no ``requires_grad`` trick, and hybrid ``inputs_embeds`` work). torch.utils.checkpoint restores the RNG state
    for the recomputation, so dropout masks, hence losses and gradients, are those of a run without it. An
    :class:`~recadapt.adapters.AdaptedModelBase` goes through :func:`recadapt.adapters.enable_gradient_checkpointing`
    (a ValueError for kinds that cannot be recomputed), a PEFT model straight to transformers."""
    from recadapt.adapters import AdaptedModelBase
    from recadapt.adapters import enable_gradient_checkpointing as enable_for_kind

    if isinstance(model, AdaptedModelBase):
        enable_for_kind(model)
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def attach_adapter(backbone_model: nn.Module, llm: AdapterSettings, cond_dim: int = 0) -> nn.Module:
    """The backbone with the configured :mod:`recadapt.adapters` kind: an :class:`~recadapt.adapters.AdaptedModel`
    (called with ``cond=`` for the conditioned kinds)."""
    from recadapt.adapters import attach_adapters

    try:
        adapted = attach_adapters(backbone_model, adapter_config(llm, cond_dim))
    except ValueError as err:  # e.g. a target module the backbone does not have
        raise ConfigError("config", "llm.lora_target_modules", str(err)) from err
    if llm.init_lora_from:
        from recadapt.adapters import load_lora_weights

        source = Path(llm.init_lora_from).expanduser()
        source = source / FINAL_DIR if (source / FINAL_DIR).is_dir() else source
        try:
            load_lora_weights(adapted, source)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError("config", "llm.init_lora_from", f"{source}: {err}") from err
    return adapted


def _is_plain_lora(adapted: nn.Module) -> bool:
    config = getattr(adapted, "adapter_config", None)
    return config is not None and config.kind == "lora"


def save_weights(
    folder: Path,
    adapted: nn.Module | None,
    projector: nn.Module | None,
    base_model: str | None = None,
    tokenizer: Any = None,
) -> None:
    """The adapter and the projector, into ``folder``: a ``lora`` adapter as PEFT saves one (``adapter_config.json``
    naming ``base_model`` as the user gave it, ``adapter_model.safetensors``), the other kinds with
    :func:`recadapt.adapters.save_adapters` in ``adapter/`` (naming ``base_model`` too); with ``tokenizer``, its
    files beside them (the item placeholder tokens a hybrid prompt adds included), so the folder describes itself."""
    from safetensors.torch import save_file

    from recadapt.adapters import save_adapters, save_peft_lora

    if adapted is not None and _is_plain_lora(adapted):
        save_peft_lora(adapted, folder, base_model_name_or_path=base_model)
    elif adapted is not None:
        save_adapters(adapted, folder / PERSONAL_ADAPTER_DIR, base_model_name_or_path=base_model)
    if projector is not None:
        save_file(
            cpu_tensors(projector.state_dict()), str(folder / PROJECTOR_FILE), metadata={"format": "pt"}
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def load_weights(folder: Path, adapted: nn.Module | None, projector: nn.Module | None) -> None:
    """What :func:`save_weights` wrote (a ``lora`` folder of PEFT's format from before the switch included)."""
    from safetensors.torch import load_file

    from recadapt.adapters import ADAPTER_WEIGHTS, load_lora_weights

    try:
        if adapted is not None and _is_plain_lora(adapted):
            load_lora_weights(adapted, folder)
        elif adapted is not None:
            adapted.load_adapter_state_dict(load_file(str(folder / PERSONAL_ADAPTER_DIR / ADAPTER_WEIGHTS)))
    except ValueError as err:
        raise ConfigError(folder, "adapter", str(err)) from err
    if projector is not None:
        projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))


def has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_FILE).exists() or (folder / PERSONAL_ADAPTER_DIR).is_dir()


def cpu_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
