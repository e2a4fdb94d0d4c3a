"""Per-run metric logs: a CSV file for tables and plots, TensorBoard for live curves."""

from __future__ import annotations

import csv
from pathlib import Path

from recadapt.io import write_text_atomic


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from, so the log continues without repeats."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if line.strip() and int(line.split(",", 1)[0]) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


class RunLogger:
    """Appends one row per logged step to ``log.csv`` (or ``filename``; one file per set of columns, since a CSV
    keeps the columns of its first row) and mirrors scalars to TensorBoard (if installed)."""

    def __init__(self, run_dir: Path, filename: str = "log.csv") -> None:
        self.path = run_dir / filename
        self._fields: list[str] | None = None
        if self.path.exists():
            with self.path.open(encoding="utf-8") as handle:
                header = handle.readline().strip()
            self._fields = header.split(",") if header else None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is a declared dependency, but logging must never kill a run
            self._tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        if self._fields is None:
            self._fields = list(row)
            with self.path.open("w", encoding="utf-8", newline="") as handle:
                csv.writer(handle).writerow(self._fields)
        with self.path.open("a", encoding="utf-8", newline="") as handle:
            csv.DictWriter(handle, self._fields, extrasaction="ignore").writerow(row)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
