"""``SD3Policy``: Stable Diffusion 3.5 (through diffusers + peft) as a flow-only ``Policy`` (``model.kind=sd3``).

Loaded from a local ``StableDiffusion3Pipeline`` folder (``model.path``; nothing is downloaded), or from a folder this
policy's ``save_pretrained`` wrote (adapters + a pointer to that pipeline folder). ``has_think = False``: no think
text, text-to-image only; a request with an input image (self-reflective refinement) is refused.

Conventions (checked against the stock pipeline in ``tests/test_sd3.py``):
- Latents in model space: ``(z - shift_factor) * scaling_factor`` on encode, the inverse before the VAE decodes
  (both read from the VAE config; SD3.5: 0.0609 / 1.5305). ``latent_shape = (16, R/8, R/8)`` at resolution ``R``.
- Velocity: the transformer's output at ``timestep = sigma * 1000`` (float32 product, as the scheduler computes its
  timesteps) with the pooled CLIP projections. SD3 is trained on ``noise - x0`` and its scheduler steps
  ``x + (sigma_next - sigma) * v``: the sign of RECIPE.md section 2, so the output is used as is.
- CFG (``CFGConfig``): unconditional branch = the embeddings of the empty prompt ``""`` (as the pipeline);
  ``v = v_u + s (v_c - v_u)`` for sigma in ``(low, high]``, optional global renorm
  ``v <- v * min(1, |v_c| / |v|)`` per sample. Both branches run in ONE batched forward ``[uncond; cond]`` (the
  pipeline's order) in rollout and replay alike, so gradients reach both branches and the two calls see the same
  batch composition (two separate forwards differ by ~2e-6). Flow-GRPO's setting: scale 4.5 at every step, no
  renorm (``cfg.text_scale=4.5, cfg.low=0, cfg.high=1, cfg.renorm=False``).
- Prompt encodings (two CLIPs + T5, ``max_sequence_length = model.max_text_tokens`` or 256) are cached per prompt
  on the device (an LRU of ``prompt_cache`` entries, option, default 64; about 2.7 MB each at 256 T5 tokens in
  bf16). The text encoders are frozen in every mode, so a cached encoding is exact: rollout encodes each new prompt
  once (all missing prompts of a call in one batch), and replay's ``image_condition`` finds every prompt in the
  cache, so T5 never runs in the training pass (``encode_calls`` counts encoder batches; a test hooks T5 itself).
- Grids: ``sigmas(N, shift)`` is the pipeline scheduler's grid (``sampler.grid=scheduler``), built from a copy of
  its config with ``shift`` (SD3.5 ships 3.0): ``set_timesteps(N)`` spaces N timesteps linearly from 1 to the
  scheduler's smallest TRAINING sigma, which is already shifted (1/1000 -> ~0.003), and then shifts them again, then
  appends 0; the last step is a near-no-op ~0.009 -> 0. The recipe's ``flow_sigmas(N, s)`` shifts
  ``linspace(1, 0, N + 1)`` once: the two grids differ by up to ~0.24 in sigma at N = 10. Passing
  unshifted ``sigmas=linspace(1, 0, N+1)[:-1]`` to the pipeline reproduces ``flow_sigmas``.
- Precision: transformer and text encoders in ``model.dtype``; VAE in float32; LoRA adapters in float32; the
  velocity is returned as float32 (the SDE step and log-probs run in float32, RECIPE section 2).
- Attention: SDPA (diffusers' joint-attention processor) by default; ``model.attention=xformers`` switches to
  xformers' memory-efficient kernels when xformers is installed. ``model.gradient_checkpointing`` recomputes each
  transformer block in the backward pass.
- LoRA through peft (``transformer.add_adapter``): rank/alpha/targets of ``lora``, Gaussian init (peft's
  ``"gaussian"``: A ~ N(0, 1/r), B = 0, so a fresh adapter is a no-op), seeded. Default targets: the eight
  joint-attention projections (Flow-GRPO's set); the named sets ``joint_attention``, ``dual_attention`` (SD3.5's
  ``attn2.*``), ``feed_forward`` (``ff``, ``ff_context``) and ``all`` may be mixed with fnmatch patterns in
  ``lora.targets``. ``reference()`` disables the adapters (peft), ``merge_lora()`` fuses them.
- Saving: with LoRA, ``pytorch_lora_weights.safetensors`` in diffusers' format with peft's adapter config as its
  metadata (so a stock ``StableDiffusion3Pipeline.load_lora_weights`` keeps alpha), plus ``config.json`` pointing at
  the base pipeline folder; full fine-tuning writes the trained ``transformer/`` and the same pointer. The frozen
  base weights are never copied.

Chose not to: download anything; train the text encoders (their outputs are cached); skip-layer guidance; EMA of
the adapters (Flow-GRPO keeps one); dynamic-shift schedulers are supported only through the scheduler's own ``mu``
formula.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from alphagrpo.models.policy import CFGConfig, GenRequest, PolicyBase

log = logging.getLogger(__name__)

FORMAT = "alphagrpo.sd3/v1"
EXTRA = "pip install 'alphagrpo[diffusers]'"
LORA_FILE = "pytorch_lora_weights.safetensors"
DEFAULT_TEXT_TOKENS = 256
DEFAULT_RESOLUTION = 512

# Target sets (fnmatch over the transformer's module names). joint_attention = Flow-GRPO's eight projections.
TARGET_SETS = {
    "joint_attention": tuple(f"transformer_blocks.*.attn.{p}" for p in
                             ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out")),
    "dual_attention": tuple(f"transformer_blocks.*.attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "feed_forward": tuple(f"transformer_blocks.*.{m}.net.{p}" for m in ("ff", "ff_context")
                          for p in ("0.proj", "2")),
}
TARGET_SETS["all"] = TARGET_SETS["joint_attention"] + TARGET_SETS["dual_attention"] + TARGET_SETS["feed_forward"]
DEFAULT_TARGETS = ("joint_attention",)


def _diffusers():
    try:
        import diffusers
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"model.kind=sd3 needs diffusers, transformers and peft: {EXTRA}") from e
    return diffusers


def expand_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Named target sets -> their fnmatch patterns (other entries are patterns already); empty -> the default."""
    out = []
    for t in tuple(targets) or DEFAULT_TARGETS:
        out += TARGET_SETS.get(t, (t,))
    return tuple(dict.fromkeys(out))


