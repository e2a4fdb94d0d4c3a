"""Scaling benchmark for the full-ranking split and its persistence.

Generates synthetic interactions (about N/100 users with log-normal activity, 50k items with Zipf-like
popularity, random timestamps), then times ``full_ranking`` and ``save_split`` (Parquet + manifest) on the
in-memory ``Dataset``. Each size runs in a fresh subprocess, so the peak RSS reported is that size's own. With
``--recbole`` and a RecBole reader available, the ``.inter`` load is timed too (the file is written outside
the timing).

    .venv/bin/python benchmarks/data_scale.py                 # 1M, 5M, 25M
    .venv/bin/python benchmarks/data_scale.py --sizes 1M 5M

Columns: ``data GiB`` is the RSS once the synthetic data exists; ``peak GiB`` is the peak, data included.
Target: 25M interactions in < 60 s and < 4 GiB peak RSS on 2 cores, and time growing linearly with size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_ITEMS = 50_000
USERS_PER_INTERACTION = 1 / 100


def parse_size(text: str) -> int:
    """``25M`` / ``500k`` / ``1000000`` -> an integer count."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def synthetic_dataset(n: int, seed: int = 0):
    """A ``Dataset`` of ``n`` interactions sorted by (user, timestamp), as readers produce."""
    import pandas as pd

    from recadapt.data.schema import Dataset

    rng = np.random.default_rng(seed)
    n_users = max(1, int(n * USERS_PER_INTERACTION))
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    counts = rng.multinomial(n, activity / activity.sum())
    user = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    # Sorting one combined key orders timestamps within each user (users are already grouped).
    key = (user << 31) | rng.integers(0, 2**31, size=n, dtype=np.int64)
    key.sort()
    timestamp = key & (2**31 - 1)
    del key
    popularity = 1.0 / (np.arange(N_ITEMS) + 10.0) ** 0.9
    cdf = np.cumsum(popularity / popularity.sum())
    item = np.minimum(np.searchsorted(cdf, rng.random(n)), N_ITEMS - 1).astype(np.int64)
    rating = rng.integers(1, 6, size=n).astype(np.float64)
    interactions = pd.DataFrame({"user_id": user, "item_id": item, "rating": rating, "timestamp": timestamp})
    items = pd.DataFrame(
        {
            "item_id": np.arange(N_ITEMS, dtype=np.int64),
            "raw_id": [str(i) for i in range(N_ITEMS)],
            "title": [f"Item {i}" for i in range(N_ITEMS)],
        }
    )
    users = pd.DataFrame(
        {"user_id": np.arange(n_users, dtype=np.int64), "raw_id": [str(u) for u in range(n_users)]}
    )
    return Dataset(name=f"synthetic-{n}", interactions=interactions, items=items, users=users)


def _rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _write_inter(ds, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    inter = ds.interactions
    columns = {"user_id:token": "user_id", "item_id:token": "item_id", "rating:float": "rating"}
    columns["timestamp:float"] = "timestamp"
    table = pa.table({header: pa.array(inter[name].to_numpy()) for header, name in columns.items()})
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pa.OSFile(str(path), "wb") as sink:
        sink.write(("\t".join(columns) + "\n").encode())  # Arrow would quote header names
        pacsv.write_csv(table, sink, options)


def worker(kind: str, n: int, out: Path) -> dict:
    """One measurement in this (fresh) process, so ``ru_maxrss`` is that measurement's own peak.

    ``split``: generate, then time ``full_ranking`` + ``save_split``. ``inter``: write the RecBole ``.inter``
    file (untimed). ``recbole``: time reading that file back.
    """
    if kind == "recbole":
        from recadapt.data.readers.recbole import read_recbole

        start = time.perf_counter()
        loaded = read_recbole(out / "bench")
        return {
            "recbole_s": time.perf_counter() - start,
            "recbole_peak_rss_gib": _peak_rss_gib(),
            "recbole_interactions": len(loaded.interactions),
        }
    start = time.perf_counter()
    ds = synthetic_dataset(n)
    if kind == "inter":
        (out / "bench").mkdir(parents=True, exist_ok=True)
        _write_inter(ds, out / "bench" / "bench.inter")
        return {}
    from recadapt.data.prepare import save_split
    from recadapt.data.protocols import full_ranking

    result: dict = {"interactions": n, "users": ds.n_users, "generate_s": time.perf_counter() - start}
    result["rss_after_generate_gib"] = _rss_gib()
    start = time.perf_counter()
    split = full_ranking(ds)
    result["split_s"] = time.perf_counter() - start
    start = time.perf_counter()
    path = save_split(ds, split, out)
    result["write_s"] = time.perf_counter() - start
    result["total_s"] = result["split_s"] + result["write_s"]
    result["output_mib"] = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    result["peak_rss_gib"] = _peak_rss_gib()
    return result


def _run(kind: str, n: int, scratch: Path) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--out", str(scratch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"benchmark worker '{kind}' for {n:,} interactions failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", nargs="+", default=["1M", "5M", "25M"], help="interaction counts (1M, 500k...)"
    )
    parser.add_argument("--out", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--recbole", action="store_true", help="also time the RecBole .inter reader")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON lines too")
    parser.add_argument("--worker", choices=("split", "inter", "recbole"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.n, args.out)))
        return 0

    if args.recbole and importlib.util.find_spec("recadapt.data.readers.recbole") is None:
        print("recadapt.data.readers.recbole not found: skipping the RecBole load", file=sys.stderr)
        args.recbole = False
    results = []
    for size in args.sizes:
        n = parse_size(size)
        scratch = Path(tempfile.mkdtemp(prefix="recadapt-bench-", dir=args.out))
        try:
            result = _run("split", n, scratch)
            if args.recbole:
                _run("inter", n, scratch)
                result |= _run("recbole", n, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        results.append(result)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"{n:>12,} interactions: split {result['split_s']:.1f} s + write {result['write_s']:.1f} s, "
                f"peak {result['peak_rss_gib']:.2f} GiB",
                flush=True,
            )

    header = f"{'interactions':>12} {'users':>9} {'split s':>8} {'write s':>8} {'total s':>8} {'s/M':>6} "
    header += f"{'data GiB':>9} {'peak GiB':>9} {'out MiB':>8}"
    if args.recbole:
        header += f" {'.inter s':>9} {'.inter GiB':>10}"
    print("\n" + header)
    for r in results:
        per_million = r["total_s"] / (r["interactions"] / 1e6)
        line = (
            f"{r['interactions']:>12,} {r['users']:>9,} {r['split_s']:>8.2f} {r['write_s']:>8.2f} "
            f"{r['total_s']:>8.2f} {per_million:>6.2f} {r['rss_after_generate_gib']:>9.2f} "
            f"{r['peak_rss_gib']:>9.2f} {r['output_mib']:>8.1f}"
        )
        if args.recbole:
            line += f" {r['recbole_s']:>9.2f} {r['recbole_peak_rss_gib']:>10.2f}"
        print(line)
    if len(results) > 1:
        small, large = results[0], results[-1]
        ideal = large["interactions"] / small["interactions"]
        ratio = large["total_s"] / small["total_s"]
        sizes = f"time({large['interactions']:,}) / time({small['interactions']:,})"
        print(f"\n{sizes} = {ratio:.1f} (linear: {ideal:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
