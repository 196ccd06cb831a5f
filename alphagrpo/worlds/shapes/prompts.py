"""Primitive-to-Prompt for the shapes world: task registry, one prompt record, resampling its scenes, vocabulary.

A record (RECIPE.md section 9 plus extra keys)::

    {"prompt": str,
     "semantic_questions": [{"question": str, "tag": str, "check": dict}, ...],
     "quality_questions":  [{"question": str, "tag": str, "check": dict}, ...],
     "task": TIIF type name, "difficulty": "easy" | "medium" | "hard",
     "plan": plan_text(scene), "scene": scene.to_json(),
     "constraints": {"groups": [...]}}   # what ``sample_scene`` needs (see build.py)

The task types are the TIIF ones that make sense for flat colored shapes. Left out, because this world has no such
thing: 3d relations, texture, action, style, text rendering, real_world.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from alphagrpo.worlds.shapes.build import draw_scene
from alphagrpo.worlds.shapes.checks import QUALITY, RELATIONS, evaluate, make_question, parse_question
from alphagrpo.worlds.shapes.primitives import (COL_WORDS, COLORS, EMPTY_PLAN, NUMBER_WORDS, PLURALS, ROW_WORDS,
                                                SHAPES, SIZES, Scene, cell_tokens, plan_text, words)
from alphagrpo.worlds.shapes.tasks_attr import COLOR_KNOWLEDGE, COUNT_KNOWLEDGE, SHAPE_KNOWLEDGE
from alphagrpo.worlds.shapes.tasks_attr import GENERATORS as _ATTR
from alphagrpo.worlds.shapes.tasks_logic import GENERATORS as _LOGIC

GENERATORS = {**_ATTR, **_LOGIC}
TASKS: tuple[str, ...] = (
    "color", "shape", "shape+color", "2d_spatial_relation", "color+2d", "shape+2d",
    "numeracy", "numeracy+color", "numeracy+2d",
    "negation", "negation+color", "negation+2d",
    "comparison", "comparison+color", "comparison+2d",
    "differentiation", "differentiation+color", "differentiation+2d",
    "reasoning",
)
assert set(TASKS) == set(GENERATORS)
DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
DIFFICULTY_RATIO: tuple[int, ...] = (3, 5, 2)


def check_task(task: str, difficulty: str) -> int:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; the shapes world supports {TASKS}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; use one of {DIFFICULTIES}")
    return DIFFICULTIES.index(difficulty)


def quality_questions() -> list[dict]:
    """The four quality questions every record carries (Texture, Coherence, Geometry, Aesthetics)."""
    return [make_question({"kind": "quality", "name": n}) for n in QUALITY]


def make_prompt(task: str, difficulty: str, rng: np.random.Generator) -> dict:
    """One prompt record of ``task`` at ``difficulty`` (see the module docstring), with a satisfying scene."""
    d = check_task(task, difficulty)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    for _ in range(200):
        text, b = GENERATORS[task](rng, d)
        scene = draw_scene(b.groups, [q["check"] for q in b.questions], rng)
        if scene is not None:
            return {"prompt": text, "semantic_questions": b.questions, "quality_questions": quality_questions(),
                    "task": task, "difficulty": difficulty, "plan": plan_text(scene), "scene": scene.to_json(),
                    "constraints": {"groups": b.groups}}
    raise RuntimeError(f"the {task}/{difficulty} generator made 200 unsatisfiable prompts in a row (a bug)")


def semantic_checks(record: Mapping[str, Any]) -> list[dict]:
    """The checks of a record's semantic questions (from ``check`` when present, else parsed from the text)."""
    qs = record.get("semantic_questions")
    if not isinstance(qs, list):
        raise ValueError("record has no list 'semantic_questions'")
    return [q["check"] if isinstance(q, Mapping) and "check" in q else parse_question(
        q["question"] if isinstance(q, Mapping) else q) for q in qs]


def satisfies(scene: Scene, record: Mapping[str, Any]) -> bool:
    """Whether ``scene`` makes every semantic question of ``record`` true (judged on the scene itself)."""
    return all(evaluate(scene.objects, c) for c in semantic_checks(record))


def sample_scene(record: Mapping[str, Any], rng: np.random.Generator, tries: int = 2000) -> Scene:
    """A fresh random scene satisfying ``record`` (new cells, new values for what the prompt leaves free). After
    ``tries`` failed draws (not seen with the shipped generators) it returns the record's own scene."""
    cons = record.get("constraints")
    if not isinstance(cons, Mapping) or not isinstance(cons.get("groups"), list):
        raise ValueError("record has no 'constraints' with 'groups': only records made by make_prompt/synthesize "
                         "(or read back from their JSONL) can be resampled")
    checks = semantic_checks(record)
    scene = draw_scene(cons["groups"], checks, rng, tries=tries)
    if scene is None:
        scene = Scene.from_json(record["scene"])
        if not all(evaluate(scene.objects, c) for c in checks):
            raise RuntimeError(f"no scene satisfies prompt {record.get('prompt')!r}")
    return scene


def _template_words() -> set[str]:
    """Every word a prompt, plan or question can contain, gathered from the primitives and the fixed phrases."""
    parts = [*SHAPES, *PLURALS.values(), *COLORS, *SIZES, *NUMBER_WORDS, *ROW_WORDS, *COL_WORDS, *cell_tokens(),
             *RELATIONS.values(), *COLOR_KNOWLEDGE, *SHAPE_KNOWLEDGE, *COUNT_KNOWLEDGE,
             *(text for text, _ in QUALITY.values()), EMPTY_PLAN,
             # prompt templates (tasks_attr, tasks_logic)
             "a an the and , but no with that is not than larger smaller more fewer all of them except one which",
             "as many the color of in the row column large one small one shape shapes",
             # questions (checks.py) and plans (primitives.py)
             "is there are exactly ? at ;"]
    out: set[str] = set()
    for p in parts:
        out.update(words(p))
    return out


def vocabulary() -> list[str]:
    """Sorted list of every word (and punctuation token) any prompt, plan or question of this world can contain."""
    return sorted(_template_words())
