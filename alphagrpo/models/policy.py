"""The ``Policy`` protocol: everything the recipe needs from a unified model, and nothing more.

The trainer, the sampler and the evaluation code only call these methods, so a new model (SD3.5 through
diffusers, BAGEL) is an adapter implementing them, with no trainer change. Text is handled inside the policy
(tokenizer, chat format); the trainer passes ``GenRequest`` objects and opaque token tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Protocol, Sequence, runtime_checkable

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
    predicting ``targets [N]``), the LM-head ``weight [V, H]``, and ``cu_seqlens [S + 1]``."""
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor


@dataclass
class CFGConfig:
    """Classifier-free guidance of RECIPE.md section 2. ``text_scale`` applies for sigma in ``(low, high]``;
    ``image_scale`` only for refinement (conditioned on an input image). A scale of 1 disables that branch."""
    text_scale: float = 4.0
    image_scale: float = 2.0
    low: float = 0.4
    high: float = 1.0
    renorm: bool = True


@runtime_checkable
class Policy(Protocol):
    """What the recipe needs from a unified text + flow-matching image model."""

    latent_shape: tuple[int, ...]

    def sample_think(self, requests: Sequence[GenRequest], *, generator: torch.Generator,
                     max_new_tokens: int, temperature: float = 1.0) -> ThinkSample:
        """Sample think text (no grad) for each request, with its old log-probs."""

    def think_replay(self, requests: Sequence[GenRequest], think: Sequence[torch.Tensor]) -> TextReplay:
        """Recompute, with grad, the final hidden states that predict the given think tokens."""

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
        """The parameters the optimizer updates (LoRA or full)."""
