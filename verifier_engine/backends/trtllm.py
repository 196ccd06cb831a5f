"""``trtllm``: TensorRT-LLM's LLM API (PyTorch backend, TensorRT-LLM >= 1.2), reading the yes/no logits of the first
generated token.

VALIDATED AGAINST THE API, NOT YET MEASURED ON A GPU: TensorRT-LLM needs CUDA to install, so the CPU tests run this
backend against a strict fake ``tensorrt_llm`` module (tests/test_verifier_trtllm.py) that accepts only the argument
names of the 1.2 API and models salted KV-cache block reuse; ``bench/trtllm_check.py`` is the prepared GPU check.

What it calls, all of it TensorRT-LLM 1.2's public LLM API:

- ``tensorrt_llm.LLM(model=path, gather_generation_logits=True, kv_cache_config=KvCacheConfig(
  free_gpu_memory_fraction=f, enable_block_reuse=True), max_num_tokens=n, enable_iter_perf_stats=True)``. In 1.x
  ``tensorrt_llm.LLM`` is the PyTorch backend (the engine-building TensorRT path, which does not run Qwen2.5-VL, is
  ``backend="tensorrt"``); ``gather_generation_logits`` keeps the logits on the worker side until asked for;
  ``max_num_tokens`` must hold the longest prompt (the PyTorch backend rejects longer prompts unless chunked prefill
  is on), so it is sized from the image processor's largest image plus a question budget.
- ``llm.generate_async({"prompt": str, "multi_modal_data": {"image": [PIL.Image]}}, SamplingParams(max_tokens=1,
  return_generation_logits=True), cache_salt=salt)`` and ``result()``; the prompt is the model's chat template with
  the image placeholder unexpanded (TensorRT-LLM's input processor expands it).
- ``output.outputs[0].generation_logits``: raw logits, the vocabulary last, first generated token first. Only the
  yes/no columns are read (``index_select`` on the device), never a top-k list, and no sampling setting matters.
- ``llm.get_stats()``: per-iteration statistics whose ``kvCacheStats`` hold the engine's cumulative ``reusedBlocks``
  and ``missedBlocks``; ``backend_metrics()`` turns them into the KV-cache hit rate the server exports on /metrics.

Prefix reuse, and why it is per image: KV-cache blocks are reusable once the request that filled them finished its
context phase; requests admitted in the same scheduler iteration do not share. So ``score`` submits the first
question of every image, and submits the remaining questions of an image as soon as its first one is done: those
find the system prompt + image blocks in the cache. Every request carries ``cache_salt`` = a digest of the image's
pixels: TensorRT-LLM keys blocks that hold image tokens by a hash of the image, but if that hashing fails it falls
back to plain placeholder tokens, and two different images of the same size would then share keys. With the salt,
reuse can only happen between requests about the same pixels, whatever the hashing does. ``image_hashing()`` says
what the engine did (``input_processor.multimodal_hashing_supported``).

Models: Qwen2.5-VL always (>= 1.2); Qwen3-VL / Qwen3-VL-MoE only when the installed TensorRT-LLM registers them.
TensorRT-LLM pins its own transformers version: install it in its own environment (or its container), not next to
the ``hf`` extra. Prompts are rendered with the tokenizer found in the model directory.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
from typing import Any, Sequence

from ..prompt import SYSTEM_PROMPT, answer_tokens, apply_expected, check_expected, split_chat_template
from ..protocol import check_batch

log = logging.getLogger(__name__)

MIN_VERSION = (1, 2)
ALWAYS_SUPPORTED = ("Qwen2_5_VLForConditionalGeneration",)
"""Architectures this backend runs on every TensorRT-LLM >= 1.2."""
IF_REGISTERED = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
"""Architectures it runs only when the installed TensorRT-LLM's PyTorch model registry has them."""
DEFAULT_IMAGE_TOKENS = 16384  # Qwen2.5-VL's default max_pixels 12845056 / (14 * 2) ** 2


