"""Dataset names -> readers: the one entry point the CLI and the protocols use to load data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from recadapt.data.readers import (
    read_amazon2018,
    read_collm_ml1m,
    read_lastfm,
    read_ml1m,
    read_ml10m,
    read_ml20m,
    read_ml25m,
    read_ml100k,
    read_movielens_llara_test,
    read_recbole,
    read_steam_llara_test,
)
from recadapt.data.schema import Dataset
from recadapt.paths import data_dir as resolve_data_dir

RECBOLE_PREFIX = "recbole:"
AMAZON2018_PREFIX = "amazon2018:"
NO_VERIFY_ENV = "RECADAPT_NO_VERIFY"
_TRUE = ("1", "true", "yes", "on")


class Reader(Protocol):
    """A reader of a published dataset: ``verify`` checks its files against the recorded SHA-256."""

    def __call__(self, data_dir: Path, *, verify: bool = True) -> Dataset: ...


READERS: dict[str, Reader] = {
    "ml-100k": read_ml100k,
    "ml-1m": read_ml1m,
    "ml-10m": read_ml10m,
    "ml-20m": read_ml20m,
    "ml-25m": read_ml25m,
    "lastfm": read_lastfm,
    "ml-1m-ctr": read_collm_ml1m,
    "movielens-llara-test": read_movielens_llara_test,
    "steam-llara-test": read_steam_llara_test,
}


def known_datasets() -> list[str]:
    """The names :func:`load_dataset` accepts (``recbole:PATH/NAME`` stands for any RecBole dataset,
    ``amazon2018:PATH/CATEGORY`` for any category of Amazon Reviews 2018)."""
    return [*READERS, f"{RECBOLE_PREFIX}PATH/NAME", f"{AMAZON2018_PREFIX}PATH/CATEGORY"]


def verification_disabled() -> bool:
    """Whether ``RECADAPT_NO_VERIFY`` asks to skip the hash check (1, true, yes or on), for code paths that
    reach :func:`load_dataset` without a ``verify`` argument (training, ``data prepare``)."""
    return os.environ.get(NO_VERIFY_ENV, "").strip().lower() in _TRUE


def load_dataset(name: str, data_dir: Path | None = None, *, verify: bool = True) -> Dataset:
    """Load a dataset by name from ``data_dir`` (default: :func:`recadapt.paths.data_dir`).

    ``recbole:PATH/NAME`` reads RecBole atomic files from ``PATH/NAME`` (relative to the working directory, or
    absolute) and ignores ``data_dir``; ``amazon2018:PATH/CATEGORY`` reads ``PATH/CATEGORY_5.json.gz`` and
    ``PATH/meta_CATEGORY.json.gz`` the same way. An unknown name raises ``ValueError`` listing the known ones.

    The published datasets' files must have their recorded SHA-256, so a truncated or edited copy fails loudly
    (:class:`~recadapt.errors.DataFormatError`) instead of giving other numbers; ``verify=False`` or
    ``RECADAPT_NO_VERIFY=1`` reads them anyway. RecBole and Amazon datasets are the user's own and are never
    checked; nor are the MovieLens 1M-25M files, whose per-file hashes GroupLens does not publish (the
    downloader checks their zips).
    """
    if name.startswith(RECBOLE_PREFIX):
        spec = name[len(RECBOLE_PREFIX) :]
        if not spec:
            raise ValueError(f"{name!r}: give the dataset as {RECBOLE_PREFIX}PATH/NAME")
        return read_recbole(Path(spec))
    if name.startswith(AMAZON2018_PREFIX):
        spec = name[len(AMAZON2018_PREFIX) :]
        if not spec:
            raise ValueError(f"{name!r}: give the dataset as {AMAZON2018_PREFIX}PATH/CATEGORY")
        return read_amazon2018(Path(spec))
    reader = READERS.get(name)
    if reader is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_datasets())}")
    return reader(resolve_data_dir(data_dir), verify=verify and not verification_disabled())
