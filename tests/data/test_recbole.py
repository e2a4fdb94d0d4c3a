"""The RecBole atomic-file reader: fixtures end to end, every kind of bad input, and property-based checks."""

from __future__ import annotations

import logging
import math
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recadapt.data.readers.recbole import locate, read_recbole
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError


@pytest.fixture
def recbole_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "recbole"


def copy_fixture(recbole_dir: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(recbole_dir / name, tmp_path / name))


def rows(ds: Dataset) -> list[tuple]:
    inter = ds.interactions
    raw_user, raw_item = ds.users["raw_id"].to_numpy(), ds.items["raw_id"].to_numpy()
    return [
        (raw_user[u], raw_item[i], None if math.isnan(r) else r, t)
        for u, i, r, t in inter[["user_id", "item_id", "rating", "timestamp"]].itertuples(index=False)
    ]


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())


# ------------------------------------------------------------------------------------------------------------
# Fixtures end to end


def test_plain_dataset_with_item_and_user_files(recbole_dir: Path) -> None:
    ds = read_recbole(recbole_dir / "tiny")
    ds.validate()
    assert (ds.name, ds.domain, ds.presplit) == ("tiny", "item", {})
    assert sorted(ds.sources) == ["tiny.inter", "tiny.item", "tiny.user"]
    items = ds.items
    assert items["raw_id"].tolist() == ["i1", "i2", "i3", "i4"]  # .item order, including the unrated i4
    assert items["title"].tolist() == ["The First", "Second, The (2001)", '"Third"', "Never Rated"]
    assert items["genre"].tolist() == ["Action|Comedy", "Drama", "", "Horror|Thriller"]
    assert items["year"].tolist() == [1999.0, 2001.0, 2005.0, 2010.0]
    assert items["studio"].tolist() == ["Acme", "Beta Films", "Acme", "Delta"]
    assert ds.users[["raw_id", "age", "gender"]].values.tolist() == [
        ["u1", 25.0, "F"],
        ["u2", 30.0, "M"],
        ["u3", 41.0, "F"],
    ]
    # Sorted by (user, timestamp); u1's two events at time 90 keep their line order (line 3, then line 7).
    assert rows(ds) == [
        ("u1", "i2", 3.0, 90),
        ("u1", "i3", 4.5, 90),
        ("u1", "i1", 5.0, 100),
        ("u2", "i1", 4.0, 50),
        ("u2", "i3", 1.0, 60),
        ("u3", "i2", 2.0, 10),
    ]
    assert ds.interactions["review"].tolist() == [
        "ok",
        "later line, same time",
        "great film",
        "",
        "bad",
        "fine",
    ]


def test_minimal_dataset_uses_line_order_and_first_appearance(recbole_dir: Path) -> None:
    ds = read_recbole(recbole_dir / "minimal")
    assert ds.items[["raw_id", "title"]].values.tolist() == [["10", ""], ["20", ""], ["30", ""]]
    assert ds.users["raw_id"].tolist() == ["x", "y"]
    assert rows(ds) == [
        ("x", "10", None, 0),
        ("x", "30", None, 1),
        ("x", "10", None, 2),
        ("y", "20", None, 0),
        ("y", "10", None, 1),
    ]


def test_split_convention(recbole_dir: Path) -> None:
    ds = read_recbole(recbole_dir / "tiny-split")
    ds.validate()
    assert sorted(ds.sources) == [
        f"tiny-split.{s}" for s in ("item", "test.inter", "train.inter", "valid.inter")
    ]
    assert ds.items["title"].tolist() == ["One", "Two", "Three", "Four", "Five", "Six (never seen)"]
    assert set(ds.presplit) == {"next-item", "full-ranking"}
    for protocol in ds.presplit.values():
        frames = {
            part: [(u, list(h), t) for u, h, t in f.itertuples(index=False)] for part, f in protocol.items()
        }
        assert frames == {
            "train": [(0, [0], 1), (0, [0, 1], 2), (1, [2], 0)],
            "valid": [(0, [0, 1, 2], 3), (1, [2, 0], 1)],
            "test": [(0, [0, 1, 2, 3], 4), (1, [2, 0, 1], 3)],
        }
        assert list(protocol["train"].columns) == ["user_id", "history", "target"]
    # Interactions: the first row's history then every target, per user.
    assert rows(ds) == [("a", str(i), None, i - 1) for i in range(1, 6)] + [
        ("b", "3", None, 0),
        ("b", "1", None, 1),
        ("b", "2", None, 2),
        ("b", "4", None, 3),
    ]


