"""MovieLens 1M/10M/20M/25M readers on small files written in each GroupLens format, and their downloader."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from recadapt.data import fetch as fetch_module
from recadapt.data.fetch import FetchError, fetch_dataset
from recadapt.data.readers import read_ml1m, read_ml10m, read_ml20m, read_ml25m
from recadapt.data.readers._text import RESERVED_SEPARATOR, SeparatorRewriter
from recadapt.data.registry import known_datasets, load_dataset
from recadapt.data.schema import Dataset
from recadapt.errors import DataFormatError
from recadapt.io import sha256_file

ML1M_RATINGS = b"2::10::4::978301968\n1::10::5::978300760\n1::3::3::978302109\n1::10::2::978300760\n"
# latin-1, as GroupLens ships ML-1M: 0xe9 is "e acute" (invalid UTF-8 on its own)
ML1M_MOVIES = (
    b"3::Mis\xe9rables, Les (1995)::Drama|Musical\n"
    b"10::Toy Story (1995)::Animation|Children's|Comedy\n"
    b"99::Never Rated (1990)::Drama\n"
)
ML1M_USERS = b"2::M::56::16::70072\n1::F::1::10::48067\n7::M::25::12::55117\n"

ML10M_RATINGS = b"5::20::4.5::1000\n5::7::0.5::900\n"
ML10M_MOVIES = (
    "7::Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)::Comedy|Romance\n20::Heat (1995)::Action\n"
)

RATINGS_CSV = b"userId,movieId,rating,timestamp\n30,2,3.5,200\n10,1,4.0,150\n30,1,5.0,100\n"
MOVIES_CSV = (
    b"movieId,title,genres\n"
    b'1,"American President, The (1995)",Comedy|Drama|Romance\n'
    b'2,"""Great Performances"" Cats (1998)",(no genres listed)\n'
    b"3,Unrated (2000),Drama\n"
)


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder.parent


def ml1m_root(tmp_path: Path, **change: bytes) -> Path:
    files = {"ratings.dat": ML1M_RATINGS, "movies.dat": ML1M_MOVIES, "users.dat": ML1M_USERS}
    return write(tmp_path / "ml-1m", files | {k.replace("_", "."): v for k, v in change.items()})


def csv_root(tmp_path: Path, folder: str = "ml-25m", **change: bytes) -> Path:
    files = {"ratings.csv": RATINGS_CSV, "movies.csv": MOVIES_CSV}
    return write(tmp_path / folder, files | {k.replace("_", "."): v for k, v in change.items()})


def frame_rows(ds: Dataset, table: str) -> list[tuple]:
    return [tuple(row) for row in getattr(ds, table).itertuples(index=False)]


def expect_error(
    read: Callable[[Path], Dataset], root: Path, file: str, line: int | None, field: str | None, match: str
) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        read(root)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == (file, line, field), str(err)
    assert match in err.message, str(err)
    where = f"{file}:{line}:" if line is not None else f"{file}:"
    assert where in str(err) and (field is None or f"field '{field}'" in str(err)), str(err)
    return err


# ------------------------------------------------------------------------------------------------------------
# Reading


def test_ml1m_ids_sort_titles_genres_and_users(tmp_path: Path) -> None:
    ds = read_ml1m(ml1m_root(tmp_path))
    assert (ds.name, ds.domain) == ("ml-1m", "movie")
    # Only rated movies, in raw id order (99 is never rated); latin-1 decoded.
    assert frame_rows(ds, "items") == [
        (0, "3", "Misérables, Les (1995)", "Drama|Musical"),
        (1, "10", "Toy Story (1995)", "Animation|Children's|Comedy"),
    ]
    # Rated users in raw id order (7 has no rating), README codes turned into text.
    assert frame_rows(ds, "users") == [
        (0, "1", "F", "under 18", "K-12 student", "48067"),
        (1, "2", "M", "56+", "self-employed", "70072"),
    ]
    # Sorted by (user, time); the tie at 978300760 keeps the line order (rating 5 before 2).
    assert frame_rows(ds, "interactions") == [
        (0, 1, 5.0, 978300760),
        (0, 1, 2.0, 978300760),
        (0, 0, 3.0, 978302109),
        (1, 1, 4.0, 978301968),
    ]
    assert [str(ds.interactions[c].dtype) for c in ds.interactions.columns] == ["int64"] * 2 + [
        "float64",
        "int64",
    ]
    folder = tmp_path / "ml-1m"
    assert ds.sources == {
        f"ml-1m/{n}": sha256_file(folder / n) for n in ("movies.dat", "ratings.dat", "users.dat")
    }


