"""``recadapt serve`` over real HTTP: a subprocess on 127.0.0.1 answers like the in-process API, and a bounded
load test (1,000 requests, 50 at a time, half malformed) gets every good request right, every bad one 4xx, no
5xx, with the server alive after it. The micro-batcher merges concurrent personalized requests into one forward
and still answers each as its own."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_recommender import _ilora, _sasrec

import recadapt

pytestmark = pytest.mark.usefixtures("single_thread")

N_REQUESTS, CONCURRENCY = 1000, 50


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(workdir: Path) -> Any:
    """``recadapt serve`` on the tiny SASRec run, in its own process; yields (base URL, process)."""
    run = _sasrec(workdir, "sasrec")
    port = _free_port()
    code = "import sys; from recadapt.cli import main; sys.exit(main())"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(run), "--port", str(port), "--max-queue", "256"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"recadapt serve did not start: {process.stdout.read() if process.stdout else ''}")
        time.sleep(0.2)
    yield url, process
    process.terminate()
    process.wait(timeout=20)


def _bad_requests() -> list[tuple[str, str, dict[str, str], bytes]]:
    """(method, path, headers, body) of malformed requests, each a different mistake."""
    js = {"content-type": "application/json"}

    def body(payload: Any) -> bytes:
        return json.dumps(payload).encode()

    return [
        ("POST", "/recommend", js, b'{"history": ["i1",'),  # malformed JSON
        ("POST", "/recommend", js, body({"history": ["nope"], "k": 3})),  # unknown item id
        ("POST", "/recommend", js, body({"history": [], "k": 3})),  # empty history
        ("POST", "/recommend", js, body({"history": ["i1"] * 1001})),  # over-long history
        ("POST", "/recommend", js, body({"history": ["i1"], "k": 0})),  # k out of range
        ("POST", "/recommend", js, body({"history": ["i1"], "k": 10_000})),
        ("POST", "/recommend", js, body({"history": ["i1"], "k": "3"})),  # wrong types
        ("POST", "/recommend", js, body({"history": "i1"})),
        ("POST", "/recommend", js, body({"history": [1.5]})),
        ("POST", "/recommend", js, body({"history": ["i1"], "kk": 3})),  # unknown field
        ("POST", "/recommend", js, body(["i1", "i2"])),  # not an object
        ("POST", "/recommend", js, body({"history": ["i1"], "candidates": ["i1"]})),  # all seen
        ("POST", "/recommend", js, b'{"history": ["' + b"x" * 300_000 + b'"]}'),  # body over the limit
        ("POST", "/score", js, body({"history": ["i1"], "items": ["i2", "zzz"]})),
        ("POST", "/score", js, body({"history": ["i1"]})),  # missing field
        ("POST", "/score", {}, body({"history": ["i1"], "items": ["i2"]})),  # no JSON content type
        ("GET", "/recommend", {}, b""),  # wrong method
        ("POST", "/nowhere", js, body({})),
    ]


def test_the_server_answers_like_the_in_process_api_and_survives_a_malformed_load(server, workdir) -> None:
    url, process = server
    recommender = recadapt.load(_sasrec(workdir, "sasrec"))
    rng = np.random.default_rng(0)
    good = []
    for n in range(20):
        history = [f"i{i}" for i in rng.choice(60, size=int(rng.integers(1, 8)), replace=False)]
        if n % 2:
            good.append(("/recommend", {"history": history, "k": 5}, recommender.recommend(history, k=5)))
        else:
            items = [f"i{i}" for i in rng.choice(60, size=4, replace=False)]
            good.append(("/score", {"history": history, "items": items}, recommender.score(history, items)))
    bad = _bad_requests()

    info = httpx.get(f"{url}/info").json()
    assert info["model"] == "sasrec" and info["n_items"] == 60 and "HR@1" in info["test"]
    first = httpx.post(f"{url}/recommend", json={"history": ["i1", "i2"], "k": 3}).json()["items"]
    expected = recommender.recommend(["i1", "i2"], k=3)
    assert [r["item"] for r in first] == [r.item for r in expected]
    np.testing.assert_allclose([r["score"] for r in first], [r.score for r in expected], rtol=1e-5, atol=1e-6)
    assert (
        httpx.get(f"{url}/docs").status_code == 200 and "/recommend" in httpx.get(f"{url}/openapi.json").text
    )

    async def load() -> tuple[list[Any], list[Any]]:
        limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def send(n: int) -> tuple[int, int, Any]:
                async with limit:
                    if n % 2 == 0:
                        path, payload, _ = good[(n // 2) % len(good)]
                        response = await client.post(path, json=payload)
                    else:
                        method, path, headers, content = bad[(n // 2) % len(bad)]
                        response = await client.request(method, path, headers=headers, content=content)
                    return n, response.status_code, response.json() if response.content else None

            return await asyncio.gather(*(send(n) for n in range(N_REQUESTS))), []

    results, _ = asyncio.run(load())
    statuses = [status for _, status, _ in results]
    assert sum(s >= 500 for s in statuses) == 0, "a 5xx answer"
    for n, status, payload in results:
        if n % 2:
            assert 400 <= status < 500, (bad[(n // 2) % len(bad)], status)
            if status == 422:
                assert payload["error"] and payload["field"], payload
            continue
        assert status == 200, payload
        _, _, want = good[(n // 2) % len(good)]
        assert [r["item"] for r in payload["items"]] == [r.item for r in want]
        np.testing.assert_allclose(
            [r["score"] for r in payload["items"]], [r.score for r in want], rtol=1e-5, atol=1e-6
        )
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["served"] >= N_REQUESTS // 2 * 0.9
    assert health["largest_batch"] > 1, "concurrent requests were never batched"
    assert process.poll() is None


def test_concurrent_personalized_requests_share_a_batch_and_keep_their_own_gates(workdir: Path) -> None:
    from fastapi.testclient import TestClient

    from recadapt.serving.http import ServeSettings, create_app

    recommender = recadapt.load(_ilora(workdir))
    histories = [[f"i{i}", f"i{i + 1}", f"i{(i * 7) % 60}"] for i in range(0, 48, 4)]
    candidates = [[f"i{(i + j * 5) % 60}" for j in range(3, 9)] for i in range(0, 48, 4)]
    expected = [recommender.score(h, c) for h, c in zip(histories, candidates, strict=True)]
    app = create_app(recommender, ServeSettings(max_batch=16, max_wait_ms=200))
    with TestClient(app) as client, ThreadPoolExecutor(len(histories)) as pool:
        responses = list(
            pool.map(
                lambda hc: client.post("/score", json={"history": hc[0], "items": hc[1]}),
                zip(histories, candidates, strict=True),
            )
        )
        health = client.get("/health").json()
    assert all(r.status_code == 200 for r in responses)
    assert health["largest_batch"] > 1 and health["batches"] < len(histories)
    for response, want in zip(responses, expected, strict=True):
        got = response.json()["items"]
        assert [r["item"] for r in got] == [r.item for r in want]
        np.testing.assert_allclose([r["score"] for r in got], [r.score for r in want], rtol=1e-4, atol=1e-5)
