"""A world: where training and test prompts come from, and, when it has them, a verifier of its own and a strict
ground-truth judge.

The trainer sees only records (dicts in the authors' schema, RECIPE.md section 9) and a ``Verifier`` (chosen by
``reward.verifier``: the world's own, or any verifier address); evaluation with accuracy also needs a judge
(GenEval-style). A world without a judge (``jsonl``) is scored by rewards only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class World:
    train: list
    test: list
    verifier: Any = None                            # the world's own Verifier (None: use a verifier address)
    judge: Optional[Callable[[Any, dict], bool]] = None   # (image, record) -> all semantic questions satisfied
    words: Optional[list] = None                    # vocabulary for word-level tokenizers (None: free text)
    sample_target: Optional[Callable] = None        # (record, rng) -> (plan text, uint8 image), for pretraining
    failed: Optional[Callable] = None               # (image, record) -> failed question dicts
    sample_edit: Optional[Callable] = None          # (record, rng) -> (wrong image, think text, right image)
    plan_ok: Optional[Callable] = None              # (think text, record) -> the plan it states satisfies the prompt
    name: str = "custom"
