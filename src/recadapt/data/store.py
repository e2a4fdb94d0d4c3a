"""Prepared splits on disk: prepare once, reuse by every run that asks for the same split."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from recadapt.data.filters import kcore as kcore_filter
from recadapt.data.prepare import Prepared, dataset_dirname, load_prepared, prepare, split_dirname
from recadapt.data.registry import load_dataset
from recadapt.paths import cache_dir, data_dir

log = logging.getLogger(__name__)


def prepared_root(explicit: str | Path | None = None) -> Path:
    return Path(explicit).expanduser() if explicit else cache_dir() / "prepared"


def ensure_prepared(
    dataset: str,
    protocol: str,
    *,
    data_root: str | Path | None = None,
    out_root: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
    params: dict[str, Any] | None = None,
    kcore: int = 0,
) -> Prepared:
    """Load the persisted split for (dataset, protocol, seed, params), preparing it first when absent or
    stale. ``params`` are protocol parameters other than their defaults (e.g. ``{"negatives": "popularity"}``
    for sampled-ranking); each set has its own directory (:func:`~recadapt.data.prepare.split_dirname`).
    ``kcore > 1`` splits the dataset's k-core (:func:`~recadapt.data.filters.kcore`), kept under
    ``<dataset>__<k>core``."""
    params = dict(params or {})
    root = prepared_root(out_root)
    name = f"{dataset}__{kcore}core" if kcore > 1 else dataset
    path = root / dataset_dirname(name) / split_dirname(protocol, params)
    manifest = path / "manifest.json"
    if not force and manifest.exists():
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        recorded_params = recorded.get("params", {})
        same = all(recorded_params.get(k) == v for k, v in params.items())
        if recorded.get("seed") == seed and same:
            return load_prepared(path)
        log.info(
            "prepared split at %s has seed %s and params %s, not %s and %s: preparing again",
            path, recorded.get("seed"), recorded_params, seed, params,
        )  # fmt: skip
    # the requested name (e.g. 'recbole:PATH/NAME') names the prepared directory and the manifest
    ds = dataclasses.replace(kcore_filter(load_dataset(dataset, data_dir(data_root)), kcore), name=name)
    written = prepare(ds, protocol, root, seed=seed, **params)
    return load_prepared(written)


def prepared_for(data: Any) -> Prepared:
    """The persisted split a run's ``data`` section (:class:`recadapt.train.sections.DataConfig`) names: its
    dataset, protocol, split seed, protocol parameters and k-core, prepared first when absent or stale."""
    return ensure_prepared(
        data.dataset,
        data.protocol,
        data_root=data.data_dir,
        out_root=data.prepared_dir,
        seed=data.split_seed,
        params=data.protocol_params(),
        kcore=data.kcore,
    )
