"""Per-run metric logs: a CSV file for tables and plots, TensorBoard for live curves."""

from __future__ import annotations

import csv
from pathlib import Path


class RunLogger:
    """Appends one row per logged step to ``log.csv`` and mirrors scalars to TensorBoard (if installed)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "log.csv"
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
