"""MovieLens 1M, 10M, 20M and 25M from the unpacked GroupLens zips (``data_dir/<folder>/``).

Folders as the zips unpack: ``ml-1m/``, ``ml-10M100K/`` (the 10M zip's own name), ``ml-20m/``, ``ml-25m/``.

- 1M and 10M: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
  (``MovieID::Title::Genres``); 1M also has ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``),
  kept as user attributes with the README's age ranges and occupation names (so prompts read "25-34",
  "programmer"). The ``::`` files stream through Arrow with the separator rewritten on the fly
  (:class:`recadapt.data.readers._text.SeparatorRewriter`).
- 20M and 25M: ``ratings.csv`` (header ``userId,movieId,rating,timestamp``) and ``movies.csv`` (header
  ``movieId,title,genres``, RFC-4180 quoting: titles hold commas and quotes).

Encodings: ratings are ASCII (read as UTF-8: any other byte is an error at its line). ``movies.dat`` and
``users.dat`` are decoded as UTF-8 when the whole file is valid UTF-8, else as latin-1 (ISO-8859-1), per file:
ML-1M's ``movies.dat`` is latin-1 and ML-10M's UTF-8, and a latin-1 text with accents is practically never
valid UTF-8, so the test picks the right one without a per-dataset table. The CSV files are UTF-8.

Ids: the catalogue is the movies that have at least one rating (ML-1M lists 3,883 movies, 3,706 rated; an
unrated movie would be a full-ranking candidate no interaction can ever support), in raw MovieID order; users
in raw UserID order. A rating of a movie (or, in 1M, a user) the catalogue file does not list is an error at
its line. Genres stay ``|`` joined; 20M/25M's ``(no genres listed)`` becomes ''. Ratings must be whole stars
1..5 in 1M and half stars 0.5..5 in the others.

Hashes: GroupLens publishes checksums of the zips only, not of the files inside them, so ``verify`` has
nothing to compare here (the downloader, :mod:`recadapt.data.fetch`, checks the zip); ``sources`` still records
every file's SHA-256 for the manifests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from recadapt.data.fetch import DOWNLOADS
from recadapt.data.readers._common import first_true, interactions_frame
from recadapt.data.readers._text import Field, raise_at_row, read_header, read_table
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

RATING_FIELDS = (
    Field("user_id", "int"),
    Field("item_id", "int"),
    Field("rating", "float"),
    Field("timestamp", "int"),
)
MOVIE_FIELDS = (Field("item_id", "int"), Field("title"), Field("genres"))
USER_FIELDS = (
    Field("user_id", "int"),
    Field("gender"),
    Field("age", "int"),
    Field("occupation", "int"),
    Field("zip_code"),
)
RATINGS_CSV_HEADER = "userId,movieId,rating,timestamp"
MOVIES_CSV_HEADER = "movieId,title,genres"
NO_GENRES = "(no genres listed)"
# ML-1M README, "USERS FILE DESCRIPTION".
AGE_RANGES = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)


def text_encoding(path: Path) -> str:
    """``utf-8`` when the (small) file is valid UTF-8, else ``latin-1`` (see the module docstring)."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


def _arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column as one contiguous numpy array; the Arrow buffers are released as each is converted."""
    out = {}
    for name in table.column_names:
        out[name] = table.column(name).to_numpy()
        table = table.drop_columns([name])
    pa.default_memory_pool().release_unused()
    return out


def rank_codes(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values sorted, each value's position among them): dense ids in raw id order.

    Small non-negative ids (every MovieLens id) take a presence table, linear in the rows; others a sort.
    """
    if raw.size and raw.min() >= 0 and raw.max() < max(4 * raw.size, 1 << 24):
        present = np.zeros(int(raw.max()) + 1, dtype=bool)
        present[raw] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return np.flatnonzero(present), rank[raw]
    distinct, codes = np.unique(raw, return_inverse=True)
    return distinct, codes.astype(np.int64)


