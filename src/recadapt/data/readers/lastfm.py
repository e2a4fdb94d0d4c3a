"""LastFM: the LLaRA/iLoRA published split, with artist tags from the raw HetRec 2011 files.

Items are LLaRA's ``id2name.txt`` (ids 0..4605 are already dense; the name is the title). ``tags`` are each
artist's five most used HetRec tags ('|' joined, most used first, ties by tag id), found by matching the LLaRA
name to ``artists.dat``: exactly, then case-insensitively, then ignoring double quotes (LLaRA read
``artists.dat`` with pandas' default quoting, which turned ``"Weird Al" Yankovic`` into
``Weird Al Yankovic``). Ambiguous case-insensitive matches are left unmatched.

Users: the split has no user column. Validation and test hold one sample per user (122 each). Training rows
are sliding-window prefixes: a row continues the previous one when its ``seq`` is the previous ``seq``
extended by the previous ``next`` (keeping the last 10); any other row starts a new user. On the published
data every user starts with an all-padding row, and this gives the 976 training users LLaRA reports. Users get
``raw_id`` ``train:<k>`` (k-th reconstructed user), ``valid:<row>`` or ``test:<row>``.
Interactions are each user's items in sequence order; ``timestamp`` is the position within the user,
``rating`` is NaN.

With ``verify`` (the default) every file read must have the recorded SHA-256: the HetRec files' are
:data:`RECORDED_SHA256` (``lastfm-hetrec2011-2k/PROVENANCE.md``), the split's
:data:`recadapt.data.readers.llara.RECORDED_SHA256`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from recadapt.data.readers._common import check_recorded_hashes, first_true
from recadapt.data.readers._text import Field, raise_at_row, read_table
from recadapt.data.readers.llara import (
    FOLDER,
    PART_FILES,
    Rows,
    events_frame,
    read_id2name_items,
    read_rows,
    row_events,
    samples,
)
from recadapt.data.readers.llara import RECORDED_SHA256 as LLARA_RECORDED_SHA256
from recadapt.data.schema import Dataset
from recadapt.io import sha256_file

logger = logging.getLogger(__name__)

HETREC_FOLDER = "lastfm-hetrec2011-2k"
RECORDED_SHA256 = {
    f"{HETREC_FOLDER}/artists.dat": "c173881362c6b28551368fecb3c0be5a6a30a6cd859e1f5775413dfe46d48648",
    f"{HETREC_FOLDER}/tags.dat": "e95175f259be4c0c47644ae23d66131cd6d5767142a1405000e79f5584691d70",
    f"{HETREC_FOLDER}/user_taggedartists.dat": "d31fe938fcfeed6f0059f37a36b156f63674d073fc2553e5cc9dc1595e365bc7",
}
TOP_TAGS = 5


def continues_previous(rows: Rows) -> np.ndarray:
    """For each row, whether its ``seq`` is the previous row's ``seq`` extended by the previous target."""
    n, width = rows.seq.shape
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    prev_seq, prev_count, prev_next = rows.seq[:-1], rows.real[:-1].sum(axis=1), rows.target[:-1]
    expected = prev_seq.copy()
    short = np.flatnonzero(prev_count < width)
    expected[short, prev_count[short]] = prev_next[short]
    full = np.flatnonzero(prev_count == width)
    expected[full] = np.concatenate([prev_seq[full, 1:], prev_next[full, None]], axis=1)
    out[1:] = (rows.seq[1:] == expected).all(axis=1)
    return out


def read_hetrec_tags(folder: Path) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """HetRec artist name -> top tags, and name -> HetRec artist id, plus the source hashes.

    ``artists.dat`` is UTF-8 with LF endings, ``tags.dat`` latin-1 with CRLF; all have a header line.
    """
    artists_path, tags_path, tagged_path = (
        folder / "artists.dat",
        folder / "tags.dat",
        folder / "user_taggedartists.dat",
    )
    artists = read_table(
        artists_path,
        (Field("id", "int"), Field("name"), Field("url"), Field("pictureURL")),
        delimiter="\t",
        header_lines=1,
    )
    tags = read_table(
        tags_path,
        (Field("tagID", "int"), Field("tagValue")),
        delimiter="\t",
        encoding="latin-1",
        header_lines=1,
    )
    tagged = read_table(
        tagged_path,
        tuple(Field(n, "int") for n in ("userID", "artistID", "tagID", "day", "month", "year")),
        delimiter="\t",
        header_lines=1,
    )
    tag_ids = tags.column("tagID").to_numpy()
    tag_names = dict(zip(tag_ids.tolist(), tags.column("tagValue").to_pylist(), strict=True))
    used = tagged.column("tagID").to_numpy()
    bad = first_true(~np.isin(used, tag_ids))
    if bad is not None:
        raise_at_row(tagged_path, bad, 1, "tagID", f"unknown tag id {used[bad]}")

    counts = (
        pd.DataFrame({"artist": tagged.column("artistID").to_numpy(), "tag": used})
        .value_counts()
        .rename("n")
        .reset_index()
        .sort_values(["artist", "n", "tag"], ascending=[True, False, True], kind="stable")
    )
    top = counts.groupby("artist", sort=False).head(TOP_TAGS)
    joined = top.groupby("artist", sort=False)["tag"].agg(lambda t: "|".join(tag_names[x] for x in t))
    artist_ids = artists.column("id").to_numpy().tolist()
    names = artists.column("name").to_pylist()
    tags_by_name = {name: joined.get(aid, "") for aid, name in zip(artist_ids, names, strict=True)}
    id_by_name = {name: str(aid) for aid, name in zip(artist_ids, names, strict=True)}
    sources = {f"{HETREC_FOLDER}/{p.name}": sha256_file(p) for p in (artists_path, tags_path, tagged_path)}
    return tags_by_name, id_by_name, sources


