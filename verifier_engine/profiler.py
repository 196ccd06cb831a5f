"""Latency and throughput of a verifier backend in-process, or of a running server under load.

- ``profile_verifier``: calls ``verifier.score`` on synthetic images (``batch_images`` per call, each with
  ``questions_per_image`` questions) until ``iterations`` calls or ``duration`` seconds, after ``warmup`` calls.
- ``profile_server``: ``concurrency`` workers send ``POST /v1/score`` requests to a URL until ``requests`` requests
  or ``duration`` seconds (both bounded); the URL must be loopback unless ``allow_remote``. Batch sizes come from the
  server's own ``/metrics`` (difference before/after).
Both report images/s, questions/s, latency p50/p90/p99 per call, batch sizes and, when nvidia-ml-py is installed and
a GPU is visible, GPU utilisation and memory sampled by NVML every 50 ms. ``format_table`` prints it for humans.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .server import LOOPBACK

QUESTION_BANK = (
    "Is there a red circle in the image?", "Are there exactly two blue squares?",
    "Is the triangle to the left of the square?", "Is the image a watercolor painting?",
    "Is the dog sitting on the bench behind the tree?", "Is any text in the image legible?",
    "Are the shapes' edges clean and sharp?", "Is the lighting consistent across the scene?",
    "Does the scene look physically plausible?", "Is the image free of distorted anatomy?",
    "Is the bench partially hidden by the tree?", "Is the sky blue?", "Are there three green triangles?",
    "Is the large circle above the small square?", "Is the composition aesthetically pleasing?",
    "Is the texture of the grass realistic?",
)


def synthetic_batch(n_images: int, questions_per_image: int, size: int = 448, seed: int = 0):
    from .testing import random_images
    images = random_images(n_images, (size, size), seed)
    qs = [[QUESTION_BANK[(i + j) % len(QUESTION_BANK)] + ("" if j < len(QUESTION_BANK) else f" ({j})")
           for j in range(questions_per_image)] for i in range(n_images)]
    return images, qs


class NVMLSampler:
    """Samples GPU utilisation (%) and memory used (MiB) of GPU ``index`` in a thread; no-op without NVML."""

    def __init__(self, index: int = 0, interval: float = 0.05):
        self.index, self.interval = index, interval
        self.util: list[float] = []
        self.mem: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        self.available = False
        try:
            import pynvml  # nvidia-ml-py (the 'gpu' extra)
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.available = True
        except Exception:  # no package, no driver or no GPU: profiling goes on without GPU numbers
            self._nvml = None

    def _run(self):
        while not self._stop.is_set():
            try:
                self.util.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
                self.mem.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2 ** 20)
            except Exception:  # a failed sample is skipped, not fatal
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    def summary(self) -> dict | None:
        if not self.available or not self.util:
            return None
        return {"gpu_util_mean": float(np.mean(self.util)), "gpu_util_max": float(np.max(self.util)),
                "gpu_mem_max_mib": float(np.max(self.mem))}


def _stats(latencies: list[float], wall: float, images: int, questions: int) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"calls": len(latencies), "wall_s": wall, "images_per_s": images / wall if wall else 0.0,
            "questions_per_s": questions / wall if wall else 0.0,
            "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
            "latency_ms_p90": float(np.percentile(lat, 90)) if len(lat) else None,
            "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else None}


def profile_verifier(verifier, *, batch_images: int = 4, questions_per_image: int = 16, image_size: int = 448,
                     iterations: int = 20, duration: float = 30.0, warmup: int = 1, gpu_index: int = 0) -> dict:
    """Profile ``verifier.score`` in-process (bounded by ``iterations`` and ``duration``)."""
    images, qs = synthetic_batch(batch_images, questions_per_image, image_size)
    for _ in range(warmup):
        verifier.score(images, qs)
    report = getattr(verifier, "backend_metrics", None)
    before = report() if callable(report) else None
    lat = []
    with NVMLSampler(gpu_index) as nvml:
        t0 = time.perf_counter()
        while len(lat) < iterations and time.perf_counter() - t0 < duration:
            t = time.perf_counter()
            verifier.score(images, qs)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
    out = {"target": getattr(verifier, "name", type(verifier).__name__), "batch_images": batch_images,
           "questions_per_image": questions_per_image, "image_size": image_size,
           **_stats(lat, wall, len(lat) * batch_images, len(lat) * batch_images * questions_per_image),
           "batch_images_mean": float(batch_images)}
    out["gpu"] = nvml.summary()
    out["backend"] = _backend_report(before, report() if callable(report) else None)
    return out


def _backend_report(before: dict | None, after: dict | None) -> dict | None:
    """A backend's ``backend_metrics()`` after the run, plus the KV-cache hit rate of the timed window alone."""
    if after is None:
        return None
    out = dict(after)
    keys = ("kv_cache_reused_blocks", "kv_cache_missed_blocks")
    if before is not None and all(k in before and k in after for k in keys):
        reused, missed = (after[k] - before[k] for k in keys)
        out["kv_cache_hit_rate_window"] = reused / (reused + missed) if reused + missed else None
    return out


