"""Flow schedule, SDE/ODE steps, step log-probabilities and the SDE window (RECIPE.md sections 2-3).

Model-agnostic: nothing here knows about a model. The float32 step formula itself lives in
``alphagrpo.kernels.sde`` so that the sampler, the reference losses and the Triton kernels share one definition.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from alphagrpo.kernels.sde import Scalar, per_sample, sde_mean_std

__all__ = ["flow_sigmas", "sde_step", "euler_step", "sde_step_logprob", "sample_sde_window", "sample_flow",
           "StepRecord"]


def flow_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """The shifted flow-matching grid of RECIPE.md section 2: ``num_steps + 1`` float32 values from 1 down to 0.

    ``t_k = linspace(1, 0, N + 1)``; ``sigma_k = s * t_k / (1 + (s - 1) * t_k)``. Computed in float64 and cast to
    float32 once, so rollout and replay (which both call this) see identical values.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    t = torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64)
    sigmas = shift * t / (1.0 + (shift - 1.0) * t)
    return sigmas.to(torch.float32)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    sigma_one_substitute: Optional[Scalar] = None,
):
    """One SDE step (RECIPE.md section 2). Returns ``(prev, mean, std)``, all float32.

    ``x``, ``v``: ``[B, ...]`` latents and (CFG-combined) velocity, any float dtype. ``sigma``, ``sigma_next``: Python
    floats or per-sample ``[B]`` tensors. ``noise_level``: ``a`` (0.7 in the recipe; 0 gives the Euler step bit for
    bit). ``noise``: optional ``eps`` of ``x``'s shape, else drawn from ``generator``. ``sigma_one_substitute``: the
    value used in the ``1 - sigma`` denominator where ``sigma == 1`` (default: ``sigma_next``, the grid's second
    value). ``prev = mean + std * eps``: ``[B, ...]``; ``mean``: ``[B, ...]``; ``std``: ``[B, 1, ..., 1]``, the
    transition std ``std_t * sqrt(-dt)``.
    """
    mean, std = sde_mean_std(x, v, sigma, sigma_next, noise_level, sigma_one_substitute)
    if noise is None:
        # drawn where the generator lives (a CPU generator serves CUDA latents too), then moved
        gdev = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=gdev).to(mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise must have x's shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
    prev = mean + std * noise.float()
    return prev, mean, std


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar) -> torch.Tensor:
    """The deterministic ODE step ``x + v * (sigma_next - sigma)`` in float32, ``[B, ...]``."""
    b, nd = x.shape[0], x.ndim
    dt = per_sample(sigma_next, b, nd, x.device) - per_sample(sigma, b, nd, x.device)
    return x.float() + v.float() * dt


def sde_step_logprob(prev: torch.Tensor, mean: torch.Tensor, std: Union[torch.Tensor, float]) -> torch.Tensor:
    """Per-sample step log-probability ``-mean((prev - mean)^2) / (2 std^2)`` over non-batch dims, float32 ``[B]``.

    A MEAN over latent elements without the Gaussian constants (they cancel in the ratio), as in RECIPE.md
    section 2. ``std`` is the transition std from ``sde_step`` (``[B, 1, ..., 1]``, ``[B]`` or a scalar); it must be
    positive (a deterministic step has no log-probability).
    """
    if prev.shape != mean.shape:
        raise ValueError(f"prev and mean must have the same shape, got {tuple(prev.shape)} and {tuple(mean.shape)}")
    b = prev.shape[0]
    s = per_sample(std, b, 2, prev.device).reshape(b)
    if bool((s <= 0).any()):
        raise ValueError("std must be positive: a step with noise_level 0 is deterministic and has no log-prob")
    sq = (prev.float() - mean.float()).pow(2).reshape(b, -1).mean(dim=1)
    return -sq / (2.0 * s * s)


def sample_sde_window(
    num_steps: int,
    window: int,
    start_choices: Sequence[int],
    generator: Optional[torch.Generator] = None,
) -> range:
    """The stochastic, trained window of RECIPE.md section 3: ``range(start, start + window)`` of step indices.

    ``start`` is drawn uniformly from ``start_choices`` with the given (per-rank, seeded) ``generator``; never with a
    global RNG reset. RT2I: ``(16, 10, [0, 1])``; SRR: ``(40, 5, range(0, 11))``.
    """
    choices = list(start_choices)
    if not choices:
        raise ValueError("start_choices is empty: give at least one allowed window start")
    if window < 1 or window > num_steps:
        raise ValueError(f"window must be in [1, num_steps={num_steps}], got {window}")
    bad = [c for c in choices if c < 0 or c + window > num_steps]
    if bad:
        raise ValueError(f"window starts {bad} do not fit: each start + window ({window}) must be <= {num_steps}")
    k = int(torch.randint(len(choices), (1,), generator=generator).item())
    start = int(choices[k])
    return range(start, start + window)


class StepRecord:
    """What replay needs for one stochastic window step ``k``: ``x [B, ...]`` (input), ``prev [B, ...]`` (sampled
    output), ``logp [B]`` (old log-prob), and the step's ``sigma`` / ``sigma_next``."""
    __slots__ = ("k", "x", "prev", "logp", "sigma", "sigma_next")

    def __init__(self, k, x, prev, logp, sigma, sigma_next):
        self.k, self.x, self.prev, self.logp, self.sigma, self.sigma_next = k, x, prev, logp, sigma, sigma_next


@torch.no_grad()
def sample_flow(policy, cond, n: int, *, num_steps: Optional[int] = None, shift: float = 3.0,
                noise_level: float = 0.7, window: Optional[range] = None,
                generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
                sigmas: Optional[torch.Tensor] = None):
    """Run the sampler of RECIPE.md sections 2-3 through any ``Policy``: ODE steps everywhere except the SDE
    ``window`` (if any), whose steps are recorded. The grid is ``sigmas`` (float32 ``[N + 1]`` from 1 to 0, e.g. a
    policy's own) or ``flow_sigmas(num_steps, shift)``. Returns ``(x0 [n, *latent_shape], [StepRecord, ...])``."""
    if sigmas is None:
        if num_steps is None:
            raise ValueError("sample_flow needs num_steps or sigmas")
        sig = flow_sigmas(num_steps, shift)
    else:
        sig = torch.as_tensor(sigmas, dtype=torch.float32)
        if num_steps is not None and len(sig) != num_steps + 1:
            raise ValueError(f"sigmas has {len(sig)} values, num_steps={num_steps} needs {num_steps + 1}")
        num_steps = len(sig) - 1
    x = torch.randn((n,) + tuple(policy.latent_shape), generator=generator, dtype=torch.float32)
    if device is not None:
        x = x.to(device)
    records = []
    for k in range(num_steps):
        s, sn = float(sig[k]), float(sig[k + 1])
        v = policy.velocity(x, s, cond)
        if window is not None and k in window:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            prev, mean, std = sde_step(x, v, s, sn, noise_level, noise=noise)
            records.append(StepRecord(k, x, prev, sde_step_logprob(prev, mean, std), s, sn))
        else:
            prev = euler_step(x, v, s, sn)
        x = prev
    return x, records
