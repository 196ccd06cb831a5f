"""``TinyUMMPolicy``: the ``Policy`` adapter around ``TinyUMM`` (context building, think sampling with a KV cache,
CFG branches, pixel-space encode/decode, supervised losses for pretraining, safetensors save/load).

Contexts are left-padded so that every sample's next token sits at the same buffer index during sampling.
CFG branches (RECIPE.md section 2): T2I uses ``[cond, uncond]`` with the unconditional context ``<bos>``; refinement
uses ``[cond, no-text, no-image]`` (no-text keeps only the input image, no-image drops the image block).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alphagrpo.models.policy import CFGConfig, GenRequest, PolicyBase, TextReplay, ThinkSample
from alphagrpo.models.tiny_umm import TinyUMM, TinyUMMConfig
from alphagrpo.models.tokenizer import WordTokenizer

FORMAT = "alphagrpo.tinyumm/v1"
LORA_TARGETS = ("layers.*.und.*", "layers.*.gen.*")   # both experts' qkv, proj and MLP layers
FORMS = ("full", "no_text", "no_image", "null")


@dataclass
class Batch:
    """A left-padded context batch: ``tokens``/``img_slot``/``positions``/``valid`` ``[B, L]``, ``mask [B,1,L,L]``."""
    tokens: torch.Tensor
    img_slot: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    images: Optional[torch.Tensor]


@dataclass
class Condition:
    """Detached context keys/values of every CFG branch, stacked branch-major: rows ``[k*B:(k+1)*B]`` are branch k."""
    kv: list
    mask: torch.Tensor
    branches: tuple
    n: int
    cfg: CFGConfig


class TinyUMMPolicy(PolicyBase):
    """Implements ``alphagrpo.models.policy.Policy`` for ``TinyUMM`` with a ``WordTokenizer`` (registered as
    ``model.kind=tiny_umm``)."""

    has_think = True

    def __init__(self, model: TinyUMM, tokenizer: WordTokenizer, source: Optional[str] = None):
        if model.cfg.vocab_size != len(tokenizer):
            raise ValueError(f"model vocab_size {model.cfg.vocab_size} != tokenizer size {len(tokenizer)}")
        self.model, self.tok = model, tokenizer
        self.lora: Optional[dict] = None       # the adapters' settings while LoRA is enabled
        self.source = source                   # the full checkpoint folder the base weights came from, if any
        c = model.cfg
        self.latent_shape = (c.channels, c.image_size, c.image_size)

    # ---------------------------------------------------------------- construction / io
    @classmethod
    def create(cls, words: Sequence[str], **model_kwargs) -> "TinyUMMPolicy":
        tok = WordTokenizer(words)
        return cls(TinyUMM(TinyUMMConfig(vocab_size=len(tok), **model_kwargs)), tok)

    def modules_for_lora(self) -> torch.nn.Module:
        return self.model

    def check_vocabulary(self, words: Sequence[str]) -> None:
        """Refuse a world whose prompts use words this tokenizer lacks (a checkpoint of another world), naming them."""
        missing = sorted(w for w in set(words) if w not in self.tok.stoi)
        if missing:
            raise ValueError(f"the TinyUMM checkpoint {self.source or '(in memory)'} does not cover this world's "
                             f"vocabulary (missing {len(missing)} words, e.g. {missing[:6]}); it was pretrained for "
                             "another world or plan format. Pretrain one with `alphagrpo pretrain --recipe RECIPE "
                             "--out DIR` and pass it as model.path")

    def save_pretrained(self, path: str | os.PathLike, extra: Optional[dict] = None) -> None:
        """Write the policy into folder ``path``, atomically (temp dir, then rename). Full weights:
        ``model.safetensors`` + ``config.json``. With LoRA on, peft's ``adapter_model.safetensors`` +
        ``adapter_config.json`` and, in ``config.json``, a pointer to the base checkpoint folder (no copy of the base
        weights); a policy built in memory, with no base folder to point at, writes its base weights beside them."""
        from safetensors.torch import save_file

        from alphagrpo._files import atomic_dir
        from alphagrpo.models.lora import adapter_config, adapter_state_dict, base_state_dict
        meta = {"format": FORMAT, "model": self.model.cfg.to_dict(), "tokenizer": json.loads(self.tok.to_json()),
                **(extra or {})}

        def write(tmp: Path):
            if self.lora is not None:
                meta["lora"] = self.lora
                base = str(Path(self.source).resolve()) if self.source else None
                meta["base"] = base
                save_file(adapter_state_dict(self.model), str(tmp / "adapter_model.safetensors"))
                (tmp / "adapter_config.json").write_text(json.dumps(
                    adapter_config(self.model, self.lora["rank"], self.lora["alpha"], base), indent=1))
                if base is None:
                    save_file({k: v.detach().contiguous() for k, v in base_state_dict(self.model).items()},
                              str(tmp / "model.safetensors"))
            else:
                save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
                          str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(meta, indent=1))

        atomic_dir(path, write)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "TinyUMMPolicy":
        """Load a folder written by ``save_pretrained`` (a LoRA folder loads its base from the folder it points
        at, then its adapters)."""
        from safetensors.torch import load_file

        from alphagrpo.models.lora import load_adapter_state_dict
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a TinyUMM checkpoint folder: no config.json there")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} holds format {meta.get('format')!r}, expected {FORMAT!r}")
        tok = WordTokenizer.from_json(json.dumps(meta["tokenizer"]))
        model = TinyUMM(TinyUMMConfig(**{"patch_pos": "learned", **meta["model"]}))  # older files: learned
        lora = meta.get("lora")
        base = meta.get("base") if lora else None
        if base is not None:
            if not (Path(base) / "model.safetensors").is_file():
                raise FileNotFoundError(f"the LoRA checkpoint {path} points at its base model {base}, which is gone; "
                                        "restore that folder (adapters are saved without the base weights)")
            if json.loads((Path(base) / "config.json").read_text()).get("lora"):
                raise ValueError(f"the base {base} of {path} is itself a LoRA checkpoint; point at a full one")
        pol = cls(model, tok, source=base if lora else str(path))
        model.load_state_dict(load_file(str(Path(base or path) / "model.safetensors")))
        if lora:                       # adapters saved unmerged: rebuild them, then load their weights
            pol.enable_lora(**lora)
            load_adapter_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return pol

    def enable_lora(self, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS, seed: int = 0) -> None:
        """Freeze the model and train low-rank adapters on the ``targets`` linear layers instead (default: both
        experts' attention and MLP layers); ``trainable_parameters`` then returns the adapters only. Saved
        checkpoints keep the adapters unmerged and reload with them; ``merge_lora`` folds them in."""
        from alphagrpo.models.lora import add_lora
        targets = tuple(targets) or LORA_TARGETS
        add_lora(self.model, rank, alpha, targets, seed=seed)
        self.lora = {"rank": int(rank), "alpha": float(alpha), "targets": list(targets), "seed": int(seed)}

    def merge_lora(self) -> None:
        """Fold the adapters into the weights; the whole model trains again (and saves as a full checkpoint)."""
        from alphagrpo.models.lora import merge_lora
        merge_lora(self.model)
        self.lora = None

    # ---------------------------------------------------------------- contexts
    def _ids(self, req: GenRequest, think: Optional[torch.Tensor], form: str, open_think: bool):
        """Token ids (``-1`` = image slot) and slot indices for one context in one CFG form."""
        t = self.tok
        ids, slots = [t.bos_id], [-1]
        if form in ("full", "no_image"):
            w = t.encode(req.prompt)
            ids += w
            slots += [-1] * len(w)
        if req.image is not None and form in ("full", "no_text"):
            n = self.model.cfg.n_patches
            ids += [t.img_id] + [t.pad_id] * n + [t.img_end_id]
            slots += [-1] + list(range(n)) + [-1]
        if req.instruction and form in ("full", "no_image"):
            w = t.encode(req.instruction)
            ids += w
            slots += [-1] * len(w)
        if form in ("full", "no_image"):
            ids.append(t.think_id)
            slots.append(-1)
            if think is not None:
                ids += [int(i) for i in think]
                slots += [-1] * len(think)
            elif not open_think:
                ids.append(t.eot_id)
                slots.append(-1)
        return ids, slots

    def _batch(self, requests, think, forms, open_think=False) -> Batch:
        dev = self.device
        rows = [self._ids(r, None if think is None else think[i], f, open_think)
                for i, (r, f) in enumerate(zip(requests, forms))]
        L = max(len(ids) for ids, _ in rows)
        if L > self.model.cfg.max_positions:
            raise ValueError(f"context of {L} tokens exceeds max_positions={self.model.cfg.max_positions}")
        B = len(rows)
        tokens = torch.full((B, L), self.tok.pad_id, dtype=torch.long)
        slot = torch.full((B, L), -1, dtype=torch.long)
        valid = torch.zeros(B, L, dtype=torch.bool)
        for i, (ids, sl) in enumerate(rows):
            tokens[i, L - len(ids):] = torch.tensor(ids)
            slot[i, L - len(ids):] = torch.tensor(sl)
            valid[i, L - len(ids):] = True
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        img = slot >= 0
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed = (causal[None] | (img[:, :, None] & img[:, None, :])) & valid[:, None, :]
        allowed |= torch.eye(L, dtype=torch.bool)[None]  # padding queries see themselves (no NaN rows)
        images = None
        if any(r.image is not None for r in requests):
            images = torch.zeros((B,) + self.latent_shape)
            for i, r in enumerate(requests):
                if r.image is not None:
                    images[i] = self.encode(np.asarray(r.image)[None])[0]
            images = images.to(dev)
        return Batch(tokens.to(dev), slot.to(dev), positions.to(dev), valid.to(dev), allowed[:, None].to(dev), images)

    def _run_context(self, b: Batch):
        h = self.model.embed_context(b.tokens, b.images, b.img_slot, b.positions)
        return self.model.context(h, b.mask)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def sample_think(self, requests, *, generator, max_new_tokens=48, temperature=1.0) -> ThinkSample:
        """Sample think text with a KV cache; ``logp`` at temperature 1 from the full softmax. ``temperature`` 0
        decodes greedily (the generator is then unused)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        m, tok = self.model, self.tok
        b = self._batch(requests, None, ["full"] * len(requests), open_think=True)
        hid, kvs = self._run_context(b)
        B = len(requests)
        logits = m.lm_head(hid[:, -1])
        pos = b.positions[:, -1]
        valid = b.valid
        out = torch.full((B, max_new_tokens), tok.pad_id, dtype=torch.long, device=self.device)
        lps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=self.device)
        for t in range(max_new_tokens):
            logp_full = F.log_softmax(logits.float(), dim=-1)
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                probs = F.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(self.device)
            out[:, t] = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
            lps[:, t] = torch.where(done, torch.zeros_like(lps[:, t]), logp_full.gather(1, nxt[:, None]).squeeze(1))
            newly = (~done) & (nxt == tok.eot_id)
            lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
            done |= newly
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            pos = (pos + 1).clamp_max(m.cfg.max_positions - 1)
            h = m.tok_emb(nxt)[:, None] + m.pos_emb(pos)[:, None]
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
            mask = valid[:, None, None, :]
            new_kvs = []
            for lay, kv in zip(m.layers, kvs):
                h, kv2 = lay.und_forward(h, mask, kv)
                new_kvs.append(kv2)
            kvs = new_kvs
            logits = m.lm_head(m.norm_f(h)[:, 0])
        toks = [out[i, : lengths[i]].cpu() for i in range(B)]
        lp = [lps[i, : lengths[i]].cpu() for i in range(B)]
        return ThinkSample(tokens=toks, logp=lp, texts=[tok.decode(t.tolist()) for t in toks])

    def encode_think(self, texts: Sequence[str]) -> list:
        """Think texts -> token tensors as ``sample_think`` returns them (ending with ``<eot>``), e.g. to draw from a
        given plan. Raises ``ValueError`` naming a word the tokenizer does not know."""
        return [torch.tensor(self.tok.encode(t) + [self.tok.eot_id]) for t in texts]

    def think_replay(self, requests, think) -> TextReplay:
        """Hidden states ``[N, D]`` predicting the think tokens (grad on), packed, with the LM-head weight."""
        b = self._batch(requests, think, ["full"] * len(requests))
        hid, _ = self._run_context(b)
        L = b.tokens.shape[1]
        rows, cols, lens = [], [], [0]
        for i, t in enumerate(think):
            n = len(t)
            cols.append(torch.arange(L - n - 1, L - 1))  # position j predicts token j + 1 (left padding)
            rows.append(torch.full((n,), i))
            lens.append(lens[-1] + n)
        r, c = torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)
        targets = torch.cat([t.to(self.device) for t in think]).long()
        return TextReplay(hidden=hid[r, c], weight=self.model.lm_head.weight, targets=targets,
                          cu_seqlens=torch.tensor(lens, dtype=torch.long, device=self.device), cu_seqlens_host=lens)

    # ---------------------------------------------------------------- image
    def _forms(self, requests, cfg: CFGConfig):
        edit = any(r.image is not None for r in requests)
        if not edit:
            return ("full",) + (("null",) if cfg.text_scale != 1.0 else ())
        forms = ("full",)
        if cfg.text_scale != 1.0:
            forms += ("no_text",)
        if cfg.image_scale != 1.0:
            forms += ("no_image",)
        return forms

    @torch.no_grad()
    def image_condition(self, requests, think, cfg: CFGConfig) -> Condition:
        """Context keys/values of every CFG branch (detached: the image loss never reaches the context)."""
        forms = self._forms(requests, cfg)
        n = len(requests)
        reqs = list(requests) * len(forms)
        th = None if think is None else list(think) * len(forms)
        b = self._batch(reqs, th, [f for f in forms for _ in range(n)])
        _, kvs = self._run_context(b)
        return Condition(kv=kvs, mask=b.valid, branches=forms, n=n, cfg=cfg)

    def velocity(self, x, sigma, cond: Condition) -> torch.Tensor:
        """CFG-combined velocity ``[B, C, S, S]`` (float32). ``sigma``: float or ``[B]``."""
        n, cfg, br = cond.n, cond.cfg, cond.branches
        s = float(sigma) if not torch.is_tensor(sigma) or sigma.numel() == 1 else None
        text_on = "null" in br or "no_text" in br
        use_text = text_on and (s is None or cfg.low < s <= cfg.high)
        use_img = "no_image" in br
        k = 1 + int(use_text) + int(use_img)
        idx = [0] + ([br.index("null" if "null" in br else "no_text")] if use_text else []) + \
              ([br.index("no_image")] if use_img else [])
        rows = torch.cat([torch.arange(i * n, (i + 1) * n) for i in idx]).to(x.device)
        kv = [(a[rows], b_[rows]) for a, b_ in cond.kv] if k < len(br) or idx != list(range(len(br))) else cond.kv
        mask = cond.mask[rows]
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)
        v_all = self.model.velocity(x.repeat(k, 1, 1, 1), sig.repeat(k), kv, mask).float()
        vs = v_all.split(n)
        v_c = vs[0]
        if k == 1:
            return v_c
        v = v_c
        j = 1
        if use_text:
            v_u = vs[j]
            j += 1
            v = v_u + cfg.text_scale * (v_c - v_u)
            if cfg.renorm:
                dims = tuple(range(1, v.ndim)) if not use_img else (1,)  # global for T2I, per channel for edits
                ratio = (torch.linalg.vector_norm(v_c, dim=dims, keepdim=True)
                         / torch.linalg.vector_norm(v, dim=dims, keepdim=True).clamp_min(1e-8))
                v = v * ratio.clamp(max=1.0)
        if use_img:
            v_ni = vs[j]
            v = v_ni + cfg.image_scale * (v - v_ni)
        return v

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = ((latents.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    def encode(self, images) -> torch.Tensor:
        a = np.asarray(images)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"encode expects uint8 images [B, H, W, 3], got {a.dtype} {a.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return t.to(self.device)

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def shard_modules(self) -> list:
        """FSDP2 units: every layer, then the whole network (the root: embeddings and heads)."""
        return [*self.model.layers, self.model]

    def shard_forward_methods(self, module) -> tuple:
        """The methods this adapter calls on a shard unit instead of ``forward`` (FSDP2 gathers around them)."""
        return ("embed_context", "context", "velocity") if module is self.model else ("und_forward", "gen_forward")

    # ---------------------------------------------------------------- pretraining
    def supervised_losses(self, requests, think_texts, images, *, generator, p_drop=0.1, shift=3.0):
        """Pretraining losses: LM on the think tokens (plus ``<eot>``) and flow matching on ``images``
        (uint8 ``[B, H, W, 3]``) with CFG dropout (each dropped sample uses a random other form). Returns
        ``(lm_loss, flow_loss)``; both backpropagate into the whole model."""
        tok = self.tok
        think = [torch.tensor(tok.encode(t) + [tok.eot_id]) for t in think_texts]
        B = len(requests)
        drop = torch.rand(B, generator=generator) < p_drop
        forms = []
        for i, r in enumerate(requests):
            if not drop[i]:
                forms.append("full")
            elif r.image is None:
                forms.append("null")
            else:
                forms.append(FORMS[1 + int(torch.randint(3, (1,), generator=generator))])
        # one context forward: the full contexts serve the LM loss and the undropped flow samples; the dropped
        # samples' other forms ride along as extra rows of the same batch
        dropped = [i for i in range(B) if forms[i] != "full"]
        b = self._batch(list(requests) + [requests[i] for i in dropped], list(think) + [think[i] for i in dropped],
                        ["full"] * B + [forms[i] for i in dropped])
        hid, kvs = self._run_context(b)
        L = b.tokens.shape[1]
        rows = torch.cat([torch.full((len(t),), i) for i, t in enumerate(think)])
        cols = torch.cat([torch.arange(L - len(t) - 1, L - 1) for t in think])
        targets = torch.cat(think).long().to(self.device)
        lm = F.cross_entropy(self.model.lm_head(hid[rows, cols]).float(), targets)
        sel = torch.arange(B)
        for j, i in enumerate(dropped):
            sel[i] = B + j
        sel = sel.to(self.device)
        kvs = [(k[sel], v[sel]) for k, v in kvs]
        valid = b.valid[sel]
        x0 = self.encode(images)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.rand(B, generator=generator).to(x0.device)
        sigma = shift * t / (1 + (shift - 1) * t)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        v = self.model.velocity(xt, sigma, kvs, valid)
        flow = F.mse_loss(v.float(), noise - x0)
        return lm, flow


SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "tinyumm_shapes"


def load_tiny_umm(model, path: Optional[str], device: str) -> TinyUMMPolicy:
    """``model.kind=tiny_umm``: a TinyUMM checkpoint folder (default: the one shipped in the package).
    ``model.options``: ``unknown_words=unk`` (or a vocabulary word) maps words outside the vocabulary to one token
    instead of refusing them (see ``WordTokenizer``); off by default."""
    p = Path(path) if path else SHIPPED
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}; run `alphagrpo pretrain --recipe tiny_shapes --out {p}` "
                                "or set model.path to a TinyUMM checkpoint folder")
    opts = model.option_dict({"unknown_words"}, "TinyUMM", "unknown_words=unk")
    pol = TinyUMMPolicy.from_pretrained(p)
    if opts.get("unknown_words"):
        pol.tok = WordTokenizer.from_json(pol.tok.to_json(), pol.tok.split, unknown=opts["unknown_words"])
    if model.dtype != "float32":
        pol.model.to(getattr(torch, model.dtype))
    pol.model.to(device)
    return pol
