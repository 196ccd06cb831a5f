"""A loaded transformers vision-language verifier: model, tokenizer, image processor, and the query cut in pieces.

Shared by the ``hf`` and ``native`` backends (and the fake TensorRT-LLM module of the tests). It does not use the
transformers ``AutoProcessor``: building one needs torchvision (its video half), and the engine needs the pieces
anyway. The query is the model's chat template rendered once with a sentinel question (``prompt.split_chat_template``)
and tokenised in four parts::

    head_ids + [image_token_id] * n_image_tokens + mid_ids  |  tokenize(carry + question + after)
    \\______________ shared prefix, one per image ________/     \\________ per-question suffix ________/

The cut sits right after the last special token before the question (``<|vision_end|>`` for Qwen), where every
tokenizer splits anyway, so the pieces tokenise exactly as the whole string does; ``__init__`` checks that on a
sample and raises if a template breaks it. ``full_ids`` tokenises the whole string at once: the oracle's path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .prompt import SYSTEM_PROMPT, AnswerTokens, PromptParts, answer_tokens, split_chat_template

_MODEL_CLASSES = {  # config.model_type -> transformers class; anything else goes through the Auto class
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the hf and native verifier backends need transformers: pip install 'alphagrpo[hf]'") from e
    return transformers


def to_pil(image: Any):
    """A ``PIL.Image`` in RGB from a PIL image or a ``uint8`` ``[H, W, 3]`` array."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be PIL images or uint8 [H, W, 3] arrays, got {arr.dtype} {list(arr.shape)}")
    return Image.fromarray(arr, "RGB")


def resolve_device_dtype(device: str | None = "auto", dtype: Any = "auto"):
    """``auto`` means CUDA + bfloat16 when a GPU is visible, else CPU + float32."""
    import torch
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
        dtype = names[dtype]
    return device, dtype


def load_model(path: str, dtype, device, attn_implementation: str = "sdpa"):
    """Load a local checkpoint with the family's class (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) or the Auto class."""
    tf = import_transformers()
    cfg = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    cls_name = _MODEL_CLASSES.get(cfg.model_type)
    cls = getattr(tf, cls_name, None) if cls_name else None
    cls = cls or tf.AutoModelForImageTextToText
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    if device.type == "cuda":  # load straight onto the GPU when this transformers can (no CPU copy of the weights)
        try:
            return cls.from_pretrained(path, device_map=str(device), **kwargs).eval()
        except (ImportError, ValueError, TypeError):  # e.g. device_map needs accelerate here
            pass
    return cls.from_pretrained(path, **kwargs).to(device).eval()


def _load_chat_template(path: str, tokenizer) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


