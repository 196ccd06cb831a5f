"""``alphagrpo train --recipe NAME``: the GRPO loop with checkpoints, exact resume and logs, for any registered
policy (``--set model.kind=... --set model.path=...``), world (``data.world``) and verifier (``reward.verifier``).

Several GPUs or nodes: ``torchrun --nproc-per-node=N -m alphagrpo.cli train ...`` (docs/distributed.md). Rank 0
logs; the others only warn. A failure on any rank ends that rank with ``error: rank R/N: ...`` on stderr and a
non-zero status, and torchrun then stops the other ranks."""
from __future__ import annotations

import json
import os
import sys
import traceback

from alphagrpo.commands.common import add_config_arguments, resolve_config, setup_logging, writable_dir
from alphagrpo.train.loop import train
from alphagrpo.worlds.registry import load_world


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--resume-or-start", action="store_true",
                   help="with --resume: start a fresh run when the folder holds no checkpoint (for restart wrappers)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: apply settings that differ from the checkpoint's (exact resume is lost; "
                        "the change is recorded in config_changes.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its checkpoints "
                   "and metrics are deleted)")
    p.add_argument("--steps", type=int, default=None, help="total steps of the run (default: the recipe's)")
    p.add_argument("--init", default=None, help="policy folder to start from (sets model.path)")


def run(args) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _run(args, rank)
    try:
        return _run(args, rank)
    except Exception as e:     # one rank's failure: say which rank and why, exit non-zero (torchrun stops the rest)
        if os.environ.get("ALPHAGRPO_DEBUG"):
            raise
        if not isinstance(e, (ValueError, FileNotFoundError)):    # not a settings problem: where it happened
            traceback.print_exc()
        print(f"error: rank {rank}/{world}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1


def _run(args, rank: int) -> int:
    setup_logging(rank=rank)
    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.resume_or_start and not args.resume:
        raise ValueError("--resume-or-start goes with --resume")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    cfg = resolve_config(args.recipe, overrides, args.init)
    run_dir = writable_dir(args.out or f"runs/{cfg.recipe}")
    world = load_world(cfg.data)
    hist, _ = train(cfg, world, run_dir, resume=args.resume, overwrite=args.overwrite,
                    allow_config_change=args.allow_config_change, resume_or_start=args.resume_or_start)
    last = hist[-1] if hist else {}
    if rank != 0:
        return 0
    print(json.dumps({"steps": len(hist), "reward_mean_last": last.get("reward_mean"), "run_dir": str(run_dir)}))
    return 0
