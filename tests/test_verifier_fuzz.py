"""Fuzz the verifier server: a few hundred generated good and bad requests, mixed and sent concurrently over
127.0.0.1. Every good request must get its own scores (equal to scoring it alone), every bad one its 4xx (or its
own 500 when it makes the backend fail), no answer may quote another client, and the process's memory must stay
within a stated bound. Runs once with a cheap deterministic verifier, once with the tiny random Qwen2.5-VL."""
import asyncio
import json
import random
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _verifier_hostile import PeakRSS, b64, gif_bytes, huge_header_png, png_bytes, text_bomb_png  # noqa: E402
from verifier_engine._http import encode_image  # noqa: E402
from verifier_engine.metrics import parse_metrics  # noqa: E402
from verifier_engine.protocol import ImageSpec  # noqa: E402
from verifier_engine.server import ServerConfig, create_app  # noqa: E402
from verifier_engine.testing import random_images, serve_in_thread  # noqa: E402

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SKULL = "\u2620"  # valid text that the fake backend cannot score: passes validation, fails inside the backend


def _shrink(width, height, budget=48 * 48):
    k = 1
    while (width // k) * (height // k) > budget:
        k += 1
    return max(1, width // k), max(1, height // k)


class FakeVerifier:
    """Deterministic scores from the question, the decoded size and the mean colour (so a misrouted score, a wrong
    shrink or a mixed-up image shows); refuses aspect ratios beyond 8:1 and shrinks to at most 48x48 pixels
    (through ``image_spec``), and fails inside ``score`` on a question holding SKULL or on a 13x7 image."""

    def __init__(self, delay=0.005):
        self.delay, self.calls, self.gate = delay, [], threading.Event()

    def image_spec(self):
        return ImageSpec(max_aspect_ratio=8.0, target_size=_shrink)

    @staticmethod
    def value(size, mean, question):
        return (zlib.crc32(question.encode()) % 1000 / 1000 * 0.5 + (size[0] * 31 + size[1] * 17) % 100 / 100 * 0.3
                + mean / 255 * 0.2)

    def score(self, images, question_lists):
        self.gate.wait(20)
        self.calls.append(len(images))
        time.sleep(self.delay)
        out = []
        for im, qs in zip(images, question_lists):
            if im.size == (13, 7):
                raise RuntimeError(f"cannot score an image of {im.size}")
            bad = [q for q in qs if SKULL in q]
            if bad:
                raise RuntimeError(f"cannot read {bad[0]!r}")
            mean = float(np.asarray(im, dtype=np.float64).mean())
            out.append([self.value(im.size, mean, q) for q in qs])
        return out


FAKE_CONFIG = dict(max_batch_images=12, max_wait_ms=10, max_images_per_request=4, max_questions_per_image=4,
                   max_question_chars=80, max_pixels=200 * 200, max_request_pixels=3 * 200 * 200,
                   max_request_bytes=300_000, token=TOKEN)


def _image(rng, w, h):
    if rng.random() < 0.5:
        return b64(png_bytes(w, h, colour=tuple(int(c) for c in rng.integers(0, 256, 3))))
    return b64(png_bytes(w, h, noise_seed=int(rng.integers(1 << 30))))


def good_request(rng, k, max_side=120, max_ratio=4):
    n = int(rng.integers(1, 4))
    images, questions = [], []
    for i in range(n):
        w = int(rng.integers(8, max_side))
        h = int(np.clip(w * rng.uniform(1 / max_ratio, max_ratio), 8, max_side))
        images.append(_image(rng, w, h))
        questions.append([f"client {k} image {i} question {j}: is it " + "very " * int(rng.integers(0, 6)) + "red?"
                          for j in range(int(rng.integers(1, 5)))])
    body = {"images": images, "questions": questions}
    if rng.random() < 0.4:
        body["expected_answers"] = [[["yes", "no", None, "NO"][int(rng.integers(4))] for _ in qs]
                                    if rng.random() < 0.7 else None for qs in questions]
    return body


def bad_requests(rng, k):
    """Makers of ``(body bytes, headers, expected status)`` of many kinds; ``k`` marks the client."""
    one = {"images": [b64(png_bytes(24, 24, noise_seed=k % 8))], "questions": [[f"client {k} asks?"]]}

    def with_(**kw):
        return json.dumps({**one, **kw}).encode()
    text = with_(questions=[[f"client {k} is it red?", "is it blue?"]])
    return [
        lambda: (text, {}, 401),
        lambda: (text, {"Authorization": f"Bearer {TOKEN}x"}, 401),
        lambda: (text, {"Authorization": f"Basic {TOKEN}"}, 401),
        lambda: (text[: int(rng.integers(1, len(text) - 1))], AUTH, 400),
        lambda: (b"[" * 50_000 + b"]" * 50_000, AUTH, 400),
        lambda: (b'{"images": [{"a": ' * 3000 + b"1" + b"}]" * 3000 + b"}", AUTH, 400),
        lambda: (b"\xff\xfe not json", AUTH, 400),
        lambda: (with_(images=["not base64 at all!"]), AUTH, 400),
        lambda: (with_(images=[b64(bytes(rng.integers(0, 256, 300, dtype=np.uint8)))]), AUTH, 400),
        lambda: (with_(images=[b64(gif_bytes())]), AUTH, 400),
        lambda: (with_(images=[b64(png_bytes(250, 250))]), AUTH, 413),
        lambda: (with_(images=[b64(png_bytes(190, 190))] * 4, questions=[["a?"]] * 4), AUTH, 413),
        lambda: (with_(images=one["images"] * 5, questions=[["a?"]] * 5), AUTH, 413),
        lambda: (with_(questions=[["a?"] * 5]), AUTH, 413),
        lambda: (with_(questions=[["x" * 81]]), AUTH, 413),
        lambda: (with_(pad="p" * 310_000), AUTH, 413),
        lambda: (with_(images=[b64(text_bomb_png())]), AUTH, 413),
        lambda: (with_(images=[b64(huge_header_png())]), AUTH, 413),
        lambda: (with_(images=[b64(png_bytes(90, 10))]), AUTH, 422),
        lambda: (with_(questions=[[f"client {k} \udc80 asks?"]]), AUTH, 422),
        lambda: (b"[1, 2, 3]", AUTH, 422),
        lambda: (json.dumps({"images": one["images"]}).encode(), AUTH, 422),
        lambda: (with_(questions=[["a?"], ["b?"]]), AUTH, 422),
        lambda: (json.dumps({"images": [], "questions": []}).encode(), AUTH, 422),
        lambda: (with_(questions=[["   "]]), AUTH, 422),
        lambda: (with_(questions=[[7]]), AUTH, 422),
        lambda: (with_(questions="a?"), AUTH, 422),
        lambda: (with_(images={"0": "x"}), AUTH, 422),
        lambda: (with_(expected_answers=[["maybe"]]), AUTH, 422),
        lambda: (with_(expected_answers=[{"yes": 0}]), AUTH, 422),
        lambda: (with_(expected_answers="yes"), AUTH, 422),
    ]


def culprit_requests(rng, k):
    """Requests that pass validation but make the fake backend fail: each must get its own 500."""
    g = good_request(rng, k)
    return [
        (json.dumps({"images": g["images"][:1], "questions": [[f"client {k} {SKULL} question?"]]}).encode(), 500),
        (json.dumps({"images": [b64(png_bytes(13, 7))], "questions": [[f"client {k} odd size?"]]}).encode(), 500),
    ]


def _marks(text: str) -> set[str]:
    """The client markers ("client 12 ") an answer mentions."""
    import re
    return set(re.findall(r"client \d+ ", text))


async def _send_all(url, jobs, concurrency):
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one(body, headers):
            async with sem:
                return await c.post(url + "/v1/score", content=body,
                                    headers={"content-type": "application/json", **headers})
        return await asyncio.gather(*(one(b, h) for b, h in jobs))


def _open_gate_when_queued(batcher, gate, n_images, timeout=15.0):
    def watch():
        deadline = time.monotonic() + timeout
        while batcher.waiting < n_images and time.monotonic() < deadline:
            time.sleep(0.002)
        gate.set()
    threading.Thread(target=watch, daemon=True).start()


def test_fuzz_a_few_hundred_mixed_requests_concurrently_with_a_fake_backend():
    rng = np.random.default_rng(2024)
    jobs = []  # (body, headers, kind, status, client)
    for k in range(300):
        r = rng.random()
        if r < 0.55:
            jobs.append((json.dumps(good_request(rng, k)).encode(), AUTH, "good", 200, k))
        elif r < 0.65:
            body, status = culprit_requests(rng, k)[int(rng.integers(2))]
            jobs.append((body, AUTH, "culprit", status, k))
        else:
            bads = bad_requests(rng, k)
            body, headers, status = bads[int(rng.integers(len(bads)))]()
            jobs.append((body, headers, "bad", status, k))
    kinds = {kind: sum(j[2] == kind for j in jobs) for kind in ("good", "bad", "culprit")}
    assert kinds["good"] > 150 and kinds["bad"] > 80 and kinds["culprit"] > 15

    v = FakeVerifier()
    app = create_app(v, ServerConfig(**FAKE_CONFIG))
    with serve_in_thread(app) as url:
        _send_all_sync = lambda js, c: asyncio.run(_send_all(url, js, c))  # noqa: E731
        v.gate.set()
        warm = _send_all_sync([(j[0], j[1]) for j in jobs[:8]], 8)  # first-use allocations outside the measure
        assert len(warm) == 8
        v.gate.clear()
        _open_gate_when_queued(app.state.batcher, v.gate, 12)  # the first batch waits for a full queue
        with PeakRSS() as mem:
            answers = _send_all_sync([(j[0], j[1]) for j in jobs], 24)
        metrics = parse_metrics(httpx.get(url + "/metrics", headers=AUTH).text)
        goods = [j for j in jobs if j[2] == "good"]
        app.state.config.max_wait_ms = 0  # alone: one request at a time, no waiting for company
        alone = _send_all_sync([(j[0], j[1]) for j in goods], 1)
        health = httpx.get(url + "/health").json()

    by_good = iter(alone)
    for (body, _, kind, status, k), r in zip(jobs, answers):
        assert r.status_code == status, (kind, k, r.text[:300])
        assert _marks(r.text) <= {f"client {k} "}, (k, r.text[:300])  # never another client's text
        if kind == "good":
            solo = next(by_good)
            assert solo.status_code == 200
            assert r.json()["scores"] == solo.json()["scores"]  # batched == alone, exactly (deterministic backend)
            req = json.loads(body)
            scores = r.json()["scores"]
            assert [len(s) for s in scores] == [len(q) for q in req["questions"]]
            assert all(0 <= s <= 1 for row in scores for s in row)
        elif kind == "culprit":
            assert "cannot" in r.json()["error"]["message"]
        else:
            assert "error" in r.json() and "Traceback" not in r.text
    assert max(v.calls) > 4  # requests really were batched together
    assert metrics["verifier_split_batches_total"] >= 1  # ... and failed batches were split
    assert health["queue_images"] == 0 and health["queue_pixels"] == 0
    # Memory bound: the server holds at most 24 bodies of <= 300 kB (plus their decoded copies), 4 images being
    # decoded (<= 200 x 200 px) and a queue of images shrunk to <= 48 x 48 px, with the client's answers in the same
    # process: 64 MB at most (about 10 MB measured).
    assert mem.growth < 64 * 2 ** 20, f"RSS grew by {mem.growth / 2 ** 20:.0f} MB"


def test_fuzz_mixed_requests_with_the_tiny_random_qwen2_5_vl():
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from PIL import Image

    from verifier_engine.backends.native import NativeVerifier
    from verifier_engine.testing import build_tiny
    from verifier_engine.vlm import VLBundle
    model, tok, ip = build_tiny("qwen2_5_vl", seed=5)
    v = NativeVerifier(VLBundle(model, tok, ip))
    rng = random.Random(7)
    goods, jobs = [], []
    for k in range(48):
        if k % 3 != 2:
            n = rng.randint(1, 2)
            arrays = [random_images(1, (rng.randint(24, 240), rng.randint(24, 240)), seed=1000 * k + i)[0]
                      for i in range(n)]
            qls = [[f"client {k} is it {'very ' * rng.randint(0, 4)}red?" for _ in range(rng.randint(1, 3))]
                   for _ in range(n)]
            body = {"images": [encode_image(a) for a in arrays], "questions": qls}
            goods.append((len(jobs), arrays, qls))
            jobs.append((json.dumps(body).encode(), 200, k))
        else:
            one = [encode_image(random_images(1, (32, 32), seed=k)[0])]
            bad = [
                ({"images": [b64(png_bytes(1, 4000))], "questions": [[f"client {k} tall?"]]}, 422),
                ({"images": [b64(png_bytes(4000, 2))], "questions": [[f"client {k} wide?"]]}, 422),
                ({"images": one, "questions": [[f"client {k} \ud800?"]]}, 422),
                ({"images": one, "questions": [[f"client {k} a?"]], "expected_answers": [["yes", "no"]]}, 422),
                ({"images": [b64(text_bomb_png())], "questions": [[f"client {k} a?"]]}, 413),
                ({"images": one + ["%%%"], "questions": [["a?"], ["b?"]]}, 400),
                ({"images": one, "questions": [[f"client {k} <|image_pad|>?"]]}, 422),
            ][(k // 3) % 7]
            jobs.append((json.dumps(bad[0]).encode(), bad[1], k))
    with torch.inference_mode():
        local = [v.score([Image.fromarray(a) for a in arrays], qls) for _, arrays, qls in goods]
    app = create_app(v, ServerConfig(max_batch_images=8, max_wait_ms=20), backend="native", model="tiny")
    with serve_in_thread(app) as url:
        asyncio.run(_send_all(url, [(b, {}) for b, _, _ in jobs[:4]], 4))  # warm up
        with PeakRSS() as mem:
            answers = asyncio.run(_send_all(url, [(b, {}) for b, _, _ in jobs], 12))
        metrics = parse_metrics(httpx.get(url + "/metrics").text)
        app.state.config.max_wait_ms = 0  # alone: one request at a time, no waiting for company
        alone = asyncio.run(_send_all(url, [(jobs[i][0], {}) for i, _, _ in goods], 1))
    for (body, status, k), r in zip(jobs, answers):
        assert r.status_code == status, (k, r.text[:300])
        assert _marks(r.text) <= {f"client {k} "}
    for (i, _, qls), solo, want in zip(goods, alone, local):
        got = answers[i].json()["scores"]
        assert [len(s) for s in got] == [len(q) for q in qls]
        assert np.allclose(np.concatenate(got), np.concatenate(solo.json()["scores"]), atol=1e-5)
        assert np.allclose(np.concatenate(got), np.concatenate(want), atol=1e-5)
    assert metrics["verifier_batch_images_count"] < len(goods)  # some requests shared a backend call
    # Images are shrunk to the processor's 128 x 128 pixel budget at decode, so the queue holds little; the bound
    # covers the model's activations for batches of 8 small images and the request bodies in flight: 128 MB at most
    # (about 13 MB measured).
    assert mem.growth < 128 * 2 ** 20, f"RSS grew by {mem.growth / 2 ** 20:.0f} MB"
