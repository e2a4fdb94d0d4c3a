"""Saving and loading adapters: recadapt's own folder (``adapter_config.json`` with the kind and its config,
``adapter.safetensors``) for every kind, and PEFT's LoRA folder for plain ``lora``, written so
``peft.PeftModel.from_pretrained`` reads it and read back from PEFT's own."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recadapt.adapters.base import AdapterConfig
from recadapt.adapters.lora import LoRAConfig
from recadapt.adapters.model import AdaptedModel, _copy_same_shapes, attach_adapters
from recadapt.adapters.registry import config_from_dict
from recadapt.io import atomic_directory, write_json_atomic

ADAPTER_WEIGHTS = "adapter.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


FORMAT_VERSION = 1


def save_adapters(
    model: AdaptedModel, folder: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``adapter.safetensors`` (adapter + conditioner weights only) and ``adapter_config.json`` (kind,
    config and, when given, the base model as the user named it) to ``folder``, atomically: the folder is
    replaced as a whole, so it holds the adapter and nothing else."""
    folder = Path(folder)
    state = {key: t.contiguous().cpu() for key, t in model.adapter_state_dict().items()}
    payload = model.adapter_config.to_dict()
    kind = payload.pop("kind")
    with atomic_directory(folder) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "kind": kind})
        header: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": kind, "config": payload}
        if base_model_name_or_path is not None:
            header["base_model_name_or_path"] = base_model_name_or_path
        write_json_atomic(tmp / ADAPTER_CONFIG, header)
    return folder


def read_versioned_json(path: Path, version: int, writer: str) -> dict[str, Any]:
    """A JSON file written by ``writer`` with ``format_version`` == ``version``; clear errors otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}: not a folder written by {writer}")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("format_version") != version:
        raise ValueError(f"{path}: format_version {payload.get('format_version')!r}, expected {version}")
    return payload


def read_adapter_config(folder: str | Path) -> AdapterConfig:
    """The typed config saved in ``folder`` by :func:`save_adapters`, or the :class:`LoRAConfig` of a PEFT LoRA
    folder (:func:`save_peft_lora`'s, or PEFT's own ``save_pretrained``)."""
    if _is_peft_folder(Path(folder)):
        return _peft_lora_config(Path(folder))
    payload = read_versioned_json(Path(folder) / ADAPTER_CONFIG, FORMAT_VERSION, "save_adapters")
    return config_from_dict({"kind": payload["kind"], **payload["config"]})


def load_adapters(base_model: nn.Module, folder: str | Path) -> AdaptedModel:
    """Rebuild the adapters saved in ``folder`` (by :func:`save_adapters`, or a PEFT LoRA folder) on
    ``base_model`` (frozen in place) and load their weights (safetensors only, never pickle)."""
    config = read_adapter_config(folder)
    model = attach_adapters(base_model, config)
    if _is_peft_folder(Path(folder)):
        load_lora_weights(model, folder)
    else:
        model.load_adapter_state_dict(load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    return model


def save_peft_lora(
    model: AdaptedModel, folder: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write a plain ``lora`` adapter the way PEFT saves a LoRA: ``adapter_config.json`` (``peft_type`` LORA,
    ``task_type`` CAUSAL_LM) and ``adapter_model.safetensors`` keyed ``base_model.model.<module>.lora_A.weight``
    / ``.lora_B.weight``, so ``peft.PeftModel.from_pretrained(base, folder)``, PEFT-aware tools and
    :func:`load_adapters` read it. ``base_model_name_or_path`` is recorded as given (PEFT uses it only to find a
    base model when none is passed). Other kinds are refused: PEFT would load their A and B as a LoRA and
    compute something else. Each file is replaced atomically, weights first; other files in ``folder`` (a
    projector) stay."""
    if not isinstance(model, AdaptedModel):
        raise ValueError(
            f"only a plain 'lora' AdaptedModel has a PEFT LoRA format, not a {type(model).__name__}"
        )
    config = model.adapter_config
    if config.kind != "lora":
        raise ValueError(f"only a plain 'lora' AdaptedModel has a PEFT LoRA format, not {config.kind!r}")
    state = {
        f"{_PEFT_PREFIX}{name}.{part}.weight": p.detach().contiguous().cpu()
        for name, layer in model.adapter_layers.items()
        for part, p in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
    }
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha  # PEFT writes an int
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{PEFT_WEIGHTS}.tmp-", dir=folder)  # the io module's temporary names
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, folder / PEFT_WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json_atomic(folder / ADAPTER_CONFIG, peft_config)
    return folder


