"""Image GRPO loss for one SDE sampler step (RECIPE.md sections 2 and 6): reference and fused Triton kernel.

Math, per sample ``i`` of ``B``, over the ``D`` latent elements (float32 throughout, whatever the input dtype):

    mean    = c_x * x + c_v * v                                 (kernels.sde: the one SDE-step formula)
    logp_i  = -mean_d((prev - mean)^2) / (2 std^2)               (step log-prob: a MEAN over D, no constants)
    r_i     = exp(clamp(logp_i - logp_old_i, -20, 20))
    A'_i    = clamp(A_i, -adv_clip, adv_clip)                   (adv_clip = 5)
    L       = mean_i max(-A'_i r_i, -A'_i clamp(r_i, 1 - clip, 1 + clip))          (clip = 1e-5)
            + beta * mean_i mean_d((mean - mean_ref)^2) / (2 std^2)                 (optional KL, beta = 0)
    dL/dv   = c_v * dL/dmean,  dL/dx = c_x * dL/dmean,
    dL/dmean_d = g_i (prev_d - mean_d) / (D std^2) + beta (mean_d - mean_ref_d) / (B D std^2)
    g_i     = -A'_i r_i / B   where the unclipped branch is taken and the log-ratio is inside [-20, 20], else 0.

Gradients flow to ``v`` and (when it requires grad) ``x``; ``prev``, ``mean_ref``, ``logp_old`` and ``advantages`` are
data (detached in both paths). ``clip_frac`` counts samples whose clipped branch is strictly larger (zero gradient).

Bytes moved, fwd+bwd, per latent element (e = bytes of an input element; bf16 v, fp32 x and prev: 22 B):
    reference (eager): ~14 float32 passes over ``[B, D]`` (mean, diff, square, reduce, and as many in autograd)
    fused: forward reads v, x, prev (+ mean_ref) once; backward reads them again and writes dL/dv (+ dL/dx):
           2 (e_v + e_x + e_prev [+ e_ref]) + e_v [+ e_x].
Launches: two per fwd+bwd. Forward = one streaming kernel over a ``(B, D / BLOCK)`` grid writing per-block partial
sums; the last program to finish (an acq_rel atomic ticket, reset by that program) runs the finalize (logp, ratio,
surrogate, metrics, the per-sample backward coefficients) reading the partials in a fixed order, so results are
deterministic run to run. Backward = one streaming kernel. Outputs: one float32 buffer (loss, 5 stats, logp, ratio,
backward coefficients, partials); the returned metrics are views of it.
CUDA graphs: Python-number schedules are baked in as kernel scalars; pass ``sigma``/``sigma_next`` (and optionally
``noise_level``, ``sigma_one_substitute``) as device tensors and the kernels compute kernels.sde's coefficients per
sample from them at run time, so a captured graph follows in-place changes (tested under ``cuda``). The ticket is a
persistent per-device int32: calls on one stream at a time.
Expected: >= 80% of copy bandwidth at B = 32, D = 16*64*64 and 16*128*128 on H100/H200; >= 3x the eager reference.
Tested: CPU under ``TRITON_INTERPRET=1`` (float32, bfloat16, float16 inputs); CUDA variants are marked ``cuda``.
Limits: latents are flattened to ``[B, D]`` (contiguous copies if needed); D < 2^31; a noise level of 0 has no
log-probability (a clear error when sigmas/noise are Python numbers; per-sample CUDA tensors are not checked, to avoid
a host sync, and would give inf). Per-sample ``[B]`` sigmas are supported.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple, Union

import torch

from .dispatch import HAS_TRITON, backend_for, direct_launch
from .sde import sde_coefficients, sde_mean_std

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["flow_grpo_loss", "flow_grpo_loss_ref"]

Scalar = Union[float, torch.Tensor]
LOG_RATIO_CLAMP = 20.0
_STATS = ("clip_frac", "ratio_mean", "ratio_min", "ratio_max", "kl")


def _check(v, x, prev, logp_old, advantages, mean_ref, clip, adv_clip, beta) -> Tuple[int, int]:
    """Shape/dtype/device validation shared by both paths; returns ``(B, D)``."""
    for name, t in (("v", v), ("x", x), ("prev", prev)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [B, ...], got {getattr(t, 'dtype', type(t))}")
    if v.ndim < 2:
        raise ValueError(f"v must be [B, ...] with at least one latent dim, got shape {tuple(v.shape)}: add a dim")
    if x.shape != v.shape or prev.shape != v.shape:
        raise ValueError(f"v, x and prev must have one shape, got {tuple(v.shape)}, {tuple(x.shape)}, "
                         f"{tuple(prev.shape)}")
    b = v.shape[0]
    for name, t in (("logp_old", logp_old), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor) or t.shape != (b,) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape [B]=[{b}], got "
                             f"{getattr(t, 'shape', type(t))} {getattr(t, 'dtype', '')}")
    if mean_ref is not None and (not isinstance(mean_ref, torch.Tensor) or mean_ref.shape != v.shape
                                 or not mean_ref.is_floating_point()):
        raise ValueError(f"mean_ref must be a float tensor of v's shape {tuple(v.shape)}, got "
                         f"{getattr(mean_ref, 'shape', type(mean_ref))}")
    if beta != 0.0 and mean_ref is None:
        raise ValueError(f"beta={beta} needs mean_ref (the reference policy's SDE mean); pass it or set beta=0")
    if not (clip >= 0.0 and adv_clip > 0.0 and beta >= 0.0):
        raise ValueError(f"need clip >= 0, adv_clip > 0, beta >= 0; got clip={clip}, adv_clip={adv_clip}, beta={beta}")
    devs = {t.device for t in (v, x, prev, logp_old, advantages) + ((mean_ref,) if mean_ref is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    return b, v[0].numel()


def _stats_dict(logp, ratio, stats) -> Dict[str, torch.Tensor]:
    out = {"logp": logp.detach(), "ratio": ratio.detach()}
    out.update(zip(_STATS, stats.detach().unbind(0)))   # one op for the five 0-dim views
    return out


def flow_grpo_loss_ref(
    v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor,
    sigma: Scalar, sigma_next: Scalar, noise_level: Scalar,
    logp_old: torch.Tensor, advantages: torch.Tensor,
    *, clip: float = 1e-5, adv_clip: float = 5.0, mean_ref: Optional[torch.Tensor] = None, beta: float = 0.0,
    sigma_one_substitute: Optional[Scalar] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Image GRPO loss of one sampler step (RECIPE.md section 6, step log-prob of section 2), plain PyTorch.

    Args:
        v: ``[B, ...]`` the (CFG-combined) velocity at ``(x, sigma)``, any float dtype; receives the gradient.
        x: ``[B, ...]`` the latent before the step; receives a gradient if it requires one.
        prev: ``[B, ...]`` the latent the rollout's SDE step produced (data, no gradient).
        sigma, sigma_next: Python floats or ``[B]`` tensors, ``sigma_next < sigma``.
        noise_level: the SDE noise level ``a`` (> 0; 0.7 in the recipe).
        logp_old: ``[B]`` float32 step log-probs recorded at rollout.
        advantages: ``[B]`` float32 advantages (clamped to ``[-adv_clip, adv_clip]`` here).
        clip: ratio clip range (``1e-5``, tiny because logp is a mean over elements).
        adv_clip: advantage clamp (5.0).
        mean_ref: optional ``[B, ...]`` SDE mean of the reference policy for the KL term (no gradient).
        beta: KL weight (0 = off; > 0 needs ``mean_ref``).
        sigma_one_substitute: value used for ``1 - sigma`` where ``sigma == 1`` (default ``sigma_next``).
    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim float32 tensor with grad; ``metrics`` detached: ``logp`` ``[B]``,
        ``ratio`` ``[B]``, and 0-dim ``clip_frac``, ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``kl`` (0 without
        ``mean_ref``). float64 inputs compute in float64 (the test oracle); everything else in float32.
    """
    b, d = _check(v, x, prev, logp_old, advantages, mean_ref, clip, adv_clip, beta)
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    mean, std = sde_mean_std(x, v, sigma, sigma_next, noise_level, sigma_one_substitute, dtype=cdt)  # [B, D..], [B,1..]
    std = std.reshape(b)
    if not torch.compiler.is_compiling() and bool((std <= 0).any()):  # a host sync; skipped when compiled
        raise ValueError("the transition std is 0: a step with noise_level 0 (or sigma_next >= sigma) is deterministic "
                         "and has no log-prob; train only SDE-window steps with noise_level > 0")
    var2 = 2.0 * std * std                                                                   # [B]
    mean = mean.reshape(b, d)
    logp = -(prev.detach().to(cdt).reshape(b, d) - mean).pow(2).mean(dim=1) / var2           # [B]
    log_ratio = logp - logp_old.detach().to(cdt)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages.detach().to(cdt).clamp(-adv_clip, adv_clip)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    if mean_ref is not None:
        kl_i = (mean - mean_ref.detach().to(cdt).reshape(b, d)).pow(2).mean(dim=1) / var2   # [B]
        kl = kl_i.mean()
        if beta != 0.0:
            loss = loss + beta * kl
    else:
        kl = torch.zeros((), dtype=cdt, device=v.device)
    with torch.no_grad():
        stats = torch.stack([(clipped > unclipped).to(cdt).mean(), ratio.mean(), ratio.min(), ratio.max(), kl])
    return loss, _stats_dict(logp, ratio, stats)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels. Plain functions here; ``triton.jit`` is applied on first use (``_kernels``), so that
