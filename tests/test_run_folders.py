"""Run folders that cannot be lost, and one error policy for the ``alphagrpo`` command line (bad input -> one
``error:`` line, exit status 2, before any slow work)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alphagrpo.cli import main

PLUGINS = str(Path(__file__).parent / "plugins")
SMALL = ["--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "micro_batch=4", "--set",
         "sampler.num_steps=3", "--set", "sampler.window=1", "--set", "sampler.window_starts=0,1", "--set",
         "cfg.text_scale=1.0", "--set", "image_every=0", "--set", "ckpt_every=1", "--set", "optim.lr=5e-2",
         "--set", "model.kind=flowtoy:load_flowtoy", "--set", "data.world=flowtoy:toy_world"]


@pytest.fixture(autouse=True)
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(PLUGINS)


def train(out, *extra):
    return main(["train", "--out", str(out), *SMALL, *extra])


def one_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def steps_logged(run):
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_a_run_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "2") == 0
    before = (run / "checkpoints" / "latest").read_text()
    assert train(run, "--steps", "1") == 2
    one_error(capsys, "--resume", "--overwrite")
    assert (run / "checkpoints" / "latest").read_text() == before and steps_logged(run) == [1, 2]
    assert train(run, "--steps", "1", "--overwrite") == 0
    assert steps_logged(run) == [1] and (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert not (run / "checkpoints" / "step_000002").exists()


def test_resume_shows_and_refuses_config_changes_unless_allowed_then_applies_them(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "1") == 0
    assert train(run, "--resume", "--steps", "2", "--set", "optim.lr=1e-3") == 2
    one_error(capsys, "optim.lr", "--allow-config-change")
    assert train(run, "--resume", "--steps", "3") == 0           # more steps: a safe change
    assert train(run, "--resume", "--steps", "4", "--set", "optim.lr=1e-3", "--allow-config-change") == 0
    state = torch.load(run / "checkpoints" / "step_000004" / "trainer.pt", weights_only=True)
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {1e-3}, "the new learning rate was not applied"
    change = json.loads((run / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["step"] == 3 and change["changes"]["optim.lr"] == [5e-2, 1e-3]


def test_steps_below_the_checkpoint_and_resume_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--resume", "--steps", "1") == 2
    one_error(capsys, "no checkpoint", "--resume-or-start")
    assert train(run, "--resume", "--resume-or-start", "--steps", "2") == 0
    assert steps_logged(run) == [1, 2]
    assert train(run, "--resume", "--resume-or-start", "--steps", "3") == 0   # now it resumes
    assert steps_logged(run) == [1, 2, 3]
    assert train(run, "--resume", "--steps", "2") == 2
    one_error(capsys, "below the checkpoint's step 3")


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip"])
def test_a_damaged_checkpoint_is_one_error_naming_the_previous_complete_one(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert train(run, "--steps", "2") == 0
    f = run / "checkpoints" / "step_000002" / "policy" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "zero": b"",
                   "flip": data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]}[damage])
    assert train(run, "--resume", "--steps", "3") == 2
    one_error(capsys, "step_000002", "checksum", "step_000001")
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_000002")       # what the error says to do
    assert train(run, "--resume", "--steps", "3") == 0
    assert steps_logged(run) == [1, 2, 3], "the redone step 2 is logged once"


def test_resume_drops_metric_rows_of_steps_it_redoes(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--steps", "3", "--set", "ckpt_every=2") == 0     # checkpoints at 2 and 3
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_000003")
    (run / "checkpoints" / "latest").write_text("step_000002")
    assert train(run, "--resume", "--steps", "4", "--set", "ckpt_every=2") == 0
    assert steps_logged(run) == [1, 2, 3, 4]


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {plugins!r})
    import torch
    from alphagrpo.cli import main
    real, calls = torch.save, [0]
    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:              # the second checkpoint: die after its policy, before trainer.pt
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *a, **k)
    torch.save = save
    main(["train", "--out", {run!r}, "--steps", "3", *{args!r}])
""")


