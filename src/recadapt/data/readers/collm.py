"""``ml-1m-ctr``: CoLLM's temporal MovieLens-1M CTR split (``collm-ml-1m/{train,valid,test}_ood2.parquet``).

Each row is one (user, target, like-label, time) sample with ``his``: the user's earlier items, oldest first,
led by a padding entry 0 (``his_title`` leads with ''). Id mapping: CoLLM's ``uid`` and ``iid`` are re-indexed
and 1-based (uid 1..838, iid 1..3255 on the published files); 0 occurs only as that leading padding and is
never an item. We drop exactly the first ``his`` entry (after checking it is the padding) and give dense ids
in raw id order, so uid ``u`` -> ``u - 1`` and iid ``i`` -> ``i - 1`` here. A 0 anywhere else in ``his`` is
read as item 0 and must then carry a title, otherwise it is padding inside a history and a format error. Items
are the union of targets and history entries, titled from ``title`` and ``his_title`` (which must agree). The
ratings behind the labels are not published: ``rating`` is NaN and ``label`` (rating > 3) is kept.
``valid_small_ood2`` (a subset of valid) is not read.

With ``verify`` (the default) the files must have the SHA-256 in :data:`RECORDED_SHA256`: that of the Parquet
conversion of CoLLM's pickles shipped in the project's data folder (values unchanged; its
PROVENANCE.original.md pins the published zip).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recadapt.data.readers._common import (
    check_recorded_hashes,
    first_true,
    int_column,
    interactions_frame,
    is_int,
    is_int_list,
    is_number,
    is_text,
    is_text_list,
    list_column,
    ragged,
    read_parquet,
)
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

FOLDER = "collm-ml-1m"
PARTS = ("train", "valid", "test")
PADDING = 0
RECORDED_SHA256 = {
    f"{FOLDER}/train_ood2.parquet": "01966bb82a9f756457148ae5747768bfaa1f51d197ee41306b103a49fcd01083",
    f"{FOLDER}/valid_ood2.parquet": "22c28bd35666cd71a6f86801ac73284fa62b95c679069fea237ab0c8bcb1a88a",
    f"{FOLDER}/test_ood2.parquet": "4194c8c8b767cc2022ec0b563af138bea548936d278e2d216722af78dd791640",
}
_COLUMNS = {
    "uid": is_int,
    "iid": is_int,
    "label": is_number,
    "timestamp": is_int,
    "his": is_int_list,
    "his_title": is_text_list,
    "title": is_text,
}


class _Part:
    """One checked file: targets plus histories with the leading padding removed."""

    def __init__(self, path: Path) -> None:
        table = read_parquet(path, _COLUMNS)
        self.path = path
        self.uid = int_column(table, "uid")
        self.iid = int_column(table, "iid")
        self.timestamp = int_column(table, "timestamp")
        self.title = table.column("title").to_pylist()
        label = table.column("label").to_numpy()
        bad = first_true((label != 0) & (label != 1))
        if bad is not None:
            raise DataFormatError(path, bad + 1, "label", f"expected 0 or 1, found {label[bad]}")
        self.label = label.astype(np.int8)
        for name, values in (("uid", self.uid), ("iid", self.iid)):
            bad = first_true(values < 0)
            if bad is not None:
                raise DataFormatError(path, bad + 1, name, f"negative id {values[bad]}")

        his, offsets = list_column(table, "his")
        titles, title_offsets = list_column(table, "his_title", dtype=object)
        lengths = np.diff(offsets)
        bad = first_true(lengths == 0)
        if bad is not None:
            raise DataFormatError(
                path, bad + 1, "his", "empty history: expected at least the leading padding 0"
            )
        bad = first_true(his[offsets[:-1]] != PADDING)
        if bad is not None:
            raise DataFormatError(
                path, bad + 1, "his", f"first entry {his[offsets[bad]]} is not the padding 0"
            )
        bad = first_true(np.diff(title_offsets) != lengths)
        if bad is not None:
            raise DataFormatError(path, bad + 1, "his_title", "length differs from 'his'")
        keep = np.ones(len(his), dtype=bool)
        keep[offsets[:-1]] = False
        self.history_raw = his[keep]
        self.history_titles = titles[keep]
        self.history_offsets = np.concatenate(([0], np.cumsum(lengths - 1)))
        self.history_rows = np.repeat(np.arange(len(lengths)), lengths - 1)
        bad = first_true(self.history_raw < 0)
        if bad is not None:
            raise DataFormatError(path, int(self.history_rows[bad]) + 1, "his", "negative item id")
        bad = first_true((self.history_raw == PADDING) & (self.history_titles == ""))
        if bad is not None:
            raise DataFormatError(
                path, int(self.history_rows[bad]) + 1, "his", "padding 0 inside the history"
            )


def _catalogue(parts: dict[str, _Part]) -> pd.DataFrame:
    """Items sorted by raw iid with one title each; a title disagreement is reported at its row."""
    paths = [part.path for part in parts.values()]
    frames = []
    for index, part in enumerate(parts.values()):
        for iid, title, rows, field in (
            (part.iid, part.title, np.arange(len(part.iid)), "title"),
            (part.history_raw, part.history_titles, part.history_rows, "his_title"),
        ):
            frames.append(
                pd.DataFrame({"iid": iid, "title": title, "part": index, "row": rows, "field": field})
            )
    pairs = pd.concat(frames, ignore_index=True).drop_duplicates(["iid", "title"])
    conflict = first_true(pairs["iid"].duplicated().to_numpy())
    first = pairs.drop_duplicates("iid")
    if conflict is not None:
        row = pairs.iloc[conflict]
        other = first.loc[first["iid"] == row["iid"], "title"].iloc[0]
        raise DataFormatError(
            paths[int(row["part"])],
            int(row["row"]) + 1,
            row["field"],
            f"item {row['iid']} is titled {row['title']!r} here but {other!r} in an earlier row",
        )
    first = first.sort_values("iid")
    return pd.DataFrame(
        {
            "item_id": np.arange(len(first), dtype=np.int64),
            "raw_id": [str(i) for i in first["iid"]],
            "title": first["title"].tolist(),
        }
    )


def read_collm_ml1m(data_dir: Path, *, verify: bool = True) -> Dataset:
    """Read the CoLLM ML-1M CTR split: 838 users, 3,255 items, 33,891 / 10,401 / 7,331 samples.

    ``verify=False`` reads copies whose files differ from the recorded ones (see the module docstring).
    """
    folder = Path(data_dir) / FOLDER
    parts = {name: _Part(folder / f"{name}_ood2.parquet") for name in PARTS}
    items = _catalogue(parts)
    item_raw = items["raw_id"].astype(np.int64).to_numpy()
    user_raw = np.unique(np.concatenate([p.uid for p in parts.values()]))
    users = pd.DataFrame(
        {"user_id": np.arange(len(user_raw), dtype=np.int64), "raw_id": [str(u) for u in user_raw]}
    )

    presplit: dict[str, pd.DataFrame] = {}
    for name, part in parts.items():
        history = np.searchsorted(item_raw, part.history_raw)
        presplit[name] = pd.DataFrame(
            {
                "user_id": np.searchsorted(user_raw, part.uid).astype(np.int64),
                "target": np.searchsorted(item_raw, part.iid).astype(np.int64),
                "label": part.label,
                "rating": np.full(len(part.iid), np.nan),
                "timestamp": part.timestamp,
                "history": ragged(history.astype(np.int64), part.history_offsets),
                "history_ratings": ragged(np.full(len(history), np.nan), part.history_offsets),
            }
        )
    merged = pd.concat(presplit.values(), ignore_index=True)
    interactions = interactions_frame(
        merged["user_id"].to_numpy(),
        merged["target"].to_numpy(),
        None,
        merged["timestamp"].to_numpy(),
        extra={"label": merged["label"].to_numpy()},
    )
    sources = {f"{FOLDER}/{p.path.name}": sha256_file(p.path) for p in parts.values()}
    if verify:
        check_recorded_hashes(folder.parent, sources, RECORDED_SHA256)
    dataset = Dataset(
        name="ml-1m-ctr",
        interactions=interactions,
        items=items,
        users=users,
        domain="movie",
        presplit={"ctr": presplit},
        sources=dict(sorted(sources.items())),
    )
    dataset.validate()
    return dataset
