"""The ``Policy`` protocol (v2): everything the recipe needs from a unified model, and nothing more.

The trainer, the sampler and the evaluation code only call these members, so a new model (SD3.5 through diffusers,
BAGEL) is one adapter module implementing them plus a registration (``alphagrpo.models.registry``), with no trainer
change. Text is handled inside the policy (tokenizer, chat format); the trainer passes ``GenRequest`` objects and
opaque token tensors.

What a policy declares about itself:
- ``has_think``: whether it writes think text. ``False`` (a flow-only model such as SD3.5): rollout, replay, loss and
  evaluation skip the text path; ``sample_think`` / ``think_replay`` are never called; SRR is refused.
- ``lora``: the adapter settings while LoRA adapters are on (``None`` for full fine-tuning); ``enable_lora`` /
  ``merge_lora`` switch; ``reference()`` is a context in which the policy computes with its adapters disabled (the
  KL reference of a LoRA run, with no second copy of the model).
- ``save_pretrained`` / ``from_pretrained``: a LoRA run saves the adapters and a pointer to the base model's folder,
  never a copy of the base weights.
- ``device`` / ``dtype``; ``sigmas(num_steps, shift)``: the policy's own sigma grid (a diffusers scheduler's) when
  it has one (``sampler.grid="scheduler"``); ``shard_modules()``: the modules a distributed wrapper may shard (FSDP2
  ``fully_shard`` units), and optionally ``shard_forward_methods(module)``: the methods the adapter calls on such a
  unit instead of ``forward`` (``alphagrpo.train.parallel`` registers them so FSDP2 gathers around them).

``PolicyBase`` supplies the optional members' defaults (text path on, no own grid, nothing to shard, ``reference()``
through ``alphagrpo.models.lora.disabled_adapters``) so an adapter writes only what is specific to its model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch


@dataclass
class GenRequest:
    """One generation: the prompt; for refinement also the input image ``[H, W, 3]`` uint8 and the instruction."""
    prompt: str
    image: Optional[np.ndarray] = None
    instruction: Optional[str] = None


@dataclass
class ThinkSample:
    """Sampled think text. ``tokens[i]``: LongTensor ``[T_i]`` (ends with the end-of-think token unless cut at the
    length limit); ``logp[i]``: float32 ``[T_i]``, the log-probs at temperature 1 from the full softmax (the old
    log-probs of RECIPE.md section 6); ``texts[i]``: the decoded text."""
    tokens: list[torch.Tensor]
    logp: list[torch.Tensor]
    texts: list[str]


@dataclass
class TextReplay:
    """What the fused AR loss needs, for think tokens packed over the batch: ``hidden [N, H]`` (final hidden states
    predicting ``targets [N]``), the LM-head ``weight [V, H]``, and ``cu_seqlens [S + 1]`` (on the device), plus
    optionally the same boundaries as a host list (``cu_seqlens_host``: the kernel plans its sequence-level chunks
    from it without a device sync)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_host: Optional[list] = None


@dataclass
class CFGConfig:
    """Classifier-free guidance of RECIPE.md section 2. ``text_scale`` applies for sigma in ``(low, high]``;
    ``image_scale`` only for refinement (conditioned on an input image). A scale of 1 disables that branch.
    ``renorm``: BAGEL's renormalisation (global for text-to-image, per text channel for refinement); flow-only
    models in Flow-GRPO's setup use none. The recipe gives text-to-image and refinement their own settings
    (``TrainConfig.cfg`` and ``TrainConfig.cfg_refine``)."""
    text_scale: float = 4.0
    image_scale: float = 2.0
    low: float = 0.4
    high: float = 1.0
    renorm: bool = True

    def __post_init__(self):
        if self.text_scale < 0 or self.image_scale < 0:
            raise ValueError(f"CFG scales must be >= 0 (1 disables a branch), got text {self.text_scale} and "
                             f"image {self.image_scale}")
        if not 0 <= self.low <= self.high <= 1:
            raise ValueError(f"the CFG interval needs 0 <= low <= high <= 1, got ({self.low}, {self.high}]")