def profile_server(url: str, *, token: str | None = None, concurrency: int = 4, requests: int = 50,
                   duration: float = 30.0, batch_images: int = 1, questions_per_image: int = 16,
                   image_size: int = 448, timeout: float = 120.0, allow_remote: bool = False,
                   gpu_index: int = 0) -> dict:
    """Load-test a running server (bounded by ``requests`` and ``duration``; loopback unless ``allow_remote``)."""
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"refusing to load-test {host!r}: profiles stay on loopback (127.0.0.1) unless "
                         f"allow_remote=True (--allow-remote)")
    if requests < 1 or duration <= 0 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1 and duration > 0")
    return asyncio.run(_profile_server(url.rstrip("/"), token, concurrency, requests, duration, batch_images,
                                       questions_per_image, image_size, timeout, gpu_index))


async def _profile_server(url, token, concurrency, n_requests, duration, batch_images, qpi, size, timeout, gpu):
    from ._http import encode_image, import_httpx
    from .metrics import parse_metrics
    httpx = import_httpx()
    images, qs = synthetic_batch(batch_images, qpi, size)
    payload = {"images": [encode_image(im) for im in images], "questions": qs}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=timeout) as client:
        async def scrape():
            r = await client.get(url + "/metrics")
            return parse_metrics(r.text) if r.status_code == 200 else {}

        r = await client.post(url + "/v1/score", json=payload)  # warm-up (and a clear error if it fails)
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request failed: HTTP {r.status_code}: {r.text[:300]}")
        before = await scrape()
        lat, errors, sent = [], 0, 0
        deadline = time.perf_counter() + duration

        async def worker():
            nonlocal errors, sent
            while sent < n_requests and time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                try:
                    resp = await client.post(url + "/v1/score", json=payload)
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

        with NVMLSampler(gpu) as nvml:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - t0
        after = await scrape()
    dc = after.get("verifier_batch_images_count", 0) - before.get("verifier_batch_images_count", 0)
    ds = after.get("verifier_batch_images_sum", 0) - before.get("verifier_batch_images_sum", 0)
    out = {"target": url, "concurrency": concurrency, "batch_images": batch_images, "questions_per_image": qpi,
           "image_size": size, "errors": errors,
           **_stats(lat, wall, len(lat) * batch_images, len(lat) * batch_images * qpi),
           "batch_images_mean": ds / dc if dc else None, "gpu": nvml.summary()}
    prefix = 'verifier_backend_stat{name="'
    stat = lambda m: {k[len(prefix):-2]: v for k, v in m.items() if k.startswith(prefix)}  # noqa: E731
    out["backend"] = _backend_report(stat(before) or None, stat(after) or None)
    return out


def format_table(result: dict[str, Any]) -> str:
    """A two-column human table of a profile result."""
    rows = []
    for k, v in result.items():
        if isinstance(v, dict):
            rows += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        else:
            rows.append((k, v))
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))  # noqa: E731
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)
