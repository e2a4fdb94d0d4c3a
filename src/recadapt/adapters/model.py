"""Attach adapters to a causal LM, run it with explicit per-instance conditioning, save and load the adapters.

:func:`attach_adapters` freezes the base model, swaps each target ``nn.Linear`` for the kind's layer and returns
an :class:`AdaptedModel` that owns the conditioner. ``AdaptedModel(..., cond=cond)`` computes the layers' ``mix``
from ``cond`` once and hands it to every adapted layer as a keyword argument for that call only, through
temporary forward pre-hooks removed in a ``finally`` (the way PEFT passes ``adapter_names`` for mixed-batch
inference): no per-instance state outlives the call. :class:`AdaptedModelBase` holds that machinery for any
number of :class:`AdapterGroup` s (layers sharing one config and conditioner), which
:mod:`recadapt.adapters.layerwise` uses for per-layer plans.

A plain ``lora`` adapter is also written in PEFT's format (:func:`save_peft_lora`) and read back from it
(:func:`load_adapters`, :func:`load_lora_weights`), and kinds without per-call state train with gradient
checkpointing (:func:`enable_gradient_checkpointing`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recadapt.adapters.base import AdapterConfig, AdapterLayer, ConditionedConfig
from recadapt.adapters.lora import LoRAConfig
from recadapt.adapters.registry import adapter_kind, config_from_dict
from recadapt.io import atomic_directory, write_json_atomic

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
CONDITIONER_PREFIX = "conditioner."


@dataclass(frozen=True)
class AdapterGroup:
    """Adapter layers that share one config and one conditioner (the whole model for :class:`AdaptedModel`, a
    set of decoder layers for a layer-wise plan). ``name`` is "" for the single group; ``prefix`` starts its
    conditioner's keys in the adapter state dict and names its optimizer group (without the trailing dot)."""

    name: str
    config: AdapterConfig
    layers: Mapping[str, AdapterLayer]
    conditioner: nn.Module | None
    prefix: str = CONDITIONER_PREFIX

    @property
    def conditioned(self) -> bool:
        return self.conditioner is not None and isinstance(self.config, ConditionedConfig)


