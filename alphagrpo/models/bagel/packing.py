"""BAGEL's packed-context layout, as the official inferencer builds it (our own glue; semantics only).

A context is a list of segments, each one forward through the decoder appended to a per-sequence KV cache:
- text: ``<|im_start|> ids <|im_end|>`` through the understanding expert, causal, one RoPE position per token (no
  role tags: BAGEL's format);
- an input image, twice: VAE tokens ``<|vision_start|> h*w latents <|vision_end|>`` through the generation expert
  (at t = 0), then ViT tokens ``<|vision_start|> patches <|vision_end|>`` through the understanding expert; each
  block is non-causal and takes ONE RoPE position.
The image to generate is the query ``<|vision_start|> h*w latents <|vision_end|>`` (one position, non-causal) over
the finished context. Latent tokens are ``p x p`` patches of the autoencoder latent, ``(p, q, c)`` ordered inside a
token, tokens row-major; grid position ids are ``row * max_side + col`` (the extrapolating layout).

Image sizing follows the official transforms' rule (longest side <= max, shortest >= min, both multiples of the
stride, bicubic): VAE stride 16, max ``max_latent_size * 16`` (1024), min the generation resolution; ViT stride = the
patch (14), max ``patch * vit_max_num_patch_per_side`` (980), min ``16 * patch`` (224). A 512 px image is 1024 VAE
tokens and (518 px) 1369 ViT tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class Seq:
    """One sequence's KV cache: per decoder layer ``k``/``v`` ``[length, Hkv, D]``; ``rope``: the next position."""
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    length: int = 0
    rope: int = 0


@dataclass
class Segment:
    """``kind``: ``"text"`` (``ids``), ``"vae"`` / ``"vit"`` (``image``: uint8 ``[H, W, 3]``; ``key`` dedupes)."""
    kind: str
    ids: tuple = ()
    image: Optional[np.ndarray] = None

    def key(self):
        return (self.kind, self.ids) if self.kind == "text" else (self.kind, id(self.image))


def fit_size(w: int, h: int, max_size: int, min_size: int, stride: int, max_pixels: int = 14 * 14 * 9 * 1024):
    """``(new_w, new_h)`` by the official resize rule (module docstring)."""
    def div(v):
        return max(stride, int(round(v / stride) * stride))

    def apply(w_, h_, s):
        return div(round(w_ * s)), div(round(h_ * s))
    s = max(min(max_size / max(w, h), 1.0), min_size / min(w, h))
    nw, nh = apply(w, h, s)
    if nw * nh > max_pixels:
        nw, nh = apply(nw, nh, max_pixels / (nw * nh))
    if max(nw, nh) > max_size:
        nw, nh = apply(nw, nh, max_size / max(nw, nh))
    return nw, nh


def resize(image: np.ndarray, size) -> np.ndarray:
    """uint8 ``[H, W, 3]`` resized (PIL bicubic, as the official transforms) to ``size = (w, h)``; unchanged when it
    already has that size."""
    from PIL import Image
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [H, W, 3], got {a.dtype} {a.shape}")
    if (a.shape[1], a.shape[0]) == tuple(size):
        return a
    return np.asarray(Image.fromarray(a).resize(tuple(size), Image.BICUBIC))


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[(H/p)*(W/p), p*p*C]``, tokens row-major, ``(p, q, c)`` inside a token."""
    c, h, w = x.shape
    return torch.einsum("chpwq->hwpqc", x.reshape(c, h // p, p, w // p, p)).reshape(-1, p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, c: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``patchify`` for a batch: ``[B, rows*cols, p*p*c]`` -> ``[B, c, rows*p, cols*p]``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, rows, cols, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, rows * p, cols * p)


def grid_ids(rows: int, cols: int, max_side: int) -> torch.Tensor:
    """Flattened grid position ids ``row * max_side + col``, ``[rows * cols]``."""
    return (torch.arange(rows)[:, None] * max_side + torch.arange(cols)[None, :]).flatten()


def packed_indexes(kv_lens, q_lens):
    """Indexes into the merged (cache + query) sequence: each sequence is its cached rows then its query rows.
    Returns ``(kv_index, q_index)``, LongTensors."""
    kv_idx, q_idx, cur = [], [], 0
    for kv, q in zip(kv_lens, q_lens):
        kv_idx.append(torch.arange(cur, cur + kv))
        cur += kv
        q_idx.append(torch.arange(cur, cur + q))
        cur += q
    return torch.cat(kv_idx).long(), torch.cat(q_idx).long()
