"""One process owns a run directory at a time.

Two trainers writing one run directory interleave ``log.csv``, ``config.yaml``, ``best/`` and ``metrics.json``
and both exit 0, so the damage goes unnoticed. A trainer therefore holds ``RUN_DIR/.lock`` while it works: an
exclusive ``flock`` on the file (the kernel releases it when the process dies, however it dies, so the lock of a
dead process is simply taken over) with the holder's pid, host and start time written inside for the message a
second trainer gets.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recadapt.errors import RunDirBusyError
from recadapt.io import recover_interrupted

LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block (creating the directory), or raise
    :class:`RunDirBusyError` naming the holder. Inside the lock, what an earlier process killed mid-write left
    behind is cleaned up (:func:`recadapt.io.recover_interrupted`), each step logged as a warning.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusyError(
                f"{run_dir} is in use by {_holder(path)}: wait for it to finish, or choose another run name "
                "(name=...); a lock left by a process that has died is taken over automatically"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder removed the file as we locked it: lock the current one
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        for line in recover_interrupted(run_dir):
            log.warning("%s: %s (left by an interrupted process)", run_dir, line)
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
