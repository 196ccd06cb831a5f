"""alphagrpo.kernels: fused loss kernels of the recipe, each beside its plain-PyTorch reference.

Imports torch, and triton when installed (the Triton kernels themselves are built on first use). Installed from the
top-level ``kernels/`` folder as ``alphagrpo.kernels``.

- ``flow_grpo_loss`` / ``flow_grpo_loss_ref``: image GRPO loss of one SDE step (RECIPE.md sections 2 and 6).
- ``ar_grpo_loss`` / ``ar_grpo_loss_ref``: text GRPO loss from hidden states and the LM head (RECIPE.md section 6);
  ``ar_grpo_tiled.py`` keeps the round-one kernel as ``impl="tiled"``. Design and targets: docs/kernels.md.
- ``use_fused``: the switch (also ``ALPHAGRPO_KERNELS=auto|triton|ref``); see ``kernels/dispatch.py``.
- ``sde_coefficients``, ``sde_mean_std``: the one float32 SDE-step formula.
"""
from .ar_grpo import ar_grpo_loss, ar_grpo_loss_ref
from .dispatch import backend_for, use_fused
from .flow_grpo import flow_grpo_loss, flow_grpo_loss_ref
from .sde import sde_coefficients, sde_mean_std

__all__ = [
    "sde_coefficients", "sde_mean_std",
    "flow_grpo_loss", "flow_grpo_loss_ref", "ar_grpo_loss", "ar_grpo_loss_ref",
    "use_fused", "backend_for",
]
