"""``alphagrpo pretrain --recipe tiny_shapes``: supervised pretraining of TinyUMM on rendered scenes, then a
held-out evaluation per task type written next to the checkpoint (``alphagrpo.train.pretrain`` is the library)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from alphagrpo.train.pretrain import MODEL_SIZES, pretrain


def add_arguments(p):
    p.add_argument("--recipe", default="tiny_shapes", help="recipe whose data/world to pretrain on")
    p.add_argument("--out", default="runs/pretrain/tinyumm_shapes",
                   help="checkpoint folder (the shipped one is alphagrpo/assets/tinyumm_shapes; never the default, "
                        "so a stray run cannot replace it)")
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES))
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this wall time (0: no limit)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=256, help="held-out prompts for the final report")
    p.add_argument("--init", default=None, help="continue from this checkpoint instead of a fresh model")
    p.add_argument("--edit-frac", type=float, default=0.25, help="fraction of refinement (edit) examples")
    p.add_argument("--think-drop", type=float, default=0.0,
                   help="fraction of T2I examples with an empty think text: the pretrained model then reasons before "
                        "drawing on only about 1 - this of its prompts, and RL can learn when reasoning pays")
    p.add_argument("--reflect-drop", type=float, default=0.0,
                   help="fraction of refinement examples with an empty think text (no diagnosis): the model then "
                        "reflects on only about 1 - this of its refinements, and SRR can learn when reflecting pays")
    p.add_argument("--train-shift", type=float, default=3.0, help="noise-level shift of the flow-matching loss")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N; the CPU run is the reference")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many steps, keeping the learning-rate schedule of --steps (0: run all)")


def run(args) -> int:
    from alphagrpo.commands.common import print_table, setup_logging
    from alphagrpo.eval.evaluate import EvalSettings, evaluate, summary
    from alphagrpo.eval.figures import grid_from_eval
    from alphagrpo.rewards import DVReward
    from alphagrpo.train.config import get_recipe
    from alphagrpo.worlds.registry import load_world
    setup_logging()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA but this torch has no CUDA device; use --device cpu")
    cfg = get_recipe(args.recipe)
    cfg.data.train_per_task = 500  # pretraining sees the whole synthesized training split
    cfg.data.train_split = "pretrain"
    cfg.data.test_size = max(cfg.data.test_size, args.eval_n)
    world = load_world(cfg.data)
    out = Path(args.out)
    policy, report = pretrain(world, out=out, size=args.size, steps=args.steps, minutes=args.minutes,
                              batch=args.batch, lr=args.lr, seed=args.seed, init=args.init,
                              edit_frac=args.edit_frac, train_shift=args.train_shift, stop_after=args.stop_after,
                              device=device, think_drop=args.think_drop,
                              reflect_drop=args.reflect_drop)
    reward = DVReward(world.verifier, mode=cfg.reward.mode)
    recs = world.test[: args.eval_n]
    res = evaluate(policy, world, recs, EvalSettings.from_config(cfg, seed=args.seed, max_think_tokens=48,
                                                                 temperature=1.0), reward=reward, progress=True)
    report["heldout"] = summary(res)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=1))
    grid_from_eval(out.parent / f"{out.name}_heldout.png", res, recs, world)
    print_table("held-out accuracy per task (pretrained)", [(k, f"{v:.3f}") for k, v in res["per_task"].items()],
                ("task", "accuracy"))
    print(json.dumps({"accuracy": res["accuracy"], "reward": res["reward"], "steps": report["steps"],
                      "minutes": round(report["minutes"], 1), "out": str(out)}))
    return 0
