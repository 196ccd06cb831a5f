"""The ``jsonl`` world (``data.world=jsonl``): your prompts, with their questions, in the authors' data schema
(RECIPE.md section 9), scored by a verifier you point at (``reward.verifier``): it has no judge of its own.

``data.train_file`` (required) and ``data.test_file`` (optional; evaluation reports rewards only) are JSONL files of
``{"prompt": str, "semantic_questions": [{"question": str, "tag": str}, ...], "quality_questions": [...]}`` records
(extra keys kept). ``alphagrpo data decompose`` writes such files from free prompts with an LLM.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from alphagrpo.worlds.base import World


def _check_questions(rec: Mapping, key: str, where: str) -> None:
    qs = rec.get(key)
    if not isinstance(qs, list):
        raise ValueError(f"{where}: '{key}' must be a list of {{\"question\": str, \"tag\": str}}")
    for j, q in enumerate(qs):
        if not (isinstance(q, Mapping) and isinstance(q.get("question"), str) and q["question"].strip()
                and isinstance(q.get("tag"), str)):
            raise ValueError(f"{where}: {key}[{j}] must be {{\"question\": non-empty str, \"tag\": str}}, got {q!r}")


def read_jsonl(path) -> list[dict]:
    """Read prompt records (the authors' minimal schema ``prompt`` / ``semantic_questions`` / ``quality_questions``,
    extra keys kept). Blank lines are skipped; a malformed line raises ``ValueError`` naming the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            _check_questions(rec, "semantic_questions", where)
            _check_questions(rec, "quality_questions", where)
            out.append(rec)
    return out



def read_records(path) -> list[dict]:
    """``read_jsonl`` with the file's own errors turned into ones that name the setting."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give the JSONL file of prompt records itself")
    if not p.is_file():
        raise FileNotFoundError(f"no prompt file at {p} (a JSONL of records in the authors' schema)")
    return read_jsonl(p)


def load_jsonl_world(cfg) -> World:
    """Prompts from ``cfg.train_file`` (and ``cfg.test_file`` when given); no verifier, no judge."""
    if not cfg.train_file:
        raise ValueError("data.world=jsonl needs data.train_file=PATH (a JSONL of prompts with their questions; "
                         "`alphagrpo data decompose` writes one)")
    train = read_records(cfg.train_file)
    if not train:
        raise ValueError(f"data.train_file={cfg.train_file} holds no prompt records")
    test = read_records(cfg.test_file) if getattr(cfg, "test_file", None) else []
    return World(train=train, test=test[: cfg.test_size], name="jsonl")
