"""The ml-100k downloader against a local HTTP server serving archives built from the shared copy."""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from recadapt.data.fetch import ML100K_SHA256, FetchError, fetch_dataset

FILES = ("README", "u.data", "u.genre", "u.info", "u.item", "u.occupation", "u.user")


@pytest.fixture
def serve(publish: Callable[[str, bytes], str]) -> Callable[[bytes], str]:
    """``serve(archive_bytes)`` publishes ``ml-100k.zip`` on 127.0.0.1 and returns its URL."""
    return functools.partial(publish, "ml-100k.zip")


def build_zip(shared_data: Path, tmp_path: Path, change: dict[str, bytes] | None = None) -> bytes:
    """A zip laid out like GroupLens's: every file under an ``ml-100k/`` folder."""
    path = tmp_path / "built.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-100k/", b"")
        for name in FILES:
            data = (change or {}).get(name, (shared_data / "ml-100k" / name).read_bytes())
            zf.writestr(f"ml-100k/{name}", data)
    return path.read_bytes()


def test_fetch_installs_verified_files(shared_data: Path, tmp_path: Path, serve) -> None:
    url = serve(build_zip(shared_data, tmp_path))
    data_dir = tmp_path / "data"
    dest = fetch_dataset("ml-100k", data_dir, url=url, progress=False)
    assert dest == data_dir / "ml-100k"
    for name in FILES:
        assert (dest / name).read_bytes() == (shared_data / "ml-100k" / name).read_bytes()
    assert sorted(p.name for p in data_dir.iterdir()) == ["ml-100k"]  # no staging folder left
    # Already present and verified: no download is attempted (this URL would fail).
    assert fetch_dataset("ml-100k", data_dir, url="http://127.0.0.1:9/none.zip", progress=False) == dest


def test_corrupted_member_is_rejected(shared_data: Path, tmp_path: Path, serve) -> None:
    data = bytearray((shared_data / "ml-100k/u.data").read_bytes())
    data[1000] = ord("9") if data[1000] != ord("9") else ord("8")
    url = serve(build_zip(shared_data, tmp_path, {"u.data": bytes(data)}))
    data_dir = tmp_path / "data"
    with pytest.raises(FetchError, match=r"u\.data \(SHA-256 differs"):
        fetch_dataset("ml-100k", data_dir, url=url, progress=False)
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_zip_is_rejected(shared_data: Path, tmp_path: Path, serve, keep: float) -> None:
    archive = build_zip(shared_data, tmp_path)
    url = serve(archive[: int(len(archive) * keep)])
    data_dir = tmp_path / "data"
    with pytest.raises(FetchError, match="corrupt"):
        fetch_dataset("ml-100k", data_dir, url=url, progress=False)
    assert list(data_dir.iterdir()) == []


def test_flipped_byte_in_compressed_stream(shared_data: Path, tmp_path: Path, serve) -> None:
    archive = bytearray(build_zip(shared_data, tmp_path))
    archive[len(archive) // 3] ^= 0xFF  # inside a deflated member: CRC or inflate error
    url = serve(bytes(archive))
    with pytest.raises(FetchError):
        fetch_dataset("ml-100k", tmp_path / "data", url=url, progress=False)
    assert not (tmp_path / "data" / "ml-100k").exists()


def test_archive_without_ml100k_folder(tmp_path: Path, serve) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("u.data", b"1\t1\t1\t1\n")
    with pytest.raises(FetchError, match="no ml-100k/ folder"):
        fetch_dataset("ml-100k", tmp_path / "data", url=serve(path.read_bytes()), progress=False)


def test_existing_folder_that_does_not_verify_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "data" / "ml-100k"
    dest.mkdir(parents=True)
    (dest / "u.data").write_bytes(b"not the data\n")
    with pytest.raises(FetchError, match="remove it to download again"):
        fetch_dataset("ml-100k", tmp_path / "data", url="http://127.0.0.1:9/none.zip", progress=False)
    assert (dest / "u.data").read_bytes() == b"not the data\n"


def test_unreachable_server_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="cannot download"):
        fetch_dataset("ml-100k", tmp_path / "data", url="http://127.0.0.1:9/none.zip", progress=False)
    assert list((tmp_path / "data").iterdir()) == []
    with pytest.raises(ValueError, match="fetchable: ml-100k"):
        fetch_dataset("lastfm", tmp_path / "data")


def test_pinned_hashes_match_the_shared_copy(shared_data: Path) -> None:
    """The constants are the full values of PROVENANCE.md's "Files" table."""
    provenance = (shared_data / "ml-100k" / "PROVENANCE.md").read_text("utf-8")
    for name, digest in ML100K_SHA256.items():
        assert f"| {name} |" in provenance and digest in provenance


class _NetworkDown:
    """Stands in for ``urlopen``: the connection opens, then reading fails as a dropped network does."""

    headers: dict[str, str] = {}

    def __enter__(self) -> _NetworkDown:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, size: int) -> bytes:
        raise OSError(101, "Network is unreachable")


@pytest.mark.parametrize("failure", ["refused", "read"])
def test_offline_fetch_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Offline, the CLI prints the error as one line: an OSError naming the URL, the reason and the way out."""
    url = "http://127.0.0.1:9/ml-100k.zip"  # port 9 (discard) refuses: no network needed
    if failure == "read":
        monkeypatch.setattr("urllib.request.urlopen", lambda *args, **kwargs: _NetworkDown())
    with pytest.raises(FetchError) as info:
        fetch_dataset("ml-100k", tmp_path / "data", url=url, progress=False)
    message = str(info.value)
    assert isinstance(info.value, OSError) and "\n" not in message
    reason = "Connection refused" if failure == "refused" else "Network is unreachable"
    assert message.startswith(f"cannot download {url}: ") and reason in message, message
    assert "urlopen error" not in message and "--data-dir" in message, message
    assert list((tmp_path / "data").iterdir()) == []
