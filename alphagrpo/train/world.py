"""A world: where prompts, the reward's verifier and the ground-truth judge come from.

The trainer sees only records (dicts in the authors' schema) and a ``Verifier``; evaluation also needs a strict
ground-truth judge (GenEval-style). ``load_world`` builds them from ``DataConfig``; the shapes world is the
embedded default. A JSONL ``train_file`` replaces the synthesized training prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from alphagrpo.train.config import DataConfig


@dataclass
class World:
    train: list
    test: list
    verifier: Any                                   # implements verifier_engine.Verifier
    judge: Callable[[Any, dict], bool]              # (image, record) -> all questions satisfied
    words: list                                     # vocabulary for word-level tokenizers
    sample_target: Optional[Callable] = None        # (record, rng) -> (plan text, uint8 image), for pretraining
    failed: Optional[Callable] = None               # (image, record) -> failed question dicts
    sample_edit: Optional[Callable] = None          # (record, rng) -> (wrong image, think text, right image)


def load_world(cfg: DataConfig) -> World:
    if cfg.world != "shapes":
        raise ValueError(f"unknown world {cfg.world!r}; the built-in world is 'shapes'")
    from alphagrpo.worlds import shapes as S
    train, test = S.synthesize(n_per_task=cfg.train_per_task, n_test=cfg.test_size, seed=cfg.seed)
    if cfg.train_file:
        train = S.read_jsonl(cfg.train_file)
    verifier = S.ShapesVerifier()

    def judge(image, record) -> bool:
        qs = [q["question"] for q in record["semantic_questions"]]
        return bool(verifier.judge(image, qs))

    def sample_target(record, rng):
        scene = S.sample_scene(record, rng)
        return S.plan_text(scene), S.render(scene)

    def failed(image, record):
        return S.failed_questions(image, record)

    return World(train=train, test=test, verifier=verifier, judge=judge, words=list(S.vocabulary()),
                 sample_target=sample_target, failed=failed)
