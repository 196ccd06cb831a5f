"""``openai``: any OpenAI-compatible chat endpoint (SGLang, vLLM, TensorRT-LLM's trtllm-serve).

Two ways to read the first answer token:

- ``mode="token_ids"`` (SGLang's native ``POST {root}/generate``): asks for the log-probabilities of the exact yes/no
  token ids (``token_ids_logprob``), so nothing is truncated. It needs the model's tokenizer locally (``tokenizer=``
  a path) to resolve the ids and render the chat template.
- ``mode="top_logprobs"`` (what the paper's authors did): ``POST {base}/v1/chat/completions`` with the system
  prompt, the image as a data URL and the question, ``max_tokens=1``, ``logprobs=true``, ``top_logprobs=k``
  (``top_logprobs``, default 20, the most vLLM and OpenAI allow by default). The yes/no variants are matched by
  their text among the top ``k``; a side absent from the top ``k`` counts as probability 0. A query where NEITHER
  side is in the top ``k`` (a "top-k gap") has no score: it is logged, counted (``stats["topk_gaps"]`` and
  ``stats["failed_queries"]``, ``backend_metrics()`` for the server's /metrics) and handled by ``on_failure``
  ("zero": scored 0, "raise": ``VerifierError``), never reported as a confident 0. Servers that report logprobs
  before sampling adjustments (vLLM's default ``raw_logprobs``; SGLang) give the same numbers as the local backends
  whenever the top ``k`` covers yes and no.
- ``mode="auto"`` (default): ``token_ids`` when a tokenizer is given and the server answers ``/generate`` with
  token-id log-probabilities (asked once, with a one-token text probe), else ``top_logprobs``.

One request per (image, question), ``concurrency`` in flight, retries with backoff, several base URLs balanced.
Images are PNG-encoded once per image. The server's prefix cache (SGLang's radix cache, vLLM's automatic prefix
caching) is what shares the image's KV across its questions on that side.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Sequence

from .._http import BackgroundLoop, HTTPPool, HTTPRequestError, encode_image
from ..prompt import (NO_WORDS, SYSTEM_PROMPT, YES_WORDS, apply_expected, build_messages, check_expected,
                      score_from_logprobs)
from ..protocol import VerifierError, check_batch, check_failure_policy

log = logging.getLogger(__name__)
MODES = ("auto", "top_logprobs", "token_ids")


class TopKGapError(ValueError):
    """Neither a yes nor a no variant is among the first token's top-k log-probabilities: the query has no score."""


def parse_top_logprobs(answer: dict, yes_ids=(), no_ids=()) -> float:
    """Score from a chat-completions answer's first-token ``top_logprobs``; ``ValueError`` if unusable."""
    try:
        first = answer["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"the answer has no first-token logprobs ({type(e).__name__}: {e}); does the server "
                         f"support logprobs for chat completions?") from e
    entries = list(first.get("top_logprobs") or [])
    seen, yes, no = set(), [], []
    for e in entries + [first]:  # the sampled token itself, in case the server left it out of the top list
        token = e.get("token")
        if token is None or token in seen:
            continue
        seen.add(token)
        text = token
        if token.startswith("token_id:"):  # vLLM's --return-tokens-as-token-ids
            tid = int(token.split(":", 1)[1])
            side = yes if tid in yes_ids else no if tid in no_ids else None
            if side is not None:
                side.append(e["logprob"])
            continue
        if e.get("bytes"):
            try:
                text = bytes(e["bytes"]).decode("utf-8")
            except (UnicodeDecodeError, ValueError, TypeError):
                text = token
        word = text.strip()
        if word in YES_WORDS and text in (word, " " + word):
            yes.append(e["logprob"])
        elif word in NO_WORDS and text in (word, " " + word):
            no.append(e["logprob"])
    if not yes and not no:
        raise TopKGapError(f"neither a yes nor a no token is among the {len(entries)} top log-probabilities of the "
                           f"first answer token; raise top_logprobs or use mode='token_ids'")
    return score_from_logprobs(yes, no)


