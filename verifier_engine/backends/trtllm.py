"""``trtllm``: TensorRT-LLM's LLM API (PyTorch backend), reading the yes/no logits of the first generated token.

NOT YET RUN ON A GPU: TensorRT-LLM needs CUDA to install, so this backend is tested only against a fake
``tensorrt_llm`` module (tests/test_verifier_trtllm.py) implementing the API subset used here:

- ``tensorrt_llm.LLM(model=path, **llm_kwargs)`` and ``llm.generate(inputs, sampling_params)`` returning one
  ``RequestOutput`` per input, in order;
- inputs ``{"prompt": str, "multi_modal_data": {"image": [PIL.Image]}}``, the prompt rendered through the model's
  chat template with the image placeholder unexpanded (TensorRT-LLM's input processor expands it);
- ``tensorrt_llm.SamplingParams(max_tokens=1, return_generation_logits=True)``;
- ``output.outputs[0].generation_logits``: a tensor whose last dimension is the vocabulary, first generated token
  first (raw logits: the score ignores every sampling setting).

TensorRT-LLM's KV-cache block reuse (on by default in the PyTorch backend) shares the image + system prefix
between the questions of one image. Prompts are rendered with the tokenizer found in the model directory.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..prompt import SYSTEM_PROMPT, answer_tokens, apply_expected, check_expected, split_chat_template
from ..protocol import check_batch


def import_trtllm():
    try:
        import tensorrt_llm
    except ImportError as e:
        raise ImportError("the trtllm backend needs TensorRT-LLM (CUDA only): pip install 'alphagrpo[trtllm]'") from e
    return tensorrt_llm


class TRTLLMVerifier:
    """Verifier on a ``tensorrt_llm.LLM``. ``llm``: an existing LLM (else one is built from ``model``);
    ``batch_size``: queries handed to ``generate`` at once (the LLM batches them in flight)."""

    name = "trtllm"

    def __init__(self, model: str, *, llm: Any = None, tokenizer: Any = None, llm_kwargs: dict | None = None,
                 system_prompt: str = SYSTEM_PROMPT, batch_size: int = 1024):
        trt = import_trtllm()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._trt = trt
        self.llm = llm if llm is not None else trt.LLM(model=model, **(llm_kwargs or {}))
        if tokenizer is None:
            from ..vlm import _load_chat_template, import_transformers
            tokenizer = import_transformers().AutoTokenizer.from_pretrained(model, local_files_only=True)
            template = _load_chat_template(model, tokenizer)
        else:
            template = getattr(tokenizer, "chat_template", None)
        self.answers = answer_tokens(tokenizer)
        self.parts = split_chat_template(tokenizer, template, system_prompt)
        self.batch_size = batch_size
        self.sampling = trt.SamplingParams(max_tokens=1, return_generation_logits=True)

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> "TRTLLMVerifier":
        return cls(model, **kwargs)

    def score(self, images: Sequence[Any], question_lists: Sequence[Sequence[str]],
              expected_answers: Sequence[Sequence[str | None]] | None = None) -> list[list[float]]:
        import torch

        from ..vlm import to_pil
        check_batch(images, question_lists)
        expected = check_expected(expected_answers, question_lists)
        pil = {i: to_pil(images[i]) for i, qs in enumerate(question_lists) if qs}
        jobs = [(i, j) for i in pil for j in range(len(question_lists[i]))]
        out = [[0.0] * len(qs) for qs in question_lists]
        ids = torch.tensor(self.answers.ids)
        n_yes = len(self.answers.yes_ids)
        for s in range(0, len(jobs), self.batch_size):
            chunk = jobs[s:s + self.batch_size]
            inputs = [{"prompt": self.parts.render(question_lists[i][j]), "multi_modal_data": {"image": [pil[i]]}}
                      for i, j in chunk]
            results = self.llm.generate(inputs, self.sampling)
            if len(results) != len(chunk):
                raise RuntimeError(f"TensorRT-LLM returned {len(results)} outputs for {len(chunk)} inputs")
            for (i, j), res in zip(chunk, results):
                logits = res.outputs[0].generation_logits
                if logits is None:
                    raise RuntimeError("TensorRT-LLM returned no generation_logits; this version may not support "
                                       "return_generation_logits with the PyTorch backend")
                row = torch.as_tensor(logits).float().reshape(-1, logits.shape[-1])[0]  # first generated token
                sel = row.index_select(0, ids.to(row.device))
                p = (sel[:n_yes].logsumexp(0) - sel[n_yes:].logsumexp(0)).sigmoid().item()
                out[i][j] = apply_expected(p, expected[i][j] if expected else None)
        return out