def test_locate(recbole_dir: Path, tmp_path: Path) -> None:
    assert locate(recbole_dir / "tiny") == (recbole_dir / "tiny", "tiny")
    assert locate(recbole_dir / "tiny-split" / "tiny-split") == (recbole_dir / "tiny-split", "tiny-split")
    with pytest.raises(FileNotFoundError, match="no RecBole dataset"):
        locate(tmp_path / "nothing")


def test_float_timestamps_crlf_and_blank_lines(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float", "a\tx\t10.7", "", "a\ty\t10.2", "b\tx\t3e2", ""]
    write_lines(folder / "f.inter", lines, newline="\r\n")
    assert rows(read_recbole(folder)) == [("a", "y", None, 10), ("a", "x", None, 10), ("b", "x", None, 300)]


def test_missing_split_part(recbole_dir: Path, tmp_path: Path) -> None:
    folder = copy_fixture(recbole_dir, tmp_path, "tiny-split")
    (folder / "tiny-split.valid.inter").unlink()
    with pytest.raises(FileNotFoundError, match="valid"):
        read_recbole(folder)


# ------------------------------------------------------------------------------------------------------------
# Bad input: (fixture, file, 1-based line, new text of that line, field, message)

BAD_INPUT = [
    ("tiny", "tiny.inter", 3, "u1\ti2", "rating", "truncated"),
    ("tiny", "tiny.inter", 3, "u1\ti2\t3\t90\tok\textra", "review", "too many fields"),
    ("tiny", "tiny.inter", 4, "u2\ti1\tgood\t50\t", "rating", "'good' is not a number"),
    ("tiny", "tiny.inter", 4, "u2\ti1\tnan\t50\t", "rating", "not a finite number"),
    ("tiny", "tiny.inter", 5, "u2\ti3\t1\t6O\tbad", "timestamp", "'6O' is not a number"),
    ("tiny", "tiny.inter", 6, "u3\ti\udcff2\t2\t10\tfine", "item_id", "byte 0xff at column 5"),
    ("tiny", "tiny.inter", 6, "u3\ti9\t2\t10\tfine", "item_id", "unknown item 'i9'"),
    ("tiny", "tiny.inter", 7, "u7\ti3\t4.5\t90\tx", "user_id", "unknown user 'u7'"),
    ("tiny", "tiny.inter", 2, "\ti1\t5\t100\tgreat film", "user_id", "empty token"),
    (
        "tiny",
        "tiny.inter",
        1,
        "user_id:token\titem_id:token\trating:number\ttimestamp:float\treview:token_seq",
        "rating",
        "unknown type 'number'",
    ),
    (
        "tiny",
        "tiny.inter",
        1,
        "user_id:token\titem:token\trating:float\ttimestamp:float\treview:token_seq",
        "item_id",
        "missing required field",
    ),
    (
        "tiny",
        "tiny.inter",
        1,
        "user_id:token\titem_id:float\trating:float\ttimestamp:float\treview:token_seq",
        "item_id",
        "must have type token",
    ),
    (
        "tiny",
        "tiny.inter",
        1,
        "user_id:token\titem_id:token\trating:token\ttimestamp:float\treview:token_seq",
        "rating",
        "must have type float",
    ),
    (
        "tiny",
        "tiny.inter",
        1,
        "user_id:token\titem_id:token\trating:float\trating:float\treview:token_seq",
        "rating",
        "duplicate field",
    ),
    (
        "tiny",
        "tiny.inter",
        1,
        "user_id:token\titem_id:token\trating\ttimestamp:float\treview:token_seq",
        "rating",
        "name:type",
    ),
    ("tiny", "tiny.item", 4, "i1\tAgain\tDrama\t2000\tAcme", "item_id", "duplicate item id 'i1'"),
    ("tiny", "tiny.item", 5, "i4\tNever Rated\tHorror", "year", "truncated"),
    ("tiny", "tiny.user", 3, "u2\tthirty\tM", "age", "'thirty' is not a number"),
    ("tiny", "tiny.user", 4, "u3\t41\tF\rX", "gender", "carriage return"),
    ("tiny-split", "tiny-split.test.inter", 2, "a\t1 2 3 4\t77", "item_id", "unknown item '77'"),
    ("tiny-split", "tiny-split.valid.inter", 3, "b\t3 99\t2", "item_id_list", "unknown item '99'"),
    ("tiny-split", "tiny-split.train.inter", 4, "b\t\t1", "item_id_list", "empty history"),
    ("tiny-split", "tiny-split.train.inter", 4, "b\t   \t1", "item_id_list", "empty history"),
    ("tiny-split", "tiny-split.test.inter", 3, "b\t3 1 2", "item_id", "truncated"),
    ("tiny-split", "tiny-split.valid.inter", 2, "a\t1 2 \udcc33\t4", "item_id_list", "not valid utf-8"),
]


@pytest.mark.parametrize(
    ("fixture", "file", "line", "text", "field", "match"),
    BAD_INPUT,
    ids=[f"{c[1]}:{c[2]}-{c[4]}-{i}" for i, c in enumerate(BAD_INPUT)],
)
def test_bad_input(
    recbole_dir: Path, tmp_path: Path, fixture: str, file: str, line: int, text: str, field: str, match: str
) -> None:
    folder = copy_fixture(recbole_dir, tmp_path, fixture)
    lines = (folder / file).read_bytes().split(b"\n")
    lines[line - 1] = text.encode("utf-8", "surrogateescape")
    (folder / file).write_bytes(b"\n".join(lines))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    with pytest.raises(DataFormatError) as info:
        read_recbole(folder)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == (file, line, field), str(err)
    assert match in err.message, str(err)
    assert str(err).startswith(f"{err.path}:{line}: field '{field}'")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before, (
        "the reader wrote files"
    )


def test_error_after_blank_lines_names_the_physical_line(recbole_dir: Path, tmp_path: Path) -> None:
    folder = copy_fixture(recbole_dir, tmp_path, "tiny")
    text = (folder / "tiny.inter").read_text().replace("\nu2\ti3", "\n\n\nu2\ti99", 1)
    (folder / "tiny.inter").write_text(text)
    with pytest.raises(DataFormatError) as info:
        read_recbole(folder)
    assert (info.value.line, info.value.field) == (7, "item_id")


def test_empty_interactions(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    write_lines(tmp_path / "e" / "e.inter", ["user_id:token\titem_id:token"])
    with pytest.raises(DataFormatError, match="no interactions"):
        read_recbole(tmp_path / "e")


# ------------------------------------------------------------------------------------------------------------
# Damaged or sloppy files (module docstring): cut-off rows, byte order marks, duplicated lines, padded ids

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ROWS = ["u1\ti1\t5\t100", "u1\ti2\t4\t200", "u2\ti1\t3\t300"]


def write_inter(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "d.inter").write_bytes(data)
    return folder


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("cut", ["u2\ti2\t3", "u2\ti2\t3\t"])
def test_last_row_cut_off_mid_row(tmp_path: Path, cut: str) -> None:
    """A copy interrupted mid-row: the last line is short and has no newline; the error says it was cut."""
    folder = write_inter(tmp_path, "\n".join([HEADER, *ROWS, cut]).encode())
    with pytest.raises(DataFormatError) as info:
        read_recbole(folder)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == ("d.inter", 5, "timestamp"), str(err)
    assert "file ends inside this line" in err.message and "cut off" in err.message, str(err)
    # The same short row followed by a newline is an ordinary bad line, and a complete last row needs no newline.
    (folder / "d.inter").write_bytes("\n".join([HEADER, *ROWS, cut, ""]).encode())
    with pytest.raises(DataFormatError) as info:
        read_recbole(folder)
    assert info.value.line == 5 and "file ends" not in info.value.message
    (folder / "d.inter").write_bytes("\n".join([HEADER, *ROWS, "u2\ti2\t3\t400"]).encode())
    assert len(read_recbole(folder).interactions) == 4


def test_byte_order_mark_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_inter(tmp_path, ("\ufeff" + "\n".join([HEADER, *ROWS, ""])).encode())
    with caplog.at_level(logging.WARNING):
        ds = read_recbole(folder)
    assert rows(ds) == [("u1", "i1", 5.0, 100), ("u1", "i2", 4.0, 200), ("u2", "i1", 3.0, 300)]
    assert any("byte order mark" in m and "d.inter" in m for m in warnings_of(caplog))


def test_duplicate_rows_are_dropped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Identical lines go (with a count); a row differing in any field, or in a fraction of a second, stays."""
    lines = [HEADER, *ROWS, ROWS[1], ROWS[0], ROWS[1], "u1\ti2\t3\t200", "u2\ti1\t3\t300.5"]
    folder = write_inter(tmp_path, "\n".join([*lines, ""]).encode())
    with caplog.at_level(logging.WARNING):
        ds = read_recbole(folder)
    assert rows(ds) == [
        ("u1", "i1", 5.0, 100),
        ("u1", "i2", 4.0, 200),
        ("u1", "i2", 3.0, 200),
        ("u2", "i1", 3.0, 300),
        ("u2", "i1", 3.0, 300),  # 300.5, floored
    ]
    assert any("dropped 3 duplicate row(s)" in m and "d.inter" in m for m in warnings_of(caplog))
    assert "timestamp:exact" not in ds.interactions.columns


def test_duplicate_lines_without_timestamps_are_repeated_events(recbole_dir: Path) -> None:
    """Without times the line order is the sequence, so a repeated line is a repeat consumption: kept."""
    assert len(read_recbole(recbole_dir / "minimal").interactions) == 5  # 'x 10' appears twice


def test_id_whitespace_is_stripped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """' u1' and 'u1' are one user, 'i1 ' and 'i1' one item; the warning counts them and names a line."""
    lines = [HEADER, *ROWS, " u1\ti1 \t2\t500", "u2 \t i2\t1\t600"]
    folder = write_inter(tmp_path, "\n".join([*lines, ""]).encode())
    with caplog.at_level(logging.WARNING):
        ds = read_recbole(folder)
    assert ds.users["raw_id"].tolist() == ["u1", "u2"] and ds.items["raw_id"].tolist() == ["i1", "i2"]
    messages = warnings_of(caplog)
    assert any("2 user_id value(s), first at line 5 (' u1')" in m for m in messages), messages
    assert any("2 item_id value(s), first at line 5 ('i1 ')" in m for m in messages), messages
    (folder / "d.inter").write_bytes("\n".join([HEADER, *ROWS, "  \ti1\t2\t500", ""]).encode())
    with pytest.raises(DataFormatError) as info:
        read_recbole(folder)
    assert (info.value.line, info.value.field, info.value.message) == (5, "user_id", "empty token")


# ------------------------------------------------------------------------------------------------------------
# Property-based

TOKEN = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"),
    min_size=1,
    max_size=6,
).filter(lambda t: t == t.strip(string.whitespace))  # the reader strips ids (see test_id_whitespace_...)
EVENT = st.tuples(
    st.sampled_from(["u1", "u2", "ü3", "user 4"]),
    TOKEN,
    st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
    st.integers(0, 2**40),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(EVENT, min_size=1, max_size=30),
    with_rating=st.booleans(),
    with_items=st.booleans(),
    float_times=st.booleans(),
)
def test_round_trip(events: list[tuple], with_rating: bool, with_items: bool, float_times: bool) -> None:
    """Random valid tables read back to the same interactions, in (user, time, line) order, less repeated
    lines."""
    header = (
        ["user_id:token", "item_id:token"] + (["rating:float"] if with_rating else []) + ["timestamp:float"]
    )
    lines = ["\t".join(header)]
    for user, item, rating, time in events:
        fields = [user, item] + ([repr(rating if rating is not None else 0.0)] if with_rating else [])
        lines.append("\t".join([*fields, f"{time}.0" if float_times else str(time)]))
    items = list(dict.fromkeys(e[1] for e in events))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "r"
        folder.mkdir()
        write_lines(folder / "r.inter", lines)
        if with_items:
            catalogue = sorted(items, reverse=True)
            write_lines(
                folder / "r.item", ["item_id:token\ttitle:token_seq", *[f"{i}\tT {i}" for i in catalogue]]
            )
        ds = read_recbole(folder)
    ds.validate()
    frame = pd.DataFrame(events, columns=["user", "item", "rating", "time"])
    frame["rating"] = frame["rating"].fillna(0.0) if with_rating else np.nan
    frame = frame.drop_duplicates(["user", "item", "rating", "time"])
    expected = frame.assign(u=pd.factorize(frame["user"])[0]).sort_values(["u", "time"], kind="stable")
    got = rows(ds)
    assert [(u, i, t) for u, i, _, t in got] == list(
        zip(expected["user"], expected["item"], expected["time"], strict=True)
    )
    if with_rating:
        assert [r for _, _, r, _ in got] == expected["rating"].tolist()
    assert ds.items["raw_id"].tolist() == (sorted(items, reverse=True) if with_items else items)
    if with_items:
        assert ds.items["title"].tolist() == [f"T {i}" for i in ds.items["raw_id"]]


def _fixture_bytes(name: str) -> dict[str, bytes]:
    folder = Path(__file__).resolve().parents[1] / "fixtures" / "recbole" / name
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CORRUPTIBLE = {name: _fixture_bytes(name) for name in ("tiny", "tiny-split")}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_single_byte_corruption(data: st.DataObject) -> None:
    """Any one changed byte gives a valid dataset or a DataFormatError, never another exception."""
    name = data.draw(st.sampled_from(sorted(CORRUPTIBLE)))
    files = CORRUPTIBLE[name]
    target = data.draw(st.sampled_from(sorted(files)))
    content = bytearray(files[target])
    content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        for file, raw in files.items():
            (folder / file).write_bytes(bytes(content) if file == target else raw)
        try:
            read_recbole(folder).validate()
        except DataFormatError as err:
            assert Path(err.path).parent == folder, str(err)  # a bad catalogue may surface in .inter