def test_ml10m_half_stars_and_utf8_titles(tmp_path: Path) -> None:
    root = write(
        tmp_path / "ml-10M100K", {"ratings.dat": ML10M_RATINGS, "movies.dat": ML10M_MOVIES.encode("utf-8")}
    )
    ds = read_ml10m(root)
    assert frame_rows(ds, "items") == [
        (0, "7", "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", "Comedy|Romance"),
        (1, "20", "Heat (1995)", "Action"),
    ]
    assert frame_rows(ds, "users") == [(0, "5")]
    assert frame_rows(ds, "interactions") == [(0, 0, 0.5, 900), (0, 1, 4.5, 1000)]
    assert sorted(ds.sources) == ["ml-10M100K/movies.dat", "ml-10M100K/ratings.dat"]


@pytest.mark.parametrize(("read", "folder"), [(read_ml20m, "ml-20m"), (read_ml25m, "ml-25m")])
def test_csv_quoted_titles(tmp_path: Path, read: Callable[[Path], Dataset], folder: str) -> None:
    ds = read(csv_root(tmp_path, folder))
    assert ds.name == folder
    assert frame_rows(ds, "items") == [
        (0, "1", "American President, The (1995)", "Comedy|Drama|Romance"),
        (1, "2", '"Great Performances" Cats (1998)', ""),
    ]
    assert frame_rows(ds, "users") == [(0, "10"), (1, "30")]
    assert frame_rows(ds, "interactions") == [(0, 0, 4.0, 150), (1, 0, 5.0, 100), (1, 1, 3.5, 200)]


def test_registry_names(tmp_path: Path) -> None:
    assert {"ml-1m", "ml-10m", "ml-20m", "ml-25m"} <= set(known_datasets())
    assert load_dataset("ml-1m", ml1m_root(tmp_path)).n_items == 2
    assert load_dataset("ml-25m", csv_root(tmp_path), verify=False).n_users == 2


# ------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("ratings", "line", "field", "match"),
    [
        (b"1::10::5::978300760\n2::10::x::978301968\n", 2, "rating", "'x' is not a number"),
        (b"1::10::5::978300760\n1::3::3\n", 2, "timestamp", "truncated line: expected 4 '::'-separated"),
        (b"1::10::5::9\n1::3::3::9::7\n", 2, "timestamp", "too many fields"),
        (b"1::10::5::9\n\n1::3::4.5::9\n", 3, "rating", "rating 4.5 is not one of whole stars 1..5"),
        (b"1::10::5::9\n1::11::3::9\n", 2, "item_id", "unknown movie id 11"),
        (b"1::10::5::9\n8::10::3::9\n", 2, "user_id", "unknown user id 8"),
        (b"1::10::5::9\n1::3::3::9\xff\n", 2, "timestamp", "byte 0xff at column 11 is not valid utf-8"),
    ],
)
def test_ml1m_bad_ratings_line(tmp_path: Path, ratings: bytes, line: int, field: str, match: str) -> None:
    expect_error(read_ml1m, ml1m_root(tmp_path, ratings_dat=ratings), "ratings.dat", line, field, match)


def test_ml1m_bad_catalogue_lines(tmp_path: Path) -> None:
    movies = ML1M_MOVIES + b"3::Again (1995)::Drama\n"
    expect_error(
        read_ml1m, ml1m_root(tmp_path / "a", movies_dat=movies), "movies.dat", 4, "item_id", "duplicate id 3"
    )
    users = b"1::F::1::10::48067\n2::M::30::16::70072\n"
    expect_error(
        read_ml1m, ml1m_root(tmp_path / "b", users_dat=users), "users.dat", 2, "age", "unknown age code 30"
    )
    users = b"1::F::1::21::48067\n2::M::56::16::70072\n"
    expect_error(
        read_ml1m,
        ml1m_root(tmp_path / "c", users_dat=users),
        "users.dat",
        1,
        "occupation",
        "unknown occupation",
    )
    reserved = ML1M_MOVIES.replace(b"Toy Story", b"Toy\x1fStory")
    expect_error(
        read_ml1m, ml1m_root(tmp_path / "d", movies_dat=reserved), "movies.dat", 2, None, "control byte 0x1f"
    )