class AdaptedModelBase(nn.Module):
    """A frozen causal LM with adapter layers in one or more :class:`AdapterGroup` s, run with explicit ``cond``.

    ``forward(*args, cond=None, **kwargs)`` and ``generate(*args, cond=None, **kwargs)`` take the base model's
    arguments (``input_ids``, ``inputs_embeds``, ``past_key_values``, ``labels``, ...) plus ``cond``
    [batch, cond_dim], one row per input row; models without a conditioned group take no ``cond``. Each
    conditioned group's conditioner computes its mix from ``cond`` once per call, and only that group's layers
    receive it. With a KV cache, pass the same rows' ``cond`` at every decoding step. When rows are expanded
    (several candidates per prompt, beams, returned sequences), expand ``cond`` the same way; a single ``cond``
    row applies to all rows. Gradient checkpointing (:func:`enable_gradient_checkpointing`) is unsupported for
    conditioned kinds: its recomputation runs outside the call, so the layers would find no mix and raise.

    ``config`` and ``get_input_embeddings`` are the base model's, and any other attribute the wrapper lacks is
    looked up on the base model (like PEFT's ``PeftModel``), so ranking and generation code can take either.
    Subclasses set ``adapter_layers`` (every adapted layer by module path) and define :meth:`adapter_groups`.
    """

    adapter_layers: dict[str, AdapterLayer]

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model

    def adapter_groups(self) -> list[AdapterGroup]:
        raise NotImplementedError

    @property
    def config(self) -> Any:
        return self.base_model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, cond: Tensor | None = None, **kwargs: Any) -> Any:
        with self._conditioned(cond):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, cond: Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` with ``cond`` applied at every step (its mix is computed once)."""
        with self._conditioned(cond):
            return self.base_model.generate(*args, **kwargs)

    def mixes(self, cond: Tensor | None) -> dict[str, Tensor]:
        """Each conditioned group's mix for ``cond``, by group name; empty without conditioned groups (then
        ``cond`` must be None: passing one to a model that ignores it is a caller's mistake)."""
        groups = [g for g in self.adapter_groups() if g.conditioned]
        if not groups:
            if cond is not None:
                kinds = sorted({repr(g.config.kind) for g in self.adapter_groups()})
                what = (
                    f"adapter kind {kinds[0]} is"
                    if len(kinds) == 1
                    else f"adapter kinds {', '.join(kinds)} are"
                )
                raise ValueError(f"{what} not conditioned; call it without cond")
            return {}
        return {g.name: _group_mix(g, cond) for g in groups}

    @contextmanager
    def _conditioned(self, cond: Tensor | None) -> Iterator[None]:
        mixes = self.mixes(cond)
        handles = []
        try:
            for group in self.adapter_groups():
                if group.name not in mixes:
                    continue
                hook = partial(_pass_mix, mixes[group.name])
                for layer in group.layers.values():
                    handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters: ``adapter`` (every adapter layer) at ``lr`` and one per
        conditioner, named after its state-dict prefix (``conditioner`` for a single group), at
        ``lr * conditioner_lr_scale`` (iLoRA's gate: 0.3 x). Empty groups (e.g. frozen A, B) are left out."""
        groups = [
            {
                "name": "adapter",
                "params": [
                    p for layer in self.adapter_layers.values() for p in layer.adapter_parameters().values()
                ],
                "lr": lr,
            }
        ]
        for group in self.adapter_groups():
            if group.conditioned:
                assert group.conditioner is not None and isinstance(group.config, ConditionedConfig)
                groups.append(
                    {
                        "name": group.prefix.rstrip("."),
                        "params": list(group.conditioner.parameters()),
                        "lr": lr * group.config.conditioner_lr_scale,
                    }
                )
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        return [g for g in groups if g["params"]]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Adapter weights by ``<layer path>.<name>`` and conditioner weights by ``<group prefix><name>``; the
        base model's weights are not included."""
        state = {
            f"{name}.{key}": p.detach()
            for name, layer in self.adapter_layers.items()
            for key, p in layer.adapter_parameters().items()
        }
        for group in self.adapter_groups():
            if group.conditioner is not None:
                state.update(
                    {group.prefix + k: t.detach() for k, t in group.conditioner.state_dict().items()}
                )
        return state

    def load_adapter_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` (as :meth:`adapter_state_dict` gives it) into the adapters; keys and shapes must match
        exactly, so a checkpoint of another kind, rank or target set is refused rather than half-loaded."""
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not match the model: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        _copy_same_shapes(own, state, "adapter weight")


class AdaptedModel(AdaptedModelBase):
    """A frozen causal LM with one adapter kind on all its targets and the conditioner that feeds them (see
    :class:`AdaptedModelBase` for the calling convention)."""

    def __init__(
        self,
        base_model: nn.Module,
        adapter_config: AdapterConfig,
        adapter_layers: dict[str, AdapterLayer],
        conditioner: nn.Module | None,
    ) -> None:
        super().__init__(base_model)
        self.conditioner = conditioner
        self.adapter_config = adapter_config
        self.adapter_layers = adapter_layers  # plain dict: the layers are registered inside base_model

    def adapter_groups(self) -> list[AdapterGroup]:
        return [AdapterGroup("", self.adapter_config, self.adapter_layers, self.conditioner)]

    def mix(self, cond: Tensor | None) -> Tensor | None:
        """The conditioner's output for ``cond`` (gate, weights or G), as every adapted layer receives it.

        Under autocast it is cast once to the autocast dtype, so the layers' elementwise products stay in it.
        """
        return self.mixes(cond).get("")


def _group_mix(group: AdapterGroup, cond: Tensor | None) -> Tensor:
    """``group``'s conditioner applied to ``cond`` (checked), cast to the autocast dtype when autocast is on."""
    config, conditioner = group.config, group.conditioner
    assert conditioner is not None and isinstance(config, ConditionedConfig)
    kind, cond_dim = config.kind, config.cond_dim
    if cond is None:
        raise ValueError(
            f"adapter kind {kind!r} needs cond=FloatTensor[batch, {cond_dim}] (the CRM representation of "
            "each row's user or history)"
        )
    if cond.dim() != 2 or cond.size(1) != cond_dim:
        raise ValueError(f"cond must be [batch, {cond_dim}], got shape {tuple(cond.shape)}")
    weight = next(conditioner.parameters())
    mix = conditioner(cond.to(device=weight.device, dtype=weight.dtype))
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        mix = mix.to(torch.get_autocast_dtype(device_type))
    return mix


