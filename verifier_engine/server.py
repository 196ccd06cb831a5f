"""HTTP server: ``POST /v1/score``, ``GET /health``, ``GET /metrics``, with dynamic batching and input validation.

Request (JSON)::

    {"images": ["<base64 PNG or JPEG, optionally as a data: URL>", ...],
     "questions": [["Is there a red circle?", ...], ...],          # one list per image
     "expected_answers": [["yes", "no", ...], ...]}                 # optional; "no" inverts that score

Answer: ``{"scores": [[0.93, ...], ...], "backend": ..., "model": ...}``. Errors: a 4xx with
``{"error": {"message": "what is wrong", "type": ...}}`` (400 malformed JSON / base64 / image, 401 token,
413 too many bytes / pixels / images / questions, 422 wrong shape or empty lists, 503 queue full) or a 500 when
the backend fails; the server keeps serving in every case.

Dynamic batching: requests queue up; one worker takes the first, then keeps adding requests for at most
``max_wait_ms`` or until ``max_batch_images`` images, runs the backend once in a single worker thread (models are
not thread-safe), and splits the scores back. Expected answers are applied here, so any ``Verifier`` can be served.
Binds to 127.0.0.1 unless told otherwise; the optional bearer token guards ``/v1/score`` and ``/metrics``.
(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotation.)
"""

import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from .metrics import LATENCY_BUCKETS, SIZE_BUCKETS, Registry
from .prompt import apply_expected, check_expected

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    """Limits and batching of the server."""
    max_batch_images: int = 16
    """Images per backend call (the dynamic batch)."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for company."""
    max_queue_images: int = 4096
    """Images waiting at most; beyond that requests get 503."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body."""
    max_images_per_request: int = 64
    max_questions_per_image: int = 64
    max_question_chars: int = 2000
    max_pixels: int = 4096 * 4096
    """Largest image (width * height), checked before decoding the pixels."""
    token: str | None = None
    """Bearer token required on /v1/score and /metrics (None: open)."""

    def __post_init__(self):
        for name in ("max_batch_images", "max_queue_images", "max_request_bytes", "max_images_per_request",
                     "max_questions_per_image", "max_question_chars", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"ServerConfig.max_wait_ms must be >= 0, got {self.max_wait_ms}")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Metrics:
    def __init__(self):
        r = self.registry = Registry()
        self.requests = r.counter("verifier_requests_total", "Score requests by HTTP status.", ("status",))
        self.latency = r.histogram("verifier_request_latency_seconds", "Score request latency.", LATENCY_BUCKETS)
        self.backend_latency = r.histogram("verifier_backend_latency_seconds", "Backend time per batch.",
                                           LATENCY_BUCKETS)
        self.batch_images = r.histogram("verifier_batch_images", "Images per backend batch.", SIZE_BUCKETS)
        self.batch_questions = r.histogram("verifier_batch_questions", "Questions per backend batch.",
                                           SIZE_BUCKETS)
        self.images = r.counter("verifier_images_total", "Images scored.")
        self.questions = r.counter("verifier_questions_total", "Questions scored.")
        self.errors = r.counter("verifier_errors_total", "Failed requests by kind.", ("kind",))
        self.queue = r.gauge("verifier_queue_images", "Images waiting for the backend.")
        self.backend = r.gauge("verifier_backend_stat", "What the backend reports: its backend_metrics() "
                               "(trtllm: KV-cache hit rate; openai: failed and top-k gap queries).", ("name",))


class _Job:
    __slots__ = ("images", "questions", "future", "n")

    def __init__(self, images, questions, future):
        self.images, self.questions, self.future, self.n = images, questions, future, len(images)


