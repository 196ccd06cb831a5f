"""The training path behind the protocols: a policy and a world registered from outside the package train, resume
and evaluate through the command line with no change to ``alphagrpo/train``; rewards can come from a
``verifier-engine serve`` process; a jsonl world needs a verifier address."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alphagrpo.cli import main

PLUGINS = str(Path(__file__).parent / "plugins")
SMALL = ["--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "micro_batch=4", "--set",
         "max_think_tokens=3", "--set", "sampler.num_steps=3", "--set", "sampler.window=1", "--set",
         "sampler.window_starts=0,1", "--set", "sampler.eval_steps=3", "--set", "cfg.text_scale=1.0", "--set",
         "image_every=0", "--set", "ckpt_every=1", "--set", "eval_batch=8"]
TOY = ["--set", "model.kind=flowtoy:load_flowtoy", "--set", "data.world=flowtoy:toy_world"]


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(PLUGINS)
    yield


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_flow_only_policy_from_outside_the_package_trains_resumes_and_evaluates(plugins, tmp_path, capsys):
    run = tmp_path / "run"
    lora = ["--set", "lora.rank=2", "--set", "lora.alpha=4", "--set", "loss.beta_image=0.5", "--set", "optim.lr=5e-2"]
    assert main(["train", "--out", str(run), "--steps", "2", *SMALL, *TOY, *lora]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all("think_rate" not in r and "loss_text" not in r for r in rows), "a flow-only policy has no text path"
    # the KL reference is the policy with adapters off: identical before the first update (B = 0), apart after it
    assert rows[0]["kl_image"] == 0.0 and rows[1]["kl_image"] > 0.0
    assert not (run / "reference").exists(), "a LoRA run keeps no copy of the model as its reference"
    saved = json.loads((run / "checkpoints" / "step_000002" / "policy" / "config.json").read_text())
    assert saved["lora"]["rank"] == 2
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", *SMALL, *TOY, *lora]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
    capsys.readouterr()
    pol = run / "checkpoints" / "step_000003" / "policy"
    assert main(["eval", "--checkpoint", str(pol), "--n", "4", "--out", str(tmp_path / "ev"), *SMALL, *TOY]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert line["n"] == 4 and "think_rate" not in line and line["reward"] == saved["reward"]
    assert line["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)   # the toy world's judge on 4 prompts


def test_resume_of_a_flow_only_run_is_exact(plugins, tmp_path):
    from alphagrpo.commands.common import resolve_config
    from alphagrpo.models.registry import load_policy
    args = [*SMALL, *TOY, "--set", "optim.lr=5e-2"]
    assert main(["train", "--out", str(tmp_path / "a"), "--steps", "3", *args]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--steps", "1", *args]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--steps", "3", *args]) == 0
    cfg = resolve_config("tiny_shapes", [a for a in args if a != "--set"])
    a = load_policy(cfg.model, path=str(tmp_path / "a" / "checkpoints" / "step_000003" / "policy"))
    b = load_policy(cfg.model, path=str(tmp_path / "b" / "checkpoints" / "step_000003" / "policy"))
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    start = load_policy(cfg.model)
    assert not all(torch.equal(sa[k], v) for k, v in start.net.state_dict().items()), "nothing was trained"


def test_srr_refuses_a_policy_without_a_text_path(plugins, tmp_path, capsys):
    assert main(["train", "--recipe", "tiny_shapes_srr", "--out", str(tmp_path / "s"), "--steps", "1", *SMALL,
                 *TOY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "has_think=False" in err[0]


def test_the_jsonl_world_needs_a_verifier_address(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a cat", "semantic_questions": [{"question": "Is there a cat?", "tag": "Existence"}],
                             "quality_questions": [{"question": "Is it sharp?", "tag": "Texture"}]}) + "\n")
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "data.world=jsonl",
                 "--set", f"data.train_file={f}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "reward.verifier" in err
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "reward.verifier=grpc://x"]) == 2
    assert "accepted forms" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def verifier_server(tmp_path_factory):
    """``verifier-engine serve`` on a tiny random Qwen2.5-VL, as a subprocess on a loopback port."""
    pytest.importorskip("transformers")
    from verifier_engine.testing import make_tiny_model
    model = make_tiny_model(str(tmp_path_factory.mktemp("vlm") / "tiny"))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "verifier_engine.cli", "serve", "--backend", "native", "--model",
                             model, "--device", "cpu", "--dtype", "float32", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"verifier server did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_training_on_your_prompts_scored_by_a_verifier_server(verifier_server, tmp_path):
    from alphagrpo.rewards import dvreward
    from alphagrpo.testing import micro_policy
    from verifier_engine.client import VerifierClient
    micro_policy(0).save_pretrained(tmp_path / "micro")
    prompts = tmp_path / "prompts.jsonl"
    recs = [{"prompt": p, "semantic_questions": [{"question": "Is the image bright?", "tag": "Attribute"},
                                                 {"question": "Is there a white square?", "tag": "Existence"}],
             "quality_questions": [{"question": "Is the image sharp?", "tag": "Texture"}]}
            for p in ("make a bright image please", "make a light image")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *SMALL, "--set", f"model.path={tmp_path / 'micro'}", "--set",
            "data.world=jsonl", "--set", f"data.train_file={prompts}", "--set", f"reward.verifier={verifier_server}",
            "--set", "reward.on_failure=raise", "--set", "rollout_every=1"]
    assert main(args + ["--steps", "2"]) == 0
    saved = np.load(run / "rollouts" / "step_000002.npz")
    scores = json.loads(str(saved["scores"]))
    assert len(scores) == 4 and all(len(s) == 3 for s in scores)
    assert len({round(x, 6) for s in scores for x in s}) > 1, "a random VLM still gives varied scores"
    with VerifierClient(verifier_server, on_failure="raise") as client:   # the same images, scored again
        again = client.score(list(saved["images"]), [[q["question"] for q in recs[0]["semantic_questions"]
                                                      + recs[0]["quality_questions"]]] * len(scores))
    np.testing.assert_allclose(np.array(again), np.array(scores), atol=1e-4)
    want = dvreward([s[:2] for s in scores], [s[2:] for s in scores])
    np.testing.assert_allclose(saved["rewards"], want.numpy(), atol=1e-6)
    rows = _rows(run)
    assert abs(rows[1]["reward_mean"] - float(want.mean())) < 1e-5, "logged rewards are the server's"
    assert (run / "checkpoints" / "step_000002" / "manifest.json").is_file()
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
