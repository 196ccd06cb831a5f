"""Packed variable-length attention for BAGEL's modules: flash-attn's varlen kernel or PyTorch SDPA, chosen here.

nemo's Qwen2 and SigLIP layers call ``_flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, causal)`` (``_nemo.require`` points that name at ``varlen_attention``). Shapes: ``q [Nq, H, D]``,
``k, v [Nk, Hkv, D]`` (grouped-query attention: query head ``h`` reads kv head ``h // (H / Hkv)``), sequences
delimited by ``cu_seqlens_* [S + 1]``; returns ``[Nq, H, D]`` in ``q``'s dtype.

Semantics are flash-attn's: with ``causal`` the mask is aligned to the bottom right, i.e. query ``i`` of a sequence
with ``Lq`` queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq`` (a text segment appended to a KV cache sees the
whole cache and its own past); without it every query sees every key of its sequence.

Implementations (``set_attention``; ``model.attention``):
- ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (CUDA, needs flash-attn).
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` once per sequence. Per-sequence calls make a
  sample's result independent of the other sequences packed with it (no padding enters any reduction), which is what
  the parity tests rely on; the loop costs one kernel launch per sequence.
- ``"auto"`` (default): flash on CUDA tensors when flash-attn imports, SDPA otherwise.
Chose not to: pad sequences into one batched SDPA call (padding changes reduction lengths, so a sample's output would
depend on its batch), or accept sliding windows / dropout / a custom scale (BAGEL uses none).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "sdpa", "flash")
_choice = "auto"


def set_attention(impl: str) -> None:
    """Select the implementation for every BAGEL attention call in this process (``model.attention``)."""
    global _choice
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention for BAGEL must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "flash" and _flash() is None:
        raise ImportError("model.attention=flash needs flash-attn (pip install flash-attn); use sdpa or auto")
    _choice = impl


@functools.lru_cache(maxsize=1)
def _flash():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **_unused):
    """Attention over packed sequences (module docstring). Extra flash-attn keywords are ignored."""
    use_flash = _choice == "flash" or (_choice == "auto" and q.is_cuda and _flash() is not None)
    if use_flash:
        return _flash()(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
                        max_seqlen_k=int(max_seqlen_k), causal=causal)
    return sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal)


def sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False) -> torch.Tensor:
    """SDPA per sequence with flash-attn's bottom-right causal alignment; ``[Nq, H, D]``."""
    h, hkv = q.shape[1], k.shape[1]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if lq == 0:
            continue
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)                                   # (H, Lq, D)
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(h // hkv, 0)   # (H, Lk, D)
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(h // hkv, 0)
        mask = None
        if causal:   # an explicit mask even for one query: decoding and replay then take the same SDPA kernel
            rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
            mask = rows >= torch.arange(lk, device=q.device)[None, :]            # (Lq, Lk), bottom-right aligned
        outs.append(F.scaled_dot_product_attention(qi[None], ki[None], vi[None], attn_mask=mask)[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0)
