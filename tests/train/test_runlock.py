"""One process owns a run directory: a second trainer is refused with the holder's pid and host; the lock of a
dead process is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_crm import tiny_sasrec_args

from recadapt.cli import main
from recadapt.errors import RunDirBusyError
from recadapt.train.runlock import LOCK_FILE, run_dir_lock


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return tiny_sasrec_args(tmp_path, "name=shared", *extra)


def test_a_second_trainer_into_a_busy_run_directory_is_refused(tmp_path: Path, capsys) -> None:
    """Two real trainers into one directory: while the first trains, the second exits 2 naming the holder,
    and has written nothing into the directory."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "recadapt.cli", *_args(tmp_path, "train.epochs=500")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "runs" / "shared"
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint" / "state.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first trainer never checkpointed"
            time.sleep(0.05)
        log_before = (run_dir / "log.csv").read_text()
        config_before = (run_dir / "config.yaml").read_bytes()
        capsys.readouterr()
        assert main(_args(tmp_path, "train.epochs=2")) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {first.pid} on {socket.gethostname()}" in err, err
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert (run_dir / "log.csv").read_text().startswith(log_before)
        assert first.poll() is None, "the refused trainer must not disturb the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the first died holding the lock (SIGKILL): the kernel released it, so a new trainer takes over
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid
    assert main(_args(tmp_path, "train.epochs=2", "--restart")) == 0
    assert not (run_dir / LOCK_FILE).exists()


def test_a_dead_holders_lock_file_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000"}
    (run_dir / LOCK_FILE).write_text(json.dumps(stale))
    with run_dir_lock(run_dir):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusyError, match=f"pid {os.getpid()}"), run_dir_lock(run_dir):
            pass
    assert not (run_dir / LOCK_FILE).exists(), "a clean exit removes the lock file"
