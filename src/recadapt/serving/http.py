"""``recadapt serve``: a trained run over HTTP (FastAPI + uvicorn; the OpenAPI schema is at ``/docs``).

``POST /recommend`` and ``POST /score`` are checked and resolved in the event loop (a bad request is answered
4xx at once, naming the field), then queued; one worker takes up to ``max_batch`` queued requests, waiting at
most ``max_wait_ms`` for more, and answers them with one batched call of the recommender (one forward per
batch: a personalized adapter mixes per row inside it). The queue, the request body and the history are
bounded; a full queue answers 503. ``GET /health`` and ``GET /info`` describe the service and the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import sys
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from recadapt.serving.catalogue import Recommendation, RequestError
from recadapt.serving.recommender import Query, Recommender

Item = StrictInt | StrictStr  # the dataset's item id or an exact title
Rating = StrictFloat | StrictInt | None
UNION_TAGS = {"int", "str", "float", "none"}
MAX_LIST = 100_000  # a parse-time bound; the recommender checks the history against its own limit


class RecommendRequest(BaseModel):
    """A user's history (item ids or titles, oldest first) and what to return."""

    model_config = ConfigDict(extra="forbid")
    history: list[Item] = Field(min_length=1, max_length=MAX_LIST)
    k: StrictInt = Field(10, ge=1)
    candidates: list[Item] | None = Field(None, min_length=1, max_length=MAX_LIST)
    exclude_seen: StrictBool = True
    user: Item | None = None
    ratings: list[Rating] | None = Field(None, max_length=MAX_LIST)


class ScoreRequest(BaseModel):
    """Items to score for a user's history (in the order given)."""

    model_config = ConfigDict(extra="forbid")
    history: list[Item] = Field(min_length=1, max_length=MAX_LIST)
    items: list[Item] = Field(min_length=1, max_length=MAX_LIST)
    user: Item | None = None
    ratings: list[Rating] | None = Field(None, max_length=MAX_LIST)


class Scored(BaseModel):
    item: str
    title: str
    score: float


class ItemsResponse(BaseModel):
    items: list[Scored]


@dataclass(frozen=True)
class ServeSettings:
    """Bounds of the service: what one batched call takes, how long a request waits for company, how many
    requests may queue, how large a request body may be."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_body_bytes: int = 256 * 1024


class QueueFullError(RuntimeError):
    """The service has ``max_queue`` requests waiting: answered 503 (try again later)."""


@dataclass
class _Job:
    op: str  # "recommend" | "score"
    query: Query
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects concurrent requests into batches for one worker thread (the model runs one batch at a time)."""

    def __init__(self, recommender: Recommender, settings: ServeSettings) -> None:
        self.recommender, self.settings = recommender, settings
        self.queue: asyncio.Queue[_Job] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recadapt-model")
        self.worker: asyncio.Task | None = None
        self.served, self.batches, self.largest_batch = 0, 0, 0

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.settings.max_queue)
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        self.executor.shutdown(wait=True)

    async def submit(self, op: str, query: Query) -> list[Recommendation]:
        assert self.queue is not None, "start() the batcher first"
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(op, query, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.settings.max_queue} requests are waiting; try again later") from None
        return await future

    async def _work(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [job for job in batch if not job.future.done()]  # a client that left is not served
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as exc:  # a failure of the model (not of a request): every caller gets it
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
            self.served += len(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))

    def _run(self, batch: Sequence[_Job]) -> list[list[Recommendation]]:
        results: list[list[Recommendation]] = [[] for _ in batch]
        for op, call in (
            ("recommend", self.recommender.run_recommend),
            ("score", self.recommender.run_score),
        ):
            rows = [n for n, job in enumerate(batch) if job.op == op]
            if rows:
                for n, result in zip(rows, call([batch[n].query for n in rows]), strict=True):
                    results[n] = result
        return results


def create_app(recommender: Recommender, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``recommender``."""
    settings = settings or ServeSettings()
    batcher = MicroBatcher(recommender, settings)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="recadapt",
        summary=f"{recommender.config.model_name} on {recommender.config.data.dataset} ({recommender.protocol})",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    def _error(status: int, field: str | None, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message, "field": field})

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(422, exc.field, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(
                422, "body", f"body: malformed JSON ({first.get('ctx', {}).get('error', 'invalid')})"
            )
        parts = [str(p) for p in first.get("loc", ()) if p != "body"]
        loc = [p for p in parts if p not in UNION_TAGS]  # pydantic names the union member it tried
        where = (
            "".join(f"[{p}]" if p.isdigit() else (f".{p}" if n else p) for n, p in enumerate(loc)) or "body"
        )
        message = first.get("msg", "invalid request")
        if len(loc) != len(parts):
            message = (
                "a number, or null where unknown"
                if loc[0] == "ratings"
                else "an item id or title (an integer or a string)"
            )
        elif where == "body" and "json" not in request.headers.get("content-type", ""):
            message = "send a JSON object with Content-Type: application/json"
        return _error(422, where, f"{where}: {message}")

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return _error(503, None, str(exc))

    @app.middleware("http")
    async def _body_limit(request: Request, call_next: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _error(400, "content-length", "not a byte count")
            if int(declared) > settings.max_body_bytes:
                return _error(413, "body", f"{declared} bytes, at most {settings.max_body_bytes}")
        elif request.method == "POST":  # an unbounded (chunked) body is refused before it is read
            return _error(411, "content-length", "a POST body must declare its length")
        return await call_next(request)

    @app.post("/recommend", response_model=ItemsResponse)
    async def recommend(body: RecommendRequest) -> dict[str, Any]:
        """The ``k`` best items for this history (candidates: only among these)."""
        query = recommender.query(
            body.history, body.k, body.candidates, body.exclude_seen, body.user, body.ratings
        )
        return {"items": [r.to_dict() for r in await batcher.submit("recommend", query)]}

    @app.post("/score", response_model=ItemsResponse)
    async def score(body: ScoreRequest) -> dict[str, Any]:
        """The model's score of each item for this history."""
        query = recommender.query(body.history, 1, body.items, False, body.user, body.ratings, scoring=True)
        return {"items": [r.to_dict() for r in await batcher.submit("score", query)]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        queued = batcher.queue.qsize() if batcher.queue is not None else 0
        alive = batcher.worker is not None and not batcher.worker.done()
        if not alive:
            raise HTTPException(503, "the model worker is not running")
        return {
            "status": "ok",
            "queued": queued,
            "served": batcher.served,
            "batches": batcher.batches,
            "largest_batch": batcher.largest_batch,
            "uptime_s": round(time.time() - started, 1),
        }

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {**recommender.info(), "settings": settings.__dict__}

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    recommender: Recommender,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "warning",
) -> None:
    """Run the service until interrupted (loopback by default: nothing here authenticates callers)."""
    import uvicorn

    settings = settings or ServeSettings()
    if not is_loopback(host):
        print(f"warning: serving on {host}, reachable from other machines; recadapt has no authentication",
              file=sys.stderr)  # fmt: skip
    print(f"serving {recommender.run_dir} on http://{host}:{port} (API docs at /docs)", flush=True)
    uvicorn.run(
        create_app(recommender, settings),
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=settings.max_queue + 64,  # beyond the queue, uvicorn itself answers 503
        timeout_keep_alive=5,
    )
