"""``native``: the fast backend. Shared-prefix scoring of many yes/no questions per image.

Per image, the prefix ``[system turn, image, text before the question]`` is encoded ONCE by the model's own
``forward`` (vision tower, DeepStack for Qwen3-VL, multimodal RoPE positions, KV cache), batched across images that
have the same prefix length. Then all questions of those images run as one batch of suffixes over that KV cache:

    prefix pass:  (B images, P tokens)            -> per layer K, V  (B, KVH, P, D);  next position per image
    suffix pass:  (N questions, L tokens), row n belongs to image img[n]
        per layer  q, k, v of the suffix tokens; keys = [K_prefix[img[n]] ; k_suffix]   (N, KVH, P + L, D)
                   mask: every prefix key, causal over the row's own suffix keys, none of its padding
                   SDPA with the query heads of a KV group folded into the query length (no KV repeat)
        last layer only the answer position of each row (attention row, MLP)
        head       final norm at the answer position, then only the yes/no rows of the LM head

Suffix tokens are text that comes after the image, so their multimodal RoPE position is the same number on all
three axes: ``next_pos[img] + j``, where ``next_pos = P + rope_delta`` is what the model's own position code gives
the first token after the prefix. With three equal components, sectioned (Qwen2.5-VL) and interleaved (Qwen3-VL)
mRoPE both reduce to plain RoPE at that position, which is what ``_rope`` computes.

Chose not to: page the KV cache, or fuse kernels by hand. SDPA picks flash / memory-efficient kernels on GPU;
CUDA graphs (``cuda_graphs.py``) remove launch overhead of small suffix passes on GPU.
Limits: full-attention decoders of the Qwen-VL shape (q/k/v/o projections, optional q/k norms); sliding-window
layers and dynamic RoPE scaling are refused at load time.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from ..prompt import SYSTEM_PROMPT, apply_expected
from ..vlm import VLBundle

log = logging.getLogger(__name__)


def _rotate_half(x):
    import torch
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cache_kv(cache, layer: int):
    """``(keys, values)`` of one layer of a transformers cache, across the cache layouts of recent versions."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]


