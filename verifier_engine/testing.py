"""Tiny random-weight Qwen2.5-VL / Qwen3-VL verifiers built entirely in code, for tests, benchmarks and demos.

No downloads: the tokenizer is a byte-level BPE trained here on a few sentences (so "yes"/" yes"/"Yes" are single
tokens, as in the real Qwen vocabularies), the chat template is a short Qwen-style Jinja template written for this
project, and the image processor is transformers' PIL Qwen2-VL processor constructed with explicit arguments.
Families: ``qwen2_5_vl``, ``qwen3_vl`` and ``qwen3_vl_moe`` (tiny only). ``make_tiny_model(path, family)`` saves
all of it as a local checkpoint directory that every ``--model PATH`` entry point accepts. ``SHAPES`` also holds random-weight configurations shaped like Qwen2.5-VL-3B and Qwen3-VL-2B for
GPU benchmarks (built on the GPU directly, never saved).

Also here: ``serve_in_thread`` (run an ASGI app on 127.0.0.1 in a background thread) and ``random_images``.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

# A Qwen-style chat template, written for this project: system turn, user turn whose content is a string or a list
# of image/text items, generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or item['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are an expert visual auditor. Answer only with 'yes' or 'no'. "
    "If the subjects in the question don't exist, answer 'no'.",
    "Is there a red circle in the image? Are there exactly two blue squares? Is the triangle left of the square?",
    "Does the image look sharp, well lit and coherent? Is the text legible? Is the anatomy correct?",
    "Is the style a watercolor painting? Is the dog sitting on the bench behind the tree?",
] + ["Yes yes YES No no NO yes no Yes No"] * 40


def _require_hf():
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover
        raise ImportError("verifier_engine.testing needs transformers: pip install 'alphagrpo[hf]'") from e


def tiny_tokenizer(vocab_size: int = 400):
    """A fast tokenizer (byte-level BPE) with the Qwen special tokens and ``CHAT_TEMPLATE``."""
    _require_hf()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# Model shapes: "tiny" for CPU tests, "small" for the CPU benchmark, and GPU-benchmark shapes of the real models.
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_5_vl": {
        "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, mrope_section=[2, 3, 3], rope_theta=10000.0),
                     vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                                 fullatt_block_indexes=[1]), init_std=0.25),
        "small": dict(text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=2, mrope_section=[4, 6, 6], rope_theta=10000.0),
                      vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, window_size=112,
                                  fullatt_block_indexes=[1])),
        "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                             num_key_value_heads=2, mrope_section=[16, 24, 24], rope_theta=1000000.0,
                             vocab_size=151936),
                   vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31]),
                   tie_word_embeddings=True),
    },
    "qwen3_vl": {
        "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3], rope_theta=10000.0),
                     vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                 num_position_embeddings=64, deepstack_visual_indexes=[0]), init_std=0.25),
        "small": dict(text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=32, mrope_section=[4, 6, 6], rope_theta=10000.0),
                      vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                  num_position_embeddings=256, deepstack_visual_indexes=[0])),
        "2b": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20], rope_theta=5000000.0,
                             vocab_size=151936),
                   vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                               num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
                   tie_word_embeddings=True),
    },
    "qwen3_vl_moe": {
        "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3], rope_theta=10000.0,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                     vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                 num_position_embeddings=64, deepstack_visual_indexes=[0]), init_std=0.25),
    },
}
FAMILIES = tuple(SHAPES)


def tiny_config(family: str = "qwen2_5_vl", size: str = "tiny", tokenizer=None):
    """A transformers config for ``family`` at ``size`` (see ``SHAPES``), token ids taken from ``tokenizer``."""
    _require_hf()
    if family not in SHAPES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in SHAPES[family]:
        raise ValueError(f"size must be one of {tuple(SHAPES[family])} for {family}, got {size!r}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    shape = SHAPES[family][size]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(shape["text"])
    mrope = text.pop("mrope_section")
    rope = dict(rope_type="default", rope_theta=text.pop("rope_theta"), mrope_section=mrope)
    text.setdefault("vocab_size", len(tok))
    std = shape.get("init_std", 0.02)
    text.update(initializer_range=std, max_position_embeddings=8192, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=shape.get("tie_word_embeddings", False), initializer_range=std)
    vision = dict(shape["vision"], out_hidden_size=text["hidden_size"], spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=std)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        vision.update(patch_size=14)
        return Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope), vision_config=vision, **common)
    import transformers
    cfg_cls = transformers.Qwen3VLMoeConfig if family == "qwen3_vl_moe" else transformers.Qwen3VLConfig
    rope["mrope_interleaved"] = True
    vision.update(patch_size=16)
    return cfg_cls(text_config=dict(text, rope_parameters=rope), vision_config=vision, **common)


def tiny_image_processor(family: str = "qwen2_5_vl", max_pixels: int = 128 * 128):
    """transformers' PIL Qwen2-VL image processor with explicit arguments (no torchvision, no download)."""
    _require_hf()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    patch = 14 if family == "qwen2_5_vl" else 16
    kwargs = dict(patch_size=patch, temporal_patch_size=2, merge_size=2, min_pixels=(patch * 2) ** 2,
                  max_pixels=max_pixels)
    if family != "qwen2_5_vl":
        kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen2VLImageProcessorPil(**kwargs)


def build_tiny(family: str = "qwen2_5_vl", size: str = "tiny", seed: int = 0, dtype=None, device=None,
               max_pixels: int = 128 * 128):
    """``(model, tokenizer, image_processor)``: a random-weight model in eval mode, built on ``device``."""
    _require_hf()
    import torch
    from transformers import AutoModelForImageTextToText
    tok = tiny_tokenizer()
    cfg = tiny_config(family, size, tok)
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tok, tiny_image_processor(family, max_pixels)


def make_tiny_model(path: str, family: str = "qwen2_5_vl", size: str = "tiny", seed: int = 0) -> str:
    """Save a tiny random-weight verifier (model, tokenizer, chat template, image processor) under ``path``."""
    model, tok, ip = build_tiny(family, size, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ip.save_pretrained(path)
    return path


def random_images(n: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> list[np.ndarray]:
    """``n`` uint8 ``[H, W, 3]`` images: smooth colour gradients plus noise (not constant, so PNG stays small)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        base = rng.uniform(0, 255, size=3)
        img = base + 60 * np.sin(xx[..., None] / rng.uniform(3, 12) + yy[..., None] / rng.uniform(3, 12)
                                 + rng.uniform(0, 6, size=3))
        out.append(np.clip(img + rng.normal(0, 10, size=(h, w, 3)), 0, 255).astype(np.uint8))
    return out


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", start_timeout: float = 20.0) -> Iterator[str]:
    """Run an ASGI ``app`` with uvicorn on ``host`` and a free port in a daemon thread; yields the base URL."""
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover
        raise ImportError("serve_in_thread needs uvicorn: pip install 'alphagrpo[serve]'") from e
    config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="verifier-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