@dataclass
class VLBundle:
    """Model + tokenizer + image processor + the query in pieces (see the module docstring)."""
    model: Any
    tokenizer: Any
    image_processor: Any
    chat_template: str | None = None
    system_prompt: str = SYSTEM_PROMPT
    parts: PromptParts = field(init=False)
    answers: AnswerTokens = field(init=False)

    def __post_init__(self):
        import torch
        cfg = self.model.config
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.image_token_id = int(cfg.image_token_id)
        self.merge_size = int(cfg.vision_config.spatial_merge_size)
        self.answers = answer_tokens(self.tokenizer)
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the tokenizer has no chat template; pass chat_template= or add chat_template.jinja "
                             "to the model directory")
        self.parts = split_chat_template(self.tokenizer, template, self.system_prompt)
        image_str = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.parts.before.count(image_str) != 1:
            raise ValueError(f"the rendered query holds the image token {image_str!r} "
                             f"{self.parts.before.count(image_str)} times before the question; expected once")
        self._image_str = image_str
        head, rest = self.parts.before.split(image_str)
        specials = [s for s in set(self.tokenizer.get_added_vocab()) | set(self.tokenizer.all_special_tokens) if s]
        cut = max((rest.rfind(s) + len(s) for s in specials if s in rest), default=0)
        self.head_ids = self._encode(head)
        self.mid_ids = self._encode(rest[:cut])
        self.carry = rest[cut:]
        self._suffix_cache: dict[str, list[int]] = {}
        sample = "Is the red circle left of the square?"
        pieces = self.prefix_ids(4) + self.suffix_ids([sample])[0]
        if pieces != self.full_ids(sample, 4):
            raise ValueError("tokenising the query in pieces differs from tokenising it whole for this chat template; "
                             "the shared-prefix cut is unsafe here")
        self.answer_index = torch.tensor(self.answers.ids, dtype=torch.long, device=self.device)

    # ---- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: Any = "auto", device: str | None = "auto",
                        attn_implementation: str = "sdpa", system_prompt: str = SYSTEM_PROMPT) -> "VLBundle":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model path {path!r} is not a local directory (the engine never downloads)")
        tf = import_transformers()
        device, dtype = resolve_device_dtype(device, dtype)
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        ip = tf.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = load_model(path, dtype, device, attn_implementation)
        return cls(model, tok, ip, _load_chat_template(path, tok), system_prompt)

    # ---- tokens --------------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def prefix_ids(self, n_image_tokens: int) -> list[int]:
        return self.head_ids + [self.image_token_id] * n_image_tokens + self.mid_ids

    def suffix_ids(self, questions: Sequence[str]) -> list[list[int]]:
        """Token ids of ``carry + question + after`` per question (memoised: a group's images share questions)."""
        missing = [q for q in dict.fromkeys(questions) if q not in self._suffix_cache]
        if missing:
            if len(self._suffix_cache) > 50_000:
                self._suffix_cache.clear()
            enc = self.tokenizer([self.carry + q + self.parts.after for q in missing], add_special_tokens=False)
            self._suffix_cache.update(zip(missing, (list(e) for e in enc["input_ids"])))
        return [self._suffix_cache[q] for q in questions]

    def full_ids(self, question: str, n_image_tokens: int) -> list[int]:
        """The whole query tokenised as one string (the oracle's path)."""
        text = self.parts.render(question).replace(self._image_str, self._image_str * n_image_tokens)
        return self._encode(text)

    # ---- images --------------------------------------------------------------------------------------------------
    def prepare(self, images: Sequence[Any], question_lists: Sequence[Sequence[str]], expected_answers=None):
        """What every backend's ``score`` starts with: validate the batch and the expected answers, make the output
        (zeros), and preprocess the images that have questions. Returns ``(expected, out, keep, preprocessed)``;
        ``preprocessed`` is ``None`` when no image has a question."""
        from .prompt import check_expected
        from .protocol import check_batch
        check_batch(images, question_lists)
        expected = check_expected(expected_answers, question_lists)
        out = [[0.0] * len(qs) for qs in question_lists]
        keep = [i for i, qs in enumerate(question_lists) if len(qs)]
        pre = self.preprocess([images[i] for i in keep]) if keep else None
        return expected, out, keep, pre

    def preprocess(self, images: Sequence[Any]):
        """``(pixel_values, grid_thw (B, 3), n_tokens per image, patch offsets (B + 1))`` for the vision tower."""
        import torch
        pil = [to_pil(im) for im in images]
        out = self.image_processor(images=pil, return_tensors="pt")
        grid = out["image_grid_thw"].to(torch.long)
        patches = grid.prod(-1)
        offsets = [0] + torch.cumsum(patches, 0).tolist()
        n_tokens = (patches // (self.merge_size ** 2)).tolist()
        return out["pixel_values"], grid, n_tokens, offsets

    def check_question(self, question: str) -> None:
        """Raise a ``ValueError`` when ``question`` holds one of the tokenizer's special tokens (``<|image_pad|>``,
        ``<|im_end|>``, ...): they would change the query's structure, and an image placeholder breaks the model."""
        if not hasattr(self, "_special_strings"):
            tok = self.tokenizer
            decoder = getattr(tok, "added_tokens_decoder", None)
            if isinstance(decoder, dict):  # added tokens marked special (not Qwen's plain <think>, <tool_call>)
                specials = {str(getattr(t, "content", t)) for t in decoder.values() if getattr(t, "special", True)}
            else:
                specials = set(tok.get_added_vocab())
            specials |= set(tok.all_special_tokens)
            self._special_strings = tuple(sorted(t for t in specials if t and not t.isspace()))
        for t in self._special_strings:
            if t in question:
                raise ValueError(f"holds the model's special token {t!r}; send plain text")

    def image_spec(self):
        """The image processor's limits and resize rule as a ``protocol.ImageSpec`` (``None`` when it is not a
        Qwen-VL-style processor whose rule is known: ``smart_resize`` with a pixel budget, ``patch_size``,
        ``merge_size``). ``target_size`` is given only where resizing ahead gives exactly what the processor would
        make of the original (the processor's own rule is idempotent there)."""
        import sys
        from .protocol import ImageSpec
        ip = self.image_processor
        resize = getattr(sys.modules.get(type(ip).__module__), "smart_resize", None)
        size = getattr(ip, "size", None)

        def field(name):
            v = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
            return v if isinstance(v, int) and v > 0 else None
        max_px = getattr(ip, "max_pixels", None) or field("longest_edge")
        min_px = getattr(ip, "min_pixels", None) or field("shortest_edge")
        patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
        if resize is None or not all(isinstance(v, int) and v > 0 for v in (max_px, min_px, patch, merge)):
            return None
        factor = patch * merge
        resample = getattr(ip, "resample", 3)

        def target_size(width: int, height: int):
            try:
                h, w = resize(height, width, factor=factor, min_pixels=min_px, max_pixels=max_px)
                if resize(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px) != (h, w):
                    return None
            except ValueError:
                return None
            return int(w), int(h)
        return ImageSpec(max_aspect_ratio=200.0, target_size=target_size,
                         resample=int(resample) if isinstance(resample, int) else 3)

    def model_inputs(self, input_ids, attention_mask, pixel_values, grid) -> dict:
        """Keyword arguments for the transformers model (``mm_token_type_ids`` where the version wants it)."""
        import torch
        kw = dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                  pixel_values=pixel_values.to(self.device, self.dtype), image_grid_thw=grid.to(self.device))
        if self._wants_mm_token_types():
            kw["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32).to(self.device)
        return kw

    def _wants_mm_token_types(self) -> bool:
        if not hasattr(self, "_mm_types"):
            import inspect
            self._mm_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        return self._mm_types