class NativeVerifier:
    """Shared-prefix yes/no scoring.

    ``max_images_per_batch``: images per prefix pass; ``max_suffix_tokens``: padded suffix tokens per suffix pass
    (bounds activation memory); ``cuda_graphs``: ``None`` = on for CUDA and dense models, with eager fallback.
    """

    name = "native"

    def __init__(self, bundle: VLBundle, max_images_per_batch: int = 16, max_suffix_tokens: int = 8192,
                 cuda_graphs: bool | None = None):
        import torch
        if max_images_per_batch < 1 or max_suffix_tokens < 1:
            raise ValueError("max_images_per_batch and max_suffix_tokens must be >= 1")
        self.bundle = bundle
        self.max_images = max_images_per_batch
        self.max_suffix_tokens = max_suffix_tokens
        model = bundle.model
        lm = getattr(getattr(model, "model", None), "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise ValueError(f"{type(model).__name__} does not look like a Qwen-VL model (model.language_model."
                             f"layers not found); use the hf backend for it")
        cfg = lm.config
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])) or \
                getattr(cfg, "use_sliding_window", False):
            raise ValueError("the native backend supports full-attention layers only (this model uses sliding "
                             "windows); use the hf backend")
        rope_type = (getattr(lm.rotary_emb, "rope_type", "default") or "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"the native backend does not support {rope_type!r} RoPE scaling; use the hf backend")
        for i, layer in enumerate(lm.layers):
            a = getattr(layer, "self_attn", None)
            if a is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
                raise ValueError(f"layer {i} has no q/k/v/o-projection self-attention; use the hf backend")
        self.lm = lm
        self.layers = list(lm.layers)
        a0 = self.layers[0].self_attn
        self.head_dim = int(a0.head_dim)
        self.n_heads = a0.q_proj.out_features // self.head_dim
        self.n_kv = a0.k_proj.out_features // self.head_dim
        self.inv_freq = lm.rotary_emb.inv_freq.detach().float()
        self.rope_scale = float(getattr(lm.rotary_emb, "attention_scaling", 1.0))
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
        self.answer_weight = head.weight.detach().index_select(0, bundle.answer_index).float()  # (n_answers, Hd)
        bias = getattr(head, "bias", None)
        self.answer_bias = None if bias is None else bias.detach().index_select(0, bundle.answer_index).float()
        self.n_yes = len(bundle.answers.yes_ids)
        self.is_moe = any(hasattr(layer.mlp, "experts") for layer in self.layers)  # data-dependent routing
        self.graphs = None
        use_graphs = cuda_graphs if cuda_graphs is not None else (bundle.device.type == "cuda" and not self.is_moe)
        if use_graphs:
            if bundle.device.type != "cuda":
                raise ValueError("cuda_graphs=True needs the model on a CUDA device")
            from .cuda_graphs import SuffixGraphs
            self.graphs = SuffixGraphs(self._suffix_forward, self.n_yes)
        self._torch = torch

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Any = "auto", device: str | None = "auto",
                        attn_implementation: str = "sdpa", system_prompt: str = SYSTEM_PROMPT,
                        **kwargs) -> "NativeVerifier":
        return cls(VLBundle.from_pretrained(path, dtype, device, attn_implementation, system_prompt), **kwargs)

    # ---- public ----------------------------------------------------------------------------------------------------
    def image_spec(self):
        """The image processor's limits and resize rule (see ``VLBundle.image_spec``), for the server."""
        return self.bundle.image_spec()

    def check_question(self, question: str) -> None:
        """Refuse text the tokenizer would read as special tokens (see ``VLBundle.check_question``), for the server."""
        self.bundle.check_question(question)

    def score(self, images: Sequence[Any], question_lists: Sequence[Sequence[str]],
              expected_answers: Sequence[Sequence[str | None]] | None = None) -> list[list[float]]:
        expected, out, keep, pre = self.bundle.prepare(images, question_lists, expected_answers)
        if not keep:
            return out
        pixel_values, grid, n_tokens, offsets = pre
        groups: dict[int, list[int]] = {}  # prefix length -> positions in `keep` (same length: no padding)
        for k, n in enumerate(n_tokens):
            groups.setdefault(n, []).append(k)
        with self._torch.inference_mode():
            for n, ks in groups.items():
                for s in range(0, len(ks), self.max_images):
                    sub = ks[s:s + self.max_images]
                    kv, next_pos = self._prefix(n, [pixel_values[offsets[k]:offsets[k + 1]] for k in sub],
                                                grid[sub])
                    rows = [(b, keep[k], j) for b, k in enumerate(sub) for j in range(len(question_lists[keep[k]]))]
                    scores = self._suffix(kv, next_pos, rows, question_lists)
                    for (b, i, j), p in zip(rows, scores):
                        out[i][j] = apply_expected(p, expected[i][j] if expected else None)
        return out

    # ---- prefix ----------------------------------------------------------------------------------------------------
    def _prefix(self, n_image_tokens: int, pixel_values: list, grid):
        """Encode ``B`` images' prefixes with the model's own forward; returns per-layer KV and next positions."""
        torch = self._torch
        b = self.bundle
        ids = torch.tensor([b.prefix_ids(n_image_tokens)] * len(pixel_values), dtype=torch.long)
        kw = b.model_inputs(ids, torch.ones_like(ids), torch.cat(pixel_values), grid)
        out = b.model.model(**kw, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        kv = [_cache_kv(cache, i) for i in range(len(self.layers))]
        P = ids.shape[1]
        deltas = getattr(b.model.model, "rope_deltas", None)
        if deltas is not None and deltas.numel() == len(pixel_values):
            next_pos = P + deltas.reshape(-1).to(b.device, torch.long)
        else:  # the image's positions span max(h, w) / merge after it starts; the rest is text
            g = grid.to(b.device)
            next_pos = P - n_image_tokens + torch.maximum(g[:, 1], g[:, 2]) // b.merge_size
        return kv, next_pos

    # ---- suffixes --------------------------------------------------------------------------------------------------
    def _suffix(self, kv, next_pos, rows, question_lists) -> list[float]:
        """Score ``rows`` = ``(image index in the batch, image, question)`` in length-sorted, token-bounded chunks."""
        torch = self._torch
        b = self.bundle
        ids = b.suffix_ids([question_lists[i][j] for _, i, j in rows])
        order = sorted(range(len(rows)), key=lambda r: len(ids[r]))
        P = kv[0][0].shape[2]
        scores = [0.0] * len(rows)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end + 1 - start) * self._width(len(ids[order[end]]), P) \
                    <= self.max_suffix_tokens:
                end += 1
            chunk = order[start:end]
            L = self._width(max(len(ids[r]) for r in chunk), P)
            pad = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else 0
            tok = torch.full((len(chunk), L), pad, dtype=torch.long)
            for n, r in enumerate(chunk):
                tok[n, :len(ids[r])] = torch.tensor(ids[r])
            lengths = torch.tensor([len(ids[r]) for r in chunk], dtype=torch.long)
            img = torch.tensor([rows[r][0] for r in chunk], dtype=torch.long)
            tok, lengths, img = tok.to(b.device), lengths.to(b.device), img.to(b.device)
            pos = next_pos.index_select(0, img)[:, None] + torch.arange(L, device=b.device)[None, :]
            if self.graphs is not None:
                logits = self.graphs.run(tok, pos, lengths, img, kv)
            else:
                logits = self._suffix_forward(tok, pos, lengths, img, kv)
            p = (logits[:, :self.n_yes].logsumexp(-1) - logits[:, self.n_yes:].logsumexp(-1)).sigmoid()
            for r, v in zip(chunk, p.tolist()):
                scores[r] = v
            start = end
        return scores

    @staticmethod
    def _width(n: int, P: int) -> int:
        """Pad the suffix so that ``P + L`` is a multiple of 8 (aligned masks for the GPU attention kernels)."""
        return n + (-(P + n)) % 8

    def _rope(self, pos, dtype):
        torch = self._torch
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)  # (N, L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.rope_scale).to(dtype)[:, None], (emb.sin() * self.rope_scale).to(dtype)[:, None])

    def _suffix_forward(self, ids, pos, lengths, img, kv):
        """Pure tensor function (CUDA-graph capturable): yes/no logits ``(N, n_answers)`` float32 of the suffixes.

        ``ids``/``pos``: ``(N, L)``; ``lengths``/``img``: ``(N,)``; ``kv``: per layer ``(K, V)`` ``(B, KVH, P, D)``.
        """
        torch = self._torch
        F = torch.nn.functional
        N, L = ids.shape
        P = kv[0][0].shape[2]
        H, KVH, D = self.n_heads, self.n_kv, self.head_dim
        G = H // KVH
        x = self.lm.embed_tokens(ids)  # (N, L, Hd)
        cos, sin = self._rope(pos, x.dtype)  # (N, 1, L, D)
        ar = torch.arange(L, device=ids.device)
        own = (ar[None, :, None] >= ar[None, None, :]) & (ar[None, None, :] < lengths[:, None, None])  # (N, L, L)
        mask = torch.cat([torch.ones(N, L, P, dtype=torch.bool, device=ids.device), own], dim=-1)  # (N, L, P+L)
        last = (lengths - 1).clamp(min=0)
        for li, layer in enumerate(self.layers):
            final = li == len(self.layers) - 1
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(N, L, H, D)
            k = a.k_proj(h).view(N, L, KVH, D)
            v = a.v_proj(h).view(N, L, KVH, D).transpose(1, 2)
            if hasattr(a, "q_norm"):
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (N, heads, L, D)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            Kp, Vp = kv[li]
            keys = torch.cat([Kp.index_select(0, img), k], dim=2)  # (N, KVH, P+L, D)
            vals = torch.cat([Vp.index_select(0, img), v], dim=2)
            m = mask
            if final:  # only the answer position matters from here on
                q = q.gather(2, last[:, None, None, None].expand(N, H, 1, D))
                m = mask.gather(1, last[:, None, None].expand(N, 1, P + L))
                x = x.gather(1, last[:, None, None].expand(N, 1, x.shape[-1]))
            Lq = q.shape[2]
            qg = q.reshape(N, KVH, G * Lq, D)  # head h uses KV head h // G: fold the group into the query length
            mg = m[:, None, None].expand(N, 1, G, Lq, P + L).reshape(N, 1, G * Lq, P + L)
            o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mg, scale=a.scaling)  # (N, KVH, G*Lq, D)
            o = o.reshape(N, H, Lq, D).transpose(1, 2).reshape(N, Lq, H * D)
            x = x + a.o_proj(o)
            y = layer.mlp(layer.post_attention_layernorm(x))
            x = x + (y[0] if isinstance(y, tuple) else y)
        h = self.lm.norm(x[:, -1]).float()  # (N, Hd)
        logits = h @ self.answer_weight.t()
        return logits if self.answer_bias is None else logits + self.answer_bias