def _catalogue_positions(raw: np.ndarray, path: Path, header_lines: int, field: str) -> np.ndarray:
    """Order sorting a catalogue file by raw id; a repeated id is an error at its second line."""
    order = np.argsort(raw, kind="stable")
    dup = first_true(raw[order][1:] == raw[order][:-1])
    if dup is not None:
        raise_at_row(path, int(order[dup + 1]), header_lines, field, f"duplicate id {raw[order][dup + 1]}")
    return order


def _match(
    distinct: np.ndarray,
    codes: np.ndarray,
    listed: np.ndarray,
    ratings_path: Path,
    header_lines: int,
    field: str,
    what: str,
    listed_in: Path,
) -> np.ndarray:
    """Positions in the sorted ``listed`` ids of the rated ``distinct`` ids; an unlisted one is an error at the
    first rating line that uses it."""
    pos = np.searchsorted(listed, distinct)
    known = (pos < len(listed)) & (listed[np.minimum(pos, len(listed) - 1)] == distinct)
    if not known.all():
        row = first_true(~known[codes])
        assert row is not None
        raise_at_row(
            ratings_path,
            row,
            header_lines,
            field,
            f"unknown {what} id {distinct[codes[row]]} (not in {listed_in})",
        )
    return pos


def _check_header(path: Path, expected: str) -> None:
    found = read_header(path)
    if found.removeprefix("\ufeff") != expected:
        raise DataFormatError(path, 1, None, f"expected the header {expected!r}, found {found!r}")


def _read_ratings(path: Path, csv: bool, star_step: float) -> tuple[dict[str, np.ndarray], int]:
    """Ratings columns (``::`` or CSV), each value checked; returns the arrays and the header line count."""
    header = 0
    if csv:
        _check_header(path, RATINGS_CSV_HEADER)
        header = 1
        table = read_table(path, RATING_FIELDS, delimiter=",", header_lines=header)
    else:
        table = read_table(path, RATING_FIELDS, delimiter="::")
    if not table.num_rows:
        raise DataFormatError(path, None, None, "no ratings")
    columns = _arrays(table)
    rating = columns["rating"]
    steps = rating / star_step
    bad = first_true((rating < star_step) | (rating > 5) | (steps != np.round(steps)))
    if bad is not None:
        scale = "whole stars 1..5" if star_step == 1 else "half stars 0.5..5"
        raise_at_row(path, bad, header, "rating", f"rating {rating[bad]:g} is not one of {scale}")
    return columns, header


def _read_movies(path: Path, csv: bool) -> tuple[np.ndarray, list[str], list[str], int]:
    """(raw ids, titles, genres, header lines) of the movies file, in file order."""
    if csv:
        _check_header(path, MOVIES_CSV_HEADER)
        table = read_table(path, MOVIE_FIELDS, delimiter=",", header_lines=1, quoted=True)
        header = 1
    else:
        table = read_table(path, MOVIE_FIELDS, delimiter="::", encoding=text_encoding(path))
        header = 0
    genres = ["" if g == NO_GENRES else g for g in table.column("genres").to_pylist()]
    return table.column("item_id").to_numpy(), table.column("title").to_pylist(), genres, header


def _user_attributes(path: Path, rated: np.ndarray, codes: np.ndarray, ratings: Path, header: int) -> dict:
    """ML-1M's ``users.dat`` attributes of the rated users (raw id order), codes turned into README text."""
    table = read_table(path, USER_FIELDS, delimiter="::", encoding=text_encoding(path))
    raw = table.column("user_id").to_numpy()
    order = _catalogue_positions(raw, path, 0, "user_id")
    pos = _match(rated, codes, raw[order], ratings, header, "user_id", "user", path)
    rows = order[pos]
    age = table.column("age").to_numpy()
    bad = first_true(~np.isin(age, list(AGE_RANGES)))
    if bad is not None:
        raise_at_row(
            path, bad, 0, "age", f"unknown age code {age[bad]} (the README lists {sorted(AGE_RANGES)})"
        )
    occupation = table.column("occupation").to_numpy()
    bad = first_true((occupation < 0) | (occupation >= len(OCCUPATIONS)))
    if bad is not None:
        raise_at_row(path, bad, 0, "occupation", f"unknown occupation code {occupation[bad]} (0..20)")
    gender = table.column("gender").to_pylist()
    zips = table.column("zip_code").to_pylist()
    return {
        "gender": [gender[i] for i in rows],
        "age": [AGE_RANGES[int(age[i])] for i in rows],
        "occupation": [OCCUPATIONS[int(occupation[i])] for i in rows],
        "zip_code": [zips[i] for i in rows],
    }


