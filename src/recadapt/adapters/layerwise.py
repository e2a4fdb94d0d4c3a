"""Layer-wise adapters: a different kind, rank or none at all per decoder layer, in one model.

    plan = {0: LoRAConfig(r=4), 1: MoELoRAConfig(r=16, cond_dim=64), 2: None, 3: BottleneckConfig(r=8)}
    model = attach_layerwise(base_model, plan)
    loss = model(input_ids=ids, labels=labels, cond=sequence_repr).loss
    save_layerwise(model, run_dir / "adapter")
    model = load_layerwise(fresh_base_model, run_dir / "adapter")

Layers whose configs are equal form one :class:`~recadapt.adapters.model.AdapterGroup` with one conditioner
(so a plan of one config everywhere is exactly :func:`~recadapt.adapters.attach_adapters`); each conditioned
group computes its own mix from the shared ``cond`` and only its layers receive it, through the same temporary
forward pre-hooks as :class:`~recadapt.adapters.AdaptedModel`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from recadapt.adapters.base import AdapterConfig, AdapterLayer, ConditionedConfig
from recadapt.adapters.model import (
    CONDITIONER_PREFIX,
    AdaptedModelBase,
    AdapterGroup,
    _check_attachable,
    _make_conditioner,
    _replace_targets,
    _target_names,
)
from recadapt.adapters.registry import config_from_dict
from recadapt.adapters.storage import ADAPTER_WEIGHTS, read_versioned_json
from recadapt.io import atomic_directory, write_json_atomic

LAYERWISE_PLAN = "adapter_plan.json"
PLAN_FORMAT_VERSION = 1

Plan = Mapping[int, AdapterConfig | None]


class LayerwiseAdaptedModel(AdaptedModelBase):
    """A frozen causal LM with per-layer adapters (see :class:`~recadapt.adapters.model.AdaptedModelBase` for
    ``forward``/``generate`` with ``cond``, ``param_groups``, ``adapter_state_dict`` and loading).

    ``plan`` is the plan it was built from (layer index -> config or None); ``group_configs`` and
    ``group_layers`` give each group's config and layers by group name (``layers_<i>_<j>...``, its layer
    indices); ``conditioners`` holds the conditioned groups' conditioners by the same names. Conditioner weights
    are saved as ``conditioner.<group>.<name>`` and train in the optimizer group ``conditioner.<group>``.
    """

    def __init__(
        self,
        base_model: nn.Module,
        plan: Plan,
        group_configs: dict[str, AdapterConfig],
        group_layers: dict[str, dict[str, AdapterLayer]],
        conditioners: dict[str, nn.Module],
    ) -> None:
        super().__init__(base_model)
        self.plan = dict(sorted(plan.items()))
        self.group_configs = group_configs
        self.group_layers = group_layers  # plain dicts: the layers are registered inside base_model
        self.conditioners = nn.ModuleDict(conditioners)
        self.adapter_layers = {
            name: layer for layers in group_layers.values() for name, layer in layers.items()
        }

    def adapter_groups(self) -> list[AdapterGroup]:
        conditioners = dict(self.conditioners.items())  # nn.ModuleDict has no .get
        return [
            AdapterGroup(
                name,
                config,
                self.group_layers[name],
                conditioners.get(name),
                f"{CONDITIONER_PREFIX}{name}.",
            )
            for name, config in self.group_configs.items()
        ]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and list of the decoder blocks: the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries
    (the one named ``...layers`` if several have that length)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    n_layers = getattr(config, "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    candidates = [(n, m) for n, m in lists if n_layers is None or len(m) == n_layers]
    if len(candidates) > 1:
        candidates = [(n, m) for n, m in candidates if n.rsplit(".", 1)[-1] == "layers"]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot tell the decoder layers apart: module lists {[(n, len(m)) for n, m in lists]}, "
            f"config.num_hidden_layers = {n_layers}"
        )
    return candidates[0]


def attach_layerwise(model: nn.Module, plan: Plan) -> LayerwiseAdaptedModel:
    """Freeze ``model`` (in place) and give decoder layer ``i`` the adapters of ``plan[i]`` on that layer's
    targets; layers mapped to None or absent from ``plan`` keep their plain linear layers.

    Layers with equal configs share one group and one conditioner; layers are replaced in module order and the
    conditioners built afterwards, in group order, so a one-config plan draws the same random inits as
    :func:`~recadapt.adapters.attach_adapters`. Every conditioned group reads the same ``cond``, so they must
    agree on ``cond_dim``.
    """
    path, blocks = decoder_layers(model)
    for index, config in plan.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(blocks):
            raise ValueError(f"plan keys must be decoder layer indices in [0, {len(blocks)}), got {index!r}")
        if config is not None and not isinstance(config, AdapterConfig):
            raise TypeError(f"plan[{index}] must be an AdapterConfig or None, got {type(config).__name__}")
    used = {i: c for i, c in sorted(plan.items()) if c is not None}
    if not used:
        raise ValueError("the plan adapts no layer: every entry is None")
    _check_attachable(model, list(used.values()))
    cond_dims = {c.cond_dim for c in used.values() if isinstance(c, ConditionedConfig)}
    if len(cond_dims) > 1:
        raise ValueError(
            f"the conditioned layers read one cond, so they need one cond_dim; got {sorted(cond_dims)}"
        )

    groups: list[tuple[AdapterConfig, list[int]]] = []
    for index, config in used.items():
        same = next((members for other, members in groups if other == config), None)
        if same is None:
            groups.append((config, [index]))
        else:
            same.append(index)
    group_of = {index: g for g, (_, members) in enumerate(groups) for index in members}
    names = ["layers_" + "_".join(map(str, members)) for _, members in groups]

    targets = {
        index: [f"{path}.{index}.{n}" for n in _target_names(blocks[index], config.target_modules)]
        for index, config in used.items()
    }
    model.requires_grad_(False)
    group_layers: dict[str, dict[str, AdapterLayer]] = {name: {} for name in names}
    for index, config in used.items():  # ascending: module order
        group_layers[names[group_of[index]]].update(_replace_targets(model, targets[index], config))
    group_configs = {name: config for name, (config, _) in zip(names, groups, strict=True)}
    conditioners = {}
    for name, config in group_configs.items():
        conditioner = _make_conditioner(config, group_layers[name])
        if conditioner is not None:
            conditioners[name] = conditioner
    return LayerwiseAdaptedModel(model, plan, group_configs, group_layers, conditioners)


def save_layerwise(model: LayerwiseAdaptedModel, folder: str | Path) -> Path:
    """Write ``adapter.safetensors`` (adapter + conditioner weights only) and ``adapter_plan.json`` (the plan:
    layer index -> kind and config, or null) to ``folder``, atomically (the folder is replaced as a whole). The
    plan file differs from :func:`~recadapt.adapters.save_adapters`' ``adapter_config.json``, so neither loader
    mistakes the other's folder for its own."""
    folder = Path(folder)
    state = {key: t.contiguous().cpu() for key, t in model.adapter_state_dict().items()}
    plan = {str(i): (c.to_dict() if c is not None else None) for i, c in model.plan.items()}
    with atomic_directory(folder) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "kind": "layerwise"})
        write_json_atomic(tmp / LAYERWISE_PLAN, {"format_version": PLAN_FORMAT_VERSION, "plan": plan})
    return folder


def read_layerwise_plan(folder: str | Path) -> dict[int, AdapterConfig | None]:
    """The typed plan saved in ``folder`` by :func:`save_layerwise`."""
    payload = read_versioned_json(Path(folder) / LAYERWISE_PLAN, PLAN_FORMAT_VERSION, "save_layerwise")
    return {
        int(index): (config_from_dict(config) if config is not None else None)
        for index, config in payload["plan"].items()
    }


def load_layerwise(base_model: nn.Module, folder: str | Path) -> LayerwiseAdaptedModel:
    """Rebuild the layer-wise adapters saved in ``folder`` on ``base_model`` (frozen in place) and load their
    weights (safetensors only, never pickle)."""
    model = attach_layerwise(base_model, read_layerwise_plan(folder))
    model.load_adapter_state_dict(load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    return model
