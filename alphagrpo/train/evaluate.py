"""``alphagrpo eval``: held-out prompts -> images (ODE sampler, think text) -> ground-truth accuracy per task type
(the world's strict judge, as GenEval uses a detector) and mean DVReward; JSON, and a PNG grid of samples with their
failed questions marked.

When the world can read a plan out of a think text (``World.plan_ok``; the shapes world can), the accuracy is split
into its two causes: ``plan_accuracy`` (the think text states a layout that satisfies the prompt) and the accuracy of
the drawings given a right or a wrong plan. ``--oracle-plans`` also draws every prompt from a right plan of the
world's own (the drawing's ceiling, with no reasoning errors).
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from alphagrpo.models.policy import CFGConfig, GenRequest
from alphagrpo.sampler import sample_flow

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(policy, requests: Sequence[GenRequest], *, num_steps: int, shift: float, cfg: CFGConfig,
             generator: torch.Generator, think: bool = True, max_think_tokens: int = 48, batch: int = 64,
             temperature: float = 1.0, progress: bool = False, think_texts: Optional[Sequence[str]] = None):
    """Images (uint8 ``[n, H, W, 3]``) and think texts for ``requests`` with the deterministic ODE sampler.
    ``think_texts`` replaces sampling: every image is drawn from the given text (needs a policy with
    ``encode_think``)."""
    if think_texts is not None:
        if not hasattr(policy, "encode_think"):
            raise ValueError(f"drawing from given think texts needs a policy with encode_think(texts); "
                             f"{type(policy).__name__} has none")
        if len(think_texts) != len(requests):
            raise ValueError(f"{len(think_texts)} think texts for {len(requests)} requests")
    images, texts = [], []
    it = range(0, len(requests), batch)
    if progress:
        from alphagrpo.train.common import require
        it = require("tqdm", "train").tqdm(it, desc="generate", unit="batch", leave=False)
    for a in it:
        part = list(requests[a:a + batch])
        if think_texts is not None:
            given = list(think_texts[a:a + batch])
            tokens = policy.encode_think(given)
        elif think:
            th = policy.sample_think(part, generator=generator, max_new_tokens=max_think_tokens,
                                     temperature=temperature)
            tokens, given = th.tokens, th.texts
        else:
            tokens, given = None, [""] * len(part)
        cond = policy.image_condition(part, tokens, cfg)
        x, _ = sample_flow(policy, cond, len(part), num_steps=num_steps, shift=shift, noise_level=0.0,
                           generator=generator, device=getattr(policy, "device", None))
        images.append(policy.decode(x))
        texts += given
    return np.concatenate(images) if images else np.zeros((0,)), texts


def _mean_of_means(rows) -> float:
    """Mean over images of the mean question score (0.0 when there are no questions)."""
    rows = [r for r in rows if len(r)]
    return float(np.mean([np.mean(r) for r in rows])) if rows else 0.0


def evaluate(policy, world, records: Sequence[dict], *, num_steps: int, shift: float, cfg: CFGConfig,
             reward, seed: int = 0, batch: int = 64, max_think_tokens: int = 48, progress: bool = False,
             think_temperature: float = 1.0, think_texts: Optional[Sequence[str]] = None) -> dict:
    """Accuracy (fraction of prompts whose image satisfies every semantic question, per the world's strict judge),
    per task and overall; mean reward, and its two parts (``semantic`` and ``quality``: mean question scores), which
    show when a reward rises for the wrong reason. Returns a dict with ``accuracy``, ``reward``, ``semantic``,
    ``quality``, ``per_task`` and ``samples``
    (images, think texts, correctness and failed questions for the grid). With a world that reads plans
    (``world.plan_ok``) also ``plan_accuracy``, ``accuracy_given_plan`` (``{"right": .., "wrong": ..}``, None for an
    empty side) and ``per_task_plan``. ``think_texts``: draw from these texts instead of sampling think."""
    g = torch.Generator().manual_seed(seed)
    reqs = [GenRequest(r["prompt"]) for r in records]
    images, texts = generate(policy, reqs, num_steps=num_steps, shift=shift, cfg=cfg, generator=g, batch=batch,
                             max_think_tokens=max_think_tokens, progress=progress, temperature=think_temperature,
                             think_texts=think_texts)
    correct = [bool(world.judge(img, r)) for img, r in zip(images, records)]
    res = reward(list(images), list(records)) if len(records) else None
    rewards = res.rewards if res is not None else torch.zeros(0)
    per = defaultdict(list)
    for ok, r in zip(correct, records):
        per[r.get("task", "all")].append(ok)
    out = {
        "accuracy": float(np.mean(correct)) if correct else 0.0,
        "reward": float(rewards.mean()) if len(records) else 0.0,
        "semantic": _mean_of_means(res.semantic) if res is not None else 0.0,
        "quality": _mean_of_means(res.quality) if res is not None else 0.0,
        "n": len(records),
        "per_task": {k: float(np.mean(v)) for k, v in sorted(per.items())},
    }
    if think_texts is None and records:   # sampled think texts: how often the model reasoned
        out.update(think_split(texts, correct))
    if getattr(world, "plan_ok", None) is not None and records:   # an empty think text states no plan: wrong
        out.update(plan_split(world, texts, records, correct))
    out["samples"] = {"images": images, "think": texts, "correct": correct, "rewards": rewards.tolist()}
    return out


def thought(texts: Sequence[str]) -> list:
    """Per think text, whether the model wrote one (an empty or blank text: it drew without reasoning)."""
    return [bool(t.strip()) for t in texts]


def think_split(texts: Sequence[str], correct: Sequence[bool]) -> dict:
    """How often the model reasons before drawing (``think_rate``: the fraction of non-empty sampled think texts)
    and the image accuracy with and without it (``accuracy_given_think``: ``{"thought": .., "direct": ..}``, None
    for an empty side)."""
    wrote = thought(texts)
    yes = [c for c, t in zip(correct, wrote) if t]
    no = [c for c, t in zip(correct, wrote) if not t]
    return {"think_rate": float(np.mean(wrote)),
            "accuracy_given_think": {"thought": float(np.mean(yes)) if yes else None,
                                     "direct": float(np.mean(no)) if no else None}}


def plan_split(world, texts: Sequence[str], records: Sequence[dict], correct: Sequence[bool]) -> dict:
    """Reasoning vs drawing: the fraction of think texts whose stated plan satisfies the prompt (``plan_accuracy``,
    overall and ``per_task_plan``) and the image accuracy among right and among wrong plans (``accuracy_given_plan``;
    None where no sample falls on that side)."""
    ok = [bool(world.plan_ok(t, r)) for t, r in zip(texts, records)]
    per = defaultdict(list)
    for o, r in zip(ok, records):
        per[r.get("task", "all")].append(o)
    right = [c for c, o in zip(correct, ok) if o]
    wrong = [c for c, o in zip(correct, ok) if not o]
    return {"plan_accuracy": float(np.mean(ok)),
            "accuracy_given_plan": {"right": float(np.mean(right)) if right else None,
                                    "wrong": float(np.mean(wrong)) if wrong else None},
            "per_task_plan": {k: float(np.mean(v)) for k, v in sorted(per.items())}}


def save_grid(path: str | Path, images, captions: Sequence[str], correct: Optional[Sequence[bool]] = None,
              cols: int = 8, scale: int = 3) -> None:
    """A PNG grid: each image upscaled, a green (correct) or red (failed) border, and a caption under it."""
    from PIL import Image, ImageDraw
    n = len(images)
    if n == 0:
        return
    h, w = images[0].shape[:2]
    cw, ch = w * scale + 8, h * scale + 8 + 36
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cw, rows * ch), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        x0, y0 = (i % cols) * cw, (i // cols) * ch
        color = (60, 60, 60) if correct is None else ((40, 200, 60) if correct[i] else (220, 50, 50))
        draw.rectangle([x0 + 1, y0 + 1, x0 + cw - 2, y0 + h * scale + 6], outline=color, width=3)
        canvas.paste(Image.fromarray(np.asarray(img)).resize((w * scale, h * scale), Image.NEAREST), (x0 + 4, y0 + 4))
        words, line, lines = captions[i].split(), "", []
        for wd in words:
            if len(line) + len(wd) + 1 > cw // 6:
                lines.append(line)
                line = wd
            else:
                line = (line + " " + wd).strip()
        lines.append(line)
        for k, ln in enumerate(lines[:3]):
            draw.text((x0 + 3, y0 + h * scale + 8 + 11 * k), ln, fill=(230, 230, 230))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def grid_from_eval(path, result: dict, records: Sequence[dict], world, n: int = 32) -> None:
    """Grid of the first ``n`` evaluation samples; failed ones captioned with their first failed question."""
    s = result["samples"]
    caps = []
    for i in range(min(n, len(records))):
        cap = records[i]["prompt"]
        if not s["correct"][i] and world.failed is not None:
            f = world.failed(s["images"][i], records[i])
            if f:
                cap += " | NO: " + f[0]["question"]
        caps.append(cap)
    save_grid(path, s["images"][:n], caps, s["correct"][:n])


@torch.no_grad()
def x0_grid(path, policy, world, records: Sequence[dict], sigmas=(1.0, 0.9, 0.75, 0.5, 0.25), seed: int = 0) -> None:
    """Diagnostic PNG: per prompt, a target scene with its plan, then the model's clean-image prediction
    ``x0 = x_t - sigma * v`` from that target noised to each ``sigma`` (conditional branch, the target's plan as
    think text). At ``sigma = 1`` this shows what the model draws from the text alone: objects in their planned
    cells when it binds the plan to image regions, a haze over many cells when it does not. Needs a policy with
    ``encode_think`` (TinyUMM) to encode the plan."""
    if not hasattr(policy, "encode_think"):
        raise ValueError(f"x0_grid needs a policy with encode_think(texts) (TinyUMM); {type(policy).__name__} has none")
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    tiles, caps = [], []
    for r in records:
        plan, img = world.sample_target(r, rng)
        th = policy.encode_think([plan])
        cond = policy.image_condition([GenRequest(r["prompt"])], th, CFGConfig(text_scale=1.0))
        x0 = policy.encode(img[None])
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        tiles.append(img)
        caps.append(plan)
        for s in sigmas:
            xt = (1 - s) * x0 + s * noise
            tiles.append(policy.decode(xt - s * policy.velocity(xt, s, cond))[0])
            caps.append(f"x0 at sigma {s:g}")
    save_grid(path, tiles, caps, cols=len(sigmas) + 1, scale=4)


def summary(result: dict) -> dict:
    """The JSON-able part of an ``evaluate`` result."""
    return {k: v for k, v in result.items() if k != "samples"}


def add_arguments(p):
    p.add_argument("--checkpoint", default=None, help="TinyUMM checkpoint folder (default: the shipped one)")
    p.add_argument("--recipe", default="tiny_shapes")
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def fmt3(v) -> str:
    """A score with three decimals, or "-" for None."""
    return "-" if v is None else f"{v:.3f}"


def run(args) -> int:
    from alphagrpo.train.common import eval_context, print_table
    cfg, world, policy, reward, recs = eval_context(args.recipe, args.set, args.n, args.checkpoint)
    if args.oracle_plans and world.sample_target is None:
        raise ValueError("--oracle-plans needs a world that can sample a right plan (World.sample_target); this "
                         "one cannot")
    temperature = cfg.think_temperature if args.temperature is None else args.temperature
    ev = dict(num_steps=args.steps or cfg.sampler.eval_steps, shift=cfg.sampler.shift, cfg=cfg.cfg, reward=reward,
              seed=args.seed, batch=cfg.eval_batch, max_think_tokens=cfg.max_think_tokens)
    res = evaluate(policy, world, recs, progress=True, think_temperature=temperature, **ev)
    report = summary(res)
    if args.oracle_plans:
        rng = np.random.default_rng(args.seed)
        plans = [world.sample_target(r, rng)[0] for r in recs]
        report["oracle_plans"] = {k: v for k, v in summary(evaluate(policy, world, recs, think_texts=plans, **ev)).items()
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
