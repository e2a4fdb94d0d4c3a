"""Serving throughput: personalized adapters (iLoRA's moe-lora, RecLoRA's personal-lora) against plain LoRA on the
same backbone and shapes, and the HTTP service against the in-process API, measured side by side in one run.

Runs: one-step LLM runs (``llm.max_steps=1``: speed does not depend on how well they are trained) of TALLRec,
iLoRA and RecLoRA on the synthetic ``ctr`` dataset of ``benchmarks/learnability.py`` (its SASRec conditions the
personalized ones), trained once into ``--out`` and reused. Each request is ``recommend(history, k=CANDIDATES,
candidates=...)``: one CTR prompt per candidate, so a batch of B users is B x CANDIDATES prompts in one call.

    .venv/bin/python benchmarks/serving.py [--batches 1 8 32] [--repeats 3]

Prints users/s and p50/p95 latency of a batch per method and batch size, the ratio to plain LoRA, and the
service's users/s (``recadapt serve`` in a subprocess, 32 concurrent clients) against in-process batches of 32.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LEARN = REPO / "runs" / "learnability"
DATA = LEARN / "data" / "synth-ctr-s0" / "synth-ctr-s0"
CRM = LEARN / "runs" / "sasrec-ctr"
METHODS = {
    "tallrec (lora)": ("tallrec", []),
    "ilora (moe-lora)": ("ilora", [f"llm.crm_run={CRM}"]),
    "reclora (personal-lora)": ("reclora", [f"llm.crm_run={CRM}"]),
}
CANDIDATES = 5


def _train(out: Path, method: str, extra: list[str]) -> Path:
    from recadapt.cli import main

    name = f"serve-{method}"
    run = out / name
    if not (run / "metrics.json").exists():
        args = [
            "--quiet", "train", "--config", str(REPO / "configs" / f"{method}.yaml"), f"--dataset=recbole:{DATA}",
            "--protocol=ctr", f"output_dir={out}", f"data.prepared_dir={LEARN / 'prepared'}", f"name={name}",
            "llm.max_steps=1", "llm.train_samples=8", "llm.eval_samples=8", *extra,
        ]  # fmt: skip
        assert main(args) == 0
    return run


def _requests(recommender, n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    rng = np.random.default_rng(seed)
    raw = recommender.catalogue.raw_ids
    out = []
    for _ in range(n):
        items = rng.choice(len(raw), size=10 + CANDIDATES, replace=False)
        out.append(([raw[i] for i in items[:10]], [raw[i] for i in items[10:]]))
    return out


def _time_batches(recommender, requests, batch: int, repeats: int) -> tuple[float, float, float]:
    """(users/s, p50 s, p95 s) of recommend_many over batches of ``batch`` users."""
    latencies = []
    users = 0
    for r in range(repeats):
        chunk = requests[r * batch : (r + 1) * batch]
        started = time.perf_counter()
        recommender.recommend_many([h for h, _ in chunk], k=CANDIDATES, candidates=[c for _, c in chunk])
        latencies.append(time.perf_counter() - started)
        users += len(chunk)
    return users / sum(latencies), float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95))


def _http(run: Path, requests, concurrency: int) -> float:
    """Users/s of ``recadapt serve`` answering ``requests`` with ``concurrency`` clients at once."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = "import sys; from recadapt.cli import main; sys.exit(main())"
    process = subprocess.Popen([sys.executable, "-c", code, "--quiet", "serve", str(run), "--port", str(port),
                                "--max-batch", str(concurrency), "--max-wait-ms", "20"])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)

        async def load() -> float:
            limit = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:

                async def send(history, candidates) -> None:
                    async with limit:
                        body = {"history": history, "k": CANDIDATES, "candidates": candidates}
                        response = await client.post("/recommend", json=body)
                        response.raise_for_status()

                started = time.perf_counter()
                await asyncio.gather(*(send(h, c) for h, c in requests))
                return len(requests) / (time.perf_counter() - started)

        return asyncio.run(load())
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "serving-bench")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (CRM / "best").is_dir():
        raise SystemExit(
            f"no {CRM}: run benchmarks/learnability.py --rows ctr/tallrec first (it trains the SASRec)"
        )
    import torch

    import recadapt

    torch.manual_seed(0)
    runs = {label: _train(args.out, method, extra) for label, (method, extra) in METHODS.items()}
    recommenders = {label: recadapt.load(run) for label, run in runs.items()}
    requests = _requests(next(iter(recommenders.values())), max(args.batches) * args.repeats)
    table = {}
    for batch in args.batches:
        for label, recommender in recommenders.items():
            recommender.recommend_many([requests[0][0]], k=CANDIDATES, candidates=[requests[0][1]])  # warm-up
            table[label, batch] = _time_batches(recommender, requests, batch, args.repeats)
    threads = torch.get_num_threads()
    print(f"users/s of recommend_many ({CANDIDATES} CTR candidates a user, SmolLM2-135M, {threads} threads)")
    print("| method | batch | users/s | p50 s | p95 s | x plain LoRA |\n|---|---|---|---|---|---|")
    for (label, batch), (rate, p50, p95) in table.items():
        ratio = rate / table["tallrec (lora)", batch][0]
        print(f"| {label} | {batch} | {rate:.2f} | {p50:.3f} | {p95:.3f} | {ratio:.2f} |")
    label = "ilora (moe-lora)"
    inproc = table[label, max(args.batches)][0]
    served = _http(runs[label], requests[: max(args.batches) * args.repeats], max(args.batches))
    print(f"\nHTTP ({label}, {max(args.batches)} concurrent clients): {served:.2f} users/s; in-process batches of "
          f"{max(args.batches)}: {inproc:.2f} users/s; HTTP / in-process = {served / inproc:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
