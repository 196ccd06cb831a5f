"""A tiny random ``StableDiffusion3Pipeline`` built entirely in code (no downloads), for tests and CPU smoke runs.

``tiny_sd3_pipeline(path)`` writes a complete pipeline folder that ``StableDiffusion3Pipeline.from_pretrained`` and
``alphagrpo`` (``model.kind=sd3``, ``model.path=path``) both load: an SD3.5-shaped ``SD3Transformer2DModel`` (2
joint blocks, the first with dual attention, RMS q/k norms), two CLIP text encoders with projection, a T5 encoder
whose width is the transformer's ``joint_attention_dim``, a four-block ``AutoencoderKL`` (factor 8, 16 latent
channels, SD3.5's shift/scaling factors) and ``FlowMatchEulerDiscreteScheduler(shift=3)``. Tokenizers are built in
memory from a character vocabulary (CLIP: BPE with no merges; T5: a unigram model over characters).

Pitfalls this avoids: every model is put in ``eval()`` (T5 dropout breaks the on-policy ratio), the
CLIP configs' ``eos_token_id`` is the tokenizer's (CLIP pools at the first eos), the CLIP tokenizer's
``model_max_length`` is 77 (the pipeline pads to it).

Needs the ``diffusers`` extra. Building and saving takes well under a second on a CPU after the imports.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = [c for c in string.printable if not c.isspace()]


def _require():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("the tiny SD3 pipeline needs diffusers and transformers: pip install "
                          "'alphagrpo[diffusers]'") from e


def tiny_tokenizers():
    """``(clip_tokenizer, t5_tokenizer)`` over printable ASCII characters, built in memory."""
    _require()
    from transformers import CLIPTokenizer, T5Tokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in CHARS] + [("\u2581" + c, -1.5) for c in CHARS]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


# The transformer of stable-diffusion-3.5-medium (its transformer/config.json): 2.24B parameters.
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def tiny_sd3_pipeline(path=None, *, seed: int = 0, resolution: int = 32, heads: int = 2, head_dim: int = 8,
                      layers: int = 2, transformer: dict | None = None, device="cpu"):
    """Build the tiny random pipeline (weights drawn from ``seed``); with ``path``, also save it there. Returns the
    pipeline (float32, every model in ``eval()``). ``resolution`` sets the transformer's ``sample_size`` (any
    multiple of 16 up to 256 px works, through the position-embedding crop).

    ``transformer``: a full ``SD3Transformer2DModel`` config instead (e.g. ``SD35_MEDIUM_TRANSFORMER``: a randomly
    initialised transformer of the real shape, for throughput and memory measurements); it is built directly on
    ``device`` and the tiny encoders are widened to match its ``joint_attention_dim`` / ``pooled_projection_dim``."""
    _require()
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_tokenizers()
    clip_width, proj = 8, 8
    inner = heads * head_dim
    joint = max(inner, 2 * clip_width)          # T5 width: at least the two CLIP widths summed (zero-padded to it)
    if transformer is not None:
        joint, proj = transformer["joint_attention_dim"], transformer["pooled_projection_dim"] // 2

    def clip_model(s):
        torch.manual_seed(seed * 100 + s)
        cfg = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=clip_width, intermediate_size=2 * clip_width,
                             num_attention_heads=2, num_hidden_layers=2, projection_dim=proj,
                             max_position_embeddings=77, hidden_act="gelu", bos_token_id=clip_tok.bos_token_id,
                             eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
        return CLIPTextModelWithProjection(cfg).eval()

    te1, te2 = clip_model(1), clip_model(2)
    torch.manual_seed(seed * 100 + 3)
    te3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=joint, d_kv=4, d_ff=min(2 * joint, 64), num_layers=2,
                                  num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                  pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                                  decoder_start_token_id=t5_tok.pad_token_id)).eval()
    torch.manual_seed(seed * 100 + 4)
    config = transformer or dict(
        sample_size=resolution // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
        caption_projection_dim=inner, pooled_projection_dim=2 * proj, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).eval()
    torch.manual_seed(seed * 100 + 5)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=resolution,
                        shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2,
                                    tokenizer_2=clip_tok, text_encoder_3=te3, tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(str(path))
    return pipe
