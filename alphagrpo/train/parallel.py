"""Data-parallel training on PyTorch's own stack: the process group from torchrun's environment, and the two
strategies of ``parallel.strategy`` (docs/distributed.md has the launch commands and the cost formulas).

- ``replicate`` (DDP semantics): every rank holds the whole policy; after the step's backward passes the gradients
  of the trainable parameters (all weights, or only the LoRA adapters) are averaged across ranks by bucketed
  ``all_reduce`` calls, once per step; the frozen base is never communicated. Chose not to use
  ``DistributedDataParallel``: its reducer is armed by ``forward()``, but the trainer calls the policy through
  ``think_replay`` / ``image_condition`` / ``velocity`` and runs one ``backward()`` per trained window step, so DDP
  would all-reduce after each of them (or need ``no_sync`` plus a last backward that touches every parameter). One
  explicit bucketed all-reduce after the last backward is what DDP-with-``no_sync`` amounts to, minus the hooks.
- ``fsdp``: FSDP2 ``fully_shard`` over ``policy.shard_modules()`` (each unit, then the outermost as root), with
  ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` on CUDA (by default the policy's own dtype for compute and
  fp32 for the gradient reduction; on CPU nothing is cast) and optional CPU offload. Policies call
  methods of their modules rather than ``forward``; the methods a policy names in ``shard_forward_methods(module)``
  are registered with ``register_fsdp_forward_method`` so FSDP gathers around them. Rollout (no grad, dozens of
  calls per sample) runs inside ``gathered()``: every unit is all-gathered once, kept unsharded for the whole
  rollout, then resharded; replay runs under FSDP's own hooks (gather before each call, reduce-scatter in
  backward).

Both: the global gradient norm is clipped (replicate: the grads are identical after the all-reduce; fsdp: the norm
of the sharded DTensor grads is reduced across ranks). Without an initialised process group (or with one rank and
``replicate``) everything here is a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from alphagrpo.train.dist import dist_info, gather_all

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- process group
@dataclass
class DistEnv:
    """Where this process sits: ``rank`` / ``world`` / ``local_rank``; ``created``: this run initialised the
    process group (and destroys it in ``shutdown``)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False


def init_distributed(device: str = "cpu", timeout_s: float = 600.0) -> DistEnv:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) when ``WORLD_SIZE > 1``: NCCL with device ``cuda:LOCAL_RANK`` for a CUDA
    run, gloo on CPU; ``timeout_s`` bounds every collective, so a rank that died cannot leave the others waiting
    forever. A group somebody else initialised is used as it is."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist_info()
        return DistEnv(rank, world, local, created=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    cuda = str(device).startswith("cuda")
    if cuda:
        if ":" in str(device):
            raise ValueError(f"device={device} names one GPU; under torchrun set device=cuda and every rank uses "
                             "cuda:LOCAL_RANK")
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but this machine has no CUDA device (use device=cpu: gloo)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist_info()
    return DistEnv(rank, world, local, created=True)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if ``env`` created it."""
    if env.created and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def first_on_rank0(fn):
    """Run ``fn()`` on rank 0, then (if it did not raise) on the other ranks; returns this rank's result. A
    ``ValueError`` / ``FileNotFoundError`` on rank 0 is raised on every rank with rank 0's message (nobody is left
    waiting). For work that must happen once before the others look (deleting an old run, removing partial
    checkpoints)."""
    rank, world = dist_info()
    if world == 1:
        return fn()
    out, err = None, None
    if rank == 0:
        try:
            out = fn()
        except (ValueError, FileNotFoundError) as e:
            err = [type(e).__name__, str(e)]
    box = [err]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise (ValueError if box[0][0] == "ValueError" else FileNotFoundError)(box[0][1])
    if rank != 0:
        out = fn()
    return out


# ---------------------------------------------------------------------------------------------- strategies
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class Replicate:
    """Every rank holds the whole policy; trainable gradients are averaged by bucketed all-reduces."""

    name = "replicate"

    def __init__(self, cfg=None):
        self.bucket_bytes = int((cfg.bucket_mb if cfg else 25.0) * 2**20)
        self.reduce_dtype = _dtype(cfg.reduce_dtype if cfg else "float32")
        self.comm = {"all_reduce_calls": 0, "all_reduce_bytes": 0}

    def setup(self, policy) -> None:
        """Make every rank start from rank 0's trainable weights (as DDP does at construction; the frozen base is
        loaded from the same files everywhere and not sent)."""
        if dist_info()[1] > 1:
            with torch.no_grad():
                for p in policy.trainable_parameters():
                    dist.broadcast(p.data, src=0)

    @contextlib.contextmanager
    def gathered(self):
        """The rollout context: nothing to gather."""
        yield

    def _buckets(self, params: list) -> list:
        out, cur, size = [], [], 0
        for p in params:
            nbytes = p.numel() * torch.finfo(self.reduce_dtype).bits // 8
            if cur and size + nbytes > self.bucket_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += nbytes
        if cur:
            out.append(cur)
        return out

    def sync_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average ``.grad`` of ``params`` across ranks (a parameter without a gradient counts as zeros, so every
        rank sends the same buckets). Call once, after the step's last backward."""
        world = dist_info()[1]
        if world == 1:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in self._buckets(params):
            flat = torch.cat([p.grad.reshape(-1).to(self.reduce_dtype) for p in bucket])
            dist.all_reduce(flat)
            flat /= world
            self.comm["all_reduce_calls"] += 1
            self.comm["all_reduce_bytes"] += flat.numel() * flat.element_size()
            a = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[a:a + n].view_as(p.grad))
                a += n

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """Clip by the global norm (after ``sync_grads`` every rank holds the same gradients)."""
        return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))


