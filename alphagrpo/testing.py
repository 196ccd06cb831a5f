"""Test utilities: a micro TinyUMM and a fake "brightness" world whose verifier answers from pixel statistics.

Small enough for CI on 2 cores, real enough that learning is measurable: the reward is the image's brightness, so a
trainer that works raises it within a few steps. Public so that downstream adapters can reuse them in their tests.
"""
from __future__ import annotations

import numpy as np

from alphagrpo.worlds.base import World

WORDS = ["make", "a", "bright", "dark", "image", "light", "please", "is", "the", "?", "plan", ":", "white", "black"]


class BrightnessVerifier:
    """``Verifier`` answering "is the image bright ?" with the mean brightness in [0, 1] and "is the image dark ?"
    with one minus it. Any other question is an error (as an unparseable question should be)."""

    def score(self, images, question_lists):
        out = []
        for img, qs in zip(images, question_lists):
            b = float(np.asarray(img, dtype=np.float32).mean() / 255.0)
            row = []
            for q in qs:
                if q == "is the image bright ?":
                    row.append(b)
                elif q == "is the image dark ?":
                    row.append(1.0 - b)
                else:
                    raise ValueError(f"BrightnessVerifier cannot parse question {q!r}")
            out.append(row)
        return out


def brightness_world(n_train: int = 8, n_test: int = 8) -> World:
    """Prompts asking for bright images; semantic question "is the image bright ?", quality "is the image dark ?"
    weighted so that the geometric-mean reward still prefers bright images."""
    def rec(i):
        return {"prompt": "make a bright image please" if i % 2 else "make a light image",
                "semantic_questions": [{"question": "is the image bright ?", "tag": "Attribute"}],
                "quality_questions": [{"question": "is the image bright ?", "tag": "Aesthetics"}],
                "task": "brightness", "difficulty": "easy"}
    v = BrightnessVerifier()
    return World(train=[rec(i) for i in range(n_train)], test=[rec(i) for i in range(n_test)], verifier=v,
                 judge=lambda img, r: float(np.asarray(img).mean()) / 255.0 > 0.55, words=list(WORDS),
                 sample_target=lambda r, rng: ("plan : white", np.full((16, 16, 3), 230, np.uint8)), name="brightness")


def brightness_world_loader(data_cfg) -> World:
    """``data.world=alphagrpo.testing:brightness_world_loader``: the brightness world by name, for command-line
    tests (``data.train_per_task`` training prompts). With ``ALPHAGRPO_TEST_FAIL_RANK=R`` its verifier raises on
    rank R from the second scoring call on (to test how a run ends when one rank fails)."""
    import os
    world = brightness_world(n_train=max(2, data_cfg.train_per_task))
    fail = os.environ.get("ALPHAGRPO_TEST_FAIL_RANK")
    if fail is not None and os.environ.get("RANK", "0") == fail:
        world.verifier = _FailingVerifier(world.verifier)
    return world


class _FailingVerifier:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def score(self, images, question_lists):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("synthetic verifier failure on this rank")
        return self.inner.score(images, question_lists)


def micro_policy(seed: int = 0, image_size: int = 16):
    """A micro TinyUMM (dim 32, 1 layer, 16x16 images) over ``WORDS`` with seeded random weights."""
    import torch

    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    from alphagrpo.train.srr import reflection_words
    torch.manual_seed(seed)
    return TinyUMMPolicy.create(WORDS + reflection_words(), dim=32, n_layers=1, n_heads=2, image_size=image_size, max_positions=160)


def dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of the 2-process gloo test: a trainer step on the brightness world, saving its rewards and
    advantages to ``out_dir/rank{r}.pt``."""
    import torch
    import torch.distributed as dist

    from alphagrpo.rewards import DVReward
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.train.trainer import GRPOTrainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = apply_overrides(get_recipe("tiny_shapes"), [
            "prompts_per_step=2", "group_size=4", "micro_batch=8", "max_think_tokens=3", "cfg.text_scale=1.0",
            "sampler.num_steps=3", "sampler.window=1", "sampler.window_starts=0,1,2"])
        world = brightness_world()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)   # per-rank generator, as train() does
        tr = GRPOTrainer(micro_policy(0), DVReward(world.verifier), cfg, generator=gen)
        res = tr.step(world.train[2 * rank:2 * rank + 2])
        torch.save({"raw": res.rewards, "adv": res.advantages}, f"{out_dir}/rank{rank}.pt")
        tr.close()
    finally:
        dist.destroy_process_group()
