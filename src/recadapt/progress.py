"""Progress output that suits where it goes.

On a terminal a tqdm bar redraws in place. Redirected to a file (``nohup ... > run.log``, CI) the same bar writes
a ``\\r`` update several times a second, and a two-minute demo's log grew to 279 KB of them. There an outer bar
prints one plain line per tenth of its total (and one at the end), and an inner bar (``leave=False``: the steps
of one epoch, an evaluation pass) prints nothing, since the epoch lines around it say what happened.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

LINES_PER_BAR = 10


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class LineProgress:
    """The part of tqdm's interface recadapt uses (iterate, ``update``, ``set_postfix``, ``close``), printed as a
    few whole lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        initial: int = 0,
        silent: bool = False,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.n, self.silent = total, desc, initial, silent
        self.every = max(1, (total or 0) // LINES_PER_BAR) if total else 100
        self.postfix = ""
        self.started = time.time()
        self.closed = False
        self._last_printed = initial

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._last_printed >= self.every:
            self._print()

    def _print(self) -> None:
        self._last_printed = self.n
        if self.silent:
            return
        elapsed = time.time() - self.started
        of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        line = f"{self.desc}: {self.n}{of} in {elapsed:.0f}s {self.postfix}".rstrip()
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed and self.n != self._last_printed:
            self._print()
        self.closed = True


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    leave: bool = True,
    initial: int = 0,
) -> Any:
    """A tqdm bar on a terminal, :class:`LineProgress` elsewhere; nothing at all when not ``enabled``."""
    if enabled and stderr_is_terminal():
        return tqdm(iterable, total=total, desc=desc, leave=leave, initial=initial, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, silent=not enabled or not leave)


def quiet_third_party_bars() -> None:
    """Silence transformers' and the hub's own bars (model loading, shard writing) where ours are lines."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
