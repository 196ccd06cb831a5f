"""``alphagrpo ablate --study {fpr,scoring,reward}``: the paper's ablations (Tables 3-5) in the shapes world.

Each study trains every variant from the same starting checkpoint for several seeds, evaluates on the same held-out
prompts, and writes a table (held-out ground-truth accuracy and mean DVReward, mean and spread over seeds):
- ``fpr``: SRR training with False-Positive Rectification on vs off, and the starting checkpoint without SRR
  training as the reference row; evaluated by one inference-time refinement round (what SRR training is for),
  reporting the accuracy of the initial images and of the refined (best-so-far) images;
- ``scoring``: confidence scores vs binary (thresholded) scores in the reward;
- ``reward``: DVReward vs a holistic single question ("Does this image match: {prompt}?") vs semantic questions only.
The reported reward is always the full confidence DVReward, whatever the variant trained on. Every table starts
with the starting checkpoint itself, evaluated the same way, so a variant is read against "no training" too.
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
    from alphagrpo.eval.evaluate import EvalSettings, evaluate
    from alphagrpo.eval.refine import refine
    from alphagrpo.models.registry import load_policy
    from alphagrpo.rewards import DVReward
    from alphagrpo.train.checkpoint import atomic_dir
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.train.loop import train
    from alphagrpo.worlds.registry import load_world
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {sorted(STUDIES)}")
    recipe, variants = STUDIES[study]
    base = apply_overrides(get_recipe(recipe), list(extra))
    base.data.test_size = max(base.data.test_size, eval_n)
    world = world or load_world(base.data)
    test = world.test[:eval_n]
    rows = {}
    if checkpoint:
        base.model.path = checkpoint
    start = load_policy(base.model, base.device, world=world)
    for seed in seeds:  # the reference row: the starting checkpoint, evaluated as every variant is
        s = EvalSettings.from_config(base, seed=10_000 + seed)   # sampling seed offset from the training seed
        if study == "fpr":
            res = refine(start, DVReward(world.verifier), test, s, rounds=1, judge=world.judge)
            rows.setdefault(START_ROW, []).append(_refine_row(seed, res))
        else:
            ev = evaluate(start, world, test, s, reward=DVReward(world.verifier))
            rows.setdefault(START_ROW_RL, []).append({"seed": seed, "accuracy": ev["accuracy"], "reward": ev["reward"]})
    for name, sets in variants.items():
        for seed in seeds:
            cfg = apply_overrides(get_recipe(recipe), list(extra) + sets + [f"steps={steps}", f"seed={seed}",
                                                                            "ckpt_every=0"])
            cfg.data, cfg.model = base.data, base.model
            run_dir = out / f"{name.replace(' ', '_')}_s{seed}"
            _, policy = train(cfg, world, run_dir, policy=load_policy(cfg.model, cfg.device, world=world),
                              overwrite=True)
            atomic_dir(run_dir / "policy", policy.save_pretrained)  # e.g. for `alphagrpo refine --checkpoint`
            reward = DVReward(world.verifier)
            s = EvalSettings.from_config(cfg, seed=10_000 + seed)
            if study == "fpr":
                row = _refine_row(seed, refine(policy, reward, test, s, rounds=1, judge=world.judge))
            else:
                ev = evaluate(policy, world, test, s, reward=reward)
                row = {"seed": seed, "accuracy": ev["accuracy"], "reward": ev["reward"]}
            rows.setdefault(name, []).append(row)
            log.info("%s / %s seed %d: accuracy %.3f reward %.3f", study, name, seed, row["accuracy"], row["reward"])
    table = {"study": study, "recipe": recipe, "steps": steps, "eval_n": eval_n, "seeds": list(seeds),
             "variants": {k: {"runs": v, **_agg(v)} for k, v in rows.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablation_{study}.json").write_text(json.dumps(table, indent=1))
    return table


START_ROW = "start checkpoint (no SRR training)"
START_ROW_RL = "start checkpoint (no GRPO training)"


def _pm(v: dict, key: str) -> str:
    return f"{v[key + '_mean']:.3f} ± {v[key + '_sd']:.3f}"


def _refine_row(seed, res) -> dict:
    """Accuracy/reward after one refinement round, with the initial images' accuracy beside them."""
    h0, h1 = res.history[0], res.history[-1]
    split = (h1.get("drawn_accuracy_given_thought") or {}) if len(res.history) > 1 else {}
    rate = h1.get("thought") if len(res.history) > 1 else None
    row = {"seed": seed, "accuracy": h1["accuracy"], "reward": h1["reward"], "initial_accuracy": h0["accuracy"],
           "initial_reward": h0["reward"], "reflect_rate": rate,
           "redraw_accuracy_diagnosed": split.get("thought"), "redraw_accuracy_undiagnosed": split.get("direct")}
    row["redraw_accuracy"] = redraw_accuracy(row)
    return row


def redraw_accuracy(row: dict):
    """Accuracy of the refined images themselves (not the best so far), over the prompts that were refined:
    the diagnosed and undiagnosed redraws weighted by how often a diagnosis was written."""
    rate, yes, no = row.get("reflect_rate"), row.get("redraw_accuracy_diagnosed"), row.get("redraw_accuracy_undiagnosed")
    if rate is None or (yes is None and no is None):
        return None
    return rate * (yes or 0.0) + (1.0 - rate) * (no or 0.0)


def _agg(runs):
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    out = {}
    for key in ("accuracy", "reward", "initial_accuracy", "initial_reward", "reflect_rate", "redraw_accuracy",
                "redraw_accuracy_diagnosed", "redraw_accuracy_undiagnosed"):
        if key in runs[0] and all(r.get(key) is not None for r in runs):
            v = [r[key] for r in runs]
            out[f"{key}_mean"], out[f"{key}_sd"] = statistics.mean(v), sd(v)
    return out


def add_arguments(p):
    p.add_argument("--study", required=True, choices=sorted(STUDIES))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    from alphagrpo.commands.common import print_table, setup_logging
    setup_logging()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    t = run_study(args.study, seeds=seeds, steps=args.steps, eval_n=args.eval_n, out=Path(args.out),
                  extra=args.set, checkpoint=args.checkpoint)
    title = f"ablation '{args.study}' ({len(seeds)} seeds, {args.steps} steps, {args.eval_n} held-out prompts)"
    if args.study == "fpr":
        opt = (lambda v, k: _pm(v, k) if f"{k}_mean" in v else "-")
        print_table(title, [(k, _pm(v, "initial_accuracy"), _pm(v, "accuracy"), _pm(v, "reward"),
                             opt(v, "reflect_rate"), opt(v, "redraw_accuracy"), opt(v, "redraw_accuracy_diagnosed"),
                             opt(v, "redraw_accuracy_undiagnosed")) for k, v in t["variants"].items()],
                    ("variant", "initial accuracy", "refined accuracy", "refined reward", "writes a diagnosis",
                     "redraw accuracy", "diagnosed", "undiagnosed"))
    else:
        print_table(title, [(k, _pm(v, "accuracy"), _pm(v, "reward")) for k, v in t["variants"].items()],
                    ("variant", "accuracy", "reward"))
    print(json.dumps({k: {"accuracy": v["accuracy_mean"], "reward": v["reward_mean"]}
                      for k, v in t["variants"].items()}))
    return 0