def _pass_mix(
    mix: Tensor, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, {**kwargs, "mix": mix}


def _target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the modules whose name is a target or ends with ``.<target>``; each must be an nn.Linear."""
    names = [
        name for name, _ in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)
    ]
    linear_suffixes = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )
    if not names:
        raise ValueError(
            f"no module matches target_modules {targets}; the model's linear layers: {linear_suffixes}"
        )
    wrong = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if wrong:
        raise ValueError(f"target_modules must name nn.Linear modules; these are not: {wrong[:5]}")
    return names


def attach_adapters(model: nn.Module, config: AdapterConfig) -> AdaptedModel:
    """Freeze ``model`` (in place), replace its target linear layers by ``config.kind``'s layers and return the
    :class:`AdaptedModel` that owns them and the conditioner. Only adapter and conditioner parameters train."""
    _check_attachable(model, [config])
    names = _target_names(model, config.target_modules)
    model.requires_grad_(False)
    layers = _replace_targets(model, names, config)
    return AdaptedModel(model, config, layers, _make_conditioner(config, layers))


def _check_attachable(model: nn.Module, configs: list[AdapterConfig]) -> None:
    """Each config is its kind's config class, and ``model`` has no adapter layers yet."""
    for config in configs:
        kind = adapter_kind(config.kind)
        if not isinstance(config, kind.config):
            raise TypeError(
                f"adapter kind {config.kind!r} takes a {kind.config.__name__}, got {type(config).__name__}"
            )
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model already has adapter layers; attach to a fresh base model")


def _replace_targets(model: nn.Module, names: list[str], config: AdapterConfig) -> dict[str, AdapterLayer]:
    """Swap each named ``nn.Linear`` for ``config``'s kind of layer, in the given order (the order the adapters'
    random inits are drawn in)."""
    layer_class = adapter_kind(config.kind).layer
    layers: dict[str, AdapterLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = layer_class(getattr(parent, child), config)
        setattr(parent, child, layers[name])
    return layers


def _make_conditioner(config: AdapterConfig, layers: Mapping[str, AdapterLayer]) -> nn.Module | None:
    """``config``'s conditioner (None for kinds without one) on the device and in the dtype of its layers."""
    conditioner = adapter_kind(config.kind).conditioner(config)
    if conditioner is not None:
        reference = next(iter(layers.values())).lora_A
        conditioner.to(device=reference.device, dtype=reference.dtype)
    return conditioner


def save_adapters(model: AdaptedModel, folder: str | Path) -> Path:
    """Write ``adapter.safetensors`` (adapter + conditioner weights only) and ``adapter_config.json`` (kind and
    config) to ``folder``, atomically: the folder is replaced as a whole, so it holds the adapter and nothing else."""
    folder = Path(folder)
    state = {key: t.contiguous().cpu() for key, t in model.adapter_state_dict().items()}
    payload = model.adapter_config.to_dict()
    kind = payload.pop("kind")
    with atomic_directory(folder) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "kind": kind})
        write_json_atomic(
            tmp / ADAPTER_CONFIG, {"format_version": FORMAT_VERSION, "kind": kind, "config": payload}
        )
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


def enable_gradient_checkpointing(model: AdaptedModelBase) -> None:
    """Transformers' activation checkpointing on every decoder layer of ``model``'s base model, non-reentrant:
    the backward reruns each layer, adapters included, instead of keeping its activations (less memory for more
    step time, see ``docs/benchmarks.md``). torch restores the RNG state for the rerun, so dropout masks, losses
    and gradients are those of a run without it. Non-reentrant checkpointing needs no input that requires grad
    (transformers still hooks the embeddings to make them require it), so ``inputs_embeds`` work too.

    Only kinds whose layers need no per-call state support it (:attr:`AdapterKind.supports_gradient_checkpointing`:
    ``lora``, ``bottleneck``); a conditioned kind raises a ValueError naming it, here rather than in the first
    backward, where its rerun layers would find no mix."""
    unsupported = sorted(
        {
            group.config.kind
            for group in model.adapter_groups()
            if not adapter_kind(group.config.kind).supports_gradient_checkpointing
        }
    )
    if unsupported:
        raise ValueError(
            f"gradient checkpointing is unsupported for adapter kind {', '.join(map(repr, unsupported))}: its "
            "layers receive the per-instance mix only during the forward call, and the checkpointed backward "
            "reruns them after it"
        )
    enable = getattr(model.base_model, "activation_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"{type(model.base_model).__name__} is not a transformers model with checkpointing")
    enable(activation_checkpointing_kwargs={"use_reentrant": False})


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


def _copy_same_shapes(own: Mapping[str, Tensor], state: Mapping[str, Tensor], what: str) -> None:
    """Copy ``state[key]`` into every ``own[key]``, after checking all shapes (nothing is copied on a mismatch)."""
    for key, target in own.items():
        if state[key].shape != target.shape:
            raise ValueError(f"{what} {key}: shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state[key])
