"""TinyUMM: a toy unified multimodal model in BAGEL's shape, small enough to pretrain and RL-train on a CPU.

One transformer, two experts per layer (mixture-of-transformers, as BAGEL): the *understanding* expert processes
text tokens and clean input-image patches (causal over text, bidirectional inside an image block) and carries an
LM head; the *generation* expert processes noisy image patches, attends to the understanding expert's keys and
values of the context and to the other image patches (bidirectional), and predicts the flow-matching velocity in
pixel space (patch size 4 at 32x32: 64 image tokens). Noise level enters through adaLN modulation.

Context = ``<bos> prompt [<img> image </img> instruction] <think> think <eot>``. The context's keys and values are
computed once per sample and reused by every sampler step and every CFG branch (image tokens never feed back into
text). Not done here on purpose: rotary embeddings, LoRA, a VAE (pixels are small enough).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyUMMConfig:
    """Model shape. ``vocab_size`` comes from the tokenizer; ``max_positions`` bounds context length."""
    vocab_size: int
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    max_positions: int = 256
    image_size: int = 32
    channels: int = 3
    patch: int = 4
    # image-patch positions: "sincos2d" adds DiT's fixed 2-D sine-cosine table under the learned one (row and
    # column are explicit from step 0); "learned" is the learned table alone (checkpoints written before the field)
    patch_pos: str = "sincos2d"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.image_size % self.patch:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch ({self.patch})")
        if self.patch_pos not in ("sincos2d", "learned"):
            raise ValueError(f"patch_pos must be 'sincos2d' or 'learned', got {self.patch_pos!r}")
        if self.vocab_size < 8:
            raise ValueError(f"vocab_size must be at least 8 (special tokens + words), got {self.vocab_size}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels

    def to_dict(self) -> dict:
        return asdict(self)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(t: torch.Tensor, p: int, c: int, size: int) -> torch.Tensor:
    """``[B, N, p*p*C]`` -> ``[B, C, size, size]``."""
    b, n = t.shape[:2]
    g = size // p
    return t.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, size, size)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table ``[grid*grid, dim]`` in patchify order (row-major): the first half of
    the channels encodes the row, the second half the column, each as sin/cos over ``dim/4`` frequencies."""
    if dim % 4:
        raise ValueError(f"dim ({dim}) must be divisible by 4 for 2-D sine-cosine positions")
    q = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(q, dtype=torch.float32) / q))
    pos = torch.arange(grid, dtype=torch.float32)
    one = torch.outer(pos, freqs)                                   # [grid, q]
    emb1 = torch.cat([one.sin(), one.cos()], dim=-1)                # [grid, dim/2]
    rows = emb1[:, None, :].expand(grid, grid, -1)
    cols = emb1[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``sigma * 1000``: ``[B]`` -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Expert(nn.Module):
    """One expert's weights for one layer: pre-norm attention projections and an MLP."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ln_w1, self.ln_w2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))


class Layer(nn.Module):
    """One MoT layer: understanding and generation experts sharing one attention."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.n_heads = n_heads
        self.und = Expert(dim, mlp_ratio)
        self.gen = Expert(dim, mlp_ratio)
        self.gen_mod = nn.Linear(dim, 6 * dim)  # adaLN: shift/scale/gate for attention and MLP
        nn.init.zeros_(self.gen_mod.weight)
        nn.init.zeros_(self.gen_mod.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, h, L, D/h]
        b, l, d = t.shape
        return t.reshape(b, l, self.n_heads, d // self.n_heads).transpose(1, 2)

    def und_forward(self, h, mask, past: Optional[tuple] = None):
        """Understanding expert over ``h [B, L, D]``; ``mask [B, 1, L, L_past + L]`` (True = attend).
        Returns ``(h, (k, v))`` with the keys/values of past and new tokens ``[B, h, L_past + L, D/h]``."""
        e = self.und
        q, k, v = e.qkv(e.norm1(h) * e.ln_w1).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + e.proj(a.transpose(1, 2).reshape(h.shape))
        h = h + e.mlp(e.norm2(h) * e.ln_w2)
        return h, (k, v)

    def gen_forward(self, h, temb, ctx_kv, ctx_mask):
        """Generation expert over noisy image tokens ``h [B, P, D]`` attending to the context ``ctx_kv``
        (``[B, h, Lc, D/h]`` each, key mask ``ctx_mask [B, Lc]``) and to all image tokens."""
        e = self.gen
        sh1, sc1, g1, sh2, sc2, g2 = self.gen_mod(temb)[:, None].chunk(6, dim=-1)
        q, k, v = e.qkv(e.norm1(h) * e.ln_w1 * (1 + sc1) + sh1).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        k = torch.cat([ctx_kv[0], k], dim=2)
        v = torch.cat([ctx_kv[1], v], dim=2)
        b, p = h.shape[:2]
        mask = torch.cat([ctx_mask, ctx_mask.new_ones(b, p)], dim=1)[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + g1 * e.proj(a.transpose(1, 2).reshape(h.shape))
        h = h + g2 * e.mlp(e.norm2(h) * e.ln_w2 * (1 + sc2) + sh2)
        return h


class TinyUMM(nn.Module):
    """The network. ``context(...)`` runs the understanding expert; ``velocity(...)`` the generation expert."""

    def __init__(self, cfg: TinyUMMConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_positions, d)
        self.img_in = nn.Linear(cfg.patch_dim, d)         # clean input image patches (understanding)
        self.img_in_pos = nn.Parameter(torch.zeros(cfg.n_patches, d))
        self.x_in = nn.Linear(cfg.patch_dim, d)           # noisy latent patches (generation)
        self.x_pos = nn.Parameter(torch.zeros(cfg.n_patches, d))
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.layers = nn.ModuleList(Layer(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.out_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.out_mod = nn.Linear(d, 2 * d)
        self.v_head = nn.Linear(d, cfg.patch_dim)
        self.apply(self._init)
        for m in (self.out_mod, self.v_head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        for lay in self.layers:
            nn.init.zeros_(lay.gen_mod.weight)
            nn.init.zeros_(lay.gen_mod.bias)
        nn.init.normal_(self.img_in_pos, std=0.02)
        nn.init.normal_(self.x_pos, std=0.02)
        fixed = (sincos_2d(cfg.image_size // cfg.patch, d) if cfg.patch_pos == "sincos2d"
                 else torch.zeros(cfg.n_patches, d))
        self.register_buffer("patch_pos_fixed", fixed, persistent=False)  # derived from the config, not saved

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ---------------------------------------------------------------- understanding
    def embed_context(self, tokens: torch.Tensor, images: Optional[torch.Tensor], img_slot: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, L, D]``. ``tokens [B, L]``; where ``img_slot [B, L] >= 0`` the position holds patch
        ``img_slot`` of ``images [B, C, S, S]`` (float in [-1, 1]) instead of a word."""
        h = self.tok_emb(tokens.clamp_min(0)) + self.pos_emb(positions)
        if images is not None and bool((img_slot >= 0).any()):
            patches = patchify(images.float(), self.cfg.patch)                    # [B, P, pd]
            emb = self.img_in(patches) + self.img_in_pos + self.patch_pos_fixed                         # [B, P, D]
            idx = img_slot.clamp_min(0)
            picked = torch.gather(emb, 1, idx[..., None].expand(-1, -1, emb.shape[-1]))
            h = torch.where((img_slot >= 0)[..., None], picked, h)
        return h

    def context(self, h: torch.Tensor, mask: torch.Tensor, past=None):
        """Run all layers' understanding experts. Returns ``(hidden [B, L, D] after the final norm, kv list)``."""
        kvs = []
        for i, lay in enumerate(self.layers):
            h, kv = lay.und_forward(h, mask, None if past is None else past[i])
            kvs.append(kv)
        return self.norm_f(h), kvs

    # ---------------------------------------------------------------- generation
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, ctx_kv, ctx_mask: torch.Tensor) -> torch.Tensor:
        """Velocity ``[B, C, S, S]`` for noisy images ``x [B, C, S, S]`` at ``sigma [B]``, given per-layer context
        keys/values (``[B, h, Lc, D/h]``) and the context key mask ``[B, Lc]``."""
        c = self.cfg
        temb = self.t_mlp(timestep_embedding(sigma, c.dim))
        h = self.x_in(patchify(x.float(), c.patch)) + self.x_pos + self.patch_pos_fixed
        for lay, kv in zip(self.layers, ctx_kv):
            h = lay.gen_forward(h, temb, kv, ctx_mask)
        shift, scale = self.out_mod(temb)[:, None].chunk(2, dim=-1)
        out = self.v_head(self.out_norm(h) * (1 + scale) + shift)
        return unpatchify(out, c.patch, c.channels, c.image_size)

    def und_parameters(self):
        """Parameters of the understanding path (embeddings, understanding experts, LM head)."""
        gen = set(map(id, self.gen_parameters()))
        return [p for p in self.parameters() if id(p) not in gen]

    def gen_parameters(self):
        """Parameters of the generation path (noisy-patch input, generation experts, velocity head)."""
        ps = list(self.x_in.parameters()) + [self.x_pos] + list(self.t_mlp.parameters())
        for lay in self.layers:
            ps += list(lay.gen.parameters()) + list(lay.gen_mod.parameters())
        ps += list(self.out_mod.parameters()) + list(self.v_head.parameters())
        return ps
