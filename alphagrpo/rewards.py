"""DVReward (RECIPE.md section 4): decomposed yes/no questions, scored by a ``Verifier``, combined into one reward.

``dvreward`` is the pure combination; ``DVReward`` runs the verifier and keeps the per-question scores (for logs
and for inference-time refinement). Holistic and semantic-only rewards are modes of the same object, for the
ablations of the paper's Table 5.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from verifier_engine.protocol import Verifier

__all__ = ["dvreward", "DVReward", "RewardResult", "REWARD_MODES"]

REWARD_MODES = ("geometric", "arithmetic", "semantic")


def _mean_scores(name: str, scores, binary: bool) -> torch.Tensor:
    """Scores as ``[..., Q]`` (a tensor) or a ragged list of lists -> per-item mean over questions ``[...]``."""
    if isinstance(scores, torch.Tensor) or len(scores) == 0 or not isinstance(scores[0], (list, tuple)):
        t = torch.as_tensor(scores, dtype=torch.float32)
        if t.ndim == 0 or t.shape[-1] == 0:
            raise ValueError(f"{name} has no questions; DVReward needs at least one (use mode='semantic' to drop "
                             "the quality term)")
        if binary:
            t = (t > 0.5).float()
        return t.mean(dim=-1)
    means = []
    for i, row in enumerate(scores):
        if len(row) == 0:
            raise ValueError(f"{name}[{i}] has no questions; DVReward needs at least one (use mode='semantic' to "
                             "drop the quality term)")
        means.append(_mean_scores(name, list(row), binary))
    return torch.stack(means) if means else torch.zeros(0)


def dvreward(semantic_scores, quality_scores=None, *, mode: str = "geometric", binary: bool = False) -> torch.Tensor:
    """Combine per-question scores into DVReward (RECIPE.md section 4). Returns float32 ``[...]``.

    ``semantic_scores`` / ``quality_scores``: ``[Q]`` for one image, ``[B, Q]`` for a batch with equal question
    counts, or ragged lists of lists ``B x Q_i``; each value ``P(yes)/(P(yes)+P(no))``.
    ``mode``: ``"geometric"`` (the recipe: ``sqrt(S * Q)`` of the two means), ``"arithmetic"`` (``(S + Q) / 2``) or
    ``"semantic"`` (``S`` alone; ``quality_scores`` ignored). ``binary``: threshold each score at 0.5 first (the
    paper's Table 4 ablation).
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
    s = _mean_scores("semantic_scores", semantic_scores, binary)
    if mode == "semantic":
        return s
    if quality_scores is None:
        raise ValueError(f"mode={mode!r} needs quality_scores; pass them or use mode='semantic'")
    q = _mean_scores("quality_scores", quality_scores, binary)
    if s.shape != q.shape:
        raise ValueError(f"semantic and quality scores describe different batches: {tuple(s.shape)} vs {tuple(q.shape)}")
    if mode == "geometric":
        return torch.sqrt(s.clamp_min(0) * q.clamp_min(0))
    return 0.5 * (s + q)


def _questions(record: Mapping[str, Any], key: str) -> list[str]:
    out = []
    for q in record.get(key) or []:
        out.append(q["question"] if isinstance(q, Mapping) else str(q))
    return out


@dataclass
class RewardResult:
    """Rewards ``[B]`` plus the per-question scores behind them (``semantic[i][j]``, ``quality[i][j]``)."""
    rewards: torch.Tensor
    semantic: list[list[float]]
    quality: list[list[float]]
    questions: list[list[str]] = field(default_factory=list)


@dataclass
class DVReward:
    """Questions + verifier -> per-question scores -> reward.

    ``mode``/``binary`` as in ``dvreward``. ``holistic=True`` replaces the decomposition by the single question
    ``"Does this image match: {prompt}?"`` (the paper's holistic-scorer ablation).
    """
    verifier: Verifier
    mode: str = "geometric"
    binary: bool = False
    holistic: bool = False

    def __post_init__(self):
        if self.mode not in REWARD_MODES:
            raise ValueError(f"mode must be one of {REWARD_MODES}, got {self.mode!r}")
        if not hasattr(self.verifier, "score"):
            raise TypeError(f"verifier must implement the Verifier protocol (a score method); got {self.verifier!r}")

    def question_lists(self, records: Sequence[Mapping[str, Any]]):
        """Per record: (semantic questions, quality questions) as the verifier will see them."""
        out = []
        for r in records:
            if self.holistic:
                out.append(([f"Does this image match: {r['prompt']}?"], []))
            else:
                sem = _questions(r, "semantic_questions")
                qua = [] if self.mode == "semantic" else _questions(r, "quality_questions")
                out.append((sem, qua))
        return out

    def __call__(self, images: Sequence[Any], records: Sequence[Mapping[str, Any]]) -> RewardResult:
        """Score ``B`` images against their prompt records (``B`` of them, one per image)."""
        if len(images) != len(records):
            raise ValueError(f"got {len(images)} images but {len(records)} prompt records")
        qls = self.question_lists(records)
        flat = [sem + qua for sem, qua in qls]
        scores = self.verifier.score(list(images), flat) if images else []
        sem_s = [list(map(float, s[: len(q[0])])) for s, q in zip(scores, qls)]
        qua_s = [list(map(float, s[len(q[0]):])) for s, q in zip(scores, qls)]
        if self.holistic:
            rewards = dvreward(sem_s, mode="semantic", binary=self.binary)
        elif not images:
            rewards = torch.zeros(0)
        else:
            rewards = dvreward(sem_s, qua_s, mode=self.mode, binary=self.binary)
        return RewardResult(rewards=rewards, semantic=sem_s, quality=qua_s, questions=flat)
