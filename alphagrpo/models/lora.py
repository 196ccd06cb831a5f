"""Low-rank adapters (LoRA) for ``nn.Linear`` layers: the paper fine-tunes BAGEL with LoRA at lr 5e-5.

``add_lora(module, rank, alpha, targets)`` wraps every ``nn.Linear`` whose qualified name matches one of ``targets``
(``fnmatch`` patterns) in a ``LoRALinear``: the base layer is frozen and ``y = base(x) + (alpha / rank) * x A^T B^T``
with ``A`` random and ``B`` zero, so a fresh adapter leaves the function unchanged. ``merge_lora`` folds the
adapters back into plain ``nn.Linear`` layers. The adapters' tensors live in the module's ``state_dict`` (as
``<name>.lora_a`` / ``<name>.lora_b``, the base as ``<name>.base.weight``), so a checkpoint of an adapted model
resumes exactly.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Optional, Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = float(alpha) / rank
        w = base.weight
        a = torch.empty(rank, base.in_features, dtype=w.dtype)
        bound = 1.0 / math.sqrt(base.in_features)   # kaiming-uniform(a=sqrt(5)) bound, as nn.Linear's own init
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(w.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, child)


def add_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str],
             seed: int = 0) -> list[nn.Parameter]:
    """Freeze every parameter of ``module`` and wrap each ``nn.Linear`` whose name matches a pattern of ``targets``
    in a ``LoRALinear`` (adapters initialised from ``seed``). Returns the adapters' parameters (the trainable ones).
    Raises ``ValueError`` when no layer matches or the module already has adapters."""
    if any(isinstance(m, LoRALinear) for m in module.modules()):
        raise ValueError("this model already has LoRA adapters; merge_lora() them first or keep training them")
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)
             and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not names:
        linear = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}; layers are named like "
                         f"{linear[:4]}")
    for p in module.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params = []
    for n in names:
        lora = LoRALinear(module.get_submodule(n), rank, alpha, generator=g)
        _set(module, n, lora)
        params += [lora.lora_a, lora.lora_b]
    return params


def merge_lora(module: nn.Module, trainable: bool = True) -> int:
    """Fold every adapter into its base layer (plain ``nn.Linear`` again). With ``trainable``, every parameter of
    ``module`` trains again (as before ``add_lora``). Returns how many layers were merged."""
    names = [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set(module, n, module.get_submodule(n).merged())
    if trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    return len(names)


def lora_layers(module: nn.Module) -> list[str]:
    """Names of the layers that carry adapters."""
    return [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
