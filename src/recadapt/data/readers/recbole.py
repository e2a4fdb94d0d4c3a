"""RecBole atomic files: ``NAME.inter`` with optional ``NAME.item`` / ``NAME.user``, or the benchmark split
``NAME.{train,valid,test}.inter``.

Format (RecBole's defaults): UTF-8, tab-separated, one header line of ``name:type`` entries, the type being
``token``, ``token_seq`` (tokens joined by single spaces; empty pieces ignored), ``float`` or ``float_seq``.
Quoting is off. ``.inter`` needs ``user_id:token`` and ``item_id:token``; ``rating:float`` and
``timestamp:float`` are optional (no rating: NaN; no timestamp: the line order within the user) and other
columns are kept. The split convention needs ``user_id:token``, ``item_id_list:token_seq`` (the history,
oldest first) and ``item_id:token`` (the target); its rows become ``presplit["next-item"]`` and
``presplit["full-ranking"]`` as they are. Its interactions are, per user, the history of the user's first row
followed by the target of every row (train, valid, test order), numbered by position.

Ids: with ``.item`` (``.user``), dense ids follow that file's order and every id used elsewhere must be listed
there; without it, they follow the order of first appearance (as RecBole's own remapping does). Item titles
come from ``title``, ``movie_title`` or ``name`` verbatim ('' if none). Other ``token`` attributes are kept
verbatim, ``token_seq`` ones '|' joined, ``float`` ones as numbers and ``float_seq`` ones as their text.

Damaged or sloppy files (warnings go to this module's logger, once per file and kind, with a count):

- a row with fewer fields than the header is a :class:`~recadapt.errors.DataFormatError` at its line; when it
  is the last line and the file does not end with a newline, the message says the file was cut off mid-row.
  A complete last row without a newline is fine (a cut inside its last field cannot be told apart);
- a UTF-8 byte order mark at the start of a file is skipped, with a warning (Windows editors write one);
- ids (the ``user_id`` / ``item_id`` tokens of every file) lose surrounding ASCII whitespace, with a warning
  counting them and naming the first line, so ``" 12"`` and ``"12"`` are one id (the pieces of
  ``item_id_list`` are split on spaces, so there it never mattered). An id that is only whitespace is an error;
- in a ``.inter`` with a ``timestamp`` column, rows identical in every field (a duplicated line) are dropped,
  keeping the first, with a warning counting them. Without timestamps a repeated line is a repeated event in the
  line order and is kept; the split convention's rows are samples and are kept as published.

The bulk path is Arrow end to end (parse, hash factorisation, one composite-key sort), with no Python work per
line: a 25M-line ``.inter`` loads in about 20 s on two cores. Only when parsing fails is the file walked line
by line, to name the bad line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recadapt.data.readers._common import (
    first_true,
    interactions_frame,
    positions_within,
    ragged,
)
from recadapt.data.readers._text import Field, line_of_row, raise_at_row, read_header, read_table
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("title", "movie_title", "name")
SPLIT_PARTS = ("train", "valid", "test")
USER, ITEM, RATING, TIME, HISTORY = "user_id", "item_id", "rating", "timestamp", "item_id_list"
_HEADER = 1  # the header is line 1, and the one line before the data rows
_BOM = "\ufeff"
_EXACT_TIME = "timestamp:exact"  # a column name no header can declare (names stop at the first ':')
_CUT_OFF_MESSAGES = ("truncated line", "empty value")

logger = logging.getLogger(__name__)

Tokens = pa.Array | pa.ChunkedArray


@dataclass(frozen=True)
class AtomicField:
    """One ``name:type`` header entry."""

    name: str
    type: str


@dataclass
class AtomicFile:
    """A parsed atomic file: its header fields and an Arrow table with one column per field."""

    path: Path
    fields: dict[str, AtomicField]
    table: pa.Table

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)


def parse_header(path: Path) -> dict[str, AtomicField]:
    """The ``name:type`` entries of line 1, checked for syntax, known types and duplicates."""
    text, line = read_header(path), _HEADER
    if text.startswith(_BOM):
        logger.warning("%s: skipped the UTF-8 byte order mark at the start of the file", path)
        text = text[len(_BOM) :]
    if not text:
        raise DataFormatError(path, line, None, "empty header: expected tab-separated name:type entries")
    fields: dict[str, AtomicField] = {}
    for entry in text.split("\t"):
        name, sep, kind = entry.partition(":")
        if not sep or not name:
            raise DataFormatError(path, line, entry, "header entry must read name:type")
        if kind not in TYPES:
            raise DataFormatError(path, line, name, f"unknown type {kind!r} (one of {', '.join(TYPES)})")
        if name in fields:
            raise DataFormatError(path, line, name, "duplicate field")
        fields[name] = AtomicField(name, kind)
    return fields


def read_atomic(path: Path, required: dict[str, str], optional: dict[str, str] | None = None) -> AtomicFile:
    """Parse one atomic file; ``required``/``optional`` map field names to the type they must have.

    Required ``token`` fields must not be empty on any line.
    """
    fields = parse_header(path)
    for name, kind in {**(optional or {}), **required}.items():
        field = fields.get(name)
        if field is None and name in required:
            raise DataFormatError(path, _HEADER, name, f"missing required field {name}:{kind}")
        if field is not None and field.type != kind:
            raise DataFormatError(path, _HEADER, name, f"must have type {kind}, not {field.type}")
    try:
        table = read_table(
            path,
            [Field(f.name, "float" if f.type == "float" else "str") for f in fields.values()],
            delimiter="\t",
            header_lines=_HEADER,
        )
    except DataFormatError as err:
        raise explain_cut_off(err) from None
    for name, kind in required.items():
        if kind == "token":
            table = strip_id_whitespace(path, table, name)
            empty = first_true(pc.equal(table.column(name), "").to_numpy(zero_copy_only=False))
            if empty is not None:
                raise_at_row(path, empty, _HEADER, name, "empty token")
    return AtomicFile(path, fields, table)


def explain_cut_off(err: DataFormatError) -> DataFormatError:
    """Say so when a bad row is the last line of a file that does not end with a newline: the file was most
    likely cut off mid-row (an interrupted copy or download), which a bare "truncated line" does not tell."""
    if err.line is None or not err.message.startswith(_CUT_OFF_MESSAGES):
        return err
    with open(err.path, "rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return err
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return err
        handle.seek(0)
        newlines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    if err.line != newlines + 1:
        return err
    return DataFormatError(
        err.path,
        err.line,
        err.field,
        f"{err.message} (the file ends inside this line, without a newline: cut off mid-row?)",
    )


def strip_id_whitespace(path: Path, table: pa.Table, name: str) -> pa.Table:
    """``table`` with surrounding ASCII whitespace removed from the id column ``name``, warning with a count.

    Left alone, ``" 12"`` and ``"12"`` would silently be two users or items.
    """
    column = table.column(name)
    stripped = pc.ascii_trim_whitespace(column)
    changed = pc.not_equal(stripped, column)
    count = pc.sum(changed).as_py() or 0
    if not count:
        return table
    row = int(np.flatnonzero(changed.to_numpy(zero_copy_only=False))[0])
    logger.warning(
        "%s: stripped surrounding whitespace from %d %s value(s), first at line %s (%r)",
        path,
        count,
        name,
        line_of_row(path, row, _HEADER),
        column[row].as_py(),
    )
    return table.set_column(table.schema.get_field_index(name), name, stripped)


def drop_duplicate_rows(frame: pd.DataFrame, time_column: str, path: Path, users: pa.Array) -> pd.DataFrame:
    """Drop rows identical in every field to an earlier one (a duplicated line), warning with a count.

    ``frame`` is sorted by (user, time, line), so identical rows sit in one run of equal (user, time): only
    those runs are compared, which keeps this linear on large files.
    """
    user, time = frame["user_id"].to_numpy(), frame[time_column].to_numpy()
    tie = (user[1:] == user[:-1]) & (time[1:] == time[:-1])
    if not tie.any():
        return frame
    in_run = np.zeros(len(frame), dtype=bool)
    in_run[1:] |= tie
    in_run[:-1] |= tie
    candidates = np.flatnonzero(in_run)
    duplicate = candidates[frame.iloc[candidates].duplicated(keep="first").to_numpy()]
    if not duplicate.size:
        return frame
    first = int(duplicate[0])
    logger.warning(
        "%s: dropped %d duplicate row(s), identical in every field to an earlier line (first: user %r at "
        "timestamp %s)",
        path,
        duplicate.size,
        users[int(user[first])].as_py(),
        time[first],
    )
    keep = np.ones(len(frame), dtype=bool)
    keep[duplicate] = False
    return frame[keep].reset_index(drop=True)


def split_tokens(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Split a ``token_seq`` column on single spaces, dropping empty pieces: (flat tokens, row offsets)."""
    lists = pc.split_pattern(column.combine_chunks() if column.num_chunks != 1 else column.chunk(0), " ")
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy()
    keep = pc.not_equal(flat, "")
    counts = np.bincount(parents[keep.to_numpy(zero_copy_only=False)], minlength=len(lists))
    return pc.filter(flat, keep), np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def _chunks(columns: tuple[Tokens, ...]) -> list[pa.Array]:
    out: list[pa.Array] = []
    for col in columns:
        out.extend(col.chunks if isinstance(col, pa.ChunkedArray) else [col])
    return out