@pytest.mark.parametrize(
    ("name", "data", "line", "field", "match"),
    [
        (
            "ratings_csv",
            RATINGS_CSV.replace(b"10,1,4.0", b"u10,1,4.0"),
            3,
            "user_id",
            "'u10' is not an integer",
        ),
        ("ratings_csv", RATINGS_CSV + b"30,3,6.0,300\n", 5, "rating", "rating 6 is not one of half stars"),
        (
            "ratings_csv",
            RATINGS_CSV + b"30,3,4.25,300\n",
            5,
            "rating",
            "rating 4.25 is not one of half stars",
        ),
        ("ratings_csv", RATINGS_CSV.replace(b"userId,", b"user,"), 1, None, "expected the header"),
        (
            "movies_csv",
            MOVIES_CSV.replace(b'(1995)",Comedy', b"(1995),Comedy"),
            2,
            "title",
            "unterminated quoted value",
        ),
        (
            "movies_csv",
            MOVIES_CSV.replace(b'(1998)",', b'(1998)"x,'),
            3,
            "title",
            "text after the closing quote",
        ),
        ("movies_csv", MOVIES_CSV + b"4,Too,Many,Fields\n", 5, "genres", "too many fields"),
    ],
)
def test_csv_bad_line(
    tmp_path: Path, name: str, data: bytes, line: int, field: str | None, match: str
) -> None:
    expect_error(read_ml25m, csv_root(tmp_path, **{name: data}), name.replace("_", "."), line, field, match)


def test_missing_file_names_the_expected_location(tmp_path: Path) -> None:
    root = csv_root(tmp_path)
    (root / "ml-25m" / "movies.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"ml-25m/movies\.csv"):
        read_ml25m(root)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
def test_separator_rewriter_across_chunk_boundaries(tmp_path: Path, chunk_size: int) -> None:
    data = b"1::2::x:::y::\n::a:b::::\n" * 7 + b"::"
    path = tmp_path / "f.dat"
    path.write_bytes(data)
    with SeparatorRewriter(path, b"::", chunk_size=chunk_size) as stream:
        pieces = []
        while piece := stream.read(3):
            pieces.append(piece)
    expected = data.replace(b"::", RESERVED_SEPARATOR)
    assert b"".join(pieces) == expected
    # and the same split as the line-by-line pass (str.split), ':::' reading as separator + ':'
    assert expected.split(b"\n")[0].split(RESERVED_SEPARATOR) == data.split(b"\n")[0].split(b"::")


def test_dat_read_in_chunks_keeps_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many rows with the rewriter's chunks far smaller than a line: nothing is lost at a boundary."""
    import recadapt.data.readers._text as text

    rng = np.random.default_rng(0)
    users, movies = rng.integers(1, 50, size=500), rng.choice([3, 10], size=500)
    times = rng.integers(0, 10**9, size=500)
    lines = [
        f"{u}::{m}::{1 + i % 5}::{t}\n" for i, (u, m, t) in enumerate(zip(users, movies, times, strict=True))
    ]
    root = ml1m_root(
        tmp_path,
        ratings_dat="".join(lines).encode(),
        users_dat=b"".join(f"{u}::F::18::1::00000\n".encode() for u in range(1, 50)),
    )
    original = text.SeparatorRewriter.__init__
    monkeypatch.setattr(
        text.SeparatorRewriter, "__init__", lambda self, path, sep, chunk_size=0: original(self, path, sep, 7)
    )
    ds = read_ml1m(root)
    assert len(ds.interactions) == 500
    assert sorted(ds.interactions["rating"].tolist()) == sorted(float(1 + i % 5) for i in range(500))
    assert ds.interactions["timestamp"].sum() == times.sum()


# ------------------------------------------------------------------------------------------------------------
# Downloader (a local server: no network)


@pytest.fixture
def serve(publish: Callable[[str, bytes], str]) -> Callable[[str, bytes], str]:
    """``serve(name, data)`` publishes a file on 127.0.0.1 and returns its URL (tests/data/conftest.py)."""
    return publish


def build_zip(tmp_path: Path, folder: str, files: dict[str, bytes]) -> bytes:
    path = tmp_path / "built.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{folder}/", b"")
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}", data)
    return path.read_bytes()


def test_recorded_zip_hashes_and_folders() -> None:
    """The values cited in fetch.py (TensorFlow Datasets' url_checksums; the ml-10m MD5)."""
    downloads = fetch_module.DOWNLOADS
    assert {n: (d.folder, d.zip_size) for n, d in downloads.items() if n != "ml-100k"} == {
        "ml-1m": ("ml-1m", 5917549),
        "ml-10m": ("ml-10M100K", None),
        "ml-20m": ("ml-20m", 198702078),
        "ml-25m": ("ml-25m", 261978986),
    }
    assert downloads["ml-1m"].zip_sha256 == "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
    assert (
        downloads["ml-10m"].zip_sha256 is None
        and downloads["ml-10m"].zip_md5 == "ce571fd55effeba0271552578f2648bd"
    )
    assert all(
        d.url.startswith("https://files.grouplens.org/datasets/movielens/") for d in downloads.values()
    )


