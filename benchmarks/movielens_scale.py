"""Scaling benchmark for the MovieLens 25M reader (``ratings.csv`` + ``movies.csv``, GroupLens format).

Writes a synthetic ``ml-25m/`` folder outside the timing: N ratings (default 25M, the real file's size) by
about N/154 users (the real ratio), 62,423 movies with ids spread over 1..209,171 and Zipf-like popularity,
half-star ratings written like GroupLens's (``4.0``, ``3.5``), random timestamps, and a ``movies.csv`` whose
titles hold commas and doubled quotes. Then a fresh subprocess times :func:`recadapt.data.readers.read_ml25m`
(parse, dense ids, sort, SHA-256 of both files) and reports its wall time and peak RSS (``ru_maxrss``); the
SHA-256 pass is timed again on its own, to show its share.

    .venv/bin/python benchmarks/movielens_scale.py               # 25M ratings
    .venv/bin/python benchmarks/movielens_scale.py --rows 1M

Target: 25M ratings in < 60 s and < 4 GiB peak RSS on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_MOVIES = 62_423
MAX_MOVIE_ID = 209_171
RATINGS_PER_USER = 154  # 25,000,095 / 162,541
TIME_RANGE = (789_652_009, 1_574_327_703)
TARGET_S, TARGET_GIB = 60.0, 4.0


def parse_size(text: str) -> int:
    """``25M`` / ``500k`` / ``1000000`` -> an integer count."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def write_ml25m(root: Path, n: int, seed: int = 0) -> Path:
    """A synthetic ``root/ml-25m/`` with ``n`` ratings; returns ``root``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    folder = root / "ml-25m"
    folder.mkdir(parents=True)
    movie_ids = np.sort(rng.choice(np.arange(1, MAX_MOVIE_ID + 1), size=N_MOVIES, replace=False))
    with open(folder / "movies.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["movieId", "title", "genres"])
        for i, movie in enumerate(movie_ids.tolist()):
            title = (
                f'"Movie" {movie}, The ({1900 + i % 120})'
                if i % 7 == 0
                else f"Movie {movie} ({1900 + i % 120})"
            )
            writer.writerow([movie, title, "Comedy|Drama" if i % 3 else "(no genres listed)"])

    n_users = max(1, n // RATINGS_PER_USER)
    user = np.sort(rng.integers(1, n_users + 1, size=n)).astype(np.int32)
    popularity = 1.0 / (np.arange(N_MOVIES) + 10.0) ** 0.9
    cdf = np.cumsum(popularity / popularity.sum())
    movie = movie_ids[np.minimum(np.searchsorted(cdf, rng.random(n)), N_MOVIES - 1)].astype(np.int32)
    labels = pa.array([f"{r / 2:.1f}" for r in range(1, 11)])
    rating = labels.take(pa.array(rng.integers(0, 10, size=n)))
    stamp = rng.integers(*TIME_RANGE, size=n)
    table = pa.table({"userId": user, "movieId": movie, "rating": rating, "timestamp": stamp})
    del user, movie, rating, stamp
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with pa.OSFile(str(folder / "ratings.csv"), "wb") as sink:
        sink.write(b"userId,movieId,rating,timestamp\n")
        pacsv.write_csv(table, sink, options)
    return root


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(root: Path) -> dict:
    """Time the reader in this (fresh) process, so ``ru_maxrss`` is the read's own peak."""
    from recadapt.data.readers import read_ml25m
    from recadapt.io import sha256_file

    start = time.perf_counter()
    dataset = read_ml25m(root)
    read_s = time.perf_counter() - start
    peak = _peak_rss_gib()
    start = time.perf_counter()
    for name in ("ratings.csv", "movies.csv"):
        sha256_file(root / "ml-25m" / name)
    return {
        "ratings": len(dataset.interactions),
        "users": dataset.n_users,
        "items": dataset.n_items,
        "read_s": read_s,
        "sha256_s": time.perf_counter() - start,
        "peak_rss_gib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="25M", help="ratings to generate (25M, 1M, 500k...)")
    parser.add_argument("--out", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON too")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker)))
        return 0

    n = parse_size(args.rows)
    scratch = Path(tempfile.mkdtemp(prefix="recadapt-ml25m-", dir=args.out))
    try:
        start = time.perf_counter()
        write_ml25m(scratch, n)
        size_mib = (scratch / "ml-25m" / "ratings.csv").stat().st_size / 2**20
        print(
            f"wrote {n:,} ratings ({size_mib:,.0f} MiB ratings.csv) in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(scratch)], capture_output=True, text=True, check=False
        )
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit("benchmark worker failed")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    met = result["read_s"] < TARGET_S and result["peak_rss_gib"] < TARGET_GIB
    print(
        f"read_ml25m: {result['ratings']:,} ratings, {result['users']:,} users, {result['items']:,} items in "
        f"{result['read_s']:.1f} s (SHA-256 of the files alone: {result['sha256_s']:.1f} s), peak RSS "
        f"{result['peak_rss_gib']:.2f} GiB; target < {TARGET_S:.0f} s and < {TARGET_GIB:.0f} GiB: "
        f"{'met' if met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
