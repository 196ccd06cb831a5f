"""``hf``: plain transformers, one forward per (image, question), full softmax. The baseline and the tests' oracle.

Each query is tokenised as one string and run through the model's own ``forward`` (its own multimodal RoPE
positions, its own attention), and the score is computed from the full-vocabulary softmax in float64:
``P(yes) = sum of the yes variants' probabilities``, likewise for no, ``p = P(yes) / (P(yes) + P(no))``.
``batch_size > 1`` batches whole queries (left padding, the image repeated in every sequence): the
"batched without prefix sharing" reference of the benchmark. Nothing here is clever on purpose.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..prompt import SYSTEM_PROMPT, apply_expected
from ..vlm import VLBundle


class HFVerifier:
    """The reference verifier. ``bundle``: a ``VLBundle``; ``batch_size``: queries per forward (1 = the baseline)."""

    name = "hf"

    def __init__(self, bundle: VLBundle, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Any = "auto", device: str | None = "auto",
                        attn_implementation: str = "sdpa", batch_size: int = 1,
                        system_prompt: str = SYSTEM_PROMPT) -> "HFVerifier":
        return cls(VLBundle.from_pretrained(path, dtype, device, attn_implementation, system_prompt), batch_size)

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
        items = [(k, i, j) for k, i in enumerate(keep) for j in range(len(question_lists[i]))]
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            ids = [self.bundle.full_ids(question_lists[i][j], n_tokens[k]) for k, i, j in chunk]
            pv = [pixel_values[offsets[k]:offsets[k + 1]] for k, _, _ in chunk]
            gr = [grid[k] for k, _, _ in chunk]
            for (k, i, j), p in zip(chunk, self._forward(ids, pv, gr)):
                out[i][j] = apply_expected(p, expected[i][j] if expected else None)
        return out

    def _forward(self, ids: list[list[int]], pixel_values: list, grid: list) -> list[float]:
        import torch
        b = self.bundle
        width = max(len(x) for x in ids)
        pad = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding: the answer position is the last column for every row
            input_ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        kw = b.model_inputs(input_ids, mask, torch.cat(pixel_values), torch.stack(grid))
        with torch.inference_mode():
            logits = b.model(**kw, use_cache=False, logits_to_keep=1).logits[:, -1]  # (B, V)
        probs = logits.double().softmax(-1)
        n_yes = len(b.answers.yes_ids)
        p = probs.index_select(1, b.answer_index)
        p_yes, p_no = p[:, :n_yes].sum(-1), p[:, n_yes:].sum(-1)
        return (p_yes / (p_yes + p_no)).tolist()