def load_lora_weights(model: AdaptedModel, source: AdaptedModel | str | Path) -> None:
    """Copy a trained ``lora`` adapter's A and B (a model, a folder of :func:`save_adapters` or a PEFT LoRA
    folder, as the LLM recipe saves ``lora`` runs in ``final/``) into ``model``'s layers.

    ReLLaX starts CFLoRA from the ReLLa LoRA (then G = I reproduces it exactly, see :class:`InteractionNet`);
    ``moe-lora`` can start from one too (a uniform gate reproduces it). The target set, rank and alpha must
    match the LoRA's, else the copy would not reproduce it. Frozen parameters stay frozen.
    """
    if isinstance(source, AdaptedModel):
        source_config, state = source.adapter_config, source.adapter_state_dict()
        kind, r, alpha = source_config.kind, source_config.r, source_config.alpha
    elif _is_peft_folder(Path(source)):
        kind, r, alpha, state = _read_peft_lora(Path(source))
    else:
        source_config = read_adapter_config(source)
        state = load_file(str(Path(source) / ADAPTER_WEIGHTS))
        kind, r, alpha = source_config.kind, source_config.r, source_config.alpha
    if kind != "lora":
        raise ValueError(f"the source must be a 'lora' adapter, got {kind!r}")
    config = model.adapter_config
    if (r, float(alpha)) != (config.r, float(config.alpha)):
        raise ValueError(
            f"the LoRA has r={r}, alpha={alpha}; the model has r={config.r}, alpha={config.alpha}"
        )
    own = {
        f"{name}.{key}": layer.adapter_parameters()[key]
        for name, layer in model.adapter_layers.items()
        for key in ("lora_A", "lora_B")
    }
    if set(own) != set(state):
        raise ValueError(
            f"the LoRA adapts other layers: only in the LoRA {sorted(set(state) - set(own))[:5]}, "
            f"only in the model {sorted(set(own) - set(state))[:5]}"
        )
    _copy_same_shapes(own, state, "LoRA weight")


PEFT_WEIGHTS = "adapter_model.safetensors"


_PEFT_PREFIX = "base_model.model."


def _is_peft_folder(folder: Path) -> bool:
    config = folder / ADAPTER_CONFIG
    return config.is_file() and "peft_type" in json.loads(config.read_text(encoding="utf-8"))


def _peft_config(folder: Path) -> dict[str, Any]:
    """A PEFT folder's ``adapter_config.json``; for a LoRA, refuse the options recadapt's ``lora`` cannot
    reproduce (they would otherwise be dropped silently and the adapter compute something else)."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        return config
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{folder}: DoRA / rsLoRA adapters scale differently; only plain LoRA can be copied")
    extras = {
        key: config[key]
        for key in ("alpha_pattern", "rank_pattern", "modules_to_save", "lora_bias")
        if config.get(key)
    }
    if config.get("bias", "none") != "none":
        extras["bias"] = config["bias"]
    if extras:
        raise ValueError(
            f"{folder}: a LoRA with {extras} is not plain LoRA; recadapt's 'lora' cannot load it"
        )
    return config


def _peft_lora_config(folder: Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT LoRA folder (a regex ``target_modules`` has no recadapt equivalent)."""
    config = _peft_config(folder)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: a PEFT {config.get('peft_type')} adapter, not a LoRA")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"{folder}: target_modules must be a list of module names, got {targets!r}")
    return LoRAConfig(
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=targets,
    )


def _read_peft_lora(folder: Path) -> tuple[str, int, float, dict[str, Tensor]]:
    """A LoRA saved by PEFT (``save_pretrained``, :func:`save_peft_lora`): (kind, r, alpha, state) with the state
    keyed like :meth:`AdaptedModel.adapter_state_dict` (``<module>.lora_A`` / ``.lora_B``)."""
    config = _peft_config(folder)
    if config.get("peft_type") != "LORA":
        return str(config.get("peft_type")), 0, 0.0, {}
    state, other = {}, []
    for key, tensor in load_file(str(folder / PEFT_WEIGHTS)).items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.startswith(_PEFT_PREFIX) and key.endswith(suffix):
                state[f"{key[len(_PEFT_PREFIX) : -len(suffix)]}.{part}"] = tensor
                break
        else:
            other.append(key)
    if other:
        raise ValueError(f"{folder}: weights other than LoRA's A and B: {sorted(other)[:5]} ({len(other)})")
    return "lora", int(config["r"]), float(config["lora_alpha"]), state
