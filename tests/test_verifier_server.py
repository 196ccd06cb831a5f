"""The HTTP server over real HTTP on 127.0.0.1: scores, every bad input, the token, a concurrent burst, metrics."""
import asyncio
import base64
import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from verifier_engine._http import encode_image  # noqa: E402
from verifier_engine.metrics import parse_metrics  # noqa: E402
from verifier_engine.server import ServerConfig, create_app  # noqa: E402
from verifier_engine.testing import random_images, serve_in_thread  # noqa: E402


class EchoVerifier:
    """Deterministic scores that depend on the image and the question, so misrouted answers are caught.

    Records batch sizes; sleeps a little per batch so concurrent requests have time to queue up.
    """

    def __init__(self, delay=0.05, fail_on=None):
        self.batches, self.delay, self.fail_on = [], delay, fail_on
        self.lock = threading.Lock()

    @staticmethod
    def expect(image, question):
        return (float(np.asarray(image, dtype=np.float64).mean()) / 255.0 + len(question) / 100.0) % 1.0

    def score(self, images, question_lists):
        with self.lock:
            self.batches.append(len(images))
        if self.fail_on and any(self.fail_on in q for qs in question_lists for q in qs):
            raise RuntimeError("synthetic backend failure")
        time.sleep(self.delay)
        return [[self.expect(im, q) for q in qs] for im, qs in zip(images, question_lists)]


def png(seed=0, size=(16, 16)):
    return encode_image(random_images(1, size, seed)[0])


@pytest.fixture(scope="module")
def echo_server():
    v = EchoVerifier()
    cfg = ServerConfig(max_batch_images=6, max_wait_ms=30, max_images_per_request=8, max_questions_per_image=4,
                       max_pixels=64 * 64, max_request_bytes=200_000, max_question_chars=200)
    with serve_in_thread(create_app(v, cfg, backend="echo", model="none")) as url:
        yield url, v


BAD = [
    ("malformed JSON", b'{"images": [', 400, "malformed JSON"),
    ("not an object", b'[1, 2]', 422, "JSON object"),
    ("missing questions", b'{"images": ["x"]}', 422, "required"),
    ("empty images", b'{"images": [], "questions": []}', 422, "'images' is empty"),
    ("empty question list", None, 422, "questions[0] must be a non-empty list"),
    ("blank question", None, 422, "questions[0][0] must be a non-empty string"),
    ("count mismatch", None, 422, "1 images but 2 question lists"),
    ("bad base64", None, 400, "images[0] is not valid base64"),
    ("undecodable image", None, 400, "images[0] could not be decoded"),
    ("GIF image", None, 400, "send PNG or JPEG"),
    ("too many pixels", None, 413, "pixels, more than the limit 4096"),
    ("too many images", None, 413, "the limit is 8"),
    ("too many questions", None, 413, "the limit is 4 per image"),
    ("question too long", None, 413, "characters"),
    ("too many bytes", None, 413, "limit"),
    ("bad expected answer", None, 422, "'yes', 'no' or null"),
]


def bad_body(name):
    import json

    from PIL import Image
    good = png()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    bodies = {
        "empty question list": {"images": [good], "questions": [[]]},
        "blank question": {"images": [good], "questions": [["  "]]},
        "count mismatch": {"images": [good], "questions": [["a?"], ["b?"]]},
        "bad base64": {"images": ["not base64!!"], "questions": [["a?"]]},
        "undecodable image": {"images": [base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()],
                              "questions": [["a?"]]},
        "GIF image": {"images": [base64.b64encode(gif.getvalue()).decode()], "questions": [["a?"]]},
        "too many pixels": {"images": [png(size=(65, 64))], "questions": [["a?"]]},
        "too many images": {"images": [good] * 9, "questions": [["a?"]] * 9},
        "too many questions": {"images": [good], "questions": [["a?"] * 5]},
        "question too long": {"images": [good], "questions": [["a" * 201]]},
        "too many bytes": {"images": [good], "questions": [["a?"]], "pad": "x" * 300_000},
        "bad expected answer": {"images": [good], "questions": [["a?"]], "expected_answers": [["maybe"]]},
    }
    return json.dumps(bodies[name]).encode()


