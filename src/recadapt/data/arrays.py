"""List columns as Arrow list arrays (offsets + flat values), the form every vectorised split and batch uses.

Sample frames hold list columns (histories, candidates); the protocols, the batching and the evaluation work on
them as offsets and flat NumPy values, with no Python loop per row. These are the conversions and slicing helpers
they share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

_INT32_MAX = np.iinfo(np.int32).max


def to_list_array(obj: Any, value_type: pa.DataType | None = None) -> pa.Array:
    """Normalise a list column to one Arrow list array (no nulls).

    Accepts an Arrow (chunked) list array, a pandas Series (object column of arrays/lists or ``ArrowDtype``),
    a sequence of arrays, or a 2-D NumPy matrix. Conversion of object columns happens in Arrow's C++ code,
    not in a Python loop.
    """
    value_type = pa.int64() if value_type is None else value_type
    if isinstance(obj, np.ndarray) and obj.ndim == 2:
        n, k = obj.shape
        values = pa.array(np.ascontiguousarray(obj).reshape(-1), type=value_type)
        return list_array(np.arange(n + 1, dtype=np.int64) * k, values)
    if isinstance(obj, pd.Series):
        # ArrowDtype columns convert without copying; object columns go through Arrow's C++ converter.
        is_arrow = isinstance(obj.dtype, pd.ArrowDtype)
        obj = pa.array(obj) if is_arrow else pa.array(obj.to_numpy(), type=pa.list_(value_type))
    elif not isinstance(obj, (pa.Array, pa.ChunkedArray)):
        obj = pa.array(obj, type=pa.list_(value_type))
    if isinstance(obj, pa.ChunkedArray):
        obj = obj.combine_chunks() if obj.num_chunks != 1 else obj.chunk(0)
    if not (pa.types.is_list(obj.type) or pa.types.is_large_list(obj.type)):
        raise TypeError(f"expected a list column, got Arrow type {obj.type}")
    if obj.null_count:
        raise ValueError(f"list column has {obj.null_count} null rows; use empty lists instead")
    if obj.type.value_type != value_type:
        obj = obj.cast(
            pa.large_list(value_type) if pa.types.is_large_list(obj.type) else pa.list_(value_type)
        )
    return obj


def list_offsets_values(lists: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-based ``int64`` offsets (N+1) and the flat values of a list array, zero-copy where possible."""
    offsets = np.asarray(lists.offsets).astype(np.int64, copy=False)
    start, stop = int(offsets[0]), int(offsets[-1])
    child = lists.values.slice(start, stop - start)
    if child.null_count:
        raise ValueError(f"list column has {child.null_count} null values")
    values = child.to_numpy(zero_copy_only=False)
    return offsets - start if start else offsets, values


def list_array(offsets: np.ndarray, values: np.ndarray | pa.Array) -> pa.Array:
    """A list array from offsets and flat values (64-bit offsets only when 32 bits cannot hold them)."""
    if not isinstance(values, pa.Array):
        values = pa.array(values)
    if len(offsets) and offsets[-1] > _INT32_MAX:
        return pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), values)
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), values)


def _tail(offsets: np.ndarray, values: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last ``max_len`` values of every list (``max_len <= 0``: keep all)."""
    lengths = np.diff(offsets)
    if max_len <= 0 or not len(lengths) or lengths.max() <= max_len:
        return offsets, values
    keep = np.minimum(lengths, max_len)
    new_offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=new_offsets[1:])
    return new_offsets, values[_window_index(offsets[1:], keep, new_offsets)]


def _window_index(ends: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Flat gather index of windows ``[end - length, end)`` laid out at ``offsets`` (``offsets = cumsum``)."""
    total = int(offsets[-1])
    index = np.arange(total, dtype=np.int64)
    index += np.repeat(ends - lengths - offsets[:-1], lengths)
    return index


def _windows(values: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """List array whose row i is ``values[ends[i] - lengths[i] : ends[i]]``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return list_array(offsets, values[_window_index(ends, lengths, offsets)])


def _compress_lists(
    offsets: np.ndarray, values: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Drop the lists where ``keep`` is false."""
    lengths = np.diff(offsets)
    if keep.all():
        return offsets, values
    new_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=new_offsets[1:])
    return new_offsets, values[np.repeat(keep, lengths)]


def _frame(columns: dict[str, np.ndarray | pa.Array]) -> pd.DataFrame:
    """A pandas frame from NumPy / Arrow columns; list columns become object columns of NumPy views."""
    arrays = {k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()}
    return pa.table(arrays).to_pandas()
