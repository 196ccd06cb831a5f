"""``BagelPolicy``: BAGEL-7B-MoT (nemo-automodel's modules) behind the ``Policy`` protocol.

Contexts (``packing``) are built without grad, once per distinct context (the G samples of a prompt share theirs),
as per-sequence KV caches; every later forward packs the sequences it needs into one call of the decoder
(``_forward``). CFG branches are the official inferencer's: text-to-image = full ``[system, prompt, think]`` and
no-text ``[system]``; refinement = full ``[system, image, instruction, think]``, no-text ``[system, image]`` and
no-image ``[system, instruction]``. The think text enters the full branch only; the system prompt (BAGEL's
planning prompt) is present whenever think text is (``think=None``: BAGEL's plain text-to-image, no system prompt).
A refinement's text is its instruction (SRR's reflection instruction names the prompt); the prompt stands in when
there is none.

- ``sample_think``: KV-cache decoding from ``<|im_start|>``, all samples batched, each stopping at its own
  ``<|im_end|>`` (finished sequences leave the batch; the official decoder stops on sample 0's only). Old log-probs
  at temperature 1 from the full softmax over the sampled ids: no decode/re-encode round trip.
- ``think_replay``: one causal pass with grad of ``[<|im_start|>, y_0 .. y_{T-2}]`` over the detached context;
  returns the final hidden states and the LM-head weight (``TextReplay``) for the fused AR loss.
- ``velocity``: every active branch in ONE packed forward; combined in float32: ``v = v_u + s_t (v_c - v_u)`` with
  the global renorm per sample ``v *= min(1, |v_c| / (|v| + 1e-8))`` for text-to-image; for refinement the text step
  renormed per token (``text_channel``) then ``v = v_ni + s_i (v - v_ni)``. Guidance only for sigma in
  ``(cfg.low, cfg.high]`` (both scales, as the official sampler); outside it the full branch alone runs. The time
  embedder takes sigma in [0, 1]. Latents are tokens ``[B, (res/16)^2, 4 * z]`` (1024 x 64 at 512 px).
- ``encode`` / ``decode``: the autoencoder in float32; encode returns the posterior mean (the official encoder
  samples from an unseeded global RNG; noise here only comes from the trainer's generators).

Precision: nemo's inference layers cast to bfloat16 internally (attention inputs, the generation expert), so the
model runs in bfloat16 weights (``model.dtype=bfloat16``); LoRA adapters are float32. Step convention: the official
``generate_image(num_timesteps=N)`` takes N-1 steps on ``linspace(1, 0, N)``, which is our ``flow_sigmas(N - 1)``:
the authors' "16 steps" and "40 steps" are ``num_steps=15`` and ``39`` here (docs/bagel.md).

Chose not to: share a common prefix (the system prompt) between different contexts (only whole contexts are shared);
keep finished think samples in the decoding batch; use the official sampler's TaylorSeer feature cache (it would
make replay differ from rollout); combine CFG in bfloat16 as the official code does.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alphagrpo.models.bagel import packing as P
from alphagrpo.models.bagel._nemo import require, require_peft
from alphagrpo.models.policy import CFGConfig, PolicyBase, TextReplay, ThinkSample

log = logging.getLogger(__name__)

FORMAT = "alphagrpo.bagel/v1"
META = "alphagrpo_bagel.json"
# BAGEL's planning system prompt (the official inferencer's, for generation with think text)
SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then generate the image. \n"
                 "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
                 "</think> image here")
# every attention and MLP projection of both experts (names in BagelForUnifiedMultimodal's tree)
LORA_TARGETS = (r"model\.language_model\.model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj(?:_moe_gen)?"
                r"|mlp(?:_moe_gen)?\.(?:gate|up|down)_proj)")
WRAPPED = "_checkpoint_wrapped_module."
ROOT_CALL = "alphagrpo_call"    # the root module's entry point for everything outside the decoder layers (FSDP2)


def _root_call(module, fn):
    """Installed on the BAGEL root as ``alphagrpo_call``: runs ``fn()``. Registered as an FSDP2 forward method, it
    makes FSDP gather the root's parameters (embeddings, heads, ViT, final norms) around every such computation."""
    return fn()


