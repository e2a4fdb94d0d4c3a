"""Turn protocol samples into the padded tensors of the CRM batch convention (``docs/architecture.md``).

CPU time is scarce next to a GPU, so nothing here converts rows one by one in Python: histories are padded
with one vectorised gather over Arrow offsets, whole parts become tensors once, and batches are index slices
of those tensors (:class:`TensorBatches`, or :class:`SampleDataset` with ``__getitems__`` under a
``DataLoader``).

Padding follows the project convention: ``PAD = n_items``, histories **left**-padded, oldest first, so the
most recent item is always at position -1; longer histories keep their most recent ``max_len`` items.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import torch

from recadapt.data.arrays import list_offsets_values, to_list_array

BATCH_FIELDS = ("history", "target", "candidates", "label", "user_id")


def _pad_windows(
    values: np.ndarray, ends: np.ndarray, lengths: np.ndarray, max_len: int, pad_id: int
) -> np.ndarray:
    """Row i = ``values[ends[i] - k : ends[i]]``, ``k = min(lengths[i], max_len)``, left-padded to max_len."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    n = len(ends)
    keep = np.minimum(lengths, max_len)
    out = np.full((n, max_len), pad_id, dtype=np.int64)
    total = int(keep.sum())
    if total == 0:
        return out
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(keep[:-1], out=starts[1:])
    rows = np.repeat(np.arange(n, dtype=np.int64), keep)
    within = np.arange(total, dtype=np.int64) - starts[rows]  # 0 .. keep-1 inside each row
    source = (ends - keep)[rows] + within
    target = rows * max_len + (max_len - keep)[rows] + within
    out.reshape(-1)[target] = values[source]
    return out


def pad_histories(histories: Any, max_len: int, pad_id: int) -> np.ndarray:
    """``int64 (N, max_len)``: each history's last ``max_len`` items, left-padded with ``pad_id``.

    ``histories``: an Arrow list array, a pandas Series of arrays/lists (as read from Parquet), a list of
    arrays, or a 2-D matrix of real items.
    """
    offsets, values = list_offsets_values(to_list_array(histories))
    return _pad_windows(values.astype(np.int64, copy=False), offsets[1:], np.diff(offsets), max_len, pad_id)


