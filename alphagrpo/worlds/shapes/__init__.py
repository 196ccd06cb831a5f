"""The shapes world: the embedded default in which the whole AlphaGRPO recipe runs for real on a CPU.

Colored shapes (circle, square, triangle, diamond, cross; 8 colors; 2 sizes) on a 3 x 3 grid over a black
background, rendered at 32 x 32 by default. Prompts over 19 TIIF task types at Easy/Medium/Hard 3:5:2, each with a
plan text, semantic and quality questions (text plus machine-readable check), and a sampler of satisfying scenes; a
programmatic verifier answering the questions from pixels with calibrated P(yes) and a strict judgement.

Files: ``primitives`` (objects, scenes, plan text, words), ``render`` (renderer, degradations), ``checks``
(question grammar and truth on a scene), ``build`` / ``tasks_attr`` / ``tasks_logic`` / ``prompts`` (Primitive-to-
Prompt), ``synth`` (splits, JSONL), ``detect`` / ``verifier`` (reading images), ``accuracy`` (the verifier's
measured accuracy). Importing this package does no work.
"""
from alphagrpo.worlds.shapes.checks import (QUALITY, QuestionParseError, evaluate, kind_of, parse_question,
                                            question_text, tag_of)
from alphagrpo.worlds.shapes.primitives import (BACKGROUND, COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene,
                                                ShapeObject, parse_plan, plan_text, words)
from alphagrpo.worlds.shapes.prompts import (DIFFICULTIES, DIFFICULTY_RATIO, TASKS, make_prompt, quality_questions,
                                             sample_scene, satisfies, semantic_checks, vocabulary)
from alphagrpo.worlds.shapes.render import degrade, render
from alphagrpo.worlds.shapes.synth import read_jsonl, summary_table, synthesize, synthesize_splits, write_jsonl
from alphagrpo.worlds.shapes.verifier import ShapesVerifier, failed_questions

__all__ = [
    "SHAPES", "COLORS", "SIZES", "GRID", "MAX_OBJECTS", "BACKGROUND", "TASKS", "DIFFICULTIES", "DIFFICULTY_RATIO",
    "QUALITY", "ShapeObject", "Scene", "render", "degrade", "make_prompt", "sample_scene", "satisfies",
    "semantic_checks", "quality_questions", "plan_text", "parse_plan", "words", "vocabulary", "synthesize",
    "synthesize_splits", "write_jsonl", "read_jsonl", "summary_table", "ShapesVerifier", "failed_questions",
    "parse_question", "question_text", "evaluate", "tag_of", "kind_of", "QuestionParseError",
]