def factorize(*columns: Tokens) -> tuple[pa.Array, list[np.ndarray]]:
    """Vocabulary in order of first appearance across ``columns``, and each column's int32 codes.

    One hash pass (Arrow's dictionary encoding with a shared memo) instead of unique + lookup.
    """
    chunks = _chunks(columns)
    if not chunks:
        return pa.array([], pa.string()), [np.zeros(0, dtype=np.int32) for _ in columns]
    encoded = pa.table(
        {"t": pa.chunked_array(chunks, type=pa.string()).dictionary_encode()}
    ).unify_dictionaries()
    col = encoded.column("t")
    vocabulary = col.chunk(col.num_chunks - 1).dictionary
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in col.chunks]).astype(np.int32)
    bounds = np.cumsum([0] + [len(c) for c in columns])
    return vocabulary, [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def lookup(values: Tokens, vocabulary: pa.Array) -> np.ndarray:
    """int32 codes of ``values`` in ``vocabulary``; -1 where a token is not in it."""
    codes = pc.fill_null(pc.index_in(values, value_set=vocabulary), -1)
    if isinstance(codes, pa.ChunkedArray):
        codes = codes.combine_chunks() if codes.num_chunks else pa.array([], pa.int32())
    return codes.to_numpy().astype(np.int32, copy=False)


@dataclass
class Catalogue:
    """The items or users of a dataset: dense-id order (``vocabulary``) and the table."""

    kind: str
    vocabulary: pa.Array
    frame: pd.DataFrame
    from_file: Path | None

    def codes(self, values: Tokens, path: Path, field: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Codes of ``values``; an id missing from the ``.item``/``.user`` file is an error at its line.

        ``rows`` maps each value to its data row when there are several per row (flattened histories).
        """
        codes = lookup(values, self.vocabulary)
        bad = first_true(codes < 0)
        if bad is not None:
            row = int(rows[bad]) if rows is not None else bad
            token = values[bad].as_py()
            raise_at_row(
                path, row, _HEADER, field, f"unknown {self.kind} {token!r} (not in {self.from_file})"
            )
        return codes


def _attributes(atomic: AtomicFile, skip: set[str]) -> dict[str, object]:
    """Text and numeric attributes of a ``.item`` / ``.user`` file, converted as the module docstring says."""
    out: dict[str, object] = {}
    for name, field in atomic.fields.items():
        if name in skip:
            continue
        col = atomic.column(name)
        if field.type == "float":
            out[name] = col.to_numpy()
        elif field.type == "token_seq":
            tokens, offsets = split_tokens(col)
            flat = tokens.to_pylist()
            bounds = offsets.tolist()
            out[name] = ["|".join(flat[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        else:
            out[name] = col.to_pylist()
    return out


def catalogue_from_file(atomic: AtomicFile, kind: str) -> Catalogue:
    """Items or users listed by a ``.item``/``.user`` file, in file order; ids must be unique."""
    key = f"{kind}_id"
    vocabulary, (codes,) = factorize(atomic.column(key))
    if len(vocabulary) != atomic.table.num_rows:
        previous_max = np.maximum.accumulate(np.concatenate(([-1], codes[:-1])))
        dup = int(np.flatnonzero(codes <= previous_max)[0])
        raise_at_row(
            atomic.path, dup, _HEADER, key, f"duplicate {kind} id {atomic.column(key)[dup].as_py()!r}"
        )
    frame = pd.DataFrame({key: np.arange(len(vocabulary), dtype=np.int64), "raw_id": vocabulary.to_pylist()})
    skip = {key}
    if kind == "item":
        titles = [t for t in TITLE_FIELDS if t in atomic.fields and atomic.fields[t].type.startswith("token")]
        frame["title"] = atomic.column(titles[0]).to_pylist() if titles else ""
        skip.update(titles[:1])
    for name, values in _attributes(atomic, skip).items():
        if name not in frame.columns:
            frame[name] = values
    return Catalogue(kind, vocabulary, frame, atomic.path)


def catalogue_from_tokens(vocabulary: pa.Array, kind: str) -> Catalogue:
    """Items or users known only from the interactions (no ``.item``/``.user`` file): no titles."""
    frame = pd.DataFrame(
        {f"{kind}_id": np.arange(len(vocabulary), dtype=np.int64), "raw_id": vocabulary.to_pylist()}
    )
    if kind == "item":
        frame["title"] = ""
    return Catalogue(kind, vocabulary, frame, None)


def _encode(
    atomic_file: AtomicFile | None, kind: str, columns: list[tuple[Tokens, Path, str, np.ndarray | None]]
) -> tuple[Catalogue, list[np.ndarray]]:
    """Catalogue plus the codes of every (values, path, field, rows) column that refers to it."""
    if atomic_file is not None:
        catalogue = catalogue_from_file(atomic_file, kind)
        return catalogue, [catalogue.codes(v, path, field, rows) for v, path, field, rows in columns]
    vocabulary, codes = factorize(*[c[0] for c in columns])
    return catalogue_from_tokens(vocabulary, kind), codes


def _optional(path: Path, key: str) -> AtomicFile | None:
    return read_atomic(path, {key: "token"}) if path.is_file() else None


def locate(spec: str | Path) -> tuple[Path, str]:
    """Resolve ``PATH/NAME`` to (folder, NAME): RecBole's ``NAME/NAME.inter`` layout, or a file prefix."""
    spec = Path(spec).expanduser()
    name = spec.name
    for folder in (spec, spec.parent):
        if any((folder / f"{name}{suffix}").is_file() for suffix in (".inter", ".train.inter")):
            return folder, name
    raise FileNotFoundError(
        f"no RecBole dataset at {spec}: expected {spec}/{name}.inter, {spec}.inter or {spec}.train.inter"
    )


def read_recbole(spec: str | Path) -> Dataset:
    """Read a RecBole atomic dataset (see the module docstring for the conventions)."""
    folder, name = locate(spec)
    item_file = _optional(folder / f"{name}.item", ITEM)
    user_file = _optional(folder / f"{name}.user", USER)
    split_paths = {part: folder / f"{name}.{part}.inter" for part in SPLIT_PARTS}
    present = [p for p in split_paths.values() if p.is_file()]
    if present:
        if len(present) != len(split_paths):
            missing = sorted(str(p) for p in split_paths.values() if not p.is_file())
            raise FileNotFoundError(
                f"the RecBole split convention needs train, valid and test; missing {missing}"
            )
        dataset = _read_split(name, split_paths, item_file, user_file)
    else:
        dataset = _read_plain(name, folder / f"{name}.inter", item_file, user_file)
        present = [folder / f"{name}.inter"]
    read = present + [f.path for f in (item_file, user_file) if f is not None]
    dataset.sources = {p.name: sha256_file(p) for p in sorted(read)}
    dataset.validate()
    return dataset


def _read_plain(name: str, path: Path, item_file: AtomicFile | None, user_file: AtomicFile | None) -> Dataset:
    inter = read_atomic(path, {USER: "token", ITEM: "token"}, {RATING: "float", TIME: "float"})
    if not inter.table.num_rows:
        raise DataFormatError(path, None, None, "no interactions")
    users, (user,) = _encode(user_file, "user", [(inter.column(USER), path, USER, None)])
    items, (item,) = _encode(item_file, "item", [(inter.column(ITEM), path, ITEM, None)])
    rating = inter.column(RATING).to_numpy() if RATING in inter.fields else None
    if TIME in inter.fields:
        timestamp = inter.column(TIME).to_numpy()
        bad = first_true(np.abs(timestamp) >= 2**62)
        if bad is not None:
            raise_at_row(path, bad, _HEADER, TIME, f"{timestamp[bad]} is out of range")
    else:
        order = np.argsort(user, kind="stable")
        timestamp = np.empty(len(user), dtype=np.int64)
        timestamp[order] = positions_within(np.bincount(user, minlength=len(users.frame)))
    extra: dict[str, np.ndarray | pd.Series] = {}
    for field in inter.fields.values():
        if field.name not in (USER, ITEM, RATING, TIME):
            col = inter.column(field.name)
            extra[field.name] = col.to_numpy() if field.type == "float" else col.to_pandas()
    dedupe_on = None
    if TIME in inter.fields:
        dedupe_on = "timestamp"
        if not np.array_equal(timestamp, np.floor(timestamp)):  # the frame floors times: compare exact ones
            extra[_EXACT_TIME], dedupe_on = timestamp, _EXACT_TIME
    del inter  # free the parsed text before the sort allocates
    pa.default_memory_pool().release_unused()
    interactions = interactions_frame(user, item, rating, timestamp, extra)
    if dedupe_on is not None:
        interactions = drop_duplicate_rows(interactions, dedupe_on, path, users.vocabulary)
        interactions = interactions.drop(columns=[_EXACT_TIME], errors="ignore")
    return Dataset(name=name, interactions=interactions, items=items.frame, users=users.frame)


def _read_split(
    name: str, paths: dict[str, Path], item_file: AtomicFile | None, user_file: AtomicFile | None
) -> Dataset:
    required = {USER: "token", HISTORY: "token_seq", ITEM: "token"}
    parts = {part: read_atomic(path, required) for part, path in paths.items()}
    if not parts["train"].table.num_rows:
        raise DataFormatError(paths["train"], None, None, "no interactions")
    histories: dict[str, tuple[pa.Array, np.ndarray]] = {}
    for part, atomic in parts.items():
        tokens, offsets = split_tokens(atomic.column(HISTORY))
        empty = first_true(np.diff(offsets) == 0)
        if empty is not None:
            raise_at_row(atomic.path, empty, _HEADER, HISTORY, "empty history")
        histories[part] = (tokens, offsets)

    item_columns = []
    for part in SPLIT_PARTS:
        tokens, offsets = histories[part]
        token_rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        item_columns.append((tokens, paths[part], HISTORY, token_rows))
        item_columns.append((parts[part].column(ITEM), paths[part], ITEM, None))
    items, item_codes = _encode(item_file, "item", item_columns)
    users, user_codes = _encode(
        user_file, "user", [(parts[p].column(USER), paths[p], USER, None) for p in SPLIT_PARTS]
    )

    frames: dict[str, pd.DataFrame] = {}
    ev_user, ev_row, ev_pos, ev_item, ev_target = [], [], [], [], []
    row_base = 0
    for i, part in enumerate(SPLIT_PARTS):
        offsets = histories[part][1]
        lengths = np.diff(offsets)
        user = user_codes[i].astype(np.int64)
        history, target = item_codes[2 * i].astype(np.int64), item_codes[2 * i + 1].astype(np.int64)
        frames[part] = pd.DataFrame({"user_id": user, "history": ragged(history, offsets), "target": target})
        rows = row_base + np.arange(len(user))
        ev_user += [np.repeat(user, lengths), user]
        ev_row += [np.repeat(rows, lengths), rows]
        ev_pos += [np.arange(len(history)) - np.repeat(offsets[:-1], lengths), lengths]
        ev_item += [history, target]
        ev_target += [np.zeros(len(history), dtype=bool), np.ones(len(user), dtype=bool)]
        row_base += len(user)

    user_ev, row_ev, pos_ev = np.concatenate(ev_user), np.concatenate(ev_row), np.concatenate(ev_pos)
    item_ev, is_target = np.concatenate(ev_item), np.concatenate(ev_target)
    first_row = np.full(len(users.frame), np.iinfo(np.int64).max)
    np.minimum.at(first_row, user_ev, row_ev)
    keep = is_target | (row_ev == first_row[user_ev])  # the first row's history, then every target
    order = np.lexsort((pos_ev[keep], row_ev[keep], user_ev[keep]))
    user_ev, item_ev = user_ev[keep][order], item_ev[keep][order]
    timestamp = positions_within(np.bincount(user_ev, minlength=len(users.frame)))
    presplit = {"next-item": frames, "full-ranking": {part: frame.copy() for part, frame in frames.items()}}
    return Dataset(
        name=name,
        interactions=interactions_frame(user_ev, item_ev, None, timestamp),
        items=items.frame,
        users=users.frame,
        presplit=presplit,
    )
