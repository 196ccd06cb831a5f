"""``alphagrpo pretrain --recipe tiny_shapes``: supervised pretraining of TinyUMM on rendered scenes.

Each example is drawn fresh from a training prompt: a satisfying scene is sampled and rendered.
- T2I: prompt -> plan text (LM loss), prompt + plan -> image (flow matching, with CFG dropout).
- Edit (for refinement): a corrupted version of the scene is the input image; the think text names what is wrong
  and gives the corrected plan; the target is the right image.
Reproducible from ``--seed``; ``--minutes`` bounds wall time (the step count reached is recorded). Ends with a
held-out evaluation per task type, written next to the checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from alphagrpo.models.policy import GenRequest
from alphagrpo.train.trainer import reflection_instruction

log = logging.getLogger(__name__)

MODEL_SIZES = {"tiny": dict(dim=128, n_layers=4, n_heads=4, max_positions=320),
               "micro": dict(dim=64, n_layers=2, n_heads=2, max_positions=320)}


def make_batch(world, records, rng: np.random.Generator, edit_frac: float, think_drop: float = 0.0,
               reflect_drop: float = 0.0):
    """Requests, think texts and target images (uint8 ``[B, H, W, 3]``) for one pretraining batch. ``think_drop``:
    the fraction of T2I examples whose think text is empty (the model learns to draw from the prompt alone there,
    and to answer ``<eot>`` at once about that often: a model that reasons before drawing only sometimes).
    ``reflect_drop``: the same for refinement examples (redraw from the prompt and the wrong image, no diagnosis)."""
    reqs, thinks, imgs = [], [], []
    for r in records:
        if world.sample_edit is not None and rng.random() < edit_frac:
            wrong, think, right = world.sample_edit(r, rng)
            reqs.append(GenRequest(r["prompt"], image=wrong, instruction=reflection_instruction(r["prompt"])))
            thinks.append("" if reflect_drop and rng.random() < reflect_drop else think)
            imgs.append(right)
        else:
            plan, img = world.sample_target(r, rng)
            reqs.append(GenRequest(r["prompt"]))
            thinks.append("" if think_drop and rng.random() < think_drop else plan)
            imgs.append(img)
    return reqs, thinks, np.stack(imgs)


def pretrain(world, *, out: Path, size: str = "tiny", steps: int = 20000, minutes: float = 0.0, batch: int = 64,
             lr: float = 1e-3, edit_frac: float = 0.25, seed: int = 0, log_every: int = 100, extra_words=(),
             init: Optional[str] = None, train_shift: float = 3.0, stop_after: int = 0, device: str = "cpu",
             think_drop: float = 0.0, reflect_drop: float = 0.0):
    """Train a fresh TinyUMM (or continue ``init``); save it to ``out``. Returns ``(policy, report dict)``.
    ``train_shift`` skews the flow-matching noise levels towards high sigma (where the layout must come from the
    text alone). ``think_drop``, ``reflect_drop``: see :func:`make_batch`."""
    for name, v in (("think_drop", think_drop), ("reflect_drop", reflect_drop)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (the fraction of examples without think text), got {v}")
    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    from alphagrpo.train.trainer import reflection_words
    torch.manual_seed(seed)  # parameter initialisation only; data and noise use explicit generators below
    words = list(world.words) + reflection_words() + list(extra_words)
    if init:
        policy = TinyUMMPolicy.from_pretrained(init)
        missing = sorted(set(words) - set(policy.tok.stoi))
        if missing:
            raise ValueError(f"checkpoint {init} lacks words of this world: {missing[:10]}; pretrain from scratch")
        prior = json.loads((Path(init) / "config.json").read_text()).get("pretrain")
    else:
        policy = TinyUMMPolicy.create(sorted(set(words)), **MODEL_SIZES[size])
        prior = None
    model = policy.model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = min(500, max(1, steps // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining TinyUMM-%s (%.2fM parameters) for up to %d steps%s", size, n_params / 1e6, steps,
             f" or {minutes} min" if minutes else "")
    ema = None
    done = 0
    for step in range(steps):
        idx = rng.integers(0, len(world.train), size=batch)
        reqs, thinks, imgs = make_batch(world, [world.train[i] for i in idx], rng, edit_frac, think_drop,
                                        reflect_drop)
        lm, flow = policy.supervised_losses(reqs, thinks, imgs, generator=gen, shift=train_shift)
        loss = lm + flow
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        cur = (lm.item(), flow.item())
        ema = cur if ema is None else tuple(0.98 * a + 0.02 * b for a, b in zip(ema, cur))
        if done % log_every == 0:
            el = time.time() - t0
            log.info("pretrain step %6d | lm %.4f | flow %.4f | lr %.2e | %.1f ex/s | %.1f min", done, ema[0], ema[1],
                     sched.get_last_lr()[0], done * batch / el, el / 60)
        if (minutes and time.time() - t0 > minutes * 60) or (stop_after and done >= stop_after):
            break
    elapsed = time.time() - t0
    report = {"size": size, "parameters": n_params, "steps": done, "batch": batch, "lr": lr, "seed": seed,
              "edit_frac": edit_frac, "minutes": elapsed / 60, "lm_loss": ema[0] if ema else None,
              "flow_loss": ema[1] if ema else None, "threads": torch.get_num_threads(), "train_shift": train_shift,
              "init": str(init) if init else None, "previous": prior, "device": str(device),
              "think_drop": think_drop, "reflect_drop": reflect_drop}
    policy.save_pretrained(out, extra={"pretrain": report})
    return policy, report


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
    from alphagrpo.rewards import DVReward
    from alphagrpo.train.common import print_table, setup_logging
    from alphagrpo.train.config import get_recipe
    from alphagrpo.train.evaluate import evaluate, grid_from_eval, summary
    from alphagrpo.train.world import load_world
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
    res = evaluate(policy, world, recs, num_steps=cfg.sampler.eval_steps, shift=cfg.sampler.shift, cfg=cfg.cfg,
                   reward=reward, seed=args.seed, batch=cfg.eval_batch, progress=True)
    report["heldout"] = summary(res)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=1))
    grid_from_eval(out.parent / f"{out.name}_heldout.png", res, recs, world)
    print_table("held-out accuracy per task (pretrained)", [(k, f"{v:.3f}") for k, v in res["per_task"].items()],
                ("task", "accuracy"))
    print(json.dumps({"accuracy": res["accuracy"], "reward": res["reward"], "steps": report["steps"],
                      "minutes": round(report["minutes"], 1), "out": str(out)}))
    return 0
