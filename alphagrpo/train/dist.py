"""Process-group helpers of the training loop: rank and world size, and gathering per-rank tensors (rewards for
the global std of RECIPE.md section 5). Without an initialised process group everything is a one-process no-op."""
from __future__ import annotations

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_all(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[n]`` tensors concatenated in rank order (a no-op in one process). Every rank must pass the
    same ``n``. Returned on ``t``'s device (NCCL groups move CPU tensors through the current CUDA device)."""
    rank, world = dist_info()
    if world == 1:
        return t
    dev = t.device
    if torch.distributed.get_backend() == "nccl" and dev.type != "cuda":   # NCCL moves CUDA tensors only
        t = t.cuda()
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts).to(dev)
