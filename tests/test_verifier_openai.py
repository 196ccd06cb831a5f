"""The openai backend against a local fake OpenAI-compatible server (loopback) backed by a tiny Qwen-VL model."""
import base64
import io
import math

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from verifier_engine import VerifierError  # noqa: E402
from verifier_engine.backends.hf import HFVerifier  # noqa: E402
from verifier_engine.backends.openai import OpenAIVerifier, parse_top_logprobs  # noqa: E402
from verifier_engine.prompt import SYSTEM_PROMPT  # noqa: E402
from verifier_engine.testing import build_tiny, random_images, serve_in_thread  # noqa: E402
from verifier_engine.vlm import VLBundle  # noqa: E402



@pytest.fixture(scope="module")
def bundle():
    model, tok, ip = build_tiny("qwen3_vl", seed=2)
    return VLBundle(model, tok, ip)


def fake_openai_app(bundle, seen: list, fail_first: int = 0, hide_answers: bool = False, generate_route: bool = True):
    """A minimal SGLang/vLLM stand-in: /v1/chat/completions with top logprobs, SGLang's /generate with token ids.

    ``hide_answers``: the yes/no tokens never make the top-k list (a first-token distribution where they rank
    below k); ``generate_route=False``: no /generate (vLLM), so it answers 404."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from PIL import Image
    app = FastAPI()
    tok = bundle.tokenizer
    calls = {"n": 0}

    def logprobs(text: str, image_url: str | None):
        if image_url is None:  # text only (the auto mode's probe)
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
            if bundle._wants_mm_token_types():
                kw["mm_token_type_ids"] = torch.zeros_like(ids, dtype=torch.int32)
            with torch.no_grad():
                return bundle.model(**kw).logits[0, -1].double().log_softmax(-1)
        img = Image.open(io.BytesIO(base64.b64decode(image_url.partition(",")[2]))).convert("RGB")
        pv, grid, n_tok, _ = bundle.preprocess([img])
        ids = tok.encode(text.replace("<|image_pad|>", "<|image_pad|>" * n_tok[0]), add_special_tokens=False)
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = bundle.model(**bundle.model_inputs(ids, torch.ones_like(ids), pv, grid)).logits[0, -1]
        return logits.double().log_softmax(-1)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        calls["n"] += 1
        if calls["n"] <= fail_first:
            return JSONResponse({"error": "warming up"}, status_code=503)
        body = await request.json()
        seen.append(body)
        msgs, image_url = [], None
        for m in body["messages"]:
            if isinstance(m["content"], str):
                msgs.append(m)
                continue
            items = []
            for it in m["content"]:
                if it["type"] == "image_url":
                    image_url = it["image_url"]["url"]
                    items.append({"type": "image"})
                else:
                    items.append(it)
            msgs.append({"role": m["role"], "content": items})
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        lp = logprobs(text, image_url)
        ranked = lp.clone()
        if hide_answers:
            ranked[list(bundle.answers.ids)] = -math.inf
        top = ranked.topk(min(body["top_logprobs"], lp.numel()))
        entries = [{"token": tok.decode([int(i)]), "logprob": float(v), "bytes": list(tok.decode([int(i)]).encode())}
                   for v, i in zip(top.values, top.indices)]
        content = [{"token": entries[0]["token"], "logprob": entries[0]["logprob"], "bytes": entries[0]["bytes"],
                    "top_logprobs": entries}]
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": entries[0]["token"]},
                             "logprobs": {"content": content}}]}

    async def generate(request: Request):
        body = await request.json()
        seen.append(body)
        lp = logprobs(body["text"], body.get("image_data"))
        rows = [[float(lp[i]), int(i), None] for i in body["token_ids_logprob"]]
        return {"text": "", "meta_info": {"output_token_ids_logprobs": [rows]}}

    if generate_route:
        app.post("/generate")(generate)
    return app


def _batch():
    images = random_images(3, (64, 64), seed=7)
    qls = [["Is there a red circle?", "Is any text legible?"], ["Are there two squares?"], []]
    return images, qls


def test_top_logprobs_mode_matches_the_hf_oracle(bundle):
    images, qls = _batch()
    ref = HFVerifier(bundle).score(images, qls)
    seen = []
    with serve_in_thread(fake_openai_app(bundle, seen)) as url:
        v = OpenAIVerifier(url + "/v1", "tiny", top_logprobs=len(bundle.tokenizer), retries=0)
        try:
            got = v.score(images, qls, [["yes", "no"], None, []])
        finally:
            v.close()
    assert got[2] == [] and len(seen) == 3  # one request per (image, question)
    assert got[0][0] == pytest.approx(ref[0][0], abs=1e-6)
    assert got[0][1] == pytest.approx(1 - ref[0][1], abs=1e-6)  # expected "no" inverts
    assert got[1][0] == pytest.approx(ref[1][0], abs=1e-6)
    body = seen[0]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["model"] == "tiny"
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert [it["type"] for it in user["content"]] == ["image_url", "text"]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert {user["content"][1]["text"] for user in (b["messages"][1] for b in seen)} == \
        {"Is there a red circle?", "Is any text legible?", "Are there two squares?"}


def test_token_ids_mode_reads_exact_yes_no_ids_from_sglang_generate(bundle):
    images, qls = _batch()
    ref = HFVerifier(bundle).score(images, qls)
    seen = []
    with serve_in_thread(fake_openai_app(bundle, seen)) as url:
        v = OpenAIVerifier(url, "tiny", mode="token_ids", tokenizer=bundle.tokenizer, retries=0)
        try:
            got = v.score(images, qls)
        finally:
            v.close()
    assert np.allclose([s for r in got for s in r], [s for r in ref for s in r], atol=1e-6)
    assert sorted(seen[0]["token_ids_logprob"]) == sorted(bundle.answers.ids)
    assert seen[0]["sampling_params"]["max_new_tokens"] == 1


def test_transient_server_errors_are_retried(bundle):
    images, qls = random_images(1, (64, 64)), [["Is there a red circle?"]]
    with serve_in_thread(fake_openai_app(bundle, [], fail_first=2)) as url:
        v = OpenAIVerifier(url, "tiny", top_logprobs=len(bundle.tokenizer), retries=3, backoff=0.01)
        try:
            got = v.score(images, qls)
        finally:
            v.close()
    assert 0.0 < got[0][0] < 1.0


def test_failure_policy_when_the_server_is_down():
    port_closed = "http://127.0.0.1:9"  # discard port: nothing listens there
    images, qls = random_images(1, (32, 32)), [["Is there a cat?", "Is it red?"]]
    v = OpenAIVerifier(port_closed, retries=1, backoff=0.0, timeout=2.0)
    try:
        assert v.score(images, qls) == [[0.0, 0.0]] and v.stats["failed_queries"] == 2
    finally:
        v.close()
    v = OpenAIVerifier(port_closed, retries=0, timeout=2.0, on_failure="raise")
    try:
        with pytest.raises(VerifierError, match="failed"):
            v.score(images, qls)
    finally:
        v.close()


def _answer(entries):
    return {"choices": [{"logprobs": {"content": [dict(entries[0], top_logprobs=entries)]}}]}


def test_parse_top_logprobs_matches_variants_by_text_and_counts_missing_sides_as_zero():
    e = lambda t, p: {"token": t, "logprob": math.log(p), "bytes": list(t.encode())}  # noqa: E731
    assert parse_top_logprobs(_answer([e(" Yes", 0.5), e("yes", 0.1), e(" No", 0.2), e("Maybe", 0.1)])) == \
        pytest.approx(0.6 / 0.8)
    assert parse_top_logprobs(_answer([e("Yes", 0.9), e("The", 0.05)])) == 1.0
    assert parse_top_logprobs(_answer([e("no", 0.9), e("yesterday", 0.05), e("yes\n", 0.01)])) == 0.0
    with pytest.raises(ValueError, match="neither a yes nor a no"):
        parse_top_logprobs(_answer([e("The", 0.9)]))
    with pytest.raises(ValueError, match="no first-token logprobs"):
        parse_top_logprobs({"choices": [{"message": {"content": "yes"}}]})
    # vLLM --return-tokens-as-token-ids
    ids = _answer([{"token": "token_id:7", "logprob": math.log(0.3)},
                   {"token": "token_id:9", "logprob": math.log(0.1)}])
    assert parse_top_logprobs(ids, yes_ids=(7,), no_ids=(9,)) == pytest.approx(0.75)


def test_token_ids_mode_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer="):
        OpenAIVerifier("http://127.0.0.1:1", mode="token_ids")


def test_a_top_k_gap_is_a_counted_failure_never_a_confident_zero(bundle, caplog):
    images, qls = _batch()
    seen = []
    with serve_in_thread(fake_openai_app(bundle, seen, hide_answers=True)) as url:
        v = OpenAIVerifier(url, "tiny", mode="top_logprobs", top_logprobs=5, retries=0)
        try:
            with caplog.at_level("WARNING", logger="verifier_engine.backends.openai"):
                got = v.score(images, qls)
            assert got == [[0.0, 0.0], [0.0], []]
            assert v.stats["topk_gaps"] == 3 and v.stats["failed_queries"] == 3
            assert v.backend_metrics() == {"failed_queries": 3.0, "topk_gap_queries": 3.0}
            assert "has no score" in caplog.text and "mode='token_ids'" in caplog.text
            assert all(b["top_logprobs"] == 5 for b in seen)  # the configured k is what is asked for
        finally:
            v.close()
        v = OpenAIVerifier(url, "tiny", mode="top_logprobs", top_logprobs=5, retries=0, on_failure="raise")
        try:
            with pytest.raises(VerifierError, match="has no score.*top"):
                v.score(images, qls)
        finally:
            v.close()


def test_auto_mode_prefers_exact_token_ids_and_falls_back_to_top_logprobs(bundle):
    images, qls = _batch()
    ref = HFVerifier(bundle).score(images, qls)
    flat = lambda rows: [s for r in rows for s in r]  # noqa: E731
    # SGLang-like server whose top-k never holds yes/no: auto still scores exactly through the token ids
    seen = []
    with serve_in_thread(fake_openai_app(bundle, seen, hide_answers=True)) as url:
        v = OpenAIVerifier(url, "tiny", tokenizer=bundle.tokenizer, retries=0)
        try:
            got = v.score(images, qls)
        finally:
            v.close()
    assert v.mode == "auto" and v.active_mode == "token_ids" and v.stats["failed_queries"] == 0
    assert np.allclose(flat(got), flat(ref), atol=1e-6)
    assert "image_data" not in seen[0] and all("image_data" in b for b in seen[1:])  # one probe, then queries
    # vLLM-like server (no /generate): auto falls back to top_logprobs, whose k covers the vocabulary here
    seen = []
    with serve_in_thread(fake_openai_app(bundle, seen, generate_route=False)) as url:
        v = OpenAIVerifier(url, "tiny", tokenizer=bundle.tokenizer, top_logprobs=len(bundle.tokenizer), retries=0)
        try:
            got = v.score(images, qls)
        finally:
            v.close()
    assert v.active_mode == "top_logprobs" and all("messages" in b for b in seen)
    assert np.allclose(flat(got), flat(ref), atol=1e-6)


def test_cli_top_logprobs_option_reaches_the_server(bundle, tmp_path, capsys):
    import json

    from PIL import Image

    from verifier_engine.cli import build_parser, build_verifier, main
    for cmd in (["serve"], ["profile"], ["score", "--image", "x.png", "--question", "q"]):
        args = build_parser().parse_args(cmd + ["--backend", "openai", "--model", "tiny", "--top-logprobs", "7"])
        v = build_verifier(args)
        try:
            assert v.top_logprobs == 7 and v.mode == "auto"
        finally:
            v.close()
    path = str(tmp_path / "a.png")
    Image.fromarray(random_images(1, (64, 64), seed=3)[0]).save(path)
    seen = []
    with serve_in_thread(fake_openai_app(bundle, seen)) as url:
        assert main(["score", "--backend", "openai", "--model", "tiny", "--base-url", url, "--openai-mode",
                     "top_logprobs", "--top-logprobs", "3", "--image", path, "--question", "Is it red?"]) == 0
    assert [b["top_logprobs"] for b in seen] == [3]
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scores"][0]) == 1
