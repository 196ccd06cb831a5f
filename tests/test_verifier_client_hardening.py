"""The HTTP client against servers that misbehave: invalid scores, answers trickled byte by byte (loopback only)."""
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from verifier_engine import VerifierClient, VerifierError  # noqa: E402
from verifier_engine.testing import random_images, serve_in_thread  # noqa: E402


def fixed_answer_app(answer: dict):
    """A /v1/score stand-in that answers ``answer["raw"]`` (JSON text, possibly with NaN or Infinity) with 200."""
    from fastapi import FastAPI
    from fastapi.responses import Response
    app = FastAPI()

    @app.post("/v1/score")
    async def score():
        return Response(answer["raw"], media_type="application/json")

    return app


BAD_SCORES = [  # one image, two questions
    ("NaN", b'{"scores": [[0.5, NaN]]}', "finite numbers in [0, 1]"),
    ("Infinity", b'{"scores": [[Infinity, 0.5]]}', "finite numbers in [0, 1]"),
    ("overflowing literal", b'{"scores": [[1e999, 0.5]]}', "finite numbers in [0, 1]"),
    ("above one", b'{"scores": [[0.5, 1.5]]}', "finite numbers in [0, 1]"),
    ("negative", b'{"scores": [[-0.01, 0.5]]}', "finite numbers in [0, 1]"),
    ("huge integer", b'{"scores": [[' + b"9" * 400 + b', 0.5]]}', "finite numbers in [0, 1]"),
    ("string", b'{"scores": [["0.5", 0.5]]}', "finite numbers in [0, 1]"),
    ("boolean", b'{"scores": [[true, 0.5]]}', "finite numbers in [0, 1]"),
    ("null", b'{"scores": [[null, 0.5]]}', "finite numbers in [0, 1]"),
    ("nested list", b'{"scores": [[[0.5], 0.5]]}', "finite numbers in [0, 1]"),
    ("too few scores", b'{"scores": [[0.5]]}', "1 scores for image 0's 2 questions"),
    ("row is an object", b'{"scores": [{"a": 0.5, "b": 0.5}]}', "dict for image 0's 2 questions"),
    ("no scores", b'{"answer": "yes"}', "no 'scores' list"),
]


@pytest.fixture(scope="module")
def fixed_server():
    answer = {"raw": b"{}"}
    with serve_in_thread(fixed_answer_app(answer)) as url:
        yield url, answer


@pytest.mark.parametrize("name,raw,words", BAD_SCORES, ids=[b[0] for b in BAD_SCORES])
def test_invalid_scores_from_the_server_raise_whatever_the_failure_policy(name, raw, words, fixed_server):
    url, answer = fixed_server
    answer["raw"] = raw
    images = random_images(1, (16, 16), seed=0)
    for policy in ("zero", "raise"):
        with VerifierClient(url, retries=2, backoff=0.0, on_failure=policy) as c:
            with pytest.raises(VerifierError, match=words.replace("[", r"\[").replace("]", r"\]")):
                c.score(images, [["a?", "b?"]])
            assert c.http_stats["retries"] == 0 and c.stats["failed_images"] == 0


def test_valid_edge_scores_are_accepted_as_floats(fixed_server):
    url, answer = fixed_server
    answer["raw"] = b'{"scores": [[0, 1, 1.0, 0.0, 5e-324]]}'
    images = random_images(1, (16, 16), seed=0)
    with VerifierClient(url) as c:
        got = c.score(images, [["a?", "b?", "c?", "d?", "e?"]])
    assert got == [[0.0, 1.0, 1.0, 0.0, 5e-324]] and all(type(s) is float for s in got[0])


class TricklingServer:
    """Answers every request with a valid 200 whose body arrives one byte every ``every_s`` seconds: no single read
    ever waits long, so only a timeout on the whole attempt can stop it."""

    def __init__(self, every_s: float = 0.05):
        self.every_s = every_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        self.sock.close()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        body = b'{"scores": [[0.5]]}' + b" " * 400
        try:
            conn.settimeout(5)
            conn.recv(1 << 20)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n")
            for i in range(len(body)):
                if self.stop.is_set():
                    break
                conn.sendall(body[i:i + 1])
                time.sleep(self.every_s)
        except OSError:
            pass
        finally:
            conn.close()


def test_timeout_bounds_the_whole_attempt_against_a_server_that_trickles_its_answer():
    images = random_images(1, (16, 16), seed=0)
    with TricklingServer(every_s=0.05) as server:  # the whole answer would take about 21 s
        with VerifierClient(server.url, timeout=0.5, retries=1, backoff=0.0, on_failure="raise") as c:
            t = time.perf_counter()
            with pytest.raises(VerifierError, match="no complete answer within 0.5 s"):
                c.score(images, [["a?"]])
            elapsed = time.perf_counter() - t
            assert c.http_stats["retries"] == 1
        assert server.connections == 2
    assert elapsed < 8.0  # two attempts of 0.5 s; generous for a loaded CI machine, far below 2 x 21 s
