"""Text GRPO loss from final hidden states (RECIPE.md section 6): reference and chunked fused kernel.

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
The loss is a scalar, so ``dL/dlogp_t = g_t`` does not depend on the incoming gradient (``_surrogate_grad`` gives it in
closed form: token level ``g_t = -w_t A_s r_t [unclipped <= clipped] [|lr_t| <= 20]``, GSPO the same with the
sequence's ratio, ``w_t = 1 / (n_s * #valid sequences)``; k3 adds ``-beta w_t (exp(d_t) - 1) [|d_t| <= 20]``).

Fused path (default, ``impl="chunked"``): gradients are computed in the FORWARD, the backward only scales them by the
incoming gradient (one elementwise pass). Per row chunk of ``R`` rows (a bounded float32 ``[R, V]`` workspace):
    1. ``logits = hidden[chunk] @ weight^T`` by cuBLAS into float32 (``out_dtype``);
    2. a row-wise Triton kernel: online log-sum-exp over V (running max from -inf) and the target logit -> ``lse``,
       ``logp`` of the chunk;
    3. the chunk's ``g_t`` (plain torch, O(R));
    4. a row-wise Triton kernel writes ``dlogits = g_t (onehot - softmax) / T`` IN PLACE over the float32 logits (as
       bf16 into the first half of each row's bytes for bf16 inputs: every row only overwrites bytes it has read);
    5. cuBLAS: ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight (+)= dlogits^T @ hidden[chunk]``
       (float32 accumulator ``[V, H]`` when there is more than one chunk).
Which rows may share a chunk: token level, any. GSPO: ``g_t`` needs the whole sequence's mean log-ratio, so a chunk
holds whole sequences, planned on the host from a host copy of ``cu_seqlens`` (``cu_seqlens`` itself when it is a CPU
tensor, or the ``cu_seqlens_host`` argument). A sequence longer than a chunk takes one extra pass: steps 1-2 over all
its sub-chunks first (``lse`` kept), then ``g``, then steps 1, 4, 5 again, last sub-chunk first (its logits are
still in the workspace: ``k - 1`` extra logits GEMMs for ``k`` sub-chunks). Without a host copy (``cu_seqlens`` on
the GPU and no ``cu_seqlens_host``) GSPO plans all rows as one such group: no host sync, but the extra logits GEMMs
whenever ``N > R``. Under torch.compile the plan is part of the graph (a list of ints): a new plan recompiles, so
leave ``cu_seqlens_host`` out there unless the batch layout is fixed.
Frozen head (``weight.requires_grad`` False, LoRA): step 5 is only the ``grad_hidden`` GEMM, so two GEMM passes. No
grad needed (``torch.is_grad_enabled()`` False, or neither input requires grad: old/reference log-probs): steps 1-2
only, one pass.
Bytes/FLOPs: ``2 N H V`` FLOPs per GEMM pass: 3 passes (trainable head), 2 (frozen), 1 (no grad), + (k - 1) / k of a
logits pass for GSPO sequences of k > 1 chunks; plus two row-wise passes over the float32 chunk (read; read + write).
Extra memory: the workspace ``R V 4`` bytes (``workspace_bytes``, default 1 GiB, or ``chunk_rows``) + a float32
``[V, H]`` gradient accumulator (trainable head, more than one chunk) + the gradients themselves, kept from forward to
backward (the eager reference materialises ~3 x 4 N V bytes: 30 GB at N = 16384, V = 152064).
Host syncs: none after validation (and one probe per device and process, at first use, of whether cuBLAS writes
float32 from 16-bit inputs). Value checks that need the device (``cu_seqlens`` monotone and ending at N, token ids < V,
``cu_seqlens_host`` equal to ``cu_seqlens``) run when the tensors are on the CPU (free) or when asked:
``validate=True`` or ``ALPHAGRPO_VALIDATE=1``.
Expected: <= 1.2x the 3-GEMM ceiling (trainable) / 2-GEMM ceiling (frozen) at N = 16384, H = 3584, V = 152064 bf16;
NOT YET MEASURED on a GPU (``bench/gpu_check.sh``; docs/kernels.md holds the targets).
Fallback: ``impl="tiled"`` (or ``ALPHAGRPO_AR_IMPL=tiled``) selects the round-one kernel (``kernels/ar_grpo_tiled.py``:
logits as Triton tiles, backward recomputes them: 4 passes). Whether it still wins anywhere awaits a GPU run; the
chunked path is the default until then.
Tested: CPU under ``TRITON_INTERPRET=1`` for float32, bfloat16, float16 against float64; CUDA variants marked ``cuda``.
Limits: ``hidden`` and ``weight`` share one dtype (cast the head: ``weight.to(hidden.dtype)``); float16 inputs keep
``dlogits`` in float32 and run the gradient GEMMs in float32 (correct, slow: bf16 is the fast dtype); no gradient to
``logp_old``, ``logp_ref``, ``advantages``; the gradients of the trainable path live from the forward to the backward.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .dispatch import HAS_TRITON, backend_for, direct_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["ar_grpo_loss", "ar_grpo_loss_ref", "DEFAULT_WORKSPACE_BYTES", "IMPL_ENV_VAR", "VALIDATE_ENV_VAR"]

LOG_RATIO_CLAMP = 20.0
DEFAULT_WORKSPACE_BYTES = 1 << 30
IMPL_ENV_VAR = "ALPHAGRPO_AR_IMPL"          # chunked (default) | tiled
VALIDATE_ENV_VAR = "ALPHAGRPO_VALIDATE"     # 1: value checks that read accelerator tensors on the host (a sync)
_LEVELS = ("sequence", "token")
_IMPLS = ("chunked", "tiled")
_METRICS = ("clip_frac", "ratio_mean", "ratio_min", "ratio_max", "kl")


def _validate_requested(validate: Optional[bool]) -> bool:
    if validate is not None:
        return bool(validate)
    return os.environ.get(VALIDATE_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def _check(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level, clip_low, clip_high, temperature,
           logp_ref, beta, validate: Optional[bool] = None) -> torch.Tensor:
    """Validation shared by both paths; returns the per-sequence lengths ``[S]`` (int64, on hidden's device).

    Shape/dtype/device checks are free. Value checks read tensors on the host: they run for CPU tensors, and for
    accelerator tensors only when ``validate`` (or ``ALPHAGRPO_VALIDATE=1``) asks, since they cost a device sync."""
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
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if not torch.compiler.is_compiling():         # value checks read the host; never inside torch.compile
        force = _validate_requested(validate)
        if force or cu_seqlens.device.type == "cpu":
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens must start at 0, end at N={n} and never decrease, got {cu[:8]}"
                                 f"{'...' if len(cu) > 8 else ''}")
        if n and (force or tokens.device.type == "cpu") and int(tokens.max()) >= v:
            raise ValueError(f"token id {int(tokens.max())} is out of range for a vocabulary of V={v}")
    if lengths.device != hidden.device:          # a host copy from pinned memory does not wait for the device
        if hidden.device.type == "cuda" and not torch.compiler.is_compiling():
            lengths = lengths.pin_memory()
        lengths = lengths.to(hidden.device, non_blocking=True)
    return lengths.to(torch.int64)


def _seg_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums ``[S]`` of ``values [N]`` (deterministic; infinities stay in their own sequence).
    ``unsafe=True``: ``lengths`` are trusted (no host-side check, so no device sync)."""
    return torch.segment_reduce(values, "sum", lengths=lengths, initial=0.0, unsafe=True)
def _extreme(x: torch.Tensor, which: str) -> torch.Tensor:
    """``x.min()`` / ``x.max()`` that also takes an empty ``x`` (no tokens or no sequences: a placeholder the caller
    replaces); the emptiness is a shape, known on the host."""
    if x.numel() == 0:
        return x.new_zeros(())
    return x.min() if which == "min" else x.max()


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
            "ratio_min": torch.where(any_live, _extreme(torch.where(live, r, float("inf")), "min"), 1.0),
            "ratio_max": torch.where(any_live, _extreme(torch.where(live, r, float("-inf")), "max"), 1.0),
            "kl": kl.detach(),
        }
    return loss, metrics


