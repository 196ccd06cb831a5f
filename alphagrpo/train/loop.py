"""The training run: build the pieces from a config (policy, reward, KL reference), step, log, checkpoint, resume.

Everything model- or verifier-specific goes through the registries (``alphagrpo.models.registry``,
``alphagrpo.worlds.registry``, ``alphagrpo.verifiers``), so a policy registered from outside the package trains,
resumes and evaluates with no change here.

Resume is exact: the checkpoint holds the policy, the optimizer, the trainer's generator state, the step and the
data position, so N steps straight equal N/2 + resume + N/2 bit for bit on CPU. What resume refuses (see
``prepare_run``): a config that differs from the checkpoint's in a setting that changes the computation, unless
``allow_config_change`` (then the new values apply, the learning rate included, and the change is recorded in
``config_changes.jsonl``); ``steps`` below the checkpoint's step; a fresh run into a folder that already holds
checkpoints (pass ``resume`` or ``overwrite``).

Under ``torchrun`` (``alphagrpo.train.parallel``) the loop initialises the process group from the environment and
destroys it at the end; prompts are sharded by rank; rank 0 alone logs and writes the run folder's files; checkpoints
go through ``torch.distributed.checkpoint`` (``checkpoint.save_distributed``): resume on the same world size is
exact, on another one it loads weights and optimizer and says what cannot be exact.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from alphagrpo.models.registry import load_policy
from alphagrpo.rewards import DVReward
from alphagrpo.train import parallel as par_
from alphagrpo.train.checkpoint import (atomic_dir, has_checkpoints, load_checkpoint, load_distributed,
                                        load_weights_distributed, remove_partial, save_checkpoint, save_distributed)
from alphagrpo.train.config import TrainConfig, from_dict
from alphagrpo.train.metrics import MetricsLogger, format_step, save_rollout
from alphagrpo.train.trainer import GRPOTrainer
from alphagrpo.verifiers import build_verifier

log = logging.getLogger(__name__)

# settings a resumed run may change without breaking exactness (bookkeeping and transport, not computation)
# (parallel.*: how the same computation is spread over ranks; configs written before the section hold none)
RESUME_SAFE = {"steps", "out_dir", "ckpt_every", "image_every", "rollout_every", "eval_size", "eval_batch",
               "reward.workers", "reward.verifier", "reward.timeout", "reward.concurrency", "parallel.strategy",
               "parallel.cpu_offload", "parallel.param_dtype", "parallel.reduce_dtype", "parallel.bucket_mb",
               "parallel.timeout_s"}


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
    policy.enable_lora(cfg.lora.rank, cfg.lora.alpha, targets=tuple(cfg.lora.targets), seed=cfg.seed)


def build_reward(cfg: TrainConfig, world) -> DVReward:
    """The run's ``DVReward`` over the verifier ``reward.verifier`` names."""
    verifier = build_verifier(cfg.reward.verifier, world=world, on_failure=cfg.reward.on_failure,
                              timeout=cfg.reward.timeout, concurrency=cfg.reward.concurrency, device=cfg.device)
    return DVReward(verifier, mode=cfg.reward.mode, binary=cfg.reward.binary, holistic=cfg.reward.holistic)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_diff(saved: dict, new: dict) -> dict:
    """``{key: (saved, new)}`` for every setting that differs (flattened ``a.b`` keys)."""
    a, b = _flat(saved), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def prepare_run(run_dir: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool = False,
                allow_config_change: bool = False, resume_or_start: bool = False) -> Optional[dict]:
    """Check the run folder against what was asked, before any slow work. Returns the checkpoint state to resume
    from (None: a fresh run). Raises ``ValueError`` with what to change."""
    run_dir = Path(run_dir)
    gone = remove_partial(run_dir)
    if gone:
        log.warning("removed %d leftover temporary checkpoint file(s) of an interrupted write: %s", len(gone),
                    ", ".join(gone[:4]))
    exists = has_checkpoints(run_dir)
    if resume and not exists:
        if resume_or_start:
            resume = False
        else:
            raise ValueError(f"--resume: {run_dir} holds no checkpoint to continue from; start a fresh run there "
                             "without --resume (or pass --resume-or-start)")
    if not resume:
        if exists and not overwrite:
            raise ValueError(f"{run_dir} already holds a run's checkpoints: pass --resume to continue it, --out NEW "
                             "for a new run, or --overwrite to replace it")
        if exists and overwrite:
            for name in ("checkpoints", "metrics.jsonl", "tb", "reference", "rollouts", "config_changes.jsonl"):
                p = run_dir / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return None
    state = load_checkpoint(run_dir, cfg.recipe)
    if cfg.steps < int(state["step"]):
        raise ValueError(f"steps={cfg.steps} is below the checkpoint's step {state['step']} ({state['path']}); ask "
                         f"for at least {state['step']} steps")
    diff = config_diff(state["config"], cfg.to_dict())
    unsafe = {k: v for k, v in diff.items() if k not in RESUME_SAFE}
    for k, (old, new) in diff.items():
        log.info("resume: %s %r -> %r%s", k, old, new, "" if k in RESUME_SAFE else " (changes the computation)")
    if unsafe and not allow_config_change:
        shown = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in list(unsafe.items())[:6])
        raise ValueError(f"resume with a config that differs from the checkpoint's ({shown}); exact resume needs the "
                         "same settings: drop those --set overrides, or pass --allow-config-change to apply them")
    state["config_changes"] = unsafe
    return state


