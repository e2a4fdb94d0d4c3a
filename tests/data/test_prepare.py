"""Persistence: byte-identical output, manifests, round trips, hash checks and atomic replacement."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import random_dataset

import recadapt
import recadapt.io
from recadapt.data import prepare as prepare_module
from recadapt.data.prepare import dataset_dirname, load_prepared, prepare
from recadapt.data.protocols import PROTOCOLS
from recadapt.data.splits import PARTS
from recadapt.errors import DataFormatError

FILES = ("train.parquet", "valid.parquet", "test.parquet", "items.parquet", "users.parquet", "manifest.json")


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_prepare_is_byte_identical_across_runs(tmp_path: Path, protocol: str) -> None:
    ds = random_dataset(seed=1)
    first = prepare(ds, protocol, tmp_path / "a", seed=3)
    second = prepare(random_dataset(seed=1), protocol, tmp_path / "b", seed=3)
    assert first == tmp_path / "a" / "synthetic" / protocol
    assert sorted(p.name for p in first.iterdir()) == sorted(FILES)
    assert _tree_bytes(first) == _tree_bytes(second)
    again = prepare(ds, protocol, tmp_path / "a", seed=3)  # replacing an existing output changes nothing
    assert _tree_bytes(again) == _tree_bytes(second)


def test_manifest_contents(tmp_path: Path) -> None:
    ds = random_dataset(seed=2)
    out = prepare(ds, "next-item", tmp_path, seed=5, n_candidates=10)
    text = (out / "manifest.json").read_text(encoding="utf-8")
    manifest = json.loads(text)
    assert text == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    assert manifest["protocol"] == "next-item" and manifest["seed"] == 5
    assert manifest["params"]["n_candidates"] == 10 and manifest["params"]["seed"] == 5
    assert manifest["recadapt_version"] == recadapt.__version__
    assert manifest["dataset"] == "synthetic" and manifest["domain"] == "movie"
    assert manifest["sources"] == ds.sources
    assert manifest["n_items"] == ds.n_items and manifest["n_users"] == ds.n_users
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    prepared = load_prepared(out)
    assert manifest["rows"] == {p: len(prepared.parts[p]) for p in PARTS}
    assert manifest["stats"]["presplit"] is False


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_load_prepared_round_trip(tmp_path: Path, protocol: str) -> None:
    ds = random_dataset(seed=3)
    split = PROTOCOLS[protocol](ds)
    prepared = load_prepared(prepare(ds, protocol, tmp_path))
    assert prepared.protocol == protocol
    assert (prepared.n_items, prepared.n_users, prepared.pad_id) == (ds.n_items, ds.n_users, ds.n_items)
    for part in PARTS:
        want, got = split.parts[part], prepared.parts[part]
        assert list(got.columns) == list(want.columns)
        for col in want.columns:
            if want[col].dtype == object:
                assert [list(x) for x in got[col]] == [list(x) for x in want[col]]
                assert all(
                    np.asarray(x).dtype == np.asarray(y).dtype
                    for x, y in zip(got[col], want[col], strict=True)
                )
            else:
                assert got[col].dtype == want[col].dtype
                np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy())
    pd.testing.assert_frame_equal(prepared.items.astype(object), ds.items.astype(object), check_dtype=False)
    assert prepared.users["user_id"].tolist() == ds.users["user_id"].tolist()


def test_parquet_schemas_follow_the_contract(tmp_path: Path) -> None:
    ds = random_dataset(seed=8)
    ints, lists = pa.int64(), pa.list_(pa.int64())
    expected = {
        "next-item": {"user_id": ints, "history": lists, "target": ints, "candidates": lists},
        "ctr": {
            "user_id": ints,
            "target": ints,
            "label": pa.int8(),
            "rating": pa.float64(),
            "timestamp": ints,
            "history": lists,
            "history_ratings": pa.list_(pa.float64()),
            "shot_rank": ints,
        },
        "full-ranking": {"user_id": ints, "history": lists, "target": ints},
    }
    for protocol, columns in expected.items():
        schema = pq.read_schema(prepare(ds, protocol, tmp_path) / "train.parquet")
        assert {f.name: f.type for f in schema} == columns
        assert not schema.metadata or b"pandas" not in schema.metadata


def test_published_split_with_missing_parts_persists_empty_typed_parts(tmp_path: Path) -> None:
    ds = random_dataset(seed=9)
    test = pd.DataFrame({"user_id": [0, 1], "history": [[1, 2, 3], [4, 5, 6, 7]], "target": [8, 9]})
    ds.presplit = {"next-item": {"test": test}}
    prepared = load_prepared(prepare(ds, "next-item", tmp_path))
    assert prepared.manifest["rows"] == {"train": 0, "valid": 0, "test": 2}
    assert prepared.manifest["stats"] == {"presplit": True, "rows_skipped": {"test": 0}}
    schema = pq.read_schema(prepared.path / "train.parquet")
    assert schema.field("history").type == pa.list_(pa.int64())
    assert [list(h) for h in prepared.parts["test"]["history"]] == [[1, 2, 3], [4, 5, 6, 7]]


def test_load_prepared_detects_a_modified_file(tmp_path: Path) -> None:
    out = prepare(random_dataset(seed=4), "full-ranking", tmp_path)
    test_file = out / "test.parquet"
    data = bytearray(test_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    test_file.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="test.parquet.*does not match the manifest") as err:
        load_prepared(out)
    assert err.value.field == "sha256"
    data[len(data) // 2] ^= 0xFF
    test_file.write_bytes(bytes(data))
    load_prepared(out)
    (out / "valid.parquet").unlink()
    with pytest.raises(DataFormatError, match="valid.parquet.*missing"):
        load_prepared(out)
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_prepared(tmp_path)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failure_mid_write_keeps_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = random_dataset(seed=5)
    out = prepare(ds, "ctr", tmp_path, seed=0)
    before = _tree_bytes(out)
    real_write = prepare_module._write

    def failing_write(table, file: Path) -> str:
        if file.name == "test.parquet":
            raise OSError("disk full")
        return real_write(table, file)

    monkeypatch.setattr(prepare_module, "_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare(ds, "ctr", tmp_path, seed=1)
    assert _tree_bytes(out) == before
    assert _leftovers(out.parent) == []
    load_prepared(out)


def test_failure_while_swapping_restores_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = random_dataset(seed=6)
    out = prepare(ds, "full-ranking", tmp_path)
    before = _tree_bytes(out)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst) -> None:
        calls.append((src, dst))
        if len(calls) == 2:  # 1: old output aside, 2: new output into place
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(recadapt.io.os, "replace", flaky_replace)
    monkeypatch.setattr(recadapt.io, "_exchange", lambda a, b: False)  # the two-rename path of other systems
    with pytest.raises(OSError, match="rename failed"):
        prepare(ds, "full-ranking", tmp_path, seed=1)  # the same directory (other parameters get their own)
    monkeypatch.undo()
    assert _tree_bytes(out) == before
    assert _leftovers(out.parent) == []


def test_prepare_rejects_unknown_protocols_and_parameters(tmp_path: Path) -> None:
    ds = random_dataset(seed=7)
    with pytest.raises(ValueError, match="unknown protocol"):
        prepare(ds, "pairwise", tmp_path)
    with pytest.raises(ValueError, match="no parameters.*history_len"):
        prepare(ds, "full-ranking", tmp_path, history_len=5)
    assert list(tmp_path.iterdir()) == []


def test_dataset_dirname_is_file_system_safe() -> None:
    assert dataset_dirname("ml-100k") == "ml-100k"
    assert dataset_dirname("recbole:/data/sets/ml-1m") == "recbole_data_sets_ml-1m"
    assert dataset_dirname("../../etc") == "etc"
    with pytest.raises(ValueError):
        dataset_dirname("..")


# ------------------------------------------------------------------------------------------------------------
# Real data: MovieLens 100K from the shared data folder (the test fails, not skips, when it is missing)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k():
    from recadapt.data.registry import load_dataset

    data_dir = Path(__file__).parents[2].parent / "shared" / "data"
    assert (data_dir / "ml-100k" / "u.data").is_file(), f"MovieLens 100K missing under {data_dir}"
    return load_dataset("ml-100k", data_dir)


def test_ml100k_next_item_matches_the_published_protocol(ml100k, tmp_path: Path) -> None:
    out = prepare(ml100k, "next-item", tmp_path / "a")
    assert _tree_bytes(out) == _tree_bytes(prepare(ml100k, "next-item", tmp_path / "b"))
    prepared = load_prepared(out)
    manifest = prepared.manifest
    assert manifest["stats"]["users"] == {"train": 754, "valid": 94, "test": 95}
    # Every ML-100K user has >= 20 ratings: one valid/test sample each, n - 3 training samples each.
    counts = ml100k.interactions.groupby("user_id").size()
    train_users = prepared.parts["train"]["user_id"].unique()
    assert manifest["rows"] == {"train": int((counts[train_users] - 3).sum()), "valid": 94, "test": 95}
    assert set(manifest["sources"]) >= {"ml-100k/u.data", "ml-100k/u.item"}
    for part in PARTS:
        frame = prepared.parts[part]
        cands = np.stack(frame["candidates"].to_numpy())
        assert cands.shape == (len(frame), 20)
        assert ((cands == frame["target"].to_numpy()[:, None]).sum(axis=1) == 1).all()
        assert (np.diff(np.sort(cands, axis=1), axis=1) > 0).all()
    test = prepared.parts["test"]
    for history, target, cands in zip(test["history"], test["target"], test["candidates"], strict=True):
        assert 3 <= len(history) <= 10
        assert not (set(cands.tolist()) - {target}) & set(history.tolist())


def test_ml100k_ctr_and_full_ranking(ml100k, tmp_path: Path) -> None:
    ctr_split = load_prepared(prepare(ml100k, "ctr", tmp_path))
    assert ctr_split.manifest["rows"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    train, test = ctr_split.parts["train"], ctr_split.parts["test"]
    assert train["timestamp"].max() <= test["timestamp"].min()
    assert (test["label"].to_numpy() == (test["rating"].to_numpy() > 3)).all()
    first = test.iloc[0]
    earlier = ml100k.interactions.query("user_id == @first.user_id and timestamp < @first.timestamp")
    assert sorted(first["history"].tolist()) == sorted(earlier["item_id"].tolist())
    assert sorted(train["shot_rank"]) == list(range(80_000))

    full = load_prepared(prepare(ml100k, "full-ranking", tmp_path))
    assert full.manifest["rows"] == {"train": 943, "valid": 943, "test": 943}
    assert full.manifest["stats"]["users_dropped"] == 0
    lengths = full.parts["test"]["history"].map(len).to_numpy()
    np.testing.assert_array_equal(lengths + 1, ml100k.interactions.groupby("user_id").size().to_numpy())
