"""Decompose free prompts into the authors' schema with an LLM (RECIPE.md sections 4 and 9).

An OpenAI-compatible chat endpoint (vLLM, SGLang, any hosted API) receives the template
``alphagrpo/assets/decompose_prompt.txt`` with the prompt filled in, and must answer one JSON object
``{"semantic_questions": [{"question", "tag"}], "quality_questions": [...]}``. ``parse_decomposition`` is strict: every
question a non-empty string ending in "?", every tag one of RECIPE.md section 4's for its list, both lists non-empty.
A malformed or incomplete answer (or a failed request) is retried up to ``retries`` times; then the prompt is reported
and skipped, never written half-formed. A request the server refuses (HTTP 4xx: a wrong model name or key) stops the
run with an error instead: no retry can fix it.

Output: append-only JSONL, one complete record per line, written whole and flushed as each prompt finishes (at most
``concurrency`` requests in flight). A rerun skips prompts already in the file, so a stopped run resumes; a torn last
line (a crash mid-write) is dropped on reopening and its prompt asked again. The file is what the ``jsonl`` world and
``alphagrpo generate --suite prompts`` read.
Chose not to: check that questions are faithful to the prompt (no second LLM pass), or deduplicate near-identical
questions.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

SEMANTIC_TAGS = ("Style", "Environment", "Viewpoint", "Existence", "Count", "Attribute", "Action", "Spatial", "Text",
                 "Negative")
QUALITY_TAGS = ("Geometry", "Anatomy", "Texture", "Coherence", "Lighting", "Physics", "Legibility", "Aesthetics")
TEMPLATE = Path(__file__).resolve().parent / "assets" / "decompose_prompt.txt"


class DecompositionError(ValueError):
    """An LLM answer that is not a complete decomposition; the message says what is wrong."""


def render_prompt(prompt: str, template: Optional[str] = None) -> str:
    t = template if template is not None else TEMPLATE.read_text(encoding="utf-8")
    return (t.replace("{{SEMANTIC_TAGS}}", ", ".join(SEMANTIC_TAGS))
             .replace("{{QUALITY_TAGS}}", ", ".join(QUALITY_TAGS)).replace("{{PROMPT}}", prompt))


def _json_object(text: str) -> dict:
    t = re.sub(r"<think>.*?</think>", "", text, flags=re.S)          # reasoning models' thoughts come first
    t = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", t.strip())
    a, b = t.find("{"), t.rfind("}")
    if a < 0 or b < a:
        raise DecompositionError("no JSON object in the answer")
    try:
        obj = json.loads(t[a:b + 1])
    except json.JSONDecodeError as e:
        raise DecompositionError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DecompositionError("the answer is not a JSON object")
    return obj


def parse_decomposition(text: str) -> dict:
    """``{"semantic_questions": [...], "quality_questions": [...]}`` from an LLM answer, or ``DecompositionError``."""
    obj = _json_object(text)
    out = {}
    for key, tags in (("semantic_questions", SEMANTIC_TAGS), ("quality_questions", QUALITY_TAGS)):
        qs = obj.get(key)
        if not isinstance(qs, list) or not qs:
            raise DecompositionError(f"'{key}' must be a non-empty list")
        clean = []
        for j, q in enumerate(qs):
            if not isinstance(q, dict):
                raise DecompositionError(f"{key}[{j}] is not an object")
            text_q, tag = q.get("question"), q.get("tag")
            if not isinstance(text_q, str) or not text_q.strip().endswith("?") or len(text_q.strip()) < 3:
                raise DecompositionError(f"{key}[{j}].question must be a yes/no question ending in '?', got {text_q!r}")
            if tag not in tags:
                raise DecompositionError(f"{key}[{j}].tag {tag!r} is not one of {', '.join(tags)}")
            clean.append({"question": text_q.strip(), "tag": tag})
        out[key] = clean
    return out


@dataclass
class ChatLLM:
    """An OpenAI-compatible chat endpoint: ``url`` (``http://host:port`` or ``.../v1``) and ``model``."""
    url: str
    model: str
    api_key: Optional[str] = None
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout: float = 120.0

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--llm must be an http(s) URL of an OpenAI-compatible server, got {self.url!r}")
        base = self.url.rstrip("/")
        self.endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")

    async def complete(self, client, text: str) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": [{"role": "user", "content": text}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        r = await client.post(self.endpoint, json=body, headers=headers, timeout=self.timeout)
        if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
            raise ValueError(f"{self.endpoint} refused the request (HTTP {r.status_code}: {r.text[:200]}); check "
                             "--llm, --model and the API key")     # a setting to fix, not an answer to retry
        r.raise_for_status()
        try:
            return r.json()["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError, ValueError):
            raise DecompositionError("the server's reply is not a chat completion") from None


@dataclass
class Summary:
    total: int = 0
    already_done: int = 0
    succeeded: int = 0
    failed: list = field(default_factory=list)     # [{"prompt", "reason"}]

    def to_dict(self) -> dict:
        return {"total": self.total, "already_done": self.already_done, "succeeded": self.succeeded,
                "failed": len(self.failed), "failures": self.failed}


def read_prompts(path: str | Path, field_name: str = "prompt") -> list[dict]:
    """Input records: a ``.jsonl`` of objects (``field_name`` is the prompt; other keys are kept) or a text file, one
    prompt per line. Repeated prompts are kept once."""
    path = Path(path)
    recs = []
    if path.suffix == ".jsonl":
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get(field_name), str) or not r[field_name].strip():
                raise ValueError(f"{path}:{no}: no non-empty string field {field_name!r}")
            extra = {k: v for k, v in r.items() if k not in ("semantic_questions", "quality_questions")}
            recs.append({**extra, "prompt": r[field_name].strip()})
    else:
        recs = [{"prompt": ln.strip()} for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    seen, out = set(), []
    for r in recs:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append(r)
    return out


def done_prompts(out: Path) -> set:
    """Prompts already in ``out``; a torn last line (no newline: a crash mid-write) is cut off first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes); its prompt is asked again", out, len(data) - keep)
        with open(out, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for no, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                done.add(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{out}:{no} is not a decomposition record; is --out the right file?") from None
    return done


async def _decompose(llm: ChatLLM, records: Sequence[dict], out: Path, *, concurrency: int, retries: int,
                     template: str, summary: Summary, progress: Optional[Callable[[int], None]]) -> None:
    import httpx
    sem, lock = asyncio.Semaphore(concurrency), asyncio.Lock()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        async with httpx.AsyncClient() as client:
            async def one(rec: dict) -> None:
                reason = ""
                async with sem:
                    for attempt in range(1 + retries):
                        try:
                            answer = await llm.complete(client, render_prompt(rec["prompt"], template))
                            parsed = parse_decomposition(answer)
                        except (DecompositionError, httpx.HTTPError) as e:
                            reason = f"{type(e).__name__}: {e}"
                            log.info("attempt %d for %r failed: %s", attempt + 1, rec["prompt"][:60], reason)
                            continue
                        async with lock:
                            f.write(json.dumps({**rec, **parsed}, ensure_ascii=False) + "\n")
                            f.flush()
                            summary.succeeded += 1
                        break
                    else:
                        summary.failed.append({"prompt": rec["prompt"], "reason": reason})
                if progress is not None:
                    progress(1)
            await asyncio.gather(*(one(r) for r in records))


def decompose_file(inp: str | Path, out: str | Path, llm: ChatLLM, *, field_name: str = "prompt",
                   concurrency: int = 8, retries: int = 2, template_path: Optional[str | Path] = None,
                   progress: Optional[Callable[[int], None]] = None) -> Summary:
    """Decompose every prompt of ``inp`` not yet in ``out`` (appending to it); see the module docstring."""
    if concurrency < 1 or retries < 0:
        raise ValueError(f"--concurrency must be >= 1 and --retries >= 0, got {concurrency} and {retries}")
    out = Path(out)
    records = read_prompts(inp, field_name)
    done = done_prompts(out)
    todo = [r for r in records if r["prompt"] not in done]
    summary = Summary(total=len(records), already_done=len(records) - len(todo))
    template = Path(template_path or TEMPLATE).read_text(encoding="utf-8")
    if "{{PROMPT}}" not in template:
        raise ValueError(f"the template {template_path} has no {{{{PROMPT}}}} placeholder")
    if todo:
        asyncio.run(_decompose(llm, todo, out, concurrency=concurrency, retries=retries, template=template,
                               summary=summary, progress=progress))
    return summary


def api_key_from_env(name: Optional[str]) -> Optional[str]:
    return os.environ.get(name) if name else None
