"""``verifier-engine``'s one error policy: bad input ends with one ``error:`` line on stderr and exit status 2, before
any model is loaded; tracebacks only with ``VERIFIER_ENGINE_DEBUG=1``."""
import json
import os
import socket
import subprocess
import sys

import pytest

from verifier_engine import cli
from verifier_engine.cli import main


@pytest.fixture
def paths(tmp_path):
    """A directory that looks like a model (config.json), one that does not, a PNG, a text file, token files."""
    from PIL import Image
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (tmp_path / "empty-dir").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty-token").write_text("\n")
    (tmp_path / "two-words-token").write_text("two words\n")
    (tmp_path / "token").write_text("s3cret\n")
    return {k: str(v) for k, v in dict(tmp=tmp_path, model=model, empty=tmp_path / "empty-dir",
                                       png=tmp_path / "a.png", txt=tmp_path / "notes.txt",
                                       empty_token=tmp_path / "empty-token", two_words=tmp_path / "two-words-token",
                                       token=tmp_path / "token").items()}


@pytest.fixture
def no_slow_work(monkeypatch):
    """Fail (exit status 1, not 2) if a command gets as far as building a verifier."""
    def boom(args):
        raise AssertionError("build_verifier was called: validation came too late")
    monkeypatch.setattr(cli, "build_verifier", boom)


SERVE = ["serve", "--backend", "native", "--model", "{model}", "--device", "cpu"]
SCORE = ["score", "--backend", "native", "--model", "{model}", "--device", "cpu", "--image", "{png}",
         "--question", "Is it red?"]
CASES = [  # (name, argv with {placeholders}, words in the error line)
    ("unknown device", ["serve", "--backend", "native", "--model", "{model}", "--device", "gpu7"],
     "--device 'gpu7' is not a device"),
    ("unknown dtype", SERVE + ["--dtype", "float8"], "--dtype 'float8' is not a dtype"),
    ("unknown backend", ["serve", "--backend", "vllm", "--model", "{model}"], "invalid choice: 'vllm'"),
    ("negative count", SERVE + ["--max-batch-images", "-3"], "-3 is too small; give a whole number >= 1"),
    ("zero count", SERVE + ["--max-images-per-request", "0"], "0 is too small"),
    ("count that is not a number", SERVE + ["--max-batch-images", "many"], "'many' is not a whole number"),
    ("NaN wait", SERVE + ["--max-wait-ms", "nan"], "nan is out of range"),
    ("negative warmup", ["profile", "--backend", "native", "--model", "{model}", "--warmup", "-1"], "too small"),
    ("zero concurrency", ["profile", "--url", "http://127.0.0.1:9", "--concurrency", "0"], "0 is too small"),
    ("negative duration", ["profile", "--url", "http://127.0.0.1:9", "--duration", "-1"], "out of range"),
    ("profile of nothing", ["profile"], "profile needs --url, or --backend and --model"),
    ("malformed URL in a list", ["serve", "--backend", "openai", "--model", "m", "--base-url", "http://a:1",
                                 "--base-url", "127.0.0.1:30000"], "'127.0.0.1:30000' is not an http(s) URL"),
    ("URL with a bad port", ["profile", "--url", "http://127.0.0.1:99999"], "malformed port"),
    ("blank question", SCORE + ["--question", "  "], "the text is empty"),
    ("question that is not UTF-8", SCORE + ["--question", "bad \udcff byte"], "is not valid UTF-8"),
    ("directory as image", SCORE + ["--image", "{tmp}"], "is a directory; give the path of a file"),
    ("missing image", SCORE + ["--image", "{tmp}/nope.png"], "does not exist"),
    ("text file as image", SCORE + ["--image", "{txt}"], "is not an image; give a PNG or JPEG file"),
    ("directory as token file", SERVE + ["--token-file", "{tmp}"], "--token-file"),
    ("empty token file", SERVE + ["--token-file", "{empty_token}"], "must hold one token"),
    ("token with spaces", SERVE + ["--token-file", "{two_words}"], "must hold one token"),
    ("token twice", SERVE + ["--token-file", "{token}", "--token", "x"], "not both"),
    ("output folder is a file", ["make-tiny", "{txt}"], "is a file; give a directory"),
    ("output folder under a file", ["make-tiny", "{txt}/sub"], "is not writable"),
    ("unwritable output folder", ["make-tiny", "/proc/verifier-engine-test"], "is not writable"),
    ("port zero", SERVE + ["--port", "0"], "give a port from 1 to 65535"),
    ("port too large", SERVE + ["--port", "65536"], "65536 is not a port"),
    ("port that is not a number", SERVE + ["--port", "http"], "'http' is not a whole number"),
    ("model path missing", ["serve", "--backend", "native", "--model", "{tmp}/none"], "does not exist"),
    ("model path is a file", ["serve", "--backend", "hf", "--model", "{txt}"], "is a file"),
    ("model path is not a model", ["score", "--backend", "native", "--model", "{empty}", "--image", "{png}",
                                   "--question", "a?"], "is not a model"),
]


def _run(argv, paths, capsys):
    code = main([a.format(**paths) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(code, out, err, words):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("name,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_error_line_and_status_2_before_slow_work(name, argv, words, paths, capsys,
                                                                          no_slow_work, monkeypatch):
    monkeypatch.delenv("VERIFIER_ENGINE_DEBUG", raising=False)
    _assert_one_error_line(*_run(argv, paths, capsys), words)


def test_cuda_device_without_a_gpu_is_refused(paths, capsys, no_slow_work):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    _assert_one_error_line(*_run(SERVE + ["--device", "cuda"], paths, capsys), "no CUDA device is visible")


def test_a_port_in_use_is_refused_before_the_model_loads(paths, capsys, no_slow_work):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = _run(SERVE + ["--port", str(port)], paths, capsys)
    _assert_one_error_line(code, out, err, f"cannot listen on 127.0.0.1:{port}")


def test_a_failure_after_validation_is_one_error_line_with_status_1(paths, capsys):
    """config.json passes the early check; loading it as a model then fails: still one line, no traceback."""
    code, out, err = _run(SCORE, paths, capsys)
    assert code == 1, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "VERIFIER_ENGINE_DEBUG=1" in errors[0] and "Traceback" not in err


def test_the_token_comes_from_a_file_or_the_environment_never_only_the_command_line(paths, monkeypatch):
    from verifier_engine._cli_checks import read_token
    args = cli.build_parser().parse_args(SERVE[:5] + ["--token-file", paths["token"]])
    assert read_token(args) == "s3cret"
    monkeypatch.setenv("VERIFIER_ENGINE_TOKEN", "from-env")
    args = cli.build_parser().parse_args(SERVE[:5])
    assert read_token(args) == "from-env"
    monkeypatch.delenv("VERIFIER_ENGINE_TOKEN")
    assert read_token(args) is None


@pytest.mark.parametrize("debug", [False, True])
def test_tracebacks_only_with_the_debug_variable(debug, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VERIFIER_ENGINE_DEBUG"}
    if debug:
        env["VERIFIER_ENGINE_DEBUG"] = "1"
    r = subprocess.run([sys.executable, "-m", "verifier_engine.cli", "serve", "--backend", "native", "--model",
                        str(tmp_path / "missing")], env=env, capture_output=True, text=True, timeout=120)
    if debug:
        assert r.returncode != 0 and "Traceback" in r.stderr and "CLIError" in r.stderr
    else:
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [f"error: --model '{tmp_path / 'missing'}' does not exist; give a "
                                                 f"local model directory (the engine never downloads)"]
