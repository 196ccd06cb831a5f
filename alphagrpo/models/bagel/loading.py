"""Reading a BAGEL model folder: config, strict weights, autoencoder, tokenizer.

A BAGEL-7B-MoT folder holds ``llm_config.json``, ``vit_config.json``, ``ema.safetensors`` (language model, ViT,
connector, generation heads), ``ae.safetensors`` (the autoencoder) and the Qwen2 tokenizer files. The config is built
as the official inferencer builds it: QK-norm on, untied embeddings, the MoT decoder layer, the ViT's last layer
dropped (``vit_select_layer=-2``), no ViT RoPE, latent patch 2. Sizes that the shipped ``config.json`` may state
wrongly (``max_latent_size``: stale in released configs) are read from the weights' own shapes instead
(``latent_pos_embed`` is ``max_latent_size**2`` rows, ``vit_pos_embed`` ``vit_max_num_patch_per_side**2``), so the
same code reads BAGEL-7B-MoT and the tiny test model. Two optional files of ours: ``ae_config.json`` (autoencoder
architecture; default: BAGEL's FLUX autoencoder) and ``generation.json`` (default resolution; default 512).

Weights load strictly: the module tree is built on the meta device, the checkpoint is assigned into it with
``strict=True`` (any missing or unexpected key raises, naming them), and nothing is left on meta.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from alphagrpo.models.bagel._nemo import require

log = logging.getLogger(__name__)

SPECIAL = {"bos": "<|im_start|>", "eos": "<|im_end|>", "soi": "<|vision_start|>", "eoi": "<|vision_end|>"}
AE_DEFAULT = dict(resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4],
                  num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159)


def is_bagel_folder(path) -> bool:
    p = Path(path)
    return (p / "llm_config.json").is_file() and (p / "ema.safetensors").is_file()


def _shapes(file: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(file), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _isqrt(n: int, what: str) -> int:
    r = math.isqrt(n)
    if r * r != n:
        raise ValueError(f"{what} has {n} rows, not a square grid")
    return r


def ae_params(folder) -> dict:
    f = Path(folder) / "ae_config.json"
    return {**AE_DEFAULT, **json.loads(f.read_text())} if f.is_file() else dict(AE_DEFAULT)


def build_config(folder):
    """The ``BagelConfig`` for ``folder`` (module docstring) and the autoencoder parameters."""
    ns = require()
    folder = Path(folder)
    for name in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a BAGEL model folder: {name} is missing (expected "
                                    "llm_config.json, vit_config.json, ema.safetensors, ae.safetensors and the "
                                    "tokenizer files)")
    llm = json.loads((folder / "llm_config.json").read_text())
    llm.update(qk_norm=True, tie_word_embeddings=False, layer_module="Qwen2MoTDecoderLayer")
    vit = json.loads((folder / "vit_config.json").read_text())
    vit["rope"] = False
    ae = ae_params(folder)
    shapes = _shapes(folder / "ema.safetensors")
    max_latent = _isqrt(shapes["latent_pos_embed.pos_embed"][0], "latent_pos_embed") \
        if "latent_pos_embed.pos_embed" in shapes else 64
    vit_side = _isqrt(shapes["vit_pos_embed.pos_embed"][0], "vit_pos_embed") \
        if "vit_pos_embed.pos_embed" in shapes else 70
    patch = 2
    if "vae2llm.weight" in shapes:
        patch = _isqrt(shapes["vae2llm.weight"][1] // ae["z_channels"], "vae2llm input / z_channels")
    stated = folder / "config.json"
    if stated.is_file():
        said = json.loads(stated.read_text()).get("max_latent_size")
        if said is not None and said != max_latent:
            log.info("%s states max_latent_size=%s; the weights hold %s (used)", stated, said, max_latent)
    cfg = ns.BagelConfig(text_config=llm, vision_config=vit, visual_und=True, visual_gen=True, stage=2,
                         max_latent_size=max_latent, latent_patch_size=patch, vit_patch_size=vit["patch_size"],
                         vit_max_num_patch_per_side=vit_side, connector_act="gelu_pytorch_tanh",
                         vit_select_layer=-2, interpolate_pos=False, vit_rope=False, timestep_shift=1.0,
                         pad_token_id=llm.get("pad_token_id") or 151643,
                         vae_config={"z_channels": ae["z_channels"], "downsample": ae["downsample"]})
    return cfg, ae


def _assign_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys (e.g. {missing[:4]}) and {len(unexpected)} unexpected "
                         f"keys (e.g. {unexpected[:4]}); the folder does not hold this BAGEL architecture")


def load_modules(folder, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Build and strictly load ``(bagel, autoencoder, config)`` from ``folder``: BAGEL in ``dtype``, the
    autoencoder in float32, both in eval mode on ``device``."""
    from safetensors.torch import load_file
    ns = require()
    cfg, ae = build_config(folder)
    with torch.device("meta"):
        bagel = ns.Bagel(cfg)
        vae = ns.AutoEncoder(ns.AutoEncoderParams(**ae))
    state = load_file(str(Path(folder) / "ema.safetensors"), device=str(device))
    _assign_strict(bagel, {f"model.{k}": v.to(dtype) for k, v in state.items()}, f"{folder}/ema.safetensors")
    del state
    lm = bagel.model.language_model.model
    lm.rotary_emb = ns.qwen2.Qwen2RotaryEmbedding(config=cfg.text_config).to(device)  # a buffer not in the checkpoint
    _assign_strict(vae, {k: v.float() for k, v in load_file(str(Path(folder) / "ae.safetensors"),
                                                               device=str(device)).items()},
                   f"{folder}/ae.safetensors")
    vae.reg.sample = False   # encode to the posterior mean: no noise outside the trainer's generators
    for name, t in list(bagel.named_parameters()) + list(bagel.named_buffers()) + list(vae.named_parameters()):
        if t.is_meta:
            raise ValueError(f"{name} was not loaded from {folder}")
    return bagel.eval(), vae.eval(), cfg


def load_tokenizer(folder):
    """The folder's tokenizer and BAGEL's special ids (``bos`` = ``<|im_start|>``, ``eos`` = ``<|im_end|>``,
    ``soi`` / ``eoi`` = the vision start / end tokens)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = {}
    for key, text in SPECIAL.items():
        i = tok.convert_tokens_to_ids(text)
        if i is None or i == tok.unk_token_id:
            raise ValueError(f"the tokenizer in {folder} has no {text} token; BAGEL's tokenizer has all of "
                             f"{list(SPECIAL.values())}")
        ids[key] = int(i)
    return tok, ids


def default_resolution(folder, options: Optional[dict] = None) -> int:
    """Generation resolution: ``model.options`` ``resolution=``, else the folder's ``generation.json``, else 512."""
    if options and "resolution" in options:
        return int(options["resolution"])
    f = Path(folder) / "generation.json"
    if f.is_file():
        return int(json.loads(f.read_text()).get("resolution", 512))
    return 512
