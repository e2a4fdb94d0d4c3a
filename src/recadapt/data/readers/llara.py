"""The LLaRA / iLoRA published next-item splits (``data_dir/llara-splits/``), shared parsing plus the two
evaluation-only datasets.

Each row is one sample: ``seq`` (10 item ids, oldest first, right-padded with ``PAD = n_items``), ``len_seq``
and the target ``next``. The split carries no user ids and no times. Published quirk, kept as is: a user's
first training row has an all-padding ``seq`` with ``len_seq == 1`` (LLaRA clamps the length to at least 1),
so the history stored here (the real items) is empty for those rows; the protocol drops short histories.

``movielens-llara-test``: Val (94 rows) and Test (95 rows); ``seq_item``/``seq_rating``, ``next_item``/
``next_rating``; item ids are ML-100K id - 1, so items and titles come from ``ml-100k/u.item`` and ``raw_id``
is the ML-100K movie id. ``steam-llara-test``: Test only (1,194 rows) with ``id2name.txt``. Both are
evaluation-only: one user per row, interactions are each row's history followed by its target.

With ``verify`` (the default) the files must have the SHA-256 recorded in :data:`RECORDED_SHA256`: for
``id2name.txt`` the published bytes (``llara-splits/PROVENANCE.original.md``), for the splits the Parquet
conversion of the published pickles shipped in the project's data folder (values unchanged, README.md there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recadapt.data.readers._common import (
    check_recorded_hashes,
    first_true,
    fixed_width_matrix,
    int_column,
    interactions_frame,
    is_int,
    is_int_list,
    is_number,
    is_number_list,
    positions_within,
    ragged,
    read_parquet,
)
from recadapt.data.readers._text import read_id2name
from recadapt.data.readers.ml100k import FOLDER as ML100K_FOLDER
from recadapt.data.readers.ml100k import RECORDED_SHA256 as ML100K_RECORDED_SHA256
from recadapt.data.readers.ml100k import read_ml100k_items
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

FOLDER = "llara-splits"
SEQ_WIDTH = 10
PART_FILES = {"train": "train_data.parquet", "valid": "Val_data.parquet", "test": "Test_data.parquet"}
RECORDED_SHA256 = {
    f"{FOLDER}/lastfm/id2name.txt": "b608bcf14300b1608ccd88f4fe240e6345125201ecdb55157395c19787fe4eaf",
    f"{FOLDER}/lastfm/train_data.parquet": "1b2c5c4d198df82311fe49de2b65319de6aefba0dff182fd7e8d5af619cdf7fd",
    f"{FOLDER}/lastfm/Val_data.parquet": "f71deb9bac536c90fff2b9cee8caa84dd7ce2bc49655bf3824b9668401afd985",
    f"{FOLDER}/lastfm/Test_data.parquet": "911e4344aac225ab1e77f04bd4531236d849c11c87f49e70a0416b54b88bd6fd",
    f"{FOLDER}/movielens/Val_data.parquet": "e268fee47d9e3a14afc05f4f133ad3d70d66929fbf583b81a4d8be5d8da3dfdb",
    f"{FOLDER}/movielens/Test_data.parquet": "11660130a47f8e92b77e57a48fc1a99121fb71343ed76b9c736642606e61b571",
    f"{FOLDER}/steam/id2name.txt": "dada06a1306c36c91fb1ee3f980df7bee894024b3f52d20832ec2340524d7b7b",
    f"{FOLDER}/steam/Test_data.parquet": "d0e4b0cabdada5994f040dcd7fcb3fca6bfe84599fb6cc6a86a316a837ccf8b6",
}


@dataclass
class Rows:
    """One LLaRA split file, checked: ``seq`` as an (n, 10) matrix, ``real`` its non-padding mask."""

    path: Path
    seq: np.ndarray
    real: np.ndarray
    target: np.ndarray
    seq_rating: np.ndarray | None = None
    target_rating: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)

    def histories(self) -> np.ndarray:
        """The real items of every row, oldest first, one array per row."""
        counts = self.real.sum(axis=1)
        return ragged(self.seq[self.real], np.concatenate(([0], np.cumsum(counts))))


def read_rows(path: Path, n_items: int, *, rated: bool = False) -> Rows:
    """Read and check one split file against a catalogue of ``n_items`` items (``PAD = n_items``).

    Checks, each reported at the 1-based row as :class:`DataFormatError`: 10 entries per ``seq`` (an empty
    list is an empty history), ids within the catalogue, padding only on the right, ``len_seq`` equal to the
    number of real items (or 1 for an all-padding ``seq``, the published quirk), a real target. ``rated``
    reads MovieLens's parallel ``seq_rating``/``next_rating`` columns.
    """
    seq_col, next_col = ("seq_item", "next_item") if rated else ("seq", "next")
    columns = {seq_col: is_int_list, "len_seq": is_int, next_col: is_int}
    if rated:
        columns |= {"seq_rating": is_number_list, "next_rating": is_number}
    table = read_parquet(path, columns)
    seq = fixed_width_matrix(table, seq_col, SEQ_WIDTH, path)
    target = int_column(table, next_col)
    length = int_column(table, "len_seq")

    bad_row = first_true(((seq < 0) | (seq > n_items)).any(axis=1))
    if bad_row is not None:
        value = seq[bad_row][(seq[bad_row] < 0) | (seq[bad_row] > n_items)][0]
        raise DataFormatError(
            path, bad_row + 1, seq_col, f"unknown item id {value} (catalogue 0..{n_items - 1})"
        )
    bad_row = first_true((target < 0) | (target >= n_items))
    if bad_row is not None:
        raise DataFormatError(path, bad_row + 1, next_col, f"unknown item id {target[bad_row]}")
    real = seq != n_items
    bad_row = first_true((real[:, 1:] & ~real[:, :-1]).any(axis=1))
    if bad_row is not None:
        raise DataFormatError(path, bad_row + 1, seq_col, "real item after padding (expected right padding)")
    count = real.sum(axis=1)
    bad_row = first_true((length != count) & ~((count == 0) & (length == 1)))
    if bad_row is not None:
        raise DataFormatError(
            path, bad_row + 1, "len_seq", f"{length[bad_row]} but {count[bad_row]} real items"
        )
    rows = Rows(path, seq, real, target)
    if rated:
        ratings = fixed_width_matrix(table, "seq_rating", SEQ_WIDTH, path).astype(np.float64)
        target_rating = table.column("next_rating").to_numpy().astype(np.float64)
        bad_row = first_true(~np.isfinite(np.where(real, ratings, 0.0)).all(axis=1))
        if bad_row is not None:
            raise DataFormatError(path, bad_row + 1, "seq_rating", "rating is not a finite number")
        bad_row = first_true(~np.isfinite(target_rating))
        if bad_row is not None:
            raise DataFormatError(path, bad_row + 1, "next_rating", "rating is not a finite number")
        rows.seq_rating, rows.target_rating = ratings, target_rating
    return rows


def samples(rows: Rows, user_ids: np.ndarray) -> pd.DataFrame:
    """The next-item sample frame (user_id, history, target), rows kept exactly as published."""
    return pd.DataFrame(
        {"user_id": np.asarray(user_ids, dtype=np.int64), "history": rows.histories(), "target": rows.target}
    )


def row_events(rows: Rows, user_ids: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
    """Interaction events spelled out by the rows, in sequence order.

    A row that starts a user contributes its real history items then its target; a row that continues the
    previous one (a sliding-window prefix) contributes only its target. ``user_ids`` must be non-decreasing.
    """
    take = np.concatenate([rows.real & starts[:, None], np.ones((len(rows), 1), dtype=bool)], axis=1)
    items = np.concatenate([rows.seq, rows.target[:, None]], axis=1)[take]
    users = np.repeat(np.asarray(user_ids, dtype=np.int64), take.sum(axis=1))
    events = {"user_id": users, "item_id": items}
    if rows.seq_rating is not None and rows.target_rating is not None:
        events["rating"] = np.concatenate([rows.seq_rating, rows.target_rating[:, None]], axis=1)[take]
    return events


def events_frame(parts: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """Concatenate events of consecutive users and number them within each user (the split has no times)."""
    users = np.concatenate([p["user_id"] for p in parts])
    items = np.concatenate([p["item_id"] for p in parts])
    rating = np.concatenate([p["rating"] for p in parts]) if all("rating" in p for p in parts) else None
    sizes = np.bincount(users)
    return interactions_frame(users, items, rating, positions_within(sizes))


def per_row_users(parts: dict[str, int]) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """One user per row for evaluation splits: ids run across parts in order, raw ids read ``part:row``."""
    ids: dict[str, np.ndarray] = {}
    raw: list[str] = []
    for part, n in parts.items():
        ids[part] = np.arange(len(raw), len(raw) + n, dtype=np.int64)
        raw.extend(f"{part}:{i}" for i in range(n))
    return ids, pd.DataFrame({"user_id": np.arange(len(raw), dtype=np.int64), "raw_id": raw})


def _eval_dataset(
    name: str,
    domain: str,
    items: pd.DataFrame,
    loaded: dict[str, Rows],
    sources: dict[str, str],
    *,
    data_dir: Path,
    verify: bool,
) -> Dataset:
    if verify:
        check_recorded_hashes(data_dir, sources, ML100K_RECORDED_SHA256 | RECORDED_SHA256)
    user_ids, users = per_row_users({part: len(rows) for part, rows in loaded.items()})
    presplit = {"next-item": {part: samples(rows, user_ids[part]) for part, rows in loaded.items()}}
    events = [
        row_events(rows, user_ids[part], np.ones(len(rows), dtype=bool)) for part, rows in loaded.items()
    ]
    dataset = Dataset(
        name=name,
        interactions=events_frame(events),
        items=items,
        users=users,
        domain=domain,
        presplit=presplit,
        sources=dict(sorted(sources.items())),
    )
    dataset.validate()
    return dataset


def read_movielens_llara_test(data_dir: Path, *, verify: bool = True) -> Dataset:
    """LLaRA's MovieLens valid/test samples with ratings; titles and genres from ``ml-100k/u.item``.

    ``verify=False`` reads copies whose files differ from the recorded ones (see the module docstring).
    """
    data_dir = Path(data_dir)
    items, sources = read_ml100k_items(data_dir / ML100K_FOLDER)
    folder = data_dir / FOLDER / "movielens"
    loaded = {
        part: read_rows(folder / PART_FILES[part], len(items), rated=True) for part in ("valid", "test")
    }
    sources |= {f"{FOLDER}/movielens/{PART_FILES[p]}": sha256_file(r.path) for p, r in loaded.items()}
    return _eval_dataset(
        "movielens-llara-test", "movie", items, loaded, sources, data_dir=data_dir, verify=verify
    )


def read_id2name_items(path: Path) -> pd.DataFrame:
    """Items of an ``id2name.txt`` catalogue: ids are already dense, the name is the title."""
    names = read_id2name(path)
    return pd.DataFrame(
        {
            "item_id": np.arange(len(names), dtype=np.int64),
            "raw_id": [str(i) for i in range(len(names))],
            "title": names,
        }
    )


def read_steam_llara_test(data_dir: Path, *, verify: bool = True) -> Dataset:
    """LLaRA's Steam test samples (1,194 rows); its train and valid splits were not published usably.

    ``verify=False`` reads copies whose files differ from the recorded ones (see the module docstring).
    """
    data_dir = Path(data_dir)
    folder = data_dir / FOLDER / "steam"
    items = read_id2name_items(folder / "id2name.txt")
    loaded = {"test": read_rows(folder / PART_FILES["test"], len(items))}
    sources = {f"{FOLDER}/steam/id2name.txt": sha256_file(folder / "id2name.txt")}
    sources |= {f"{FOLDER}/steam/{PART_FILES[p]}": sha256_file(r.path) for p, r in loaded.items()}
    return _eval_dataset("steam-llara-test", "game", items, loaded, sources, data_dir=data_dir, verify=verify)