def parse_token_ids_logprobs(answer: dict, yes_ids, no_ids) -> float:
    """Score from SGLang ``/generate``'s ``meta_info.output_token_ids_logprobs`` (``[[logprob, id, text], ...]``)."""
    try:
        rows = answer["meta_info"]["output_token_ids_logprobs"][0]
        by_id = {int(r[1]): float(r[0]) for r in rows}
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"the answer has no output_token_ids_logprobs ({type(e).__name__}: {e})") from e
    return score_from_logprobs([by_id.get(i) for i in yes_ids], [by_id.get(i) for i in no_ids])


class OpenAIVerifier:
    """Verifier over an OpenAI-compatible server. ``base_url``: ``http://127.0.0.1:30000`` (with or without
    ``/v1``) or a list of them; ``model``: the served model name."""

    name = "openai"

    def __init__(self, base_url: str | Sequence[str], model: str = "default", *, api_key: str | None = None,
                 mode: str = "auto", top_logprobs: int = 20, tokenizer: Any = None,
                 system_prompt: str = SYSTEM_PROMPT, concurrency: int = 32, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.25, on_failure: str = "zero", image_format: str = "PNG"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if top_logprobs < 2:
            raise ValueError(f"top_logprobs must be >= 2 (yes and no), got {top_logprobs}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.roots = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.model, self.mode, self.top_logprobs = model, mode, top_logprobs
        self._mode = mode if mode != "auto" else None  # the mode in use; auto decides at the first call
        self.system_prompt, self.image_format = system_prompt, image_format
        self.on_failure = check_failure_policy(on_failure)
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._pool_args = dict(headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                               concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff)
        self.yes_ids: tuple[int, ...] = ()
        self.no_ids: tuple[int, ...] = ()
        self.parts = None
        if tokenizer is not None:
            self._use_tokenizer(tokenizer)
        elif mode == "token_ids":
            raise ValueError("mode='token_ids' needs tokenizer= (a local tokenizer path or object) to resolve the "
                             "yes/no token ids and render the chat template")
        self._loop = BackgroundLoop("verifier-openai")
        self._pool: HTTPPool | None = None
        self.stats = {"failed_queries": 0, "topk_gaps": 0}

    def _use_tokenizer(self, tokenizer):
        from ..prompt import answer_tokens, split_chat_template
        if isinstance(tokenizer, str):
            from ..vlm import _load_chat_template, import_transformers
            tok = import_transformers().AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
            template = _load_chat_template(tokenizer, tok)
        else:
            tok, template = tokenizer, getattr(tokenizer, "chat_template", None)
        ans = answer_tokens(tok)
        self.yes_ids, self.no_ids = ans.yes_ids, ans.no_ids
        self.parts = split_chat_template(tok, template, self.system_prompt)

    @classmethod
    def from_pretrained(cls, model: str, *, base_url: str | Sequence[str] = "http://127.0.0.1:30000",
                        **kwargs) -> "OpenAIVerifier":
        return cls(base_url, model, **kwargs)

    # ---- Verifier protocol -------------------------------------------------------------------------------------
    def score(self, images: Sequence[Any], question_lists: Sequence[Sequence[str]],
              expected_answers: Sequence[Sequence[str | None]] | None = None) -> list[list[float]]:
        check_batch(images, question_lists)
        expected = check_expected(expected_answers, question_lists)
        return self._loop.submit(self._score(list(images), [list(q) for q in question_lists], expected)).result()

    def backend_metrics(self) -> dict[str, float]:
        """Counters for the server's /metrics: failed queries (all causes) and, among them, top-k gaps."""
        return {"failed_queries": float(self.stats["failed_queries"]),
                "topk_gap_queries": float(self.stats["topk_gaps"])}

    @property
    def active_mode(self) -> str | None:
        """The mode queries use (``auto`` resolves at the first ``score``); None before that."""
        return self._mode

    def close(self) -> None:
        pool, self._pool = self._pool, None
        self._loop.close(pool.aclose() if pool is not None else None)

    # ---- inside the loop -----------------------------------------------------------------------------------------
    async def _score(self, images, question_lists, expected):
        if self._pool is None:
            self._pool = HTTPPool(self.roots, **self._pool_args)
        mode = self._mode or await self._resolve_mode()
        loop = asyncio.get_running_loop()
        keep = [i for i, qs in enumerate(question_lists) if qs]
        encoded = await asyncio.gather(*(loop.run_in_executor(None, encode_image, images[i], self.image_format)
                                         for i in keep))
        urls = {i: f"data:image/{self.image_format.lower()};base64,{e}" for i, e in zip(keep, encoded)}
        jobs = [(i, j) for i in keep for j in range(len(question_lists[i]))]
        results = await asyncio.gather(*(self._query(urls[i], question_lists[i][j], mode) for i, j in jobs),
                                       return_exceptions=True)
        out = [[0.0] * len(qs) for qs in question_lists]
        for (i, j), res in zip(jobs, results):
            if isinstance(res, TopKGapError):
                self.stats["topk_gaps"] += 1
                self.stats["failed_queries"] += 1
                if self.on_failure == "raise":
                    raise VerifierError(f"query (image {i}, question {j}) has no score: {res}") from res
                log.warning("query (image %d, question %d) has no score, counted as failed and scored 0: %s", i, j, res)
                continue
            if isinstance(res, BaseException):
                transient = not (isinstance(res, HTTPRequestError) and not res.retryable)
                if self.on_failure == "raise" or not transient:
                    raise VerifierError(f"query (image {i}, question {j}) failed: {res}") from res
                self.stats["failed_queries"] += 1
                log.warning("query (image %d, question %d) failed; scoring it 0: %s", i, j, res)
                continue
            out[i][j] = apply_expected(res, expected[i][j] if expected else None)
        return out

    async def _resolve_mode(self) -> str:
        """``auto``: token_ids if the server answers a one-token /generate probe with token-id logprobs."""
        if self.parts is None:
            self._mode = "top_logprobs"
            return self._mode
        payload = {"text": "yes", "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                   "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0,
                   "token_ids_logprob": list(self.yes_ids + self.no_ids)}
        try:
            parse_token_ids_logprobs(await self._pool.post_json("/generate", payload), self.yes_ids, self.no_ids)
        except HTTPRequestError as e:
            if e.retryable:  # the server is unreachable or busy: decide at the next call
                log.warning("mode='auto': the /generate probe failed (%s); using top_logprobs for this call", e)
                return "top_logprobs"
            self._mode = "top_logprobs"
        except ValueError:  # answered, but without token-id logprobs
            self._mode = "top_logprobs"
        else:
            self._mode = "token_ids"
        log.info("mode='auto' uses %s (%s)", self._mode, "exact yes/no token ids" if self._mode == "token_ids"
                 else f"the server has no token-id logprobs; top {self.top_logprobs} log-probabilities")
        return self._mode

    async def _query(self, image_url: str, question: str, mode: str) -> float:
        if mode == "token_ids":
            payload = {"text": self.parts.render(question), "image_data": image_url,
                       "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                       "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0,
                       "token_ids_logprob": list(self.yes_ids + self.no_ids)}
            return parse_token_ids_logprobs(await self._pool.post_json("/generate", payload), self.yes_ids,
                                            self.no_ids)
        item = {"type": "image_url", "image_url": {"url": image_url}}
        payload = {"model": self.model, "messages": build_messages(question, self.system_prompt, item),
                   "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}
        return parse_top_logprobs(await self._pool.post_json("/v1/chat/completions", payload), self.yes_ids,
                                  self.no_ids)
