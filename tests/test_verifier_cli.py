"""``verifier-engine`` end to end: make-tiny, score, profile a backend, serve (subprocess on 127.0.0.1) + profile it."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from verifier_engine.cli import main  # noqa: E402
from verifier_engine.profiler import profile_server  # noqa: E402



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3vl")
    assert main(["make-tiny", path, "--family", "qwen3_vl"]) == 0
    return path


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_score_command_prints_scores_for_local_images(tiny_dir, tmp_path, capsys):
    from PIL import Image

    from verifier_engine.testing import random_images
    paths = []
    for i, im in enumerate(random_images(2, (64, 64), seed=4)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    args = ["score", "--backend", "native", "--model", tiny_dir, "--device", "cpu", "--question", "Is it red?",
            "--question", "Is it blue?"] + [a for p in paths for a in ("--image", p)]
    assert main(args) == 0
    plain = _last_json(capsys.readouterr().out)["scores"]
    assert main(args + ["--expected", "no"]) == 0
    inverted = _last_json(capsys.readouterr().out)["scores"]
    assert len(plain) == 2 and all(0 < s < 1 for row in plain for s in row)
    assert all(abs(a + b - 1) < 1e-9 for ra, rb in zip(plain, inverted) for a, b in zip(ra, rb))


def test_profile_command_on_a_backend_prints_a_table_then_json(tiny_dir, capsys):
    assert main(["profile", "--backend", "native", "--model", tiny_dir, "--device", "cpu", "--batch-images", "2",
                 "--questions", "4", "--image-size", "64", "--iterations", "3", "--duration", "20"]) == 0
    out = capsys.readouterr().out
    res = _last_json(out)
    assert "questions_per_s" in out.splitlines()[0] or "latency_ms_p50" in out
    assert res["calls"] == 3 and res["questions_per_s"] > 0 and res["images_per_s"] > 0
    assert res["latency_ms_p50"] <= res["latency_ms_p90"] <= res["latency_ms_p99"]
    assert res["gpu"] is None or "gpu_util_mean" in res["gpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_serves_over_http_and_the_profiler_loads_it(tiny_dir):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", VERIFIER_ENGINE_TOKEN="tok")
    proc = subprocess.Popen([sys.executable, "-m", "verifier_engine.cli", "--log-level", "warning", "serve",
                             "--backend", "native", "--model", tiny_dir, "--device", "cpu", "--port", str(port),
                             "--max-wait-ms", "10"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/metrics").status_code == 401  # the token from the environment is enforced
        res = profile_server(url, token="tok", concurrency=3, requests=9, duration=60, batch_images=1,
                             questions_per_image=4, image_size=64)
        assert res["errors"] == 0 and res["calls"] == 9 and res["questions_per_s"] > 0
        assert res["batch_images_mean"] is not None and 1 <= res["batch_images_mean"] <= 3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_profiling_a_remote_server_is_refused_unless_allowed():
    with pytest.raises(ValueError, match="loopback"):
        profile_server("http://10.1.2.3:8000", requests=1, duration=1)
