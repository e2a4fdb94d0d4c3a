"""Prepared splits on disk: prepare once, reuse by every run that asks for the same split."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from recadapt.data.prepare import Prepared, dataset_dirname, load_prepared, prepare
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
) -> Prepared:
    """Load the persisted split for (dataset, protocol, seed), preparing it first when absent or stale."""
    root = prepared_root(out_root)
    path = root / dataset_dirname(dataset) / protocol
    manifest = path / "manifest.json"
    if not force and manifest.exists():
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        if recorded.get("seed") == seed:
            return load_prepared(path)
        log.info(
            "prepared split at %s has seed %s, not %s: preparing again", path, recorded.get("seed"), seed
        )
    # the requested name (e.g. 'recbole:PATH/NAME') names the prepared directory and the manifest
    ds = dataclasses.replace(load_dataset(dataset, data_dir(data_root)), name=dataset)
    written = prepare(ds, protocol, root, seed=seed)
    return load_prepared(written)
