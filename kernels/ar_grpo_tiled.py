"""Round-one AR kernel, kept as a selectable fallback: ``ar_grpo_loss(..., impl="tiled")`` or
``ALPHAGRPO_AR_IMPL=tiled``. The default is the chunked path in ``kernels/ar_grpo.py``.

Math: ``logp = log_softmax(hidden @ weight^T / T)[tokens]`` (float32; 0 at padding) and its backward from
``dL/dlogp [N]``; the GRPO surrogate around it is ``ar_grpo._surrogate`` (plain torch autograd).
    forward  (1 GEMM): Triton tiles of ``hidden @ weight^T`` over V with an online log-sum-exp in float32 (running max
             starts at -inf; a split-V grid, partial (max, sum, target logit) per split combined in torch); saves
             ``lse [N]``. The ``[N, V]`` logits never exist.
    backward (3 GEMMs): a Triton kernel recomputes logits tile by tile and writes
             ``dlogits = g_t (onehot_t - softmax_t) / T`` into a bounded workspace (``workspace_bytes``), block by
             block over (vocab slice x row chunk); cuBLAS then computes ``grad_hidden += dlogits @ weight[slice]``
             (float32 accumulator over slices) and ``grad_weight[slice] = dlogits^T @ hidden``. 2 GEMMs with a
             frozen head. No atomics: deterministic for a fixed configuration.
Bytes/FLOPs: 4 GEMM-sized passes of ``2 N H V`` FLOPs (3 with a frozen head), two of them as Triton tiles; extra
memory = workspace + float32 ``[N, H]`` (+ a float32 ``[slice, H]`` block when rows are chunked) + ``12 S N`` bytes.
Measured (H200, bf16, ``bench/results/kernels_cuda_h200.json``): 0.53-0.60 of the 3-GEMM ceiling, 1.3-1.4x slower
than torch.compile at H=3584, at most 0.8 GiB extra. Whether it still wins anywhere against the chunked default
awaits a GPU run (``bench/gpu_check.sh`` times both); until then it stays as a fallback.
Tile sizes: ``_tiles`` (override with ``ALPHAGRPO_AR_TILES="BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages"``).
Limits: float16 gradients use a global rescaling of ``dL/dlogp`` (small dlogits would underflow).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Tuple

import torch

from .ar_grpo import _mm_f32
from .dispatch import HAS_TRITON, direct_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

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
    """``alphagrpo::ar_tiled_logprob_fwd`` / ``_bwd`` custom ops, so torch.compile treats them as opaque calls."""
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4
        return _ar_fwd, _ar_bwd
    fwd = torch.library.custom_op("alphagrpo::ar_tiled_logprob_fwd", mutates_args=())(_ar_fwd)
    bwd = torch.library.custom_op("alphagrpo::ar_tiled_logprob_bwd", mutates_args=())(_ar_bwd)

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
