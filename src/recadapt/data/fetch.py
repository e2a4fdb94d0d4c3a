"""Download MovieLens 100K from GroupLens, check it against pinned SHA-256 hashes, and unpack it atomically.

MovieLens may not be redistributed, so the project ships no copy: users fetch it from GroupLens. The hashes
pin the exact published bytes of the files the reader uses (from /work/shared/data/ml-100k/PROVENANCE.md,
table "Files"; the same values are pinned by independent projects). The archive is unpacked into a temporary
folder beside the destination and moved into place with one ``os.replace`` only after the hashes match, so a
failed or interrupted fetch never leaves a partial ``ml-100k/`` behind.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from recadapt.io import sha256_file

logger = logging.getLogger(__name__)

ML100K = "ml-100k"
ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_SHA256 = {  # also what the ml-100k reader checks its input against
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
}
FETCHABLE = (ML100K,)
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class FetchError(OSError):
    """A download failed, was corrupt, or did not match the pinned hashes; nothing was installed.

    An ``OSError`` because it is one to the user (network, disk); its message is one line meant to be printed
    as is, without a traceback.
    """


def _reason(exc: BaseException) -> str:
    """What went wrong, without urllib's ``<urlopen error ...>`` wrapper."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return " ".join(str(reason).split()) or type(reason).__name__


def mismatches(folder: Path) -> list[str]:
    """The pinned files of ``folder`` that are missing or differ from their hash (empty when all verify)."""
    bad = []
    for name, expected in ML100K_SHA256.items():
        path = folder / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif sha256_file(path) != expected:
            bad.append(f"{name} (SHA-256 differs from the pinned {expected[:12]}...)")
    return bad


def _download(url: str, target: Path, progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"{ML100K}.zip", disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as exc:  # URLError, socket errors and timeouts are OSErrors
        raise FetchError(
            f"cannot download {url}: {_reason(exc)}; download and unpack it yourself, then point --data-dir "
            f"(or RECADAPT_DATA) at the folder holding {ML100K}/"
        ) from exc
    if total is not None and received != total:
        raise FetchError(f"download of {url} stopped after {received} of {total} bytes")


def _extract(archive: Path, out: Path) -> Path:
    """Unpack the ``ml-100k/`` members of ``archive`` into ``out``; returns ``out/ml-100k``."""
    prefix = f"{ML100K}/"
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
    return out / ML100K


def fetch_dataset(name: str, data_dir: Path, url: str | None = None, *, progress: bool = True) -> Path:
    """Install ``name`` (only ``"ml-100k"``) under ``data_dir`` and return its folder.

    Does nothing when the folder already holds the pinned files. Raises :class:`FetchError` when an existing
    folder does not verify (it is left untouched), or when the download fails, is corrupt or does not match
    the pinned hashes (then nothing is left behind). ``url`` overrides the GroupLens address (mirrors, tests).
    """
    if name not in FETCHABLE:
        raise ValueError(f"cannot fetch {name!r}; fetchable: {', '.join(FETCHABLE)}")
    data_dir = Path(data_dir)
    dest = data_dir / ML100K
    if dest.exists():
        bad = mismatches(dest)
        if not bad:
            logger.info("%s already present and verified at %s", ML100K, dest)
            return dest
        raise FetchError(f"{dest} exists but does not verify ({'; '.join(bad)}); remove it to download again")
    url = url or ML100K_URL
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ML100K}-", dir=data_dir))
    try:
        archive = staging / f"{ML100K}.zip"
        _download(url, archive, progress)
        unpacked = _extract(archive, staging / "unpacked")
        bad = mismatches(unpacked)
        if bad:
            raise FetchError(f"{url} does not match the pinned hashes: {'; '.join(bad)}")
        try:
            os.replace(unpacked, dest)
        except OSError as exc:
            raise FetchError(f"cannot move the verified files to {dest}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("installed %s at %s", ML100K, dest)
    return dest


fetch = fetch_dataset  # the name docs/architecture.md uses