# ``TRITON_INTERPRET`` is read when a kernel is first needed rather than when ``alphagrpo`` is imported.
# Schedule: with SCHED False the coefficients are the scalars ``cx, cv, std``; with SCHED True the kernels compute
# them per sample from device tensors (sigma, sigma_next, noise level, sigma-one substitute; stride 0 for a scalar),
# so a captured CUDA graph reads the current values at every replay. ``out`` is the one float32 output buffer:
#     [0] loss, [1:6] stats (clip_frac, ratio_mean, ratio_min, ratio_max, kl), then logp [B], ratio [B],
#     gcoef [2, B] (dL/dmean = gout * (gcoef[0] (prev - mean) + gcoef[1] (mean - mean_ref))), then the partial sums
#     [2 or 1, B, C] of (prev - mean)^2 and (mean - mean_ref)^2 over C = cdiv(D, BLOCK) blocks.
# ``counter`` is a persistent int32 ticket (one per device): the last program of the forward grid to finish runs the
# finalize and resets it to 0, so the forward is one launch and needs no memset.
_HEAD = 6


def _sched_coef_impl(sig_ptr, sn_ptr, a_ptr, sub_ptr, idx, s_sig, s_sn, s_a, s_sub, HAS_SUB: tl.constexpr):
    """``(c_x, c_v, std)`` of kernels.sde for the samples ``idx`` (float32, IEEE division and square roots)."""
    s = tl.load(sig_ptr + idx * s_sig).to(tl.float32)
    sn = tl.load(sn_ptr + idx * s_sn).to(tl.float32)
    a = tl.load(a_ptr + idx * s_a).to(tl.float32)
    if HAS_SUB:
        sub = tl.load(sub_ptr + idx * s_sub).to(tl.float32)
    else:
        sub = sn
    dt = sn - s
    sd = tl.where(s == 1.0, sub, s)
    std_t = a * tl.sqrt_rn(tl.div_rn(s, 1.0 - sd))
    var_t = std_t * std_t
    c_x = 1.0 + tl.div_rn(var_t * dt, 2.0 * s)
    c_v = (1.0 + tl.div_rn(var_t * (1.0 - s), 2.0 * s)) * dt
    std = std_t * tl.sqrt_rn(-dt)
    return c_x, c_v, std


