"""``alphagrpo demo``: the embedded default. From the shipped TinyUMM checkpoint: evaluate on held-out prompts and
on the RL prompts, run a short RT2I GRPO training on CPU, evaluate both again, and write a report folder (reward
curve PNG, before/after grids, metrics JSON, a printed table). The last line printed is one JSON object with
``before`` and ``after`` (held-out) and ``rl_prompts`` (the same on the prompts GRPO trained on, when that set is
small enough to be revisited; else null).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="report folder")
    p.add_argument("--recipe", default="tiny_shapes")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts (default: the recipe's eval_size)")
    p.add_argument("--checkpoint", default=None, help="start from this policy folder (sets model.path; default: the "
                   "shipped TinyUMM)")
    p.add_argument("--rl-eval", type=int, default=4, metavar="K",
                   help="when the RL prompt set is small (<= 64 prompts, e.g. --set data.train_per_task=1, so a run "
                        "revisits each), also evaluate K samples of each before and after (0: never)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def run(args) -> int:
    from alphagrpo.commands.common import print_table, resolve_config, setup_logging
    from alphagrpo.eval.evaluate import EvalSettings, evaluate, fmt3, summary
    from alphagrpo.eval.figures import grid_from_eval, reward_curve
    from alphagrpo.models.registry import load_policy
    from alphagrpo.rewards import DVReward
    from alphagrpo.train.loop import build_reward, train
    from alphagrpo.worlds.registry import load_world
    setup_logging()
    if args.rl_eval < 0:
        raise ValueError(f"--rl-eval must be >= 0 (samples per RL prompt; 0 skips), got {args.rl_eval}")
    t0 = time.time()
    overrides = list(args.set) + [f"seed={args.seed}"]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    cfg = resolve_config(args.recipe, overrides, args.checkpoint)
    n_eval = args.eval_n or cfg.eval_size
    cfg.data.test_size = max(cfg.data.test_size, n_eval)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = load_world(cfg.data)
    policy = load_policy(cfg.model, cfg.device, world=world)
    # evaluation always reports DVReward as the recipe defines it, whatever reward the run trains on
    reward = DVReward(build_reward(cfg, world).verifier)
    test = world.test[:n_eval]
    ev = dict(s=EvalSettings.from_config(cfg, seed=10_000 + args.seed), reward=reward)
    log.info("evaluating the starting checkpoint on %d held-out prompts", len(test))
    before = evaluate(policy, world, test, **ev)
    grid_from_eval(out / "before.png", before, test, world)
    log.info("before: accuracy %.3f reward %.3f (%.0fs)", before["accuracy"], before["reward"], time.time() - t0)
    # the prompts GRPO trains on, K samples each: what the run optimizes, next to what it should transfer to
    seen = [r for r in world.train for _ in range(args.rl_eval)] if len(world.train) <= 64 else []
    n_rl = len(world.train) if seen else 0
    rl_ev = dict(ev, s=EvalSettings.from_config(cfg, seed=20_000 + args.seed))
    rl_before = evaluate(policy, world, seen, **rl_ev) if seen else None
    history, policy = train(cfg, world, out / "run", policy=policy, overwrite=True)
    after = evaluate(policy, world, test, **ev)
    rl_after = evaluate(policy, world, seen, **rl_ev) if seen else None
    grid_from_eval(out / "after.png", after, test, world)
    if history:
        reward_curve(out / "reward_curve.png", history, f"{cfg.recipe}: rollout reward per step")
    report = {"recipe": cfg.recipe, "seed": args.seed, "steps": len(history), "eval_n": len(test),
              "before": summary(before), "after": summary(after), "minutes": (time.time() - t0) / 60,
              "rl_prompts": None if rl_before is None else {
                  "prompts": n_rl, "samples_each": args.rl_eval,
                  "before": summary(rl_before), "after": summary(rl_after)},
              "history": history}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    rows = [(task, f"{before['per_task'][task]:.3f}", f"{after['per_task'].get(task, 0):.3f}")
            for task in before["per_task"]]
    rows.append(("OVERALL accuracy", f"{before['accuracy']:.3f}", f"{after['accuracy']:.3f}"))
    rows.append(("mean DVReward", f"{before['reward']:.3f}", f"{after['reward']:.3f}"))
    rows.append(("  semantic part", f"{before['semantic']:.3f}", f"{after['semantic']:.3f}"))
    rows.append(("  quality part", f"{before['quality']:.3f}", f"{after['quality']:.3f}"))
    if "think_rate" in before and "think_rate" in after:  # how often the model reasons before drawing
        rows.append(("reasons before drawing", f"{before['think_rate']:.3f}", f"{after['think_rate']:.3f}"))
        for side, label in (("thought", "with think"), ("direct", "without think")):
            rows.append((f"  accuracy {label}", fmt3(before["accuracy_given_think"][side]),
                         fmt3(after["accuracy_given_think"][side])))
    if "plan_accuracy" in before and "plan_accuracy" in after:   # reasoning vs drawing (worlds that read plans)
        rows.append(("think text's plan right", f"{before['plan_accuracy']:.3f}", f"{after['plan_accuracy']:.3f}"))
        rows.append(("  accuracy given a right plan", fmt3(before["accuracy_given_plan"]["right"]),
                     fmt3(after["accuracy_given_plan"]["right"])))
    if rl_before is not None:
        rows.append((f"RL prompts ({n_rl} x {args.rl_eval}) accuracy", f"{rl_before['accuracy']:.3f}",
                     f"{rl_after['accuracy']:.3f}"))
        rows.append(("RL prompts DVReward", f"{rl_before['reward']:.3f}", f"{rl_after['reward']:.3f}"))
    print_table(f"evaluation ({len(test)} held-out prompts; RL prompts last), before vs after {len(history)} GRPO "
                "steps",
                rows, ("task", "before", "after"))
    print(f"report: {out}/ (reward_curve.png, before.png, after.png, metrics.json); "
          f"{(time.time() - t0) / 60:.1f} min")
    print(json.dumps({"before": {"accuracy": before["accuracy"], "reward": before["reward"]},
                      "after": {"accuracy": after["accuracy"], "reward": after["reward"]},
                      "steps": len(history), "eval_n": len(test), "seed": args.seed,
                      "rl_prompts": None if rl_before is None else {
                          "before": {"accuracy": rl_before["accuracy"], "reward": rl_before["reward"]},
                          "after": {"accuracy": rl_after["accuracy"], "reward": rl_after["reward"]}}}))
    return 0
