"""``VerifierClient``: a remote ``Verifier`` over the engine's HTTP server (``POST /v1/score``).

The trainer uses it unchanged (it has ``score(images, question_lists)``). A call is cut into requests of at most
``max_images_per_request`` images, sent concurrently (at most ``concurrency`` in flight) to the least-busy of the
server URLs, each with a timeout and retries with backoff. ``timeout`` bounds a whole attempt (connect, send, and
read the whole answer), not each socket read: a server that trickles its answer byte by byte still times out.
A request that still fails after its retries follows ``on_failure``: ``"zero"`` scores its questions 0 (the
authors' choice; counted in ``stats["failed_images"]`` and logged) or ``"raise"`` raises ``VerifierError``. A server
that rejects a request (4xx: bad token, too many pixels) always raises: that is a configuration error, not a
transient one, and silent zeros would poison training. So does an answer that is not, per image, a list of finite
numbers in ``[0, 1]``, one per question.

``submit()`` returns a ``concurrent.futures.Future`` so reward calls can overlap the next rollout; ``ascore()`` is
the awaitable form. Images are PNG-encoded (lossless) in worker threads.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from typing import Any, Sequence

from ._http import BackgroundLoop, HTTPPool, HTTPRequestError, encode_image
from .prompt import check_expected
from .protocol import VerifierError, check_batch, check_failure_policy

log = logging.getLogger(__name__)
TOKEN_ENV = "VERIFIER_ENGINE_TOKEN"


class VerifierClient:
    """Remote verifier. ``urls``: one base URL or several (``http://127.0.0.1:8000``); ``token``: bearer token
    (default: the ``VERIFIER_ENGINE_TOKEN`` environment variable)."""

    def __init__(self, urls: str | Sequence[str], *, token: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.25, on_failure: str = "zero",
                 max_images_per_request: int = 8, image_format: str = "PNG"):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("VerifierClient needs at least one server URL")
        if max_images_per_request < 1:
            raise ValueError(f"max_images_per_request must be >= 1, got {max_images_per_request}")
        self.on_failure = check_failure_policy(on_failure)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._pool_args = dict(headers={"Authorization": f"Bearer {token}"} if token else {},
                               concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff)
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, retries >= 0 and timeout > 0")
        self.max_images = max_images_per_request
        self.image_format = image_format
        self._loop = BackgroundLoop("verifier-client")
        self._pool: HTTPPool | None = None
        self.stats = {"failed_images": 0}

    # ---- Verifier protocol -------------------------------------------------------------------------------------
    def score(self, images: Sequence[Any], question_lists: Sequence[Sequence[str]],
              expected_answers: Sequence[Sequence[str | None]] | None = None) -> list[list[float]]:
        return self.submit(images, question_lists, expected_answers).result()

    def submit(self, images, question_lists, expected_answers=None) -> concurrent.futures.Future:
        check_batch(images, question_lists)
        expected = check_expected(expected_answers, question_lists)
        return self._loop.submit(self._score(list(images), [list(q) for q in question_lists], expected))

    async def ascore(self, images, question_lists, expected_answers=None) -> list[list[float]]:
        return await asyncio.wrap_future(self.submit(images, question_lists, expected_answers))

    def health(self) -> list[dict]:
        """``GET /health`` of every URL (``{"url", "ok", ...}``), never raising."""
        return self._loop.submit(self._health()).result()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        self._loop.close(pool.aclose() if pool is not None else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def http_stats(self) -> dict:
        return dict(self._pool.stats) if self._pool else {"requests": 0, "retries": 0, "failures": 0}

    # ---- inside the loop -----------------------------------------------------------------------------------------
    def _get_pool(self) -> HTTPPool:
        if self._pool is None:
            self._pool = HTTPPool(self.urls, **self._pool_args)
        return self._pool

    async def _score(self, images, question_lists, expected):
        pool = self._get_pool()
        out = [[0.0] * len(qs) for qs in question_lists]
        keep = [i for i, qs in enumerate(question_lists) if qs]
        chunks = [keep[s:s + self.max_images] for s in range(0, len(keep), self.max_images)]
        results = await asyncio.gather(*(self._request(pool, images, question_lists, expected, c) for c in chunks),
                                       return_exceptions=True)
        for chunk, res in zip(chunks, results):
            if isinstance(res, BaseException):
                transient = isinstance(res, HTTPRequestError) and res.retryable
                if self.on_failure == "raise" or not transient:
                    raise VerifierError(f"scoring {len(chunk)} images failed: {res}") from res
                self.stats["failed_images"] += len(chunk)
                log.warning("verifier request for %d images failed after retries; scoring them 0: %s", len(chunk), res)
                continue
            for i, scores in zip(chunk, res):
                out[i] = _check_scores(scores, len(question_lists[i]), i)
        return out

    async def _request(self, pool, images, question_lists, expected, chunk):
        loop = asyncio.get_running_loop()
        encoded = await asyncio.gather(*(loop.run_in_executor(None, encode_image, images[i], self.image_format)
                                         for i in chunk))
        payload = {"images": list(encoded), "questions": [question_lists[i] for i in chunk]}
        if expected is not None:
            payload["expected_answers"] = [expected[i] for i in chunk]
        answer = await pool.post_json("/v1/score", payload)
        if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list) \
                or len(answer["scores"]) != len(chunk):
            raise VerifierError(f"the server's answer has no 'scores' list of {len(chunk)} entries")
        return answer["scores"]

    async def _health(self):
        pool = self._get_pool()
        out = []
        for u in pool.urls:
            try:
                r = await pool.get(u + "/health")
                body = r.json() if r.status_code == 200 else {}
                out.append({"url": u, "ok": r.status_code == 200, **body})
            except Exception as e:  # health is a probe: report, never raise
                out.append({"url": u, "ok": False, "error": f"{type(e).__name__}: {e}"})
        return out


def _check_scores(scores: Any, n: int, image: int) -> list[float]:
    """The scores of one image as floats; ``VerifierError`` unless they are ``n`` finite numbers in [0, 1]."""
    if not isinstance(scores, list) or len(scores) != n:
        got = f"{len(scores)} scores" if isinstance(scores, list) else type(scores).__name__
        raise VerifierError(f"the server returned {got} for image {image}'s {n} questions")
    for j, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:  # NaN fails too
            raise VerifierError(f"the server returned {str(s)[:40]!r} as score {j} of image {image}; scores must be "
                                f"finite numbers in [0, 1]")
    return [float(s) for s in scores]
