"""Group advantages (RECIPE.md section 5) and False-Positive Rectification (section 7). Float32, ``[N]`` in, ``[N]`` out."""
from __future__ import annotations

import torch

__all__ = ["group_advantages", "rectify_false_positives"]


def _as_1d(name: str, value) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
    return t


def group_advantages(rewards, group_ids, *, std: str = "global", eps: float = 1e-4) -> torch.Tensor:
    """``A_i = (R_i - mean_{group(i)} R) / (std + eps)``, float32 ``[N]`` (RECIPE.md section 5).

    ``rewards``: ``[N]``; ``group_ids``: ``[N]`` integers, equal for the samples of one prompt (any labels).
    ``std="global"`` (the default, the authors' choice): the population std (ddof 0) over ALL ``N`` rewards;
    ``std="group"``: each group's own population std. In a distributed run, gather the rewards of all ranks
    first so the global std is the batch's.
    """
    r = _as_1d("rewards", rewards).to(torch.float32)
    g = _as_1d("group_ids", group_ids)
    if g.shape != r.shape:
        raise ValueError(f"rewards and group_ids must have the same length, got {r.numel()} and {g.numel()}")
    if std not in ("global", "group"):
        raise ValueError(f"std must be 'global' or 'group', got {std!r}")
    _, inv = torch.unique(g, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float32).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float32).index_add_(0, inv, r) / count
    centered = r - mean[inv]
    if std == "global":
        denom = r.std(correction=0) if r.numel() > 1 else torch.zeros((), dtype=torch.float32)
    else:
        var = torch.zeros(n_groups, dtype=torch.float32).index_add_(0, inv, centered * centered) / count
        denom = var.sqrt()[inv]
    return centered / (denom + eps)


def rectify_false_positives(rewards, init_rewards) -> torch.Tensor:
    """FPR (RECIPE.md section 7): a refinement whose reward is not above its initial image's (``R_i <= R_init``)
    gets ``R_init``. ``rewards``: ``[N]``; ``init_rewards``: ``[N]`` (each refinement's own initial reward) or a
    scalar. Returns float32 ``[N]``. Since the init reward is then the group minimum, no non-improving refinement
    can get a positive advantage."""
    r = _as_1d("rewards", rewards).to(torch.float32)
    init = torch.as_tensor(init_rewards, dtype=torch.float32)
    if init.ndim == 0:
        init = init.expand_as(r)
    if init.shape != r.shape:
        raise ValueError(f"init_rewards must be a scalar or [N={r.numel()}], got shape {tuple(init.shape)}")
    return torch.where(r > init, r, init)
