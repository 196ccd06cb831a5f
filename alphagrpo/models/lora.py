"""Low-rank adapters (LoRA) for ``nn.Linear`` layers, in peft's layout: the paper fine-tunes BAGEL with LoRA.

``add_lora(module, rank, alpha, targets)`` wraps every ``nn.Linear`` whose qualified name matches one of ``targets``
(``fnmatch`` patterns) in a ``LoRALinear``: the base layer is frozen and
``y = base_layer(x) + (alpha / rank) * lora_B(lora_A(x))`` with ``lora_A`` random and ``lora_B`` zero, so a fresh
adapter leaves the function unchanged. Module names follow peft (``<name>.base_layer``, ``<name>.lora_A``,
``<name>.lora_B``), and ``adapter_state_dict`` / ``adapter_config`` write what peft's ``save_pretrained`` writes
(``base_model.model.<name>.lora_A.weight`` keys; ``r``, ``lora_alpha``, ``target_modules``,
``base_model_name_or_path``), so the models that use peft itself (SD3.5, BAGEL) and the built-in TinyUMM save
adapters the same way. ``disabled_adapters`` is the KL reference of a LoRA run (the base function, no copy);
``merge_lora`` folds the adapters back into plain ``nn.Linear`` layers.

Chose not to: depend on peft for TinyUMM (it would make peft and transformers core dependencies of the CPU demo);
dropout on adapters (the recipe uses none, and dropout would break the on-policy ratio of 1).
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = float(alpha) / rank
        self.disabled = False
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        a = torch.empty(rank, base.in_features, dtype=w.dtype)
        bound = 1.0 / math.sqrt(base.in_features)   # kaiming-uniform(a=sqrt(5)) bound, as nn.Linear's own init
        a.uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        return y + self.lora_B(self.lora_A(x)) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        b = self.base_layer
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(b.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight)
            if b.bias is not None:
                out.bias.copy_(b.bias)
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
        params += [lora.lora_A.weight, lora.lora_B.weight]
    return params


def merge_lora(module: nn.Module, trainable: bool = True) -> int:
    """Fold every adapter into its base layer (plain ``nn.Linear`` again). With ``trainable``, every parameter of
    ``module`` trains again (as before ``add_lora``). Returns how many layers were merged."""
    names = lora_layers(module)
    for n in names:
        _set(module, n, module.get_submodule(n).merged())
    if trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    return len(names)


def lora_layers(module: nn.Module) -> list[str]:
    """Names of the layers that carry adapters."""
    return [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def disabled_adapters(module: nn.Module) -> Iterator[None]:
    """Compute with the base weights only while inside (the KL reference of a LoRA run); nests safely."""
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


def base_state_dict(module: nn.Module) -> dict:
    """The module's weights without adapters, under the names a plain (unadapted) module has."""
    out = {}
    for k, v in module.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def adapter_state_dict(module: nn.Module) -> dict:
    """The adapters' weights under peft's saved names (``base_model.model.<layer>.lora_A.weight``)."""
    out = {}
    for n, m in module.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
            out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def load_adapter_state_dict(module: nn.Module, state: dict) -> None:
    """Load ``adapter_state_dict`` output into a module with the same adapters; strict both ways."""
    mods = {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    want = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the model's adapters: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    with torch.no_grad():
        for n, m in mods.items():
            m.lora_A.weight.copy_(state[f"{PEFT_PREFIX}{n}.lora_A.weight"])
            m.lora_B.weight.copy_(state[f"{PEFT_PREFIX}{n}.lora_B.weight"])


def adapter_config(module: nn.Module, rank: int, alpha: float, base: Optional[str]) -> dict:
    """peft's ``adapter_config.json`` for these adapters (``target_modules``: the wrapped layers' names)."""
    return {"peft_type": "LORA", "task_type": None, "r": int(rank), "lora_alpha": float(alpha),
            "lora_dropout": 0.0, "bias": "none", "target_modules": lora_layers(module),
            "base_model_name_or_path": base, "init_lora_weights": True, "use_rslora": False}