@dataclass
class Condition:
    """Detached contexts of every CFG branch, branch-major (sequence ``b * n + i`` is branch ``b``, sample ``i``).
    ``packed``: the caches of all branches concatenated per layer (built on first use, reused by every step; a
    leading run of branches is a slice of it)."""
    seqs: list
    branches: tuple
    n: int
    cfg: CFGConfig
    refine: bool
    packed: Optional[tuple] = None

    def cache_for(self, use: Sequence[str]) -> Optional[tuple]:
        """Per-layer ``(keys, values)`` of the branches ``use``, or None when they are not a leading run."""
        if tuple(use) != self.branches[:len(use)]:
            return None
        if self.packed is None:
            self.packed = _pack(self.seqs)
        if self.packed is False:
            return None
        rows = sum(s.length for s in self.seqs[:len(use) * self.n])
        ks, vs = self.packed
        return [k[:rows] for k in ks], [v[:rows] for v in vs]


def _pack(seqs):
    full = [s for s in seqs if s.length]       # an empty context (no-text branch, no system prompt) adds no rows
    if not full:
        return False
    n_layers = len(full[0].k)
    ks = [torch.cat([s.k[i] for s in full]) if len(full) > 1 else full[0].k[i] for i in range(n_layers)]
    vs = [torch.cat([s.v[i] for s in full]) if len(full) > 1 else full[0].v[i] for i in range(n_layers)]
    return ks, vs


