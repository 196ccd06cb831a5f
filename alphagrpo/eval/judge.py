"""Yes/no scoring of a generated suite folder with any verifier (``alphagrpo.verifiers.build_verifier`` address).

A question is answered "yes" when the judge's ``P(yes) / (P(yes) + P(no)) > 0.5``; it is right when that matches
the expected answer (TIIF-Bench's ``yn_answer_list``; "yes" unless a question says ``"answer": "no"``).

- ``tiif``: TIIF-Bench's protocol, with its aggregation: per type and prompt length, the fraction of questions
  answered as expected; a dimension is the mean over its types; overall is the mean of the nine dimensions
  (``eval/summary_dimension_results.py``). The paper's tables were judged by GPT-4o (whose free-text answers the
  official script parses); an open judge gives numbers that are not comparable with those tables.
- ``prompts``: any JSONL in the authors' schema: question accuracy per tag and overall, and the fraction of prompts
  whose every question is right.
- ``geneval``, ``dpg``, ``wise``: PROXIES only (their official scorers are a detector, mPLUG and GPT-4o): GenEval's
  metadata as yes/no questions, image right when all are, averaged per task then over tasks; DPG's own DSG
  questions (``dpg_bench.csv``) with DSG's rule that a question whose parent failed scores 0; WISE's explanation as
  one question per image.

``QuestionReward`` is the same scoring as a reward for inference-time refinement: per question the probability of
the expected answer, averaged (and combined with quality questions by DVReward's geometric mean when there are any).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from alphagrpo.eval.suites import Item, Suite

log = logging.getLogger(__name__)

# TIIF-Bench's grouping of its 39 types into dimensions (eval/summary_dimension_results.py), in its table's order.
TIIF_DIMENSIONS = {
    "Basic Following": {
        "Attribute": ["shape+color", "color+texture", "texture+color", "shape+texture"],
        "Relation": ["2d_spatial_relation", "3d_spatial_relation", "action+2d", "action+3d"],
        "Reasoning": ["numeracy", "negation", "differentiation", "comparison"],
    },
    "Advanced Following": {
        "Attribute+Relation": ["action+color", "action+texture", "color+2d", "color+3d", "shape+2d", "shape+3d",
                               "texture+2d", "texture+3d"],
        "Attribute+Reasoning": ["numeracy+color", "numeracy+texture", "comparison+color", "comparison+texture",
                                "differentiation+color", "differentiation+texture", "negation+color",
                                "negation+texture"],
        "Relation+Reasoning": ["numeracy+2d", "numeracy+3d", "comparison+2d", "comparison+3d", "differentiation+2d",
                               "differentiation+3d", "negation+2d", "negation+3d"],
        "Style": ["style"],
        "Text": ["text"],
    },
    "Real World": {"Real World": ["real_world"]},
}
PROXY_NOTE = ("PROXY: yes/no questions answered by the judge, not the benchmark's official scorer; not comparable "
              "with published numbers")
OPEN_JUDGE_NOTE = ("judged by {judge}; the paper's TIIF-Bench tables were judged by GPT-4o: numbers from another "
                   "judge are not comparable with them")


def expected(q: dict) -> str:
    return str(q.get("answer", "yes")).strip().lower()


def _questions(record: dict) -> list[dict]:
    return list(record.get("semantic_questions") or []) + list(record.get("quality_questions") or [])


@dataclass
class QuestionReward:
    """A reward for refinement: per question P(expected answer); reward = mean over semantic questions, or
    DVReward's geometric mean with the quality questions' mean when a record has them."""
    verifier: Any

    def __call__(self, images, records):
        from alphagrpo.rewards import RewardResult, dvreward
        sem_q = [list(r.get("semantic_questions") or []) for r in records]
        qua_q = [list(r.get("quality_questions") or []) for r in records]
        flat = [[q["question"] for q in s + q_] for s, q_ in zip(sem_q, qua_q)]
        raw = self.verifier.score(list(images), flat) if len(images) else []
        sem, qua, rewards = [], [], []
        for row, s, q_ in zip(raw, sem_q, qua_q):
            p = [float(x) if expected(q) == "yes" else 1.0 - float(x) for x, q in zip(row, s + q_)]
            sem.append(p[: len(s)])
            qua.append(p[len(s):])
            mode = "geometric" if qua[-1] else "semantic"
            rewards.append(float(dvreward([sem[-1]], [qua[-1]] if qua[-1] else None, mode=mode)[0]))
        return RewardResult(rewards=torch.tensor(rewards, dtype=torch.float32), semantic=sem, quality=qua,
                            questions=flat)


def answer_items(suite: Suite, out: Path, items: Sequence[Item], verifier, n: int, batch: int = 32):
    """Per generated item with questions: ``(item, [per image: [(question dict, p_yes, right)]])``, and the keys of
    items not generated. Images are read and scored ``batch`` at a time (memory stays bounded)."""
    found, missing, queue = [], [], []

    def flush():
        scores = verifier.score([p[2] for p in queue], [[q["question"] for q in p[3]] for p in queue])
        for (i, k, _, qs), row in zip(queue, scores):
            found[i][1][k] = [(q, float(p), ("yes" if float(p) > 0.5 else "no") == expected(q))
                              for q, p in zip(qs, row)]
        queue.clear()

    for it in items:
        if not suite.done(out, it):
            missing.append(it.key)
            continue
        qs = _questions(it.record)
        if not qs:
            continue
        imgs = suite.load(out, it, n)
        found.append((it, [None] * len(imgs)))
        for k, img in enumerate(imgs):
            queue.append((len(found) - 1, k, img, qs))
            if len(queue) >= batch:
                flush()
    if queue:
        flush()
    return found, missing


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def tiif_table(found) -> dict:
    """TIIF-Bench's aggregation (see the module docstring); values in [0, 100]."""
    right, total = defaultdict(int), defaultdict(int)
    for it, per_image in found:
        length = it.record.get("length")
        for answers in per_image:
            for _, _, ok in answers:
                right[(it.record["task"], length)] += int(ok)
                total[(it.record["task"], length)] += 1
    per_type = defaultdict(dict)
    for (typ, length), t in total.items():
        per_type[typ][length] = 100.0 * right[(typ, length)] / t
    dims, overall = {}, {}
    for length in ("short", "long"):
        nine = []
        for group, subs in TIIF_DIMENSIONS.items():
            every = [t for types in subs.values() for t in types]
            if len(subs) > 1:
                dims.setdefault(f"{group}: Avg", {})[length] = _mean(per_type.get(t, {}).get(length) for t in every)
            for sub, types in subs.items():
                v = _mean(per_type.get(t, {}).get(length) for t in types)
                name = sub if group == "Real World" else f"{group}: {sub}"
                dims.setdefault(name, {})[length] = v
                nine.append(v)
        overall[length] = _mean(nine)
    return {"overall": overall, "dimensions": dims, "per_type": dict(per_type)}


