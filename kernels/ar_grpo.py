"""Text GRPO loss from final hidden states (RECIPE.md section 6): reference and fused linear-log-prob Triton kernel.

Math. ``hidden [N, H]`` predicts ``tokens [N]`` (already shifted; ``< 0`` is padding) through the LM head
``weight [V, H]``; packed sequences are delimited by ``cu_seqlens [S+1]``:

    logp_t  = log_softmax(hidden_t @ weight^T / T)[tokens_t]        (float32; 0 at padding)
    token:    r_t = exp(clamp(logp_t - logp_old_t, -20, 20)),   o_t = -min(r_t A_s, clamp(r_t, 1-cl, 1+ch) A_s)
              L = mean over valid sequences s of  mean over valid t in s of o_t
    sequence (GSPO, default):  s_i = exp(clamp(mean_t(logp_t - logp_old_t), -20, 20)),
              L = -mean over valid sequences of min(s_i A_i, clamp(s_i, 1-cl, 1+ch) A_i)
    k3 KL (optional): k_t = exp(d_t) - d_t - 1 with d_t = clamp(logp_ref_t - logp_t, -20, 20), averaged like the loss,
              times beta.
Padding is masked with ``torch.where`` BEFORE any exp or sum (``inf * 0 = NaN``). A sequence without valid tokens is
left out of the mean over sequences; with none at all the loss is a zero that still backpropagates.

Split of the work. The O(N) surrogate above is plain torch, shared by the reference and the fused path
(``_surrogate``), and autograd gives ``dL/dlogp [N]``. The O(N*V*H) part, ``logp`` and its backward, is the kernel:
    forward  (1 GEMM): tiles of ``hidden @ weight^T`` over V with an online log-sum-exp in float32 (running max starts
             at -inf; a split-V grid, partial (max, sum, target logit) per split combined in torch); saves ``lse [N]``.
             The ``[N, V]`` logits never exist.
    backward (3 GEMMs): a Triton kernel recomputes logits tile by tile and writes
             ``dlogits = g_t (onehot_t - softmax_t) / T`` into a bounded workspace (default 1 GiB, argument
             ``workspace_bytes``), block by block over (vocab slice x row chunk); cuBLAS then computes
             ``grad_hidden += dlogits @ weight[slice]`` (float32 accumulator over slices) and
             ``grad_weight[slice] = dlogits^T @ hidden`` (float32 accumulation; a float32 slice accumulator when rows
             are chunked). Gradients that are not needed (frozen LM head under LoRA) are skipped: 2 GEMMs then.
    No atomics: results are deterministic run to run for a fixed configuration.
Bytes/FLOPs: 4 GEMM-sized passes of ``2 N H V`` FLOPs (3 with a frozen head); extra memory = workspace + float32
``[N, H]`` (+ a float32 ``[slice, H]`` block when rows must be chunked) + ``12 S N`` bytes of split-V partials,
independent of ``N * V``. The eager reference materialises float32 ``[N, V]`` logits, their softmax and their gradient
(~3 x 4 N V bytes: 30 GB at N = 16384, V = 152064).
Expected: fwd+bwd about 4/3 of three plain bf16 GEMMs of the same shape if the Triton tiles run near cuBLAS speed
(target 1.35x; measured by ``bench/gpu_check.sh``, not in CI). Tile sizes: ``_tiles`` (override with
``ALPHAGRPO_AR_TILES="BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages"`` when tuning).
Tested: CPU under ``TRITON_INTERPRET=1`` for float32, bfloat16, float16; CUDA variants are marked ``cuda``.
Limits: ``hidden`` and ``weight`` share one dtype (cast the head: ``weight.to(hidden.dtype)``); float16 gradients are
computed with a global rescaling of ``dL/dlogp`` so that small ``dlogits`` do not underflow; ``cu_seqlens`` values are
read on the host (one small sync); no gradient to ``logp_old``, ``logp_ref``, ``advantages``.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import torch

from .dispatch import HAS_TRITON, backend_for, direct_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["ar_grpo_loss", "ar_grpo_loss_ref", "DEFAULT_WORKSPACE_BYTES"]

LOG_RATIO_CLAMP = 20.0
DEFAULT_WORKSPACE_BYTES = 1 << 30
_LEVELS = ("sequence", "token")


def _check(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level, clip_low, clip_high, temperature,
           logp_ref, beta) -> torch.Tensor:
    """Validation shared by both paths; returns the per-sequence lengths ``[S]`` (int64, on hidden's device)."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float [N, H] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be the LM head [V, H] with H={hidden.shape[1]}, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: pass weight.to(hidden.dtype)")
    n, v = hidden.shape[0], weight.shape[0]
    if not isinstance(tokens, torch.Tensor) or tokens.shape != (n,) or tokens.is_floating_point():
        raise ValueError(f"tokens must be an integer tensor [N]=[{n}], got {getattr(tokens, 'shape', type(tokens))}")
    for name, t in (("logp_old", logp_old), ("logp_ref", logp_ref)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (n,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor [N]=[{n}], got {getattr(t, 'shape', type(t))}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S+1] of sequence boundaries (0, ..., N)")
    s = cu_seqlens.numel() - 1
    if not isinstance(advantages, torch.Tensor) or advantages.shape != (s,) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a float tensor [S]=[{s}] (one per sequence), got "
                         f"{getattr(advantages, 'shape', type(advantages))}")
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {list(_LEVELS)}, got {level!r}")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0 and temperature > 0.0 and beta >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1, clip_high >= 0, temperature > 0, beta >= 0; got clip_low={clip_low}"
                         f", clip_high={clip_high}, temperature={temperature}, beta={beta}")
    if beta != 0.0 and logp_ref is None:
        raise ValueError(f"beta={beta} needs logp_ref (reference-policy log-probs [N]); pass it or set beta=0")
    devs = {t.device for t in (hidden, weight, tokens, logp_old, advantages) + ((logp_ref,) if logp_ref is not None
                                                                                  else ())}
    if len(devs) != 1:
        raise ValueError(f"hidden, weight, tokens, logp_old, advantages, logp_ref must share a device: {devs}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=hidden.device, dtype=torch.int64)
    if not torch.compiler.is_compiling():  # value checks read the host (one small sync); skipped inside torch.compile
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, end at N={n} and never decrease, got {cu[:8]}"
                             f"{'...' if len(cu) > 8 else ''}")
        if n and int(tokens.max()) >= v:
            raise ValueError(f"token id {int(tokens.max())} is out of range for a vocabulary of V={v}")
    return lengths