@runtime_checkable
class Policy(Protocol):
    """What the recipe needs from a text + flow-matching image model (see the module docstring)."""

    latent_shape: tuple[int, ...]
    has_think: bool
    lora: Optional[dict]

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def sample_think(self, requests: Sequence[GenRequest], *, generator: torch.Generator,
                     max_new_tokens: int, temperature: float = 1.0) -> ThinkSample:
        """Sample think text (no grad) for each request, with its old log-probs. Only when ``has_think``."""

    def think_replay(self, requests: Sequence[GenRequest], think: Sequence[torch.Tensor]) -> TextReplay:
        """Recompute, with grad, the final hidden states that predict the given think tokens. Only when
        ``has_think``."""

    def image_condition(self, requests: Sequence[GenRequest], think: Optional[Sequence[torch.Tensor]],
                        cfg: CFGConfig) -> Any:
        """Build the (detached) conditioning of every CFG branch; rollout and replay both call this."""

    def velocity(self, x: torch.Tensor, sigma: float, cond: Any) -> torch.Tensor:
        """CFG-combined velocity ``[B, *latent_shape]`` at noise level ``sigma``; differentiable when grad is on."""

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``[B, *latent_shape]`` -> uint8 images ``[B, H, W, 3]``."""

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images ``[B, H, W, 3]`` -> latents ``[B, *latent_shape]``."""

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters the optimizer updates (LoRA adapters, or every weight)."""

    def enable_lora(self, rank: int, alpha: float, targets: Sequence[str] = (), seed: int = 0) -> None:
        """Freeze the model and train rank-``rank`` adapters on the ``targets`` (fnmatch patterns; empty: the
        policy's default set)."""

    def merge_lora(self) -> None:
        """Fold the adapters into the weights; every weight trains again."""

    def reference(self) -> ContextManager:
        """A context in which every computation uses the base weights (adapters disabled)."""

    def sigmas(self, num_steps: int, shift: float) -> Optional[torch.Tensor]:
        """The policy's own float32 grid of ``num_steps + 1`` sigmas from 1 to 0, or None (none of its own)."""

    def shard_modules(self) -> list:
        """The ``nn.Module`` units a distributed wrapper may shard (FSDP2), outermost last; empty: none."""

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the policy to folder ``path`` (with LoRA on: the adapters and a pointer to the base)."""


class PolicyBase:
    """Defaults for the optional members of ``Policy``. Subclasses set ``latent_shape`` and implement the
    model-specific methods; a flow-only model sets ``has_think = False``."""

    has_think: bool = True
    lora: Optional[dict] = None

    def modules_for_lora(self) -> torch.nn.Module:
        """The module whose linear layers the adapters wrap (``disabled_adapters`` searches it)."""
        raise NotImplementedError(f"{type(self).__name__} has no LoRA support")

    @property
    def device(self) -> torch.device:
        return next(iter(self.trainable_parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.trainable_parameters())).dtype

    def reference(self) -> ContextManager:
        """Adapters off for the duration (the KL reference of a LoRA run). Without adapters there is no reference
        inside the policy: the trainer keeps a frozen copy instead."""
        if not self.lora:
            raise ValueError(f"{type(self).__name__} has no LoRA adapters to disable: the reference of a full "
                             "fine-tuning run is a frozen copy, which the trainer keeps")
        from alphagrpo.models.lora import disabled_adapters
        return disabled_adapters(self.modules_for_lora())

    def sigmas(self, num_steps: int, shift: float) -> Optional[torch.Tensor]:
        return None

    def shard_modules(self) -> list:
        return []


def policy_sigmas(policy, num_steps: int, shift: float, grid: str = "flow") -> torch.Tensor:
    """The sigma grid to sample on: the recipe's ``flow_sigmas`` (``grid="flow"``) or the policy's own
    (``grid="scheduler"``, e.g. a diffusers scheduler's, for parity with Flow-GRPO)."""
    from alphagrpo.sampler import flow_sigmas
    if grid == "flow":
        return flow_sigmas(num_steps, shift)
    if grid != "scheduler":
        raise ValueError(f"sampler.grid must be 'flow' or 'scheduler', got {grid!r}")
    own = policy.sigmas(num_steps, shift) if hasattr(policy, "sigmas") else None
    if own is None:
        raise ValueError(f"sampler.grid=scheduler needs a policy with its own sigma grid; {type(policy).__name__} has "
                         "none (use sampler.grid=flow)")
    own = torch.as_tensor(own, dtype=torch.float32)
    if own.shape != (num_steps + 1,):
        raise ValueError(f"{type(policy).__name__}.sigmas({num_steps}) returned shape {tuple(own.shape)}, expected "
                         f"({num_steps + 1},)")
    return own


def has_think(policy) -> bool:
    """Whether ``policy`` writes think text (policies written before the attribute existed do)."""
    return bool(getattr(policy, "has_think", True))