@overload
def expand_prefixes(
    histories: Any,
    targets: Any,
    max_len: int,
    min_history: int = ...,
    *,
    pad_id: int,
    return_rows: Literal[False] = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def expand_prefixes(
    histories: Any,
    targets: Any,
    max_len: int,
    min_history: int = ...,
    *,
    pad_id: int,
    return_rows: Literal[True],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def expand_prefixes(
    histories: Any,
    targets: Any,
    max_len: int,
    min_history: int = 1,
    *,
    pad_id: int,
    return_rows: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample per position of each sequence ``history + [target]`` (full-ranking train rows).

    Position t (0-based) gives target ``seq[t]`` and history ``seq[t - max_len : t]``, left-padded with
    ``pad_id`` (the project's PAD is ``n_items``; it cannot be inferred from the rows, hence required);
    positions with fewer than ``min_history`` items before them are skipped. Returns
    ``(history (M, max_len), targets (M,))`` and, with ``return_rows``, each sample's source row (to carry
    ``user_id`` along).
    """
    if min_history < 0:
        raise ValueError(f"min_history must be >= 0, got {min_history}")
    offsets, hist = list_offsets_values(to_list_array(histories))
    targets = np.asarray(targets, dtype=np.int64)
    n = len(offsets) - 1
    if len(targets) != n:
        raise ValueError(f"{n} histories but {len(targets)} targets")
    lengths = np.diff(offsets)
    seq_offsets = offsets + np.arange(n + 1, dtype=np.int64)  # each row gains its target
    seq = np.empty(int(seq_offsets[-1]), dtype=np.int64)
    seq[np.arange(len(hist), dtype=np.int64) + np.repeat(np.arange(n, dtype=np.int64), lengths)] = hist
    seq[seq_offsets[1:] - 1] = targets
    row = np.repeat(np.arange(n, dtype=np.int64), lengths + 1)
    position = np.arange(len(seq), dtype=np.int64) - seq_offsets[:-1][row]
    at = np.flatnonzero(position >= min_history)
    matrix = _pad_windows(seq, at, position[at], max_len, pad_id)
    if return_rows:
        return matrix, seq[at], row[at]
    return matrix, seq[at]


def _available(data: pd.DataFrame | Mapping[str, Any]) -> list[str]:
    keys = data.columns if isinstance(data, pd.DataFrame) else data.keys()
    return [f for f in BATCH_FIELDS if f in keys]


def _as_numpy(column: Any) -> np.ndarray:
    return column.to_numpy() if isinstance(column, (pd.Series, pd.Index)) else np.asarray(column)


def sample_tensors(
    data: pd.DataFrame | Mapping[str, Any], max_len: int, pad_id: int, fields: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The batch-convention tensors of a whole part, built once.

    ``history`` LongTensor[N, max_len] (left-padded), ``target`` / ``user_id`` LongTensor[N], ``candidates``
    LongTensor[N, C], ``label`` FloatTensor[N]. ``fields`` defaults to every batch field present in ``data``.
    """
    fields = _available(data) if fields is None else list(fields)
    unknown = [f for f in fields if f not in BATCH_FIELDS]
    if unknown:
        raise ValueError(f"unknown batch fields {unknown}; known: {BATCH_FIELDS}")
    out: dict[str, torch.Tensor] = {}
    for name in fields:
        column = data[name]
        if name == "history":
            out[name] = torch.from_numpy(pad_histories(column, max_len, pad_id))
        elif name == "candidates":
            out[name] = torch.from_numpy(_fixed_lists(column, name))
        elif name == "label":
            out[name] = torch.from_numpy(_as_numpy(column).astype(np.float32))
        else:
            out[name] = torch.from_numpy(_as_numpy(column).astype(np.int64))
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"fields differ in length: {lengths}")
    return out


def _fixed_lists(column: Any, name: str) -> np.ndarray:
    """A list column whose rows all have the same length, as an ``int64 (N, C)`` matrix."""
    offsets, values = list_offsets_values(to_list_array(column))
    lengths = np.diff(offsets)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError(f"'{name}' rows differ in length ({lengths.min()}..{lengths.max()})")
    width = int(lengths[0]) if len(lengths) else 0
    # A copy: Arrow buffers are read-only, and torch tensors must own writable memory.
    return np.array(values, dtype=np.int64).reshape(len(lengths), width)


class TensorBatches:
    """Mini-batches sliced from precomputed tensors, in a seeded per-epoch order.

    The order of epoch e depends only on (``seed``, e), so a resumed run sees the same batches: call
    :meth:`set_epoch` (like ``DistributedSampler``) or use :meth:`epoch_batches` with ``start``.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors must share their first dimension, got sizes {sorted(sizes)}")
        self.tensors = dict(tensors)
        self.n = sizes.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (identity without shuffling)."""
        if not self.shuffle:
            return torch.arange(self.n)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(epoch,))))
        return torch.from_numpy(rng.permutation(self.n))

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` from batch index ``start`` on (to resume mid-epoch)."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield {k: t.index_select(0, index) for k, t in self.tensors.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.epoch_batches(self.epoch)


class SampleDataset(torch.utils.data.Dataset):
    """A protocol part as a map-style torch dataset of batch-convention dicts, converted to tensors once.

    ``data``: a sample frame (``Split.parts[...]`` / ``Prepared.parts[...]``) or a mapping of columns. With a
    ``DataLoader``, pass ``collate_fn=collate``: the loader then fetches whole batches through
    ``__getitems__`` (one tensor slice per field, no per-row work). :meth:`batches` skips the loader entirely.
    """

    def __init__(
        self,
        data: pd.DataFrame | Mapping[str, Any],
        max_len: int,
        pad_id: int,
        fields: Sequence[str] | None = None,
    ) -> None:
        self.max_len = max_len
        self.pad_id = pad_id
        self.tensors = sample_tensors(data, max_len, pad_id, fields)
        self._n = len(next(iter(self.tensors.values()))) if self.tensors else 0

    @classmethod
    def from_prefixes(
        cls, data: pd.DataFrame | Mapping[str, Any], max_len: int, pad_id: int, min_history: int = 1
    ) -> SampleDataset:
        """Full-ranking training rows expanded to one sample per position (:func:`expand_prefixes`).

        ``user_id`` is carried along when present.
        """
        history, target, rows = expand_prefixes(
            data["history"], _as_numpy(data["target"]), max_len, min_history, pad_id=pad_id, return_rows=True
        )
        columns: dict[str, Any] = {"target": target}
        if "user_id" in (data.columns if isinstance(data, pd.DataFrame) else data.keys()):
            columns["user_id"] = _as_numpy(data["user_id"]).astype(np.int64)[rows]
        dataset = cls(columns, max_len, pad_id)
        dataset.tensors = {"history": torch.from_numpy(history), **dataset.tensors}
        return dataset

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: t[index] for k, t in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: t.index_select(0, index) for k, t in self.tensors.items()}

    def batches(
        self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> TensorBatches:
        return TensorBatches(self.tensors, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)


def collate(
    batch: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``DataLoader`` collate: passes a batch fetched by ``__getitems__`` through; stacks single rows."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if not batch:
        return {}
    return {k: torch.stack([row[k] for row in batch]) for k in batch[0]}
