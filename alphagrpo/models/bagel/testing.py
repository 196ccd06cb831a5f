"""A tiny random BAGEL for CPU tests and the command-line test: built from a config in code, no downloads.

Same module classes as BAGEL-7B-MoT (nemo's MoT Qwen2, SigLIP-NaViT, FLUX-style autoencoder), scaled down: 2 decoder
layers of width 64 (4 query heads, 2 key/value heads), a 2-layer ViT of width 32 on 8-pixel patches, an autoencoder
with 32 channels, z = 4 and factor 8, and a byte-level BPE tokenizer trained in memory on a few sentences (plus
BAGEL's special tokens), so any prompt tokenizes. At the default 64 px an image is 16 latent tokens of 16 values.
``save_tiny_bagel(folder)`` writes the files a BAGEL folder has (plus our ``ae_config.json`` and
``generation.json``), which ``load_bagel`` reads like the real one. ``random_bagel`` builds any size (the bench's
BAGEL-7B-MoT-shaped model).

Pitfalls handled (ADAPTERS.md): ``pad_token_id`` inside the tiny vocabulary; ``stage=2`` (otherwise the layer class
is the non-MoT one); ViT ``image_size / patch_size == vit_max_num_patch_per_side``; ``llm2vae`` re-initialised (it is
zero-initialised, which makes every velocity 0); the LM head's ``<|im_end|>`` row doubled so that sampled think
texts stop at varied lengths (the per-sample stop is exercised).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from alphagrpo.models.bagel._nemo import require
from alphagrpo.models.bagel.loading import SPECIAL

TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, model_type="qwen2")
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=8,
                image_size=64, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                model_type="siglip_vision_model")   # 3 layers stated: BAGEL drops the last (vit_select_layer=-2)
TINY_AE = dict(resolution=64, in_channels=3, downsample=8, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1],
               num_res_blocks=1, z_channels=4, scale_factor=0.3611, shift_factor=0.1159)
TINY_RESOLUTION = 64
TINY_MAX_LATENT = 8           # latent grid side limit (64 px / 16 = 4 needed)
TINY_VIT_SIDE = 8             # = image_size / patch_size


# what the tiny tokenizer learns merges from: BAGEL's system prompt, SRR's reflection instruction, the test prompts'
# words. Short token sequences keep the CPU tests fast; any text still tokenizes (byte fallback of byte-level BPE).
CORPUS = ("You should first think about the planning process in the mind and then generate the image. The planning "
          "process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here "
          "the user asked for an image of . you tried and failed to produce the correct image . reflect on what went "
          "wrong and write the editing instruction . make a bright light dark image please is the ? plan : white "
          "black red green blue yellow purple orange circle square triangle star big small left right above below "
          "one two three four a an of and in on at to with next behind front")


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on ``CORPUS`` (about 400 tokens) with BAGEL's special tokens, as
    a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"] + list(SPECIAL.values()), show_progress=False)
    t.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   model_max_length=4096)


class BrightnessJudge:
    """A ``Verifier`` for the command-line tests: every question scores the image's mean brightness in [0, 1]."""

    def score(self, images, question_lists):
        return [[float(np.asarray(img, dtype=np.float32).mean() / 255.0)] * len(qs)
                for img, qs in zip(images, question_lists)]


def brightness(data=None):
    """A world loader (``data.world=alphagrpo.models.bagel.testing:brightness``) for the command-line tests: four
    prompts asking for bright images, scored by ``BrightnessJudge``; builds in microseconds."""
    from alphagrpo.worlds.base import World

    def rec(i):
        return {"prompt": ["a bright image", "a light image please", "make a bright white image", "a light sky"][i],
                "semantic_questions": [{"question": "is the image bright ?", "tag": "Attribute"}],
                "quality_questions": [{"question": "is the image well lit ?", "tag": "Lighting"}]}
    return World(train=[rec(i) for i in range(4)], test=[rec(i) for i in range(2)], verifier=BrightnessJudge(),
                 name="brightness")


