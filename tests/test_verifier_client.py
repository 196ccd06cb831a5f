"""The HTTP client: retries, failure policy, timeouts and balancing against servers that fail (loopback only)."""
import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from verifier_engine import Verifier, VerifierClient, VerifierError  # noqa: E402
from verifier_engine.testing import random_images, serve_in_thread  # noqa: E402


def scoring_app(name: str, hits: dict, fail_first: int = 0, status: int = 503, sleep: float = 0.0):
    """A /v1/score stand-in: fails the first ``fail_first`` requests with ``status``, then answers
    ``len(question) / 100`` per question (plus 0.5 for expected 'no'), counting requests in ``hits[name]``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request):
        hits[name] = hits.get(name, 0) + 1
        if hits[name] <= fail_first:
            return JSONResponse({"error": {"message": "synthetic failure"}}, status_code=status)
        if sleep:
            await asyncio.sleep(sleep)
        body = await request.json()
        exp = body.get("expected_answers") or [None] * len(body["images"])
        return {"scores": [[len(q) / 100 + (0.5 if e and e[j] == "no" else 0.0) for j, q in enumerate(qs)]
                           for qs, e in zip(body["questions"], exp)]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "name": name}

    return app


def _batch(n=5):
    images = random_images(n, (16, 16), seed=1)
    return images, [[f"q{i}" + "?" * j for j in range(1 + i % 3)] for i in range(n)]


def _want(qls):
    return [[len(q) / 100 for q in qs] for qs in qls]


def test_client_retries_transient_failures_and_implements_the_protocol():
    hits = {}
    images, qls = _batch()
    with serve_in_thread(scoring_app("a", hits, fail_first=2)) as url:
        with VerifierClient(url, retries=3, backoff=0.01, max_images_per_request=2, concurrency=1) as c:
            assert isinstance(c, Verifier)
            assert c.score(images, qls) == _want(qls)
            assert c.http_stats["retries"] == 2 and c.stats["failed_images"] == 0
    assert hits["a"] == 2 + 3  # two failures, then three requests of <= 2 images


def test_failure_policy_zero_scores_failed_requests_0_and_raise_raises():
    images, qls = _batch(3)
    with serve_in_thread(scoring_app("down", {}, fail_first=10 ** 6)) as url:
        with VerifierClient(url, retries=1, backoff=0.0, on_failure="zero") as c:
            assert c.score(images, qls) == [[0.0] * len(q) for q in qls]
            assert c.stats["failed_images"] == 3
        with VerifierClient(url, retries=1, backoff=0.0, on_failure="raise") as c:
            with pytest.raises(VerifierError, match="HTTP 503"):
                c.score(images, qls)


def test_a_request_the_server_rejects_raises_whatever_the_policy():
    images, qls = _batch(2)
    with serve_in_thread(scoring_app("strict", {}, fail_first=10 ** 6, status=401)) as url:
        with VerifierClient(url, retries=3, on_failure="zero") as c:
            with pytest.raises(VerifierError, match="401"):
                c.score(images, qls)
            assert c.http_stats["retries"] == 0  # a 4xx is not retried


def test_timeouts_count_as_failures_after_retries():
    images, qls = _batch(1)
    with serve_in_thread(scoring_app("slow", {}, sleep=1.0)) as url:
        with VerifierClient(url, timeout=0.2, retries=1, backoff=0.0, on_failure="zero") as c:
            t = time.perf_counter()
            assert c.score(images, qls) == [[0.0]]
            assert time.perf_counter() - t < 1.5
            assert c.http_stats["retries"] == 1


def test_several_urls_are_balanced_and_a_dead_one_is_failed_over():
    hits = {}
    images, qls = _batch(8)
    with serve_in_thread(scoring_app("a", hits, sleep=0.05)) as a, \
            serve_in_thread(scoring_app("b", hits, sleep=0.05)) as b:
        with VerifierClient([a, b], max_images_per_request=1, concurrency=4) as c:
            assert c.score(images, qls) == _want(qls)
            assert hits["a"] >= 2 and hits["b"] >= 2 and hits["a"] + hits["b"] == 8
            health = c.health()
            assert [h["ok"] for h in health] == [True, True]
        dead = "http://127.0.0.1:9"
        with VerifierClient([dead, a], max_images_per_request=1, retries=2, backoff=0.0) as c:
            assert c.score(images, qls) == _want(qls)
            assert c.stats["failed_images"] == 0
            assert [h["ok"] for h in c.health()] == [False, True]


def test_submit_returns_a_future_and_ascore_awaits_expected_answers():
    images, qls = _batch(2)
    with serve_in_thread(scoring_app("a", {})) as url:
        with VerifierClient(url) as c:
            fut = c.submit(images, qls)
            assert fut.result(timeout=30) == _want(qls)
            exp = [["no"] * len(qls[0]), None]

            async def main():
                return await c.ascore(images, qls, exp)
            got = asyncio.run(main())
    assert np.allclose(got[0], [s + 0.5 for s in _want(qls)[0]]) and got[1] == _want(qls)[1]
