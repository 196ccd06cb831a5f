"""``alphagrpo eval``: held-out prompts -> images -> ground-truth accuracy per task type (the world's judge) and mean
DVReward; ``eval.json`` and a PNG grid of samples with their failed questions marked. Any policy
(``--set model.kind=... --set model.path=...``) and any verifier (``--set reward.verifier=...``).

When the world can read a plan out of a think text (``World.plan_ok``; the shapes world can), the accuracy is split
into its two causes: ``plan_accuracy`` (the think text states a layout that satisfies the prompt) and the accuracy of
the drawings given a right or a wrong plan. ``--oracle-plans`` also draws every prompt from a right plan of the
world's own (the drawing's ceiling, with no reasoning errors).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alphagrpo.commands.common import add_config_arguments, eval_context, print_table
from alphagrpo.eval.evaluate import EvalSettings, evaluate, fmt3, summary
from alphagrpo.eval.figures import grid_from_eval, x0_grid


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--checkpoint", default=None, help="policy folder to evaluate (sets model.path; default: the "
                   "recipe's model, for TinyUMM the shipped checkpoint)")
    p.add_argument("--n", type=int, default=256, help="held-out prompts to evaluate")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the recipe's eval_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval", help="folder for eval.json and grid.png")
    p.add_argument("--x0", type=int, default=0, metavar="N",
                   help="also write x0.png: the model's clean-image prediction at several noise levels for N prompts")
    p.add_argument("--temperature", type=float, default=None,
                   help="think sampling temperature (default: the recipe's think_temperature; 0 = greedy)")
    p.add_argument("--oracle-plans", action="store_true",
                   help="also draw every prompt from a right plan of the world's own: the drawing's accuracy with no "
                        "reasoning errors (needs a world with sample_target)")


def run(args) -> int:
    cfg, world, policy, reward, recs = eval_context(args.recipe, args.set, args.n, args.checkpoint)
    if args.oracle_plans and world.sample_target is None:
        raise ValueError("--oracle-plans needs a world that can sample a right plan (World.sample_target); this "
                         "one cannot")
    s = EvalSettings.from_config(cfg, seed=args.seed)
    if args.steps is not None:
        s.num_steps = args.steps
    if args.temperature is not None:
        s.temperature = args.temperature
    res = evaluate(policy, world, recs, s, reward=reward, progress=True)
    report = summary(res)
    if args.oracle_plans:
        rng = np.random.default_rng(args.seed)
        plans = [world.sample_target(r, rng)[0] for r in recs]
        oracle = evaluate(policy, world, recs, s, reward=reward, think_texts=plans)
        report["oracle_plans"] = {k: v for k, v in summary(oracle).items()
                                  if k in ("accuracy", "reward", "semantic", "quality", "per_task")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    grid_from_eval(out / "grid.png", res, recs, world)
    if args.x0 > 0:
        x0_grid(out / "x0.png", policy, world, recs[: args.x0], seed=args.seed)
    cols, rows = ["task", "accuracy"], []
    for k, v in res["per_task"].items():
        row = [k, fmt3(v)]
        if "per_task_plan" in res:
            row.append(fmt3(res["per_task_plan"].get(k)))
        if "oracle_plans" in report:
            row.append(fmt3(report["oracle_plans"]["per_task"].get(k)))
        rows.append(row)
    total = ["OVERALL", fmt3(res["accuracy"])]
    if "per_task_plan" in res:
        cols.append("plan right")
        total.append(fmt3(res["plan_accuracy"]))
    if "oracle_plans" in report:
        cols.append("drawn from a right plan")
        total.append(fmt3(report["oracle_plans"]["accuracy"]))
    rows.append(total)
    print_table("held-out accuracy per task", rows, cols)
    if "accuracy_given_plan" in res:
        g = res["accuracy_given_plan"]
        print(f"image accuracy given the think text's plan: right {fmt3(g['right'])}, wrong {fmt3(g['wrong'])}")
    if "think_rate" in res:
        g = res["accuracy_given_think"]
        print(f"reasons before drawing (non-empty think text): {fmt3(res['think_rate'])}; image accuracy with think "
              f"{fmt3(g['thought'])}, without {fmt3(g['direct'])}")
    line = {"accuracy": res["accuracy"], "reward": res["reward"], "n": res["n"]}
    if "think_rate" in res:
        line["think_rate"] = res["think_rate"]
    if "plan_accuracy" in res:
        line["plan_accuracy"] = res["plan_accuracy"]
    if "oracle_plans" in report:
        line["oracle_plan_accuracy"] = report["oracle_plans"]["accuracy"]
    print(json.dumps(line))
    return 0
