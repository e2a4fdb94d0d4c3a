"""The one table of LLM-based methods: ``model.name`` -> what the method is and which recipe trains it.

Everything that differs between methods at the level of a run (which trainer, which protocols, whether it needs a
trained CRM, whether its prompts carry projected CRM item embeddings, whether it trains at all) is read from here,
never from ``if method == ...``. Adding a method is one row here, its parts (a CRM model in :mod:`recadapt.cf`, an
adapter kind in :mod:`recadapt.adapters`, a builder in :mod:`recadapt.methods`) and one ``configs/<name>.yaml``.
This module imports nothing heavy, so configs are checked against it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Recipe = Literal["crm", "llm", "fullrank"]
PROTOCOLS = ("next-item", "ctr", "full-ranking", "sampled-ranking")


@dataclass(frozen=True)
class Method:
    """One method's traits.

    ``recipe``: ``crm`` (:mod:`recadapt.train.crm`), ``llm`` (:mod:`recadapt.train.llm`: prompts, an adapter,
    ranking or p(Yes)) or ``fullrank`` (:mod:`recadapt.train.fullrank`: an embedding head over the catalogue).
    ``needs_crm``: ``llm.crm_run`` must name a trained CRM. ``hybrid``: prompts carry projected CRM item
    embeddings (LLaRA's curriculum, ReLLaX's soft prompts). ``trains``: False for zero-shot evaluation.
    """

    name: str
    recipe: Recipe
    protocols: tuple[str, ...] = PROTOCOLS
    needs_crm: bool = False
    hybrid: bool = False
    trains: bool = True
    paper: str = ""

    @property
    def config(self) -> str:
        """The default config file, relative to the repository."""
        return f"configs/{self.name}.yaml"


# prompted methods rank the persisted candidates of next-item and sampled-ranking, or answer Yes/No for ctr;
# full-catalogue methods rank every item, or only the sampled candidates
_PROMPTED = ("next-item", "ctr", "sampled-ranking")
_CANDIDATES = ("next-item", "sampled-ranking")
_CATALOGUE = ("full-ranking", "sampled-ranking")
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero-shot", "llm", _PROMPTED, trains=False),
        Method("tallrec", "llm", _PROMPTED, paper="Bao et al. 2023"),
        Method("llara", "llm", _CANDIDATES, needs_crm=True, hybrid=True, paper="Liao et al. 2024"),
        Method("ilora", "llm", _PROMPTED, needs_crm=True, hybrid=True, paper="Kong et al. 2024"),
        Method("reclora", "llm", _PROMPTED, paper="Zhu et al. 2024"),
        Method("rella", "llm", _PROMPTED, paper="Lin et al. 2024"),
        Method("rellax", "llm", _PROMPTED, needs_crm=True, hybrid=True, paper="Shan et al. 2025"),
        Method("laser", "fullrank", _CATALOGUE, needs_crm=True, paper="Zhang et al. 2024"),
        Method("darec", "fullrank", _CATALOGUE, needs_crm=True, paper="Liu et al. 2024"),
    )
}


def method(name: str) -> Method:
    """The row of ``name``. A name without a row is a conventional recommender: the models of
    :data:`recadapt.cf.CRM_REGISTRY` (the one table of CRMs), trained by the CRM recipe, which rejects a name that
    table does not know."""
    return METHODS.get(name) or Method(name, "crm")


def methods_of(recipe: Recipe) -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.recipe == recipe)
