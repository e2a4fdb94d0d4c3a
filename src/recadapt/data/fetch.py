"""Download MovieLens archives from GroupLens, check them against recorded hashes, and unpack them atomically.

MovieLens may not be redistributed, so the project ships no copy: users fetch it from GroupLens. What is
checked depends on what is known of the published bytes (strongest first):

- ``ml-100k``: the SHA-256 of every file the reader uses (from /work/shared/data/ml-100k/PROVENANCE.md, table
  "Files"; the same values are pinned by independent projects), checked after unpacking.
- ``ml-1m``, ``ml-20m``, ``ml-25m``: the SHA-256 and size of the zip, as recorded by TensorFlow Datasets
  (``tensorflow/datasets``, ``tensorflow_datasets/url_checksums/movielens.txt``), checked before unpacking.
- ``ml-10m``: no independent SHA-256 was found. The zip is checked against the MD5 that GroupLens publishes
  beside it (``ml-10m.zip.md5``, fetched from the same server), which must itself equal the MD5 recorded by
  ``eli-osherovich/papers_with_code`` (``datasets/movielens/dl_config.py``). MD5 from the distributor guards
  against a damaged download, not a deliberate substitution: weaker than a pinned SHA-256.

The archive is unpacked into a temporary folder beside the destination and moved into place with one
``os.replace`` only after every check passed, so a failed or interrupted fetch never leaves a partial folder
behind.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from recadapt.io import sha256_file

logger = logging.getLogger(__name__)

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
ML100K = "ml-100k"
ML100K_URL = f"{GROUPLENS}/ml-100k.zip"
ML100K_SHA256 = {  # also what the ml-100k reader checks its input against
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
}
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_MD5_RE = re.compile(rb"\b[0-9a-fA-F]{32}\b")


@dataclass(frozen=True)
class Download:
    """One GroupLens archive: where it is, the folder it unpacks to, and what is known of its bytes."""

    name: str
    url: str
    folder: str  # the zip's top folder, installed as DATA_DIR/<folder> (what the reader reads)
    files: tuple[str, ...]  # the files the reader needs: the archive must hold them
    file_sha256: Mapping[str, str] = field(default_factory=dict)  # of unpacked files, when known
    zip_sha256: str | None = None
    zip_size: int | None = None
    zip_md5: str | None = None  # an independent record of the distributor's MD5 (used with the .md5 file)


DOWNLOADS: dict[str, Download] = {
    ML100K: Download(
        ML100K,
        ML100K_URL,
        ML100K,
        tuple(ML100K_SHA256),
        file_sha256=ML100K_SHA256,
    ),
    # Size and SHA-256 of ml-1m.zip, ml-20m.zip, ml-25m.zip: tensorflow/datasets,
    # tensorflow_datasets/url_checksums/movielens.txt.
    "ml-1m": Download(
        "ml-1m",
        f"{GROUPLENS}/ml-1m.zip",
        "ml-1m",
        ("ratings.dat", "movies.dat", "users.dat"),
        zip_sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        zip_size=5917549,
    ),
    # MD5 of ml-10m.zip: eli-osherovich/papers_with_code, datasets/movielens/dl_config.py (no SHA-256 found).
    "ml-10m": Download(
        "ml-10m",
        f"{GROUPLENS}/ml-10m.zip",
        "ml-10M100K",
        ("ratings.dat", "movies.dat"),
        zip_md5="ce571fd55effeba0271552578f2648bd",
    ),
    "ml-20m": Download(
        "ml-20m",
        f"{GROUPLENS}/ml-20m.zip",
        "ml-20m",
        ("ratings.csv", "movies.csv"),
        zip_sha256="96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        zip_size=198702078,
    ),
    "ml-25m": Download(
        "ml-25m",
        f"{GROUPLENS}/ml-25m.zip",
        "ml-25m",
        ("ratings.csv", "movies.csv"),
        zip_sha256="8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
        zip_size=261978986,
    ),
}
FETCHABLE = tuple(DOWNLOADS)


class FetchError(OSError):
    """A download failed, was corrupt, or did not match the recorded hashes; nothing was installed.

    An ``OSError`` because it is one to the user (network, disk); its message is one line meant to be printed
    as is, without a traceback.
    """


def _reason(exc: BaseException) -> str:
    """What went wrong, without urllib's ``<urlopen error ...>`` wrapper."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return " ".join(str(reason).split()) or type(reason).__name__


def mismatches(folder: Path, download: Download = DOWNLOADS[ML100K]) -> list[str]:
    """The needed files of ``folder`` that are missing or differ from their recorded hash (empty when all
    verify). Files without a recorded hash (every MovieLens archive but ml-100k) are only checked present."""
    bad = []
    for name in download.files:
        path = folder / name
        expected = download.file_sha256.get(name)
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif expected is not None and sha256_file(path) != expected:
            bad.append(f"{name} (SHA-256 differs from the pinned {expected[:12]}...)")
    return bad


