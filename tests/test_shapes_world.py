"""Shapes world primitives: scenes, plan text, the word splitter, the renderer and the degradations."""
import json

import numpy as np
import pytest

from alphagrpo.worlds.shapes import (BACKGROUND, COLORS, GRID, SHAPES, SIZES, Scene, ShapeObject, degrade, parse_plan,
                                     plan_text, render, words)
from alphagrpo.worlds.shapes.render import cell_box

SCENE = Scene((ShapeObject("circle", "red", "large", 0, 0), ShapeObject("cross", "blue", "small", 2, 1),
               ShapeObject("triangle", "white", "large", 1, 2)))


def test_world_has_the_primitives_the_issue_asks_for():
    assert len(SHAPES) >= 5 and len(COLORS) >= 8 and SIZES == ("small", "large")
    assert len(set(COLORS.values())) == len(COLORS)
    assert BACKGROUND not in COLORS.values()


@pytest.mark.parametrize("kwargs, msg", [
    (dict(shape="blob", color="red", size="large", x=0, y=0), "unknown shape"),
    (dict(shape="circle", color="teal", size="large", x=0, y=0), "unknown color"),
    (dict(shape="circle", color="red", size="huge", x=0, y=0), "unknown size"),
    (dict(shape="circle", color="red", size="large", x=GRID, y=0), "integer cell"),
    (dict(shape="circle", color="red", size="large", x=1.0, y=0), "integer cell"),
])
def test_shape_object_rejects_bad_values_with_a_clear_message(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ShapeObject(**kwargs)


def test_scene_rejects_two_objects_in_one_cell():
    a = ShapeObject("circle", "red", "large", 1, 1)
    with pytest.raises(ValueError, match="distinct cells"):
        Scene((a, ShapeObject("square", "blue", "small", 1, 1)))


def test_scene_json_round_trip_and_malformed_json():
    assert Scene.from_json(SCENE.to_json()) == SCENE
    assert Scene.from_json(json.dumps(SCENE.to_json())) == SCENE
    with pytest.raises(ValueError, match="not valid JSON"):
        Scene.from_json("{oops")
    with pytest.raises(ValueError, match="exactly the keys"):
        Scene.from_json({"objects": [{"shape": "circle"}]})


def test_plan_text_round_trips_and_is_lowercase_words():
    text = plan_text(SCENE)
    assert text == "large red circle at x0y0; small blue cross at x2y1; large white triangle at x1y2"
    assert parse_plan(text) == SCENE
    assert parse_plan(text.upper().replace("; ", " ;  ")) == SCENE
    assert plan_text(Scene(())) == "empty" and parse_plan("empty") == Scene(())


@pytest.mark.parametrize("bad, msg", [
    ("large red blob at x0y0", "unknown shape"),
    ("large red circle x0y0", "expected"),
    ("large red circle at y0x0", "expected"),
    ("large red circle at x0 y0", "expected"),
    ("large red circle at x0y7", "cell"),
    ("large red circle at x0y0; large red square at x0y0", "distinct cells"),
    ("", "empty plan"),
])
def test_parse_plan_errors_say_what_is_wrong(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_plan(bad)


def test_words_lowercases_and_splits_punctuation():
    assert words("Is there a Red circle?") == ["is", "there", "a", "red", "circle", "?"]
    assert words("a; b, c.") == ["a", ";", "b", ",", "c", "."]


def test_render_is_deterministic_uint8_on_a_plain_background():
    a, b = render(SCENE), render(SCENE)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    blank = render(Scene(()))
    assert np.all(blank == np.asarray(BACKGROUND, np.uint8))
    # every object shows its own color at its cell centre
    for o in SCENE:
        c = 32 / GRID
        cy, cx = int((o.y + 0.5) * c), int((o.x + 0.5) * c)
        assert tuple(a[cy + (1 if o.shape == "triangle" else 0), cx]) == COLORS[o.color]


@pytest.mark.parametrize("resolution", [32, 64])
def test_every_shape_stays_inside_its_cell_so_objects_never_overlap(resolution):
    for shape in SHAPES:
        for size in SIZES:
            for x in range(GRID):
                img = render(Scene((ShapeObject(shape, "white", size, x, GRID - 1 - x),)), resolution)
                x0, y0, x1, y1 = cell_box(x, GRID - 1 - x, resolution)
                inside = np.zeros(img.shape[:2], bool)
                inside[y0:y1, x0:x1] = True
                assert img[~inside].max() == 0
                assert img[inside].max() > 200


def test_sizes_differ_clearly_in_area():
    for shape in SHAPES:
        small = (render(Scene((ShapeObject(shape, "white", "small", 1, 1),))).astype(float) / 240).sum()
        large = (render(Scene((ShapeObject(shape, "white", "large", 1, 1),))).astype(float) / 240).sum()
        assert large > 1.8 * small


@pytest.mark.parametrize("bad", [0, 8, 10_000, 32.0, "32"])
def test_render_rejects_bad_resolution(bad):
    with pytest.raises(ValueError, match="resolution"):
        render(SCENE, bad)


def test_render_rejects_a_non_scene():
    with pytest.raises(TypeError, match="Scene"):
        render([ShapeObject("circle", "red", "large", 0, 0)])


def test_degrade_blurs_and_adds_noise_reproducibly():
    img = render(SCENE)
    rng = np.random.default_rng(0)
    assert np.array_equal(degrade(img, rng), img)
    blurred = degrade(img, rng, blur_sigma=1.0)
    assert blurred.dtype == np.uint8 and blurred.shape == img.shape
    edges = lambda a: (np.diff(a.astype(float), axis=1) ** 2).sum()  # noqa: E731  (gradient energy)
    assert edges(blurred) < 0.6 * edges(img)
    n1 = degrade(img, np.random.default_rng(5), noise_std=10)
    n2 = degrade(img, np.random.default_rng(5), noise_std=10)
    assert np.array_equal(n1, n2) and not np.array_equal(n1, img)
    with pytest.raises(ValueError, match=">= 0"):
        degrade(img, rng, noise_std=-1)
    with pytest.raises(ValueError, match="uint8"):
        degrade(img.astype(np.float32), rng)