@pytest.mark.parametrize("name,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_saying_what_is_wrong_and_the_server_keeps_serving(echo_server, name, body, status,
                                                                               message):
    url, _ = echo_server
    body = body if body is not None else bad_body(name)
    r = httpx.post(url + "/v1/score", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    ok = httpx.post(url + "/v1/score", json={"images": [png(1)], "questions": [["Is it red?"]]}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["scores"][0]) == 1


def test_concurrent_burst_is_batched_dynamically_and_answers_go_to_the_right_request(echo_server):
    url, v = echo_server
    n_before = len(v.batches)
    reqs = []
    for k in range(24):
        imgs = random_images(1 + k % 3, (16, 16), seed=100 + k)
        qs = [[f"question {k} {j}" + "?" * (k % 5) for j in range(1 + (k + i) % 4)] for i in range(len(imgs))]
        reqs.append((imgs, qs))

    async def burst():
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(c.post(url + "/v1/score", json={"images": [encode_image(i) for i in imgs],
                                                                         "questions": qs}) for imgs, qs in reqs))
    answers = asyncio.run(burst())
    for (imgs, qs), r in zip(reqs, answers):
        assert r.status_code == 200, r.text
        want = [[EchoVerifier.expect(im, q) for q in qq] for im, qq in zip(imgs, qs)]
        assert np.allclose(np.concatenate(r.json()["scores"]), np.concatenate(want), atol=1e-12)
    sizes = v.batches[n_before:]
    assert sum(sizes) == sum(len(imgs) for imgs, _ in reqs)
    assert max(sizes) > 3 and max(sizes) <= 6  # requests were merged, never beyond max_batch_images
    m = parse_metrics(httpx.get(url + "/metrics").text)
    assert m['verifier_requests_total{status="200"}'] >= 24
    assert m["verifier_batch_images_count"] >= len(sizes) and m["verifier_request_latency_seconds_count"] >= 24
    assert m['verifier_errors_total{kind="invalid_request"}'] >= 0


def test_health_and_metrics_endpoints(echo_server):
    url, _ = echo_server
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["backend"] == "echo"
    r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("verifier_requests_total", "verifier_request_latency_seconds_bucket", "verifier_batch_images_bucket",
                 "verifier_batch_questions_bucket", "verifier_errors_total", "verifier_backend_latency_seconds"):
        assert name in r.text


def test_backend_failure_is_a_500_and_the_server_keeps_serving():
    v = EchoVerifier(delay=0.0, fail_on="explode")
    with serve_in_thread(create_app(v, ServerConfig(max_wait_ms=0))) as url:
        r = httpx.post(url + "/v1/score", json={"images": [png()], "questions": [["explode?"]]}, timeout=10)
        assert r.status_code == 500 and "synthetic backend failure" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/score", json={"images": [png()], "questions": [["fine?"]]}, timeout=10)
        assert r.status_code == 200


def test_bearer_token_guards_score_and_metrics_but_not_health():
    with serve_in_thread(create_app(EchoVerifier(delay=0), ServerConfig(token="s3cret", max_wait_ms=0))) as url:
        body = {"images": [png()], "questions": [["a?"]]}
        assert httpx.post(url + "/v1/score", json=body).status_code == 401
        assert httpx.post(url + "/v1/score", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.post(url + "/v1/score", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_native_backend_over_http_equals_in_process_scores_with_expected_answers():
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from verifier_engine.backends.native import NativeVerifier
    from verifier_engine.testing import build_tiny
    from verifier_engine.vlm import VLBundle
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, ip = build_tiny("qwen2_5_vl", seed=3)
        v = NativeVerifier(VLBundle(model, tok, ip))
        images = random_images(3, (64, 64), seed=11)
        qls = [["Is there a red circle?", "Is it sharp?"], ["Is the text legible?"], ["Yes", "no", "Is it blue?"]]
        local = v.score(images, qls)
        with serve_in_thread(create_app(v, ServerConfig(max_wait_ms=20), backend="native", model="tiny")) as url:
            body = {"images": [encode_image(im) for im in images], "questions": qls,
                    "expected_answers": [["yes", "no"], None, [None, "no", "yes"]]}
            r = httpx.post(url + "/v1/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()["scores"]
        want = [[local[0][0], 1 - local[0][1]], local[1], [local[2][0], 1 - local[2][1], local[2][2]]]
        assert np.allclose(np.concatenate(got), np.concatenate(want), atol=1e-6)
    finally:
        torch.set_num_threads(n)


def test_chunked_body_over_the_byte_limit_is_refused_without_content_length(echo_server):
    url, _ = echo_server

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000
    r = httpx.post(url + "/v1/score", content=chunks(), timeout=10)
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]
