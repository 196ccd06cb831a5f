"""Async HTTP plumbing shared by the HTTP client and the ``openai`` backend.

- ``BackgroundLoop``: one asyncio loop in a daemon thread, so a synchronous ``score()`` works whether or not the
  caller runs an event loop, and one ``httpx.AsyncClient`` keeps its connections across calls.
- ``HTTPPool``: POST JSON to one of several base URLs with a concurrency limit, a timeout per attempt (it bounds
  the whole attempt: connecting, sending, and reading the whole answer, however slowly it trickles in), retries with
  exponential backoff and jitter on transient failures (connection errors, timeouts, 408/425/429/5xx), and
  balancing by fewest requests in flight (round-robin among ties), failing over to another URL on retry.
  Other 4xx answers are not retried: they mean the request itself is wrong, and raise ``HTTPRequestError``.
- ``encode_image``: PNG (lossless, default) or JPEG bytes, base64.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import itertools
import random
import threading
from typing import Any, Sequence

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def import_httpx():
    try:
        import httpx
    except ImportError as e:
        raise ImportError("the verifier HTTP client needs httpx: pip install 'alphagrpo[client]'") from e
    return httpx


def encode_image(image: Any, fmt: str = "PNG") -> str:
    """Base64 of ``image`` (PIL or uint8 ``[H, W, 3]``) encoded as PNG or JPEG (quality 95)."""
    from .vlm import to_pil
    fmt = fmt.upper()
    if fmt not in ("PNG", "JPEG"):
        raise ValueError(f"image_format must be PNG or JPEG, got {fmt!r}")
    buf = io.BytesIO()
    to_pil(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


class HTTPRequestError(RuntimeError):
    """A request failed for good: non-retryable status, or retries exhausted. ``status`` is None for I/O errors."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class BackgroundLoop:
    """An event loop in a daemon thread; ``submit(coro)`` returns a ``concurrent.futures.Future``."""

    def __init__(self, name: str = "verifier-http"):
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure())

    def close(self, final_coro=None, timeout: float = 10.0) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None:
            return
        if final_coro is not None:
            try:
                asyncio.run_coroutine_threadsafe(final_coro, loop).result(timeout)
            except Exception:  # closing is best effort: the loop is going away anyway
                pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()


class HTTPPool:
    """POST JSON to several base URLs with limits, retries and balancing. Create and use inside one event loop."""

    def __init__(self, urls: Sequence[str], *, headers: dict | None = None, concurrency: int = 16,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.25, max_backoff: float = 8.0):
        if not urls:
            raise ValueError("at least one server URL is needed")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("concurrency must be >= 1, retries >= 0, timeout > 0 and backoff >= 0")
        httpx = import_httpx()
        self.urls = [u.rstrip("/") for u in urls]
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.timeout = timeout
        self._sem = asyncio.Semaphore(concurrency)
        self._in_flight = {u: 0 for u in self.urls}
        self._rr = itertools.count()
        self._client = httpx.AsyncClient(headers=headers or {}, timeout=timeout,
                                         limits=httpx.Limits(max_connections=concurrency * 2))
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    def _pick(self, avoid: str | None) -> str:
        candidates = [u for u in self.urls if u != avoid] or self.urls
        low = min(self._in_flight[u] for u in candidates)
        ties = [u for u in candidates if self._in_flight[u] == low]
        return ties[next(self._rr) % len(ties)]

    async def post_json(self, path: str, payload: dict) -> Any:
        """The decoded JSON answer of the first successful attempt; ``HTTPRequestError`` otherwise."""
        httpx = import_httpx()
        last: HTTPRequestError | None = None
        url = None
        async with self._sem:
            for attempt in range(self.retries + 1):
                if attempt:
                    self.stats["retries"] += 1
                    delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))
                url = self._pick(avoid=url if len(self.urls) > 1 else None)
                self._in_flight[url] += 1
                self.stats["requests"] += 1
                try:  # httpx's timeout applies to each socket operation; wait_for bounds the whole attempt
                    r = await asyncio.wait_for(self._client.post(url + path, json=payload), self.timeout)
                except asyncio.TimeoutError:
                    last = HTTPRequestError(f"{url}{path}: no complete answer within {self.timeout:g} s", None, True)
                    continue
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    last = HTTPRequestError(f"{url}{path}: {type(e).__name__}: {e}", None, True)
                    continue
                finally:
                    self._in_flight[url] -= 1
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError as e:
                        last = HTTPRequestError(f"{url}{path}: the answer is not JSON ({e})", 200, True)
                        continue
                message = f"{url}{path}: HTTP {r.status_code}: {r.text[:500]}"
                if r.status_code not in RETRY_STATUSES:
                    self.stats["failures"] += 1
                    raise HTTPRequestError(message, r.status_code, False)
                last = HTTPRequestError(message, r.status_code, True)
        self.stats["failures"] += 1
        raise HTTPRequestError(f"failed after {self.retries + 1} attempts; last error: {last}",
                               last.status if last else None, True)

    async def get(self, url: str):
        return await asyncio.wait_for(self._client.get(url), self.timeout)

    async def aclose(self) -> None:
        await self._client.aclose()
