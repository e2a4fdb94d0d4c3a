"""Padding, prefix expansion and tensor batching, checked against plain-Python references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import random_dataset
from torch.utils.data import DataLoader

from recadapt.data.batching import (
    SampleDataset,
    TensorBatches,
    collate,
    expand_prefixes,
    pad_histories,
    sample_tensors,
)
from recadapt.data.protocols import ctr, full_ranking, next_item

PAD = 99
histories_strategy = st.lists(st.lists(st.integers(0, 50), max_size=12), max_size=20)


def _pad_reference(histories: list[list[int]], max_len: int, pad_id: int) -> np.ndarray:
    rows = [[pad_id] * (max_len - len(h[-max_len:])) + h[-max_len:] for h in histories]
    return np.array(rows, dtype=np.int64).reshape(len(histories), max_len)


def _expand_reference(
    histories: list[list[int]], targets: list[int], max_len: int, min_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    windows, out_targets, rows = [], [], []
    for row, (history, target) in enumerate(zip(histories, targets, strict=True)):
        seq = [*history, target]
        for t in range(min_history, len(seq)):
            windows.append(seq[max(0, t - max_len) : t])
            out_targets.append(seq[t])
            rows.append(row)
    return _pad_reference(windows, max_len, PAD), np.array(out_targets, dtype=np.int64), np.array(rows)


def test_pad_histories_hand_example() -> None:
    got = pad_histories([[1, 2, 3], [4], []], max_len=2, pad_id=9)
    np.testing.assert_array_equal(got, [[2, 3], [9, 4], [9, 9]])
    assert got.dtype == np.int64


@settings(max_examples=60, deadline=None)
@given(histories=histories_strategy, max_len=st.integers(1, 8))
def test_pad_histories_matches_reference(histories: list[list[int]], max_len: int) -> None:
    expected = _pad_reference(histories, max_len, PAD)
    np.testing.assert_array_equal(pad_histories(histories, max_len, PAD), expected)
    arrow = pa.array([[0, 0], *histories], type=pa.list_(pa.int64())).slice(1)  # sliced: offsets not at 0
    np.testing.assert_array_equal(pad_histories(arrow, max_len, PAD), expected)
    series = pd.Series([np.array(h, dtype=np.int64) for h in histories], dtype=object)
    np.testing.assert_array_equal(pad_histories(series, max_len, PAD), expected)


def test_pad_histories_accepts_parquet_style_int32_and_rejects_bad_length() -> None:
    column = pa.array([[1, 2], [3]], type=pa.list_(pa.int32()))
    np.testing.assert_array_equal(pad_histories(column, 3, 0), [[0, 1, 2], [0, 0, 3]])
    with pytest.raises(ValueError, match="max_len"):
        pad_histories([[1]], 0, 0)


def test_expand_prefixes_hand_example() -> None:
    history, target, rows = expand_prefixes([[1, 2, 3], [4]], [5, 6], 3, pad_id=9, return_rows=True)
    np.testing.assert_array_equal(history, [[9, 9, 1], [9, 1, 2], [1, 2, 3], [9, 9, 4]])
    np.testing.assert_array_equal(target, [2, 3, 5, 6])
    np.testing.assert_array_equal(rows, [0, 0, 0, 1])
    history, target = expand_prefixes([[1, 2, 3]], [5], 2, min_history=3, pad_id=9)
    np.testing.assert_array_equal(history, [[2, 3]])
    np.testing.assert_array_equal(target, [5])


@settings(max_examples=60, deadline=None)
@given(
    histories=histories_strategy,
    max_len=st.integers(1, 6),
    min_history=st.integers(0, 4),
    data=st.data(),
)
def test_expand_prefixes_matches_reference(
    histories: list[list[int]], max_len: int, min_history: int, data: st.DataObject
) -> None:
    targets = data.draw(st.lists(st.integers(0, 50), min_size=len(histories), max_size=len(histories)))
    want = _expand_reference(histories, targets, max_len, min_history)
    got = expand_prefixes(
        histories, np.array(targets, dtype=np.int64), max_len, min_history, pad_id=PAD, return_rows=True
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.reshape(w.shape), w)


def test_expand_prefixes_on_full_ranking_rows_rebuilds_training_sequences() -> None:
    ds = random_dataset(n_users=20, seed=1)
    train = full_ranking(ds).parts["train"]
    history, target = expand_prefixes(train["history"], train["target"].to_numpy(), 50, pad_id=ds.n_items)
    assert len(target) == sum(len(h) for h in train["history"])  # one sample per position after the first
    np.testing.assert_array_equal(history[:, -1][: len(train["history"][0])], train["history"][0])


def test_sample_dataset_next_item_fields_and_dtypes() -> None:
    ds = random_dataset(seed=2)
    test = next_item(ds).parts["train"]
    data = SampleDataset(test, max_len=10, pad_id=ds.n_items)
    assert list(data.tensors) == ["history", "target", "candidates", "user_id"]
    row = data[3]
    assert row["history"].shape == (10,) and row["history"].dtype == torch.long
    assert row["candidates"].shape == (20,) and int(row["target"]) == int(test["target"][3])
    expected = pad_histories(test["history"].iloc[3:4], 10, ds.n_items)[0]
    np.testing.assert_array_equal(row["history"].numpy(), expected)


def test_sample_dataset_ctr_label_is_float_and_fields_select() -> None:
    ds = random_dataset(seed=3)
    train = ctr(ds).parts["train"]
    data = SampleDataset(train, max_len=5, pad_id=ds.n_items, fields=["history", "target", "label"])
    assert list(data.tensors) == ["history", "target", "label"]
    assert data.tensors["label"].dtype == torch.float32
    np.testing.assert_array_equal(data.tensors["label"].numpy(), train["label"].to_numpy(np.float32))
    with pytest.raises(ValueError, match="unknown batch fields"):
        SampleDataset(train, 5, ds.n_items, fields=["rating"])


def test_data_loader_fetches_whole_batches() -> None:
    ds = random_dataset(seed=4)
    data = SampleDataset(next_item(ds).parts["train"], max_len=10, pad_id=ds.n_items)
    loader = DataLoader(data, batch_size=32, shuffle=False, collate_fn=collate)
    batches = list(loader)
    assert batches[0]["history"].shape == (32, 10) and batches[0]["candidates"].shape == (32, 20)
    torch.testing.assert_close(torch.cat([b["target"] for b in batches]), data.tensors["target"])
    rows = collate([data[0], data[1]])
    torch.testing.assert_close(rows["history"], data.tensors["history"][:2])


def test_sample_dataset_from_prefixes_carries_user_ids() -> None:
    ds = random_dataset(n_users=15, seed=5)
    train = full_ranking(ds).parts["train"]
    data = SampleDataset.from_prefixes(train, max_len=8, pad_id=ds.n_items)
    history, target, rows = expand_prefixes(
        train["history"], train["target"].to_numpy(), 8, pad_id=ds.n_items, return_rows=True
    )
    assert list(data.tensors) == ["history", "target", "user_id"]
    np.testing.assert_array_equal(data.tensors["history"].numpy(), history)
    np.testing.assert_array_equal(data.tensors["user_id"].numpy(), train["user_id"].to_numpy()[rows])


def test_tensor_batches_are_seeded_per_epoch_and_resumable() -> None:
    tensors = {"x": torch.arange(10), "y": torch.arange(10) * 2}
    batches = TensorBatches(tensors, batch_size=4, seed=1)
    assert len(batches) == 3
    epoch0 = [b["x"] for b in batches]
    assert sorted(torch.cat(epoch0).tolist()) == list(range(10))
    assert all(torch.equal(b["y"], b["x"] * 2) for b in batches)
    assert [b.tolist() for b in epoch0] == [b["x"].tolist() for b in TensorBatches(tensors, 4, seed=1)]
    batches.set_epoch(1)
    epoch1 = [b["x"] for b in batches]
    assert torch.cat(epoch1).tolist() != torch.cat(epoch0).tolist()
    resumed = [b["x"] for b in batches.epoch_batches(1, start=1)]
    assert [b.tolist() for b in resumed] == [b.tolist() for b in epoch1[1:]]
    plain = TensorBatches(tensors, 4, shuffle=False, drop_last=True)
    assert [b["x"].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="first dimension"):
        TensorBatches({"x": torch.zeros(3), "y": torch.zeros(4)}, 2)


def test_sample_tensors_rejects_ragged_candidates() -> None:
    frame = pd.DataFrame({"target": [1, 2], "candidates": [[1, 3], [2]]})
    with pytest.raises(ValueError, match="differ in length"):
        sample_tensors(frame, 4, 0)
