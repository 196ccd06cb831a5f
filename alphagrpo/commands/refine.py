"""``alphagrpo refine``: inference-time self-reflective refinement on held-out prompts, per round, optionally
against the best-of-n control (``--compare``); ``refine.json`` and a figure of refined prompts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from alphagrpo.commands.common import add_config_arguments, eval_context, print_table
from alphagrpo.eval.evaluate import EvalSettings
from alphagrpo.eval.figures import refinement_figure
from alphagrpo.eval.refine import MODES, refine

log = logging.getLogger(__name__)


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--checkpoint", default=None, help="policy folder (sets model.path; default: the recipe's model)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threshold", type=float, default=None, help="also refine while reward is below this")
    p.add_argument("--n", type=int, default=128, help="held-out prompts")
    p.add_argument("--seeds", default="0", help="comma-separated sampling seeds (mean and spread over them)")
    p.add_argument("--out", default="runs/refine")
    p.add_argument("--mode", default="reflect", choices=MODES,
                   help="reflect: self-reflective refinement; resample: best-of-n control without reflection")
    p.add_argument("--compare", action="store_true",
                   help="run reflect and resample on the same prompts and seeds, print both per round")
    p.add_argument("--figure", type=int, default=4, metavar="N",
                   help="write refinement.png explaining N refined prompts of the first seed (0: none)")


def run(args) -> int:
    import statistics
    if args.rounds < 0:
        raise ValueError(f"--rounds must be >= 0 (refinement rounds after the first image), got {args.rounds}")
    try:
        seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
    if not seeds:
        raise ValueError("--seeds needs at least one integer, e.g. --seeds 0,1,2")
    cfg, world, policy, reward, recs = eval_context(args.recipe, args.set, args.n, args.checkpoint)
    modes = MODES if args.compare else (args.mode,)
    hist = {m: {} for m in modes}
    for seed in seeds:
        for mode in modes:
            res = refine(policy, reward, recs, EvalSettings.from_config(cfg, seed=seed), rounds=args.rounds,
                         threshold=args.threshold, judge=world.judge, mode=mode)
            h = res.history + [dict(res.history[-1], round=r, refined=0, thought=None,  # stopped early: none left
                                    drawn_accuracy_given_thought=None)
                               for r in range(len(res.history), args.rounds + 1)]
            hist[mode][seed] = h
            if mode == "reflect" and seed == seeds[0] and args.figure > 0:
                refinement_figure(Path(args.out) / "refinement.png", res, recs, n=args.figure)
            log.info("%s seed %d: accuracy per round %s", mode, seed, [round(x["accuracy"], 3) for x in h])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refine.json").write_text(json.dumps({"history": hist, "n": len(recs), "seeds": seeds}, indent=1))

    def stat(mode, r, key):
        v = [hist[mode][s][r][key] for s in seeds]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    rows, summary = [], {}
    for r in range(args.rounds + 1):
        row = [r]
        for mode in modes:
            (am, asd), (rm, rsd) = stat(mode, r, "accuracy"), stat(mode, r, "reward")
            row += [f"{am:.3f} ± {asd:.3f}", f"{rm:.3f} ± {rsd:.3f}"]
            th = [hist[mode][s][r]["thought"] for s in seeds if hist[mode][s][r].get("thought") is not None]
            split = {k: [v[k] for s in seeds for v in [hist[mode][s][r].get("drawn_accuracy_given_thought") or {}]
                         if v.get(k) is not None] for k in ("thought", "direct")}
            summary.setdefault(mode, []).append({"round": r, "accuracy": am, "reward": rm,
                                                 "thought": statistics.mean(th) if th else None,
                                                 "drawn_accuracy_given_thought":
                                                     {k: statistics.mean(v) if v else None for k, v in split.items()}})
        rows.append(tuple(row))
    head = ("round",) + sum(((f"{m} accuracy", f"{m} reward") for m in modes), ())
    print_table(f"inference-time refinement: best image so far, {len(recs)} held-out prompts, seeds {seeds}",
                rows, head)
    print(json.dumps(summary if len(modes) > 1 else {"rounds": summary[modes[0]]}))
    return 0