class DynamicBatcher:
    """Collects requests into backend batches (see the module docstring)."""

    def __init__(self, verifier, config: ServerConfig, metrics: _Metrics):
        self.verifier, self.config, self.metrics = verifier, config, metrics
        self.queue: asyncio.Queue | None = None
        self.waiting = 0
        self._task = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verifier-backend")

    async def start(self):
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self):
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images, questions) -> list[list[float]]:
        if self.waiting + len(images) > self.config.max_queue_images:
            raise BadRequest(503, f"the server is busy ({self.waiting} images queued); retry later", "overloaded")
        job = _Job(images, questions, asyncio.get_running_loop().create_future())
        self.waiting += job.n
        self.metrics.queue.set(self.waiting)
        await self.queue.put(job)
        return await job.future

    async def _run(self):
        loop = asyncio.get_running_loop()
        carry = None
        while True:
            job = carry or await self.queue.get()
            carry = None
            batch, n = [job], job.n
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while n < self.config.max_batch_images:
                left = deadline - loop.time()
                if left <= 0 and self.queue.empty():
                    break
                try:
                    nxt = self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if n + nxt.n > self.config.max_batch_images:
                    carry = nxt
                    break
                batch.append(nxt)
                n += nxt.n
            await self._score(loop, batch)

    async def _score(self, loop, batch):
        images = [im for j in batch for im in j.images]
        questions = [q for j in batch for q in j.questions]
        self.waiting -= len(images)
        self.metrics.queue.set(self.waiting)
        self.metrics.batch_images.observe(len(images))
        self.metrics.batch_questions.observe(sum(len(q) for q in questions))
        t0 = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self._executor, self.verifier.score, images, questions)
        except Exception as e:  # one failed batch fails its requests, never the server
            log.exception("backend failed on a batch of %d images", len(images))
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(BadRequest(500, f"the verifier backend failed: {type(e).__name__}: {e}",
                                                      "backend_error"))
            return
        finally:
            self.metrics.backend_latency.observe(time.perf_counter() - t0)
        start = 0
        for j in batch:
            if not j.future.done():
                j.future.set_result(scores[start:start + j.n])
            start += j.n


