"""Prompt generators for the attribute, relation, counting and reasoning task types of the shapes world.

TIIF type names: ``color``, ``shape``, ``shape+color``, ``2d_spatial_relation``, ``color+2d``, ``shape+2d``,
``numeracy``, ``numeracy+color``, ``numeracy+2d``, and ``reasoning`` (prompts that need one step of world knowledge:
"as many circles as a triangle has corners", "a square the color of the sky"). Each generator takes ``(rng, d)``
with ``d`` 0/1/2 for easy/medium/hard and returns ``(prompt, Builder)``; difficulty grows with the number of
objects and constraints.
"""
from __future__ import annotations

from alphagrpo.worlds.shapes.build import (Builder, a, between, distinct, join, maybe, pick, plural, random_cells,
                                           the, true_relations)
from alphagrpo.worlds.shapes.checks import RELATIONS, noun_phrase
from alphagrpo.worlds.shapes.primitives import COLORS, NUMBER_WORDS, SHAPES, SIZES

OBJECTS = {0: (1, 2), 1: (2, 3), 2: (3, 4)}  # objects per difficulty for the plain attribute tasks
P_SIZE = {0: 0.3, 1: 0.3, 2: 0.5}

# One step of knowledge each. Kept small: every word here is in the vocabulary.
COLOR_KNOWLEDGE = {"the sky": "blue", "the ocean": "blue", "grass": "green", "a leaf": "green", "snow": "white",
                   "milk": "white", "a banana": "yellow", "a lemon": "yellow", "a strawberry": "red",
                   "a tomato": "red", "an orange": "orange", "a carrot": "orange", "a flamingo": "pink",
                   "a grape": "purple", "an eggplant": "purple"}
SHAPE_KNOWLEDGE = {"with three corners": "triangle", "with three sides": "triangle", "with no corners": "circle",
                   "like a coin": "circle", "like a wheel": "circle", "like a plus sign": "cross",
                   "like a kite": "diamond", "like a box": "square"}
COUNT_KNOWLEDGE = {"a bicycle has wheels": 2, "a bird has legs": 2, "a person has eyes": 2,
                   "a triangle has corners": 3, "a triangle has sides": 3, "a square has corners": 4,
                   "a square has sides": 4, "a car has wheels": 4, "a dog has legs": 4}


def _sized(rng, f: dict, p: float) -> dict:
    if maybe(rng, p):
        f["size"] = pick(rng, SIZES)
    return f


def _number(n: int, f: dict) -> str:
    return f"{NUMBER_WORDS[n]} {noun_phrase(f, plural=n > 1)}"


def _counts(rng, k: int, lo: int, hi: int, total: int) -> list[int]:
    while True:
        c = [between(rng, lo, hi) for _ in range(k)]
        if sum(c) <= total:
            return c


def color_task(rng, d):
    """Objects of distinct shapes, each with a color: "is the circle red?"."""
    b, parts = Builder(), []
    for sh in distinct(rng, SHAPES, between(rng, *OBJECTS[d])):
        f = _sized(rng, {"shape": sh, "color": pick(rng, COLORS)}, P_SIZE[d])
        b.group(f)
        parts.append(a(f))
        b.exists({"shape": sh})
        b.attr({"shape": sh}, "color", f["color"])
        if "size" in f:
            b.attr({"shape": sh}, "size", f["size"])
    return join(parts), b


def shape_task(rng, d):
    """Objects of distinct colors, each with a shape: "is the red shape a circle?"."""
    b, parts = Builder(), []
    for c in distinct(rng, COLORS, between(rng, *OBJECTS[d])):
        f = _sized(rng, {"shape": pick(rng, SHAPES), "color": c}, P_SIZE[d])
        b.group(f)
        parts.append(a(f))
        b.exists({"color": c})
        b.attr({"color": c}, "shape", f["shape"])
        if "size" in f:
            b.attr({"color": c}, "size", f["size"])
    return join(parts), b


def shape_color_task(rng, d):
    """Objects with a bound shape and color (and often a size): "is there a red circle?"."""
    b, parts, seen = Builder(), [], set()
    k = between(rng, *OBJECTS[d])
    while len(seen) < k:
        seen.add((pick(rng, SHAPES), pick(rng, COLORS)))
    for sh, c in sorted(sorted(seen), key=lambda _: rng.random()):   # sorted first: set order varies by process
        f = _sized(rng, {"shape": sh, "color": c}, 0.5)
        b.group(f)
        parts.append(a(f))
        b.exists({"shape": sh, "color": c}, tag="Attribute")
        if "size" in f:
            b.attr({"shape": sh, "color": c}, "size", f["size"])
    return join(parts), b


