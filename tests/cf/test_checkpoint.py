"""save_crm / load_crm: exact round trips, tied weights, and errors that name the offending file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recadapt.cf import (
    CRM_REGISTRY,
    CheckpointError,
    CRMConfig,
    SequentialRecommender,
    build_crm,
    load_crm,
    save_crm,
)
from recadapt.cf.base import Batch
from recadapt.errors import ConfigError


def _trained(model: SequentialRecommender, data: dict[str, Tensor]) -> SequentialRecommender:
    """A few optimiser steps, so weights (and batch-norm statistics) differ from any fresh initialisation."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(data).backward()
        optimizer.step()
    return model.eval()


def test_round_trip_gives_identical_scores(case, batch, tmp_path: Path) -> None:
    data = batch()
    model = _trained(case.build(), data)
    assert save_crm(model, tmp_path / "crm") == tmp_path / "crm"
    assert sorted(p.name for p in (tmp_path / "crm").iterdir()) == ["config.json", "model.safetensors"]

    loaded = load_crm(tmp_path / "crm")
    assert type(loaded) is type(model) and not loaded.training
    assert (loaded.n_items, loaded.n_users, loaded.config) == (model.n_items, model.n_users, model.config)
    with torch.no_grad():
        assert torch.equal(loaded.score_all(data), model.score_all(data))
        assert torch.equal(loaded.sequence_representation(data), model.sequence_representation(data))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_config_json_layout_and_overwrite(tmp_path: Path) -> None:
    model = build_crm("sasrec", n_items=7, n_users=3, hidden_size=8, max_len=4)
    save_crm(model, tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec == {
        "name": "sasrec",
        "n_items": 7,
        "n_users": 3,
        "config": model.config.to_dict(),
        "format_version": 1,
    }
    # Saving again over an existing checkpoint replaces it and leaves no temporary files.
    other = build_crm("sasrec", n_items=7, n_users=3, hidden_size=8, max_len=4)
    save_crm(other, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_crm(tmp_path).item_embeddings(), other.item_embeddings())


class _TiedConfig(CRMConfig):
    pass


class _TiedRecommender(SequentialRecommender):
    """An output layer sharing the input embedding's weight: two state-dict names, one tensor."""

    name: ClassVar[str] = "tied-test"
    config_class: ClassVar[type[CRMConfig]] = _TiedConfig

    def __init__(self, n_items: int, n_users: int = 0, config: CRMConfig | None = None) -> None:
        super().__init__(n_items, n_users, config)
        self.item_embedding = nn.Embedding(n_items + 1, self.config.hidden_size, padding_idx=self.pad_id)
        self.output = nn.Linear(self.config.hidden_size, n_items + 1, bias=False)
        self.output.weight = self.item_embedding.weight

    def sequence_representation(self, batch: Batch) -> Tensor:
        return self.item_embedding(batch["history"]).sum(dim=1)


def test_tied_weights_are_stored_once_and_retied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CRM_REGISTRY, "tied-test", _TiedRecommender)
    model = _TiedRecommender(5, config=_TiedConfig(hidden_size=4))
    save_crm(model, tmp_path)
    assert sorted(load_file(tmp_path / "model.safetensors")) == ["item_embedding.weight"]

    loaded = load_crm(tmp_path)
    assert loaded.output.weight is loaded.item_embedding.weight
    assert torch.equal(loaded.output.weight, model.output.weight)


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    spec = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del spec[key]
        else:
            spec[key] = value
    path.write_text(json.dumps(spec))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_crm(build_crm("gru4rec", n_items=6, hidden_size=8), tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "nope"}, "name"),
        ({"name": "sasrec", "config": {"hidden_size": 8, "n_layers": 1, "bogus": 1}}, "config"),
        ({"config": {"hidden_size": -1}}, "config"),
        ({"config": {"hidden_size": "8"}}, "config"),
        ({"config": {"n_items": 3}}, "config"),
        ({"format_version": 2}, "format_version"),
        ({"n_items": "6"}, "n_items"),
        ({"n_users": None}, "n_users"),
        ({"extra": 1}, "extra"),
    ],
    ids=[
        "unknown-name",
        "unknown-field",
        "invalid-value",
        "invalid-type",
        "argument-clash",
        "version",
        "type",
        "missing-key",
        "unknown-key",
    ],
)
def test_load_rejects_a_tampered_config(saved: Path, changes: dict[str, object], field: str) -> None:
    _edit_config(saved, **changes)
    with pytest.raises(ConfigError, match="config.json") as error:
        load_crm(saved)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_items": 7}, "'item_embedding.weight' has shape"),
        ({"name": "sasrec", "config": {"hidden_size": 8}}, "missing"),
    ],
    ids=["wrong-n-items", "other-model"],
)
def test_load_rejects_weights_that_do_not_match_the_config(
    saved: Path, changes: dict[str, object], message: str
) -> None:
    _edit_config(saved, **changes)
    with pytest.raises(CheckpointError, match=f"model.safetensors.*{message}"):
        load_crm(saved)


def test_load_rejects_extra_and_corrupt_weights(saved: Path) -> None:
    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "stray": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match="unexpected \\['stray'\\]"):
        load_crm(saved)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors.*unreadable"):
        load_crm(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        load_crm(saved)


def test_load_names_a_missing_file(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_crm(saved)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_crm(saved / "absent")