# BAGEL-7B-MoT's shapes (Qwen2.5-7B in both experts, SigLIP-so400m with 27 stated layers, the FLUX autoencoder),
# for random-weight cost measurements (bench/bagel_smoke.py --random 7b)
BAGEL_7B_LLM = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, model_type="qwen2",
                    vocab_size=152064)
BAGEL_7B_VIT = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    patch_size=14, image_size=980, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh", model_type="siglip_vision_model")
BAGEL_7B_AE = dict(resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4],
                   num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159)


def random_bagel(llm: dict, vit: dict, ae: dict, *, max_latent: int, vit_side: int, tokenizer, seed: int = 0,
                 device="cpu", dtype: torch.dtype = torch.float32):
    """``(bagel, autoencoder)`` with random weights: BAGEL in ``dtype`` (built directly in it, on ``device``), the
    autoencoder in float32; both as built (train mode). ``llm["vocab_size"]`` defaults to the tokenizer's size."""
    ns = require()
    llm = dict(llm, pad_token_id=tokenizer.pad_token_id, qk_norm=True, layer_module="Qwen2MoTDecoderLayer")
    llm.setdefault("vocab_size", len(tokenizer))
    cfg = ns.BagelConfig(text_config=llm, vision_config=dict(vit, rope=False), visual_und=True, visual_gen=True,
                         stage=2, max_latent_size=max_latent, latent_patch_size=2, vit_patch_size=vit["patch_size"],
                         vit_max_num_patch_per_side=vit_side, connector_act="gelu_pytorch_tanh",
                         vit_select_layer=-2, vit_rope=False, timestep_shift=1.0, pad_token_id=tokenizer.pad_token_id,
                         vae_config={"z_channels": ae["z_channels"], "downsample": ae["downsample"]})
    devs = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devs):
        torch.manual_seed(seed)
        try:
            torch.set_default_dtype(dtype)
            with torch.device(device):
                bagel = ns.Bagel(cfg)
        finally:
            torch.set_default_dtype(old)
        with torch.device(device):
            vae = ns.AutoEncoder(ns.AutoEncoderParams(**ae))
        m = bagel.model
        torch.nn.init.normal_(m.llm2vae.weight, std=0.2 / (llm["hidden_size"] / 64) ** 0.5)   # zero as built
        torch.nn.init.normal_(m.llm2vae.bias, std=0.1)
    return bagel, vae


def tiny_bagel(seed: int = 0):
    """``(bagel, autoencoder, tokenizer)``: random tiny modules in float32 and train mode, as built."""
    tok = tiny_tokenizer()
    bagel, vae = random_bagel(TINY_LLM, TINY_VIT, TINY_AE, max_latent=TINY_MAX_LATENT, vit_side=TINY_VIT_SIDE,
                              tokenizer=tok, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        m = bagel.model
        torch.nn.init.normal_(m.language_model.lm_head.weight, std=0.5)   # peaked next-token distributions
        torch.nn.init.normal_(m.language_model.model.embed_tokens.weight, std=0.5)
        m.language_model.lm_head.weight.data[tok.convert_tokens_to_ids(SPECIAL["eos"])] *= 2.0  # varied think lengths
    return bagel, vae, tok


def save_tiny_bagel(folder, seed: int = 0) -> Path:
    """Write a tiny BAGEL folder (bfloat16 weights) that ``load_bagel`` reads; returns its path."""
    from safetensors.torch import save_file
    bagel, vae, tok = tiny_bagel(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llm = dict(TINY_LLM, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    (folder / "llm_config.json").write_text(json.dumps(llm, indent=1))
    (folder / "vit_config.json").write_text(json.dumps(TINY_VIT, indent=1))
    (folder / "ae_config.json").write_text(json.dumps(TINY_AE, indent=1))
    (folder / "generation.json").write_text(json.dumps({"resolution": TINY_RESOLUTION}))
    state = {k.removeprefix("model."): v.detach().to(torch.bfloat16).contiguous()
             for k, v in bagel.state_dict().items()}
    save_file(state, str(folder / "ema.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(folder / "ae.safetensors"))
    tok.save_pretrained(str(folder))
    return folder
