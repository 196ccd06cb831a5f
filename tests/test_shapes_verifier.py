"""The shapes world's programmatic verifier: correctness per question kind, robustness, calibration, bad input."""
import numpy as np
import pytest
from PIL import Image

from alphagrpo.worlds.shapes import (QUALITY, Scene, ShapeObject, ShapesVerifier, degrade, failed_questions,
                                     kind_of, make_prompt, parse_question, render, sample_scene)
from alphagrpo.worlds.shapes.accuracy import build_cases, falsify, inject_defect
from alphagrpo.worlds.shapes.detect import analyze
from alphagrpo.worlds.shapes.verifier import hard_answer, soft_answer
from verifier_engine.protocol import Verifier

V = ShapesVerifier()
SCENE = Scene((ShapeObject("circle", "red", "large", 0, 0), ShapeObject("cross", "blue", "small", 2, 1),
               ShapeObject("triangle", "white", "large", 1, 2), ShapeObject("diamond", "pink", "small", 0, 2),
               ShapeObject("square", "yellow", "small", 1, 0)))


def test_it_is_a_verifier():
    assert isinstance(V, Verifier)


@pytest.mark.parametrize("resolution", [32, 64])
def test_detect_reads_shape_color_size_and_cell(resolution):
    found = {(d["shape"], d["color"], d["size"], d["cell"]) for d in V.detect(render(SCENE, resolution))}
    assert found == {(o.shape, o.color, o.size, (o.x, o.y)) for o in SCENE}
    for d in V.detect(Image.fromarray(render(SCENE, resolution))):
        assert d["confidence"] > 0.95 and d["pixels"] > 0


@pytest.fixture(scope="module")
def clean_cases():
    return build_cases(n=6, seed=11, resolution=32)


def test_every_question_kind_is_answered_right_on_clean_renders(clean_cases):
    seen = set()
    for case in clean_cases:
        an = analyze(case["image"])
        if case["kind"] == "judge":
            assert all(hard_answer(an, c) for c in case["checks"]) == case["truth"]
            continue
        for c in case["checks"]:
            p = soft_answer(an, c)
            assert hard_answer(an, c) == case["truth"], (c, case["truth"])
            assert (p > 0.9) if case["truth"] else (p < 0.1), (c, case["truth"], p)
            seen.add((kind_of(c), case["truth"]))
    kinds = {k for k, _ in seen}
    assert {"existence", "count", "no_object", "color", "shape", "size", "not_attribute", "spatial", "not_spatial",
            "size_comparison", "count_comparison", *QUALITY} <= kinds
    assert all((k, t) in seen for k in kinds for t in (True, False))


def test_semantic_answers_hold_up_under_mild_noise_and_blur(clean_cases):
    rng = np.random.default_rng(0)
    right = total = 0
    for case in clean_cases:
        if case["kind"] == "judge" or case["checks"][0]["kind"] == "quality":
            continue
        an = analyze(degrade(case["image"], rng, noise_std=12, blur_sigma=0.8))
        for c in case["checks"]:
            right += hard_answer(an, c) == case["truth"]
            total += 1
    assert total > 100 and right / total >= 0.98


def test_soft_scores_are_graded_not_binary():
    q = "is there a small diamond?"
    img = render(SCENE)
    p_clean = V.answer(img, q)[0]
    rng = np.random.default_rng(0)
    p_heavy = np.mean([V.answer(degrade(img, rng, noise_std=30, blur_sigma=1.4), q)[0] for _ in range(8)])
    assert p_clean > 0.99
    assert 0.02 < p_heavy < p_clean - 0.02
    # counts: the right number is near 1, a wrong one near 0
    assert V.answer(img, "are there exactly five shapes?")[0] > 0.99
    assert V.answer(img, "are there exactly four shapes?")[0] < 0.01
    assert V.answer(img, "is there exactly one red circle?") == (pytest.approx(1.0, abs=0.01), True)