def _seg_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums ``[S]`` of ``values [N]`` (deterministic; infinities stay in their own sequence)."""
    return torch.segment_reduce(values, "sum", lengths=lengths, initial=0.0)


def _surrogate(logp, tokens, logp_old, advantages, lengths, level, clip_low, clip_high, logp_ref, beta):
    """The O(N) clipped surrogate (+ k3 KL) from per-token ``logp [N]``; shared by the reference and the fused path."""
    cdt = logp.dtype
    valid = tokens >= 0                                                                     # [N]
    n_valid = _seg_sum(valid.to(cdt), lengths)                                              # [S]
    seq_ok = n_valid > 0
    inv_n = 1.0 / n_valid.clamp(min=1.0)
    denom = seq_ok.sum().clamp(min=1).to(cdt)
    adv = advantages.detach().to(cdt)                                                       # [S]
    log_ratio = torch.where(valid, logp - logp_old.detach().to(cdt), 0.0)                  # masked before exp
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    if level == "token":
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))               # [N]
        a_t = torch.repeat_interleave(adv, lengths, output_size=logp.shape[0])
        unclipped, clipped = ratio * a_t, ratio.clamp(lo, hi) * a_t
        obj = torch.where(valid, -torch.minimum(unclipped, clipped), 0.0)
        loss = torch.where(seq_ok, _seg_sum(obj, lengths) * inv_n, 0.0).sum() / denom
        live = valid
    else:
        mean_lr = _seg_sum(log_ratio, lengths) * inv_n                                      # [S]
        ratio = torch.exp(mean_lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))                 # [S]
        unclipped, clipped = ratio * adv, ratio.clamp(lo, hi) * adv
        loss = torch.where(seq_ok, -torch.minimum(unclipped, clipped), 0.0).sum() / denom
        live = seq_ok
    if logp_ref is not None:
        d = torch.where(valid, logp_ref.detach().to(cdt) - logp, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = torch.exp(d) - d - 1.0                                                         # 0 at padding
        kl = torch.where(seq_ok, _seg_sum(k3, lengths) * inv_n, 0.0).sum() / denom
        if beta != 0.0:
            loss = loss + beta * kl
    else:
        kl = torch.zeros((), dtype=cdt, device=logp.device)
    with torch.no_grad():
        count = live.sum().clamp(min=1).to(cdt)
        any_live = live.any()
        r = ratio.detach()
        metrics = {
            "logp": torch.where(valid, logp.detach(), 0.0),
            "clip_frac": (live & (clipped < unclipped)).to(cdt).sum() / count,
            "ratio_mean": torch.where(any_live, torch.where(live, r, 0.0).sum() / count, 1.0),
            "ratio_min": torch.where(any_live, torch.where(live, r, float("inf")).min(), 1.0),
            "ratio_max": torch.where(any_live, torch.where(live, r, float("-inf")).max(), 1.0),
            "kl": kl.detach(),
        }
    return loss, metrics


def ar_grpo_loss_ref(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, logp_old: torch.Tensor,
    advantages: torch.Tensor, cu_seqlens: torch.Tensor,
    *, level: str = "sequence", clip_low: float = 0.2, clip_high: float = 0.28, temperature: float = 1.0,
    logp_ref: Optional[torch.Tensor] = None, beta: float = 0.0, upcast: bool = True,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Text GRPO loss (RECIPE.md section 6) in plain PyTorch, materialising the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states (bf16/fp16/fp32) predicting ``tokens``; receives a gradient.
        weight: ``[V, H]`` LM-head weight, hidden's dtype; receives a gradient if it requires one.
        tokens: ``[N]`` integer targets, already shifted; ``< 0`` (e.g. -100) is padding.
        logp_old: ``[N]`` float32 log-probs recorded at rollout (temperature 1, full softmax); ignored at padding.
        advantages: ``[S]`` float32, one per sequence.
        cu_seqlens: ``[S+1]`` integer boundaries of the packed sequences: 0, ..., N.
        level: ``"sequence"`` (GSPO ratio, the default) or ``"token"`` (per-token clipped surrogate).
        clip_low, clip_high: ratio clip range ``[1 - clip_low, 1 + clip_high]`` (0.2, 0.28).
        temperature: logits are divided by it before the softmax.
        logp_ref: optional ``[N]`` reference-policy log-probs for the k3 KL; beta: its weight (0 = off).
        upcast: compute the logits in float32 (default; float64 inputs stay float64). ``False`` multiplies in the input
            dtype, which is plain PyTorch's error baseline for the kernel tests.
    Returns:
        ``(loss, metrics)``: ``loss`` 0-dim with grad; ``metrics`` detached: ``logp [N]`` (0 at padding), 0-dim
        ``clip_frac``, ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over valid tokens for ``level="token"``, over
        valid sequences for ``"sequence"``; 1.0 when there are none) and ``kl`` (0 without ``logp_ref``).
    """
    lengths = _check(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level, clip_low, clip_high,
                     temperature, logp_ref, beta)
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if upcast:
        logits = hidden.to(cdt) @ weight.to(cdt).t()                                         # [N, V]
    else:
        logits = (hidden @ weight.t()).to(cdt)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    valid = tokens >= 0
    picked = logp_all.gather(1, torch.where(valid, tokens, 0).long()[:, None]).squeeze(1)   # [N]
    logp = torch.where(valid, picked, 0.0)
    return _surrogate(logp, tokens, logp_old, advantages, lengths, level, clip_low, clip_high, logp_ref, beta)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels. Plain functions here; ``triton.jit`` is applied on first use (``_kernels``) so that