def test_fetch_ml1m_checks_the_zip_sha256(tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"ratings.dat": ML1M_RATINGS, "movies.dat": ML1M_MOVIES, "users.dat": ML1M_USERS, "README": b"x"}
    archive = build_zip(tmp_path, "ml-1m", files)
    url = serve("ml-1m.zip", archive)
    recorded = dataclasses.replace(
        fetch_module.DOWNLOADS["ml-1m"], zip_sha256=hashlib.sha256(archive).hexdigest(), zip_size=len(archive)
    )
    monkeypatch.setitem(fetch_module.DOWNLOADS, "ml-1m", recorded)
    data_dir = tmp_path / "data"
    dest = fetch_dataset("ml-1m", data_dir, url=url, progress=False)
    assert dest == data_dir / "ml-1m" and sorted(p.name for p in data_dir.iterdir()) == ["ml-1m"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert len(read_ml1m(data_dir).interactions) == 4
    # present: no download (this URL would fail)
    assert fetch_dataset("ml-1m", data_dir, url="http://127.0.0.1:9/none.zip", progress=False) == dest

    other = tmp_path / "other"
    monkeypatch.setitem(fetch_module.DOWNLOADS, "ml-1m", dataclasses.replace(recorded, zip_sha256="0" * 64))
    with pytest.raises(FetchError, match="does not match the recorded SHA-256"):
        fetch_dataset("ml-1m", other, url=url, progress=False)
    monkeypatch.setitem(
        fetch_module.DOWNLOADS, "ml-1m", dataclasses.replace(recorded, zip_size=len(archive) + 1)
    )
    with pytest.raises(
        FetchError, match=f"is {len(archive)} bytes, the published archive {len(archive) + 1}"
    ):
        fetch_dataset("ml-1m", other, url=url, progress=False)
    assert list(other.iterdir()) == []


def test_fetch_ml10m_checks_the_published_md5(tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = build_zip(
        tmp_path, "ml-10M100K", {"ratings.dat": ML10M_RATINGS, "movies.dat": ML10M_MOVIES.encode()}
    )
    md5 = hashlib.md5(archive).hexdigest()
    url = serve("ml-10m.zip", archive)
    serve("ml-10m.zip.md5", f"MD5 (ml-10m.zip) = {md5}\n".encode())
    monkeypatch.setitem(
        fetch_module.DOWNLOADS, "ml-10m", dataclasses.replace(fetch_module.DOWNLOADS["ml-10m"], zip_md5=md5)
    )
    dest = fetch_dataset("ml-10m", tmp_path / "data", url=url, progress=False)
    assert dest == tmp_path / "data" / "ml-10M100K"
    assert read_ml10m(tmp_path / "data").n_items == 2

    # The published .md5 disagrees with the archive: a damaged download.
    serve("ml-10m.zip.md5", b"0123456789abcdef0123456789abcdef  ml-10m.zip\n")
    with pytest.raises(FetchError, match="published archive changed"):  # and with the recorded one
        fetch_dataset("ml-10m", tmp_path / "x", url=url, progress=False)
    monkeypatch.setitem(
        fetch_module.DOWNLOADS, "ml-10m", dataclasses.replace(fetch_module.DOWNLOADS["ml-10m"], zip_md5=None)
    )
    with pytest.raises(FetchError, match="does not match its published MD5"):
        fetch_dataset("ml-10m", tmp_path / "x", url=url, progress=False)
    serve("ml-10m.zip.md5", b"no checksum here\n")
    with pytest.raises(FetchError, match=r"\.md5 holds no MD5"):
        fetch_dataset("ml-10m", tmp_path / "x", url=url, progress=False)
    assert list((tmp_path / "x").iterdir()) == []


def test_fetch_archive_lacking_a_needed_file(tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = build_zip(tmp_path, "ml-25m", {"ratings.csv": RATINGS_CSV})
    url = serve("ml-25m.zip", archive)
    recorded = dataclasses.replace(
        fetch_module.DOWNLOADS["ml-25m"],
        zip_sha256=hashlib.sha256(archive).hexdigest(),
        zip_size=len(archive),
    )
    monkeypatch.setitem(fetch_module.DOWNLOADS, "ml-25m", recorded)
    with pytest.raises(
        FetchError, match=r"does not hold the files the reader needs: movies\.csv \(missing\)"
    ):
        fetch_dataset("ml-25m", tmp_path / "data", url=url, progress=False)
    assert list((tmp_path / "data").iterdir()) == []
