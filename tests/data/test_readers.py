"""Readers against the real shared data, and their handling of bad input (corrupted copies in tmp_path)."""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recadapt.data.readers import (
    read_collm_ml1m,
    read_lastfm,
    read_ml100k,
    read_movielens_llara_test,
    read_steam_llara_test,
)
from recadapt.data.readers.collm import RECORDED_SHA256 as COLLM_SHA256
from recadapt.data.readers.lastfm import RECORDED_SHA256 as HETREC_SHA256
from recadapt.data.readers.lastfm import match_names
from recadapt.data.readers.llara import RECORDED_SHA256 as LLARA_SHA256
from recadapt.data.readers.ml100k import RECORDED_SHA256 as ML100K_SHA256
from recadapt.data.registry import NO_VERIFY_ENV, known_datasets, load_dataset
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError

# ------------------------------------------------------------------------------------------------------------
# Helpers

Reader = Callable[[Path], Dataset]
ByteEdit = Callable[[bytes], bytes]
FrameEdit = Callable[[pd.DataFrame], pd.DataFrame | pa.Table]


def assert_well_formed(ds: Dataset) -> None:
    """The contract every reader promises: validate() passes, sorted interactions, hashes of real files."""
    ds.validate()
    inter = ds.interactions
    assert list(inter.columns[:4]) == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(inter[c].dtype) for c in ("user_id", "item_id", "rating", "timestamp")] == [
        "int64",
        "int64",
        "float64",
        "int64",
    ]
    key = inter["user_id"].to_numpy() * (2**33) + (inter["timestamp"].to_numpy() - inter["timestamp"].min())
    assert (np.diff(key) >= 0).all(), "interactions must be sorted by (user_id, timestamp)"
    assert ds.items["raw_id"].map(type).eq(str).all() and ds.users["raw_id"].map(type).eq(str).all()
    assert ds.items["title"].map(type).eq(str).all()
    assert ds.sources and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in ds.sources.values())


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: readers must leave it unchanged."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


def mirror(shared: Path, root: Path, *folders: str) -> Path:
    """Symlink the files of ``folders`` of the shared data under ``root`` (so a test can replace one)."""
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for src in (shared / folder).iterdir():
            if src.is_file():
                (root / folder / src.name).symlink_to(src)
    return root


