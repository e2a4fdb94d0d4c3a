"""Error types shared across recadapt."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file is malformed. Names the file, the 1-based line number and the field.

    Readers raise this (and only this) for bad input, before anything is written.
    """

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ConfigError(ValueError):
    """A configuration file or override is invalid. Names the file and the field."""

    def __init__(self, source: str | Path, field: str | None, message: str) -> None:
        self.source = str(source)
        self.field = field
        self.message = message
        what = f" field '{field}'" if field else ""
        super().__init__(f"{source}:{what} {message}")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the run, epoch and step."""


class BackboneError(OSError):
    """A backbone could not be found or loaded; the message says what to install or check."""


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory's lock (see :mod:`recadapt.train.runlock`)."""


class CheckpointError(RuntimeError):
    """A run's checkpoint cannot be read (damaged or not recadapt's); the message names the file and says
    that ``--restart`` starts the run over."""