class FSDP(Replicate):
    """FSDP2 over ``policy.shard_modules()``; see the module docstring for how rollout and replay run."""

    name = "fsdp"

    def __init__(self, cfg=None, device: str = "cpu"):
        super().__init__(cfg)
        self.cfg = cfg
        self.cuda = str(device).startswith("cuda")
        self.units: list = []

    def setup(self, policy) -> None:
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)
        units = list(policy.shard_modules()) if hasattr(policy, "shard_modules") else []
        if not units:
            raise ValueError(f"parallel.strategy=fsdp needs a policy whose shard_modules() names its modules; "
                             f"{type(policy).__name__} names none (use parallel.strategy=replicate)")
        from torch.distributed.device_mesh import init_device_mesh
        kw = {"mesh": init_device_mesh("cuda" if self.cuda else "cpu", (dist_info()[1],))}
        if self.cuda:
            pd = None if self.cfg.param_dtype == "auto" else _dtype(self.cfg.param_dtype)
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=pd, reduce_dtype=_dtype(self.cfg.reduce_dtype))
        kw["offload_policy"] = CPUOffloadPolicy() if (self.cfg and self.cfg.cpu_offload) else OffloadPolicy()
        methods = getattr(policy, "shard_forward_methods", lambda m: ())
        for u in units:
            fully_shard(u, **kw)
            for name in methods(u):
                register_fsdp_forward_method(u, name)
        units[-1].set_reshard_after_forward(False, recurse=False)   # FSDP's own choice for a root
        self.units = units

    @contextlib.contextmanager
    def gathered(self):
        """All-gather every unit once and keep it unsharded for the duration (the rollout: no grad, many calls per
        sample); reshard at the end. Inner units go back to resharding after forward, the root to keeping its
        parameters until backward (FSDP's default for a root)."""
        for u in self.units:
            u.set_reshard_after_forward(False, recurse=False)
        for u in self.units:
            u.unshard()
        try:
            yield
        finally:
            for u in self.units:
                u.reshard()
            for u in self.units[:-1]:
                u.set_reshard_after_forward(True, recurse=False)

    def sync_grads(self, params) -> None:
        """Nothing to do: FSDP reduce-scatters the gradients during backward."""

    def clip_grad_norm(self, params, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()            # the norm over every rank's shards
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
        return float(total)


def make_parallel(cfg, device: str = "cpu"):
    """The strategy ``cfg.parallel`` names (``cfg``: a ``TrainConfig``)."""
    pc = getattr(cfg, "parallel", None)
    if pc is not None and pc.strategy == "fsdp":
        if not (dist.is_available() and dist.is_initialized()):
            log.info("parallel.strategy=fsdp in one process without a process group: nothing to shard, the whole "
                     "policy stays here (as replicate)")
            return Replicate(pc)
        return FSDP(pc, device)
    return Replicate(pc)


def uses_dcp(par) -> bool:
    """Whether checkpoints go through ``torch.distributed.checkpoint`` (several ranks, or FSDP)."""
    return dist_info()[1] > 1 or isinstance(par, FSDP)


def trainable_root(policy):
    """The ``nn.Module`` that holds every trainable parameter (what DCP saves): the outermost shard unit, else the
    policy's ``model``."""
    units = list(policy.shard_modules()) if hasattr(policy, "shard_modules") else []
    root = units[-1] if units else getattr(policy, "model", None)
    if not isinstance(root, torch.nn.Module):
        raise ValueError(f"{type(policy).__name__} names no module for distributed checkpoints: give it "
                         "shard_modules() (outermost last) or a .model attribute")
    return root


# ---------------------------------------------------------------------------------------------- throughput
def peak_memory_gib(device) -> float:
    """This process's peak memory: CUDA allocator peak on a CUDA device, else the peak resident set size."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0


def global_throughput(metrics: dict, device) -> dict:
    """Every rank's samples, step time and peak memory, gathered (every rank must call it once per step): the
    run's total samples/s, the slowest rank's samples/s, and peak memory per rank and at most."""
    t = torch.tensor([float(metrics["samples"]), float(metrics["time_step"]), peak_memory_gib(device)],
                     dtype=torch.float64)
    rows = gather_all(t).view(-1, 3)
    samples, times, mem = rows[:, 0], rows[:, 1], rows[:, 2]
    per_rank = samples / times.clamp_min(1e-9)
    return {"samples_total": float(samples.sum()), "samples_per_s_total": float(samples.sum() / times.max()),
            "samples_per_s_rank_min": float(per_rank.min()), "peak_mem_gib_max": float(mem.max()),
            "peak_mem_gib_ranks": [round(float(m), 3) for m in mem], "world_size": int(rows.shape[0])}


@contextlib.contextmanager
def timed(out: dict, key: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        out[key] = out.get(key, 0.0) + time.perf_counter() - t
