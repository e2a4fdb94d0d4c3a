"""Save and load CRMs as ``model.safetensors`` + ``config.json``, without pickle.

``config.json`` holds everything needed to rebuild the model (``name``, ``n_items``, ``n_users``,
``config``, ``format_version``); ``model.safetensors`` holds its state dict. Loading rebuilds the model from
the config and checks every tensor name and shape before copying, so a checkpoint that does not match its
config fails naming the file and the tensor instead of with a bare ``load_state_dict`` error.

Tied tensors (one tensor under several state-dict names) are stored once, under their first name; the rebuilt
model re-creates the tie, so loading the stored copy fills every alias.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from recadapt.cf.base import SequentialRecommender
from recadapt.errors import ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint's weights do not match the model its config describes. Names the file."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


def save_crm(model: SequentialRecommender, directory: str | Path) -> Path:
    """Write ``model`` to ``directory`` (created if needed) and return the directory.

    Each file is written under a temporary name in ``directory`` and moved into place with ``os.replace``, so
    a crash never leaves a truncated file under a final name. Weights are replaced before the config; a reader
    racing the two replacements may pair new weights with the old config, and then :func:`load_crm` rejects
    any architecture mismatch.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    aliases = _tied_aliases(state)
    tensors = _without_shared_storage({k: v for k, v in state.items() if k not in aliases})
    config = {
        "name": model.name,
        "n_items": model.n_items,
        "n_users": model.n_users,
        "config": model.config.to_dict(),
        "format_version": FORMAT_VERSION,
    }

    weights_tmp = _temporary_path(directory, WEIGHTS_FILE)
    config_tmp = _temporary_path(directory, CONFIG_FILE)
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(weights_tmp, directory / WEIGHTS_FILE)
        os.replace(config_tmp, directory / CONFIG_FILE)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return directory


def load_crm(directory: str | Path, map_location: str | torch.device = "cpu") -> SequentialRecommender:
    """Rebuild the CRM saved in ``directory`` by :func:`save_crm`, on ``map_location``, in eval mode.

    Raises:
        FileNotFoundError: a checkpoint file is missing.
        ConfigError: ``config.json`` is malformed, names an unknown model or holds an invalid config.
        CheckpointError: ``model.safetensors`` is unreadable or its tensors do not match the configured model.
    """
    from recadapt.cf import build_crm  # the registry imports this module

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: CRM checkpoint file not found")

    spec = _read_config(config_path)
    try:
        model = build_crm(spec["name"], spec["n_items"], spec["n_users"], **spec["config"])
    except (ValueError, TypeError) as error:  # TypeError: e.g. a config key clashing with an argument
        raise ConfigError(config_path, "config", str(error)) from error

    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(weights_path, f"unreadable safetensors file ({error})") from error
    _check_tensors(weights_path, tensors, model.state_dict())
    # Names and shapes were checked above; non-strict only lets tied aliases be absent from the file.
    model.load_state_dict(tensors, strict=False)
    return model.to(map_location).eval()


def saved_crm_class(directory: str | Path) -> type[SequentialRecommender] | None:
    """The class of the CRM saved in ``directory``, from its ``config.json`` alone (no weights read), or None when
    there is none: what a config check needs before any work starts."""
    from recadapt.cf import CRM_REGISTRY  # the registry imports this module

    path = Path(directory) / CONFIG_FILE
    return CRM_REGISTRY[_read_config(path)["name"]] if path.is_file() else None


def _read_config(path: Path) -> dict[str, Any]:
    from recadapt.cf import CRM_REGISTRY  # the registry imports this module

    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(path, None, f"not valid JSON ({error})") from error
    if not isinstance(spec, dict):
        raise ConfigError(path, None, "expected a JSON object")
    expected = {"name": str, "n_items": int, "n_users": int, "config": dict, "format_version": int}
    unknown = sorted(set(spec) - set(expected))
    if unknown:
        raise ConfigError(path, unknown[0], f"unknown key; expected keys {sorted(expected)}")
    for key, kind in expected.items():
        if key not in spec:
            raise ConfigError(path, key, "missing")
        if not isinstance(spec[key], kind) or isinstance(spec[key], bool):
            raise ConfigError(path, key, f"expected {kind.__name__}, got {type(spec[key]).__name__}")
    if spec["format_version"] != FORMAT_VERSION:
        raise ConfigError(path, "format_version", f"unsupported version {spec['format_version']}")
    if spec["name"] not in CRM_REGISTRY:
        raise ConfigError(path, "name", f"unknown CRM {spec['name']!r}; registered: {sorted(CRM_REGISTRY)}")
    return spec


def _check_tensors(path: Path, tensors: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    aliases = _tied_aliases(expected)
    missing = sorted(set(expected) - set(tensors) - set(aliases))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        message = f"tensor names do not match the model: missing {missing}, unexpected {unexpected}"
        raise CheckpointError(path, message)
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            wanted = tuple(expected[key].shape)
            got = tuple(tensor.shape)
            raise CheckpointError(path, f"tensor {key!r} has shape {got}, the model expects {wanted}")


def _tied_aliases(state: dict[str, Tensor]) -> dict[str, str]:
    """Map each state-dict name that is the same tensor view as an earlier name to that earlier name."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        if tensor.numel() == 0:  # empty tensors may all report the same null data pointer
            continue
        view = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if view in first:
            aliases[key] = first[view]
        else:
            first[view] = key
    return aliases


def _without_shared_storage(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors that share no storage, as safetensors requires (views are cloned)."""
    result: dict[str, Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for key, tensor in tensors.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        tensor = tensor.detach()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        result[key] = tensor.to("cpu").contiguous()
    return result


def _temporary_path(directory: Path, name: str) -> Path:
    handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    return Path(path)
