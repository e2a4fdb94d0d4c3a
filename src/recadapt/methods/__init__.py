"""Each paper's full-ranking system assembled from parts, behind one contract (:mod:`recadapt.methods.base`).

``FULL_RANKING_BUILDERS`` maps ``model.name`` to a builder ``(run config, llm section, prepared split) -> (model,
stages)``; :mod:`recadapt.methods.registry` holds every method's traits.
The next-item and CTR methods (TALLRec, LLaRA, iLoRA, RecLoRA, ReLLa, ReLLaX) are configurations of
:mod:`recadapt.train.llm` and need no class here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from recadapt.errors import ConfigError

if TYPE_CHECKING:  # methods.base needs torch; the registry below this package must load without it
    from recadapt.methods.base import FullRankingModel


def method_config(cls: type, model: Mapping[str, Any]) -> Any:
    """``cls`` (a dataclass) from the run's ``model`` section; unknown or invalid fields raise a ConfigError
    naming ``model.<field>``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ConfigError(
            "config", f"model.{unknown[0]}", f"unknown field; {model.get('name')} takes {sorted(known)}"
        )
    try:
        return cls(**model)
    except (TypeError, ValueError) as err:
        raise ConfigError("config", "model", str(err)) from None


def frozen_parts(config: Any, llm: Any, prepared: Any) -> tuple[Any, Any, list[str]]:
    """What every full-ranking method starts from: the backbone (``llm.backbone``), the frozen CRM run
    (``llm.crm_run``, trained on the same dataset) and the item titles indexed by item id."""
    from recadapt.cf.runs import load_crm_run
    from recadapt.llm.backbone import load_backbone
    from recadapt.llm.samples import item_titles

    backbone = load_backbone(llm.backbone, dtype=llm.dtype)
    crm, _ = load_crm_run(llm.crm_run, prepared, config.data.dataset, backbone.device)
    return backbone, crm, item_titles(prepared.items, prepared.n_items)


def _laser(*args: Any, **kwargs: Any) -> Any:
    from recadapt.methods.laser import build_laser

    return build_laser(*args, **kwargs)


def _darec(*args: Any, **kwargs: Any) -> Any:
    from recadapt.methods.darec import build_darec

    return build_darec(*args, **kwargs)


FULL_RANKING_BUILDERS: dict[str, Callable[..., tuple[FullRankingModel, list[Any]]]] = {
    "laser": _laser,
    "darec": _darec,
}


def build_full_ranking(
    config: Any, llm: Any, prepared: Any, progress: bool = False
) -> tuple[FullRankingModel, list]:
    """The model and training stages of ``config.model_name``."""
    try:
        builder = FULL_RANKING_BUILDERS[config.model_name]
    except KeyError:
        known = ", ".join(FULL_RANKING_BUILDERS)
        raise ConfigError("config", "model.name", f"unknown method; known: {known}") from None
    return builder(config, llm, prepared, progress=progress)
