"""The Amazon Reviews 2018 reader on small gzipped JSON-lines files written in the published format."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from recadapt.data.readers import read_amazon2018
from recadapt.data.readers.amazon import clean_text
from recadapt.data.registry import known_datasets, load_dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

CATEGORY = "All_Beauty"


def review(user: str, item: str, overall: float, time: int, **extra: object) -> dict:
    return {
        "overall": overall,
        "verified": True,
        "reviewerID": user,
        "asin": item,
        "unixReviewTime": time,
    } | extra


REVIEWS = [
    review("B2", "X9", 5.0, 300, reviewText="great", style={"Size:": " 1"}),
    review("A1", "X9", 4.0, 200),
    review("A1", "B3", 1.0, 100, summary="bad"),
    review("B2", "Q5", 3.0, 300),
    review("A1", "B3", 1.0, 100, summary="bad"),  # a duplicated review, as the 5-core files have: kept
]
META = [
    {
        "asin": "X9",
        "title": "Shea &amp; Cocoa\n  Butter\u00a0Lotion ",
        "category": ["Beauty", " Skin  Care "],
    },
    {"asin": "B3", "brand": "Acme", "category": []},  # no title: the asin
    {"asin": "ZZ", "title": "Never reviewed"},  # not in the 5-core file: not an item
    {"asin": "X9", "title": "A repeated product line"},  # the first line wins
    # Q5 has no metadata: the asin
]


def lines(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write(folder: Path, reviews: bytes | None = None, meta: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{CATEGORY}_5.json.gz").write_bytes(
        gzip.compress(lines(REVIEWS) if reviews is None else reviews)
    )
    (folder / f"meta_{CATEGORY}.json.gz").write_bytes(gzip.compress(lines(META) if meta is None else meta))
    return folder / CATEGORY


def test_ids_titles_attributes_and_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = write(tmp_path / "amazon")
    with caplog.at_level(logging.WARNING, logger="recadapt.data.readers.amazon"):
        ds = read_amazon2018(spec)
    assert (ds.name, ds.domain) == ("amazon2018-All_Beauty", "item")
    # items: reviewed asins in sorted order
    assert [tuple(r) for r in ds.items.itertuples(index=False)] == [
        (0, "B3", "B3", "", "Acme"),
        (1, "Q5", "Q5", "", ""),
        (2, "X9", "Shea & Cocoa Butter Lotion", "Beauty|Skin Care", ""),
    ]
    assert list(ds.items.columns) == ["item_id", "raw_id", "title", "categories", "brand"]
    assert [tuple(r) for r in ds.users.itertuples(index=False)] == [(0, "A1"), (1, "B2")]
    # sorted by (user, time); the duplicate review is kept; the time tie of B2 keeps the line order
    assert [tuple(r) for r in ds.interactions.itertuples(index=False)] == [
        (0, 0, 1.0, 100),
        (0, 0, 1.0, 100),
        (0, 2, 4.0, 200),
        (1, 2, 5.0, 300),
        (1, 1, 3.0, 300),
    ]
    assert [str(ds.interactions[c].dtype) for c in ds.interactions.columns] == [
        "int64",
        "int64",
        "float64",
        "int64",
    ]
    assert ds.sources == {
        f"{CATEGORY}_5.json.gz": sha256_file(tmp_path / "amazon" / f"{CATEGORY}_5.json.gz"),
        f"meta_{CATEGORY}.json.gz": sha256_file(tmp_path / "amazon" / f"meta_{CATEGORY}.json.gz"),
    }
    assert "2 of 3 items have no metadata or no title (1 without metadata)" in caplog.text


def test_registry_prefix(tmp_path: Path) -> None:
    spec = write(tmp_path / "amazon")
    assert "amazon2018:PATH/CATEGORY" in known_datasets()
    assert load_dataset(f"amazon2018:{spec}").n_items == 3
    with pytest.raises(ValueError, match="amazon2018:PATH/CATEGORY"):
        load_dataset("amazon2018:")


def test_clean_text() -> None:
    assert clean_text("  a&nbsp;b\t\tc&#39;s\r\n d ") == "a b c's d"


@pytest.mark.parametrize(
    ("edit", "line", "field", "match"),
    [
        ({"reviewerID": None}, 2, "reviewerID", "missing required field"),
        ({"asin": 12}, 2, "asin", "expected a non-empty string, found 12"),
        ({"overall": "5.0"}, 2, "overall", "expected a number, found '5.0'"),
        ({"overall": 0.0}, 2, "overall", "rating 0.0 outside 1..5"),
        ({"unixReviewTime": 1.5}, 2, "unixReviewTime", "expected an integer, found 1.5"),
        ({"unixReviewTime": True}, 2, "unixReviewTime", "expected an integer, found True"),
    ],
)
def test_bad_review_field(tmp_path: Path, edit: dict, line: int, field: str, match: str) -> None:
    second = {k: v for k, v in (REVIEWS[1] | edit).items() if v is not None}
    spec = write(tmp_path / "amazon", reviews=lines([REVIEWS[0], second, *REVIEWS[2:]]))
    with pytest.raises(DataFormatError) as info:
        read_amazon2018(spec)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == (f"{CATEGORY}_5.json.gz", line, field), str(err)
    assert match in err.message and f"{CATEGORY}_5.json.gz:{line}: field '{field}'" in str(err), str(err)


def test_python_literal_line_is_named_as_the_2014_format(tmp_path: Path) -> None:
    literal = repr({"reviewerID": "A1", "asin": "X9", "overall": 4.0, "unixReviewTime": 200}).encode()
    spec = write(tmp_path / "amazon", reviews=lines(REVIEWS[:1]) + b"\n" + literal + b"\n")
    with pytest.raises(DataFormatError) as info:
        read_amazon2018(spec)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == (f"{CATEGORY}_5.json.gz", 3, None), str(err)
    assert err.message.startswith("not JSON (Expecting property name enclosed in double quotes at column 2)")
    assert "2014 Amazon format" in err.message and f"{CATEGORY}_5.json.gz:3:" in str(err)


def test_other_bad_lines(tmp_path: Path) -> None:
    spec = write(tmp_path / "a", meta=lines(META[:1]) + b"[1, 2]\n")
    with pytest.raises(
        DataFormatError, match=r"meta_All_Beauty\.json\.gz:2: expected a JSON object, found list"
    ):
        read_amazon2018(spec)
    spec = write(tmp_path / "b", meta=lines(META[:1]) + b'{"title": "no asin"}\n')
    with pytest.raises(
        DataFormatError, match=r"meta_All_Beauty\.json\.gz:2: field 'asin' missing required field"
    ):
        read_amazon2018(spec)
    spec = write(tmp_path / "c", reviews=lines(REVIEWS[:2]) + b'{"reviewerID": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"_5\.json\.gz:3: not valid UTF-8"):
        read_amazon2018(spec)
    spec = write(tmp_path / "d", reviews=b"\n")
    with pytest.raises(DataFormatError, match="no reviews"):
        read_amazon2018(spec)


def test_truncated_gzip(tmp_path: Path) -> None:
    spec = write(tmp_path / "amazon")
    path = tmp_path / "amazon" / f"{CATEGORY}_5.json.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 12])
    with pytest.raises(DataFormatError, match="cannot read the gzip stream") as info:
        read_amazon2018(spec)
    assert info.value.path == str(path)


def test_missing_metadata_file(tmp_path: Path) -> None:
    spec = write(tmp_path / "amazon")
    (tmp_path / "amazon" / f"meta_{CATEGORY}.json.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta_All_Beauty\.json\.gz"):
        read_amazon2018(spec)
