"""Can GRPO raise accuracy on the prompts it trains on? The overfit check of an RL set-up.

    python -m experiments.rl_overfit --out runs/overfit [--per-task 1] [--samples 8] [KEY=VALUE ...]

Trains the ``tiny_shapes`` recipe (with the given overrides) on a small RL set, ``--per-task`` prompts per task type
(19 with the default 1), so that 40 steps of 8 prompts revisit each about 17 times, and evaluates the strict-judge
accuracy and DVReward on exactly those prompts (``--samples`` ODE samples each, think text at temperature 1) before
and after. A set-up that cannot raise this number cannot be expected to transfer to held-out prompts; one that can
but does not transfer is limited by data and steps, not by its signal. Prints and writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from alphagrpo.rewards import DVReward
    from alphagrpo.commands.common import setup_logging
    from alphagrpo.models.registry import load_policy
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.eval.evaluate import evaluate
    from alphagrpo.train.loop import train
    from alphagrpo.worlds.registry import load_world

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/overfit")
    p.add_argument("--per-task", type=int, default=1)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--eval-seed", type=int, default=123)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    setup_logging()
    cfg = apply_overrides(get_recipe("tiny_shapes"), [f"data.train_per_task={args.per_task}"] + args.overrides)
    world = load_world(cfg.data)
    policy = load_policy(cfg.model, cfg.device, world=world)
    reward = DVReward(world.verifier)
    seen = [r for r in world.train for _ in range(args.samples)]
    ev = dict(num_steps=cfg.sampler.eval_steps, shift=cfg.sampler.shift, cfg=cfg.cfg, reward=reward,
              seed=args.eval_seed, batch=cfg.eval_batch, max_think_tokens=cfg.max_think_tokens)

    def summary(e):
        return {k: round(e[k], 4) for k in ("accuracy", "reward", "semantic", "quality")}

    t0 = time.time()
    before = summary(evaluate(policy, world, seen, **ev))
    print("before", before, flush=True)
    history, policy = train(cfg, world, Path(args.out) / "run", policy=policy)
    after = summary(evaluate(policy, world, seen, **ev))
    res = {"bench": "rl_overfit", "overrides": args.overrides, "prompts": len(world.train),
           "samples_each": args.samples, "steps": len(history), "before": before, "after": after,
           "minutes": round((time.time() - t0) / 60, 2),
           "command": "python -m experiments.rl_overfit " + " ".join(sys.argv[1:] if argv is None else argv)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "overfit.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