def replace_bytes(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Replace a (possibly symlinked) file by an edited private copy."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(edit(data))


def edit_line(number: int, edit: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """An edit of the 1-based line ``number`` (line endings are kept)."""

    def apply(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[number - 1] = edit(lines[number - 1])
        return b"\n".join(lines)

    return apply


def replace_parquet(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame | pa.Table]) -> None:
    frame = pq.read_table(path).to_pandas()
    result = edit(frame)
    table = result if isinstance(result, pa.Table) else pa.Table.from_pandas(result, preserve_index=False)
    path.unlink()
    pq.write_table(table, path)


def set_list(row: int, column: str, value: list) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """An edit of a list column that sets the 0-based ``row`` to ``value``."""

    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = [list(v) for v in frame[column]]
        frame.at[row, column] = value
        return frame

    return edit


def expect_error(
    read: Callable[[Path], Dataset],
    root: Path,
    file: str,
    line: int | None,
    field: str | None,
    match: str = "",
) -> DataFormatError:
    before = snapshot(root)
    with pytest.raises(DataFormatError) as info:
        read(root)
    err = info.value
    assert Path(err.path).name == Path(file).name, str(err)
    assert (err.line, err.field) == (line, field), str(err)
    assert re.search(match, err.message), str(err)
    assert snapshot(root) == before, "a reader wrote files"
    return err


# ------------------------------------------------------------------------------------------------------------
# Real data: loaded once per module


@pytest.fixture(scope="module")
def ml100k(shared_data: Path) -> Dataset:
    return read_ml100k(shared_data)


@pytest.fixture(scope="module")
def lastfm(shared_data: Path) -> Dataset:
    return read_lastfm(shared_data)


@pytest.fixture(scope="module")
def ml1m_ctr(shared_data: Path) -> Dataset:
    return read_collm_ml1m(shared_data)


@pytest.fixture(scope="module")
def movielens_test(shared_data: Path) -> Dataset:
    return read_movielens_llara_test(shared_data)


@pytest.fixture(scope="module")
def steam_test(shared_data: Path) -> Dataset:
    return read_steam_llara_test(shared_data)


PINNED = {
    "ml-100k/u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "ml-100k/u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "ml-100k/u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
}


def test_ml100k_counts_ids_and_text(ml100k: Dataset) -> None:
    assert_well_formed(ml100k)
    assert (ml100k.name, ml100k.domain) == ("ml-100k", "movie")
    assert (ml100k.n_users, ml100k.n_items, len(ml100k.interactions)) == (943, 1682, 100_000)
    assert ml100k.items["raw_id"].tolist() == [str(i) for i in range(1, 1683)]  # raw 1 -> 0
    assert ml100k.users["raw_id"].tolist() == [str(i) for i in range(1, 944)]
    titles = ml100k.items.set_index("raw_id")["title"]
    assert titles["1633"] == "Á köldum klaka (Cold Fever) (1994)"
    assert titles["543"] == "Misérables, Les (1995)"
    assert titles["267"] == "unknown"
    toy = ml100k.items.iloc[0]
    assert (toy["title"], toy["genres"], toy["release_date"]) == (
        "Toy Story (1995)",
        "Animation|Children's|Comedy",
        "01-Jan-1995",
    )
    first = ml100k.users.iloc[0]
    assert (first["age"], first["gender"], first["occupation"], first["zip_code"]) == (
        24,
        "M",
        "technician",
        "85711",
    )
    assert ml100k.interactions["rating"].value_counts().sort_index().tolist() == [
        6110,
        11370,
        27145,
        34174,
        21201,
    ]
    # u.data line 1 is "196 242 3 881250949": user 196 -> 195, item 242 -> 241.
    row = ml100k.interactions.query("user_id == 195 and item_id == 241")
    assert row[["rating", "timestamp"]].values.tolist() == [[3.0, 881250949]]
    for name, digest in PINNED.items():
        assert ml100k.sources[name] == digest


def test_ml100k_ties_keep_line_order(ml100k: Dataset, shared_data: Path) -> None:
    raw = pd.read_csv(shared_data / "ml-100k/u.data", sep="\t", names=["u", "i", "r", "t"])
    expected = raw.assign(u=raw.u - 1, i=raw.i - 1).sort_values(["u", "t"], kind="stable")
    assert ml100k.interactions["item_id"].tolist() == expected["i"].tolist()


# LastFM


def test_lastfm_split_counts_and_schema(lastfm: Dataset) -> None:
    assert_well_formed(lastfm)
    assert (lastfm.name, lastfm.domain, lastfm.n_items, lastfm.pad_id) == ("lastfm", "artist", 4606, 4606)
    parts = lastfm.presplit["next-item"]
    assert {k: len(v) for k, v in parts.items()} == {"train": 50_800, "valid": 122, "test": 122}
    for frame in parts.values():
        assert list(frame.columns) == ["user_id", "history", "target"]
        assert frame["history"].map(len).max() <= 10
        assert all(h.dtype == np.int64 for h in frame["history"])
    # Rows are kept as published: 976 first rows with an empty history, 2,928 rows shorter than 3.
    lengths = parts["train"]["history"].map(len)
    assert (lengths == 0).sum() == 976 and (lengths < 3).sum() == 2928
    assert parts["valid"]["history"].map(len).min() == 3 and parts["test"]["history"].map(len).min() == 3


def test_lastfm_user_reconstruction(lastfm: Dataset) -> None:
    parts = lastfm.presplit["next-item"]
    train_users = parts["train"]["user_id"].to_numpy()
    assert train_users.max() + 1 == 976 and (np.diff(train_users) >= 0).all()
    assert lastfm.n_users == 976 + 122 + 122
    assert parts["valid"]["user_id"].tolist() == list(range(976, 1098))
    assert parts["test"]["user_id"].tolist() == list(range(1098, 1220))
    # Every published row is the 10-item window before a position of its user's reconstructed sequence.
    sequences = lastfm.interactions.groupby("user_id")["item_id"].agg(list)
    position = parts["train"].groupby("user_id").cumcount().to_numpy()
    for user, pos, history, target in zip(
        train_users, position, parts["train"]["history"], parts["train"]["target"], strict=True
    ):
        seq = sequences[user]
        assert seq[pos] == target and list(history) == seq[max(0, pos - 10) : pos]
    n_eval = sum(len(h) + 1 for p in ("valid", "test") for h in parts[p]["history"])
    assert len(lastfm.interactions) == 50_800 + n_eval
    assert lastfm.interactions["rating"].isna().all()


def test_lastfm_items_and_tags(lastfm: Dataset, shared_data: Path) -> None:
    names = (shared_data / "llara-splits/lastfm/id2name.txt").read_text("utf-8").splitlines()
    assert lastfm.items["title"].tolist() == [n.split("::", 1)[1] for n in names]
    assert lastfm.items["raw_id"].tolist() == [str(i) for i in range(4606)]
    first = lastfm.items.iloc[0]
    assert (first["title"], first["hetrec_id"]) == ("Morcheeba", "52")
    assert first["tags"] == "trip-hop|chillout|downtempo|electronic|female vocalists"
    assert lastfm.items["tags"].str.split("|").map(len).max() <= 5
    weird = lastfm.items[lastfm.items["title"] == "Weird Al Yankovic"].iloc[0]
    assert weird["hetrec_id"] != "" and weird["tags"] != ""  # HetRec spells it '"Weird Al" Yankovic'


def test_match_names_stages() -> None:
    matched, stats = match_names(["A", "b", "Weird Al X", "c", "none"], ["A", "B", '"Weird Al" X', "C", "c "])
    assert matched == ["A", "B", '"Weird Al" X', "C", None]
    assert stats == {"exact": 1, "case-insensitive": 2, "quotes removed": 1, "unmatched": 1}
    # A case-insensitive key shared by two HetRec names is ambiguous and left unmatched.
    assert match_names(["abc"], ["ABC", "Abc"])[0] == [None]


# ml-1m-ctr


def test_ml1m_ctr_counts_and_schema(ml1m_ctr: Dataset) -> None:
    assert_well_formed(ml1m_ctr)
    assert (ml1m_ctr.name, ml1m_ctr.domain, ml1m_ctr.n_users, ml1m_ctr.n_items) == (
        "ml-1m-ctr",
        "movie",
        838,
        3255,
    )
    parts = ml1m_ctr.presplit["ctr"]
    assert {k: len(v) for k, v in parts.items()} == {"train": 33_891, "valid": 10_401, "test": 7_331}
    columns = ["user_id", "target", "label", "rating", "timestamp", "history", "history_ratings"]
    for frame in parts.values():
        assert list(frame.columns) == columns
        assert str(frame["label"].dtype) == "int8" and frame["rating"].isna().all()
        assert (frame["history"].map(len) == frame["history_ratings"].map(len)).all()
        assert all(np.isnan(r).all() for r in frame["history_ratings"])
    assert round(parts["train"]["label"].mean(), 3) == 0.537
    assert len(ml1m_ctr.interactions) == 33_891 + 10_401 + 7_331
    assert str(ml1m_ctr.interactions["label"].dtype) == "int8"


def test_ml1m_ctr_id_mapping(ml1m_ctr: Dataset, shared_data: Path) -> None:
    # iid/uid are 1-based and contiguous; 0 is only the leading padding of `his`, so iid i -> i - 1.
    assert ml1m_ctr.items["raw_id"].tolist() == [str(i) for i in range(1, 3256)]
    assert ml1m_ctr.users["raw_id"].tolist() == [str(u) for u in range(1, 839)]
    raw = pd.read_parquet(shared_data / "collm-ml-1m/valid_ood2.parquet")
    frame = ml1m_ctr.presplit["ctr"]["valid"]
    assert (frame["target"].to_numpy() == raw["iid"].to_numpy() - 1).all()
    for got, his in zip(frame["history"][:200], raw["his"][:200], strict=True):
        assert list(got) == [h - 1 for h in his[1:]]
    titles = ml1m_ctr.items["title"].to_numpy()
    assert (titles[frame["target"].to_numpy()] == raw["title"].to_numpy()).all()
    assert titles[0] == "Shawshank Redemption, The (1994)"


# LLaRA evaluation-only splits


def test_movielens_llara_test(movielens_test: Dataset, shared_data: Path) -> None:
    ds = movielens_test
    assert_well_formed(ds)
    assert (ds.domain, ds.n_items, ds.pad_id) == ("movie", 1682, 1682)
    parts = ds.presplit["next-item"]
    assert {k: len(v) for k, v in parts.items()} == {"valid": 94, "test": 95}
    assert ds.n_users == 189 and parts["test"]["user_id"].tolist() == list(range(94, 189))
    assert (parts["valid"]["history"].map(len) == 9).sum() == 2 and (
        parts["test"]["history"].map(len) == 10
    ).all()
    assert ds.items["title"].iloc[1632] == "Á köldum klaka (Cold Fever) (1994)"
    raw = pd.read_parquet(shared_data / "llara-splits/movielens/Val_data.parquet")
    assert list(parts["valid"]["history"][0]) == list(raw["seq_item"][0])
    assert parts["valid"]["target"].tolist() == raw["next_item"].tolist()
    first = ds.interactions[ds.interactions["user_id"] == 0]
    assert first["rating"].tolist() == list(raw["seq_rating"][0]) + [raw["next_rating"][0]]


def test_steam_llara_test(steam_test: Dataset) -> None:
    assert_well_formed(steam_test)
    assert (steam_test.domain, steam_test.n_items, steam_test.n_users) == ("game", 3581, 1194)
    test = steam_test.presplit["next-item"]["test"]
    assert len(test) == 1194 and (test["history"].map(len) == 0).sum() == 1
    assert steam_test.items["title"].iloc[354] == "Depths of Fear :: Knossos"  # only the first '::' splits


# Registry


def test_registry(shared_data: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_dataset("ml-100k", shared_data).n_users == 943
    assert load_dataset("steam-llara-test", shared_data).name == "steam-llara-test"
    with pytest.raises(ValueError, match="known: ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, lastfm, ml-1m-ctr"):
        load_dataset("ml-30m", shared_data)
    with pytest.raises(FileNotFoundError, match="ml-20m/ratings.csv"):  # a known name whose files are absent
        load_dataset("ml-20m", shared_data)
    assert "recbole:PATH/NAME" in known_datasets()
    monkeypatch.chdir(fixtures_dir)
    assert load_dataset("recbole:recbole/tiny").n_items == 4
    assert load_dataset(f"recbole:{fixtures_dir / 'recbole' / 'minimal'}").n_users == 2
    monkeypatch.setenv("RECADAPT_DATA", str(shared_data))
    assert load_dataset("steam-llara-test").n_items == 3581


# ------------------------------------------------------------------------------------------------------------
# Bad input: ml-100k


@pytest.fixture
def ml100k_copy(shared_data: Path, tmp_path: Path) -> Path:
    return mirror(shared_data, tmp_path, "ml-100k")


ML100K_CASES = [
    # (file, line, edit, field, message)
    ("u.data", 5, lambda b: b"\t".join(b.split(b"\t")[:2]), "rating", "truncated"),
    ("u.data", 3, lambda b: b"1\t1\tx\t881250949", "rating", "'x' is not an integer"),
    ("u.data", 42, lambda b: b"1\t99999\t3\t881250949", "item_id", "unknown item"),
    ("u.data", 43, lambda b: b"9999\t1\t3\t881250949", "user_id", "unknown user"),
    ("u.data", 44, lambda b: b"1\t1\t9\t881250949", "rating", "outside 1..5"),
    ("u.data", 45, lambda b: b + b"\t0", "timestamp", "too many"),
    ("u.user", 7, lambda b: b + b"|extra", "zip_code", "too many"),
    ("u.user", 10, lambda b: b"10|53|M|law\xffyer|90703", "occupation", "byte 0xff at column 12"),
    ("u.user", 11, lambda b: b"11|x|M|other|12345", "age", "not an integer"),
    ("u.item", 100, lambda b: b.rsplit(b"|", 1)[0], "Western", "truncated"),
    ("u.item", 101, lambda b: b[:-1] + b"7", "Western", "0 or 1"),
    ("u.item", 102, lambda b: b"1" + b[3:], "item_id", "duplicate"),
    ("u.genre", 3, lambda b: b"Action|2", "genre", "repeated"),
]


@pytest.mark.parametrize(
    ("file", "line", "edit", "field", "match"), ML100K_CASES, ids=[str(c[:2]) for c in ML100K_CASES]
)
def test_ml100k_bad_input(
    ml100k_copy: Path, file: str, line: int, edit: Callable[[bytes], bytes], field: str, match: str
) -> None:
    replace_bytes(ml100k_copy / "ml-100k" / file, edit_line(line, edit))
    expect_error(read_ml100k, ml100k_copy, file, line, field, match)


def test_ml100k_truncated_file(ml100k_copy: Path) -> None:
    """A download cut mid-line: the last line keeps only its user id and has no line ending."""

    def cut(data: bytes) -> bytes:
        start = data.rstrip(b"\n").rindex(b"\n") + 1
        return data[:start] + data[start:].split(b"\t")[0]

    replace_bytes(ml100k_copy / "ml-100k" / "u.data", cut)
    expect_error(read_ml100k, ml100k_copy, "u.data", 100_000, "item_id", "truncated")


def test_ml100k_blank_lines_are_counted(ml100k_copy: Path) -> None:
    """Blank lines are skipped but still count in the reported line number."""
    replace_bytes(ml100k_copy / "ml-100k" / "u.data", lambda b: b"\n\n" + b + b"\n")
    assert read_ml100k(ml100k_copy, verify=False).n_users == 943  # an edited copy: its hash differs
    replace_bytes(ml100k_copy / "ml-100k" / "u.data", edit_line(6, lambda b: b"1\t1\t3"))
    expect_error(read_ml100k, ml100k_copy, "u.data", 6, "timestamp", "truncated")


def test_ml100k_missing_file(ml100k_copy: Path) -> None:
    (ml100k_copy / "ml-100k" / "u.user").unlink()
    with pytest.raises(FileNotFoundError, match="u.user"):
        read_ml100k(ml100k_copy)


@pytest.fixture(scope="module")
def mini_ml100k(shared_data: Path) -> dict[str, bytes]:
    """A small consistent ML-100K: full catalogue files, the first 300 ratings."""
    files = {n: (shared_data / "ml-100k" / n).read_bytes() for n in ("u.genre", "u.item", "u.user")}
    files["u.data"] = b"".join((shared_data / "ml-100k/u.data").read_bytes().splitlines(keepends=True)[:300])
    return files


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ml100k_random_corruption(mini_ml100k: dict[str, bytes], data: st.DataObject) -> None:
    """A single changed byte anywhere gives a valid parse or a DataFormatError, never another exception."""
    name = data.draw(st.sampled_from(sorted(mini_ml100k)))
    content = bytearray(mini_ml100k[name])
    pos = data.draw(st.integers(0, len(content) - 1))
    content[pos] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ml-100k"
        folder.mkdir()
        for n, b in mini_ml100k.items():
            (folder / n).write_bytes(bytes(content) if n == name else b)
        try:
            read_ml100k(Path(tmp)).validate()
        except DataFormatError as err:
            assert Path(err.path).parent == folder, str(err)  # a bad u.item may surface in u.data


# ------------------------------------------------------------------------------------------------------------
# Bad input: LLaRA splits (LastFM, Steam, MovieLens) and HetRec


@pytest.fixture
def llara_copy(shared_data: Path, tmp_path: Path) -> Path:
    return mirror(
        shared_data,
        tmp_path,
        "llara-splits/lastfm",
        "llara-splits/steam",
        "llara-splits/movielens",
        "lastfm-hetrec2011-2k",
        "ml-100k",
    )


LLARA_PARQUET_CASES = [
    # (reader, file, edit, line, field, message)
    (
        read_lastfm,
        "lastfm/train_data.parquet",
        set_list(7, "seq", [0, 1, 2, 3, 4, 5, 9999, 4606, 4606, 4606]),
        8,
        "seq",
        "unknown item id 9999",
    ),
    (read_lastfm, "lastfm/Val_data.parquet", set_list(4, "seq", []), 5, "seq", "empty list"),
    (read_lastfm, "lastfm/Test_data.parquet", set_list(2, "seq", [1, 2, 3]), 3, "seq", "expected 10 entries"),
    (
        read_lastfm,
        "lastfm/Test_data.parquet",
        set_list(3, "seq", [1, 4606, 3] + [4606] * 7),
        4,
        "seq",
        "after padding",
    ),
    (
        read_lastfm,
        "lastfm/Val_data.parquet",
        lambda f: f.assign(next=f["next"].where(f.index != 9, 4606)),
        10,
        "next",
        "unknown item id 4606",
    ),
    (
        read_lastfm,
        "lastfm/Val_data.parquet",
        lambda f: f.assign(len_seq=f["len_seq"] + (f.index == 0)),
        1,
        "len_seq",
        "real items",
    ),
    (
        read_lastfm,
        "lastfm/Val_data.parquet",
        lambda f: f.drop(columns=["next"]),
        None,
        "next",
        "missing column",
    ),
    (
        read_steam_llara_test,
        "steam/Test_data.parquet",
        lambda f: f.assign(next=f["next"].astype(str)),
        None,
        "next",
        "integer column",
    ),
    (
        read_movielens_llara_test,
        "movielens/Test_data.parquet",
        lambda f: f.assign(seq_rating=[[str(x) for x in r] for r in f["seq_rating"]]),
        None,
        "seq_rating",
        "list of numbers",
    ),
    (
        read_movielens_llara_test,
        "movielens/Val_data.parquet",
        set_list(5, "seq_item", [0] * 9 + [1683]),
        6,
        "seq_item",
        "unknown item id 1683",
    ),
]


@pytest.mark.parametrize(
    ("read", "file", "edit", "line", "field", "match"),
    LLARA_PARQUET_CASES,
    ids=[f"{c[1]}-{c[4]}-{i}" for i, c in enumerate(LLARA_PARQUET_CASES)],
)
def test_llara_bad_parquet(
    llara_copy: Path, read: Reader, file: str, edit: FrameEdit, line: int | None, field: str, match: str
) -> None:
    replace_parquet(llara_copy / "llara-splits" / file, edit)
    expect_error(read, llara_copy, file, line, field, match)


@pytest.mark.parametrize("reader", [read_lastfm, read_steam_llara_test])
def test_llara_truncated_parquet(llara_copy: Path, reader: Reader) -> None:
    folder = "lastfm" if reader is read_lastfm else "steam"
    replace_bytes(llara_copy / "llara-splits" / folder / "Test_data.parquet", lambda b: b[: len(b) // 2])
    expect_error(reader, llara_copy, "Test_data.parquet", None, None, "not a readable Parquet")


ID2NAME_CASES = [
    (12, lambda b: b.replace(b"::", b"::\xc3(", 1), "name", "not valid utf-8"),
    (13, lambda b: b.replace(b"::", b":", 1), "name", "truncated"),
    (14, lambda b: b"99::Gap", "id", "expected id 13"),
    (15, lambda b: b"x::Name", "id", "not an integer"),
]


@pytest.mark.parametrize(("line", "edit", "field", "match"), ID2NAME_CASES)
def test_llara_bad_id2name(llara_copy: Path, line: int, edit: ByteEdit, field: str, match: str) -> None:
    replace_bytes(llara_copy / "llara-splits/steam/id2name.txt", edit_line(line, edit))
    expect_error(read_steam_llara_test, llara_copy, "id2name.txt", line, field, match)


def test_llara_id_outside_id2name(llara_copy: Path) -> None:
    """With the last name gone, the published padding id 3581 lies outside the catalogue."""
    replace_bytes(
        llara_copy / "llara-splits/steam/id2name.txt", lambda b: b"\n".join(b.split(b"\n")[:-2]) + b"\n"
    )
    with pytest.raises(DataFormatError) as info:
        read_steam_llara_test(llara_copy)
    err = info.value
    assert Path(err.path).name == "Test_data.parquet" and err.field == "seq" and err.line is not None
    assert "unknown item id 3581" in err.message


HETREC_CASES = [
    ("artists.dat", 20, lambda b: b.replace(b"\t", b"\t\xfe", 1), "name", "0xfe"),
    ("artists.dat", 21, lambda b: b.split(b"\t")[0], "name", "truncated"),
    ("user_taggedartists.dat", 30, lambda b: b"2\t52\tx\t1\t4\t2009\r", "tagID", "not an integer"),
    ("user_taggedartists.dat", 31, lambda b: b"2\t52\t99999\t1\t4\t2009\r", "tagID", "unknown tag id"),
    ("tags.dat", 40, lambda b: b.rstrip(b"\r") + b"\tmore\r", "tagValue", "too many"),
    ("tags.dat", 41, lambda b: b.replace(b"\t", b"\tx\ry", 1), "tagValue", "carriage return"),
]


@pytest.mark.parametrize(("file", "line", "edit", "field", "match"), HETREC_CASES)
def test_hetrec_bad_input(
    llara_copy: Path, file: str, line: int, edit: ByteEdit, field: str, match: str
) -> None:
    replace_bytes(llara_copy / "lastfm-hetrec2011-2k" / file, edit_line(line, edit))
    expect_error(read_lastfm, llara_copy, file, line, field, match)


# ------------------------------------------------------------------------------------------------------------
# Bad input: CoLLM ml-1m-ctr


@pytest.fixture
def collm_copy(shared_data: Path, tmp_path: Path) -> Path:
    return mirror(shared_data, tmp_path, "collm-ml-1m")


def _two(frame: pd.DataFrame, row: int, his: list[int], titles: list[str]) -> pd.DataFrame:
    frame = set_list(row, "his", his)(frame)
    return set_list(row, "his_title", titles)(frame)


COLLM_CASES = [
    ("train", set_list(4, "his", []), 5, "his", "empty history"),
    ("valid", lambda f: _two(f, 2, [5, 1], ["x", "y"]), 3, "his", "not the padding 0"),
    (
        "test",
        lambda f: _two(f, 3, [0, 0, 1], ["", "", "Shawshank Redemption, The (1994)"]),
        4,
        "his",
        "padding 0 inside",
    ),
    (
        "train",
        lambda f: set_list(6, "his_title", [*f.at[6, "his_title"], "x"])(f),
        7,
        "his_title",
        "length differs",
    ),
    (
        "test",
        lambda f: f.assign(title=f["title"].where(f.index != 8, "Another Title")),
        9,
        "title",
        "titled 'Another Title'",
    ),
    ("valid", lambda f: f.assign(label=f["label"].astype(str)), None, "label", "numeric column"),
    ("valid", lambda f: f.assign(label=f["label"].where(f.index != 11, 2)), 12, "label", "expected 0 or 1"),
    ("train", lambda f: f.drop(columns=["title"]), None, "title", "missing column"),
    ("test", lambda f: f.assign(iid=f["iid"].where(f.index != 0, -3)), 1, "iid", "negative id"),
]


@pytest.mark.parametrize(("part", "edit", "line", "field", "match"), COLLM_CASES)
def test_collm_bad_input(
    collm_copy: Path, part: str, edit: FrameEdit, line: int | None, field: str, match: str
) -> None:
    file = f"{part}_ood2.parquet"
    replace_parquet(collm_copy / "collm-ml-1m" / file, edit)
    expect_error(read_collm_ml1m, collm_copy, file, line, field, match)


def test_collm_truncated_parquet(collm_copy: Path) -> None:
    replace_bytes(collm_copy / "collm-ml-1m/test_ood2.parquet", lambda b: b[:1000])
    expect_error(read_collm_ml1m, collm_copy, "test_ood2.parquet", None, None, "not a readable Parquet")


def test_sources_hash_the_files_read(ml1m_ctr: Dataset, shared_data: Path) -> None:
    for name, digest in ml1m_ctr.sources.items():
        assert hashlib.sha256((shared_data / name).read_bytes()).hexdigest() == digest
    assert sorted(ml1m_ctr.sources) == [f"collm-ml-1m/{p}_ood2.parquet" for p in ("test", "train", "valid")]


# ------------------------------------------------------------------------------------------------------------
# Recorded SHA-256 of the published files

RECORDED = ML100K_SHA256 | HETREC_SHA256 | LLARA_SHA256 | COLLM_SHA256


def expect_hash_mismatch(read: Reader, root: Path, file: str) -> None:
    err = expect_error(read, root, file, None, None, "does not match the recorded")
    assert "truncated or modified copy" in err.message and "verify=False" in err.message
    assert "RECADAPT_NO_VERIFY=1" in err.message and "--no-verify" in err.message


def test_truncated_u_data_is_refused_unless_verify_is_off(ml100k_copy: Path) -> None:
    """Cut at a line boundary, u.data still parses: only its hash tells it is not the published file."""
    replace_bytes(
        ml100k_copy / "ml-100k" / "u.data", lambda b: b"".join(b.splitlines(keepends=True)[:50_000])
    )
    expect_hash_mismatch(read_ml100k, ml100k_copy, "u.data")
    assert len(read_ml100k(ml100k_copy, verify=False).interactions) == 50_000


def test_half_an_artists_dat_is_refused_unless_verify_is_off(llara_copy: Path) -> None:
    replace_bytes(llara_copy / "lastfm-hetrec2011-2k" / "artists.dat", lambda b: b[: len(b) // 2])
    expect_hash_mismatch(read_lastfm, llara_copy, "artists.dat")
    assert 0 < (read_lastfm(llara_copy, verify=False).items["hetrec_id"] != "").sum() < 4000


def test_rewritten_parquet_is_refused(collm_copy: Path) -> None:
    replace_parquet(collm_copy / "collm-ml-1m/test_ood2.parquet", lambda f: f.iloc[:-100])
    expect_hash_mismatch(read_collm_ml1m, collm_copy, "test_ood2.parquet")
    assert len(read_collm_ml1m(collm_copy, verify=False).presplit["ctr"]["test"]) == 7_331 - 100


def test_load_dataset_verification_opt_outs(ml100k_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replace_bytes(ml100k_copy / "ml-100k" / "u.data", lambda b: b[: b.rindex(b"\n", 0, len(b) - 1) + 1])
    monkeypatch.delenv(NO_VERIFY_ENV, raising=False)
    with pytest.raises(DataFormatError, match=r"u\.data: SHA-256 .* does not match the recorded"):
        load_dataset("ml-100k", ml100k_copy)
    assert len(load_dataset("ml-100k", ml100k_copy, verify=False).interactions) == 99_999
    monkeypatch.setenv(NO_VERIFY_ENV, "1")
    assert len(load_dataset("ml-100k", ml100k_copy).interactions) == 99_999
    monkeypatch.setenv(NO_VERIFY_ENV, "0")
    with pytest.raises(DataFormatError, match="does not match the recorded"):
        load_dataset("ml-100k", ml100k_copy)


@pytest.mark.parametrize("fixture", ["ml100k", "lastfm", "ml1m_ctr", "movielens_test", "steam_test"])
def test_every_file_read_has_a_recorded_hash(fixture: str, request: pytest.FixtureRequest) -> None:
    """No file escapes the check (the shared copy verified, so the recorded values are its hashes)."""
    sources = request.getfixturevalue(fixture).sources
    assert set(sources) <= set(RECORDED), sorted(set(sources) - set(RECORDED))
    assert all(RECORDED[name] == digest for name, digest in sources.items())


def test_recorded_hashes_match_the_provenance_tables(shared_data: Path) -> None:
    """Where a PROVENANCE file lists a file read as is (not a Parquet conversion), it lists the same hash."""
    for name, digest in RECORDED.items():
        if name.endswith(".parquet"):
            continue
        folder = name.split("/")[0]
        provenance = "".join(p.read_text("utf-8") for p in (shared_data / folder).glob("PROVENANCE*.md"))
        assert f"| {name.split('/', 1)[1]} |" in provenance and digest in provenance, name