def read_movielens(
    data_dir: Path, name: str, ratings: str, movies: str, users_file: str | None, star_step: float
) -> Dataset:
    """Read one GroupLens MovieLens folder (see the module docstring); ``name`` is its registry name."""
    folder = Path(data_dir) / DOWNLOADS[name].folder
    csv = ratings.endswith(".csv")
    ratings_path, movies_path = folder / ratings, folder / movies
    columns, header = _read_ratings(ratings_path, csv, star_step)
    rated_users, user_codes = rank_codes(columns.pop("user_id"))
    rated_items, item_codes = rank_codes(columns.pop("item_id"))

    raw_movies, titles, genres, movie_header = _read_movies(movies_path, csv)
    order = _catalogue_positions(raw_movies, movies_path, movie_header, "item_id")
    rows = order[
        _match(
            rated_items, item_codes, raw_movies[order], ratings_path, header, "item_id", "movie", movies_path
        )
    ]
    items = pd.DataFrame(
        {
            "item_id": np.arange(len(rated_items), dtype=np.int64),
            "raw_id": [str(r) for r in rated_items.tolist()],
            "title": [titles[i] for i in rows],
            "genres": [genres[i] for i in rows],
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(len(rated_users), dtype=np.int64),
            "raw_id": [str(u) for u in rated_users.tolist()],
        }
    )
    read = [ratings_path, movies_path]
    if users_file is not None:
        users_path = folder / users_file
        for column, values in _user_attributes(
            users_path, rated_users, user_codes, ratings_path, header
        ).items():
            users[column] = values
        read.append(users_path)

    interactions = interactions_frame(user_codes, item_codes, columns.pop("rating"), columns.pop("timestamp"))
    del user_codes, item_codes
    dataset = Dataset(
        name=name,
        interactions=interactions,
        items=items,
        users=users,
        domain="movie",
        sources={f"{folder.name}/{p.name}": sha256_file(p) for p in sorted(read)},
    )
    dataset.validate()
    return dataset


def read_ml1m(data_dir: Path, *, verify: bool = True) -> Dataset:
    """MovieLens 1M (``ml-1m/``): 1,000,209 whole-star ratings of 6,040 users, with user attributes.

    ``verify`` is accepted for the registry's signature: no per-file hash is published (module docstring).
    """
    return read_movielens(data_dir, "ml-1m", "ratings.dat", "movies.dat", "users.dat", star_step=1.0)


def read_ml10m(data_dir: Path, *, verify: bool = True) -> Dataset:
    """MovieLens 10M (``ml-10M100K/``): 10,000,054 half-star ratings."""
    return read_movielens(data_dir, "ml-10m", "ratings.dat", "movies.dat", None, star_step=0.5)


def read_ml20m(data_dir: Path, *, verify: bool = True) -> Dataset:
    """MovieLens 20M (``ml-20m/``): 20,000,263 half-star ratings."""
    return read_movielens(data_dir, "ml-20m", "ratings.csv", "movies.csv", None, star_step=0.5)


def read_ml25m(data_dir: Path, *, verify: bool = True) -> Dataset:
    """MovieLens 25M (``ml-25m/``): 25,000,095 half-star ratings."""
    return read_movielens(data_dir, "ml-25m", "ratings.csv", "movies.csv", None, star_step=0.5)
