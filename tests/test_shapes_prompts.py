"""Shapes world Primitive-to-Prompt: every task's generator, the questions' grammar, the splits and the JSONL."""
import json
import os
from collections import Counter

import numpy as np
import pytest

from alphagrpo.worlds.shapes import (DIFFICULTIES, QUALITY, TASKS, QuestionParseError, Scene, ShapesVerifier,
                                     evaluate, make_prompt, parse_question, plan_text, question_text, read_jsonl,
                                     render, sample_scene, satisfies, synthesize, vocabulary, words, write_jsonl)
from alphagrpo.worlds.shapes.synth import allocation, synthesize_splits

TIIF = "/work/shared/data/tiif-bench-testmini/testmini_prompts"
RECIPE_TAGS = {"Style", "Environment", "Viewpoint", "Existence", "Count", "Attribute", "Action", "Spatial", "Text",
               "Negative", "Geometry", "Anatomy", "Texture", "Coherence", "Lighting", "Physics", "Legibility",
               "Aesthetics"}


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(123)
    return {(t, d): [make_prompt(t, d, rng) for _ in range(4)] for t in TASKS for d in DIFFICULTIES}


def test_tasks_cover_what_the_issue_asks_for_with_tiif_names():
    wanted = {"color", "shape", "2d_spatial_relation", "numeracy", "negation", "comparison", "differentiation",
              "color+2d", "shape+2d", "shape+color", "numeracy+color", "numeracy+2d", "negation+color",
              "negation+2d", "comparison+color", "comparison+2d", "differentiation+color", "differentiation+2d",
              "reasoning"}
    assert wanted <= set(TASKS)
    if os.path.isdir(TIIF):  # the combined types are TIIF's file stems; color/shape/reasoning are its basic ones
        stems = {f[: -len("_prompts.jsonl")] for f in os.listdir(TIIF)}
        assert set(TASKS) - {"color", "shape", "reasoning"} <= stems


def test_every_generator_makes_prompts_whose_scenes_satisfy_them(records):
    verifier = ShapesVerifier()
    rng = np.random.default_rng(7)
    for (task, diff), recs in records.items():
        for rec in recs:
            assert rec["task"] == task and rec["difficulty"] == diff
            scene = Scene.from_json(rec["scene"])
            assert rec["plan"] == plan_text(scene)
            assert satisfies(scene, rec), (task, diff, rec["prompt"])
            fresh = sample_scene(rec, rng)
            assert satisfies(fresh, rec), (task, diff, rec["prompt"])
            questions = rec["semantic_questions"] + rec["quality_questions"]
            assert verifier.judge(render(fresh), questions), (task, diff, rec["prompt"], plan_text(fresh))


def test_questions_are_tagged_and_their_text_parses_back_to_their_check(records):
    for recs in records.values():
        for rec in recs:
            assert rec["semantic_questions"], rec["prompt"]
            assert [q["check"]["name"] for q in rec["quality_questions"]] == list(QUALITY)
            for q in rec["semantic_questions"] + rec["quality_questions"]:
                assert q["tag"] in RECIPE_TAGS
                assert parse_question(q["question"]) == q["check"]
                assert question_text(q["check"]) == q["question"]


def test_each_prompt_is_false_for_some_scene(records):
    # the questions constrain: an empty scene or a scene of the wrong things fails at least one of them
    for recs in records.values():
        for rec in recs:
            assert not satisfies(Scene(()), rec) or any(
                q["check"]["kind"] == "count" and q["check"]["n"] == 0 for q in rec["semantic_questions"])


def test_sample_scene_gives_fresh_scenes(records):
    rng = np.random.default_rng(0)
    for (task, diff), recs in records.items():
        plans = {plan_text(sample_scene(recs[0], rng)) for _ in range(6)}
        assert len(plans) > 1, (task, diff, recs[0]["prompt"])


def test_difficulty_grows_with_objects_and_constraints(records):
    def mean(diff, f):
        return np.mean([f(r) for (t, d), recs in records.items() if d == diff for r in recs])
    n_obj = lambda r: len(r["scene"]["objects"])  # noqa: E731
    n_q = lambda r: len(r["semantic_questions"])  # noqa: E731
    assert mean("easy", n_obj) < mean("medium", n_obj) < mean("hard", n_obj)
    assert mean("easy", n_q) < mean("medium", n_q) < mean("hard", n_q)
    for (task, diff), recs in records.items():
        if diff == "easy":
            assert max(n_obj(r) for r in recs) <= 3, task


def test_default_allocation_is_3_5_2():
    train, test = allocation(500, 1024)
    for t in TASKS:
        assert [train[(t, d)] for d in DIFFICULTIES] == [150, 250, 100]
    assert sum(test.values()) == 1024
    assert [sum(test[(t, d)] for t in TASKS) for d in DIFFICULTIES] == [307, 512, 205]
    per_task = [sum(test[(t, d)] for d in DIFFICULTIES) for t in TASKS]
    assert max(per_task) - min(per_task) <= 1


@pytest.fixture(scope="module")
def small_synth():
    return synthesize(n_per_task=20, n_test=57, seed=3)


def test_synthesize_keeps_the_ratio_and_disjoint_splits(small_synth):
    train, test = small_synth
    counts = Counter((r["task"], r["difficulty"]) for r in train)
    for t in TASKS:
        assert [counts[(t, d)] for d in DIFFICULTIES] == [6, 10, 4]
    assert Counter(r["difficulty"] for r in test) == {"easy": 17, "medium": 29, "hard": 11}
    keys = [" ".join(words(r["prompt"])) for r in train + test]
    assert len(set(keys)) == len(keys)


