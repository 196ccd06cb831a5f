"""Training-step throughput of a random-weight TinyUMM-style policy: samples/s (total and per rank), the step's time
split (rollout / reward wait / replay / communication / optimizer) and peak memory per rank, on one device or under
torchrun (data-parallel, ``--strategy replicate|fsdp``).

The model is built from a config (``--dim --layers --heads``; nothing is downloaded) and trained by the real
``GRPOTrainer`` on the brightness world of ``alphagrpo.testing`` (a pixel-statistics verifier, so the reward costs
almost nothing and the numbers are the trainer's). Each rank takes ``--prompts`` prompts x ``--group`` samples per
step (weak scaling: the global batch grows with the ranks). Chose not to: load a real checkpoint or verifier (the
point is the trainer's own cost); report MFU (the flow steps, CFG branches and think sampling make a FLOP count of
the step a model of its own).

    python -m bench.train_step --out bench/results/train_step_cpu.json                   # CPU defaults: tiny
    python -m bench.train_step --dim 1024 --layers 16 --out train_step_1gpu.json         # one GPU
    torchrun --nproc-per-node=8 bench/train_step.py --dim 1024 --layers 16 --out train_step_8gpu.json
    python -m bench.train_step --table train_step_1gpu.json train_step_8gpu.json        # scaling table

The last line printed is one JSON object (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a script (torchrun bench/train_step.py): the checkout on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        return ""


def table(paths) -> int:
    """Scaling table from result files of 1..N ranks: total samples/s, per rank, efficiency vs the 1-rank file."""
    rows = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["world_size"])
    base = next((r for r in rows if r["world_size"] == 1), None)
    print(f"{'ranks':>5} {'strategy':>9} {'samples/s':>10} {'per rank':>9} {'efficiency':>10} {'step s':>7} "
          f"{'comm s':>7} {'peak GiB':>8}")
    for r in rows:
        eff = (r["samples_per_s_total"] / (r["world_size"] * base["samples_per_s_total"])) if base else float("nan")
        print(f"{r['world_size']:>5} {r['strategy']:>9} {r['samples_per_s_total']:>10.1f} "
              f"{r['samples_per_s_total'] / r['world_size']:>9.1f} {eff:>10.2f} {r['time_step']:>7.2f} "
              f"{r['time_comm']:>7.3f} {r['peak_mem_gib_max']:>8.2f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the scaling table of these files")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dim", type=int, default=None, help="model width (default: 1024 on CUDA, 64 on CPU)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: 16 on CUDA, 2 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: dim / 64, at least 2)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--prompts", type=int, default=None, help="prompts per rank and step (default: 8 CUDA, 2 CPU)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--think-tokens", type=int, default=16)
    p.add_argument("--sampler-steps", type=int, default=16)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--strategy", default="replicate", choices=("replicate", "fsdp"))
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters only")
    p.add_argument("--dtype", default="float32", help="model dtype (bfloat16 on GPU for big models)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the JSON here (rank 0)")
    args = p.parse_args(argv)
    if args.table:
        return table(args.table)

    import torch

    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    from alphagrpo.rewards import DVReward
    from alphagrpo.testing import WORDS, brightness_world
    from alphagrpo.train import parallel as P
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.train.loop import PromptStream
    from alphagrpo.train.srr import reflection_words
    from alphagrpo.train.trainer import GRPOTrainer
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dim = args.dim or (1024 if cuda else 64)
    layers = args.layers or (16 if cuda else 2)
    heads = args.heads or max(2, dim // 64)
    prompts = args.prompts or (8 if cuda else 2)
    cfg = apply_overrides(get_recipe("tiny_shapes"), [
        f"device={device}", f"prompts_per_step={prompts}", f"group_size={args.group}",
        f"micro_batch={args.micro_batch}", f"max_think_tokens={args.think_tokens}",
        f"sampler.num_steps={args.sampler_steps}", f"sampler.window={args.window}", "sampler.window_starts=0,1",
        "cfg.text_scale=4.0", f"parallel.strategy={args.strategy}", f"lora.rank={args.lora_rank}"])
    env = P.init_distributed(device, cfg.parallel.timeout_s)
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(f"cuda:{env.local_rank}" if cuda else "cpu"):
            pol = TinyUMMPolicy.create(WORDS + reflection_words(), dim=dim, n_layers=layers, n_heads=heads,
                                       image_size=args.image_size, max_positions=160)
        pol.model.to(getattr(torch, args.dtype))
        if args.lora_rank:
            pol.enable_lora(args.lora_rank, 16.0, seed=0)
        n_params = sum(p.numel() for p in pol.model.parameters())
        n_train = sum(p.numel() for p in pol.trainable_parameters())
        world = brightness_world(n_train=64)
        trainer = GRPOTrainer(pol, DVReward(world.verifier), cfg,
                              generator=torch.Generator().manual_seed(env.rank))
        build_s = time.perf_counter() - t0
        stream = PromptStream(world.train, 0, env.rank, env.world)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows = []
        for i in range(args.warmup + args.steps):
            m = trainer.step(stream.next(prompts)).metrics
            m.update(P.global_throughput(m, device))
            if i >= args.warmup:
                rows.append(m)
            if env.rank == 0:
                print(f"step {i + 1}: {m['samples_per_s_total']:.1f} samples/s total, step {m['time_step']:.2f}s "
                      f"(rollout {m['time_rollout']:.2f} replay {m['time_replay']:.2f} comm {m['time_comm']:.3f} "
                      f"optim {m['time_optimizer']:.3f}), peak {m['peak_mem_gib_max']:.2f} GiB", file=sys.stderr)
        trainer.close()

        def med(k):
            return statistics.median(r[k] for r in rows)
        name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})"
        out = {"bench": "train_step", "device": name, "torch": torch.__version__, "commit": _commit(),
               "world_size": env.world, "strategy": args.strategy,
               "dim": dim, "layers": layers, "heads": heads, "params": n_params, "trainable_params": n_train,
               "dtype": args.dtype, "prompts_per_rank": prompts, "group": args.group, "sampler_steps":
               args.sampler_steps, "window": args.window, "think_tokens": args.think_tokens, "build_s": build_s,
               "samples_per_s_total": med("samples_per_s_total"), "samples_per_s_rank_min":
               med("samples_per_s_rank_min"), "peak_mem_gib_ranks": rows[-1]["peak_mem_gib_ranks"],
               "peak_mem_gib_max": rows[-1]["peak_mem_gib_max"],
               **{k: med(k) for k in ("time_step", "time_rollout", "time_reward_wait", "time_replay", "time_comm",
                                      "time_optimizer")}, "threads": torch.get_num_threads(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        if env.rank == 0:
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(out, indent=1))
            print(json.dumps(out))
    finally:
        P.shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