def decode_image(data: Any, index: int, max_pixels: int):
    """A PIL RGB image from base64 PNG/JPEG (or a data: URL); ``BadRequest`` saying what is wrong otherwise."""
    from PIL import Image
    if not isinstance(data, str) or not data:
        raise BadRequest(422, f"images[{index}] must be a non-empty base64 string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(400, f"images[{index}] is not valid base64 ({e})") from e
    try:
        img = Image.open(io.BytesIO(raw))
        if img.format not in ("PNG", "JPEG"):
            raise BadRequest(400, f"images[{index}] is {img.format}; send PNG or JPEG")
        w, h = img.size
        if w * h > max_pixels:
            raise BadRequest(413, f"images[{index}] has {w}x{h} = {w * h} pixels, more than the limit {max_pixels}")
        img.load()
        return img.convert("RGB")
    except BadRequest:
        raise
    except Exception as e:  # PIL raises many types for corrupt data: all mean "undecodable"
        raise BadRequest(400, f"images[{index}] could not be decoded as PNG or JPEG ({type(e).__name__}: {e})") from e


def parse_request(body: bytes, config: ServerConfig):
    """Validate a /v1/score body up to the image bytes; returns ``(image strings, questions, expected)``."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from e
    if not isinstance(payload, dict):
        raise BadRequest(422, "the body must be a JSON object with 'images' and 'questions'")
    images, questions = payload.get("images"), payload.get("questions")
    if not isinstance(images, list) or not isinstance(questions, list):
        raise BadRequest(422, "'images' (list of base64 strings) and 'questions' (list of question lists) are required")
    if not images:
        raise BadRequest(422, "'images' is empty; send at least one image")
    if len(images) > config.max_images_per_request:
        raise BadRequest(413, f"{len(images)} images in one request; the limit is {config.max_images_per_request}")
    if len(questions) != len(images):
        raise BadRequest(422, f"{len(images)} images but {len(questions)} question lists; send one list per image")
    for i, qs in enumerate(questions):
        if not isinstance(qs, list) or not qs:
            raise BadRequest(422, f"questions[{i}] must be a non-empty list of strings")
        if len(qs) > config.max_questions_per_image:
            raise BadRequest(413, f"questions[{i}] has {len(qs)} questions; the limit is "
                                  f"{config.max_questions_per_image} per image")
        for j, q in enumerate(qs):
            if not isinstance(q, str) or not q.strip():
                raise BadRequest(422, f"questions[{i}][{j}] must be a non-empty string")
            if len(q) > config.max_question_chars:
                raise BadRequest(413, f"questions[{i}][{j}] has {len(q)} characters; the limit is "
                                      f"{config.max_question_chars}")
    try:
        expected = check_expected(payload.get("expected_answers"), questions)
    except (ValueError, TypeError) as e:
        raise BadRequest(422, str(e)) from e
    return images, questions, expected


def create_app(verifier, config: ServerConfig | None = None, backend: str = "", model: str = ""):
    """The FastAPI app serving ``verifier`` (anything with ``score(images, question_lists)``)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse
    except ImportError as e:
        raise ImportError("the verifier server needs fastapi and uvicorn: pip install 'alphagrpo[serve]'") from e
    import contextlib

    config = config or ServerConfig()
    metrics = _Metrics()
    batcher = DynamicBatcher(verifier, config, metrics)
    decode_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="verifier-decode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="verifier-engine", lifespan=lifespan)
    app.state.metrics, app.state.batcher, app.state.config = metrics, batcher, config

    def error(status: int, message: str, kind: str):
        metrics.requests.inc(status=str(status))
        metrics.errors.inc(kind=kind)
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    def authorized(request) -> bool:
        if not config.token:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {config.token}".encode())

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_request_bytes:
            raise BadRequest(413, f"the body has {declared} bytes; the limit is {config.max_request_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_request_bytes:
                raise BadRequest(413, f"the body is larger than the limit of {config.max_request_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/score")
    async def score(request: Request):
        t0 = time.perf_counter()
        if not authorized(request):
            return error(401, "missing or wrong bearer token", "unauthorized")
        try:
            image_data, questions, expected = parse_request(await read_body(request), config)
            loop = asyncio.get_running_loop()
            images = await asyncio.gather(*(loop.run_in_executor(decode_pool, decode_image, d, i, config.max_pixels)
                                            for i, d in enumerate(image_data)))
            scores = await batcher.submit(list(images), questions)
        except BadRequest as e:
            return error(e.status, e.message, e.kind)
        if expected is not None:
            scores = [[apply_expected(p, a) for p, a in zip(row, ea)] for row, ea in zip(scores, expected)]
        metrics.requests.inc(status="200")
        metrics.images.inc(len(images))
        metrics.questions.inc(sum(len(q) for q in questions))
        metrics.latency.observe(time.perf_counter() - t0)
        return {"scores": scores, "backend": backend, "model": model}

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend, "model": model, "queue_images": batcher.waiting}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        if not authorized(request):
            return error(401, "missing or wrong bearer token", "unauthorized")
        report = getattr(verifier, "backend_metrics", None)  # a backend's own numbers (cached, cheap to read)
        for name, value in (report() if callable(report) else {}).items():
            metrics.backend.set(value, name=name)
        return PlainTextResponse(metrics.registry.render(), media_type="text/plain; version=0.0.4")

    return app


def serve(verifier, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          backend: str = "", model: str = "", log_level: str = "info") -> None:
    """Run the server in the foreground (uvicorn)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("the verifier server needs uvicorn: pip install 'alphagrpo[serve]'") from e
    config = config or ServerConfig()
    if host not in LOOPBACK and not config.token:
        log.warning("serving on %s without a bearer token: anyone who can reach this address can use the verifier",
                    host)
    uvicorn.run(create_app(verifier, config, backend, model), host=host, port=port, log_level=log_level)
