"""alphagrpo.kernels: fused loss kernels of the recipe, each beside its plain-PyTorch reference.

Imports torch (and triton, lazily) only. Installed from the top-level ``kernels/`` folder as ``alphagrpo.kernels``.
"""
from .sde import sde_coefficients, sde_mean_std

__all__ = ["sde_coefficients", "sde_mean_std"]