def _flow_fwd_kernel(v_ptr, x_ptr, prev_ptr, ref_ptr, logp_old_ptr, adv_ptr, out_ptr, counter_ptr,
                     sig_ptr, sn_ptr, a_ptr, sub_ptr, s_sig, s_sn, s_a, s_sub,
                     B, D, C, cx, cv, std_s, inv_b, HEAD: tl.constexpr,
                     LO: tl.constexpr, HI: tl.constexpr, ADV_CLIP: tl.constexpr, BETA: tl.constexpr,
                     CLAMP: tl.constexpr, HAS_REF: tl.constexpr, SCHED: tl.constexpr, HAS_SUB: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    part = out_ptr + HEAD + 4 * B
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = b.to(tl.int64) * D
    if SCHED:
        cx_b, cv_b, std_b = _sched_coef(sig_ptr, sn_ptr, a_ptr, sub_ptr, b, s_sig, s_sn, s_a, s_sub, HAS_SUB)
    else:
        cx_b = cx
        cv_b = cv
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(prev_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mean = x * cx_b + v * cv_b
    diff = tl.where(mask, p - mean, 0.0)
    tl.store(part + b * C + c, tl.sum(diff * diff, axis=0))
    if HAS_REF:
        r = tl.load(ref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dk = tl.where(mask, mean - r, 0.0)
        tl.store(part + (B + b) * C + c, tl.sum(dk * dk, axis=0))
    # the last program to arrive finalizes: the barrier orders every thread's stores before the (release) ticket,
    # the acquire and the barrier after it make every other program's partials visible to all threads here
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == B * C - 1:
        tl.debug_barrier()
        sur_acc = tl.zeros([BLOCK_B], tl.float32)
        kl_acc = tl.zeros([BLOCK_B], tl.float32)
        clip_acc = tl.zeros([BLOCK_B], tl.float32)
        r_acc = tl.zeros([BLOCK_B], tl.float32)
        r_min = tl.full([BLOCK_B], float("inf"), tl.float32)
        r_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            bm = rows < B
            sq = tl.zeros([BLOCK_B], tl.float32)
            sk = tl.zeros([BLOCK_B], tl.float32)
            for c0 in range(0, C, BLOCK_C):                            # fixed order: deterministic
                cols = c0 + tl.arange(0, BLOCK_C)
                m2 = bm[:, None] & (cols < C)[None, :]
                sq += tl.sum(tl.load(part + rows[:, None] * C + cols[None, :], mask=m2, other=0.0, volatile=True),
                             axis=1)
                if HAS_REF:
                    sk += tl.sum(tl.load(part + (B + rows[:, None]) * C + cols[None, :], mask=m2, other=0.0,
                                         volatile=True), axis=1)
            if SCHED:
                c_x_unused, c_v_unused, std = _sched_coef(sig_ptr, sn_ptr, a_ptr, sub_ptr, tl.where(bm, rows, 0),
                                                          s_sig, s_sn, s_a, s_sub, HAS_SUB)
                std = tl.where(bm, std, 1.0)
            else:
                std = tl.zeros([BLOCK_B], tl.float32) + std_s
            var2 = 2.0 * std * std
            logp = -(sq / D) / var2
            lr = logp - tl.load(logp_old_ptr + rows, mask=bm, other=0.0).to(tl.float32)
            ratio = tl.exp(tl.minimum(tl.maximum(lr, -CLAMP), CLAMP))
            adv = tl.load(adv_ptr + rows, mask=bm, other=0.0).to(tl.float32)
            adv = tl.minimum(tl.maximum(adv, -ADV_CLIP), ADV_CLIP)
            unclipped = -adv * ratio
            clipped = -adv * tl.minimum(tl.maximum(ratio, LO), HI)
            took_clip = clipped > unclipped
            live = (~took_clip) & (lr >= -CLAMP) & (lr <= CLAMP) & bm
            g = tl.where(live, -adv * ratio, 0.0) * inv_b                 # dL/dlogp_i (times gout later)
            inv_dvar = 1.0 / (D * (std * std))
            tl.store(out_ptr + HEAD + rows, logp, mask=bm)
            tl.store(out_ptr + HEAD + B + rows, ratio, mask=bm)
            tl.store(out_ptr + HEAD + 2 * B + rows, g * inv_dvar, mask=bm)
            tl.store(out_ptr + HEAD + 3 * B + rows, (BETA * inv_b) * inv_dvar, mask=bm)
            sur_acc += tl.where(bm, tl.maximum(unclipped, clipped), 0.0)
            kl_acc += tl.where(bm, (sk / D) / var2, 0.0)
            clip_acc += tl.where(bm & took_clip, 1.0, 0.0)
            r_acc += tl.where(bm, ratio, 0.0)
            r_min = tl.minimum(r_min, tl.where(bm, ratio, float("inf")))
            r_max = tl.maximum(r_max, tl.where(bm, ratio, float("-inf")))
        kl = tl.sum(kl_acc, axis=0) * inv_b
        loss = tl.sum(sur_acc, axis=0) * inv_b
        if BETA != 0.0:
            loss = loss + BETA * kl
        tl.store(out_ptr, loss)
        tl.store(out_ptr + 1, tl.sum(clip_acc, axis=0) * inv_b)
        tl.store(out_ptr + 2, tl.sum(r_acc, axis=0) * inv_b)
        tl.store(out_ptr + 3, tl.min(r_min, axis=0))
        tl.store(out_ptr + 4, tl.max(r_max, axis=0))
        tl.store(out_ptr + 5, kl)
        tl.atomic_xchg(counter_ptr, 0)                                 # ready for the next call (and graph replay)


def _flow_bwd_kernel(gout_ptr, v_ptr, x_ptr, prev_ptr, ref_ptr, out_ptr, gv_ptr, gx_ptr,
                     sig_ptr, sn_ptr, a_ptr, sub_ptr, s_sig, s_sn, s_a, s_sub, B, D, cx, cv, HEAD: tl.constexpr,
                     HAS_REF: tl.constexpr, SCHED: tl.constexpr, HAS_SUB: tl.constexpr, NEED_GX: tl.constexpr,
                     BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = b.to(tl.int64) * D
    if SCHED:
        cx_b, cv_b, std_b = _sched_coef(sig_ptr, sn_ptr, a_ptr, sub_ptr, b, s_sig, s_sn, s_a, s_sub, HAS_SUB)
    else:
        cx_b = cx
        cv_b = cv
    gout = tl.load(gout_ptr).to(tl.float32)
    a_b = tl.load(out_ptr + HEAD + 2 * B + b) * gout
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(prev_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mean = x * cx_b + v * cv_b
    gm = a_b * (p - mean)
    if HAS_REF:
        k_b = tl.load(out_ptr + HEAD + 3 * B + b) * gout
        r = tl.load(ref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        gm += k_b * (mean - r)
    tl.store(gv_ptr + base + offs, (gm * cv_b).to(gv_ptr.dtype.element_ty), mask=mask)
    if NEED_GX:
        tl.store(gx_ptr + base + offs, (gm * cx_b).to(gx_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels, built once per mode (``interpret`` keys the cache: the flag is read by ``triton.jit``)."""
    del interpret
    globals()["_sched_coef"] = triton.jit(_sched_coef_impl)          # the kernels' helper, resolved by name
    return triton.jit(_flow_fwd_kernel), triton.jit(_flow_bwd_kernel)


def _block(d: int, device: torch.device) -> int:
    cap = 4096 if device.type == "cuda" else 1024   # the interpreter pays per element of a block, not per program
    return min(cap, triton.next_power_of_2(max(d, 16)))


_COUNTERS: Dict[torch.device, torch.Tensor] = {}


def _counter(device: torch.device) -> torch.Tensor:
    """The persistent forward ticket of ``device`` (zero between calls; calls on one stream at a time)."""
    t = _COUNTERS.get(device)
    if t is None:
        t = _COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, wrapped as torch custom ops so that torch.compile treats them as opaque calls with known output shapes.
# ``sched``: empty (scalar coefficients ``cx, cv, std``) or 4 float32 device tensors (sigma, sigma_next, noise
# level, substitute or an empty tensor), each 0-dim or ``[B]``.


def _sched_args(sched: List[torch.Tensor], dummy: torch.Tensor):
    if not sched:
        return (dummy,) * 4 + (0,) * 4, False
    stride = lambda t: 0 if t.ndim == 0 else 1  # noqa: E731
    sub = sched[3]
    has_sub = sub.numel() > 0
    return (sched[0], sched[1], sched[2], sub if has_sub else dummy,
            stride(sched[0]), stride(sched[1]), stride(sched[2]), stride(sub) if has_sub else 0), has_sub


def _out_len(b: int, c: int, has_ref: bool) -> int:
    return _HEAD + 4 * b + (2 if has_ref else 1) * b * c


def _flow_fwd(v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              sched: List[torch.Tensor], cx: float, cv: float, std: float, mean_ref: Optional[torch.Tensor],
              clip: float, adv_clip: float, beta: float) -> torch.Tensor:
    from .dispatch import triton_interpret
    b, d = v.shape
    dev = v.device
    k_fwd, _ = _kernels(triton_interpret())
    block = _block(d, dev)
    c = triton.cdiv(d, block)
    has_ref = mean_ref is not None
    out = torch.empty(_out_len(b, c, has_ref), dtype=torch.float32, device=dev)
    sargs, has_sub = _sched_args(sched, out)
    k_fwd[(b, c)](v, x, prev, mean_ref if has_ref else v, logp_old, advantages, out, _counter(dev), *sargs,
                  b, d, c, cx, cv, std, 1.0 / b, HEAD=_HEAD,
                  LO=1.0 - clip, HI=1.0 + clip, ADV_CLIP=float(adv_clip), BETA=float(beta), CLAMP=LOG_RATIO_CLAMP,
                  HAS_REF=has_ref, SCHED=bool(sched), HAS_SUB=has_sub, BLOCK=block,
                  BLOCK_B=min(256, triton.next_power_of_2(b)), BLOCK_C=min(64, triton.next_power_of_2(c)),
                  num_warps=8 if block >= 4096 else 4)
    return out


def _flow_bwd(gout: torch.Tensor, v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor,
              mean_ref: Optional[torch.Tensor], sched: List[torch.Tensor], out: torch.Tensor,
              cx: float, cv: float, need_gx: bool, gx_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    from .dispatch import triton_interpret
    b, d = v.shape
    _, k_bwd = _kernels(triton_interpret())
    block = _block(d, v.device)
    gv = torch.empty_like(v)
    gx = torch.empty(v.shape if need_gx else (0,), dtype=gx_dtype, device=v.device)
    sargs, has_sub = _sched_args(sched, out)
    k_bwd[(b, triton.cdiv(d, block))](gout.reshape(()).contiguous(), v, x, prev,
                                      mean_ref if mean_ref is not None else v, out, gv, gx if need_gx else gv,
                                      *sargs, b, d, cx, cv, HEAD=_HEAD,
                                      HAS_REF=mean_ref is not None, SCHED=bool(sched), HAS_SUB=has_sub,
                                      NEED_GX=need_gx, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return gv, gx


def _register_ops():
    """``alphagrpo::flow_grpo_fwd`` / ``flow_grpo_bwd`` custom ops (the launchers if this torch lacks custom_op)."""
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4
        return _flow_fwd, _flow_bwd
    fwd = torch.library.custom_op("alphagrpo::flow_grpo_fwd", mutates_args=())(_flow_fwd)
    bwd = torch.library.custom_op("alphagrpo::flow_grpo_bwd", mutates_args=())(_flow_bwd)

    @fwd.register_fake
    def _(v, x, prev, logp_old, advantages, sched, cx, cv, std, mean_ref, clip, adv_clip, beta):
        b, d = v.shape
        c = triton.cdiv(d, _block(d, v.device))
        return v.new_empty((_out_len(b, c, mean_ref is not None),), dtype=torch.float32)

    @bwd.register_fake
    def _(gout, v, x, prev, mean_ref, sched, out, cx, cv, need_gx, gx_dtype):
        return torch.empty_like(v), v.new_empty(v.shape if need_gx else (0,), dtype=gx_dtype)

    return fwd, bwd


_fwd_op, _bwd_op = _register_ops()


class FlowGRPOFunction(torch.autograd.Function):
    """Fused forward (loss + metrics, one launch) and backward (dL/dv, dL/dx, one launch) over ``[B, D]`` inputs.
    Returns the loss and the rest of the one output buffer (see the kernels' layout)."""

    @staticmethod
    def forward(ctx, v, x, prev, logp_old, advantages, sched, cx, cv, std, mean_ref, clip, adv_clip, beta, need_gx):
        tensors = (v, x, prev, logp_old, advantages, mean_ref) + tuple(sched or ())
        fwd = _flow_fwd if direct_launch(*tensors) else _fwd_op
        out = fwd(v, x, prev, logp_old, advantages, sched, cx, cv, std, mean_ref, clip, adv_clip, beta)
        ctx.save_for_backward(v, x, prev, mean_ref if beta != 0.0 else None, out)  # KL grad only if beta
        ctx.sched, ctx.cx, ctx.cv, ctx.need_gx, ctx.gx_dtype = sched, cx, cv, need_gx, x.dtype
        rest = out[1:]
        ctx.mark_non_differentiable(rest)
        return out[0], rest

    @staticmethod
    def backward(ctx, gloss, *_):
        v, x, prev, mean_ref, out = ctx.saved_tensors
        gloss = gloss.float()
        tensors = (gloss, v, x, prev, mean_ref, out) + tuple(ctx.sched or ())
        bwd = _flow_bwd if direct_launch(*tensors) else _bwd_op
        gv, gx = bwd(gloss, v, x, prev, mean_ref, ctx.sched, out, ctx.cx, ctx.cv, ctx.need_gx, ctx.gx_dtype)
        return (gv, gx if ctx.need_gx else None) + (None,) * 12


@functools.lru_cache(maxsize=1024)
def _scalar_coefficients(sigma: float, sigma_next: float, noise_level: float, sub: Optional[float]):
    """float32 ``(c_x, c_v, std)`` of kernels.sde for Python-number sigmas, as Python floats (cached: host time)."""
    f = functools.partial(torch.tensor, dtype=torch.float32)
    c_x, c_v, std = sde_coefficients(f([sigma]), f([sigma_next]), noise_level, None if sub is None else f([sub]))
    return float(c_x), float(c_v), float(std)


def _coefficients(sigma, sigma_next, noise_level, sub, b: int, device: torch.device):
    """``(sched, cx, cv, std)``: Python-number schedules give the cached float32 scalars (``sched`` empty); otherwise
    ``sched`` is 4 float32 device tensors (sigma, sigma_next, noise level, substitute or empty), 0-dim or ``[B]``,
    read by the kernels at run time (so a captured CUDA graph follows in-place changes to them)."""
    scalar = all(isinstance(s, (int, float)) for s in (sigma, sigma_next, noise_level)) and \
        (sub is None or isinstance(sub, (int, float)))
    if scalar:
        fn = _scalar_coefficients.__wrapped__ if torch.compiler.is_compiling() else _scalar_coefficients
        c_x, c_v, std = fn(float(sigma), float(sigma_next), float(noise_level), None if sub is None else float(sub))
        if not std > 0.0:
            raise ValueError(f"the transition std is {std} (sigma={sigma}, sigma_next={sigma_next}, "
                             f"noise_level={noise_level}): a deterministic step has no log-prob; use noise_level > 0 "
                             "and sigma_next < sigma")
        return [], c_x, c_v, std

    def on_device(name, s):
        if not isinstance(s, torch.Tensor):           # a fill, not a host-to-device copy (capturable)
            return torch.full((), float(s), dtype=torch.float32, device=device)
        t = s.detach().to(device=device, dtype=torch.float32)
        if t.numel() == 1:
            return t.reshape(())
        if t.numel() != b:
            raise ValueError(f"{name} must be a scalar or a [B]=[{b}] tensor, got shape {tuple(s.shape)}")
        return t.reshape(b).contiguous()

    sched = [on_device("sigma", sigma), on_device("sigma_next", sigma_next), on_device("noise_level", noise_level),
             on_device("sigma_one_substitute", sub) if sub is not None
             else torch.empty(0, dtype=torch.float32, device=device)]
    if device.type == "cpu":                           # free to check on the host; on a GPU it would cost a sync
        _, _, std = sde_coefficients(sched[0].expand(b), sched[1].expand(b), sched[2],
                                     sched[3] if sub is not None else None)
        if bool((std <= 0).any()):
            raise ValueError("the transition std is 0 for some samples: a deterministic step has no log-prob")
    return sched, 0.0, 0.0, 0.0


def flow_grpo_loss(
    v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor,
    sigma: Scalar, sigma_next: Scalar, noise_level: Scalar,
    logp_old: torch.Tensor, advantages: torch.Tensor,
    *, clip: float = 1e-5, adv_clip: float = 5.0, mean_ref: Optional[torch.Tensor] = None, beta: float = 0.0,
    sigma_one_substitute: Optional[Scalar] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Image GRPO loss of one sampler step: same arguments and results as :func:`flow_grpo_loss_ref`.

    Runs the fused Triton kernel or the reference as ``alphagrpo.kernels.dispatch`` decides (CUDA -> Triton; CPU ->
    reference unless ``TRITON_INTERPRET=1``; ``use_fused`` / ``ALPHAGRPO_KERNELS`` force either). ``v`` may be
    ``[B, C, H, W]``, ``[B, L, D]`` or any ``[B, ...]``: it is flattened to ``[B, D]``.
    """
    b, d = _check(v, x, prev, logp_old, advantages, mean_ref, clip, adv_clip, beta)
    if backend_for(v.device) == "ref" or v.dtype == torch.float64:
        return flow_grpo_loss_ref(v, x, prev, sigma, sigma_next, noise_level, logp_old, advantages, clip=clip,
                                  adv_clip=adv_clip, mean_ref=mean_ref, beta=beta,
                                  sigma_one_substitute=sigma_one_substitute)
    sched, cx, cv, std = _coefficients(sigma, sigma_next, noise_level, sigma_one_substitute, b, v.device)
    flat = lambda t: t.detach().reshape(b, d).contiguous()  # noqa: E731 - prev/mean_ref are data
    v2 = v.reshape(b, d).contiguous()
    x2 = x.reshape(b, d).contiguous()
    ref2 = flat(mean_ref) if mean_ref is not None else None
    loss, rest = FlowGRPOFunction.apply(
        v2, x2, flat(prev), logp_old.detach().float().contiguous(), advantages.detach().float().contiguous(),
        sched, cx, cv, std, ref2, float(clip), float(adv_clip), float(beta), x.requires_grad)
    n_stats = len(_STATS)                              # views of the one output buffer: no copies
    return loss, _stats_dict(rest[n_stats:n_stats + b], rest[n_stats + b:n_stats + 2 * b], rest[:n_stats])
