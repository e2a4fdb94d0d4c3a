"""What every trainer's ``state.json`` shares: the training time summed over all processes of a run, so a
resumed run reports what it cost in total, not just its last process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from recadapt.errors import CheckpointError, ConfigError

T = TypeVar("T")


class Timed(Protocol):
    train_seconds: float | None


def read_state(cls: type[T], path: Path) -> T:
    """``cls`` from the state file ``path``. A checkpoint written before ``train_seconds`` was recorded reads as
    None (unknown): its earlier processes' time is lost, and adding only the later ones would understate it."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("train_seconds", None)
    return cls(**data)


@contextmanager
def reading_checkpoint(folder: Path) -> Iterator[None]:
    """Turn any failure to read ``folder`` (random bytes in ``optimizer.pt``, a truncated safetensors file, a
    broken ``state.json``) into one :class:`CheckpointError` that names the folder and the way out (``--restart``),
    instead of a pickle or safetensors traceback."""
    try:
        yield
    except (CheckpointError, ConfigError):
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise CheckpointError(
            f"{folder}: cannot resume from this checkpoint ({first}); it is damaged or was not written by this "
            "version of recadapt. Run the same command with --restart to start over"
        ) from exc


def load_tensors(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never an arbitrary pickle. A
    file that is not one says so by name (torch's own message suggests ``weights_only=False``, which is exactly
    what must not be done with a file of unknown origin)."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path.name} is not a tensor file that loads without unpickling code") from exc


def add_train_time(state: Timed, since: float) -> float:
    """Add the seconds since ``since`` (a ``time.time()``) to ``state.train_seconds`` unless it is unknown;
    return the current time, the start of the next interval."""
    now = time.time()
    if state.train_seconds is not None:
        state.train_seconds += now - since
    return now


def rounded_train_seconds(state: Timed | None) -> float | None:
    """``metrics.json``'s ``train_seconds``: to 0.1 s, None when unknown."""
    if state is None or state.train_seconds is None:
        return None
    return round(state.train_seconds, 1)
