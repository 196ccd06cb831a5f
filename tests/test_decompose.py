"""``alphagrpo data decompose`` against a fake OpenAI-compatible server on 127.0.0.1: strict parsing, bounded retries,
bounded concurrency, append-only resumable output."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alphagrpo.decompose import ChatLLM, DecompositionError, decompose_file, parse_decomposition

GOOD = {"semantic_questions": [{"question": "Is there a red apple?", "tag": "Existence"},
                               {"question": "Is the apple on the table?", "tag": "Spatial"}],
        "quality_questions": [{"question": "Is the apple's shape natural?", "tag": "Geometry"}]}
GOOD2 = {"semantic_questions": [{"question": "Are there exactly two cats?", "tag": "Count"}],
         "quality_questions": [{"question": "Is the lighting consistent?", "tag": "Lighting"},
                               {"question": "Is the image aesthetically pleasing?", "tag": "Aesthetics"}]}


def answer_for(prompt: str, attempt: int) -> str:
    if prompt == "a red apple on a table":
        return json.dumps(GOOD)
    if prompt == "two cats":     # a reasoning model's thoughts (with braces), then a fenced answer: well formed
        return "<think>a {draft} first</think>\n```json\n" + json.dumps(GOOD2) + "\n```"
    if prompt == "a flaky answer":                                  # malformed once, then good
        return "Sure! Here are" if attempt == 1 else json.dumps(GOOD)
    if prompt == "never json":
        return "I cannot help with that."
    if prompt == "partial answer":                                  # quality list missing
        return json.dumps({"semantic_questions": GOOD["semantic_questions"]})
    if prompt == "wrong tag":
        return json.dumps({**GOOD, "quality_questions": [{"question": "Is it pretty?", "tag": "Colour"}]})
    raise AssertionError(prompt)


class FakeLLM:
    """A real HTTP server speaking /v1/chat/completions; counts calls per prompt and the peak of requests in flight."""

    def __init__(self, delay=0.05):
        self.calls, self.inflight, self.peak, self.delay = {}, 0, 0, delay
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                assert self.path == "/v1/chat/completions"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if body["model"] != "fake":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                text = body["messages"][-1]["content"]
                prompt = text.rsplit("Prompt: ", 1)[1].strip()
                with fake.lock:
                    fake.calls[prompt] = fake.calls.get(prompt, 0) + 1
                    attempt = fake.calls[prompt]
                    fake.inflight += 1
                    fake.peak = max(fake.peak, fake.inflight)
                time.sleep(fake.delay)
                with fake.lock:
                    fake.inflight -= 1
                reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                             "content": answer_for(prompt, attempt)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


PROMPTS = ["a red apple on a table", "never json", "two cats", "partial answer", "a flaky answer", "wrong tag"]


def read_out(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_holds_exactly_the_good_decompositions_and_a_rerun_resumes(tmp_path):
    inp = tmp_path / "prompts.txt"
    inp.write_text("\n".join(PROMPTS + ["two cats"]) + "\n")          # a repeated prompt is asked once
    out = tmp_path / "out.jsonl"
    with FakeLLM() as llm:
        s = decompose_file(inp, out, ChatLLM(llm.url, "fake"), concurrency=2, retries=2)
        assert llm.peak <= 2
        recs = {r["prompt"]: r for r in read_out(out)}
        assert set(recs) == {"a red apple on a table", "two cats", "a flaky answer"}
        assert recs["a red apple on a table"]["semantic_questions"] == GOOD["semantic_questions"]
        assert recs["two cats"]["quality_questions"] == GOOD2["quality_questions"]
        assert (s.succeeded, s.already_done, s.total) == (3, 0, 6)
        assert sorted(f["prompt"] for f in s.failed) == ["never json", "partial answer", "wrong tag"]
        assert "quality_questions" in dict((f["prompt"], f["reason"]) for f in s.failed)["partial answer"]
        assert llm.calls["never json"] == 3 and llm.calls["a flaky answer"] == 2 and llm.calls["two cats"] == 1

        s2 = decompose_file(inp, out, ChatLLM(llm.url, "fake"), concurrency=2, retries=0)
        assert llm.calls["a red apple on a table"] == 1 and llm.calls["two cats"] == 1   # done: not asked again
        assert llm.calls["never json"] == 4                                            # failed: asked again
        assert (s2.already_done, s2.succeeded, len(s2.failed)) == (3, 0, 3)
    assert len(read_out(out)) == 3

    from alphagrpo.worlds.shapes.synth import read_jsonl     # the reader the jsonl world uses
    assert [r["prompt"] for r in read_jsonl(str(out))] == [r["prompt"] for r in read_out(out)]


def test_a_torn_last_line_is_dropped_and_its_prompt_asked_again(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "two cats", "source": "mine"}) + "\n"
                   + json.dumps({"prompt": "a red apple on a table"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"prompt": "two cats", **GOOD2}) + "\n" + '{"prompt": "a red apple on a ta')
    with FakeLLM(delay=0) as llm:
        s = decompose_file(inp, out, ChatLLM(llm.url + "/v1", "fake"))
        assert llm.calls == {"a red apple on a table": 1}
    assert (s.already_done, s.succeeded) == (1, 1)
    assert [r["prompt"] for r in read_out(out)] == ["two cats", "a red apple on a table"]


def test_command_reports_failures_and_exits_non_zero(tmp_path, capsys):
    from alphagrpo.cli import main
    inp = tmp_path / "p.txt"
    inp.write_text("two cats\nnever json\n")
    with FakeLLM(delay=0) as llm:
        rc = main(["data", "decompose", "--llm", llm.url, "--model", "fake", "--in", str(inp), "--out",
                   str(tmp_path / "o.jsonl"), "--retries", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert any("never json" in ln and "skipped" in ln for ln in lines)
    assert json.loads(lines[-1]) == {"out": str(tmp_path / "o.jsonl"), "total": 2, "already_done": 0,
                                     "succeeded": 1, "failed": 1}


@pytest.mark.parametrize("text, why", [
    ("no json here", "no JSON object"),
    ('{"semantic_questions": [], "quality_questions": []}', "non-empty list"),
    ('{"semantic_questions": [{"question": "Is there a cat", "tag": "Existence"}], '
     '"quality_questions": [{"question": "Is it sharp?", "tag": "Texture"}]}', "ending in '?'"),
    ('{"semantic_questions": [{"question": "Is it sharp?", "tag": "Texture"}], '
     '"quality_questions": [{"question": "Is it sharp?", "tag": "Texture"}]}', "is not one of"),
])
def test_parse_refuses_incomplete_or_mistagged_answers(text, why):
    with pytest.raises(DecompositionError, match=why):
        parse_decomposition(text)


def test_a_refused_request_stops_the_run_instead_of_retrying(tmp_path):
    inp = tmp_path / "p.txt"
    inp.write_text("two cats\n")
    with FakeLLM(delay=0) as llm:
        with pytest.raises(ValueError, match="HTTP 404"):
            decompose_file(inp, tmp_path / "o.jsonl", ChatLLM(llm.url, "no-such-model"), retries=3)
    assert (tmp_path / "o.jsonl").read_text() == ""
