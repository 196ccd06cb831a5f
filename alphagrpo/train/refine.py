"""Inference-time self-reflective refinement (RECIPE.md section 7) and ``alphagrpo refine``.

Generate; verify; while some question fails (a score <= 0.5) or the reward is under a threshold, show the model
its current best image with the reflection instruction, let it write a diagnosis + edit instruction (think text),
draw a refined image, and keep whichever image scores best. Stops after ``rounds`` rounds or when every sample is
satisfied. Accuracy is reported per round (after round r, on the best image so far).

``mode="resample"`` is the control that separates reflection from selection: the same loop and the same budget,
but each round draws a fresh text-to-image sample (no input image, no reflection) and keeps the best, i.e.
best-of-(1 + rounds) under the same verifier. ``alphagrpo refine --compare`` runs both on the same prompts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from alphagrpo.models.policy import CFGConfig, GenRequest
from alphagrpo.train.evaluate import generate, think_split, thought
from alphagrpo.train.trainer import reflection_instruction

log = logging.getLogger(__name__)

MODES = ("reflect", "resample")


@dataclass
class RefineResult:
    images: np.ndarray                    # best image per prompt, uint8 [n, H, W, 3]
    rewards: torch.Tensor                 # best reward per prompt [n]
    rounds_used: list                     # refinement rounds each prompt went through
    history: list = field(default_factory=list)   # per round: {"round", "reward", "accuracy"?, "refined"}
    trace: list = field(default_factory=list)     # per prompt: [(think text, image, reward, scores), ...]


def _needs_refinement(res, i: int, threshold: Optional[float]) -> bool:
    scores = res.semantic[i] + res.quality[i]
    if any(s <= 0.5 for s in scores):
        return True
    return threshold is not None and float(res.rewards[i]) < threshold


def refine(policy, reward, records: Sequence[dict], *, rounds: int = 2, threshold: Optional[float] = None,
           num_steps: int = 40, shift: float = 3.0, cfg: Optional[CFGConfig] = None, seed: int = 0,
           batch: int = 64, max_think_tokens: int = 48, judge=None, mode: str = "reflect") -> RefineResult:
    """Refine up to ``rounds`` times; ``judge(image, record) -> bool`` adds per-round accuracy when given.
    ``mode``: ``"reflect"`` (self-reflective refinement) or ``"resample"`` (best-of-n control, see module doc)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = cfg or CFGConfig()
    g = torch.Generator().manual_seed(seed)
    n = len(records)
    kw = dict(num_steps=num_steps, shift=shift, cfg=cfg, generator=g, batch=batch, max_think_tokens=max_think_tokens)
    images, texts = generate(policy, [GenRequest(r["prompt"]) for r in records], **kw)
    res = reward(list(images), list(records))
    best_img, best_r = images.copy(), res.rewards.clone()
    trace = [[(texts[i], images[i], float(res.rewards[i]), res.semantic[i] + res.quality[i])] for i in range(n)]
    pending = [i for i in range(n) if _needs_refinement(res, i, threshold)]
    used = [0] * n
    hist = [_round_stats(0, best_img, best_r, records, judge, len(pending), texts, (images, records))]
    for rnd in range(1, rounds + 1):
        if not pending:
            break
        if mode == "reflect":
            reqs = [GenRequest(records[i]["prompt"], image=best_img[i],
                               instruction=reflection_instruction(records[i]["prompt"])) for i in pending]
        else:
            reqs = [GenRequest(records[i]["prompt"]) for i in pending]
        imgs, th = generate(policy, reqs, **kw)
        sub = [records[i] for i in pending]
        r2 = reward(list(imgs), sub)
        still = []
        for j, i in enumerate(pending):
            used[i] = rnd
            trace[i].append((th[j], imgs[j], float(r2.rewards[j]), r2.semantic[j] + r2.quality[j]))
            if float(r2.rewards[j]) > float(best_r[i]):
                best_r[i], best_img[i] = r2.rewards[j], imgs[j]
            if _needs_refinement(r2, j, threshold):
                still.append(i)
        hist.append(_round_stats(rnd, best_img, best_r, records, judge, len(pending), th, (imgs, sub)))
        pending = still
    return RefineResult(images=best_img, rewards=best_r, rounds_used=used, history=hist, trace=trace)