def ar_grpo_loss_ref(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, logp_old: torch.Tensor,
    advantages: torch.Tensor, cu_seqlens: torch.Tensor,
    *, level: str = "sequence", clip_low: float = 0.2, clip_high: float = 0.28, temperature: float = 1.0,
    logp_ref: Optional[torch.Tensor] = None, beta: float = 0.0, upcast: bool = True,
    validate: Optional[bool] = None,
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
        validate: run the value checks that read accelerator tensors on the host (a device sync): ``cu_seqlens``
            starts at 0, ends at N, never decreases; token ids < V. Default ``ALPHAGRPO_VALIDATE`` (off); CPU tensors
            are always checked (free).
    Returns:
        ``(loss, metrics)``: ``loss`` 0-dim with grad; ``metrics`` detached: ``logp [N]`` (0 at padding), 0-dim
        ``clip_frac``, ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over valid tokens for ``level="token"``, over
        valid sequences for ``"sequence"``; 1.0 when there are none) and ``kl`` (0 without ``logp_ref``).
    """
    lengths = _check(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level, clip_low, clip_high,
                     temperature, logp_ref, beta, validate)
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




def _surrogate_grad(logp, valid, logp_old, adv_t, w_t, level, clip_low, clip_high, logp_ref, beta,
                    seq_lengths=None, seq_adv=None, seq_inv_n=None) -> torch.Tensor:
    """``dL/dlogp`` ``[R]`` (float32) of ``_surrogate``'s loss for the rows of whole sequences, in closed form.

    ``w_t = [valid] / (n_s * #valid sequences)`` (the weight of token t in the loss's means), ``adv_t`` the advantage
    of its sequence. Token level needs only per-row inputs; GSPO (``level="sequence"``) also the rows' sequences
    (``seq_lengths``, ``seq_adv``, ``seq_inv_n``, covering the rows exactly). Ties follow autograd: ``minimum`` splits
    the gradient of equal branches and ``clamp`` passes it at its bounds, so inside the clip range it is ``A r``.
    """
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    lr = torch.where(valid, logp - logp_old.to(logp.dtype), 0.0)                         # masked before exp
    if level == "token":
        ratio = torch.exp(lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        live = (ratio * adv_t <= ratio.clamp(lo, hi) * adv_t) & (lr.abs() <= LOG_RATIO_CLAMP)
        g = torch.where(live, -adv_t * ratio, 0.0) * w_t
    else:
        mean_lr = _seg_sum(lr, seq_lengths) * seq_inv_n                                   # [S']
        ratio = torch.exp(mean_lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        live = (ratio * seq_adv <= ratio.clamp(lo, hi) * seq_adv) & (mean_lr.abs() <= LOG_RATIO_CLAMP)
        c = torch.where(live, -seq_adv * ratio, 0.0)
        g = torch.repeat_interleave(c, seq_lengths, output_size=logp.shape[0]) * w_t
    if logp_ref is not None and beta != 0.0:
        d = torch.where(valid, logp_ref.to(logp.dtype) - logp, 0.0)
        inside = d.abs() <= LOG_RATIO_CLAMP
        g = g - beta * w_t * torch.where(inside, torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1.0, 0.0)
    return g


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels: row-wise over a float32 logits chunk ``[R, V]`` (row stride ``V``), one program per row, tiles of
# BLOCK_V columns. Plain functions here; ``triton.jit`` is applied on first use (``_kernels``), so that
# ``TRITON_INTERPRET`` is read when a kernel is first needed.


def _ar_lse_rows_kernel(logits_ptr, tok_ptr, lse_ptr, logp_ptr, V, stride,
                        INV_T: tl.constexpr, BLOCK_V: tl.constexpr):
    # lse_r = logsumexp_c(logits[r, c] / T); logp_r = logits[r, tok_r] / T - lse_r (0 at padding)
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    m = tl.full([], float("-inf"), tl.float32)                         # running max starts at -inf
    s = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):                                    # every tile has >= 1 valid column
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")) * INV_T
        m_new = tl.maximum(m, tl.max(x, axis=0))                       # finite from the first tile on
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)  # masked columns: exp(-inf) = 0
        m = m_new
    lse = m + tl.log(s)
    tok = tl.load(tok_ptr + row)
    tgt = tl.load(base + tl.minimum(tl.maximum(tok, 0), V - 1)) * INV_T   # never out of the row (ids >= V: garbage)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(tok >= 0, tgt - lse, 0.0))


def _ar_dlogits_rows_kernel(logits_ptr, out_ptr, tok_ptr, lse_ptr, g_ptr, V, stride, out_stride,
                            INV_T: tl.constexpr, BLOCK_V: tl.constexpr):
    # out[r, c] = g_r / T * (1[c == tok_r] - exp(logits[r, c] / T - lse_r)), written over the row's own bytes: with a
    # 16-bit out dtype, tile j lands in bytes the program read at tiles <= j, never in bytes of later tiles. Other
    # warps of the program may still be reading tile j (or, with j = 0, the same bytes), hence the barrier between
    # each tile's loads and its stores.
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    obase = out_ptr + row.to(tl.int64) * out_stride
    tok = tl.load(tok_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.where(tok >= 0, tl.load(g_ptr + row), 0.0) * INV_T          # padding rows get exactly 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(base + cols, mask=ok, other=float("-inf")) * INV_T
        p = tl.exp(x - lse)
        dl = g * (tl.where(cols == tok, 1.0, 0.0) - p)
        tl.debug_barrier()                                             # every warp has read the tile
        tl.store(obase + cols, dl.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels, built once per mode (``interpret`` keys the cache: the flag is read by ``triton.jit``)."""
    del interpret
    return triton.jit(_ar_lse_rows_kernel), triton.jit(_ar_dlogits_rows_kernel)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers.


def _interpret() -> bool:
    from .dispatch import triton_interpret
    return triton_interpret()


def _block_v(v: int, device: torch.device) -> Tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of the row-wise kernels (the interpreter pays per element of a tile)."""
    cap = 4096 if device.type == "cuda" else 1024
    bv = min(cap, triton.next_power_of_2(max(v, 16)))
    return bv, (8 if bv >= 2048 else 4)


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
    """``out (+)= a @ b`` into a float32 ``out`` with float32 accumulation, whatever the 16-bit input dtype.

    CPU and torch without ``out_dtype`` multiply float32 copies (exact products, as cuBLAS's float32 accumulator)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    elif a.is_cuda and a.dtype == b.dtype and _out_dtype_mm_ok(a.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        prod = torch.mm(a.float(), b.float())
        out.add_(prod) if accumulate else out.copy_(prod)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """``out (+)= a @ b`` with float32 accumulation; ``out`` float32 or the inputs' dtype (rounded once)."""
    if out.dtype == torch.float32:
        _mm_f32(out, a, b, accumulate)
    elif a.is_cuda and a.dtype == b.dtype == out.dtype and not accumulate:
        torch.mm(a, b, out=out)                                        # cuBLAS accumulates in float32
    else:
        prod = torch.mm(a.float(), b.float())
        out.add_(prod) if accumulate else out.copy_(prod)


def chunk_rows_for(n: int, v: int, workspace_bytes: int, device: torch.device) -> int:
    """Rows per chunk: as many float32 ``[R, V]`` rows as ``workspace_bytes`` holds (multiples of 128 on GPU)."""
    rows = max(1, workspace_bytes // (4 * max(v, 1)))
    if device.type == "cuda" and rows >= 128:
        rows = rows // 128 * 128
    return max(1, min(rows, n))


def plan_chunks(n: int, rows: int, level: str, cu_host: Optional[Sequence[int]], n_seqs: int) -> List[int]:
    """The chunk plan as a flat list: per group ``[s0, s1, k, b_0, ..., b_k]`` (sequences ``s0:s1``, ``k`` sub-chunks
    with row boundaries ``b``). A group with ``k == 1`` is one pass; ``k > 1`` takes the extra logits pass.

    Token level: groups of ``rows`` rows (``s0 = s1 = 0``, unused). GSPO with a host copy of ``cu_seqlens``: whole
    sequences packed greedily up to ``rows`` rows; a longer sequence is a group of its own with ``k > 1``. GSPO
    without one: a single group over everything (one pass when ``N <= rows``)."""
    out: List[int] = []
    if n == 0:
        return out
    if level == "token":
        for r0 in range(0, n, rows):
            out += [0, 0, 1, r0, min(n, r0 + rows)]
        return out
    if cu_host is None:
        bounds = list(range(0, n, rows)) + [n]
        return [0, n_seqs, len(bounds) - 1] + bounds
    cu = [int(c) for c in cu_host]
    if len(cu) != n_seqs + 1 or cu[0] != 0 or cu[-1] != n or any(y < x for x, y in zip(cu, cu[1:])):
        raise ValueError(f"the host copy of cu_seqlens must have S+1={n_seqs + 1} boundaries from 0 to N={n}, never "
                         f"decreasing, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    start = 0                                        # the open group: sequences start..i-1, rows cu[start]..cu[i]
    for i in range(n_seqs):
        a, b = cu[i], cu[i + 1]
        if b - a > rows:                             # a long sequence: close the open group, then one of its own
            if a > cu[start]:
                out += [start, i, 1, cu[start], a]
            bounds = list(range(a, b, rows)) + [b]
            out += [i, i + 1, len(bounds) - 1] + bounds
            start = i + 1
        elif b - cu[start] > rows:                   # does not fit: close the open group, open a new one
            if a > cu[start]:
                out += [start, i, 1, cu[start], a]
            start = i
    if start < n_seqs and cu[n_seqs] > cu[start]:    # (trailing empty sequences have no rows: no group)
        out += [start, n_seqs, 1, cu[start], cu[n_seqs]]
    return out


def _logits_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight the logits GEMM multiplies: itself where cuBLAS writes float32 from 16-bit inputs, else a float32
    copy made once per call (CPU / torch without ``out_dtype``: the logits are never rounded to 16 bits)."""
    if weight.dtype == torch.float32 or (weight.is_cuda and _out_dtype_mm_ok(weight.device)):
        return weight
    return weight.float()


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """``out = hidden @ weight^T`` in float32 (``weight`` from ``_logits_weight``)."""
    _mm_f32(out, hidden if weight.dtype == hidden.dtype else hidden.float(), weight.t(), accumulate=False)


def _lse_rows(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, logp: torch.Tensor,
              temperature: float) -> None:
    k_lse, _ = _kernels(_interpret())
    r, v = logits.shape
    bv, warps = _block_v(v, logits.device)
    k_lse[(r,)](logits, tokens, lse, logp, v, logits.stride(0), INV_T=1.0 / temperature, BLOCK_V=bv,
                num_warps=warps)


def _dlogits_rows(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                  temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """Overwrite the float32 ``logits [R, V]`` (contiguous) with ``dlogits``; returns them as a ``[R, V]`` view of
    ``dtype`` (row stride ``2 V`` for 16-bit: the first half of each row's bytes)."""
    _, k_dl = _kernels(_interpret())
    r, v = logits.shape
    out = logits if dtype == torch.float32 else logits.view(dtype)[:, :v]
    bv, warps = _block_v(v, logits.device)
    k_dl[(r,)](logits, out, tokens, lse, g, v, logits.stride(0), out.stride(0), INV_T=1.0 / temperature, BLOCK_V=bv,
               num_warps=warps)
    return out


def _ar_logp(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float, rows: int
             ) -> torch.Tensor:
    """``logp [N]`` (float32, 0 at padding): per chunk one logits GEMM + the row-wise log-sum-exp kernel."""
    n, v = hidden.shape[0], weight.shape[0]
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return logp
    lse = torch.empty_like(logp)
    buf = torch.empty(min(rows, n) * v, dtype=torch.float32, device=hidden.device)
    w_l = _logits_weight(weight)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        logits = buf[:(r1 - r0) * v].view(r1 - r0, v)
        _logits_into(logits, hidden[r0:r1], w_l)
        _lse_rows(logits, tokens[r0:r1], lse[r0:r1], logp[r0:r1], temperature)
    return logp


def _ar_chunked(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, logp_old: torch.Tensor,
                advantages: torch.Tensor, lengths: torch.Tensor, logp_ref: Optional[torch.Tensor], plan: List[int],
                level: str, clip_low: float, clip_high: float, temperature: float, beta: float, rows: int,
                need_gh: bool, need_gw: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N], dL/dhidden [N, H] or [0], dL/dweight [V, H] or [0])`` by the plan (``plan_chunks``)."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    if n == 0 or not plan:                                   # nothing to learn from: zero gradients
        return (logp, torch.zeros((n, h) if need_gh else (0,), dtype=dt, device=dev),
                torch.zeros((v, h) if need_gw else (0,), dtype=dt, device=dev))
    gh = torch.empty((n, h) if need_gh else (0,), dtype=dt, device=dev)   # the plan covers rows 0..N: all written
    gw = torch.empty((v, h) if need_gw else (0,), dtype=dt, device=dev)
    lse = torch.empty_like(logp)
    # per-token constants of the surrogate, on the device (no sync)
    valid = tokens >= 0
    s = lengths.numel()
    seq = torch.repeat_interleave(torch.arange(s, device=dev), lengths, output_size=n)      # [N]
    n_valid = _seg_sum(valid.float(), lengths)                                             # [S]
    inv_n = 1.0 / n_valid.clamp(min=1.0)
    denom = (n_valid > 0).sum().clamp(min=1).float()
    adv = advantages.detach().float()
    w_t = torch.where(valid, inv_n[seq] / denom, 0.0)                                       # [N]
    adv_t = adv[seq]
    old = logp_old.detach().float()
    ref = logp_ref.detach().float() if logp_ref is not None else None
    gdt = torch.float32 if dt in (torch.float32, torch.float16) else dt    # dlogits dtype (fp16: float32, no underflow)
    w_g = weight if gdt == dt else weight.float()
    w_l = _logits_weight(weight)
    n_sub = 0
    i = 0
    while i < len(plan):
        n_sub += plan[i + 2]
        i += 3 + plan[i + 2] + 1
    # float32 dL/dweight accumulator over chunks; the first chunk's GEMM writes it (no memset)
    gw32 = torch.empty((v, h), dtype=torch.float32, device=dev) if need_gw and n_sub > 1 else None
    buf = torch.empty(min(rows, n) * v, dtype=torch.float32, device=dev)

    def grads(r0: int, r1: int, logits: torch.Tensor, g: torch.Tensor, first: bool) -> None:
        dl = _dlogits_rows(logits, tokens[r0:r1], lse[r0:r1], g, temperature, gdt)
        hid = hidden[r0:r1] if gdt == dt else hidden[r0:r1].float()
        if need_gh:
            _mm_into(gh[r0:r1], dl, w_g)
        if need_gw:
            if gw32 is None:
                _mm_into(gw, dl.t(), hid)
            else:
                _mm_f32(gw32, dl.t(), hid, accumulate=not first)

    def coef(r0: int, r1: int, s0: int, s1: int) -> torch.Tensor:
        return _surrogate_grad(logp[r0:r1], valid[r0:r1], old[r0:r1], adv_t[r0:r1], w_t[r0:r1], level, clip_low,
                               clip_high, None if ref is None else ref[r0:r1], beta, seq_lengths=lengths[s0:s1],
                               seq_adv=adv[s0:s1], seq_inv_n=inv_n[s0:s1])

    first = True
    i = 0
    while i < len(plan):
        s0, s1, k = plan[i], plan[i + 1], plan[i + 2]
        bounds = plan[i + 3:i + 4 + k]
        i += 4 + k
        subs = list(zip(bounds[:-1], bounds[1:]))
        for r0, r1 in subs:                                  # pass 1 (kept for the gradient when k == 1)
            logits = buf[:(r1 - r0) * v].view(r1 - r0, v)
            _logits_into(logits, hidden[r0:r1], w_l)
            _lse_rows(logits, tokens[r0:r1], lse[r0:r1], logp[r0:r1], temperature)
        if not (need_gh or need_gw):
            continue
        g = coef(bounds[0], bounds[-1], s0, s1)
        for j, (r0, r1) in enumerate(reversed(subs)):         # the last sub-chunk's logits are still in the buffer
            if j > 0:                                        # the extra pass: logits again (lse is kept)
                logits = buf[:(r1 - r0) * v].view(r1 - r0, v)
                _logits_into(logits, hidden[r0:r1], w_l)
            grads(r0, r1, logits, g[r0 - bounds[0]:r1 - bounds[0]], first)
            first = False
    if gw32 is not None:
        gw.copy_(gw32)
    return logp, gh, gw


def _register_ops():
    """``alphagrpo::ar_grpo_chunked`` / ``ar_logprob`` custom ops, so torch.compile treats them as opaque calls."""
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4
        return _ar_chunked, _ar_logp
    chunked = torch.library.custom_op("alphagrpo::ar_grpo_chunked", mutates_args=())(_ar_chunked)
    logp_op = torch.library.custom_op("alphagrpo::ar_logprob", mutates_args=())(_ar_logp)

    @chunked.register_fake
    def _(hidden, weight, tokens, logp_old, advantages, lengths, logp_ref, plan, level, clip_low, clip_high,
          temperature, beta, rows, need_gh, need_gw):
        return (hidden.new_empty((hidden.shape[0],), dtype=torch.float32),
                hidden.new_empty(hidden.shape if need_gh else (0,)),
                weight.new_empty(weight.shape if need_gw else (0,)))

    @logp_op.register_fake
    def _(hidden, weight, tokens, temperature, rows):
        return hidden.new_empty((hidden.shape[0],), dtype=torch.float32)

    return chunked, logp_op


_chunked_op, _logp_op = _register_ops()


class ChunkedGRPOFunction(torch.autograd.Function):
    """Loss and metrics in the forward, with ``dL/dhidden`` and ``dL/dweight`` computed there too (see the header);
    the backward scales them in place by the incoming gradient (so it runs once: no ``retain_graph`` double use)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, logp_old, advantages, lengths, logp_ref, plan, level, clip_low,
                clip_high, temperature, beta, rows, need_gh, need_gw):
        direct = direct_launch(hidden, weight, tokens, logp_old, advantages, lengths, logp_ref)
        fn = _ar_chunked if direct else _chunked_op
        logp, gh, gw = fn(hidden, weight, tokens, logp_old, advantages, lengths, logp_ref, plan, level, clip_low,
                          clip_high, temperature, beta, rows, need_gh, need_gw)
        loss, m = _surrogate(logp, tokens, logp_old, advantages, lengths, level, clip_low, clip_high, logp_ref, beta)
        ctx.grads = (gh, gw)          # neither inputs nor outputs: kept on ctx, scaled in place by the backward
        ctx.need = (need_gh, need_gw)
        outs = (m["logp"],) + tuple(m[k] for k in _METRICS)
        ctx.mark_non_differentiable(*outs)
        return (loss,) + outs

    @staticmethod
    def backward(ctx, gloss, *_):
        if ctx.grads is None:
            raise RuntimeError("ar_grpo_loss's fused backward runs once per forward (its gradients are computed in "
                               "the forward and scaled in place): call the loss again instead of retain_graph=True")
        (gh, gw), ctx.grads = ctx.grads, None
        need_gh, need_gw = ctx.need
        gloss = gloss.float()         # in place: no second copy of the [V, H] gradient at the peak
        return ((gh.mul_(gloss) if need_gh else None), (gw.mul_(gloss) if need_gw else None)) + (None,) * 14


def _host_cu(cu_seqlens: torch.Tensor, cu_seqlens_host) -> Optional[List[int]]:
    """A host copy of the boundaries without a device sync, or None (see ``plan_chunks``)."""
    if cu_seqlens_host is not None:
        if isinstance(cu_seqlens_host, torch.Tensor):
            if cu_seqlens_host.device.type != "cpu":
                raise ValueError("cu_seqlens_host must be on the host: a list, tuple or CPU tensor")
            if torch.compiler.is_compiling():
                return None
            return cu_seqlens_host.tolist()
        return [int(c) for c in cu_seqlens_host]
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        return cu_seqlens.tolist()
    return None


def ar_grpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, logp_old: torch.Tensor,
    advantages: torch.Tensor, cu_seqlens: torch.Tensor,
    *, level: str = "sequence", clip_low: float = 0.2, clip_high: float = 0.28, temperature: float = 1.0,
    logp_ref: Optional[torch.Tensor] = None, beta: float = 0.0, workspace_bytes: Optional[int] = None,
    chunk_rows: Optional[int] = None, cu_seqlens_host: Optional[Union[Sequence[int], torch.Tensor]] = None,
    impl: Optional[str] = None, validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Text GRPO loss: same arguments and results as :func:`ar_grpo_loss_ref`, fused where the dispatch says so.

    ``alphagrpo.kernels.dispatch`` decides (CUDA -> Triton; CPU -> reference unless ``TRITON_INTERPRET=1``;
    ``use_fused`` / ``ALPHAGRPO_KERNELS`` force either); float64 inputs always take the reference. Fused-path options:
        workspace_bytes: bound of the float32 logits chunk (default 1 GiB); ``chunk_rows`` sets its rows directly.
        cu_seqlens_host: a host copy of ``cu_seqlens`` (list, tuple or CPU tensor) for the GSPO chunk plan when
            ``cu_seqlens`` lives on the GPU; without one, GSPO with ``N > chunk rows`` recomputes the logits of all
            but one chunk (rather than syncing to read the boundaries). Must equal ``cu_seqlens`` (checked only with
            ``validate``).
        impl: ``"chunked"`` (default) or ``"tiled"`` (the round-one kernel); default ``ALPHAGRPO_AR_IMPL``.
        validate: see :func:`ar_grpo_loss_ref` (value checks with a device sync, opt-in; ``ALPHAGRPO_VALIDATE``).
    """
    lengths = _check(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level, clip_low, clip_high,
                     temperature, logp_ref, beta, validate)
    if backend_for(hidden.device) == "ref" or hidden.dtype == torch.float64:
        return ar_grpo_loss_ref(hidden, weight, tokens, logp_old, advantages, cu_seqlens, level=level,
                                clip_low=clip_low, clip_high=clip_high, temperature=temperature, logp_ref=logp_ref,
                                beta=beta, validate=False)
    impl = impl if impl is not None else (os.environ.get(IMPL_ENV_VAR, "").strip().lower() or "chunked")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {list(_IMPLS)} (or {IMPL_ENV_VAR}), got {impl!r}")
    ws = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else int(workspace_bytes)
    if ws <= 0:
        raise ValueError(f"workspace_bytes must be positive, got {workspace_bytes}")
    hidden, weight, tokens = hidden.contiguous(), weight.contiguous(), tokens.contiguous()
    if impl == "tiled":
        from .ar_grpo_tiled import LinearLogProbFunction
        logp = LinearLogProbFunction.apply(hidden, weight, tokens, float(temperature), ws)
        return _surrogate(logp, tokens, logp_old, advantages, lengths, level, clip_low, clip_high, logp_ref, beta)
    n, v = hidden.shape[0], weight.shape[0]
    if chunk_rows is not None and int(chunk_rows) <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    rows = max(1, min(int(chunk_rows), n)) if chunk_rows is not None else chunk_rows_for(n, v, ws, hidden.device)
    grad = torch.is_grad_enabled()
    need_gh, need_gw = grad and hidden.requires_grad, grad and weight.requires_grad
    if not (need_gh or need_gw):                             # old / reference log-probs: one pass, no gradient
        fn = _ar_logp if direct_launch(hidden, weight, tokens) else _logp_op
        logp = fn(hidden.detach(), weight.detach(), tokens, float(temperature), rows)
        return _surrogate(logp, tokens, logp_old, advantages, lengths, level, clip_low, clip_high, logp_ref, beta)
    cu_host = _host_cu(cu_seqlens, cu_seqlens_host) if level == "sequence" else None
    if cu_host is not None and cu_seqlens_host is not None and _validate_requested(validate) \
            and not torch.compiler.is_compiling() and cu_host != cu_seqlens.tolist():   # opt-in: a sync on GPU
        raise ValueError("cu_seqlens_host differs from cu_seqlens")
    plan = plan_chunks(n, rows, level, cu_host, advantages.shape[0])
    ref = logp_ref.detach().contiguous() if logp_ref is not None else None
    loss, logp, *stats = ChunkedGRPOFunction.apply(
        hidden, weight, tokens, logp_old.detach().contiguous(), advantages.detach().contiguous(), lengths, ref, plan,
        level, float(clip_low), float(clip_high), float(temperature), float(beta), rows, need_gh, need_gw)
    return loss, dict(logp=logp, **dict(zip(_METRICS, stats)))