def _casefold(name: str) -> str:
    return name.casefold()


def _unquote(name: str) -> str:
    return name.replace('"', "").casefold()


def _unique_index(names: list[str], key: Callable[[str], str]) -> dict[str, str]:
    """Normalised key -> the one name with it; a key shared by several names is ambiguous and dropped."""
    seen: dict[str, str | None] = {}
    for name in names:
        k = key(name)
        seen[k] = None if k in seen else name
    return {k: v for k, v in seen.items() if v is not None}


def match_names(llara_names: list[str], hetrec_names: list[str]) -> tuple[list[str | None], dict[str, int]]:
    """The HetRec name for each LLaRA name (None if unmatched), and how many matched at each stage."""
    stages: list[tuple[str, Callable[[str], str], dict[str, str]]] = [
        ("exact", str, {n: n for n in hetrec_names}),
        ("case-insensitive", _casefold, _unique_index(hetrec_names, _casefold)),
        ("quotes removed", _unquote, _unique_index(hetrec_names, _unquote)),
    ]
    stats = dict.fromkeys([s[0] for s in stages] + ["unmatched"], 0)
    out: list[str | None] = []
    for name in llara_names:
        for stage, key, index in stages:
            hit = index.get(key(name))
            if hit is not None:
                out.append(hit)
                stats[stage] += 1
                break
        else:
            out.append(None)
            stats["unmatched"] += 1
    return out, stats


def read_lastfm(data_dir: Path, *, verify: bool = True) -> Dataset:
    """Read LastFM: 4,606 artists, 976 + 122 + 122 users, the published next-item split as ``presplit``.

    ``verify=False`` reads copies whose files differ from the recorded ones (see the module docstring).
    """
    data_dir = Path(data_dir)
    folder = data_dir / FOLDER / "lastfm"
    items = read_id2name_items(folder / "id2name.txt")
    loaded = {part: read_rows(folder / PART_FILES[part], len(items)) for part in ("train", "valid", "test")}

    train = loaded["train"]
    starts = ~continues_previous(train)
    train_users = np.cumsum(starts) - 1
    n_train_users = int(starts.sum())
    user_ids = {"train": train_users}
    offset = n_train_users
    for part in ("valid", "test"):
        user_ids[part] = np.arange(offset, offset + len(loaded[part]), dtype=np.int64)
        offset += len(loaded[part])
    raw = [f"train:{u}" for u in range(n_train_users)]
    raw += [f"{part}:{i}" for part in ("valid", "test") for i in range(len(loaded[part]))]
    users = pd.DataFrame({"user_id": np.arange(len(raw), dtype=np.int64), "raw_id": raw})
    logger.info(
        "lastfm: %d training rows give %d users (%d rows with an empty history); %d valid and %d test users",
        len(train),
        n_train_users,
        int((train.real.sum(axis=1) == 0).sum()),
        len(loaded["valid"]),
        len(loaded["test"]),
    )

    tags_by_name, id_by_name, hetrec_sources = read_hetrec_tags(data_dir / HETREC_FOLDER)
    matched, stats = match_names(items["title"].tolist(), list(tags_by_name))
    logger.info(
        "lastfm: matched %d of %d LLaRA artists to HetRec (%s)",
        len(items) - stats["unmatched"],
        len(items),
        ", ".join(f"{k} {v}" for k, v in stats.items()),
    )
    items["tags"] = [tags_by_name[m] if m is not None else "" for m in matched]
    items["hetrec_id"] = [id_by_name[m] if m is not None else "" for m in matched]

    events = [
        row_events(train, train_users, starts),
        row_events(loaded["valid"], user_ids["valid"], np.ones(len(loaded["valid"]), dtype=bool)),
        row_events(loaded["test"], user_ids["test"], np.ones(len(loaded["test"]), dtype=bool)),
    ]
    sources = {f"{FOLDER}/lastfm/id2name.txt": sha256_file(folder / "id2name.txt")}
    sources |= {f"{FOLDER}/lastfm/{PART_FILES[p]}": sha256_file(r.path) for p, r in loaded.items()}
    sources |= hetrec_sources
    if verify:
        check_recorded_hashes(data_dir, sources, LLARA_RECORDED_SHA256 | RECORDED_SHA256)
    dataset = Dataset(
        name="lastfm",
        interactions=events_frame(events),
        items=items,
        users=users,
        domain="artist",
        presplit={"next-item": {part: samples(rows, user_ids[part]) for part, rows in loaded.items()}},
        sources=dict(sorted(sources.items())),
    )
    dataset.validate()
    return dataset
