"""Persist a protocol split as Parquet + ``manifest.json``, byte-identically and atomically, and load it back.

Layout: ``<out_root>/<dataset>/<protocol>/{train,valid,test,items,users}.parquet`` and ``manifest.json``.

Why byte-identical: the manifest records the SHA-256 of every file, so two machines (or two runs) can check
that they score methods on exactly the same samples and candidates. Hence: Arrow schemas without pandas
metadata, a fixed row-group size, zstd at a fixed level, sorted JSON keys and no timestamps anywhere.

Why atomic: a crash mid-write must never leave a half-written split that a later run would trust. Files are
written to a temporary directory next to the destination, which then replaces the destination with renames.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import recadapt
from recadapt.data.protocols import PROTOCOLS
from recadapt.data.schema import Dataset
from recadapt.data.splits import CTR, FULL_RANKING, NEXT_ITEM, PARTS, SAMPLED_RANKING, Split
from recadapt.errors import DataFormatError
from recadapt.io import atomic_directory, sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ROW_GROUP_SIZE = 65_536
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3

_LIST_INT = pa.list_(pa.int64())
_LIST_FLOAT = pa.list_(pa.float64())
# Contract types of the sample columns (docs/architecture.md); other columns keep their inferred type.
_SAMPLE_TYPES: dict[str, dict[str, pa.DataType]] = {
    NEXT_ITEM: {"user_id": pa.int64(), "history": _LIST_INT, "target": pa.int64(), "candidates": _LIST_INT},
    CTR: {
        "user_id": pa.int64(),
        "target": pa.int64(),
        "label": pa.int8(),
        "rating": pa.float64(),
        "timestamp": pa.int64(),
        "history": _LIST_INT,
        "history_ratings": _LIST_FLOAT,
        "shot_rank": pa.int64(),
    },
    FULL_RANKING: {"user_id": pa.int64(), "history": _LIST_INT, "target": pa.int64()},
    SAMPLED_RANKING: {
        "user_id": pa.int64(),
        "history": _LIST_INT,
        "target": pa.int64(),
        "candidates": _LIST_INT,
    },
}


@dataclass
class Prepared:
    """A persisted split loaded back: samples per part, the item and user tables, and the manifest."""

    manifest: dict[str, Any]
    parts: dict[str, pd.DataFrame]
    items: pd.DataFrame
    users: pd.DataFrame
    n_items: int
    n_users: int
    path: Path | None = None

    @property
    def protocol(self) -> str:
        return str(self.manifest["protocol"])

    @property
    def pad_id(self) -> int:
        """The padding item id (``n_items``) for padded history tensors."""
        return self.n_items


def dataset_dirname(name: str) -> str:
    """A file-system-safe directory name for a dataset (``recbole:/a/b/ml-1m`` -> ``recbole_a_b_ml-1m``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not safe:
        raise ValueError(f"dataset name {name!r} has no usable characters for a directory name")
    return safe


def split_dirname(protocol: str, params: dict[str, Any] | None = None) -> str:
    """The directory of a split: the protocol's name, with the parameters given away from their defaults appended
    (``sampled-ranking``, ``sampled-ranking__n_negatives-99__negatives-popularity``), so splits built with
    other parameters live side by side instead of replacing each other."""
    defaults = {}
    if protocol in PROTOCOLS:
        defaults = {k: p.default for k, p in inspect.signature(PROTOCOLS[protocol]).parameters.items()}
    named = sorted((k, v) for k, v in (params or {}).items() if defaults.get(k, inspect.Parameter.empty) != v)
    return "__".join([protocol, *(f"{k}-{v}" for k, v in named)])


def prepare(ds: Dataset, protocol: str, out_root: Path, seed: int = 0, **params: Any) -> Path:
    """Build ``protocol``'s split of ``ds`` and persist it; returns ``<out_root>/<dataset>/<dirname>``
    (:func:`split_dirname`: the protocol, plus ``params`` when given).

    ``seed`` and ``params`` go to the protocol function (``seed`` only where it draws anything).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    build = PROTOCOLS[protocol]
    accepted = set(inspect.signature(build).parameters) - {"ds"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"protocol {protocol!r} has no parameters {unknown}; it takes {sorted(accepted)}")
    dirname = split_dirname(protocol, params)
    if "seed" in accepted:
        params["seed"] = seed
    split = build(ds, **params)
    return save_split(ds, split, out_root, seed=seed, dirname=dirname)


def save_split(ds: Dataset, split: Split, out_root: Path, seed: int = 0, dirname: str | None = None) -> Path:
    """Persist an already built ``split`` of ``ds`` (see :func:`prepare`); returns the output directory,
    ``<out_root>/<dataset>/<dirname>`` (default: the protocol's name)."""
    final = Path(out_root) / dataset_dirname(ds.name) / (dirname or split.protocol)
    with atomic_directory(final) as tmp:
        files: dict[str, str] = {}
        rows: dict[str, int] = {}
        types = _SAMPLE_TYPES.get(split.protocol, {})
        for part in PARTS:
            frame = split.parts[part]
            files[f"{part}.parquet"] = _write(_to_table(frame, types), tmp / f"{part}.parquet")
            rows[part] = len(frame)
        files["items.parquet"] = _write(_to_table(ds.items, {}), tmp / "items.parquet")
        files["users.parquet"] = _write(_to_table(ds.users, {}), tmp / "users.parquet")
        manifest = {
            "format_version": FORMAT_VERSION,
            "recadapt_version": recadapt.__version__,
            "dataset": ds.name,
            "domain": ds.domain,
            "protocol": split.protocol,
            "seed": seed,
            "params": split.params,
            "stats": split.stats,
            "sources": dict(ds.sources),
            "rows": rows,
            "n_items": ds.n_items,
            "n_users": ds.n_users,
            "files": files,
        }
        text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False, default=_json_default) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
    return final


def load_prepared(path: Path, verify: bool = True) -> Prepared:
    """Load a directory written by :func:`prepare`; ``verify`` checks every file's SHA-256 first."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path}: no manifest; was this directory written by recadapt prepare?"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(manifest_path, err.lineno, None, f"invalid JSON: {err.msg}") from err
    files = manifest.get("files")
    expected = {f"{p}.parquet" for p in PARTS} | {"items.parquet", "users.parquet"}
    if not isinstance(files, dict) or not expected <= set(files):
        raise DataFormatError(manifest_path, None, "files", f"must list {sorted(expected)}")
    if verify:
        for name, digest in sorted(files.items()):
            file = path / name
            if not file.is_file():
                raise DataFormatError(file, None, None, "listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != digest:
                raise DataFormatError(
                    file,
                    None,
                    "sha256",
                    f"does not match the manifest (file {actual}, manifest {digest}); "
                    "the file changed after prepare: prepare again",
                )
    parts = {p: pd.read_parquet(path / f"{p}.parquet") for p in PARTS}
    return Prepared(
        manifest=manifest,
        parts=parts,
        items=pd.read_parquet(path / "items.parquet"),
        users=pd.read_parquet(path / "users.parquet"),
        n_items=int(manifest["n_items"]),
        n_users=int(manifest["n_users"]),
        path=path,
    )


# ----------------------------------------------------------------------------------------------------------


def _to_table(frame: pd.DataFrame, types: dict[str, pa.DataType]) -> pa.Table:
    """An Arrow table with the contract types, no pandas index and no schema metadata (it embeds versions)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    fields = []
    for field in table.schema:
        kind = types.get(field.name, field.type)
        if pa.types.is_large_string(kind) or pa.types.is_null(kind):  # null: an empty column of objects
            kind = pa.string()
        fields.append(pa.field(field.name, kind))
    return table.cast(pa.schema(fields)).replace_schema_metadata(None)


def _write(table: pa.Table, file: Path) -> str:
    pq.write_table(
        table,
        file,
        row_group_size=ROW_GROUP_SIZE,
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
        version="2.6",
        data_page_version="1.0",
        write_statistics=True,
        store_schema=True,
    )
    return sha256_file(file)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
