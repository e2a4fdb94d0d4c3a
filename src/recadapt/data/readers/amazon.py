"""Amazon Reviews 2018 (Ni, Li and McAuley, EMNLP 2019; https://nijianmo.github.io/amazon/), one category.

``amazon2018:PATH/CATEGORY`` reads ``PATH/CATEGORY_5.json.gz`` (the 5-core reviews: one JSON object per line,
with ``reviewerID``, ``asin``, ``overall`` (1-5 stars) and ``unixReviewTime``; other fields are ignored) and
``PATH/meta_CATEGORY.json.gz`` (one JSON object per product: ``asin``, ``title``, ``category`` (a list),
``brand``, ...). The files are the user's own download (the terms forbid redistribution).

Both files are streamed (gzip, then ``json.loads`` line by line): only the four review fields are kept, with ids
interned as they are read, so memory grows with the users and items, not with the review text. The 2014
release (McAuley et al.) wrote Python literals (``{'reviewerID': ...}``), which are not JSON and are never
evaluated: such a line is a :class:`~recadapt.errors.DataFormatError` naming the file and line and saying so.
A missing or mistyped required field is an error at its line, naming the field.

Ids: users and items in sorted raw-id order (``reviewerID``, ``asin``); items are those reviewed. Titles come
from the metadata with HTML entities decoded and whitespace runs (``&nbsp;``, line breaks) collapsed; an item
without metadata or without a usable title is titled by its asin, and their number is logged. ``categories``
is the metadata's ``category`` list ``|`` joined ('' when absent), ``brand`` likewise. A product listed twice
in the metadata (the 2018 files repeat some) keeps its first line.

Duplicate reviews (the same user, item and time: the 5-core files repeat some lines) are kept as published, so
the interaction count matches the file; dropping them is a protocol's choice, not the reader's.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import math
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recadapt.data.readers._common import interactions_frame, require_file
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

PREFIX = "amazon2018:"
SOURCE = "https://nijianmo.github.io/amazon/"
USER, ITEM, RATING, TIME = "reviewerID", "asin", "overall", "unixReviewTime"

logger = logging.getLogger(__name__)


def clean_text(value: str) -> str:
    """Decode HTML entities and collapse whitespace runs (``&nbsp;``, tabs, line breaks) to single spaces."""
    return " ".join(html.unescape(value).split())


def _not_json(raw: bytes, exc: json.JSONDecodeError) -> str:
    message = f"not JSON ({exc.msg} at column {exc.colno})"
    if raw.lstrip().startswith(b"{'"):
        message += (
            "; this looks like the 2014 Amazon format (Python literals, not JSON), which is not read: "
            f"use the 2018 files from {SOURCE}"
        )
    return message


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of a gzipped JSON-lines file."""
    number = 0
    with gzip.open(require_file(path), "rb") as handle:
        try:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(path, number, None, _not_json(raw, exc)) from None
                except UnicodeDecodeError as exc:
                    raise DataFormatError(path, number, None, f"not valid UTF-8: {exc.reason}") from None
                if not isinstance(record, dict):
                    raise DataFormatError(
                        path, number, None, f"expected a JSON object, found {type(record).__name__}"
                    )
                yield number, record
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise DataFormatError(
                path, number + 1, None, f"cannot read the gzip stream ({exc}): truncated or not gzip?"
            ) from None


def _text(record: dict[str, Any], name: str, path: Path, number: int) -> str:
    value = record.get(name)
    if value is None:
        raise DataFormatError(path, number, name, "missing required field")
    if not isinstance(value, str) or not value:
        raise DataFormatError(path, number, name, f"expected a non-empty string, found {value!r}")
    return value


def _number(record: dict[str, Any], name: str, path: Path, number: int, *, integer: bool) -> float:
    value = record.get(name)
    if value is None:
        raise DataFormatError(path, number, name, "missing required field")
    allowed = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise DataFormatError(path, number, name, f"expected {kind}, found {value!r}")
    return value


def _sorted_codes(index: dict[str, int], codes: array) -> tuple[list[str], np.ndarray]:
    """Raw ids sorted, and ``codes`` (first-seen order) remapped to positions in that order."""
    raw = list(index)
    order = sorted(range(len(raw)), key=raw.__getitem__)
    rank = np.empty(len(raw), dtype=np.int64)
    rank[order] = np.arange(len(raw), dtype=np.int64)
    return [raw[i] for i in order], rank[np.frombuffer(codes, dtype=np.int32)]