def test_a_kill_during_a_checkpoint_write_loses_nothing_and_resume_is_exact(tmp_path):
    from alphagrpo.commands.common import resolve_config
    from alphagrpo.models.registry import load_policy
    run = tmp_path / "killed"
    code = KILLER.format(plugins=PLUGINS, run=str(run), args=SMALL)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000001" and not (ck / "step_000002").exists()
    assert any(p.name.startswith(".step_000002.") for p in ck.iterdir()), "the interrupted write left its temp folder"
    assert train(run, "--resume", "--steps", "3") == 0
    assert not any(p.name.startswith(".") for p in ck.iterdir()), "leftovers are removed at the next start"
    assert train(tmp_path / "straight", "--steps", "3") == 0
    cfg = resolve_config("tiny_shapes", [a for a in SMALL if a != "--set"])
    a = load_policy(cfg.model, path=str(run / "checkpoints" / "step_000003" / "policy")).net.state_dict()
    b = load_policy(cfg.model, path=str(tmp_path / "straight" / "checkpoints" / "step_000003" / "policy"))
    assert all(torch.equal(a[k], v) for k, v in b.net.state_dict().items()), "resume after the kill diverged"


def test_trainer_state_loads_without_running_pickled_code(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "1") == 0
    ck = run / "checkpoints" / "step_000001"

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    state = torch.load(ck / "trainer.pt", weights_only=True)
    state["extra"] = Boom()
    torch.save(state, ck / "trainer.pt")
    from alphagrpo.train.checkpoint import _manifest
    (ck / "manifest.json").write_text(json.dumps({"format": "alphagrpo.trainer/v2", "step": 1,
                                                  "sha256": _manifest(ck)}))
    assert train(run, "--resume", "--steps", "2") == 2
    one_error(capsys, "cannot be read safely")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("argv, needle", [
    (["train", "--set", "device=gpu0"], "device must be cpu, cuda or cuda:N"),
    (["train", "--set", "device=cuda:7"], "CUDA"),
    (["train", "--set", "sampler.window_starts=0,x"], "comma-separated integers"),
    (["train", "--set", "steps=-1"], "steps >= 0"),
    (["train", "--set", "prompts_per_step=two"], "expected an integer"),
    (["train", "--set", "group_size=1"], "group_size must be >= 2"),
    (["eval", "--n", "0"], "--n must be >= 1"),
    (["refine", "--rounds", "-1"], "--rounds"),
    (["train", "--set", "data.world=jsonl", "--set", "reward.verifier=http://127.0.0.1:9",
      "--set", "data.train_file=DIR"], "is a folder"),
    (["train", "--out", "FILE"], "is a file"),
    (["train", "--out", "/proc/alphagrpo-run"], "cannot write into"),
    (["eval", "--checkpoint", "DIR"], "not a TinyUMM checkpoint folder"),
    (["train", "--set", "model.kind=nosuchmodule:load"], "no module 'nosuchmodule'"),
    (["train", "--set", "model.kind=bagel9"], "unknown model.kind"),
    (["train", "--set", "model.dtype=int8"], "model.dtype must be one of"),
])
def test_bad_input_is_one_error_line_and_status_2(argv, needle, tmp_path, capsys):
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("DIR", str(tmp_path)).replace("FILE", str(tmp_path / "FILE")) for a in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    one_error(capsys, needle)


def test_tuple_settings_keep_their_element_type():
    from alphagrpo.train.config import apply_overrides, get_recipe
    c = apply_overrides(get_recipe("tiny_shapes"), ["optim.betas=0.9,0.99", "sampler.window_starts=1,2",
                                                    "lora.targets=layers.*.gen.qkv"])
    assert c.optim.betas == (0.9, 0.99) and c.sampler.window_starts == (1, 2)
    assert c.lora.targets == ("layers.*.gen.qkv",)
    with pytest.raises(ValueError, match="comma-separated numbers"):
        apply_overrides(get_recipe("tiny_shapes"), ["optim.betas=0.9,high"])
