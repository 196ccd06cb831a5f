"""Data synthesis for the shapes world: train and test prompt sets, JSONL in and out, a summary table.

``synthesize`` draws ``n_per_task`` distinct prompts per task type (train) and ``n_test`` more (test), easy, medium and
hard in ratio 3:5:2, with no prompt text in both splits (nor twice in one). Every (split, task, difficulty) cell has
its own generator seeded from ``[seed, split, task, difficulty]``, and the test split is drawn first, so it depends
only on ``seed`` and ``n_test``: growing the training set never changes the test set. ``synthesize_splits`` adds a
third split drawn after both (prompts a model pretrained on the training split has never seen, for RL).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from alphagrpo.worlds.jsonl import read_jsonl  # noqa: F401  (re-exported: the shapes data command reads with it)
from alphagrpo.worlds.shapes.primitives import words
from alphagrpo.worlds.shapes.prompts import DIFFICULTIES, DIFFICULTY_RATIO, TASKS, make_prompt


def _split_by_ratio(n: int, weights: Sequence[int]) -> list[int]:
    """Largest-remainder split of ``n`` in proportion to ``weights`` (ties to the earlier entry)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    out = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def allocation(n_per_task: int, n_test: int) -> tuple[dict, dict]:
    """``(train, test)``: ``{(task, difficulty): count}``. Train: each task split 3:5:2. Test: the total split 3:5:2,
    each difficulty spread as evenly as possible over tasks (extra prompts go to the tasks with fewest so far)."""
    train = {}
    for t in TASKS:
        for d, n in zip(DIFFICULTIES, _split_by_ratio(n_per_task, DIFFICULTY_RATIO)):
            train[(t, d)] = n
    test = {}
    per_task_total = Counter()
    for d, nd in zip(DIFFICULTIES, _split_by_ratio(n_test, DIFFICULTY_RATIO)):
        base, extra = divmod(nd, len(TASKS))
        for t in TASKS:
            test[(t, d)] = base
        for t in sorted(TASKS, key=lambda t: (per_task_total[t], TASKS.index(t)))[:extra]:
            test[(t, d)] += 1
        for t in TASKS:
            per_task_total[t] += test[(t, d)]
    return train, test


def _key(text: str) -> str:
    return " ".join(words(text))


def _draw(task: str, difficulty: str, n: int, rng: np.random.Generator, used: set) -> list[dict]:
    out: list[dict] = []
    budget = 40 * n + 2000
    for _ in range(budget):
        if len(out) == n:
            return out
        rec = make_prompt(task, difficulty, rng)
        k = _key(rec["prompt"])
        if k not in used:
            used.add(k)
            out.append(rec)
    if len(out) < n:
        raise RuntimeError(f"could only make {len(out)} distinct {task}/{difficulty} prompts of the {n} asked for "
                           f"in {budget} draws; ask for fewer (--n-per-task / --n-test)")
    return out


def synthesize(n_per_task: int = 500, n_test: int = 1024, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train_records, test_records)`` (see prompts.py for the record form), grouped by task then difficulty."""
    train, test, _ = synthesize_splits(n_per_task, n_test, 0, seed)
    return train, test


def synthesize_splits(n_per_task: int = 500, n_test: int = 1024, n_extra_per_task: int = 0,
                      seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, test, extra)``: ``synthesize``'s two splits plus ``n_extra_per_task`` prompts per task drawn after
    both (split 2, same 3:5:2 difficulty ratio), distinct from every train and test prompt. Drawn last, the extra
    split never changes train or test: it holds prompts a model pretrained on ``train`` has never seen (the RL
    split)."""
    for name, v in (("n_per_task", n_per_task), ("n_test", n_test), ("n_extra_per_task", n_extra_per_task),
                    ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    train_alloc, test_alloc = allocation(int(n_per_task), int(n_test))
    extra_alloc, _ = allocation(int(n_extra_per_task), 0)
    used: set = set()
    splits = []
    for split_id, alloc in ((1, test_alloc), (0, train_alloc), (2, extra_alloc)):
        recs: list[dict] = []
        for ti, t in enumerate(TASKS):
            for di, d in enumerate(DIFFICULTIES):
                rng = np.random.default_rng([int(seed), split_id, ti, di])
                recs += _draw(t, d, alloc[(t, d)], rng, used)
        splits.append(recs)
    test, train, extra = splits
    return train, test, extra


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Write one JSON object per line (creating parent folders); returns the number written."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def summary_table(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A text table of prompt counts per task and difficulty for each split (``{"train": recs, "test": recs}``)."""
    cols = [(s, d) for s in splits for d in (*DIFFICULTIES, "total")]
    head = f"{'task':<24}" + "".join(f"{s + ':' + d:>14}" for s, d in cols)
    lines = [head, "-" * len(head)]
    counts = {s: Counter((r.get("task"), r.get("difficulty")) for r in recs) for s, recs in splits.items()}
    tasks = [t for t in TASKS if any(counts[s][(t, d)] for s in splits for d in DIFFICULTIES)]
    for t in tasks + ["total"]:
        row = f"{t:<24}"
        for s, d in cols:
            c = counts[s]
            ts = TASKS if t == "total" else [t]
            ds = DIFFICULTIES if d == "total" else [d]
            row += f"{sum(c[(tt, dd)] for tt in ts for dd in ds):>14}"
        lines.append(row)
    return "\n".join(lines)