def test_quality_defects_are_caught_and_clean_renders_pass():
    rng = np.random.default_rng(2)
    for name, (text, _) in QUALITY.items():
        for _ in range(3):
            bad = inject_defect(SCENE, name, 32, rng)
            p, yes = V.answer(bad, text)
            assert not yes and p < 0.5, name
        p, yes = V.answer(render(SCENE), text)
        assert yes and p > 0.95, name


def test_per_object_quality_every_object_or_the_average_object():
    """"every" is the product over objects; "mean" the average object's P(pass): one bad object of five sinks the
    first and costs the second a fifth; single-region questions and the strict answers are the same either way."""
    M = ShapesVerifier(quality_per_object="mean")
    rng = np.random.default_rng(3)
    for name, (text, _) in QUALITY.items():
        bad = inject_defect(SCENE, name, 32, rng)
        (pe, ye), (pm, ym) = V.answer(bad, text), M.answer(bad, text)
        assert ye == ym is False
        if name in ("solid_shapes", "clean_edges"):      # the defect hits one of the five objects
            assert pe < 0.01 and 0.7 < pm < 0.85, name
        else:
            assert pm == pe, name
    one = render(Scene(SCENE.objects[:1]))
    text = QUALITY["clean_edges"][0]
    assert M.answer(one, text)[0] == pytest.approx(V.answer(one, text)[0], abs=1e-12)
    assert M.answer(np.zeros((32, 32, 3), np.uint8), text) == (1.0, True)    # no objects: nothing fails
    with pytest.raises(ValueError, match="quality_per_object"):
        ShapesVerifier(quality_per_object="median")


def test_judge_and_failed_questions_point_at_what_is_wrong():
    rng = np.random.default_rng(4)
    rec = make_prompt("color+2d", "medium", rng)
    scene = sample_scene(rec, rng)
    assert V.judge(render(scene), rec["semantic_questions"] + rec["quality_questions"])
    assert failed_questions(render(scene), rec) == []
    target = rec["semantic_questions"][-1]
    wrong = falsify(scene, target["check"], rng)
    failed = failed_questions(render(wrong), rec)
    assert target["question"] in {f["question"] for f in failed}
    assert all(0.0 <= f["p_yes"] < 0.5 for f in failed)
    assert not V.judge(render(wrong), rec["semantic_questions"])


def test_score_follows_the_protocol():
    img = render(SCENE)
    out = V.score([img, Image.fromarray(img)], [["is there a red circle?", "is there no red circle?"],
                                                ["is the cross blue?"]])
    assert len(out) == 2 and len(out[0]) == 2 and len(out[1]) == 1
    assert out[0][0] > 0.99 and out[0][1] < 0.01 and out[1][0] > 0.99
    with pytest.raises(ValueError, match="one list per image"):
        V.score([img], [])
    with pytest.raises(ValueError, match="is a string"):
        V.score([img], ["is there a red circle?"])


def test_an_empty_image_is_a_documented_case():
    blank = render(Scene(()))
    assert V.detect(blank) == []
    assert V.answer(blank, "is there a circle?")[1] is False
    assert V.answer(blank, "is there no circle?") == (pytest.approx(1.0), True)
    assert V.answer(blank, "is the circle red?")[1] is False       # subjects that do not exist: no
    assert V.judge(blank, [text for text, _ in QUALITY.values()])


@pytest.mark.parametrize("image, msg", [
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (np.zeros((32, 32), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((32, 32, 4), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((32, 48, 3), np.uint8), "square"),
    (np.zeros((16, 16, 3), np.uint8), "resolution"),
    ([[0, 0, 0]], "PIL image or a uint8 numpy array"),
])
def test_bad_images_get_a_clear_error(image, msg):
    with pytest.raises(ValueError, match=msg):
        V.answer(image, "is there a circle?")


def test_bad_questions_get_a_clear_error():
    img = render(SCENE)
    with pytest.raises(ValueError, match="cannot parse shapes-world question"):
        V.answer(img, "is the sky blue?")
    with pytest.raises(ValueError, match="non-empty string"):
        V.answer(img, "")
    assert parse_question("Is there a RED circle ?") == parse_question("is there a red circle?")