def test_synthesize_is_reproducible_and_test_split_ignores_train_size(small_synth):
    train, test = small_synth
    train2, test2 = synthesize(n_per_task=20, n_test=57, seed=3)
    assert train2 == train and test2 == test
    _, test3 = synthesize(n_per_task=10, n_test=57, seed=3)
    assert test3 == test
    _, test4 = synthesize(n_per_task=0, n_test=57, seed=4)
    assert [r["prompt"] for r in test4] != [r["prompt"] for r in test]


def test_extra_split_is_disjoint_and_leaves_train_and_test_unchanged(small_synth):
    train, test = small_synth
    train2, test2, extra = synthesize_splits(n_per_task=20, n_test=57, n_extra_per_task=10, seed=3)
    assert train2 == train and test2 == test
    counts = Counter((r["task"], r["difficulty"]) for r in extra)
    for t in TASKS:
        assert [counts[(t, d)] for d in DIFFICULTIES] == [3, 5, 2]
    keys = {" ".join(words(r["prompt"])) for r in train + test}
    assert not keys & {" ".join(words(r["prompt"])) for r in extra}
    with pytest.raises(ValueError, match="n_extra_per_task"):
        synthesize_splits(n_per_task=2, n_test=2, n_extra_per_task=-1)


def test_synthesized_texts_use_only_the_vocabulary(small_synth):
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab) and len(vocab) < 250
    for rec in small_synth[0] + small_synth[1]:
        texts = [rec["prompt"], rec["plan"]] + [q["question"] for q in rec["semantic_questions"]
                                                + rec["quality_questions"]]
        for text in texts:
            assert set(words(text)) <= vocab, (text, set(words(text)) - vocab)


def test_jsonl_round_trip_and_minimal_schema(tmp_path, small_synth):
    path = tmp_path / "sub" / "x.jsonl"
    assert write_jsonl(str(path), small_synth[1]) == len(small_synth[1])
    assert read_jsonl(str(path)) == small_synth[1]
    minimal = tmp_path / "min.jsonl"
    minimal.write_text(json.dumps({"prompt": "a red circle", "semantic_questions": [
        {"question": "is there a red circle?", "tag": "Existence"}], "quality_questions": []}) + "\n\n")
    [rec] = read_jsonl(str(minimal))
    assert rec["prompt"] == "a red circle"
    with pytest.raises(ValueError, match="constraints"):
        sample_scene(rec, np.random.default_rng(0))


@pytest.mark.parametrize("line, msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"semantic_questions": [], "quality_questions": []}', "'prompt'"),
    ('{"prompt": "x", "semantic_questions": [{"question": "q"}], "quality_questions": []}', "semantic_questions"),
    ('{"prompt": "x", "semantic_questions": []}', "quality_questions"),
])
def test_read_jsonl_names_the_bad_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "semantic_questions": [], "quality_questions": []})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{msg}"):
        read_jsonl(str(path))


def test_make_prompt_rejects_unknown_task_and_difficulty():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="3d_spatial_relation.*supports"):
        make_prompt("3d_spatial_relation", "easy", rng)
    with pytest.raises(ValueError, match="difficulty"):
        make_prompt("color", "extreme", rng)
    with pytest.raises(TypeError, match="Generator"):
        make_prompt("color", "easy", 0)


@pytest.mark.parametrize("text, truth", [
    ("is there a red circle?", True),
    ("is there no square?", True),
    ("are there exactly two circles?", False),
    ("is there exactly one large red circle?", True),
    ("is the circle red?", True),
    ("is the red shape not a circle?", False),
    ("is the small shape in the right column blue?", True),
    ("is the circle to the left of the blue shape?", True),
    ("is the cross not above the circle?", True),
    ("is the circle not above the cross?", False),
    ("is the circle larger than the cross?", True),
    ("are there more shapes in the top row than in the bottom row?", False),
    ("are there more large shapes than small shapes?", True),
])
def test_question_grammar_round_trips_and_means_what_it_says(text, truth):
    from alphagrpo.worlds.shapes import ShapeObject
    scene = Scene((ShapeObject("circle", "red", "large", 0, 0), ShapeObject("cross", "blue", "small", 2, 1),
                   ShapeObject("triangle", "white", "large", 1, 2)))
    check = parse_question(text)
    assert question_text(check) == text
    assert evaluate(scene, check) is truth


@pytest.mark.parametrize("bad", ["is the sky blue?", "how many circles are there?", "is there a circle in the "
                                 "top corner?", "are there exactly seven circles?", ""])
def test_unparseable_questions_raise_a_clear_error(bad):
    with pytest.raises(QuestionParseError, match="question"):
        parse_question(bad)


def test_synthesized_prompts_do_not_depend_on_the_process_hash_seed():
    """Held-out prompts must be the same in every process: no set iteration order (PYTHONHASHSEED) may leak in."""
    import os
    import subprocess
    import sys
    code = ("import json\n"
            "from alphagrpo.worlds.shapes.synth import synthesize_splits\n"
            "print(json.dumps(synthesize_splits(n_per_task=4, n_test=40, n_extra_per_task=2, seed=0), "
            "sort_keys=True, default=str))\n")
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        outs.append(run.stdout)
    assert outs[0] == outs[1]
