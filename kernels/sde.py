"""The flow-matching SDE step of RECIPE.md section 2, in float32, shared by the sampler and the flow kernels.

Convention: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, ``v = noise - x0``, steps go from sigma to a smaller
sigma_next, so ``dt = sigma_next - sigma < 0``. With noise level ``a``:

    std_t = a * sqrt(sigma / (1 - sigma_d))          sigma_d = sigma, except sigma_d = substitute where sigma == 1
    mean  = x * (1 + std_t^2 * dt / (2 sigma)) + v * (1 + std_t^2 * (1 - sigma) / (2 sigma)) * dt
    std   = std_t * sqrt(-dt)                         (the transition std of x' = mean + std * eps)

With ``a == 0`` every coefficient is exactly 1 in float32, so ``mean == x + v * dt`` bit for bit (the Euler step).
This file imports torch only: it is the single definition used by ``alphagrpo.sde_step`` and by the references
and Triton kernels beside it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Scalar = Union[float, torch.Tensor]


def per_sample(value: Scalar, batch: int, ndim: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Python float or a ``[B]``/scalar tensor as a float32 tensor of shape ``[B, 1, ..., 1]`` (``ndim`` dims).

    ``dtype`` exists for float64 test oracles; everything in the recipe uses the float32 default.
    """
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    t = t.reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"expected a scalar or {batch} per-sample values, got shape {tuple(t.shape)}")
    return t.reshape((batch,) + (1,) * (ndim - 1))


def sde_coefficients(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: Scalar,
    sigma_one_substitute: Optional[Scalar] = None,
):
    """Per-sample float32 coefficients ``(c_x, c_v, std)`` with ``mean = c_x * x + c_v * v`` and the transition std.

    ``sigma``/``sigma_next``: float32 tensors of equal shape (float64 ones give a float64 oracle for tests).
    ``sigma_one_substitute`` (RECIPE section 2) replaces sigma in the denominator ``1 - sigma`` where ``sigma == 1``;
    by default it is ``sigma_next``, which on the grid is exactly the grid's second value (the authors' choice).
    """
    a = torch.as_tensor(noise_level, dtype=sigma.dtype, device=sigma.device)
    dt = sigma_next - sigma
    sub = sigma_next if sigma_one_substitute is None else torch.as_tensor(
        sigma_one_substitute, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    sigma_d = torch.where(sigma == 1.0, sub, sigma)
    std_t = a * torch.sqrt(sigma / (1.0 - sigma_d))
    var_t = std_t * std_t
    c_x = 1.0 + var_t * dt / (2.0 * sigma)
    c_v = (1.0 + var_t * (1.0 - sigma) / (2.0 * sigma)) * dt
    std = std_t * torch.sqrt(-dt)
    return c_x, c_v, std


def sde_mean_std(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    sigma_one_substitute: Optional[Scalar] = None,
    *,
    dtype: torch.dtype = torch.float32,
):
    """SDE-step mean ``[B, ...]`` and transition std ``[B, 1, ..., 1]``, both float32, for ``x, v`` of shape ``[B, ...]``.

    With zero noise ``c_x == 1`` and ``c_v == dt`` exactly, so the mean is the Euler step ``x + v * dt`` bit for bit.
    ``dtype``: the compute dtype; keep the float32 default (float64 only for test oracles).
    """
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
    b, nd = x.shape[0], x.ndim
    s = per_sample(sigma, b, nd, x.device, dtype)
    sn = per_sample(sigma_next, b, nd, x.device, dtype)
    sub = None if sigma_one_substitute is None else per_sample(sigma_one_substitute, b, nd, x.device, dtype)
    c_x, c_v, std = sde_coefficients(s, sn, noise_level, sub)
    mean = x.to(dtype) * c_x + v.to(dtype) * c_v
    return mean, std