class BagelPolicy(PolicyBase):
    """``Policy`` for BAGEL (module docstring). Build with ``load_bagel`` (``model.kind=bagel``)."""

    has_think = True

    def __init__(self, bagel, vae, tokenizer, special: dict, *, resolution: int = 512, source: Optional[str] = None,
                 gradient_checkpointing: bool = False):
        self.bagel, self.vae, self.tok, self.special = bagel, vae, tokenizer, dict(special)
        self.m = bagel.model
        self.lm = self.m.language_model
        self.source = source
        self.lora: Optional[dict] = None
        self.resolution = int(resolution)
        ld = self.m.latent_downsample
        if self.resolution % ld:
            raise ValueError(f"resolution must be a multiple of {ld} for this BAGEL, got {self.resolution}")
        self.side = self.resolution // ld
        if self.side > self.m.max_latent_size:
            raise ValueError(f"resolution {self.resolution} exceeds this BAGEL's latent grid "
                             f"({self.m.max_latent_size * ld} px at most)")
        self.latent_shape = (self.side * self.side, self.m.patch_latent_dim)
        self._system = tuple(self.tok.encode(SYSTEM_PROMPT, add_special_tokens=False))
        self._ckpt = False
        setattr(bagel, ROOT_CALL, types.MethodType(_root_call, bagel))
        for mod in (self.m.vit_model, self.m.connector, self.m.vit_pos_embed, self.m.latent_pos_embed, self.vae):
            mod.requires_grad_(False)            # context-only modules never train
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype

    def modules_for_lora(self):
        return self.bagel

    def trainable_parameters(self):
        return [p for p in self.bagel.parameters() if p.requires_grad]

    def shard_modules(self) -> list:
        """FSDP2 units: the decoder layers (entered through their ``forward``), then the root, which holds every
        trainable parameter and is entered through ``alphagrpo_call`` (``shard_forward_methods``). The autoencoder
        stays outside (frozen, replicated)."""
        return list(self.lm.model.layers) + [self.bagel]

    def shard_forward_methods(self, module) -> tuple:
        """The methods this adapter calls on a shard unit instead of ``forward``: the root's ``alphagrpo_call``."""
        return (ROOT_CALL,) if module is self.bagel else ()

    def _root(self, fn):
        """Run ``fn()`` through the root's entry point (a plain call unless FSDP2 wraps it)."""
        return getattr(self.bagel, ROOT_CALL)(fn)

    def _layers(self):
        return self.lm.model.layers

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Wrap (or unwrap) every decoder layer in a non-reentrant activation checkpoint."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
        layers = self._layers()
        for i, layer in enumerate(layers):
            wrapped = hasattr(layer, "_checkpoint_wrapped_module")
            if on and not wrapped:
                layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            elif not on and wrapped:
                layers[i] = layer._checkpoint_wrapped_module
        self._ckpt = bool(on)
        self.bagel.eval()

    # ------------------------------------------------------------------ the one decoder call
    def _forward(self, seqs: Sequence[P.Seq], embeds, q_lens, positions, *, mode: str, causal: bool,
                 update: bool, vae_index=None, text_index=None, packed=None):
        """Run ``embeds [Nq, H]`` (the queries of ``seqs``, packed in order) through the decoder over their caches
        (``packed``: their caches already concatenated per layer). With ``update`` each ``Seq`` gets its queries
        appended to its cache. Returns the final hidden ``[Nq, H]``."""
        ns = require()
        dev = self.device
        n_layers = len(self._layers())
        cache = ns.NaiveCache(n_layers)
        kv_lens = [s.length for s in seqs]
        if any(kv_lens):
            ks, vs = packed if packed is not None else _pack(seqs)
            for layer in range(n_layers):
                cache.key_cache[layer], cache.value_cache[layer] = ks[layer], vs[layer]
        kv_idx, q_idx = P.packed_indexes(kv_lens, q_lens)
        extra = {}
        if mode == "gen":
            extra = dict(packed_vae_token_indexes=vae_index.to(dev), packed_text_indexes=text_index.to(dev))
        def run():
            out = self.lm.forward_inference(
                packed_query_sequence=embeds, query_lens=torch.tensor(q_lens, dtype=torch.int, device=dev),
                packed_query_position_ids=positions.to(dev), packed_query_indexes=q_idx.to(dev),
                past_key_values=cache, key_values_lens=torch.tensor(kv_lens, dtype=torch.int, device=dev),
                packed_key_value_indexes=kv_idx.to(dev), update_past_key_values=update, is_causal=causal, mode=mode,
                **extra)
            return out.packed_query_sequence, out.past_key_values
        hidden, cache = self._root(run)
        if update:
            sizes = [kv + q for kv, q in zip(kv_lens, q_lens)]
            for layer in range(n_layers):
                ks = cache.key_cache[layer].split(sizes)
                vs = cache.value_cache[layer].split(sizes)
                for s, k, v in zip(seqs, ks, vs):
                    if len(s.k) < n_layers:
                        s.k.append(k)
                        s.v.append(v)
                    else:
                        s.k[layer], s.v[layer] = k, v
            for s, q in zip(seqs, q_lens):
                s.length += q
        return hidden

    def _embed_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self._root(lambda: self.lm.model.embed_tokens(ids))

    def _latent_embed(self, tokens: torch.Tensor, t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Latent tokens ``[N, d]`` (a whole number of ``rows x cols`` grids) at times ``t [N]`` (sigma in [0, 1],
        BAGEL's timestep embedding) -> ``[N, H]``."""
        from nemo_automodel.components.models.bagel.embeddings import _timestep_features
        pos = P.grid_ids(rows, cols, self.m.max_latent_size).to(self.device).repeat(tokens.shape[0] // (rows * cols))
        te, dt = self.m.time_embedder, self.dtype

        def run():
            temb = te.mlp(_timestep_features(t.float(), te.frequency_embedding_size).to(dt))
            return self.m.vae2llm(tokens.to(dt)) + temb + self.m.latent_pos_embed(pos)
        return self._root(run)

    # ------------------------------------------------------------------ contexts
    def _text(self, text: str) -> tuple:
        return tuple(self.tok.encode(text, add_special_tokens=False))

    def _segments(self, req, think, form: str, think_mode: bool) -> list:
        segs = [P.Segment("text", self._system)] if think_mode else []
        if req.image is None:
            if form == "full":
                segs.append(P.Segment("text", self._text(req.prompt)))
        else:
            if form in ("full", "no_text"):
                segs += [P.Segment("vae", image=req.image), P.Segment("vit", image=req.image)]
            if form in ("full", "no_image"):
                segs.append(P.Segment("text", self._text(req.instruction or req.prompt)))
        if form == "full" and think is not None:
            ids = [int(i) for i in think]
            if ids and ids[-1] == self.special["eos"]:
                ids = ids[:-1]                   # the segment closes with <|im_end|> either way
            segs.append(P.Segment("text", tuple(ids)))
        return segs

    @torch.no_grad()
    def _contexts(self, specs: Sequence[list]) -> list:
        """Build the KV cache of every context (lists of segments), each distinct context once, segment by segment
        with one decoder call per segment kind and round. Returns one ``Seq`` per spec (shared when equal)."""
        keys = [tuple(s.key() for s in spec) for spec in specs]
        uniq = {}
        for k, spec in zip(keys, specs):
            uniq.setdefault(k, spec)
        ukeys = list(uniq)
        seqs = {k: P.Seq() for k in ukeys}
        images = {}
        r = 0
        while True:
            groups = {}
            for k in ukeys:
                if r < len(uniq[k]):
                    groups.setdefault(uniq[k][r].kind, []).append(k)
            if not groups:
                break
            for kind, ks in groups.items():
                self._extend(kind, [seqs[k] for k in ks], [uniq[k][r] for k in ks], images)
            r += 1
        return [seqs[k] for k in keys]

    def _extend(self, kind: str, seqs, segs, images: dict) -> None:
        sp, dev = self.special, self.device
        if kind == "text":
            ids = [[sp["bos"], *s.ids, sp["eos"]] for s in segs]
            pos = torch.cat([torch.arange(s.rope, s.rope + len(i)) for s, i in zip(seqs, ids)])
            self._forward(seqs, self._embed_ids([t for i in ids for t in i]), [len(i) for i in ids], pos,
                          mode="und", causal=True, update=True)
            for s, i in zip(seqs, ids):
                s.rope += len(i)
            return
        parts, q_lens, text_idx, img_idx, cur = [], [], [], [], 0
        grids = []
        for s in segs:
            key = (kind, id(s.image))
            if key not in images:
                images[key] = self._vae_tokens(s.image) if kind == "vae" else self._vit_tokens(s.image)
            tokens, rows, cols = images[key]
            n = tokens.shape[0]
            text_idx += [cur, cur + n + 1]
            img_idx.append(torch.arange(cur + 1, cur + n + 1))
            cur += n + 2
            q_lens.append(n + 2)
            parts.append(tokens)
            grids.append((rows, cols))
        img_idx = torch.cat(img_idx).to(dev)
        text_idx = torch.tensor(text_idx, device=dev)
        embeds = torch.zeros(cur, self.m.config.text_config.hidden_size, dtype=self.dtype, device=dev)
        embeds[text_idx] = self._embed_ids([sp["soi"], sp["eoi"]] * len(segs))
        if kind == "vae":
            lat = torch.cat([self._latent_embed(t, torch.zeros(t.shape[0], device=dev), r, c)
                             for t, (r, c) in zip(parts, grids)])
            embeds[img_idx] = lat
        else:
            embeds[img_idx] = self._vit_embed(parts, grids)
        pos = torch.cat([torch.full((q,), s.rope) for s, q in zip(seqs, q_lens)])
        self._forward(seqs, embeds, q_lens, pos, mode="gen" if kind == "vae" else "und", causal=False, update=True,
                      vae_index=img_idx, text_index=text_idx)
        for s in seqs:
            s.rope += 1

    def _vae_image(self, image) -> np.ndarray:
        """The input image resized by the official VAE rule (the ViT then starts from this one, as officially)."""
        ld = self.m.latent_downsample
        size = P.fit_size(image.shape[1], image.shape[0], self.m.max_latent_size * ld, self.resolution, ld)
        return P.resize(image, size)

    def _vae_tokens(self, image):
        """uint8 image -> (latent tokens ``[h*w, d]`` float32, h, w)."""
        a = self._vae_image(image)
        z = self._encode_pixels(P.to_pixels(a)[None].to(self.device))[0]
        ld = self.m.latent_downsample
        return P.patchify(z, self.m.latent_patch_size), a.shape[0] // ld, a.shape[1] // ld

    def _vit_tokens(self, image):
        """uint8 image -> (ViT patches ``[h*w, 3 p p]`` float32, h, w), resized by the official ViT rule."""
        c = self.m.config
        p, side = c.vit_patch_size, c.vit_max_num_patch_per_side
        a = self._vae_image(image)
        a = P.resize(a, P.fit_size(a.shape[1], a.shape[0], p * side, min(16 * p, p * side), p))
        return P.patchify(P.to_pixels(a).to(self.device), p), a.shape[0] // p, a.shape[1] // p

    def _vit_embed(self, parts, grids) -> torch.Tensor:
        side = self.m.config.vit_max_num_patch_per_side
        pos = torch.cat([P.grid_ids(r, c, side) for r, c in grids]).to(self.device)
        lens = torch.tensor([t.shape[0] for t in parts], device=self.device)
        cu = F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
        px, mx = torch.cat(parts).to(self.dtype), int(lens.max())

        def run():
            h = self.m.vit_model(packed_pixel_values=px, packed_flattened_position_ids=pos, cu_seqlens=cu,
                                 max_seqlen=mx)
            return self.m.connector(h) + self.m.vit_pos_embed(pos)
        return self._root(run)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def sample_think(self, requests, *, generator, max_new_tokens: int = 256, temperature: float = 1.0) -> ThinkSample:
        """Think text per request (module docstring); ``temperature`` 0 decodes greedily."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ctx = self._contexts([self._segments(r, None, "full", True) for r in requests])
        seqs = [P.Seq(list(c.k), list(c.v), c.length, c.rope) for c in ctx]   # private copies: caches grow
        B, eos = len(requests), self.special["eos"]
        toks = [[] for _ in range(B)]
        lps = [[] for _ in range(B)]
        active = list(range(B))
        cur = torch.full((B,), self.special["bos"], dtype=torch.long)
        head = self._root(lambda: self.lm.lm_head.weight.float().t())   # float32 logits, as the AR loss computes
        for _ in range(max_new_tokens):
            run = [seqs[i] for i in active]
            pos = torch.tensor([s.rope for s in run])
            h = self._forward(run, self._embed_ids(cur[active]), [1] * len(run), pos, mode="und", causal=True,
                              update=True)
            for s in run:
                s.rope += 1
            logits = h.float() @ head
            logp = F.log_softmax(logits, dim=-1)
            if temperature == 0:
                nxt = logits.argmax(-1).cpu()
            else:
                probs = F.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            chosen = logp.gather(1, nxt.to(logp.device)[:, None]).squeeze(1).cpu()
            still = []
            for j, i in enumerate(active):
                toks[i].append(int(nxt[j]))
                lps[i].append(float(chosen[j]))
                cur[i] = nxt[j]
                if int(nxt[j]) != eos:
                    still.append(i)
                else:
                    seqs[i] = None            # its cache would pin this step's packed tensors until the end
            active = still
            if not active:
                break
        tokens = [torch.tensor(t, dtype=torch.long) for t in toks]
        logps = [torch.tensor(lp, dtype=torch.float32) for lp in lps]
        texts = [self.tok.decode([i for i in t if i != eos]) for t in toks]
        return ThinkSample(tokens=tokens, logp=logps, texts=texts)

    def encode_think(self, texts: Sequence[str]) -> list:
        """Think texts -> token tensors as ``sample_think`` returns them (ending with ``<|im_end|>``)."""
        return [torch.tensor(list(self._text(t)) + [self.special["eos"]]) for t in texts]

    def think_replay(self, requests, think) -> TextReplay:
        """Hidden states ``[N, H]`` predicting the think tokens (grad on), packed, with the LM-head weight."""
        if any(len(t) == 0 for t in think):
            raise ValueError("think_replay needs at least one token per sample")
        ctx = self._contexts([self._segments(r, None, "full", True) for r in requests])
        ids, pos = [], []
        for c, t in zip(ctx, think):
            seq = [self.special["bos"]] + [int(i) for i in t[:-1]]
            ids += seq
            pos.append(torch.arange(c.rope, c.rope + len(seq)))
        lens = [len(t) for t in think]
        h = self._forward(ctx, self._embed_ids(ids), lens, torch.cat(pos), mode="und", causal=True, update=False)
        host = torch.tensor([0] + lens, dtype=torch.long).cumsum(0)
        targets = torch.cat([torch.as_tensor(t, dtype=torch.long) for t in think]).to(self.device)
        return TextReplay(hidden=h, weight=self._root(lambda: self.lm.lm_head.weight), targets=targets,
                          cu_seqlens=host.to(self.device), cu_seqlens_host=host.tolist())

    # ------------------------------------------------------------------ image
    @staticmethod
    def branches(refine: bool, cfg: CFGConfig) -> tuple:
        """The CFG branches built for a request kind (a scale of 1 drops its branch)."""
        out = ("full",)
        if cfg.text_scale != 1.0:
            out += ("no_text",)
        if refine and cfg.image_scale != 1.0:
            out += ("no_image",)
        return out

    def image_condition(self, requests, think, cfg: CFGConfig) -> Condition:
        """Detached contexts of every CFG branch (rollout and replay both build them here)."""
        refine = [r.image is not None for r in requests]
        if any(refine) and not all(refine):
            raise ValueError("a batch must be all text-to-image or all refinement requests")
        refine = bool(refine[0]) if requests else False
        br = self.branches(refine, cfg)
        think_mode = think is not None
        specs = [self._segments(r, None if think is None else think[i], b, think_mode)
                 for b in br for i, r in enumerate(requests)]
        return Condition(seqs=self._contexts(specs), branches=br, n=len(requests), cfg=cfg, refine=refine)

    def velocity(self, x: torch.Tensor, sigma, cond: Condition) -> torch.Tensor:
        """CFG-combined velocity ``[B, T, d]`` float32 at noise level ``sigma`` (float or ``[B]``)."""
        sig = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(cond.n).cpu()
        guided = (sig > cond.cfg.low) & (sig <= cond.cfg.high)
        use = tuple(cond.branches) if len(cond.branches) > 1 and bool(guided.any()) else ("full",)
        v = self.branch_velocities(x, sig, cond, use)
        return combine_cfg(v, use, cond.cfg, cond.refine, guided.to(v.device))

    def branch_velocities(self, x: torch.Tensor, sigma, cond: Condition, use: Sequence[str]) -> torch.Tensor:
        """The raw velocities ``[k, B, T, d]`` (float32) of branches ``use``, all in one packed decoder call."""
        n, dev, k = cond.n, self.device, len(use)
        sig = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(n)
        seqs = [cond.seqs[cond.branches.index(b) * n + i] for b in use for i in range(n)]
        T = x.shape[1]
        q = T + 2                                                   # <|vision_start|> latents <|vision_end|>
        text_idx = torch.stack([torch.arange(k * n) * q, torch.arange(k * n) * q + q - 1], 1).flatten().to(dev)
        img_idx = (torch.arange(k * n)[:, None] * q + 1 + torch.arange(T)[None]).flatten().to(dev)
        t_tok = sig.to(dev).repeat(k).repeat_interleave(T)
        lat = self._latent_embed(x.to(dev).reshape(n * T, -1).repeat(k, 1), t_tok, self.side, self.side)
        embeds = torch.zeros(k * n * q, lat.shape[1], dtype=lat.dtype, device=dev)
        embeds = embeds.index_put((img_idx,), lat)
        embeds = embeds.index_put((text_idx,), self._embed_ids([self.special["soi"], self.special["eoi"]] * (k * n)))
        pos = torch.tensor([s.rope for s in seqs]).repeat_interleave(q)
        h = self._forward(seqs, embeds, [q] * (k * n), pos, mode="gen", causal=False, update=False,
                          vae_index=img_idx, text_index=text_idx, packed=cond.cache_for(use))
        return self._root(lambda: self.m.llm2vae(h[img_idx])).float().reshape(k, n, T, -1)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.float())

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> latent tokens ``[B, T, d]`` (float32), resized (bicubic) to the policy's
        square resolution first."""
        a = np.asarray(images)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"encode expects uint8 images [B, H, W, 3], got {a.dtype} {a.shape}")
        px = torch.stack([P.to_pixels(P.resize(im, (self.resolution, self.resolution))) for im in a]).to(self.device)
        z = self._encode_pixels(px)
        return torch.stack([P.patchify(zi, self.m.latent_patch_size) for zi in z])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latent tokens ``[B, T, d]`` -> uint8 ``[B, H, W, 3]`` (the official mapping: truncating ``* 255``)."""
        z = P.unpatchify(latents.float().to(self.device), self.m.latent_patch_size, self.m.latent_channel,
                         self.side, self.side)
        img = self.vae.decode(z)
        img = ((img * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------ LoRA
    def _lora_layers(self) -> dict:
        from peft.tuners.tuners_utils import BaseTunerLayer
        return {n.replace(WRAPPED, ""): m for n, m in self.bagel.named_modules() if isinstance(m, BaseTunerLayer)}

    def enable_lora(self, rank: int, alpha: float, targets: Sequence[str] = (), seed: int = 0) -> None:
        """Freeze the model and add float32 LoRA adapters through peft (default: every attention and MLP projection
        of both experts; ``targets``: fnmatch patterns over module names). Checkpoint wrappers go on after."""
        import fnmatch
        peft = require_peft()
        if self.lora:
            raise ValueError("this policy already has LoRA adapters; merge_lora() them first or keep training them")
        ckpt = self._ckpt
        self.set_gradient_checkpointing(False)          # names without wrapper fragments; wrappers go on after
        linear = [n for n, m in self.bagel.named_modules() if isinstance(m, torch.nn.Linear)]
        if targets:
            names = [n for n in linear if any(fnmatch.fnmatchcase(n, t) for t in targets)]
        else:
            names = [n for n in linear if re.fullmatch(LORA_TARGETS, n)]
        if not names:
            self.set_gradient_checkpointing(ckpt)
            raise ValueError(f"LoRA targets {list(targets) or 'default'} match no linear layer of BAGEL; layers are "
                             f"named like {linear[:3]}")
        self.bagel.requires_grad_(False)
        devs = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devs):
            torch.manual_seed(seed)
            peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                         target_modules=names), self.bagel)
        for n, p in self.bagel.named_parameters():
            if ".lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)
        self.lora = {"rank": int(rank), "alpha": float(alpha), "targets": list(targets), "seed": int(seed)}
        self.set_gradient_checkpointing(ckpt)

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights; the language model and generation heads train again."""
        ckpt = self._ckpt
        self.set_gradient_checkpointing(False)
        for name, layer in self._lora_layers().items():
            layer.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(self.bagel.get_submodule(parent), leaf, layer.get_base_layer())
        self.lora = None
        self.bagel.requires_grad_(True)
        for mod in (self.m.vit_model, self.m.connector, self.m.vit_pos_embed, self.m.latent_pos_embed):
            mod.requires_grad_(False)
        self.set_gradient_checkpointing(ckpt)

    def reference(self):
        """Adapters off while inside (the KL reference of a LoRA run)."""
        if not self.lora:
            return super().reference()   # raises: no adapters
        return _adapters_off(list(self._lora_layers().values()))

    def adapter_state_dict(self) -> dict:
        """Adapter weights under peft's saved names, wrapper fragments stripped."""
        out = {}
        for name, m in self._lora_layers().items():
            for ab in ("lora_A", "lora_B"):
                out[f"base_model.model.{name}.{ab}.weight"] = getattr(m, ab)["default"].weight.detach().contiguous()
        return out

    def load_adapter_state_dict(self, state: dict) -> None:
        mine = self.adapter_state_dict()
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or unexpected:
            raise ValueError(f"adapter weights do not match the policy's adapters: missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}")
        with torch.no_grad():
            for name, m in self._lora_layers().items():
                for ab in ("lora_A", "lora_B"):
                    getattr(m, ab)["default"].weight.copy_(state[f"base_model.model.{name}.{ab}.weight"])

    def save_pretrained(self, path) -> None:
        """LoRA on: peft's adapter files plus ``alphagrpo_bagel.json`` pointing at the base folder (no base weights).
        Full weights: a BAGEL folder (``ema.safetensors`` beside copies of the base folder's other files)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.source is None:
            raise ValueError("this policy was not loaded from a folder; there is no base to point at")
        base = str(Path(self.source).resolve())
        meta = {"format": FORMAT, "base": base, "resolution": self.resolution, "lora": self.lora}
        if self.lora:
            save_file(self.adapter_state_dict(), str(path / "adapter_model.safetensors"))
            cfg = {"peft_type": "LORA", "task_type": None, "r": self.lora["rank"], "lora_alpha": self.lora["alpha"],
                   "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(self._lora_layers()),
                   "base_model_name_or_path": base, "init_lora_weights": True, "use_rslora": False}
            (path / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
            (path / META).write_text(json.dumps(meta, indent=1))
            return
        for f in Path(self.source).iterdir():
            if f.is_file() and f.name not in ("ema.safetensors", META):
                shutil.copy2(f, path / f.name)
        state = {k.replace(WRAPPED, "").removeprefix("model."): v.detach().contiguous()
                 for k, v in self.bagel.state_dict().items()}
        save_file(state, str(path / "ema.safetensors"))
        (path / "generation.json").write_text(json.dumps({"resolution": self.resolution}))


@contextlib.contextmanager
def _adapters_off(layers):
    before = [bool(m.disable_adapters) for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.enable_adapters(not b)


def combine_cfg(v: torch.Tensor, use: Sequence[str], cfg: CFGConfig, refine: bool,
                guided: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BAGEL's CFG on branch velocities ``v [k, B, T, d]`` (float32) in branch order ``use``; ``guided [B]``: the
    samples whose sigma lies in the guidance interval (others take the full branch). Returns ``[B, T, d]``."""
    vc = v[0]
    if len(use) == 1:
        return vc
    out = vc
    if "no_text" in use:
        vu = v[use.index("no_text")]
        out = vu + cfg.text_scale * (vc - vu)
        if cfg.renorm:
            dims = (-1,) if refine else (1, 2)          # text_channel (per token) for edits, global per sample
            ratio = torch.linalg.vector_norm(vc, dim=dims, keepdim=True) / (
                torch.linalg.vector_norm(out, dim=dims, keepdim=True) + 1e-8)
            out = out * ratio.clamp(max=1.0)
    if "no_image" in use:
        vi = v[use.index("no_image")]
        out = vi + cfg.image_scale * (out - vi)
    if guided is not None and not bool(guided.all()):
        out = torch.where(guided[:, None, None], out, vc)
    return out


def load_bagel(model, path: Optional[str], device: str) -> BagelPolicy:
    """``model.kind=bagel``: a BAGEL-7B-MoT folder, or a folder ``BagelPolicy.save_pretrained`` wrote."""
    from alphagrpo.models.bagel.attention import set_attention
    from alphagrpo.models.bagel.loading import default_resolution, load_modules, load_tokenizer
    if not path:
        raise ValueError("model.kind=bagel needs model.path: a local BAGEL-7B-MoT folder (llm_config.json, "
                         "vit_config.json, ema.safetensors, ae.safetensors, tokenizer files)")
    if model.dtype != "bfloat16":
        raise ValueError(f"BAGEL runs in bfloat16 (its inference layers cast to bfloat16 inside); set "
                         f"model.dtype=bfloat16, got {model.dtype}")
    set_attention(model.attention)
    p = Path(path)
    meta = json.loads((p / META).read_text()) if (p / META).is_file() else None
    if meta is not None and meta.get("format") != FORMAT:
        raise ValueError(f"{p / META} holds format {meta.get('format')!r}, expected {FORMAT!r}")
    base = Path(meta["base"]) if meta and meta.get("lora") else p
    if not base.is_dir():
        raise FileNotFoundError(f"the LoRA checkpoint {p} points at its base model {base}, which is gone; restore that "
                                "folder (adapters are saved without the base weights)")
    options = model.option_dict({"resolution"}, "BAGEL", "resolution=N: square, a multiple of 16, default 512")
    resolution = int(options["resolution"]) if "resolution" in options else (
        int(meta["resolution"]) if meta else default_resolution(base))
    bagel, vae, _ = load_modules(base, device=device, dtype=torch.bfloat16)
    tok, special = load_tokenizer(base)
    pol = BagelPolicy(bagel, vae, tok, special, resolution=resolution, source=str(base),
                      gradient_checkpointing=bool(model.gradient_checkpointing))
    if meta and meta.get("lora"):
        lo = meta["lora"]
        pol.enable_lora(lo["rank"], lo["alpha"], tuple(lo.get("targets") or ()), lo.get("seed", 0))
        from safetensors.torch import load_file
        pol.load_adapter_state_dict(load_file(str(p / "adapter_model.safetensors"), device=str(device)))
    return pol
