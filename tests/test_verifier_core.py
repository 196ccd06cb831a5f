"""The verifier query, answer tokens and score formula (RECIPE.md section 4), the registry, and package hygiene."""
import ast
import math
import pathlib
import subprocess
import sys

import pytest

from verifier_engine import Verifier, backend_names, get_backend
from verifier_engine.metrics import Registry, parse_metrics
from verifier_engine.prompt import (SYSTEM_PROMPT, answer_tokens, apply_expected, check_expected,
                                    score_from_logprobs, split_chat_template)
from verifier_engine.protocol import check_batch, check_failure_policy

PKG = pathlib.Path(__file__).resolve().parents[1] / "verifier_engine"


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("transformers")
    from verifier_engine.testing import tiny_tokenizer
    return tiny_tokenizer()


def test_answer_tokens_are_single_token_variants_of_yes_and_no(tok):
    ans = answer_tokens(tok)
    assert ans.yes_ids and ans.no_ids
    for ids, texts, word in ((ans.yes_ids, ans.yes_text, "yes"), (ans.no_ids, ans.no_text, "no")):
        assert len(ids) == len(texts) == len(set(ids))
        for i, t in zip(ids, texts):
            assert tok.encode(t, add_special_tokens=False) == [i]
            assert t.strip().lower() == word
    # both spellings with and without the leading space are found where they are single tokens
    assert {"yes", " yes", "Yes", " Yes"} <= set(ans.yes_text)
    assert {"no", " no"} <= set(ans.no_text)
    # a variant that is not one token is skipped, never truncated to its first piece
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in ans.no_text)


def test_answer_tokens_raise_a_clear_error_without_any_single_token_yes():
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")}
    vocab["no"] = len(vocab)
    t = Tokenizer(models.WordPiece(vocab, unk_token="a", max_input_chars_per_word=100))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=t)
    with pytest.raises(ValueError, match="no single-token 'yes'"):
        answer_tokens(fast)


def test_query_is_system_prompt_then_image_then_question_verbatim(tok):
    parts = split_chat_template(tok)
    q = "Is the dog sitting on the bench behind the tree?"
    text = parts.render(q)
    i_sys, i_img, i_q = text.index(SYSTEM_PROMPT), text.index("<|image_pad|>"), text.index(q)
    assert i_sys < i_img < i_q
    assert text.count("<|image_pad|>") == 1 and text.count(q) == 1
    assert text.endswith("<|im_start|>assistant\n")  # the next token is the first answer token
    assert "Answer only with 'yes' or 'no'" in SYSTEM_PROMPT and "don't exist, answer 'no'" in SYSTEM_PROMPT


def test_score_sums_variants_and_normalises_over_yes_and_no_only():
    # P(yes) = 0.3 + 0.1, P(no) = 0.2 (+ a missing variant): 0.4 / 0.6
    p = score_from_logprobs([math.log(0.3), math.log(0.1)], [math.log(0.2), None])
    assert p == pytest.approx(0.4 / 0.6, abs=1e-12)
    # one variant each: sigmoid of the logit difference, whatever the normaliser
    assert score_from_logprobs([2.0], [-1.0]) == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-12)
    assert score_from_logprobs([], [math.log(0.5)]) == 0.0
    assert score_from_logprobs([-1000.0], [0.0]) == pytest.approx(0.0, abs=1e-300)
    with pytest.raises(ValueError, match="neither a yes nor a no"):
        score_from_logprobs([], [])


def test_expected_answer_no_inverts_the_score():
    assert apply_expected(0.8, "no") == pytest.approx(0.2)
    assert apply_expected(0.8, "yes") == 0.8 and apply_expected(0.8, None) == 0.8
    assert check_expected([["YES", None]], [["a", "b"]]) == [["yes", None]]
    with pytest.raises(ValueError, match="one per question"):
        check_expected([["yes"]], [["a", "b"]])
    with pytest.raises(ValueError, match="'yes', 'no' or null"):
        check_expected([["maybe"]], [["a"]])


def test_check_batch_and_failure_policy_say_what_to_change():
    with pytest.raises(ValueError, match="2 images but 1 question lists"):
        check_batch([0, 1], [["q"]])
    with pytest.raises(ValueError, match="is a string"):
        check_batch([0], ["q"])
    with pytest.raises(ValueError, match="on_failure"):
        check_failure_policy("ignore")


def test_registry_knows_the_four_backends_and_names_them_on_error():
    assert set(backend_names()) >= {"hf", "native", "openai", "trtllm"}
    with pytest.raises(ValueError, match="hf, native, openai, trtllm"):
        get_backend("vllm")


def test_verifier_engine_never_imports_alphagrpo():
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "alphagrpo"]
    assert not offenders, offenders


def test_importing_the_package_and_cli_loads_no_heavy_dependency():
    code = ("import sys, verifier_engine, verifier_engine.cli, verifier_engine.server, verifier_engine.client; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'fastapi', 'uvicorn', 'httpx', 'tensorrt_llm', 'pynvml', 'alphagrpo'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_metrics_render_prometheus_text_that_parses_back():
    r = Registry()
    c = r.counter("x_total", "things", ("status",))
    h = r.histogram("lat_seconds", "latency", (0.1, 1.0))
    c.inc(status="200")
    c.inc(2, status="400")
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = r.render()
    assert "# TYPE lat_seconds histogram" in text and "# TYPE x_total counter" in text
    m = parse_metrics(text)
    assert m['x_total{status="200"}'] == 1 and m['x_total{status="400"}'] == 2
    assert m['lat_seconds_bucket{le="0.1"}'] == 1 and m['lat_seconds_bucket{le="1"}'] == 2
    assert m['lat_seconds_bucket{le="+Inf"}'] == 3 and m["lat_seconds_count"] == 3
    assert m["lat_seconds_sum"] == pytest.approx(5.55)


def test_protocol_is_structural():
    class Const:
        def score(self, images, question_lists):
            return [[0.5] * len(q) for q in question_lists]
    assert isinstance(Const(), Verifier)
    assert not isinstance(object(), Verifier)