def _relation_prompt(rng, d, fs: list[dict], refs: list[dict], b: Builder) -> str:
    """A chain of 2-D relations over the objects ``fs`` (each already a group), true on a random layout."""
    cells = random_cells(rng, len(fs))
    r0 = pick(rng, true_relations(cells[0], cells[1]))
    clauses = [f"{a(fs[0])} {RELATIONS[r0]} {a(fs[1])}"]
    b.rel(refs[0], r0, refs[1])
    for i in range(2, len(fs)):
        partners = distinct(rng, range(i), 2 if (d == 2 and len(fs) == 3) else 1)
        preds = []
        for j in sorted(partners):
            r = pick(rng, true_relations(cells[i], cells[j]))
            preds.append(f"{RELATIONS[r]} {the(refs[j])}")
            b.rel(refs[i], r, refs[j])
        clauses.append(f"{a(fs[i])} {' and '.join(preds)}")
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + ", and " + clauses[-1]


def spatial_task(rng, d):
    """``2d_spatial_relation``: "a circle to the left of a square, and a triangle above the square"."""
    k = {0: 2, 1: 3, 2: between(rng, 3, 4)}[d]
    b = Builder()
    fs = [_sized(rng, {"shape": sh}, P_SIZE[d]) for sh in distinct(rng, SHAPES, k)]
    refs = [{"shape": f["shape"]} for f in fs]
    for f in fs:
        b.group(f)
        b.exists(f)
    return _relation_prompt(rng, d, fs, refs, b), b


def color_2d_task(rng, d):
    """``color+2d``: colored objects in 2-D relations; the color questions are asked when the shape is unique."""
    k = {0: 2, 1: 3, 2: between(rng, 3, 4)}[d]
    b = Builder()
    shapes = distinct(rng, SHAPES, k) if maybe(rng, 0.7) else [pick(rng, SHAPES) for _ in range(k)]
    colors = distinct(rng, COLORS, k)
    fs = [_sized(rng, {"shape": s, "color": c}, 0.2) for s, c in zip(shapes, colors)]
    unique = len(set(shapes)) == k
    refs = [{"shape": f["shape"]} if unique else {"shape": f["shape"], "color": f["color"]} for f in fs]
    for f, r in zip(fs, refs):
        b.group(f)
        b.exists(r)
        if unique:
            b.attr(r, "color", f["color"])
    return _relation_prompt(rng, d, fs, refs, b), b


def shape_2d_task(rng, d):
    """``shape+2d``: objects known by their colors, asked for their shapes and relations."""
    k = {0: 2, 1: 3, 2: between(rng, 3, 4)}[d]
    b = Builder()
    fs = [_sized(rng, {"shape": pick(rng, SHAPES), "color": c}, 0.2) for c in distinct(rng, COLORS, k)]
    refs = [{"color": f["color"]} for f in fs]
    for f, r in zip(fs, refs):
        b.group(f)
        b.exists(r)
        b.attr(r, "shape", f["shape"])
    return _relation_prompt(rng, d, fs, refs, b), b


def numeracy_task(rng, d, color: bool = False):
    """``numeracy`` ("two circles and one large square") and ``numeracy+color`` ("two red circles")."""
    k, lo, hi, total = {0: (1, 1, 3, 3), 1: (2, 1, 3, 4), 2: (3, 1, 3, 5)}[d]
    if d == 1 and maybe(rng, 0.2):
        k, lo, hi, total = 1, 4, 4, 4
    elif d == 2 and maybe(rng, 0.3):
        k, lo, hi, total = 2, 2, 4, 5
    b, parts = Builder(), []
    shapes = distinct(rng, SHAPES, k)
    for sh, n in zip(shapes, _counts(rng, k, lo, hi, total)):
        f = {"shape": sh}
        if color or maybe(rng, 0.3):
            f["color"] = pick(rng, COLORS)
        _sized(rng, f, 0.3)
        b.group(f, n)
        parts.append(_number(n, f))
        b.exists(f)
        b.count(f, n)
    return join(parts), b


