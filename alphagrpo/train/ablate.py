"""``alphagrpo ablate --study {fpr,scoring,reward}``: the paper's ablations (Tables 3-5) in the shapes world.

Each study trains every variant from the same starting checkpoint for several seeds, evaluates on the same held-out
prompts, and writes a table (held-out ground-truth accuracy and mean DVReward, mean and spread over seeds):
- ``fpr``: SRR training with False-Positive Rectification on vs off; evaluated after one inference-time
  refinement round (what SRR training is for);
- ``scoring``: confidence scores vs binary (thresholded) scores in the reward;
- ``reward``: DVReward vs a holistic single question ("Does this image match: {prompt}?") vs semantic questions only.
The reported reward is always the full confidence DVReward, whatever the variant trained on.
"""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

log = logging.getLogger(__name__)

STUDIES = {
    "fpr": ("tiny_shapes_srr", {"fpr on": ["reward.fpr=true"], "fpr off": ["reward.fpr=false"]}),
    "scoring": ("tiny_shapes", {"confidence": ["reward.binary=false"], "binary": ["reward.binary=true"]}),
    "reward": ("tiny_shapes", {"dvreward": ["reward.mode=geometric"], "holistic": ["reward.holistic=true"],
                               "semantic only": ["reward.mode=semantic"]}),
}


def run_study(study: str, *, seeds, steps: int, eval_n: int, out: Path, extra=(), checkpoint=None,
              world=None) -> dict:
    """Train and evaluate every variant of ``study`` for each seed. Returns the table as a dict."""
    from alphagrpo.rewards import DVReward
    from alphagrpo.train.common import load_policy
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.train.evaluate import evaluate
    from alphagrpo.train.refine import refine
    from alphagrpo.train.run import train
    from alphagrpo.train.world import load_world
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {sorted(STUDIES)}")
    recipe, variants = STUDIES[study]
    base = apply_overrides(get_recipe(recipe), list(extra))
    base.data.test_size = max(base.data.test_size, eval_n)
    world = world or load_world(base.data)
    test = world.test[:eval_n]
    rows = {}
    for name, sets in variants.items():
        for seed in seeds:
            cfg = apply_overrides(get_recipe(recipe), list(extra) + sets + [f"steps={steps}", f"seed={seed}",
                                                                            "ckpt_every=0"])
            cfg.data = base.data
            _, policy = train(cfg, world, out / f"{name.replace(' ', '_')}_s{seed}",
                              policy=load_policy(checkpoint or cfg.init, cfg.device))
            reward = DVReward(world.verifier)
            kw = dict(num_steps=cfg.sampler.eval_steps, shift=cfg.sampler.shift, cfg=cfg.cfg, seed=10_000 + seed,
                      batch=cfg.eval_batch, max_think_tokens=cfg.max_think_tokens)
            if study == "fpr":
                res = refine(policy, reward, test, rounds=1, judge=world.judge, **kw)
                acc, rew = res.history[-1]["accuracy"], res.history[-1]["reward"]
            else:
                ev = evaluate(policy, world, test, reward=reward, **kw)
                acc, rew = ev["accuracy"], ev["reward"]
            rows.setdefault(name, []).append({"seed": seed, "accuracy": acc, "reward": rew})
            log.info("%s / %s seed %d: accuracy %.3f reward %.3f", study, name, seed, acc, rew)
    table = {"study": study, "recipe": recipe, "steps": steps, "eval_n": eval_n, "seeds": list(seeds),
             "variants": {k: {"runs": v, **_agg(v)} for k, v in rows.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablation_{study}.json").write_text(json.dumps(table, indent=1))
    return table


def _agg(runs):
    acc = [r["accuracy"] for r in runs]
    rew = [r["reward"] for r in runs]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    return {"accuracy_mean": statistics.mean(acc), "accuracy_sd": sd(acc), "reward_mean": statistics.mean(rew),
            "reward_sd": sd(rew)}


def add_arguments(p):
    p.add_argument("--study", required=True, choices=sorted(STUDIES))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    from alphagrpo.train.common import print_table, setup_logging
    setup_logging()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    t = run_study(args.study, seeds=seeds, steps=args.steps, eval_n=args.eval_n, out=Path(args.out),
                  extra=args.set, checkpoint=args.checkpoint)
    print_table(f"ablation '{args.study}' ({len(seeds)} seeds, {args.steps} steps, {args.eval_n} held-out prompts)",
                [(k, f"{v['accuracy_mean']:.3f} ± {v['accuracy_sd']:.3f}", f"{v['reward_mean']:.3f} ± {v['reward_sd']:.3f}")
                 for k, v in t["variants"].items()], ("variant", "accuracy", "reward"))
    print(json.dumps({k: {"accuracy": v["accuracy_mean"], "reward": v["reward_mean"]}
                      for k, v in t["variants"].items()}))
    return 0
