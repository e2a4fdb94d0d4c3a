"""Atomic outputs: a directory is replaced so that one of the old and the new is always in place, and what a
killed process left half-done is recovered."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from recadapt.io import atomic_directory, recover_interrupted, replace_dir

KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
import recadapt.io as io
io._exchange = lambda a, b: False  # a file system without renameat2's exchange
replace = os.replace
calls = [0]
def replace_then_die(src, dst):
    replace(src, dst)
    calls[0] += 1
    if calls[0] == 1:  # the old directory is aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
with io.atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "f").write_text("new")
"""


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "f").write_text(text)
    return path


def test_replace_dir_swaps_in_the_new_directory_and_removes_the_old(tmp_path: Path) -> None:
    old, new = _folder(tmp_path / "out", "old"), _folder(tmp_path / "new", "new")
    replace_dir(new, old)
    assert (tmp_path / "out" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_two_rename_fallback_is_recovered_after_a_kill_between_renames(tmp_path: Path) -> None:
    _folder(tmp_path / "out", "old")
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(tmp_path / "out")])
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()  # the window the fallback cannot close ...
    done = recover_interrupted(tmp_path)  # ... and what the next owner of the directory does about it
    assert (tmp_path / "out" / "f").read_text() == "old"
    assert any(line.startswith("restored") for line in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_removes_half_written_temporaries_and_leaves_outputs_alone(tmp_path: Path) -> None:
    _folder(tmp_path / "out", "kept")
    _folder(tmp_path / ".checkpoint.tmp-0123456789ab", "half")
    (tmp_path / ".metrics.json.tmp-abc").write_text("{")
    assert len(recover_interrupted(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("replaced")
    assert (tmp_path / "out" / "f").read_text() == "replaced"