def lora_target_names(transformer: torch.nn.Module, targets: Sequence[str] = ()) -> list[str]:
    """The linear layers of ``transformer`` that ``targets`` (named sets and/or fnmatch patterns) select."""
    patterns = expand_targets(targets)
    return [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@dataclass
class SD3Condition:
    """The detached text conditioning of a batch: ``embeds [k*n, L, D]`` / ``pooled [k*n, P]`` stacked branch-major
    in the pipeline's order (rows ``[0:n]`` unconditional when ``uncond``, then the conditional rows)."""
    embeds: torch.Tensor
    pooled: torch.Tensor
    n: int
    uncond: bool
    cfg: CFGConfig


class SD3Policy(PolicyBase):
    """Implements ``alphagrpo.models.policy.Policy`` for a diffusers ``StableDiffusion3Pipeline`` (see the module
    docstring). Build with ``load_sd3`` (the registered loader) or ``SD3Policy(pipe, ...)``."""

    has_think = False

    def __init__(self, pipe, *, base: Optional[str] = None, resolution: int = DEFAULT_RESOLUTION,
                 max_text_tokens: int = DEFAULT_TEXT_TOKENS, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", gradient_checkpointing: bool = False, attention: str = "sdpa",
                 prompt_cache: int = 64):
        _diffusers()
        if resolution % 16:
            raise ValueError(f"SD3 resolution must be a multiple of 16 (VAE factor 8 x patch 2), got {resolution}; "
                             "set model.options=resolution=512 (or another multiple of 16)")
        if not 1 <= max_text_tokens <= 512:
            raise ValueError(f"model.max_text_tokens must be in [1, 512] for SD3's T5 (0: default "
                             f"{DEFAULT_TEXT_TOKENS}), got {max_text_tokens}")
        self.pipe, self.base = pipe, base
        self.resolution, self.max_text_tokens = int(resolution), int(max_text_tokens)
        tr = pipe.transformer
        vf = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if resolution % (vf * tr.config.patch_size):
            raise ValueError(f"resolution {resolution} must be a multiple of {vf * tr.config.patch_size} for this "
                             "pipeline (VAE factor x patch size)")
        side = resolution // vf
        if side // tr.config.patch_size > tr.config.pos_embed_max_size:
            raise ValueError(f"resolution {resolution} exceeds this transformer's position embeddings "
                             f"({tr.config.pos_embed_max_size * tr.config.patch_size * vf} px at most)")
        self.latent_shape = (tr.config.in_channels, side, side)
        self.lora: Optional[dict] = None
        self.encode_calls = 0                      # text-encoder batches run (the T5-in-replay check)
        self._cache: OrderedDict = OrderedDict()   # prompt -> (embeds [L, D], pooled [P])
        self._cache_size = int(prompt_cache)
        self._evicted: set = set()                 # prompts dropped from the cache (a re-encode warns once)
        self._warned = False
        self._ref_depth = 0
        for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae, tr):
            if m is not None:
                m.eval()                           # T5 dropout in train mode breaks the on-policy ratio of 1
                m.requires_grad_(False)
        for m, dt in ((pipe.text_encoder, dtype), (pipe.text_encoder_2, dtype), (pipe.text_encoder_3, dtype),
                      (pipe.vae, torch.float32), (tr, dtype)):
            if m is not None:
                m.to(device=device) if m.dtype == dt else m.to(device=device, dtype=dt)
        tr.requires_grad_(True)                    # full fine-tuning until enable_lora
        pipe.set_progress_bar_config(disable=True)
        if gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        self.set_attention(attention)

    # ---------------------------------------------------------------- basics
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype (``model.dtype``); adapters are float32 whatever it is."""
        return self.transformer.dtype

    def set_attention(self, attention: str) -> None:
        """``"sdpa"`` (default) or ``"xformers"`` (needs the xformers package)."""
        if attention == "sdpa":
            return
        if attention != "xformers":
            raise ValueError(f"model.attention for sd3 must be 'sdpa' or 'xformers', got {attention!r}")
        try:
            import xformers  # noqa: F401
        except ImportError as e:
            raise ImportError("model.attention=xformers needs the xformers package (pip install xformers); or use "
                              "model.attention=sdpa") from e
        self.transformer.enable_xformers_memory_efficient_attention()

    def shard_modules(self) -> list:
        tr = self.transformer
        return list(tr.transformer_blocks) + [tr]

    def trainable_parameters(self):
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- grid
    def sigmas(self, num_steps: int, shift: float) -> torch.Tensor:
        """The pipeline scheduler's float32 grid of ``num_steps + 1`` sigmas (1 -> 0), with its shift set to
        ``shift`` (see the module docstring for how it differs from ``flow_sigmas``)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
        sch = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config, shift=float(shift))
        kw = {}
        if sch.config.get("use_dynamic_shifting", False):
            p = self.transformer.config.patch_size
            seq = (self.latent_shape[1] // p) * (self.latent_shape[2] // p)
            kw["mu"] = calculate_shift(seq, sch.config.get("base_image_seq_len", 256),
                                       sch.config.get("max_image_seq_len", 4096), sch.config.get("base_shift", 0.5),
                                       sch.config.get("max_shift", 1.16))
        sch.set_timesteps(int(num_steps), device="cpu", **kw)
        return sch.sigmas.detach().to(torch.float32).cpu()

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [n, 77 + L, D], pooled [n, P])`` in the transformer's dtype, from the cache; the missing
        prompts are encoded together in one batch (the pipeline's own ``encode_prompt``)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        again = [p for p in missing if p in self._evicted]
        if again and not self._warned:
            self._warned = True
            log.warning("SD3 prompt encodings were evicted and recomputed (e.g. %r): a replay that re-encodes a "
                        "prompt in another batch may differ from its rollout in the last bits; raise model.options "
                        "prompt_cache=N above the distinct prompts of a step (now %d)", again[0][:60],
                        self._cache_size)
        if missing:
            emb, _, pooled, _ = self.pipe.encode_prompt(prompt=missing, prompt_2=None, prompt_3=None,
                                                        device=self.device, do_classifier_free_guidance=False,
                                                        max_sequence_length=self.max_text_tokens)
            self.encode_calls += 1
            dt = self.dtype
            for i, p in enumerate(missing):
                self._cache[p] = (emb[i].to(dt), pooled[i].to(dt))
        for p in prompts:
            self._cache.move_to_end(p)
        out_e = torch.stack([self._cache[p][0] for p in prompts])
        out_p = torch.stack([self._cache[p][1] for p in prompts])
        while len(self._cache) > max(self._cache_size, len(set(prompts))):
            gone, _ = self._cache.popitem(last=False)
            if len(self._evicted) < 100_000:
                self._evicted.add(gone)
        return out_e, out_p

    def clear_prompt_cache(self) -> None:
        self._cache.clear()

    def sample_think(self, *a, **k):
        raise NotImplementedError("SD3 writes no think text (has_think = False)")

    def think_replay(self, *a, **k):
        raise NotImplementedError("SD3 writes no think text (has_think = False)")

    # ---------------------------------------------------------------- image
    @torch.no_grad()
    def image_condition(self, requests: Sequence[GenRequest], think=None, cfg: CFGConfig = None) -> SD3Condition:
        """The detached conditioning of every CFG branch (rollout and replay both call this; encodings come from
        the prompt cache, so replay runs no text encoder)."""
        cfg = cfg if cfg is not None else CFGConfig(text_scale=4.5, low=0.0, high=1.0, renorm=False)
        if any(getattr(r, "image", None) is not None for r in requests):
            raise ValueError("SD3 is a text-to-image policy: requests with an input image (self-reflective "
                             "refinement, SRR) are not supported for model.kind=sd3; use task=rt2i")
        if think is not None and any(t is not None and len(t) for t in think):
            raise ValueError("SD3 has no think text (has_think = False); pass think=None")
        prompts = [r.prompt for r in requests]
        n = len(prompts)
        uncond = cfg.text_scale != 1.0
        emb, pooled = self.encode_prompts(([""] * n if uncond else []) + prompts)
        return SD3Condition(embeds=emb, pooled=pooled, n=n, uncond=uncond, cfg=cfg)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        out = self.transformer(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=emb,
                               pooled_projections=pooled, return_dict=False)[0]
        return out.float()

    def velocity(self, x: torch.Tensor, sigma, cond: SD3Condition) -> torch.Tensor:
        """CFG-combined velocity ``[B, 16, h, w]`` (float32) at ``sigma`` (float, or ``[B]``); differentiable when
        grad is on (through both CFG branches, in one batched forward)."""
        n, cfg = cond.n, cond.cfg
        if x.shape[0] != n:
            raise ValueError(f"x has {x.shape[0]} samples but the condition has {n}")
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)
        t = sig * 1000.0                          # float32, as the scheduler's timesteps = sigmas * 1000
        if cond.uncond:
            inside = (sig > cfg.low) & (sig <= cfg.high)
            scalar = not torch.is_tensor(sigma) or torch.as_tensor(sigma).numel() == 1
            if scalar and not bool(inside[0]):    # outside the CFG interval: the conditional branch alone
                return self._forward(x, t, cond.embeds[n:], cond.pooled[n:])
            v_all = self._forward(torch.cat([x, x]), torch.cat([t, t]), cond.embeds, cond.pooled)
            v_u, v_c = v_all[:n], v_all[n:]
            v = v_u + cfg.text_scale * (v_c - v_u)
            if cfg.renorm:
                dims = tuple(range(1, v.ndim))
                ratio = (torch.linalg.vector_norm(v_c, dim=dims, keepdim=True)
                         / torch.linalg.vector_norm(v, dim=dims, keepdim=True).clamp_min(1e-8))
                v = v * ratio.clamp(max=1.0)
            if not scalar:                        # per-sample sigmas: CFG only where each sample is inside
                v = torch.where(inside.reshape((n,) + (1,) * (v.ndim - 1)), v, v_c)
            return v
        return self._forward(x, t, cond.embeds, cond.pooled)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Model-space latents ``[B, 16, h, w]`` -> uint8 images ``[B, 8h, 8w, 3]`` (float32 VAE)."""
        vae = self.pipe.vae
        z = latents.detach().to(self.device, torch.float32) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z, return_dict=False)[0]
        img = ((img.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """uint8 images ``[B, H, W, 3]`` (H, W multiples of 16) -> model-space latents (the posterior's mode)."""
        a = np.asarray(images)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"encode expects uint8 images [B, H, W, 3], got {a.dtype} {a.shape}")
        if a.shape[1] % 16 or a.shape[2] % 16:
            raise ValueError(f"SD3 needs image sides that are multiples of 16, got {a.shape[1]} x {a.shape[2]}")
        vae = self.pipe.vae
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().to(self.device) / 127.5 - 1.0
        z = vae.encode(x).latent_dist.mode()
        return (z.float() - vae.config.shift_factor) * vae.config.scaling_factor

    # ---------------------------------------------------------------- LoRA
    def enable_lora(self, rank: int = 32, alpha: float = 64.0, targets: Sequence[str] = (), seed: int = 0) -> None:
        """Freeze the transformer and train rank-``rank`` peft adapters (Gaussian init from ``seed``, float32) on
        ``targets`` (named sets and/or fnmatch patterns; empty: the joint-attention projections)."""
        from peft import LoraConfig
        if self.lora is not None:
            raise ValueError("this policy already has LoRA adapters; merge_lora() them first or keep training them")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        tr = self.transformer
        names = lora_target_names(tr, targets)
        if not names:
            linear = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
            raise ValueError(f"no linear layer of the SD3 transformer matches the LoRA targets {list(targets)}; "
                             f"layers are named like {linear[5:9]}; named sets: {sorted(TARGET_SETS)}")
        tr.requires_grad_(False)
        config = LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                            target_modules=names, lora_dropout=0.0)   # exact names: linear layers only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            tr.add_adapter(config)
        for n, p in tr.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)
        self.lora = {"rank": int(rank), "alpha": float(alpha), "targets": list(targets), "seed": int(seed)}

    def lora_layers(self) -> list[str]:
        """Names of the transformer's layers that carry adapters."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        return [n for n, m in self.transformer.named_modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def _disabled(self):
        tr = self.transformer
        if self._ref_depth == 0:
            tr.disable_adapters()
        self._ref_depth += 1
        try:
            yield
        finally:
            self._ref_depth -= 1
            if self._ref_depth == 0:
                tr.enable_adapters()

    def reference(self):
        """Adapters off for the duration (the KL reference of a LoRA run); nests."""
        if not self.lora:
            raise ValueError("SD3Policy has no LoRA adapters to disable: the reference of a full fine-tuning run is "
                             "a frozen copy, which the trainer keeps")
        return self._disabled()

    def merge_lora(self) -> None:
        """Fuse the adapters into the transformer's weights and remove them; every transformer weight trains
        again."""
        if not self.lora:
            raise ValueError("no LoRA adapters to merge")
        tr = self.transformer
        dt = self.dtype
        tr.fuse_lora(lora_scale=1.0)
        tr.unload_lora()
        if tr.dtype != dt:
            tr.to(dt)
        tr.requires_grad_(True)
        self.lora = None

    def adapter_state_dict(self) -> dict:
        from peft.utils import get_peft_model_state_dict
        return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the policy into folder ``path`` atomically: ``config.json`` (format, base pipeline folder, LoRA
        settings) plus, with LoRA, the adapters in diffusers' format with peft's config as metadata (a stock
        ``StableDiffusion3Pipeline.load_lora_weights(path)`` loads them, alpha included); without LoRA, the
        trained ``transformer/``. Never the frozen base weights."""
        if self.base is None:
            raise ValueError("this SD3 policy was built in memory with no base folder to point at; build it with "
                             "load_sd3 (model.path = a StableDiffusion3Pipeline folder)")
        from diffusers import StableDiffusion3Pipeline

        from alphagrpo._files import atomic_dir
        meta = {"format": FORMAT, "base": str(Path(self.base).resolve()), "lora": self.lora,
                "transformer": self.lora is None}

        def write(tmp: Path):
            if self.lora is not None:
                cfg = self.transformer.peft_config["default"].to_dict()
                StableDiffusion3Pipeline.save_lora_weights(
                    str(tmp), transformer_lora_layers=self.adapter_state_dict(), weight_name=LORA_FILE,
                    transformer_lora_adapter_metadata=cfg)
            else:
                self.transformer.save_pretrained(str(tmp / "transformer"))
            (tmp / "config.json").write_text(json.dumps(meta, indent=1))

        atomic_dir(Path(path), write)

    def load_adapters(self, folder: str | os.PathLike) -> None:
        """Load saved adapter weights (``LORA_FILE``) into this policy's adapters; strict both ways."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file
        state = load_file(str(Path(folder) / LORA_FILE))
        state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}
        want = set(self.adapter_state_dict())
        if set(state) != want:
            raise ValueError(f"adapter weights in {folder} do not match this policy's adapters: missing "
                             f"{sorted(want - set(state))[:4]}, unexpected {sorted(set(state) - want)[:4]}")
        res = set_peft_model_state_dict(self.transformer, state, adapter_name="default")
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"unexpected adapter keys {res.unexpected_keys[:4]}")
        for n, p in self.transformer.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)


def read_saved(path: str | os.PathLike) -> Optional[dict]:
    """``config.json`` of a folder ``SD3Policy.save_pretrained`` wrote, or None for any other folder."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def load_sd3(model, path: Optional[str], device: str) -> SD3Policy:
    """``model.kind=sd3``: a local ``StableDiffusion3Pipeline`` folder, or a folder ``SD3Policy.save_pretrained``
    wrote (adapters or a trained transformer, plus a pointer to the pipeline folder). Settings from ``model``:
    ``dtype``, ``gradient_checkpointing``, ``attention``, ``max_text_tokens`` (0: 256) and the options
    ``resolution`` (default 512) and ``prompt_cache`` (default 64)."""
    _diffusers()
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    if not path:
        raise ValueError("model.kind=sd3 needs model.path: a local StableDiffusion3Pipeline folder (e.g. "
                         "stable-diffusion-3.5-medium downloaded with `huggingface-cli download`)")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model.path {p} is not a folder (expected a StableDiffusion3Pipeline folder)")
    meta = read_saved(p)
    base = Path(meta["base"]) if meta else p
    if not (base / "model_index.json").is_file():
        what = f"the base pipeline folder {base} that {p} points at" if meta else str(p)
        raise FileNotFoundError(f"{what} has no model_index.json: model.path must be a StableDiffusion3Pipeline "
                                "folder (or a folder this policy saved, whose base folder still exists)")
    opts = model.option_dict({"resolution", "prompt_cache"}, "sd3")
    dtype = getattr(torch, model.dtype)
    with warnings.catch_warnings():   # newer diffusers rename torch_dtype to dtype; both load the same
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = StableDiffusion3Pipeline.from_pretrained(str(base), torch_dtype={"default": dtype, "vae": torch.float32})
        if meta and meta.get("transformer"):
            pipe.transformer = SD3Transformer2DModel.from_pretrained(str(p / "transformer"), torch_dtype=dtype)
    pol = SD3Policy(pipe, base=str(base), resolution=int(opts.get("resolution", DEFAULT_RESOLUTION)),
                    max_text_tokens=model.max_text_tokens or DEFAULT_TEXT_TOKENS, dtype=dtype, device=device,
                    gradient_checkpointing=model.gradient_checkpointing, attention=model.attention,
                    prompt_cache=int(opts.get("prompt_cache", 64)))
    if meta and meta.get("lora"):
        lo = meta["lora"]
        pol.enable_lora(lo["rank"], lo["alpha"], tuple(lo.get("targets") or ()), seed=lo.get("seed", 0))
        pol.load_adapters(p)
    return pol
