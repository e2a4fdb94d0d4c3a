"""Where recadapt reads data and writes caches."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "RECADAPT_DATA"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/recadapt`` or ``~/.cache/recadapt``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recadapt"


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data root: ``explicit`` (the --data-dir option), else ``$RECADAPT_DATA``, else the cache's ``data``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return cache_dir() / "data"
