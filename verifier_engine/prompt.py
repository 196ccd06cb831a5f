"""The verifier query of RECIPE.md section 4, the yes/no answer tokens, and the score formula.

Everything here is backend-independent and light: no torch at import time, no transformers. Backends that own a
tokenizer call ``answer_tokens`` and ``split_chat_template``; every backend turns logits or log-probabilities into
scores with ``score_from_logits`` / ``score_from_logprobs`` and ``apply_expected``.

What a query is, exactly: the model's own chat template applied to
``[system: SYSTEM_PROMPT, user: [image, question verbatim]]`` with the generation prompt, and the score is read at the
first answer position: ``p = P(yes) / (P(yes) + P(no))``, each side summed over the tokenizer's single-token variants
("Yes", "yes", "YES", each with and without a leading space). The full-vocabulary normaliser cancels in that ratio,
so ``p = sigmoid(logsumexp(yes logits) - logsumexp(no logits))`` from raw logits: no temperature, no repetition
penalty, no other logits processor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

SYSTEM_PROMPT = ("You are an expert visual auditor. Answer only with 'yes' or 'no'. "
                 "If the subjects in the question don't exist, answer 'no'.")
YES_WORDS = ("Yes", "yes", "YES")
NO_WORDS = ("No", "no", "NO")
EXPECTED_ANSWERS = ("yes", "no")
_SENTINEL = "\u2063QUESTION\u2063"  # invisible separator: never appears in a real question


@dataclass(frozen=True)
class AnswerTokens:
    """Single-token yes/no variants of one tokenizer: ids and their text (for logs and top-logprob matching)."""
    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]
    yes_text: tuple[str, ...]
    no_text: tuple[str, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        """Yes ids then no ids: the only LM-head rows a backend needs."""
        return self.yes_ids + self.no_ids


def answer_tokens(tokenizer: Any, yes_words: Sequence[str] = YES_WORDS,
                  no_words: Sequence[str] = NO_WORDS) -> AnswerTokens:
    """Resolve the yes/no variants that are single tokens of ``tokenizer`` (a transformers tokenizer).

    Tries every word with and without a leading space; keeps those that encode to exactly one token (not the
    unknown token) which decodes back to the word. Raises a
    ``ValueError`` naming what was tried when either side has no single-token variant.
    """
    unk = getattr(tokenizer, "unk_token_id", None)

    def resolve(words):
        ids, texts = [], []
        for w in words:
            for text in (w, " " + w):
                enc = tokenizer.encode(text, add_special_tokens=False)
                # one token, not the unknown token, and really that word (not a normalised or lossy stand-in)
                if len(enc) == 1 and enc[0] != unk and enc[0] not in ids \
                        and tokenizer.decode([enc[0]]).strip() == w:
                    ids.append(int(enc[0]))
                    texts.append(text)
        return tuple(ids), tuple(texts)

    yes_ids, yes_text = resolve(yes_words)
    no_ids, no_text = resolve(no_words)
    for side, ids, words in (("yes", yes_ids, yes_words), ("no", no_ids, no_words)):
        if not ids:
            tried = ", ".join(repr(t) for w in words for t in (w, " " + w))
            raise ValueError(f"the tokenizer has no single-token '{side}' answer (tried {tried}); the verifier reads "
                             f"one answer token, so use a tokenizer where at least one of them is a single token")
    overlap = set(yes_ids) & set(no_ids)
    if overlap:
        raise ValueError(f"token ids {sorted(overlap)} decode as both a yes and a no variant")
    return AnswerTokens(yes_ids, no_ids, yes_text, no_text)


def build_messages(question: str, system_prompt: str = SYSTEM_PROMPT, image_item: dict | None = None) -> list[dict]:
    """The chat of one query: system prompt, then the image, then the question verbatim."""
    image_item = image_item if image_item is not None else {"type": "image"}
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": [image_item, {"type": "text", "text": question}]},
    ]


@dataclass(frozen=True)
class PromptParts:
    """A rendered query cut around the question: ``full = before + question + after``.

    ``before`` holds the system turn and the image placeholder (once, unexpanded); ``after`` closes the user turn
    and opens the assistant turn, so the next token is the first answer token.
    """
    before: str
    after: str

    def render(self, question: str) -> str:
        return self.before + question + self.after


def split_chat_template(tokenizer: Any, chat_template: str | None = None,
                        system_prompt: str = SYSTEM_PROMPT) -> PromptParts:
    """Render the query through the model's chat template with a sentinel question and cut at the sentinel."""
    kwargs = {"chat_template": chat_template} if chat_template else {}
    text = tokenizer.apply_chat_template(build_messages(_SENTINEL, system_prompt), add_generation_prompt=True,
                                         tokenize=False, **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected the rendered string")
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the user's text item exactly once; the verifier needs a "
                         "template that takes a list of {'type': 'image'} and {'type': 'text'} items")
    before, after = text.split(_SENTINEL)
    return PromptParts(before, after)


def check_expected(expected_answers: Sequence[Sequence[str | None]] | None,
                   question_lists: Sequence[Sequence[str]]) -> list[list[str | None]] | None:
    """Validate optional expected answers: one list per image, one entry per question, each "yes", "no" or None."""
    if expected_answers is None:
        return None
    if len(expected_answers) != len(question_lists):
        raise ValueError(f"expected_answers has {len(expected_answers)} lists but there are {len(question_lists)} "
                         f"images; pass one list per image (or none at all)")
    out = []
    for i, (ea, qs) in enumerate(zip(expected_answers, question_lists)):
        if ea is None:
            out.append([None] * len(qs))
            continue
        if isinstance(ea, str) or len(ea) != len(qs):
            raise ValueError(f"expected_answers[{i}] must be a list of {len(qs)} entries (one per question)")
        row = []
        for j, a in enumerate(ea):
            a = a.lower() if isinstance(a, str) else a
            if a not in (None, *EXPECTED_ANSWERS):
                raise ValueError(f"expected_answers[{i}][{j}] must be 'yes', 'no' or null, got {a!r}")
            row.append(a)
        out.append(row)
    return out


def apply_expected(p: float, expected: str | None) -> float:
    """Expected answer "no" inverts the score (the benchmark questions phrased so that "no" is correct)."""
    return 1.0 - p if expected == "no" else p


def _logsumexp(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs if x is not None and float(x) != -math.inf]
    if not xs:
        return -math.inf
    m = max(xs)
    if math.isinf(m) or math.isnan(m):
        raise ValueError(f"log-probability {m} is not finite")
    return m + math.log(sum(math.exp(x - m) for x in xs))


def score_from_logprobs(yes_logprobs: Iterable[float], no_logprobs: Iterable[float]) -> float:
    """``P(yes) / (P(yes) + P(no))`` from the log-probabilities (or raw logits) of the variants present.

    A side with no entry has probability 0. Raises ``ValueError`` when neither side has any.
    """
    ly, ln = _logsumexp(yes_logprobs), _logsumexp(no_logprobs)
    if math.isinf(ly) and math.isinf(ln):
        raise ValueError("neither a yes nor a no token has a finite log-probability at the answer position")
    d = ln - ly
    if d > 700:
        return 0.0
    return 1.0 / (1.0 + math.exp(d))


def score_from_logits(logits, n_yes: int):
    """Torch version for a batch: ``logits`` is ``(N, n_yes + n_no)`` (yes rows first); returns ``(N,)`` float32."""
    logits = logits.float()
    return (logits[:, :n_yes].logsumexp(-1) - logits[:, n_yes:].logsumexp(-1)).sigmoid()