def _apply_optim_changes(optimizer, cfg: TrainConfig) -> None:
    """After loading an optimizer state, make its groups use the config's hyperparameters (a resumed run with an
    allowed change of ``optim.*`` really trains with the new values)."""
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"], g["betas"] = cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas)


def train(cfg: TrainConfig, world, run_dir: Path, *, policy=None, resume: bool = False, overwrite: bool = False,
          allow_config_change: bool = False, resume_or_start: bool = False, reward: Optional[DVReward] = None,
          on_step: Optional[Callable[[int, dict], None]] = None, progress: Optional[bool] = None):
    """Run ``cfg.steps`` GRPO steps (continuing from the run's latest checkpoint when ``resume``). Returns
    ``(per-step metrics, trained policy)``. Writes ``config.json``, ``metrics.jsonl``, TensorBoard logs and
    checkpoints to ``run_dir``. ``policy``: start from this one instead of loading ``cfg.model``; ``reward``: use
    this instead of building ``reward.verifier``; ``progress``: a progress bar (default: on rank 0 when stderr is a
    terminal). Under torchrun (``WORLD_SIZE`` > 1) every rank calls this."""
    env = par_.init_distributed(cfg.device, cfg.parallel.timeout_s)
    try:
        return _train(cfg, world, Path(run_dir), env, policy=policy, resume=resume, overwrite=overwrite,
                      allow_config_change=allow_config_change, resume_or_start=resume_or_start, reward=reward,
                      on_step=on_step, progress=progress)
    finally:
        par_.shutdown(env)


def _load_start(cfg, world, state, policy):
    """The policy a run starts or resumes from (before any sharding)."""
    if state is not None and state["policy_path"] is not None:
        return load_policy(cfg.model, cfg.device, path=str(state["policy_path"]), world=world)
    if state is not None:       # an FSDP checkpoint: the starting policy, then the trainable weights from dcp/
        policy = load_policy(cfg.model, cfg.device, world=world)
        if cfg.lora.rank > 0:
            enable_lora(policy, cfg)
        return policy
    policy = policy if policy is not None else load_policy(cfg.model, cfg.device, world=world)
    if cfg.lora.rank > 0:
        enable_lora(policy, cfg)
    return policy


