"""Helpers shared by the readers: hashing, Parquet access, id factorisation and frame building.

List-valued columns (``history``, ``history_ratings``) hold one numpy array per row, which is what pandas
returns when it reads a Parquet ``list`` column, so in-memory presplits and prepared files look the same to
consumers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recadapt.errors import DataFormatError


def require_file(path: Path) -> Path:
    """Fail early with the expected location, not deep inside a parser."""
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}")
    return path


NO_VERIFY_HINT = "pass verify=False (CLI --no-verify, or RECADAPT_NO_VERIFY=1) to read it anyway"


def check_recorded_hashes(root: Path, sources: Mapping[str, str], recorded: Mapping[str, str]) -> None:
    """Refuse a file of a published dataset whose SHA-256 differs from the recorded one.

    A copy cut at a line boundary (or otherwise edited) still parses, and would silently give other data than
    the published one. ``sources`` are the hashes the reader computed anyway (keys relative to ``root``, the
    data directory), so this costs no extra read. Called after parsing, so a malformed line is still reported
    at its line.
    """
    for name, digest in sorted(sources.items()):
        expected = recorded.get(name)
        if expected is not None and digest != expected:
            raise DataFormatError(
                Path(root) / name,
                None,
                None,
                f"SHA-256 {digest[:16]}... does not match the recorded {expected[:16]}... of the published file "
                f"(truncated or modified copy?); {NO_VERIFY_HINT}",
            )


# ------------------------------------------------------------------------------------------------------------
# Parquet: rows are reported as 1-based ``line`` numbers (row 1 is the first data row).

ColumnCheck = Callable[[pa.DataType], bool]


def is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list_of(inner: ColumnCheck) -> ColumnCheck:
    def check(t: pa.DataType) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and inner(t.value_type)

    return check


def is_int_list(t: pa.DataType) -> bool:
    return _is_list_of(is_int)(t)


def is_number_list(t: pa.DataType) -> bool:
    return _is_list_of(is_number)(t)


def is_text_list(t: pa.DataType) -> bool:
    return _is_list_of(is_text)(t)


_EXPECTED = {
    is_int: "an integer column",
    is_number: "a numeric column",
    is_text: "a string column",
    is_int_list: "a list of integers",
    is_number_list: "a list of numbers",
    is_text_list: "a list of strings",
}


def read_parquet(path: Path, columns: Mapping[str, ColumnCheck]) -> pa.Table:
    """Read the named columns of a Parquet file, checking presence, type and absence of nulls.

    Raises :class:`DataFormatError` for an unreadable file (for example truncated), a missing column, a column
    of the wrong type, or a null value (with the row's 1-based number).
    """
    require_file(path)
    try:
        schema = pq.read_schema(path)
        names = set(schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataFormatError(path, None, missing[0], f"missing column (file has {sorted(names)})")
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(path, None, None, f"not a readable Parquet file: {exc}") from exc
    for name, check in columns.items():
        col = table.column(name)
        if not check(col.type):
            raise DataFormatError(
                path, None, name, f"expected {_EXPECTED.get(check, 'another type')}, found {col.type}"
            )
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataFormatError(path, row + 1, name, "missing value")
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            flat = pc.list_flatten(col)
            if flat.null_count:
                parents = pc.list_parent_indices(col).to_numpy()
                row = int(parents[np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]])
                raise DataFormatError(path, row + 1, name, "missing value inside the list")
    return table.combine_chunks()


def int_column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy().astype(np.int64, copy=False)


def list_column(table: pa.Table, name: str, dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets) so per-row work stays vectorised."""
    col = table.column(name)
    if col.num_chunks == 0:
        return np.zeros(0, dtype=dtype), np.zeros(1, dtype=np.int64)
    arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    values = values[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


def fixed_width_matrix(table: pa.Table, name: str, width: int, path: Path) -> np.ndarray:
    """A list column whose rows all hold ``width`` integers, as an (n, width) int64 matrix."""
    values, offsets = list_column(table, name)
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        row = int(bad[0])
        msg = "empty list" if lengths[row] == 0 else f"expected {width} entries, found {lengths[row]}"
        raise DataFormatError(path, row + 1, name, msg)
    return values.reshape(-1, width)


# ------------------------------------------------------------------------------------------------------------
# Frames


def ragged(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Split flat ``values`` at ``offsets`` into an object array holding one array per row."""
    out = np.empty(len(offsets) - 1, dtype=object)
    bounds = np.asarray(offsets).tolist()
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out[i] = values[start:stop]
    return out


def first_true(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def sort_order(user_id: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """The stable permutation sorting rows by (user_id, timestamp); ties keep the input (line) order.

    One composite int64 key sorts several times faster than ``np.lexsort`` on two keys (which matters at 25M
    rows). Float or very wide timestamps are first replaced by their dense rank, which keeps the order.
    """
    user = np.asarray(user_id).astype(np.int64, copy=False)
    if not len(user):
        return np.zeros(0, dtype=np.int64)
    times = np.asarray(timestamp)
    if times.dtype.kind == "f" and not (
        np.array_equal(times, np.floor(times)) and np.abs(times).max() < 2**62
    ):
        times = np.unique(times, return_inverse=True)[1]
    times = times.astype(np.int64, copy=False)
    low, span = int(times.min()), int(times.max()) - int(times.min()) + 1
    if span * (int(user.max()) + 1) >= 2**62:
        times = np.unique(times, return_inverse=True)[1].astype(np.int64)
        low, span = 0, int(times.max()) + 1
    key = user * span + (times - low)
    if (key[1:] >= key[:-1]).all():
        return np.arange(len(key), dtype=np.int64)
    return np.argsort(key, kind="stable")


def interactions_frame(
    user_id: np.ndarray,
    item_id: np.ndarray,
    rating: np.ndarray | None,
    timestamp: np.ndarray,
    extra: Mapping[str, np.ndarray | pd.Series] | None = None,
) -> pd.DataFrame:
    """Build the interactions table sorted by (user_id, timestamp, original order).

    ``timestamp`` may be float (RecBole): rows are ordered on the exact values, then floored to int64 seconds.
    """
    order = sort_order(user_id, timestamp)
    stamps = np.asarray(timestamp)[order]
    if stamps.dtype.kind == "f":
        np.floor(stamps, out=stamps)
    data: dict[str, object] = {
        "user_id": np.asarray(user_id)[order].astype(np.int64, copy=False),
        "item_id": np.asarray(item_id)[order].astype(np.int64, copy=False),
        "rating": np.full(len(order), np.nan)
        if rating is None
        else np.asarray(rating, dtype=np.float64)[order],
        "timestamp": stamps.astype(np.int64, copy=False),
    }
    del stamps
    for name, values in (extra or {}).items():
        data[name] = (
            values.take(order).reset_index(drop=True) if isinstance(values, pd.Series) else values[order]
        )
    return pd.DataFrame(data, copy=False)


def positions_within(group_sizes: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at every group: the order index used when a source has no times."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    return np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)
