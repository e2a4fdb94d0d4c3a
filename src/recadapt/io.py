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


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one atomic step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot, so the caller falls back to two renames."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def replace_dir(src: Path, dst: Path) -> None:
    """Make ``src`` appear at ``dst`` so that ``dst`` always holds either the old or the new directory.

    Where the file system can, the two are swapped in one atomic step and the old one deleted. Elsewhere the old
    ``dst`` is renamed aside (a non-empty directory cannot be replaced by rename) before ``src`` takes its place;
    a crash between the two renames leaves the old one in ``.NAME.old-*/NAME``, which
    :func:`recover_interrupted` puts back.
    """
    if not dst.exists():
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old directory
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


def recover_interrupted(parent: Path) -> list[str]:
    """Clean up after a process killed inside :func:`atomic_directory` or :func:`write_text_atomic` under
    ``parent``: put back an output that a crash between two renames left aside, and delete half-written
    temporaries. Only for a directory this process owns (a run directory under its lock). Returns what it did."""
    done: list[str] = []
    parent = Path(parent)
    if not parent.is_dir():
        return done
    for aside in sorted(parent.glob(".*.old-*")):
        name = aside.name[1:].rsplit(".old-", 1)[0]
        if (aside / name).exists() and not (parent / name).exists():
            os.replace(aside / name, parent / name)
            done.append(f"restored {parent / name} from {aside.name}")
        shutil.rmtree(aside, ignore_errors=True)
    for tmp in sorted(parent.glob(".*.tmp-*")):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        done.append(f"removed the unfinished {tmp.name}")
    return done


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
