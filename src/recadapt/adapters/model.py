"""Attach adapters to a causal LM and run it with explicit per-instance conditioning (saving and loading:
:mod:`recadapt.adapters.storage`).

:func:`attach_adapters` freezes the base model, swaps each target ``nn.Linear`` for the kind's layer and returns
an :class:`AdaptedModel` that owns the conditioner. ``AdaptedModel(..., cond=cond)`` computes the layers' ``mix``
from ``cond`` once and hands it to every adapted layer as a keyword argument for that call only, through
temporary forward pre-hooks removed in a ``finally`` (the way PEFT passes ``adapter_names`` for mixed-batch
inference): no per-instance state outlives the call. :class:`AdaptedModelBase` holds that machinery for any
number of :class:`AdapterGroup` s (layers sharing one config and conditioner), which
:mod:`recadapt.adapters.layerwise` uses for per-layer plans.

Kinds without per-call state train with gradient checkpointing (:func:`enable_gradient_checkpointing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from recadapt.adapters.base import AdapterConfig, AdapterLayer, ConditionedConfig
from recadapt.adapters.registry import adapter_kind

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


def _copy_same_shapes(own: Mapping[str, Tensor], state: Mapping[str, Tensor], what: str) -> None:
    """Copy ``state[key]`` into every ``own[key]``, after checking all shapes (nothing is copied on a mismatch)."""
    for key, target in own.items():
        if state[key].shape != target.shape:
            raise ValueError(f"{what} {key}: shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state[key])
