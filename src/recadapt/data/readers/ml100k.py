"""MovieLens 100K from the original GroupLens files (``data_dir/ml-100k/``).

``u.data`` (tab: user, item, rating, unix time), ``u.item`` (pipe, 24 fields, **latin-1**), ``u.user`` (pipe:
age, gender, occupation, zip) and ``u.genre`` (genre names by flag position). Dense ids follow the raw id
order, so raw id 1 is 0 and LLaRA's MovieLens ids (ML-100K id - 1) coincide with ours.

With ``verify`` (the default) every file read must have the SHA-256 of the GroupLens original (the table
:data:`recadapt.data.fetch.ML100K_SHA256`, which the downloader checks too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recadapt.data.fetch import ML100K_SHA256
from recadapt.data.readers._common import check_recorded_hashes, first_true, interactions_frame
from recadapt.data.readers._text import Field, raise_at_row, read_table
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

FOLDER = "ml-100k"
RECORDED_SHA256 = {f"{FOLDER}/{name}": digest for name, digest in ML100K_SHA256.items()}
ITEM_ENCODING = "latin-1"  # u.item is ISO-8859-1; UTF-8 decoding fails on "Misérables" and others
_ITEM_FIXED = (
    Field("item_id", "int"),
    Field("title"),
    Field("release_date"),
    Field("video_release_date"),
    Field("imdb_url"),
)
_DATA_FIELDS = (
    Field("user_id", "int"),
    Field("item_id", "int"),
    Field("rating", "int"),
    Field("timestamp", "int"),
)
_USER_FIELDS = (
    Field("user_id", "int"),
    Field("age", "int"),
    Field("gender"),
    Field("occupation"),
    Field("zip_code"),
)


def read_genres(path: Path) -> list[str]:
    """Genre names in flag order: ``u.genre`` lists ``name|index``, index 0..18, then a blank line."""
    table = read_table(path, (Field("genre"), Field("index", "int")), delimiter="|", encoding=ITEM_ENCODING)
    index = table.column("index").to_numpy()
    bad = first_true(index != np.arange(len(index)))
    if bad is not None:
        raise_at_row(path, bad, 0, "index", f"expected genre index {bad}, found {index[bad]}")
    names = table.column("genre").to_pylist()
    reserved = {f.name for f in _ITEM_FIXED}
    for row, name in enumerate(names):
        if not name or name in reserved or name in names[:row]:
            raise_at_row(path, row, 0, "genre", f"genre name {name!r} is empty or repeated")
    return names


def _dense(raw: np.ndarray, path: Path, field: str) -> np.ndarray:
    """Check the raw ids of a catalogue file are unique; return them sorted (position = dense id)."""
    order = np.argsort(raw, kind="stable")
    dup = first_true(raw[order][1:] == raw[order][:-1])
    if dup is not None:
        raise_at_row(path, int(order[dup + 1]), 0, field, f"duplicate id {raw[order][dup + 1]}")
    return raw[order]


def _lookup(raw: np.ndarray, known: np.ndarray, path: Path, field: str, what: str) -> np.ndarray:
    """Dense ids of ``raw`` in the sorted ``known`` ids; an id not listed is a format error at its line."""
    pos = np.searchsorted(known, raw)
    pos_clipped = np.minimum(pos, len(known) - 1)
    bad = first_true((pos >= len(known)) | (known[pos_clipped] != raw))
    if bad is not None:
        raise_at_row(path, bad, 0, field, f"unknown {what} id {raw[bad]}")
    return pos.astype(np.int64)


def read_ml100k_items(folder: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """The ML-100K catalogue: ``item_id``, ``raw_id``, exact ``title``, ``genres`` ('|' joined),
    ``release_date``.

    Returned with the hashes of the files read (keys relative to the data root), so the LLaRA MovieLens reader
    can reuse it; the caller checks them against :data:`RECORDED_SHA256` once everything parsed.
    """
    genres = read_genres(folder / "u.genre")
    fields = _ITEM_FIXED + tuple(Field(g, "int") for g in genres)
    path = folder / "u.item"
    table = read_table(path, fields, delimiter="|", encoding=ITEM_ENCODING)
    raw = table.column("item_id").to_numpy()
    flags = np.column_stack([table.column(g).to_numpy() for g in genres])
    bad_row, bad_col = np.nonzero((flags != 0) & (flags != 1))
    if bad_row.size:
        raise_at_row(path, int(bad_row[0]), 0, genres[bad_col[0]], "genre flag must be 0 or 1")
    known = _dense(raw, path, "item_id")
    order = np.argsort(raw, kind="stable").tolist()
    titles = table.column("title").to_pylist()
    dates = table.column("release_date").to_pylist()
    items = pd.DataFrame(
        {
            "item_id": np.arange(len(known), dtype=np.int64),
            "raw_id": [str(r) for r in known],
            "title": [titles[i] for i in order],
            "genres": ["|".join(g for g, on in zip(genres, flags[i], strict=True) if on) for i in order],
            "release_date": [dates[i] for i in order],
        }
    )
    sources = {f"{FOLDER}/{name}": sha256_file(folder / name) for name in ("u.genre", "u.item")}
    return items, sources


def read_ml100k(data_dir: Path, *, verify: bool = True) -> Dataset:
    """Read MovieLens 100K: 943 users, 1682 items, 100,000 explicit ratings with unix timestamps.

    ``verify=False`` reads a copy whose files differ from the published ones (see the module docstring).
    """
    folder = Path(data_dir) / FOLDER
    items, sources = read_ml100k_items(folder)
    known_items = items["raw_id"].astype(np.int64).to_numpy()

    user_path = folder / "u.user"
    users_table = read_table(user_path, _USER_FIELDS, delimiter="|")
    raw_users = users_table.column("user_id").to_numpy()
    known_users = _dense(raw_users, user_path, "user_id")
    user_order = np.argsort(raw_users, kind="stable")
    users = pd.DataFrame(
        {
            "user_id": np.arange(len(known_users), dtype=np.int64),
            "raw_id": [str(u) for u in known_users],
            "age": users_table.column("age").to_numpy()[user_order].astype(np.int64),
        }
    )
    for col in ("gender", "occupation", "zip_code"):
        values = users_table.column(col).to_pylist()
        users[col] = [values[i] for i in user_order]

    data_path = folder / "u.data"
    data = read_table(data_path, _DATA_FIELDS, delimiter="\t")
    rating = data.column("rating").to_numpy()
    bad = first_true((rating < 1) | (rating > 5))
    if bad is not None:
        raise_at_row(data_path, bad, 0, "rating", f"rating {rating[bad]} outside 1..5")
    interactions = interactions_frame(
        _lookup(data.column("user_id").to_numpy(), known_users, data_path, "user_id", "user"),
        _lookup(data.column("item_id").to_numpy(), known_items, data_path, "item_id", "item"),
        rating.astype(np.float64),
        data.column("timestamp").to_numpy(),
    )
    if not len(interactions):
        raise DataFormatError(data_path, None, None, "no interactions")
    sources.update({f"{FOLDER}/{name}": sha256_file(folder / name) for name in ("u.data", "u.user")})
    if verify:
        check_recorded_hashes(folder.parent, sources, RECORDED_SHA256)
    dataset = Dataset(
        name="ml-100k",
        interactions=interactions,
        items=items,
        users=users,
        domain="movie",
        sources=dict(sorted(sources.items())),
    )
    dataset.validate()
    return dataset