def read_reviews(path: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(users, user codes, items, item codes, ratings, times) of a 5-core file, ids in sorted raw order."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    user_codes, item_codes = array("i"), array("i")
    ratings, times = array("d"), array("q")
    for number, record in json_lines(path):
        user = _text(record, USER, path, number)
        item = _text(record, ITEM, path, number)
        rating = _number(record, RATING, path, number, integer=False)
        if not 1 <= rating <= 5:
            raise DataFormatError(path, number, RATING, f"rating {rating!r} outside 1..5")
        time = _number(record, TIME, path, number, integer=True)
        user_codes.append(users.setdefault(user, len(users)))
        item_codes.append(items.setdefault(item, len(items)))
        ratings.append(rating)
        times.append(int(time))
    if not ratings:
        raise DataFormatError(path, None, None, "no reviews")
    user_ids, user = _sorted_codes(users, user_codes)
    item_ids, item = _sorted_codes(items, item_codes)
    return (
        user_ids,
        user,
        item_ids,
        item,
        np.frombuffer(ratings, dtype=np.float64),
        np.frombuffer(times, np.int64),
    )


def _joined(value: Any) -> str:
    """A metadata list of strings ``|`` joined (cleaned, empty pieces dropped); anything else ''."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ""
    return "|".join(piece for piece in (clean_text(v) for v in value if isinstance(v, str)) if piece)


def read_metadata(path: Path, wanted: set[str]) -> dict[str, tuple[str, str, str]]:
    """(title, categories, brand) of the ``wanted`` asins listed in a metadata file; '' where absent."""
    found: dict[str, tuple[str, str, str]] = {}
    repeated = 0
    for number, record in json_lines(path):
        asin = _text(record, ITEM, path, number)
        if asin not in wanted:
            continue
        if asin in found:
            repeated += 1
            continue
        title = record.get("title")
        brand = record.get("brand")
        found[asin] = (
            clean_text(title) if isinstance(title, str) else "",
            _joined(record.get("category")),
            clean_text(brand) if isinstance(brand, str) else "",
        )
    if repeated:
        logger.info("%s: %d repeated product line(s) ignored (the first one is kept)", path, repeated)
    return found


def locate(spec: str | Path) -> tuple[Path, str]:
    """``PATH/CATEGORY`` -> (the folder, the category): ``CATEGORY`` names ``CATEGORY_5.json.gz``."""
    spec = Path(spec).expanduser()
    if not spec.name:
        raise ValueError(f"{PREFIX}{spec}: give the dataset as {PREFIX}PATH/CATEGORY")
    return spec.parent, spec.name


def read_amazon2018(spec: str | Path) -> Dataset:
    """Read one category of Amazon Reviews 2018 (see the module docstring for the conventions)."""
    folder, category = locate(spec)
    reviews_path = folder / f"{category}_5.json.gz"
    meta_path = folder / f"meta_{category}.json.gz"
    require_file(reviews_path)
    require_file(meta_path)
    user_ids, user, item_ids, item, rating, timestamp = read_reviews(reviews_path)
    metadata = read_metadata(meta_path, set(item_ids))
    blank = ("", "", "")
    attributes = [metadata.get(asin, blank) for asin in item_ids]
    titles = [title or asin for (title, _, _), asin in zip(attributes, item_ids, strict=True)]
    untitled = sum(1 for title, _, _ in attributes if not title)
    if untitled:
        logger.warning(
            "%s: %d of %d items have no metadata or no title (%d without metadata); titled by their asin",
            meta_path,
            untitled,
            len(item_ids),
            len(item_ids) - len(metadata),
        )
    items = pd.DataFrame(
        {
            "item_id": np.arange(len(item_ids), dtype=np.int64),
            "raw_id": item_ids,
            "title": titles,
            "categories": [a[1] for a in attributes],
            "brand": [a[2] for a in attributes],
        }
    )
    users = pd.DataFrame({"user_id": np.arange(len(user_ids), dtype=np.int64), "raw_id": user_ids})
    dataset = Dataset(
        name=f"amazon2018-{category}",
        interactions=interactions_frame(user, item, rating, timestamp),
        items=items,
        users=users,
        domain="item",  # the prompt templates have no "product" domain
        sources={p.name: sha256_file(p) for p in (meta_path, reviews_path)},
    )
    dataset.validate()
    return dataset