# ``TRITON_INTERPRET`` is read when a kernel is first needed. Both kernels compute logit tiles
# ``hidden[rows] @ weight[cols]^T`` with float32 accumulation over H in BLOCK_K steps.


def _ar_lse_kernel(h_ptr, w_ptr, tok_ptr, m_ptr, s_ptr, t_ptr, N, V, H, cols_per_split, n_splits,
                   stride_h, stride_w,
                   INV_T: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # programs: split fastest, so the programs running together share few hidden blocks (L2 reuse)
    pid = tl.program_id(0)
    split = pid % n_splits
    rows = (pid // n_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=-1)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)                 # running max starts at -inf
    s = tl.zeros([BLOCK_N], tl.float32)
    tgt = tl.zeros([BLOCK_N], tl.float32)
    v_lo = split * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):                             # every tile has >= 1 valid column
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        w_cols = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        logits = tl.where(col_ok[None, :], acc * INV_T, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == tok[:, None], logits, 0.0), axis=1)
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, tgt, mask=row_ok)


def _ar_dlogits_kernel(h_ptr, w_ptr, tok_ptr, lse_ptr, g_ptr, scale_ptr, dl_ptr, n_rows, n_cols, H, col0,
                       stride_h, stride_w,
                       INV_T: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                       HAS_SCALE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    # dl[r, c] = g_r / T * (1[tok_r == col0 + c] - exp(logit_rc - lse_r)) for a block of n_rows x n_cols; rows and
    # weight rows are pre-offset by the launcher; the output block is contiguous with row stride n_cols.
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(n_rows, BLOCK_N)
    n_pid_v = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP * n_pid_v                                        # GROUP row blocks sweep the columns together
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_pid_n - first, GROUP)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_cols = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    g = tl.where(tok >= 0, g, 0.0) * INV_T                             # padding rows get exactly 0
    if HAS_SCALE:
        g = g / tl.load(scale_ptr)
    p = tl.exp(tl.where(col_ok[None, :], acc * INV_T - lse[:, None], float("-inf")))   # 0 past the vocabulary
    onehot = (col0 + cols)[None, :] == tok[:, None]
    dl = g[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    out = dl_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(out, dl.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels, built once per mode (``interpret`` keys the cache: the flag is read by ``triton.jit``)."""
    del interpret
    return triton.jit(_ar_lse_kernel), triton.jit(_ar_dlogits_kernel)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers.


def _tiles(device: torch.device, dtype: torch.dtype, n: int, v: int) -> Tuple[int, int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages)``: fixed per device, dtype (and, in the interpreter, size
    class), so results are deterministic."""
    env = os.environ.get("ALPHAGRPO_AR_TILES")
    if env:
        vals = tuple(int(t) for t in env.split(","))
        if len(vals) != 5:
            raise ValueError(f"ALPHAGRPO_AR_TILES={env!r}: give BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages")
        return vals  # type: ignore[return-value]
    if device.type != "cuda":            # the interpreter pays per tile: small tiles only for tiny (test) shapes
        return (16, 32, 32, 4, 1) if n * v <= 1 << 16 else (64, 128, 64, 4, 1)
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 64, 8, 3


def _dot_mode(dtype: torch.dtype) -> Dict[str, object]:
    """``tl.dot`` settings: exact fp32 products for float32 inputs; bf16 tiles go through float32 in the interpreter.

    Triton 3.x's CPU interpreter multiplies bfloat16 tiles wrongly (raw bits), so under ``TRITON_INTERPRET`` the
    tiles are upcast first: bf16 x bf16 products are exact in float32 and the GPU accumulates in float32 too, so the
    interpreted numbers are the GPU's up to summation order.
    """
    f32 = dtype == torch.float32 or (dtype == torch.bfloat16 and _interpret())
    return {"PRECISION": "ieee" if f32 else "tf32", "DOT_F32": f32 and dtype != torch.float32}


def _interpret() -> bool:
    from .dispatch import triton_interpret
    return triton_interpret()


def _ar_fwd(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], lse [N])``, float32, without materialising the logits."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if n == 0:
        e = torch.zeros(0, dtype=torch.float32, device=dev)
        return e, e.clone()
    k_lse, _ = _kernels(_interpret())
    bn, bv, bk, warps, stages = _tiles(dev, hidden.dtype, n, v)
    v_tiles = triton.cdiv(v, bv)
    row_blocks = triton.cdiv(n, bn)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        want = max(16, triton.cdiv(2 * sms, row_blocks))
    else:
        want = 2
    cols_per_split = triton.cdiv(v_tiles, min(want, v_tiles, 64)) * bv
    splits = triton.cdiv(v, cols_per_split)                          # no empty split
    part = torch.empty((3, splits, n), dtype=torch.float32, device=dev)
    k_lse[(splits * row_blocks,)](hidden, weight, tokens, part[0], part[1], part[2], n, v, h, cols_per_split, splits,
                                  hidden.stride(0), weight.stride(0),
                                  INV_T=1.0 / temperature, **_dot_mode(hidden.dtype),
                                  BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    m, s, t = part[0], part[1], part[2]
    big = m.amax(dim=0)                                               # finite: every split has a column
    lse = big + torch.log((s * torch.exp(m - big)).sum(dim=0))
    logp = torch.where(tokens >= 0, t.sum(dim=0) - lse, 0.0)
    return logp, lse


@functools.lru_cache(maxsize=None)
def _out_dtype_mm_ok(device: torch.device) -> bool:
    """Whether this torch/cuBLAS can multiply 16-bit inputs into a float32 output (``out_dtype``), checked once."""
    try:
        a = torch.randn(16, 32, device=device, dtype=torch.bfloat16)
        b = torch.randn(32, 8, device=device, dtype=torch.bfloat16)
        acc = torch.ones(16, 8, device=device, dtype=torch.float32)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        want = 1.0 + a.float() @ b.float()
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` into a float32 ``out`` with float32 accumulation, whatever the 16-bit input dtype."""
    if a.dtype == torch.float32:
        torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    elif a.is_cuda and _out_dtype_mm_ok(a.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        prod = torch.mm(a, b).float() if a.is_cuda else torch.mm(a.float(), b.float())
        out.add_(prod) if accumulate else out.copy_(prod)


def _blocking(n: int, v: int, bn: int, bv: int, elt: int, workspace_bytes: int, cuda: bool) -> Tuple[int, int]:
    """``(rows per chunk, columns per slice)`` of the dlogits workspace: all rows at once when it fits."""
    elems = max(workspace_bytes // elt, bn * bv)
    v_pad = triton.cdiv(v, bv) * bv
    min_cols = min(v_pad, bv * (32 if cuda else 1))                  # keep the cuBLAS GEMMs wide on GPU
    cols = min(v_pad, max(min_cols, (elems // max(n, 1)) // bv * bv))
    rows = min(n, max(bn, (elems // cols) // bn * bn))
    return rows, cols


def _ar_bwd(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
            lse: torch.Tensor, temperature: float, need_gh: bool, need_gw: bool, workspace_bytes: int
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_hidden [N, H] or empty, grad_weight [V, H] or empty)`` from ``dL/dlogp [N]``."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    if n == 0 or not (need_gh or need_gw):
        return (torch.zeros((n, h) if need_gh else (0,), dtype=dt, device=dev),
                torch.zeros((v, h) if need_gw else (0,), dtype=dt, device=dev))
    gh = torch.empty((n, h) if need_gh else (0,), dtype=dt, device=dev)    # every element is written below
    gw = torch.empty((v, h) if need_gw else (0,), dtype=dt, device=dev)
    _, k_dl = _kernels(_interpret())
    bn, bv, bk, warps, stages = _tiles(dev, dt, n, v)
    g = grad_logp.float().contiguous()
    scaled = dt == torch.float16                                     # keep small dlogits out of fp16 underflow
    scale = g.abs().amax().clamp(min=1e-30).reshape(1) if scaled else g[:1]
    rows, cols = _blocking(n, v, bn, bv, hidden.element_size(), workspace_bytes, dev.type == "cuda")
    ws = torch.empty(rows * cols, dtype=dt, device=dev)
    gh32 = torch.zeros((n, h), dtype=torch.float32, device=dev) if need_gh else None
    direct_gw = rows >= n and dev.type == "cuda" and not scaled      # one GEMM per slice, cuBLAS accumulates fp32
    gw32 = None if (not need_gw or direct_gw) else torch.empty((cols, h), dtype=torch.float32, device=dev)
    for c0 in range(0, v, cols):
        nc = min(cols, v - c0)
        w_slice = weight[c0:c0 + nc]
        for r0 in range(0, n, rows):
            nr = min(rows, n - r0)
            dl = ws[:nr * nc].view(nr, nc)
            grid = (triton.cdiv(nr, bn) * triton.cdiv(nc, bv),)
            k_dl[grid](hidden[r0:], w_slice, tokens[r0:], lse[r0:], g[r0:], scale, dl, nr, nc, h, c0,
                       hidden.stride(0), weight.stride(0),
                       INV_T=1.0 / temperature, **_dot_mode(dt), HAS_SCALE=scaled,
                       BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP=8, num_warps=warps, num_stages=stages)
            if need_gh:
                _mm_f32(gh32[r0:r0 + nr], dl, w_slice, accumulate=c0 > 0)
            if need_gw:
                if direct_gw:
                    torch.mm(dl.t(), hidden[r0:r0 + nr], out=gw[c0:c0 + nc])
                else:
                    _mm_f32(gw32[:nc], dl.t(), hidden[r0:r0 + nr], accumulate=r0 > 0)
        if need_gw and not direct_gw:
            blk = gw32[:nc] * scale if scaled else gw32[:nc]
            gw[c0:c0 + nc].copy_(blk)
    if need_gh:
        gh.copy_(gh32 * scale if scaled else gh32)
    return gh, gw


def _register_ops():
    """``alphagrpo::ar_logprob_fwd`` / ``ar_logprob_bwd`` custom ops, so torch.compile treats them as opaque calls."""
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4
        return _ar_fwd, _ar_bwd
    fwd = torch.library.custom_op("alphagrpo::ar_logprob_fwd", mutates_args=())(_ar_fwd)
    bwd = torch.library.custom_op("alphagrpo::ar_logprob_bwd", mutates_args=())(_ar_bwd)

    @fwd.register_fake
    def _(hidden, weight, tokens, temperature):
        n = hidden.shape[0]
        return hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.float32)

    @bwd.register_fake
    def _(grad_logp, hidden, weight, tokens, lse, temperature, need_gh, need_gw, workspace_bytes):
        return (hidden.new_empty(hidden.shape if need_gh else (0,)),
                weight.new_empty(weight.shape if need_gw else (0,)))

    return fwd, bwd


_fwd_op, _bwd_op = _register_ops()


class LinearLogProbFunction(torch.autograd.Function):
    """``logp = log_softmax(hidden @ weight^T / T)[tokens]`` (0 at padding) and its backward, fused; see the header."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, workspace_bytes):
        fwd = _ar_fwd if direct_launch(hidden, weight, tokens) else _fwd_op
        logp, lse = fwd(hidden, weight, tokens, temperature)
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.workspace_bytes = temperature, workspace_bytes
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, tokens, lse = ctx.saved_tensors
        need_gh, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        bwd = _ar_bwd if direct_launch(grad_logp, hidden, weight, tokens, lse) else _bwd_op
        gh, gw = bwd(grad_logp, hidden, weight, tokens, lse, ctx.temperature, need_gh, need_gw, ctx.workspace_bytes)
        return (gh if need_gh else None), (gw if need_gw else None), None, None, None


def ar_grpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, logp_old: torch.Tensor,
    advantages: torch.Tensor, cu_seqlens: torch.Tensor,
    *, level: str = "sequence", clip_low: float = 0.2, clip_high: float = 0.28, temperature: float = 1.0,
    logp_ref: Optional[torch.Tensor] = None, beta: float = 0.0, workspace_bytes: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Text GRPO loss: same arguments and results as :func:`ar_grpo_loss_ref`, fused where the dispatch says so.

    ``alphagrpo.kernels.dispatch`` decides (CUDA -> Triton; CPU -> reference unless ``TRITON_INTERPRET=1``;
    ``use_fused`` / ``ALPHAGRPO_KERNELS`` force either). ``workspace_bytes`` (fused path only, default 1 GiB) bounds
    the backward's dlogits buffer; float64 inputs always take the reference.
    """
    lengths = _check(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level, clip_low, clip_high,
                     temperature, logp_ref, beta)
    if backend_for(hidden.device) == "ref" or hidden.dtype == torch.float64:
        return ar_grpo_loss_ref(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level=level,
                                clip_low=clip_low, clip_high=clip_high, temperature=temperature, logp_ref=logp_ref,
                                beta=beta)
    ws = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else int(workspace_bytes)
    if ws <= 0:
        raise ValueError(f"workspace_bytes must be positive, got {workspace_bytes}")
    logp = LinearLogProbFunction.apply(hidden.contiguous(), weight.contiguous(), tokens.contiguous(),
                                       float(temperature), ws)
    return _surrogate(logp, tokens, logp_old, advantages, lengths, level, clip_low, clip_high, logp_ref, beta)