def _download(url: str, target: Path, progress: bool, folder: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=PurePosixPath(url).name, disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as exc:  # URLError, socket errors and timeouts are OSErrors
        raise FetchError(
            f"cannot download {url}: {_reason(exc)}; download and unpack it yourself, then point --data-dir "
            f"(or RECADAPT_DATA) at the folder holding {folder}/"
        ) from exc
    if total is not None and received != total:
        raise FetchError(f"download of {url} stopped after {received} of {total} bytes")


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _published_md5(url: str, target: Path, download: Download) -> str:
    """The MD5 GroupLens publishes beside the zip (``URL.md5``), checked against the independent record."""
    _download(f"{url}.md5", target, progress=False, folder=download.folder)
    found = _MD5_RE.search(target.read_bytes())
    if found is None:
        raise FetchError(f"{url}.md5 holds no MD5 checksum")
    published = found.group().decode().lower()
    if download.zip_md5 is not None and published != download.zip_md5:
        raise FetchError(
            f"{url}.md5 gives {published}, not the recorded {download.zip_md5}: the published archive changed"
        )
    return published


def _check_archive(archive: Path, url: str, download: Download, staging: Path) -> None:
    """Refuse an archive whose size or hash differs from the recorded (or published) one."""
    size = archive.stat().st_size
    if download.zip_size is not None and size != download.zip_size:
        raise FetchError(f"{url} is {size} bytes, the published archive {download.zip_size}")
    if download.zip_sha256 is not None:
        digest = sha256_file(archive)
        if digest != download.zip_sha256:
            raise FetchError(
                f"{url} does not match the recorded SHA-256 ({digest[:12]}... is not "
                f"{download.zip_sha256[:12]}...)"
            )
    elif not download.file_sha256:
        expected = _published_md5(url, staging / "archive.md5", download)
        digest = _file_digest(archive, "md5")
        if digest != expected:
            raise FetchError(f"{url} does not match its published MD5 ({digest} is not {expected})")


def _extract(archive: Path, out: Path, folder: str) -> Path:
    """Unpack the ``folder/`` members of ``archive`` into ``out``; returns ``out/folder``."""
    prefix = f"{folder}/"
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            if not members:
                raise FetchError(f"{archive.name} has no {prefix} folder")
            for member in members:
                parts = PurePosixPath(member.filename).parts
                if ".." in parts or member.filename.startswith("/"):
                    raise FetchError(f"{archive.name}: unsafe member path {member.filename!r}")
                target = out.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FetchError(f"the downloaded archive is corrupt: {exc}") from exc
    return out / folder


def fetch_dataset(name: str, data_dir: Path, url: str | None = None, *, progress: bool = True) -> Path:
    """Install ``name`` (one of :data:`FETCHABLE`) under ``data_dir`` and return its folder.

    Does nothing when the folder already holds the needed files (and, for ml-100k, they match the pinned
    hashes; the other archives have no known per-file hashes, so an installed folder is not re-hashed). Raises
    :class:`FetchError` when an existing folder does not verify (it is left untouched), or when the download
    fails, is corrupt or does not match the recorded hashes (then nothing is left behind). ``url`` overrides
    the GroupLens address (mirrors, tests); the same hashes apply.
    """
    download = DOWNLOADS.get(name)
    if download is None:
        raise ValueError(f"cannot fetch {name!r}; fetchable: {', '.join(FETCHABLE)}")
    data_dir = Path(data_dir)
    dest = data_dir / download.folder
    if dest.exists():
        bad = mismatches(dest, download)
        if not bad:
            logger.info("%s already present at %s", name, dest)
            return dest
        raise FetchError(f"{dest} exists but does not verify ({'; '.join(bad)}); remove it to download again")
    url = url or download.url
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{download.folder}-", dir=data_dir))
    try:
        archive = staging / f"{name}.zip"
        _download(url, archive, progress, download.folder)
        _check_archive(archive, url, download, staging)
        unpacked = _extract(archive, staging / "unpacked", download.folder)
        bad = mismatches(unpacked, download)
        if bad:
            what = "match the pinned hashes" if download.file_sha256 else "hold the files the reader needs"
            raise FetchError(f"{url} does not {what}: {'; '.join(bad)}")
        try:
            os.replace(unpacked, dest)
        except OSError as exc:
            raise FetchError(f"cannot move the verified files to {dest}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("installed %s at %s", name, dest)
    return dest


fetch = fetch_dataset  # the name docs/architecture.md uses
