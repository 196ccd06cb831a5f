"""Inference-time self-reflective refinement (RECIPE.md section 7).

Generate; verify; while some question fails (a score <= 0.5) or the reward is under a threshold, show the model
its current best image with the reflection instruction, let it write a diagnosis + edit instruction (think text),
draw a refined image, and keep whichever image scores best. Stops after ``rounds`` rounds or when every sample is
satisfied. Accuracy is reported per round (after round r, on the best image so far).

``mode="resample"`` is the control that separates reflection from selection: the same loop and the same budget,
but each round draws a fresh text-to-image sample (no input image, no reflection) and keeps the best, i.e.
best-of-(1 + rounds) under the same verifier. ``alphagrpo refine --compare`` runs both on the same prompts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from alphagrpo.eval.evaluate import EvalSettings, generate, think_split
from alphagrpo.models.policy import GenRequest
from alphagrpo.train.metrics import thought
from alphagrpo.train.srr import check_srr_policy, reflection_instruction

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


def refine(policy, reward, records: Sequence[dict], s: Optional[EvalSettings] = None, *, rounds: int = 2,
           threshold: Optional[float] = None, judge=None, mode: str = "reflect") -> RefineResult:
    """Refine up to ``rounds`` times with the sampler settings ``s`` (refinement rounds use ``s.cfg_refine``);
    ``judge(image, record) -> bool`` adds per-round accuracy when given. ``mode``: ``"reflect"`` (self-reflective
    refinement) or ``"resample"`` (best-of-n control, see module doc)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "reflect" and rounds > 0:
        check_srr_policy(policy)
    s = s or EvalSettings()
    g = torch.Generator().manual_seed(s.seed)
    n = len(records)
    images, texts = generate(policy, [GenRequest(r["prompt"]) for r in records], s, generator=g)
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
        imgs, th = generate(policy, reqs, s, generator=g)
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


