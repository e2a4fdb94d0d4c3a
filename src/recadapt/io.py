"""File helpers shared by every writer: streamed hashing and atomic writes (a reader never sees half an output)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_HASH_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, streamed so large files need not fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named directory; unlike ``tempfile.mkdtemp`` it honours the umask (shared outputs)."""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def replace_dir(src: Path, dst: Path) -> None:
    """Make ``src`` appear at ``dst``: the old ``dst`` is renamed aside first (a non-empty directory cannot be
    replaced by rename), then deleted; if the second rename fails the old ``dst`` is put back."""
    if not dst.exists():
        os.replace(src, dst)
        return
    aside = fresh_dir(dst.parent, f".{dst.name}.old-")
    os.replace(dst, aside / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside / dst.name, dst)  # if this fails too, the old output stays in `aside` for recovery
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it replaces ``final`` (see :func:`replace_dir`).

    On an exception the temporary directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