def prompts_table(found) -> dict:
    per_tag, prompts_ok, all_ok = defaultdict(list), [], []
    for _, per_image in found:
        for answers in per_image:
            for q, _, ok in answers:
                per_tag[q.get("tag", "")].append(ok)
                all_ok.append(ok)
            prompts_ok.append(all(ok for _, _, ok in answers))
    return {"question_accuracy": 100.0 * _mean(all_ok) if all_ok else None,
            "image_accuracy": 100.0 * _mean(prompts_ok) if prompts_ok else None,
            "per_tag": {k: 100.0 * float(np.mean(v)) for k, v in sorted(per_tag.items())}}


def geneval_proxy(found) -> dict:
    per_task = defaultdict(list)
    for it, per_image in found:
        for answers in per_image:
            per_task[it.record.get("task")].append(all(ok for _, _, ok in answers))
    tasks = {k: 100.0 * float(np.mean(v)) for k, v in per_task.items()}
    return {"overall": _mean(tasks.values()), "per_task": tasks, "note": PROXY_NOTE}


def dpg_proxy(found) -> dict:
    """DSG's rule on each tile: a question scores 1 when right and none of its parents scored 0."""
    item_scores, per_cat = [], defaultdict(list)
    for _, per_image in found:
        tiles = []
        for answers in per_image:
            score = {q["qid"]: float(ok) for q, _, ok in answers}
            for q, _, _ in answers:
                if any(score.get(p, 1.0) == 0.0 for p in q.get("parents", []) if p != 0):
                    score[q["qid"]] = 0.0
            tiles.append(float(np.mean(list(score.values()))))
            for q, _, _ in answers:
                per_cat[q["tag"].split("-")[0].strip()].append(score[q["qid"]])
        item_scores.append(float(np.mean(tiles)))
    return {"overall": 100.0 * _mean(item_scores) if item_scores else None,
            "per_category": {k: 100.0 * float(np.mean(v)) for k, v in sorted(per_cat.items())}, "note": PROXY_NOTE}


def wise_proxy(found) -> dict:
    per_cat = defaultdict(list)
    for it, per_image in found:
        for answers in per_image:
            per_cat[it.record.get("task")].append(all(ok for _, _, ok in answers))
    cats = {str(k): 100.0 * float(np.mean(v)) for k, v in sorted(per_cat.items(), key=lambda kv: str(kv[0]))}
    return {"overall": _mean(cats.values()), "per_category": cats, "note": PROXY_NOTE}


TABLES = {"tiif": tiif_table, "prompts": prompts_table, "geneval": geneval_proxy, "dpg": dpg_proxy,
          "wise": wise_proxy}


def score_suite(suite: Suite, out: Path, items: Sequence[Item], verifier, *, judge: str, n: int = 1,
                batch: int = 32) -> dict:
    """Score ``out`` (a folder ``generate`` wrote for ``suite``) with ``verifier``; the report names ``judge``."""
    found, missing = answer_items(suite, Path(out), items, verifier, n, batch)
    if not found:
        raise ValueError(f"nothing to score in {out}: no generated item of the {len(items)} has questions "
                         f"({len(missing)} not generated)")
    report = {"suite": suite.name, "judge": judge, "scored_prompts": len(found), "missing_prompts": len(missing),
              **TABLES[suite.name](found)}
    if suite.name in ("tiif", "prompts"):
        report["note"] = OPEN_JUDGE_NOTE.format(judge=judge)
    return report


def format_report(r: dict) -> tuple[str, list, list]:
    """``(title, rows, header)`` for a plain table."""
    f = (lambda v: "-" if v is None else f"{v:.2f}")
    title = f"{r['suite']} scored by {r['judge']} ({r['scored_prompts']} prompts)"
    if r["suite"] == "tiif":
        rows = [["Overall", f(r["overall"]["short"]), f(r["overall"]["long"])]]
        rows += [[k, f(v.get("short")), f(v.get("long"))] for k, v in r["dimensions"].items()]
        return title, rows, ["dimension", "short", "long"]
    if r["suite"] == "prompts":
        rows = [["all questions", f(r["question_accuracy"])], ["all questions of an image", f(r["image_accuracy"])]]
        rows += [[k, f(v)] for k, v in r["per_tag"].items()]
        return title, rows, ["tag", "accuracy"]
    key = next(k for k in ("per_task", "per_category") if k in r)
    rows = [["Overall (proxy)", f(r["overall"])]] + [[str(k), f(v)] for k, v in r[key].items()]
    return title + " -- " + PROXY_NOTE, rows, [key.split("_")[1], "score"]
