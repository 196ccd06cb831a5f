"""``alphagrpo train --recipe NAME``: the GRPO loop with checkpoints, exact resume and logs.

Resume is exact: the checkpoint holds the policy, the optimizer, the trainer's generator state, the step and the
data position, so N steps straight equal N/2 + resume + N/2 bit for bit on CPU.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from alphagrpo.rewards import DVReward
from alphagrpo.train.common import (MetricsLogger, atomic_dir, format_step, load_checkpoint, load_policy,
                                    save_checkpoint, setup_logging)
from alphagrpo.train.config import TrainConfig, apply_overrides, get_recipe
from alphagrpo.train.trainer import GRPOTrainer, dist_info

log = logging.getLogger(__name__)


class PromptStream:
    """Epoch-wise seeded permutations of the training prompts, sharded by rank. State = (epoch, cursor)."""

    def __init__(self, records, seed: int, rank: int = 0, world: int = 1):
        if not records:
            raise ValueError("no training prompts: the data config produced an empty training set")
        self.records, self.seed, self.rank, self.world = records, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._perm = self._make()

    def _make(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.records), generator=g)[self.rank::self.world].tolist()

    def next(self, n: int) -> list:
        out = []
        while len(out) < n:
            if self.cursor >= len(self._perm):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._make()
            out.append(self.records[self._perm[self.cursor]])
            self.cursor += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._make()


def enable_lora(policy, cfg: TrainConfig) -> None:
    """Switch ``policy`` to LoRA fine-tuning as ``cfg.lora`` says (adapters seeded by ``cfg.seed``)."""
    if not hasattr(policy, "enable_lora"):
        raise ValueError(f"lora.rank={cfg.lora.rank} needs a policy with enable_lora(); {type(policy).__name__} has "
                         "none (set lora.rank=0 for full fine-tuning)")
    if getattr(policy, "lora", None):
        raise ValueError("the starting policy already carries LoRA adapters; merge them (policy.merge_lora()) or "
                         "resume the run that made them")
    kw = {"targets": tuple(cfg.lora.targets)} if cfg.lora.targets else {}
    policy.enable_lora(cfg.lora.rank, cfg.lora.alpha, seed=cfg.seed, **kw)


def train(cfg: TrainConfig, world, run_dir: Path, *, policy=None, resume: bool = False,
          on_step: Optional[Callable[[int, dict], None]] = None):
    """Run ``cfg.steps`` GRPO steps (continuing from the run's latest checkpoint when ``resume``). Returns
    ``(per-step metrics, trained policy)``. Writes ``config.json``, ``metrics.jsonl``, TensorBoard logs and checkpoints to ``run_dir``."""
    run_dir = Path(run_dir)
    rank, nworld = dist_info()
    state = None
    if resume:
        state = load_checkpoint(run_dir, cfg.recipe)
        policy = load_policy(str(state["policy_path"]), cfg.device, world)
    elif policy is None:
        policy = load_policy(cfg.init, cfg.device, world)
    if state is None and cfg.lora.rank > 0:     # a resumed run's policy comes back with its adapters
        enable_lora(policy, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    reward = DVReward(world.verifier, mode=cfg.reward.mode, binary=cfg.reward.binary, holistic=cfg.reward.holistic)
    anchored = cfg.loss.beta_text > 0 or cfg.loss.beta_image > 0
    ref = None
    if anchored and state is not None:      # the KL anchor is where the run started, saved when it started
        ref_dir = run_dir / "reference"
        if not ref_dir.is_dir():
            raise FileNotFoundError(f"{ref_dir} is missing: a run with loss.beta_text/beta_image > 0 saves its KL "
                                    "reference there when it starts; resume a run that has one, or start afresh")
        ref = load_policy(str(ref_dir), cfg.device, world)
    trainer = GRPOTrainer(policy, reward, cfg, generator=gen, ref_policy=ref)
    if anchored and state is None and rank == 0:
        atomic_dir(run_dir / "reference", lambda tmp: trainer.ref_policy.save_pretrained(tmp))
    stream = PromptStream(world.train, cfg.seed, rank, nworld)
    start = 0
    if state is not None:
        trainer.optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        stream.load(state["data"])
        start = int(state["step"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    logger = MetricsLogger(run_dir) if rank == 0 else None
    history = []
    try:
        for step in range(start + 1, cfg.steps + 1):
            m = trainer.step(stream.next(cfg.prompts_per_step))
            history.append(m)
            if logger:
                log.info(format_step(step, m))
                logger.log(step, m)
                if cfg.image_every and step % cfg.image_every == 0:
                    logger.images("rollout", step, trainer.last_rollout[0][0].images)
            if on_step:
                on_step(step, m)
            if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == cfg.steps) and rank == 0:
                save_checkpoint(run_dir, step, policy, trainer, stream.state(), cfg)
    finally:
        trainer.close()
        if logger:
            logger.close()
    return history, policy


def add_arguments(p):
    p.add_argument("--recipe", default="tiny_shapes", help="named recipe (tiny_shapes, tiny_shapes_srr)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--init", default=None, help="policy checkpoint to start from (default: the shipped one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. optim.lr=1e-4")


def run(args) -> int:
    from alphagrpo.train.world import load_world
    setup_logging()
    cfg = get_recipe(args.recipe)
    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.init:
        overrides.append(f"init={args.init}")
    cfg = apply_overrides(cfg, overrides)
    run_dir = Path(args.out or f"runs/{cfg.recipe}")
    hist, _ = train(cfg, load_world(cfg.data), run_dir, resume=args.resume)
    last = hist[-1] if hist else {}
    print(json.dumps({"steps": len(hist), "reward_mean_last": last.get("reward_mean"), "run_dir": str(run_dir)}))
    return 0
