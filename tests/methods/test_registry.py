"""The method table is the one place a method's traits live, and it agrees with the other tables."""

from __future__ import annotations

from pathlib import Path

from recadapt.cf import CRM_REGISTRY
from recadapt.methods import FULL_RANKING_BUILDERS
from recadapt.methods.registry import METHODS, method, methods_of
from recadapt.train.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_every_method_has_its_config_and_the_fullrank_ones_a_builder() -> None:
    for name, spec in METHODS.items():
        assert (REPO / spec.config).exists(), f"{name}: no {spec.config}"
        assert load_config(REPO / spec.config).model_name == name
        assert set(spec.protocols) <= {"next-item", "ctr", "full-ranking", "sampled-ranking"}
    assert set(methods_of("fullrank")) == set(FULL_RANKING_BUILDERS)


def test_a_name_without_a_row_is_a_conventional_recommender() -> None:
    assert not set(METHODS) & set(CRM_REGISTRY), "CRMs live in recadapt.cf.CRM_REGISTRY only"
    for name in CRM_REGISTRY:
        assert method(name).recipe == "crm"


def test_traits_replace_the_old_lists() -> None:
    assert {n for n, m in METHODS.items() if m.hybrid} == {"llara", "ilora", "rellax"}
    assert {n for n, m in METHODS.items() if not m.trains} == {"zero-shot"}
    assert method("llara").protocols == ("next-item", "sampled-ranking")
