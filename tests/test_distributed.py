"""Data-parallel training on 2 gloo processes (CPU): gradient synchronisation, identical weights, exact resume,
resume on another world size, FSDP2 rollout gathers, and the torchrun command line with two verifier servers."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from alphagrpo.rewards import DVReward
from alphagrpo.testing import BrightnessVerifier, brightness_world, micro_policy
from alphagrpo.train.loop import train
from alphagrpo.train.trainer import GRPOTrainer

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench.train_step
from _dist_workers import grads, small_cfg, strategy_worker, trainable_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["replicate", "fsdp"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both strategies' 2-rank results, the fixed rollouts they trained on and the one-process reference."""
    out = tmp_path_factory.mktemp("dist")
    micro_policy(1).save_pretrained(out / "micro")
    world = brightness_world()
    cfg = small_cfg(str(out), "replicate", model_path=str(out / "micro"))
    from alphagrpo.models.registry import load_policy
    ref = load_policy(cfg.model, "cpu", path=str(out / "micro"))
    tr = GRPOTrainer(ref, DVReward(world.verifier), cfg, generator=torch.Generator().manual_seed(5))
    chunks, _, _, _ = tr.rollout(world.train[:4], srr=False)        # 4 prompts x 4 samples, 4 chunks
    for c in chunks:
        c.reward_future = None
    adv = torch.randn(16, generator=torch.Generator().manual_seed(3))
    torch.save({"chunks": chunks, "adv": adv}, out / "rollouts.pt")
    one = {"grad_norm": tr.update(chunks, adv)["grad_norm"], "grads": grads(ref), "weights": trainable_state(ref)}
    half_pol = load_policy(cfg.model, "cpu", path=str(out / "micro"))
    tr2 = GRPOTrainer(half_pol, DVReward(world.verifier), cfg, generator=torch.Generator().manual_seed(5))
    tr2.update(chunks[:2], adv[:8])                                  # what rank 0 alone would do without sync
    one["unsynced_weights"] = trainable_state(half_pol)
    tr.close()
    tr2.close()
    mp.spawn(strategy_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    res = {s: [torch.load(out / f"{s}_rank{r}.pt", weights_only=False) for r in range(2)] for s in STRATEGIES}
    return out, one, res


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_on_half_the_rollouts_update_like_one_rank_on_all(runs, strategy):
    _, one, res = runs
    r0, r1 = res[strategy]
    # the global grad norm (clipping) and the synchronised, clipped gradients equal the one-process ones
    assert one["grad_norm"] > 0.1, "optim.grad_clip=0.1 must clip here, or the norm's globality goes untested"
    assert r0["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert r1["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for k, g in one["grads"].items():
        torch.testing.assert_close(r0["grads"][k], g, rtol=1e-4, atol=1e-7)
    # AdamW's first step is about lr * sign(grad): 1e-4 is a tenth of lr; no sync would miss by ~lr
    dev_sync = max((r0["weights"][k] - w).abs().max().item() for k, w in one["weights"].items())
    dev_unsynced = max((one["unsynced_weights"][k] - w).abs().max().item() for k, w in one["weights"].items())
    assert dev_sync < 1e-4, f"{strategy}: 2-rank update differs from the 1-rank one by {dev_sync}"
    assert dev_unsynced > 5e-4, "the check cannot tell synchronised from unsynchronised updates"
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trainable_weights_are_identical_on_both_ranks_after_every_step(runs, strategy):
    _, _, res = runs
    for r in res[strategy]:
        assert r["same"] == [True] * 2
        assert r["skipped"] == [0] * 2, "a skipped step would make the check trivial"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stop_and_resume_on_two_ranks_is_exact(runs, strategy):
    out, _, res = runs
    r0 = res[strategy][0]
    for k, w in r0["straight"].items():
        assert torch.equal(r0["resumed"][k], w), f"{strategy}: resumed run diverged at {k}"
    ck = out / f"B_{strategy}" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002"
    files = {p.name for p in (ck / "step_000002").iterdir()}
    assert {"dcp", "trainer.pt", "manifest.json", "rank00000.pt", "rank00001.pt"} <= files
    assert ("policy" in files) == (strategy == "replicate")       # FSDP ranks hold no whole policy to export
    assert not [p for p in ck.iterdir() if p.name.startswith(".")], "a temporary checkpoint folder was left"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, strategy, caplog, tmp_path):
    out, _, res = runs
    run = shutil.copytree(out / f"B_{strategy}", tmp_path / "run")
    cfg = small_cfg(str(out), strategy, steps=2, model_path=str(out / "micro"))
    with caplog.at_level(logging.WARNING):
        hist, pol = train(cfg, brightness_world(), run, resume=True)
    assert hist == []
    loaded = trainable_state(pol)
    assert all(torch.equal(loaded[k], w) for k, w in res[strategy][0]["resumed"].items())
    assert "2-rank checkpoint on 1 rank" in caplog.text and "random streams" in caplog.text
    # the optimizer state came along: AdamW's step count and moments of the 2-rank run
    from alphagrpo.models.registry import load_policy
    from alphagrpo.train.checkpoint import load_checkpoint, load_distributed
    fresh = load_policy(cfg.model, "cpu")
    tr = GRPOTrainer(fresh, DVReward(brightness_world().verifier), cfg, generator=torch.Generator())
    load_distributed(load_checkpoint(run), fresh.model, tr)
    qkv = tr.optimizer.state[fresh.model.layers[0].und.qkv.weight]
    assert float(qkv["step"]) == 2 and qkv["exp_avg"].abs().sum() > 0 and qkv["exp_avg_sq"].abs().sum() > 0
    tr.close()
    hist, pol = train(small_cfg(str(out), strategy, steps=3, model_path=str(out / "micro")), brightness_world(),
                      run, resume=True)
    assert len(hist) == 1 and not hist[0]["skipped"]
    assert any(not torch.equal(trainable_state(pol)[k], w) for k, w in loaded.items())


def test_an_fsdp_checkpoint_exports_the_trained_policy(runs, tmp_path):
    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    from alphagrpo.train.loop import export_policy
    out, _, res = runs
    export_policy(out / "B_fsdp" / "checkpoints" / "step_000002", tmp_path / "pol")
    pol = TinyUMMPolicy.from_pretrained(tmp_path / "pol")
    got = trainable_state(pol)
    assert all(torch.equal(got[k], w) for k, w in res["fsdp"][0]["resumed"].items())


def test_fsdp_rollout_gathers_each_unit_once(runs):
    _, _, res = runs
    units = 2                          # micro TinyUMM: 1 layer + the root
    for r in res["fsdp"]:
        assert r["ag_rollout"] == units
        assert r["ag_rollout_ungathered"] > 4 * units    # one per call without the window (measured: 19)
    assert res["replicate"][0]["ag_rollout"] == 0


def test_replicate_all_reduces_once_per_update_and_fsdp_reduce_scatters(runs):
    _, _, res = runs
    rep, fs = res["replicate"][0]["update_collectives"], res["fsdp"][0]["update_collectives"]
    assert rep == {"all_gather_single": 0, "reduce_scatter_single": 0, "all_reduce": 1}   # one 25 MiB bucket
    assert fs["all_reduce"] == 0 and fs["reduce_scatter_single"] > 0 and fs["all_gather_single"] > 0


def test_replicate_buckets_follow_bucket_mb():
    from alphagrpo.train.config import ParallelConfig
    from alphagrpo.train.parallel import Replicate
    params = [torch.zeros(1000), torch.zeros(1000), torch.zeros(3000), torch.zeros(10)]
    buckets = Replicate(ParallelConfig(bucket_mb=8000 / 2**20))._buckets(params)    # 8000 bytes = 2000 floats
    assert [[p.numel() for p in b] for b in buckets] == [[1000, 1000], [3000], [10]]


# ------------------------------------------------------------------------------------------ command line
def _counting_server(counts: dict, name: str):
    from verifier_engine.server import create_app

    class Counting(BrightnessVerifier):
        def score(self, images, question_lists):
            counts[name] = counts.get(name, 0) + len(images)
            return super().score(images, question_lists)
    return create_app(Counting())


def _torchrun(args, tmp_path, env_extra=None, timeout=150, program=("-m", "alphagrpo.cli")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *program, "train", "--recipe", "tiny_shapes"] + args
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _cli_sets(tmp_path, micro):
    sets = ["prompts_per_step=2", "group_size=4", "micro_batch=8", "max_think_tokens=3", "sampler.num_steps=3",
            "sampler.window=1", "sampler.window_starts=0,1,2", "cfg.text_scale=1.0", "image_every=0",
            "ckpt_every=2", "data.world=alphagrpo.testing:brightness_world_loader", "data.train_per_task=8",
            f"model.path={micro}"]
    return [a for s in sets for a in ("--set", s)]


def test_torchrun_command_line_trains_with_two_verifier_servers(tmp_path):
    """The authors' layout: verifier servers on their own devices, every training rank sending to all of them (here
    with LoRA adapters sharded by FSDP2 beside their frozen base)."""
    from verifier_engine.testing import serve_in_thread
    micro = tmp_path / "micro"
    micro_policy(0).save_pretrained(micro)
    counts: dict = {}
    with serve_in_thread(_counting_server(counts, "a")) as a, serve_in_thread(_counting_server(counts, "b")) as b:
        args = _cli_sets(tmp_path, micro) + ["--set", f"reward.verifier={a},{b}", "--set", "parallel.strategy=fsdp",
                                             "--set", "lora.rank=2", "--out", str(tmp_path / "run")]
        p = _torchrun(args + ["--steps", "2"], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        counted = dict(counts)
        resumed = _torchrun(args + ["--steps", "3", "--resume"], tmp_path)    # a LoRA run resumes on 2 ranks
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    counts = counted
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]                  # rank 0 alone writes the metrics, once per step
    assert rows[-1]["world_size"] == 2 and rows[-1]["samples_total"] == 16 and len(rows[-1]["peak_mem_gib_ranks"]) == 2
    assert counts.get("a", 0) > 0 and counts.get("b", 0) > 0, counts
    assert counts["a"] + counts["b"] == 2 * 16                     # 2 steps x 2 ranks x 8 samples, each scored once
    from torch.distributed.checkpoint import FileSystemReader
    dcp_dir = tmp_path / "run" / "checkpoints" / "step_000002" / "dcp"
    keys = FileSystemReader(dcp_dir).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), "the frozen base must not be checkpointed"


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path):
    micro = tmp_path / "micro"
    micro_policy(0).save_pretrained(micro)
    script = Path(sys.executable).with_name("alphagrpo")     # the console script, when installed beside python
    program = (str(script),) if script.is_file() else ("-m", "alphagrpo.cli")
    p = _torchrun(_cli_sets(tmp_path, micro) + ["--steps", "3", "--out", str(tmp_path / "run")], tmp_path,
                  env_extra={"ALPHAGRPO_TEST_FAIL_RANK": "1", "TORCHELASTIC_MAX_RESTARTS": "0"}, timeout=120,
                  program=program)
    assert p.returncode != 0
    assert "error: rank 1/2: RuntimeError: synthetic verifier failure on this rank" in p.stderr


def test_train_step_bench_reports_throughput_and_its_time_split(tmp_path):
    from bench.train_step import main
    out = tmp_path / "ts.json"
    assert main(["--dim", "32", "--layers", "1", "--group", "4", "--think-tokens", "3", "--sampler-steps", "3",
                 "--window", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["world_size"] == 1 and r["samples_per_s_total"] > 0 and r["params"] > 0
    parts = sum(r[k] for k in ("time_rollout", "time_reward_wait", "time_replay", "time_comm", "time_optimizer"))
    assert 0.8 * r["time_step"] <= parts <= r["time_step"] * 1.001      # the split accounts for the step
    assert r["samples_per_s_total"] == pytest.approx(2 * 4 / r["time_step"], rel=1e-6)