def import_trtllm():
    try:
        import tensorrt_llm
    except ImportError as e:
        raise ImportError("the trtllm backend needs TensorRT-LLM >= 1.2 (CUDA only): pip install 'alphagrpo[trtllm]' "
                          "in an environment of its own (it pins its own transformers)") from e
    return tensorrt_llm


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.2.0rc6"`` -> ``(1, 2, 0)``; the leading numeric release only."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not m:
        raise ValueError(f"cannot read a version from {text!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def check_version(trt) -> str:
    """The installed version; ``RuntimeError`` naming what is needed when it is older than 1.2."""
    version = getattr(trt, "__version__", "unknown")
    try:
        ok = parse_version(version)[:2] >= MIN_VERSION
    except ValueError:
        ok = False
    if not ok:
        raise RuntimeError(f"the trtllm backend needs TensorRT-LLM >= {'.'.join(map(str, MIN_VERSION))} (the PyTorch "
                           f"LLM API with cache_salt and Qwen2.5-VL); found {version}. Upgrade: pip install "
                           f"'tensorrt-llm>=1.2'")
    return version


def supported_architectures(trt) -> tuple[str, ...]:
    """The Hugging Face architectures this backend accepts with the installed TensorRT-LLM."""
    registry: dict = {}
    try:
        importlib.import_module("tensorrt_llm._torch.models")  # registers the model classes
        registry = importlib.import_module("tensorrt_llm._torch.models.modeling_utils").MODEL_CLASS_MAPPING
    except (ImportError, AttributeError) as e:
        log.warning("could not read TensorRT-LLM's model registry (%s); assuming Qwen2.5-VL only", e)
    return ALWAYS_SUPPORTED + tuple(a for a in IF_REGISTERED if a in registry)


def check_model(model: str, trt, version: str) -> str:
    """The checkpoint's architecture; ``ValueError`` saying what this TensorRT-LLM supports otherwise."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ValueError(f"the trtllm backend needs a local Hugging Face checkpoint directory with a config.json; "
                         f"could not read {model}/config.json ({e})") from e
    supported = supported_architectures(trt)
    for arch in archs:
        if arch in supported:
            return arch
    missing = [a for a in IF_REGISTERED if a not in supported]
    raise ValueError(f"the trtllm backend with TensorRT-LLM {version} runs {', '.join(supported)}; {model} is "
                     f"{', '.join(archs) or 'of unknown architecture'}"
                     + (f" ({', '.join(missing)} not in this TensorRT-LLM's model registry)" if missing else "")
                     + "; use the native or hf backend for it")


def max_image_tokens(model: str) -> int:
    """Image tokens of the largest image the checkpoint's image processor produces (after merging patches)."""
    try:
        with open(os.path.join(model, "preprocessor_config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return DEFAULT_IMAGE_TOKENS
    max_pixels = cfg.get("max_pixels") or (cfg.get("size") or {}).get("longest_edge")
    patch, merge = cfg.get("patch_size", 14), cfg.get("merge_size", 2)
    if not max_pixels:
        return DEFAULT_IMAGE_TOKENS
    return int(max_pixels) // (int(patch) * int(merge)) ** 2


def check_cache_salt(llm, version: str) -> None:
    """``RuntimeError`` unless ``llm.generate_async`` takes ``cache_salt`` (the per-image isolation depends on it)."""
    import inspect
    try:
        params = inspect.signature(llm.generate_async).parameters
    except (TypeError, ValueError):  # not introspectable: let the first call tell
        return
    if "cache_salt" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise RuntimeError(f"this TensorRT-LLM ({version}) has no cache_salt in LLM.generate_async; the trtllm "
                           f"backend needs it to keep KV-cache reuse within one image. Upgrade TensorRT-LLM")


def image_salt(image) -> str:
    """The ``cache_salt`` of an image: a digest of its size and RGB pixels (same pixels, same salt)."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return "img-" + h.hexdigest()[:32]


class TRTLLMVerifier:
    """Verifier on a ``tensorrt_llm.LLM`` (TensorRT-LLM >= 1.2, PyTorch backend).

    ``kv_cache_fraction``: share of the free GPU memory given to the KV cache (``KvCacheConfig.
    free_gpu_memory_fraction``); ``max_question_tokens``: the question budget used to size ``max_num_tokens``
    (``None`` for that: system prompt + largest image + question budget, at least 8192); ``batch_size``: queries
    handed to the engine at once; ``llm_kwargs``: more ``LLM`` arguments (they override the ones set here);
    ``llm``: an existing LLM (then nothing is constructed or checked about the model)."""

    name = "trtllm"

    def __init__(self, model: str, *, llm: Any = None, tokenizer: Any = None, llm_kwargs: dict | None = None,
                 system_prompt: str = SYSTEM_PROMPT, batch_size: int = 1024, kv_cache_fraction: float = 0.85,
                 max_num_tokens: int | None = None, max_question_tokens: int = 256):
        trt = import_trtllm()
        self.version = check_version(trt)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction}")
        self._trt = trt
        self.architecture = check_model(model, trt, self.version) if llm is None else None
        if tokenizer is None:
            from ..vlm import _load_chat_template, import_transformers
            tokenizer = import_transformers().AutoTokenizer.from_pretrained(model, local_files_only=True)
            template = _load_chat_template(model, tokenizer)
        else:
            template = getattr(tokenizer, "chat_template", None)
        self.answers = answer_tokens(tokenizer)
        self.parts = split_chat_template(tokenizer, template, system_prompt)
        self.batch_size = batch_size
        # the longest prompt: template with the placeholder, the largest image's tokens, the question budget
        template_tokens = len(tokenizer.encode(self.parts.before + self.parts.after, add_special_tokens=False))
        self.longest_prompt = template_tokens + max_image_tokens(model) + max_question_tokens
        if llm is None:
            if max_num_tokens is None:
                max_num_tokens = max(8192, -(-self.longest_prompt // 256) * 256)
            elif max_num_tokens < self.longest_prompt:
                raise ValueError(f"max_num_tokens={max_num_tokens} is below the longest prompt ({self.longest_prompt} "
                                 f"tokens: template + largest image + {max_question_tokens} question tokens); "
                                 f"TensorRT-LLM would reject such prompts")
            kv = importlib.import_module("tensorrt_llm.llmapi").KvCacheConfig(
                free_gpu_memory_fraction=kv_cache_fraction, enable_block_reuse=True)
            kwargs = dict(gather_generation_logits=True, kv_cache_config=kv, max_num_tokens=max_num_tokens,
                          enable_iter_perf_stats=True)
            kwargs.update(llm_kwargs or {})
            llm = trt.LLM(model=model, **kwargs)
        self.llm = llm
        check_cache_salt(llm, self.version)
        self.sampling = trt.SamplingParams(max_tokens=1, return_generation_logits=True)
        self._kv = {"reused_blocks": 0.0, "missed_blocks": 0.0}
        self._hashing_warned = False

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> "TRTLLMVerifier":
        return cls(model, **kwargs)

    # ---- scoring -----------------------------------------------------------------------------------------------
    def score(self, images: Sequence[Any], question_lists: Sequence[Sequence[str]],
              expected_answers: Sequence[Sequence[str | None]] | None = None) -> list[list[float]]:
        import torch

        from ..vlm import to_pil
        check_batch(images, question_lists)
        expected = check_expected(expected_answers, question_lists)
        out = [[0.0] * len(qs) for qs in question_lists]
        keep = [i for i, qs in enumerate(question_lists) if qs]
        ids = torch.tensor(self.answers.ids)
        n_yes = len(self.answers.yes_ids)

        def submit(i, j, pil, salt):
            inp = {"prompt": self.parts.render(question_lists[i][j]), "multi_modal_data": {"image": [pil]}}
            return self.llm.generate_async(inp, self.sampling, cache_salt=salt)

        def read(i, j, res):
            res = res.result()
            logits = res.outputs[0].generation_logits
            if logits is None:
                raise RuntimeError("TensorRT-LLM returned no generation_logits; the LLM needs "
                                   "gather_generation_logits=True and SamplingParams(return_generation_logits=True)")
            logits = torch.as_tensor(logits)
            first = logits.reshape(-1, logits.shape[-1])[0]  # first generated token, full vocabulary (not copied)
            sel = first.index_select(0, ids.to(first.device)).float().cpu()  # only the yes/no columns
            p = (sel[:n_yes].logsumexp(0) - sel[n_yes:].logsumexp(0)).sigmoid().item()
            out[i][j] = apply_expected(p, expected[i][j] if expected else None)

        # chunks of whole images, at most batch_size questions each (an image with more questions is its own chunk)
        chunks, cur, n = [], [], 0
        for i in keep:
            if cur and n + len(question_lists[i]) > self.batch_size:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(i)
            n += len(question_lists[i])
        if cur:
            chunks.append(cur)
        for chunk in chunks:
            pil = {i: to_pil(images[i]) for i in chunk}
            salt = {i: image_salt(pil[i]) for i in chunk}
            firsts = {i: submit(i, 0, pil[i], salt[i]) for i in chunk}  # one per image: these fill the cache
            rest = []
            for i in chunk:
                read(i, 0, firsts[i])  # the image's prefix blocks are in the cache now: its other questions reuse them
                rest += [(i, j, submit(i, j, pil[i], salt[i])) for j in range(1, len(question_lists[i]))]
            for i, j, res in rest:
                read(i, j, res)
        self._poll_stats()
        return out

    # ---- what the engine reports -------------------------------------------------------------------------------
    def image_hashing(self) -> bool | None:
        """Whether TensorRT-LLM's input processor hashes images for cache keys (None: not known yet)."""
        proc = getattr(self.llm, "input_processor", None)
        return getattr(proc, "multimodal_hashing_supported", None)

    def _poll_stats(self, timeout: float = 0.1) -> None:
        get_stats = getattr(self.llm, "get_stats", None)
        if get_stats is not None:
            try:
                stats = get_stats(timeout=timeout)
            except Exception as e:  # statistics are best effort; scoring already succeeded
                log.debug("llm.get_stats failed: %s", e)
                stats = []
            for entry in stats or []:
                if isinstance(entry, str):
                    entry = json.loads(entry)
                kv = entry.get("kvCacheStats") if isinstance(entry, dict) else None
                if kv and "reusedBlocks" in kv and "missedBlocks" in kv:  # cumulative since the engine started
                    self._kv = {"reused_blocks": float(kv["reusedBlocks"]), "missed_blocks": float(kv["missedBlocks"])}
        if self.image_hashing() is False and not self._hashing_warned:
            self._hashing_warned = True
            log.warning("TensorRT-LLM fell back from image hashing: its cache keys no longer tell images apart; the "
                        "per-image cache_salt keeps KV reuse within one image")

    def backend_metrics(self) -> dict[str, float]:
        """Numbers for the server's /metrics and the profiler: cumulative KV-cache block reuse of the engine."""
        reused, missed = self._kv["reused_blocks"], self._kv["missed_blocks"]
        hashing = self.image_hashing()
        return {"kv_cache_reused_blocks": reused, "kv_cache_missed_blocks": missed,
                "kv_cache_hit_rate": reused / (reused + missed) if reused + missed else 0.0,
                "image_hashing": float(hashing) if hashing is not None else -1.0}

    def close(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()
