"""Evaluation: held-out prompts -> images (ODE sampler, think text when the policy writes one) -> ground-truth
accuracy per task type (the world's strict judge, as GenEval uses a detector; a world without a judge reports
rewards only) and mean DVReward. The sampler settings travel as one ``EvalSettings``.

When the world can read a plan out of a think text (``World.plan_ok``; the shapes world can), the accuracy is split
into its two causes: ``plan_accuracy`` (the think text states a layout that satisfies the prompt) and the accuracy of
the drawings given a right or a wrong plan. ``--oracle-plans`` also draws every prompt from a right plan of the
world's own (the drawing's ceiling, with no reasoning errors).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from alphagrpo.models.policy import CFGConfig, GenRequest, has_think, policy_sigmas
from alphagrpo.sampler import sample_flow
from alphagrpo.train.metrics import thought

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """How evaluation samples: ODE steps on the run's grid, the text-to-image and refinement guidance, batch size,
    think text (on when the policy writes it) and its temperature, and the sampling seed."""
    num_steps: int = 40
    shift: float = 3.0
    grid: str = "flow"
    cfg: CFGConfig = field(default_factory=CFGConfig)
    cfg_refine: CFGConfig = field(default_factory=CFGConfig)
    batch: int = 64
    max_think_tokens: int = 48
    temperature: float = 1.0
    think: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, c, **changes) -> "EvalSettings":
        """The evaluation settings of a ``TrainConfig`` (its ``eval_steps``, grid, guidance, batch, think length and
        temperature), with ``changes`` applied (e.g. ``seed=``)."""
        s = cls(num_steps=c.sampler.eval_steps, shift=c.sampler.shift, grid=c.sampler.grid, cfg=c.cfg,
                cfg_refine=c.cfg_refine, batch=c.eval_batch, max_think_tokens=c.max_think_tokens,
                temperature=c.think_temperature)
        return dataclasses.replace(s, **changes)


@torch.no_grad()
def generate(policy, requests: Sequence[GenRequest], s: EvalSettings, *, generator: torch.Generator,
             progress: bool = False, think_texts: Optional[Sequence[str]] = None):
    """Images (uint8 ``[n, H, W, 3]``) and think texts for ``requests`` with the deterministic ODE sampler.
    Requests with an input image (refinement) use ``s.cfg_refine``, the others ``s.cfg``. ``think_texts`` replaces
    sampling: every image is drawn from the given text (needs a policy with ``encode_think``)."""
    if think_texts is not None:
        if not hasattr(policy, "encode_think"):
            raise ValueError(f"drawing from given think texts needs a policy with encode_think(texts); "
                             f"{type(policy).__name__} has none")
        if len(think_texts) != len(requests):
            raise ValueError(f"{len(think_texts)} think texts for {len(requests)} requests")
    images, texts = [], []
    think = s.think and has_think(policy)
    sig = policy_sigmas(policy, s.num_steps, s.shift, s.grid)
    it = range(0, len(requests), s.batch)
    if progress:
        from alphagrpo._deps import require
        it = require("tqdm", "train").tqdm(it, desc="generate", unit="batch", leave=False)
    for a in it:
        part = list(requests[a:a + s.batch])
        if think_texts is not None:
            given = list(think_texts[a:a + s.batch])
            tokens = policy.encode_think(given)
        elif think:
            th = policy.sample_think(part, generator=generator, max_new_tokens=s.max_think_tokens,
                                     temperature=s.temperature)
            tokens, given = th.tokens, th.texts
        else:
            tokens, given = None, [""] * len(part)
        cfg = s.cfg_refine if any(r.image is not None for r in part) else s.cfg
        cond = policy.image_condition(part, tokens, cfg)
        x, _ = sample_flow(policy, cond, len(part), sigmas=sig, noise_level=0.0, generator=generator,
                           device=getattr(policy, "device", None))
        images.append(policy.decode(x))
        texts += given
    return np.concatenate(images) if images else np.zeros((0,)), texts


def _mean_of_means(rows) -> float:
    """Mean over images of the mean question score (0.0 when there are no questions)."""
    rows = [r for r in rows if len(r)]
    return float(np.mean([np.mean(r) for r in rows])) if rows else 0.0


def evaluate(policy, world, records: Sequence[dict], s: EvalSettings, *, reward, progress: bool = False,
             think_texts: Optional[Sequence[str]] = None) -> dict:
    """Accuracy (fraction of prompts whose image satisfies every semantic question, per the world's strict judge;
    None for a world without a judge), per task and overall; mean reward, and its two parts (``semantic`` and ``quality``: mean question scores), which
    show when a reward rises for the wrong reason. Returns a dict with ``accuracy``, ``reward``, ``semantic``,
    ``quality``, ``per_task`` and ``samples``
    (images, think texts, correctness and failed questions for the grid). With a world that reads plans
    (``world.plan_ok``) also ``plan_accuracy``, ``accuracy_given_plan`` (``{"right": .., "wrong": ..}``, None for an
    empty side) and ``per_task_plan``. ``think_texts``: draw from these texts instead of sampling think."""
    g = torch.Generator().manual_seed(s.seed)
    reqs = [GenRequest(r["prompt"]) for r in records]
    images, texts = generate(policy, reqs, s, generator=g, progress=progress, think_texts=think_texts)
    judged = getattr(world, "judge", None) is not None
    correct = [bool(world.judge(img, r)) for img, r in zip(images, records)] if judged else [False] * len(records)
    res = reward(list(images), list(records)) if len(records) else None
    rewards = res.rewards if res is not None else torch.zeros(0)
    per = defaultdict(list)
    for ok, r in zip(correct, records):
        per[r.get("task", "all")].append(ok)
    out = {
        "accuracy": (float(np.mean(correct)) if correct else 0.0) if judged else None,
        "reward": float(rewards.mean()) if len(records) else 0.0,
        "semantic": _mean_of_means(res.semantic) if res is not None else 0.0,
        "quality": _mean_of_means(res.quality) if res is not None else 0.0,
        "n": len(records),
        "per_task": {k: float(np.mean(v)) for k, v in sorted(per.items())} if judged else {},
    }
    if think_texts is None and records and has_think(policy) and s.think:   # sampled think texts: how often the model reasoned
        out.update(think_split(texts, correct))
    if getattr(world, "plan_ok", None) is not None and records and judged:   # an empty think text states no plan: wrong
        out.update(plan_split(world, texts, records, correct))
    out["samples"] = {"images": images, "think": texts, "correct": correct, "rewards": rewards.tolist()}
    return out


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


def summary(result: dict) -> dict:
    """The JSON-able part of an ``evaluate`` result."""
    return {k: v for k, v in result.items() if k != "samples"}


def fmt3(v) -> str:
    """A score with three decimals, or "-" for None."""
    return "-" if v is None else f"{v:.3f}"