def numeracy_2d_task(rng, d):
    """``numeracy+2d``: counts in rows and columns ("two circles in the top row")."""
    k = {0: 1, 1: 2, 2: between(rng, 2, 3)}[d]
    b, parts = Builder(), []
    counts = _counts(rng, k, 1, 3 if k == 1 else 2, 5)
    for sh, n in zip(distinct(rng, SHAPES, k), counts):
        f = {"shape": sh}
        if maybe(rng, 0.25):
            f["color"] = pick(rng, COLORS)
        _sized(rng, f, 0.25)
        f[pick(rng, "xy")] = between(rng, 0, 2)
        b.group(f, n)
        parts.append(_number(n, f))
        b.exists({k2: v for k2, v in f.items() if k2 not in "xy"})
        b.count(f, n)
    return join(parts), b


def reasoning_task(rng, d):
    """``reasoning``: one step of knowledge per object (its color, its shape, or how many there are)."""
    b = Builder()
    kinds = {0: [pick(rng, ["color", "shape", "count"])],
             1: [pick(rng, ["color", "shape", "count"]), "plain"],
             2: distinct(rng, ["color", "shape"], 2) + (["count"] if maybe(rng, 0.5) else [])}[d]
    shapes = distinct(rng, SHAPES, len(kinds))
    used_colors: list[str] = []
    parts, refs = [], []
    for kind, sh in zip(kinds, shapes):
        if kind == "color":
            thing = pick(rng, COLOR_KNOWLEDGE)
            col = COLOR_KNOWLEDGE[thing]
            if col in used_colors:
                thing = pick(rng, [t for t, c in COLOR_KNOWLEDGE.items() if c not in used_colors])
                col = COLOR_KNOWLEDGE[thing]
            f = _sized(rng, {"shape": sh, "color": col}, 0.3)
            parts.append(f"{a({k: v for k, v in f.items() if k != 'color'})} the color of {thing}")
            ref = {"shape": sh}
            b.exists(ref)
            b.attr(ref, "color", col)
        elif kind == "shape":
            phrase = pick(rng, [p for p, s in SHAPE_KNOWLEDGE.items() if s not in shapes or s == sh])
            f = _sized(rng, {"shape": SHAPE_KNOWLEDGE[phrase],
                             "color": pick(rng, [c for c in COLORS if c not in used_colors])}, 0.3)
            parts.append(f"{a({k: v for k, v in f.items() if k != 'shape'})} {phrase}")
            ref = {"color": f["color"]}
            b.exists(ref)
            b.attr(ref, "shape", f["shape"])
        elif kind == "count":
            phrase = pick(rng, [p for p, n in COUNT_KNOWLEDGE.items() if n <= (2 if d == 0 else 3 if d == 2 else 4)])
            n = COUNT_KNOWLEDGE[phrase]
            f = {"shape": sh}
            parts.append(f"as many {plural(f)} as {phrase}")
            b.group(f, n, avoid={"color": used_colors} if used_colors else None)
            b.count(f, n)
            continue
        else:  # a plain object, fully described
            f = {"shape": sh, "color": pick(rng, [c for c in COLORS if c not in used_colors])}
            parts.append(a(f))
            ref = {"shape": sh}
            b.exists(f)
        used_colors.append(f["color"])
        b.group(f)
        refs.append(ref)
    # count groups drawn before a later color was fixed must avoid it too
    for g in b.groups:
        if g["count"][0] > 1 and used_colors:
            g["not"] = {"color": sorted(set(used_colors))}
    text = join(parts) if "count" not in kinds or len(parts) < 2 else ", ".join(parts[:-1]) + ", and " + parts[-1]
    if len(refs) >= 2 and (d == 2 or maybe(rng, 0.5)):
        cells = random_cells(rng, 2)
        r = pick(rng, true_relations(cells[0], cells[1]))
        text += f", with {the(refs[0])} {RELATIONS[r]} {the(refs[1])}"
        b.rel(refs[0], r, refs[1])
    return text, b


GENERATORS = {
    "color": color_task,
    "shape": shape_task,
    "shape+color": shape_color_task,
    "2d_spatial_relation": spatial_task,
    "color+2d": color_2d_task,
    "shape+2d": shape_2d_task,
    "numeracy": numeracy_task,
    "numeracy+color": lambda rng, d: numeracy_task(rng, d, color=True),
    "numeracy+2d": numeracy_2d_task,
    "reasoning": reasoning_task,
}