def _train(cfg, world, run_dir, env, *, policy, resume, overwrite, allow_config_change, resume_or_start, reward,
           on_step, progress):
    rank, nworld = env.rank, env.world
    state = par_.first_on_rank0(lambda: prepare_run(
        run_dir, cfg, resume=resume, overwrite=overwrite and rank == 0, allow_config_change=allow_config_change,
        resume_or_start=resume_or_start))
    policy = _load_start(cfg, world, state, policy)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    reward = reward if reward is not None else build_reward(cfg, world)
    anchored = (cfg.loss.beta_text > 0 or cfg.loss.beta_image > 0) and not getattr(policy, "lora", None)
    ref = None
    if anchored and state is not None:      # a full fine-tuning run's KL anchor was saved when it started
        ref_dir = run_dir / "reference"
        if not ref_dir.is_dir():
            raise FileNotFoundError(f"{ref_dir} is missing: a full fine-tuning run with loss.beta_text/beta_image > 0 "
                                    "saves its KL reference there when it starts; resume a run that has one")
        ref = load_policy(cfg.model, cfg.device, path=str(ref_dir), world=world)
    trainer = GRPOTrainer(policy, reward, cfg, generator=gen, ref_policy=ref)
    if anchored and state is None and rank == 0:
        atomic_dir(run_dir / "reference", lambda tmp: trainer.ref_policy.save_pretrained(tmp))
    stream = PromptStream(world.train, cfg.seed, rank, nworld)
    distributed_ckpt = par_.uses_dcp(trainer.parallel)
    start = 0
    if state is not None:
        if state.get("dcp"):
            stream.load(load_distributed(state, par_.trainable_root(policy), trainer))
        else:
            trainer.load_state_dict(state)
            stream.load(state["data"])
        start = int(state["step"])
        if state["config_changes"]:
            _apply_optim_changes(trainer.optimizer, cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        if state is not None and state["config_changes"]:
            with open(run_dir / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"step": start, "time": time.time(),
                                    "changes": {k: list(v) for k, v in state["config_changes"].items()}}) + "\n")
        if nworld > 1:
            log.info("data-parallel run: %d ranks, strategy %s, %d prompts x %d samples per rank and step",
                     nworld, trainer.parallel.name, cfg.prompts_per_step, cfg.group_size)
    logger = MetricsLogger(run_dir, resume_step=start if state is not None else None) if rank == 0 else None
    bar = _progress(cfg, start, rank, progress)
    history = []
    try:
        for step in range(start + 1, cfg.steps + 1):
            result = trainer.step(stream.next(cfg.prompts_per_step))
            m = result.metrics
            m.update(par_.global_throughput(m, cfg.device))
            history.append(m)
            if logger:
                log.info(format_step(step, m))
                logger.log(step, m)
                if cfg.image_every and step % cfg.image_every == 0:
                    logger.images("rollout", step, result.chunks[0].images)
                if cfg.rollout_every and step % cfg.rollout_every == 0:
                    save_rollout(run_dir, step, result)
            if bar is not None:
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", sps=f"{m['samples_per_s_total']:.1f}")
                bar.update(1)
            if on_step:
                on_step(step, m)
            if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                data = stream.state()
                if distributed_ckpt:
                    save_distributed(run_dir, step, policy, par_.trainable_root(policy), trainer, data, cfg,
                                     export_policy=trainer.parallel.name == "replicate")
                elif rank == 0:
                    save_checkpoint(run_dir, step, policy, {**trainer.state_dict(), "data": data}, cfg)
    finally:
        trainer.close()
        if logger:
            logger.close()
        if bar is not None:
            bar.close()
    return history, policy


def _progress(cfg, start: int, rank: int, progress: Optional[bool]):
    """A tqdm bar over the run's steps on rank 0, when asked or when stderr is a terminal (and tqdm exists)."""
    if rank != 0 or not (progress if progress is not None else sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def export_policy(checkpoint, out, world=None) -> Path:
    """Write the policy of a trainer checkpoint (a run folder, its checkpoints folder or one step folder) into the
    policy folder ``out`` with the policy's ``save_pretrained``, in one process. For FSDP checkpoints, whose ranks
    never hold the whole policy: the starting policy (``model.path``, LoRA as configured) plus the trained weights
    from ``dcp/``."""
    state = load_checkpoint(Path(checkpoint))
    cfg = from_dict(state["config"])
    policy = _load_start(cfg, world, state, None)
    if state.get("dcp"):
        load_weights_distributed(state, par_.trainable_root(policy))
    policy.save_pretrained(Path(out))
    return Path(out)


def config_from_checkpoint(path) -> TrainConfig:
    """The config a checkpoint was written with."""
    return from_dict(load_checkpoint(Path(path))["config"])
