"""Pictures of results: sample grids with failed questions marked, the model's clean-image predictions across
noise levels, refinement before/after with per-question scores, and the reward curve of a run."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from alphagrpo.models.policy import CFGConfig, GenRequest

if TYPE_CHECKING:
    from alphagrpo.eval.refine import RefineResult


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


def reward_curve(path: Path, history: list, title: str) -> None:
    """PNG of the per-step rollout reward (mean and +-std band)."""
    from alphagrpo._deps import require
    require("matplotlib", "train").use("Agg")
    plt = require("matplotlib.pyplot", "train")
    steps = list(range(1, len(history) + 1))
    mean = [h["reward_mean"] for h in history]
    std = [h["reward_std"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, mean, marker="o", ms=3, label="rollout reward (mean)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("DVReward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
