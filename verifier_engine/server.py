"""HTTP server: ``POST /v1/score``, ``GET /health``, ``GET /metrics``, with dynamic batching and input validation.

Request (JSON)::

    {"images": ["<base64 PNG or JPEG, optionally as a data: URL>", ...],
     "questions": [["Is there a red circle?", ...], ...],          # one list per image
     "expected_answers": [["yes", "no", ...], ...]}                 # optional; "no" inverts that score

Answer: ``{"scores": [[0.93, ...], ...], "backend": ..., "model": ...}``. Errors: a 4xx with
``{"error": {"message": "what is wrong", "type": ...}}`` (400 malformed or too deeply nested JSON, bad base64 or
image, 401 token, 408 body not received in time, 413 too many bytes / pixels / images / questions or a
decompression bomb, 422 wrong shape, empty lists, text that is not valid Unicode or holds the model's special
tokens, or an image the model refuses (extreme aspect ratio), 503 queue full) or a 500 when the backend fails on
that request; the server keeps serving in every case.

Dynamic batching: requests queue up; one worker takes the first, then keeps adding requests for at most
``max_wait_ms`` or until ``max_batch_images`` images (or ``max_batch_pixels``), runs the backend once in a single
worker thread (models are not thread-safe), and splits the scores back. When a batch fails, each of its requests is
scored again on its own, so only the request that makes the backend fail gets the error, and no request ever sees
another one's error text. Expected answers are applied here, so any ``Verifier`` can be served.

Images: the declared size is read from the header first (per-image and per-request pixel budgets, the backend's
aspect-ratio limit), then the image is decoded and, when the backend tells how its processor resizes
(``image_spec()``, see ``protocol.ImageSpec``), shrunk at once to that size, so queued images hold no more pixels
than the model sees. The queue is bounded in images and in those pixels.

Binds to 127.0.0.1 unless told otherwise; the optional bearer token guards ``/v1/score`` and ``/metrics``; no
framework pages (``/docs``, ``/openapi.json``); ``/health`` names the model, never its filesystem path.
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
import os
import time
from dataclasses import dataclass
from typing import Any

from .metrics import LATENCY_BUCKETS, SIZE_BUCKETS, Registry
from .prompt import EXPECTED_ANSWERS, apply_expected

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MPX = 1024 * 1024


@dataclass
class ServerConfig:
    """Limits and batching of the server."""
    max_batch_images: int = 16
    """Images per backend call (the dynamic batch)."""
    max_batch_pixels: int = 32 * MPX
    """Pixels (as the model sees them) per backend call; a single larger request runs alone."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for company."""
    max_queue_images: int = 4096
    """Images waiting at most; beyond that requests get 503."""
    max_queue_pixels: int = 256 * MPX
    """Pixels (as held after decoding and shrinking) waiting at most; beyond that requests get 503."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body."""
    max_inflight_bytes: int = 512 * 1024 * 1024
    """Request body bytes held at once over all requests being received or parsed (raised to at least
    ``max_request_bytes``); beyond that requests get 503."""
    max_images_per_request: int = 64
    max_questions_per_image: int = 64
    max_question_chars: int = 2000
    max_pixels: int = 4096 * 4096
    """Largest image (width * height, as sent), checked before decoding the pixels."""
    max_request_pixels: int = 64 * MPX
    """Largest sum of width * height (as sent) over the images of one request, checked before decoding."""
    body_timeout_s: float = 30.0
    """Seconds a client has to send the whole request body (408 after that)."""
    token: str | None = None
    """Bearer token required on /v1/score and /metrics (None: open)."""

    def __post_init__(self):
        for name in ("max_batch_images", "max_batch_pixels", "max_queue_images", "max_queue_pixels",
                     "max_request_bytes", "max_inflight_bytes", "max_images_per_request", "max_questions_per_image",
                     "max_question_chars", "max_pixels", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"ServerConfig.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        self.max_inflight_bytes = max(self.max_inflight_bytes, self.max_request_bytes)
        if not self.body_timeout_s > 0:
            raise ValueError(f"ServerConfig.body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.token is not None and (not self.token or self.token != self.token.strip()):
            raise ValueError("ServerConfig.token must be a non-empty string without surrounding whitespace")


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
        self.queue_pixels = r.gauge("verifier_queue_pixels", "Pixels waiting for the backend.")
        self.split_batches = r.counter("verifier_split_batches_total",
                                       "Failed batches scored again request by request.")


class _Job:
    __slots__ = ("images", "questions", "future", "n", "pixels")

    def __init__(self, images, questions, future, pixels=0):
        self.images, self.questions, self.future, self.n, self.pixels = images, questions, future, len(images), pixels


def _check_scores(scores, jobs) -> None:
    """Raise when the backend's answer does not line up with the requests, or holds a score outside [0, 1]."""
    want = [len(q) for j in jobs for q in j.questions]
    if not isinstance(scores, (list, tuple)) or len(scores) != len(want):
        raise RuntimeError(f"the backend returned {len(scores) if isinstance(scores, (list, tuple)) else 'no'} "
                           f"score lists for {len(want)} images")
    for row, n in zip(scores, want):
        if len(row) != n:
            raise RuntimeError(f"the backend returned {len(row)} scores for {n} questions")
        for p in row:
            try:
                ok = 0.0 <= float(p) <= 1.0  # NaN fails too
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RuntimeError(f"the backend returned the score {str(p)[:40]!r}, not a probability")


class DynamicBatcher:
    """Collects requests into backend batches (see the module docstring)."""

    def __init__(self, verifier, config: ServerConfig, metrics: _Metrics):
        self.verifier, self.config, self.metrics = verifier, config, metrics
        self.queue: asyncio.Queue | None = None
        self.waiting = 0
        self.waiting_pixels = 0
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

    def reserve(self, n_images: int, pixels: int) -> None:
        """Count a request in the queue before its images are decoded; 503 when that would overfill it."""
        c = self.config
        if self.waiting + n_images > c.max_queue_images or self.waiting_pixels + pixels > c.max_queue_pixels:
            raise BadRequest(503, f"the server is busy ({self.waiting} images, {self.waiting_pixels} pixels "
                                  f"queued); retry later", "overloaded")
        self._count(n_images, pixels)

    def release(self, n_images: int, pixels: int) -> None:
        self._count(-n_images, -pixels)

    def _count(self, n_images: int, pixels: int) -> None:
        self.waiting += n_images
        self.waiting_pixels += pixels
        self.metrics.queue.set(self.waiting)
        self.metrics.queue_pixels.set(self.waiting_pixels)

    async def submit(self, images, questions, pixels: int = 0, reserved: bool = False) -> list[list[float]]:
        """Scores of one request; ``reserved``: ``reserve(len(images), pixels)`` was already called for it."""
        if not reserved:
            self.reserve(len(images), pixels)
        job = _Job(images, questions, asyncio.get_running_loop().create_future(), pixels)
        await self.queue.put(job)
        return await job.future

    async def _run(self):
        loop = asyncio.get_running_loop()
        carry = None
        c = self.config
        while True:
            job = carry or await self.queue.get()
            carry = None
            batch, n, px = [job], job.n, job.pixels
            deadline = loop.time() + c.max_wait_ms / 1000
            while n < c.max_batch_images and px < c.max_batch_pixels:
                left = deadline - loop.time()
                if left <= 0 and self.queue.empty():
                    break
                try:
                    nxt = self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if n + nxt.n > c.max_batch_images or px + nxt.pixels > c.max_batch_pixels:
                    carry = nxt
                    break
                batch.append(nxt)
                n, px = n + nxt.n, px + nxt.pixels
            try:
                await self._score(loop, batch)
            finally:
                self.release(n, px)

    async def _call(self, loop, jobs):
        images = [im for j in jobs for im in j.images]
        questions = [q for j in jobs for q in j.questions]
        self.metrics.batch_images.observe(len(images))
        self.metrics.batch_questions.observe(sum(len(q) for q in questions))
        t0 = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self._executor, self.verifier.score, images, questions)
            _check_scores(scores, jobs)
            return [[float(p) for p in row] for row in scores]
        finally:
            self.metrics.backend_latency.observe(time.perf_counter() - t0)

    async def _score(self, loop, batch):
        live = [j for j in batch if not j.future.done()]
        if not live:
            return
        try:
            scores = await self._call(loop, live)
        except Exception as e:  # one failed batch never fails the server; a lone culprit never fails its batch
            if len(live) > 1:
                log.warning("the backend failed on a batch of %d requests (%s); scoring them one by one",
                            len(live), type(e).__name__)
                self.metrics.split_batches.inc()
                for j in live:
                    await self._score(loop, [j])
                return
            log.error("the backend failed on a request of %d images: %s: %s", live[0].n, type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            detail = str(e).splitlines()[0][:300] if str(e) else ""
            live[0].future.set_exception(BadRequest(
                500, f"the verifier backend failed on this request: {type(e).__name__}" + (f": {detail}" if detail
                                                                                           else ""),
                "backend_error"))
            return
        start = 0
        for j in live:
            if not j.future.done():
                j.future.set_result(scores[start:start + j.n])
            start += j.n


class _Header:
    """An image opened far enough to know its format and size (pixels not decoded yet)."""
    __slots__ = ("img", "index", "pixels", "target")

    def __init__(self, img, index, pixels, target):
        self.img, self.index, self.pixels, self.target = img, index, pixels, target

    @property
    def held_pixels(self) -> int:
        """Pixels the decoded image will hold (after shrinking to the model's size)."""
        return self.target[0] * self.target[1] if self.target else self.pixels


def _undecodable(index: int, e: Exception) -> BadRequest:
    from PIL import Image
    if isinstance(e, Image.DecompressionBombError):
        return BadRequest(413, f"images[{index}] is a decompression bomb: {e}")
    if "decompressed data too large" in str(e).lower():
        return BadRequest(413, f"images[{index}] expands to too much data when decoded (a decompression bomb); "
                               f"send a plain PNG or JPEG")
    return BadRequest(400, f"images[{index}] could not be decoded as PNG or JPEG ({type(e).__name__}: {e})")


def open_image(data: Any, index: int, max_pixels: int, spec=None) -> _Header:
    """Base64-decode and read the header of one image; checks format, pixel count and what the backend refuses."""
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
        fmt = img.format
    except Exception as e:  # PIL raises many types for corrupt data: all mean "undecodable"
        raise _undecodable(index, e) from e
    if fmt not in ("PNG", "JPEG"):
        raise BadRequest(400, f"images[{index}] is {fmt}; send PNG or JPEG")
    w, h = img.size
    if w * h > max_pixels:
        raise BadRequest(413, f"images[{index}] has {w}x{h} = {w * h} pixels, more than the limit {max_pixels}")
    target = None
    if spec is not None:
        try:
            spec.check(w, h)
        except ValueError as e:
            raise BadRequest(422, f"images[{index}]: {e}") from e
        if spec.target_size is not None:
            t = spec.target_size(w, h)
            target = t if t is not None and t[0] * t[1] < w * h else None
    return _Header(img, index, w * h, target)


def load_image(header: _Header, resample: int = 3):
    """Decode the pixels as RGB, shrunk to ``header.target`` when set."""
    try:
        img = header.img
        img.load()
        header.img = None
        if header.target is not None:
            return (img if img.mode == "RGB" else img.convert("RGB")).resize(header.target, resample)
        # a new image either way: a decoded PNG keeps a reference to its encoded bytes
        return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except Exception as e:
        raise _undecodable(header.index, e) from e


def decode_image(data: Any, index: int, max_pixels: int, spec=None):
    """A PIL RGB image from base64 PNG/JPEG (or a data: URL); ``BadRequest`` saying what is wrong otherwise."""
    return load_image(open_image(data, index, max_pixels, spec), spec.resample if spec is not None else 3)


def _text_error(q: str) -> str | None:
    try:
        q.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate code point at position {e.start}; send valid Unicode text"
    return None


def parse_request(body: bytes, config: ServerConfig, check_question=None):
    """Validate a /v1/score body up to the image bytes; returns ``(image strings, questions, expected)``.
    ``check_question``: the backend's own check of a question's text (raises ``ValueError`` saying what is wrong)."""
    try:
        payload = json.loads(body)
    except RecursionError as e:
        raise BadRequest(400, "malformed JSON: nested too deeply") from e
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
    for i, im in enumerate(images):
        if not isinstance(im, str) or not im:
            raise BadRequest(422, f"images[{i}] must be a non-empty base64 string")
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
            bad = _text_error(q)
            if bad:
                raise BadRequest(422, f"questions[{i}][{j}] {bad}")
            if check_question is not None:
                try:
                    check_question(q)
                except ValueError as e:
                    raise BadRequest(422, f"questions[{i}][{j}] {e}") from e
    return images, questions, _parse_expected(payload.get("expected_answers"), questions)


def _parse_expected(expected, questions):
    """Strict JSON check of ``expected_answers``: null, or one entry per image, each null or a list with one
    ``"yes"``/``"no"``/null per question."""
    if expected is None:
        return None
    if not isinstance(expected, list) or len(expected) != len(questions):
        raise BadRequest(422, f"'expected_answers' must be null or a list of {len(questions)} entries (one per image)")
    out = []
    for i, (row, qs) in enumerate(zip(expected, questions)):
        if row is None:
            out.append([None] * len(qs))
            continue
        if not isinstance(row, list) or len(row) != len(qs):
            raise BadRequest(422, f"expected_answers[{i}] must be null or a list of {len(qs)} entries (one per "
                                  f"question)")
        for j, a in enumerate(row):
            if a is not None and not (isinstance(a, str) and a.lower() in EXPECTED_ANSWERS):
                shown = repr(a)[:40] if isinstance(a, (str, int, float, bool)) else type(a).__name__
                raise BadRequest(422, f"expected_answers[{i}][{j}] must be 'yes', 'no' or null, got {shown}")
        out.append([a.lower() if isinstance(a, str) else None for a in row])
    return out


def _backend_hook(verifier, name: str):
    """The backend's optional ``name`` method (on the verifier, or on its ``bundle``), or None."""
    for owner in (verifier, getattr(verifier, "bundle", None)):
        fn = getattr(owner, name, None)
        if callable(fn):
            return fn
    return None


def _image_spec(verifier):
    """The backend's ``ImageSpec`` (``image_spec()``), or None."""
    fn = _backend_hook(verifier, "image_spec")
    try:
        return fn() if fn is not None else None
    except Exception:  # an optional hint: without it the server still validates and isolates failures
        log.warning("the backend's image_spec() failed; serving without its image limits", exc_info=True)
        return None


def public_model_name(model: str) -> str:
    """What /health and answers show as the model: the directory's name for a local path, never the path."""
    if model and (os.path.isabs(model) or os.path.exists(model)):
        return os.path.basename(os.path.normpath(model))
    return model


class _ClientGone(Exception):
    pass


def create_app(verifier, config: ServerConfig | None = None, backend: str = "", model: str = ""):
    """The FastAPI app serving ``verifier`` (anything with ``score(images, question_lists)``)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse, Response
        from starlette.requests import ClientDisconnect
    except ImportError as e:
        raise ImportError("the verifier server needs fastapi and uvicorn: pip install 'alphagrpo[serve]'") from e
    import contextlib

    config = config or ServerConfig()
    model = public_model_name(model)
    metrics = _Metrics()
    batcher = DynamicBatcher(verifier, config, metrics)
    spec = _image_spec(verifier)
    check_question = _backend_hook(verifier, "check_question")
    resample = spec.resample if spec is not None else 3
    decode_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="verifier-decode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="verifier-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.batcher, app.state.config, app.state.image_spec = metrics, batcher, config, spec

    def error(status: int, message: str, kind: str):
        metrics.requests.inc(status=str(status))
        metrics.errors.inc(kind=kind)
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    def authorized(request) -> bool:
        if not config.token:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        ok = hmac.compare_digest(credentials.strip().encode("utf-8", "surrogateescape"),
                                 config.token.encode("utf-8"))
        return ok and scheme.lower() == "bearer"

    inflight = {"bytes": 0}  # request body bytes held by requests being received or parsed

    async def read_body(request, held: list) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_request_bytes:
            raise BadRequest(413, f"the body has {declared} bytes; the limit is {config.max_request_bytes}")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(config.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > config.max_request_bytes:
                        raise BadRequest(413, f"the body is larger than the limit of {config.max_request_bytes} "
                                              f"bytes")
                    if inflight["bytes"] + len(chunk) > config.max_inflight_bytes:
                        raise BadRequest(503, f"the server is busy ({inflight['bytes']} request bytes in flight); "
                                              f"retry later", "overloaded")
                    inflight["bytes"] += len(chunk)
                    held[0] += len(chunk)
                    chunks.append(chunk)
        except TimeoutError as e:
            raise BadRequest(408, f"the body did not arrive within {config.body_timeout_s:g} s", "timeout") from e
        except ClientDisconnect as e:
            raise _ClientGone() from e
        return b"".join(chunks)

    async def handle(request, loop, received):
        body = await read_body(request, received)
        image_data, questions, expected = await loop.run_in_executor(decode_pool, parse_request, body, config,
                                                                     check_question)
        del body
        headers = await asyncio.gather(*(loop.run_in_executor(decode_pool, open_image, d, i, config.max_pixels, spec)
                                         for i, d in enumerate(image_data)))
        del image_data
        sent = sum(h.pixels for h in headers)
        if sent > config.max_request_pixels:
            raise BadRequest(413, f"the images hold {sent} pixels in all; the limit is {config.max_request_pixels} "
                                  f"per request")
        held = sum(h.held_pixels for h in headers)
        batcher.reserve(len(headers), held)
        try:
            images = await asyncio.gather(*(loop.run_in_executor(decode_pool, load_image, h, resample)
                                            for h in headers))
        except BaseException:
            batcher.release(len(headers), held)
            raise
        del headers
        inflight["bytes"] -= received[0]  # the body and the encoded images are gone: the queue counts from here
        received[0] = 0
        scores = await batcher.submit(list(images), questions, held, reserved=True)
        if expected is not None:
            scores = [[apply_expected(p, a) for p, a in zip(row, ea)] for row, ea in zip(scores, expected)]
        return scores, len(images), sum(len(q) for q in questions)

    @app.post("/v1/score")
    async def score(request: Request):
        t0 = time.perf_counter()
        if not authorized(request):
            return error(401, "missing or wrong bearer token", "unauthorized")
        received = [0]
        try:
            scores, n_images, n_questions = await handle(request, asyncio.get_running_loop(), received)
        except BadRequest as e:
            return error(e.status, e.message, e.kind)
        except _ClientGone:
            client = request.client
            log.info("client %s disconnected before sending the whole body", f"{client.host}:{client.port}"
                     if client else "?")
            metrics.errors.inc(kind="client_disconnect")
            return Response(status_code=400)
        except Exception:  # a bug here must not take the server down nor show a traceback to the client
            log.exception("unexpected error while serving a score request")
            return error(500, "internal server error", "internal_error")
        finally:
            inflight["bytes"] -= received[0]
        metrics.requests.inc(status="200")
        metrics.images.inc(n_images)
        metrics.questions.inc(n_questions)
        metrics.latency.observe(time.perf_counter() - t0)
        return {"scores": scores, "backend": backend, "model": model}

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend, "model": model, "queue_images": batcher.waiting,
                "queue_pixels": batcher.waiting_pixels, "inflight_bytes": inflight["bytes"]}

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
          backend: str = "", model: str = "", log_level: str = "info", sock=None) -> None:
    """Run the server in the foreground (uvicorn). ``sock``: an already bound listening socket to serve on (the
    CLI binds it before loading the model, so a taken port fails fast)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("the verifier server needs uvicorn: pip install 'alphagrpo[serve]'") from e
    config = config or ServerConfig()
    if host not in LOOPBACK and not config.token:
        log.warning("serving on %s without a bearer token: anyone who can reach this address can use the verifier",
                    host)
    app = create_app(verifier, config, backend, model)
    if sock is None:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.run(sockets=[sock])