def _round_stats(rnd, images, rewards, records, judge, refined, texts, drawn):
    """``thought``: the fraction of this round's samples whose think text is not empty (round 0: the model reasoned
    before drawing; later rounds in reflect mode: it wrote a diagnosis before redrawing). With a judge,
    ``accuracy`` is that of the best image so far per prompt, and ``drawn_accuracy_given_thought`` that of the
    images ``drawn`` in this round (``(images, records)``), split by whether their think text was written
    (``{"thought": .., "direct": ..}``, None for an empty side): does the diagnosis help the redraw?"""
    out = {"round": rnd, "reward": float(rewards.mean()) if len(rewards) else 0.0, "refined": refined,
           "thought": float(np.mean(thought(texts))) if len(texts) else None}
    if judge is not None:
        out["accuracy"] = float(np.mean([judge(im, r) for im, r in zip(images, records)]))
        if len(texts):
            ok = [bool(judge(im, r)) for im, r in zip(*drawn)]
            out["drawn_accuracy_given_thought"] = think_split(texts, ok)["accuracy_given_think"]
    return out


def refinement_figure(path, res: RefineResult, records: Sequence[dict], n: int = 4, scale: int = 4) -> list:
    """PNG explaining refinement on ``n`` prompts (those whose reward improved most first): the prompt, the
    initial image, the think text the model wrote when shown it, the refined image, and every question's score
    before -> after (red: failed, <= 0.5). Returns the indices shown."""
    from PIL import Image, ImageDraw
    gains = [(res.trace[i][-1][2] - res.trace[i][0][2], i) for i in range(len(records)) if len(res.trace[i]) > 1]
    shown = [i for _, i in sorted(gains, reverse=True)[:n]]
    if not shown:
        return []
    h, w = res.trace[shown[0]][0][1].shape[:2]
    iw, ih = w * scale, h * scale
    qh = 11
    blocks = []
    for i in shown:
        r = records[i]
        qs = [q["question"] for q in r["semantic_questions"]] + [q["question"] for q in r.get("quality_questions", [])]
        blocks.append((i, qs, max(ih + 40, 34 + qh * (len(qs) + 5))))
    W = 3 * iw + 560
    canvas = Image.new("RGB", (W, sum(b[2] for b in blocks) + 8), (30, 30, 30))
    d = ImageDraw.Draw(canvas)
    y = 4
    for i, qs, bh in blocks:
        first, last = res.trace[i][0], res.trace[i][-1]
        d.text((6, y), f"prompt: {records[i]['prompt']}"[:150], fill=(255, 255, 255))
        canvas.paste(Image.fromarray(first[1]).resize((iw, ih), Image.NEAREST), (6, y + 16))
        canvas.paste(Image.fromarray(last[1]).resize((iw, ih), Image.NEAREST), (iw + 40, y + 16))
        d.text((6, y + 20 + ih), f"initial  r={first[2]:.2f}", fill=(200, 200, 200))
        d.text((iw + 40, y + 20 + ih), f"refined (round {len(res.trace[i]) - 1})  r={last[2]:.2f}", fill=(200, 200, 200))
        d.text((iw + 12, y + 16 + ih // 2), "->", fill=(255, 255, 255))
        x = 2 * iw + 60
        think = " ".join(last[0].split())
        lines = [think[k:k + 95] for k in range(0, len(think), 95)][:4]
        d.text((x, y + 16), "think (written when shown the initial image):", fill=(150, 200, 255))
        for k, ln in enumerate(lines):
            d.text((x, y + 16 + qh * (k + 1)), ln, fill=(150, 200, 255))
        top = y + 16 + qh * (len(lines) + 2)
        for k, q in enumerate(qs):
            a, b = first[3][k], last[3][k]
            d.text((x, top + qh * k), f"{a:.2f}", fill=(230, 80, 80) if a <= 0.5 else (90, 220, 90))
            d.text((x + 34, top + qh * k), "->", fill=(200, 200, 200))
            d.text((x + 52, top + qh * k), f"{b:.2f}", fill=(230, 80, 80) if b <= 0.5 else (90, 220, 90))
            d.text((x + 90, top + qh * k), q[:80], fill=(220, 220, 220))
        y += bh
        d.line([(0, y - 3), (W, y - 3)], fill=(70, 70, 70))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return shown


def add_arguments(p):
    p.add_argument("--checkpoint", default=None, help="TinyUMM checkpoint (default: the shipped one)")
    p.add_argument("--recipe", default="tiny_shapes")
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    import statistics

    from alphagrpo.train.common import eval_context, print_table
    seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    if not seeds:
        raise ValueError("--seeds needs at least one integer, e.g. --seeds 0,1,2")
    cfg, world, policy, reward, recs = eval_context(args.recipe, args.set, args.n, args.checkpoint)
    modes = MODES if args.compare else (args.mode,)
    hist = {m: {} for m in modes}
    for seed in seeds:
        for mode in modes:
            res = refine(policy, reward, recs, rounds=args.rounds, threshold=args.threshold,
                         num_steps=cfg.sampler.eval_steps, shift=cfg.sampler.shift, cfg=cfg.cfg, seed=seed,
                         batch=cfg.eval_batch, max_think_tokens=cfg.max_think_tokens, judge=world.judge, mode=mode)
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
