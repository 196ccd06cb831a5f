"""Prompt generators for the logic task types of the shapes world: negation, comparison, differentiation, and their
combinations with color and 2-D position (TIIF type names ``negation``, ``negation+color``, ``negation+2d``,
``comparison``, ``comparison+color``, ``comparison+2d``, ``differentiation``, ``differentiation+color``,
``differentiation+2d``).

Same contract as ``tasks_attr``: ``(rng, d) -> (prompt, Builder)``. Relations and negations about positions are read
off a random witness layout, so every prompt is satisfiable; the sampler re-draws layouts freely.
"""
from __future__ import annotations

from alphagrpo.worlds.shapes.build import (Builder, a, between, distinct, join, maybe, pick, plural,
                                           random_cells, the, true_relations)
from alphagrpo.worlds.shapes.checks import RELATIONS, noun_phrase
from alphagrpo.worlds.shapes.primitives import COL_WORDS, COLORS, NUMBER_WORDS, ROW_WORDS, SHAPES, SIZES

OBJECTS = {0: (1, 2), 1: (2, 3), 2: (3, 4)}


def _other(values, v):
    return [x for x in values if x != v]


def _region(axis: str, v: int) -> str:
    return f"in the {ROW_WORDS[v]} row" if axis == "y" else f"in the {COL_WORDS[v]} column"


def _extra(rng, b: Builder, shapes=(), colors=(), sizes=()) -> str:
    """A fully described extra object whose shape/color/size avoid the given values; returns its phrase."""
    f = {"shape": pick(rng, [s for s in SHAPES if s not in shapes]),
         "color": pick(rng, [c for c in COLORS if c not in colors])}
    if sizes:
        f["size"] = pick(rng, [s for s in SIZES if s not in sizes])
    b.group(f)
    b.exists(f)
    return a(f)


# ----------------------------------------------------------------------------------------------------- negation
def negation_task(rng, d):
    """Objects plus absent shapes or sizes: "a circle and a triangle, but no squares and no large shapes"."""
    k = between(rng, *OBJECTS[d])
    nneg = {0: 1, 1: between(rng, 1, 2), 2: 2}[d]
    shapes = distinct(rng, SHAPES, k + nneg)
    b = Builder()
    size_neg = pick(rng, SIZES) if maybe(rng, 0.3) else None
    negs = [(f"no {size_neg} shapes", {"size": size_neg})] if size_neg else []
    negs += [(f"no {plural({'shape': s})}", {"shape": s}) for s in shapes[k:k + nneg - len(negs)]]
    parts = []
    for sh in shapes[:k]:
        f = {"shape": sh}
        if maybe(rng, 0.3):
            f["size"] = pick(rng, _other(SIZES, size_neg))
        b.group(f, avoid={"size": [size_neg]} if size_neg and "size" not in f else None)
        parts.append(a(f))
        b.exists(f)
    for _, f in negs:
        b.absent(f)
    return f"{join(parts)}, but {join([t for t, _ in negs])}", b


def negation_color_task(rng, d):
    """Colors that are ruled out: "a square that is not red and a blue circle, but no green shapes"."""
    k = between(rng, *OBJECTS[d])
    nneg = {0: 1, 1: between(rng, 1, 2), 2: between(rng, 2, 3)}[d]
    n_not = between(rng, 0, min(k, nneg))
    absent = distinct(rng, COLORS, nneg - n_not)
    shapes = distinct(rng, SHAPES, k)
    b, parts, statements = Builder(), [], []
    absent_filters = []
    for c in absent:
        if maybe(rng, 0.3):
            f = {"color": c, "shape": pick(rng, shapes)}
        else:
            f = {"color": c}
        absent_filters.append(f)
        statements.append(f"no {plural(f)}")
    for i, sh in enumerate(shapes):
        ref = {"shape": sh}
        if i < n_not:
            x = pick(rng, [c for c in COLORS if c not in absent])
            b.group(ref, avoid={"color": [x] + absent})
            parts.append(f"{a(ref)} that is not {x}")
            b.exists(ref)
            b.attr(ref, "color", x, negate=True)
        elif maybe(rng, 0.6):
            f = {"shape": sh, "color": pick(rng, [c for c in COLORS if c not in absent])}
            b.group(f)
            parts.append(a(f))
            b.exists(ref)
            b.attr(ref, "color", f["color"])
        else:
            b.group(ref, avoid={"color": absent} if absent else None)
            parts.append(a(ref))
            b.exists(ref)
    for f in absent_filters:
        b.absent(f)
    text = join(parts)
    if statements:
        text += f", but {join(statements)}"
    return text, b


def negation_2d_task(rng, d):
    """Positions that are ruled out: "a circle that is not to the left of a square", "..., with no shapes in the
    top row", "..., the triangle not above the circle"."""
    k = {0: between(rng, 1, 2), 1: between(rng, 2, 3), 2: between(rng, 3, 4)}[d]
    b = Builder()
    fs = [{"shape": s} for s in distinct(rng, SHAPES, k)]
    for f in fs:
        if maybe(rng, 0.25):
            f["size"] = pick(rng, SIZES)
        b.group(f)
        b.exists(f)
    refs = [{"shape": f["shape"]} for f in fs]
    cells = random_cells(rng, k)
    if d == 0 and k == 2 and maybe(rng, 0.7):
        r = pick(rng, [r for r in RELATIONS if r not in true_relations(cells[0], cells[1])])
        b.rel(refs[0], r, refs[1], negate=True)
        return f"{a(fs[0])} that is not {RELATIONS[r]} {a(fs[1])}", b
    statements = []
    n_pos = {0: 0, 1: 1, 2: between(rng, 1, 2)}[d] if k >= 2 else 0
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    for i, j in distinct(rng, pairs, n_pos):
        r = pick(rng, true_relations(cells[i], cells[j]))
        statements.append(f"{the(refs[i])} {RELATIONS[r]} {the(refs[j])}")
        b.rel(refs[i], r, refs[j])
    n_neg = {0: 1, 1: 1, 2: 2}[d]
    options = ["region", "shape_region"] + (["rel"] if k >= 2 else [])
    used = set()
    while n_neg > 0:
        kind = pick(rng, options)
        if kind == "rel":
            i, j = pick(rng, pairs)
            false = [r for r in RELATIONS if r not in true_relations(cells[i], cells[j])]
            r = pick(rng, false)
            key = ("rel", i, j, r)
            text = f"{the(refs[i])} not {RELATIONS[r]} {the(refs[j])}"
            check = {"kind": "rel", "a": refs[i], "rel": r, "b": refs[j], "negate": True}
        else:
            axis, v = pick(rng, "xy"), between(rng, 0, 2)
            idx = 0 if axis == "x" else 1
            if kind == "region":
                if any(c[idx] == v for c in cells):
                    continue
                f = {axis: v}
            else:
                i = between(rng, 0, k - 1)
                if cells[i][idx] == v:
                    continue
                f = {"shape": fs[i]["shape"], axis: v}
            key = ("region", tuple(sorted(f.items())))
            text = f"no {plural(f)}"
            check = {"kind": "count", "of": f, "op": "eq", "n": 0}
        if key in used:
            continue
        used.add(key)
        statements.append(text)
        b.ask(check)
        n_neg -= 1
    return f"{join([a(f) for f in fs])}, with {join(statements)}", b


# --------------------------------------------------------------------------------------------------- comparison
def _size_pair(rng, b: Builder, fa: dict, fb: dict, word: str, refs=None) -> None:
    """Groups and questions for "the A is <word> than the B" (word larger/smaller)."""
    big, small = ("large", "small") if word == "larger" else ("small", "large")
    b.group({**fa, "size": big})
    b.group({**fb, "size": small})
    ra, rb = refs or (fa, fb)
    b.exists(fa)
    b.exists(fb)
    b.ask({"kind": word, "a": ra, "b": rb})


def _more_groups(rng, b: Builder, fa: dict, fb: dict, a_range, b_range) -> str:
    """"more As than Bs" (or "fewer Bs than As"): groups, questions and the phrase."""
    b.group(fa, a_range)
    b.group(fb, b_range)
    b.exists(fa)
    if b_range[0] > 0:
        b.exists(fb)
    b.ask({"kind": "more", "a": fa, "b": fb})
    if b_range[0] > 0 and maybe(rng, 0.3):
        return f"fewer {plural(fb)} than {plural(fa)}"
    return f"more {plural(fa)} than {plural(fb)}"


def comparison_task(rng, d):
    """Sizes and counts compared: "a circle that is larger than a square", "more circles than squares"."""
    b = Builder()
    sa, sb, sc = distinct(rng, SHAPES, 3)
    if d == 0:
        fa, fb = {"shape": sa}, {"shape": sb}
        for f in (fa, fb):
            if maybe(rng, 0.3):
                f["color"] = pick(rng, COLORS)
        word = pick(rng, ["larger", "smaller"])
        _size_pair(rng, b, fa, fb, word, refs=({"shape": sa}, {"shape": sb}))
        return f"{a(fa)} that is {word} than {a(fb)}", b
    fa, fb = {"shape": sa}, {"shape": sb}
    if d == 1:
        text = _more_groups(rng, b, fa, fb, (2, 4), (1, 3))
        if maybe(rng, 0.5):
            text += ", and " + _extra(rng, b, shapes=(sa, sb))
        return text, b
    text = _more_groups(rng, b, fa, fb, (2, 3), (1, 2))
    word = pick(rng, ["larger", "smaller"])
    fc = {"shape": sc}
    if maybe(rng, 0.5):
        fc["color"] = pick(rng, COLORS)
    b.group({**fc, "size": "large" if word == "larger" else "small"})
    b.exists(fc)
    b.ask({"kind": word, "a": {"shape": sc}, "b": fb})
    return f"{text}, and {a(fc)} that is {word} than {a(fb)}", b


def comparison_color_task(rng, d):
    """Compared by color: "a red circle that is larger than a blue square", "more red shapes than blue shapes"."""
    b = Builder()
    ca, cb, cc = distinct(rng, COLORS, 3)
    if d == 0:
        fa = {"color": ca, "shape": pick(rng, SHAPES)}
        fb = {"color": cb, "shape": pick(rng, SHAPES)}
        word = pick(rng, ["larger", "smaller"])
        _size_pair(rng, b, fa, fb, word)
        return f"{a(fa)} that is {word} than {a(fb)}", b
    fa, fb = {"color": ca}, {"color": cb}
    if maybe(rng, 0.5):
        fa["shape"] = fb["shape"] = pick(rng, SHAPES)
    if d == 1:
        return _more_groups(rng, b, fa, fb, (2, 4), (1, 3)), b
    text = _more_groups(rng, b, fa, fb, (2, 3), (1, 2))
    fc = {"color": cc, "shape": pick(rng, SHAPES)}
    word = pick(rng, ["larger", "smaller"])
    b.group({**fc, "size": "large" if word == "larger" else "small"})
    b.exists(fc)
    b.ask({"kind": word, "a": fc, "b": fb})
    return f"{text}, and {a(fc)} that is {word} than {a(fb)}", b


def _size_rel_pair(rng, b: Builder, fa: dict, fb: dict) -> str:
    """"a circle to the left of a smaller square": a relation plus a size comparison."""
    cells = random_cells(rng, 2)
    r = pick(rng, true_relations(cells[0], cells[1]))
    word = pick(rng, ["larger", "smaller"])
    b.group({**fa, "size": "small" if word == "larger" else "large"})
    b.group({**fb, "size": "large" if word == "larger" else "small"})
    b.exists(fa)
    b.exists(fb)
    b.rel(fa, r, fb)
    b.ask({"kind": word, "a": fb, "b": fa})
    return f"{a(fa)} {RELATIONS[r]} a {word} {noun_phrase(fb)}"


def comparison_2d_task(rng, d):
    """Compared across positions: "a circle to the left of a smaller square", "more circles in the top row than
    in the bottom row"."""
    b = Builder()
    sa, sb, sc = distinct(rng, SHAPES, 3)
    if d == 0:
        fa, fb = {"shape": sa}, {"shape": sb}
        for f in (fa, fb):
            if maybe(rng, 0.3):
                f["color"] = pick(rng, COLORS)
        return _size_rel_pair(rng, b, fa, fb), b
    axis = pick(rng, "xy")
    va, vb = distinct(rng, range(3), 2)
    base = {"shape": sc} if (d == 2 or maybe(rng, 0.7)) else {}
    if maybe(rng, 0.3):
        base["color"] = pick(rng, COLORS)
    if maybe(rng, 0.2):
        base["size"] = pick(rng, SIZES)
    fa, fb = {**base, axis: va}, {**base, axis: vb}
    b.group(fa, (1, 3))
    b.group(fb, (0, 2))
    b.exists(fa)
    b.ask({"kind": "more", "a": fa, "b": fb})
    text = f"more {plural(fa)} than {_region(axis, vb)}"
    if d == 2:
        text += ", and " + _size_rel_pair(rng, b, {"shape": sa}, {"shape": sb})
    elif "shape" in base and maybe(rng, 0.5):
        text += ", and " + _extra(rng, b, shapes=(sc,))
    return text, b


# ---------------------------------------------------------------------------------------------- differentiation
def _except_one(rng, b: Builder, base: dict, attr: str, n: int, majority: str, minority: str) -> str:
    b.group({**base, attr: majority}, n - 1)
    b.group({**base, attr: minority}, 1)
    b.count(base, n)
    b.count({**base, attr: majority}, n - 1)
    b.count({**base, attr: minority}, 1)
    tail = "" if attr == "size" else f", which is {minority}"
    return f"{NUMBER_WORDS[n]} {plural(base)}, all of them {majority} except one{tail}"


def differentiation_task(rng, d):
    """Members of one kind told apart: "two circles, one large and one small", "two red shapes, a circle and a
    square", "three squares, all of them small except one"."""
    b = Builder()
    sh = pick(rng, SHAPES)
    if d >= 1 and maybe(rng, 0.6):
        base = {"shape": sh}
        if maybe(rng, 0.3):
            base["color"] = pick(rng, COLORS)
        big = pick(rng, SIZES)
        text = _except_one(rng, b, base, "size", 3 if d == 1 else 4, big, _other(SIZES, big)[0])
        if d == 2 and maybe(rng, 0.4):
            text += ", and " + _extra(rng, b, shapes=(sh,))
        return text, b
    if maybe(rng, 0.5):
        base = {"shape": sh}
        if maybe(rng, 0.4):
            base["color"] = pick(rng, COLORS)
        b.group({**base, "size": "large"})
        b.group({**base, "size": "small"})
        b.count(base, 2)
        b.exists({**base, "size": "large"}, tag="Attribute")
        b.exists({**base, "size": "small"}, tag="Attribute")
        text = f"two {plural(base)}, one large and one small"
        avoid = {"shapes": (sh,)}
    else:
        base = {"color": pick(rng, COLORS)} if maybe(rng, 0.75) else {"size": pick(rng, SIZES)}
        if "color" in base and maybe(rng, 0.3):
            base["size"] = pick(rng, SIZES)
        n = 3 if d == 2 and maybe(rng, 0.5) else 2
        shapes = distinct(rng, SHAPES, n)
        for s in shapes:
            b.group({**base, "shape": s})
            b.exists({**base, "shape": s}, tag="Attribute")
        b.count(base, n)
        text = f"{NUMBER_WORDS[n]} {plural(base)}, {join([a({'shape': s}) for s in shapes])}"
        avoid = {"colors": (base["color"],)} if "color" in base else {"sizes": (base["size"],)}
        if "color" in base and "size" in base:
            avoid = {"colors": (base["color"],), "sizes": (base["size"],)}
    if d >= 1:
        text += ", and " + _extra(rng, b, **avoid)
    return text, b


def differentiation_color_task(rng, d):
    """Members of one kind told apart by color: "two squares, one red and one blue", "three circles, all of them
    red except one, which is blue"."""
    b = Builder()
    sh = pick(rng, SHAPES)
    base = {"shape": sh}
    if maybe(rng, 0.3):
        base["size"] = pick(rng, SIZES)
    c1, c2 = distinct(rng, COLORS, 2)
    if d >= 1 and maybe(rng, 0.6):
        return _except_one(rng, b, base, "color", 3 if d == 1 else 4, c1, c2), b
    b.group({**base, "color": c1})
    b.group({**base, "color": c2})
    b.count(base, 2)
    b.exists({**base, "color": c1}, tag="Attribute")
    b.exists({**base, "color": c2}, tag="Attribute")
    text = f"two {plural(base)}, one {c1} and one {c2}"
    if d == 2:
        cells = random_cells(rng, 2)
        r = pick(rng, true_relations(cells[0], cells[1]))
        text += f", with {the({**base, 'color': c1})} {RELATIONS[r]} {the({**base, 'color': c2})}"
        b.rel({**base, "color": c1}, r, {**base, "color": c2})
    if d >= 1:
        text += ", and " + _extra(rng, b, shapes=(sh,))
    return text, b


def differentiation_2d_task(rng, d):
    """Members of one kind told apart by position: "two circles, the large one to the left of the small one",
    "three triangles, two in the top row and one in the bottom row"."""
    b = Builder()
    sh = pick(rng, SHAPES)
    base = {"shape": sh}
    if maybe(rng, 0.3):
        base["color"] = pick(rng, COLORS)
    axis = pick(rng, "xy")
    v1, v2 = distinct(rng, range(3), 2)
    r1, r2 = {**base, axis: v1}, {**base, axis: v2}
    if d >= 1 and maybe(rng, 0.6):
        n1, n2 = (2, 1) if d == 1 else pick(rng, [(3, 1), (2, 2)])
        b.group(r1, n1)
        b.group(r2, n2)
        b.count(base, n1 + n2)
        b.count(r1, n1)
        b.count(r2, n2)
        text = (f"{NUMBER_WORDS[n1 + n2]} {plural(base)}, {NUMBER_WORDS[n1]} {_region(axis, v1)} and "
                f"{NUMBER_WORDS[n2]} {_region(axis, v2)}")
        return text, b
    if maybe(rng, 0.5):
        cells = random_cells(rng, 2)
        r = pick(rng, true_relations(cells[0], cells[1]))
        b.group({**base, "size": "large"})
        b.group({**base, "size": "small"})
        b.count(base, 2)
        b.rel({**base, "size": "large"}, r, {**base, "size": "small"})
        text = f"two {plural(base)}, the large one {RELATIONS[r]} the small one"
    else:
        b.group(r1)
        b.group(r2)
        b.count(base, 2)
        b.exists(r1, tag="Spatial")
        b.exists(r2, tag="Spatial")
        text = f"two {plural(base)}, one {_region(axis, v1)} and one {_region(axis, v2)}"
    if d >= 1:
        text += ", and " + _extra(rng, b, shapes=(sh,))
    return text, b


GENERATORS = {
    "negation": negation_task,
    "negation+color": negation_color_task,
    "negation+2d": negation_2d_task,
    "comparison": comparison_task,
    "comparison+color": comparison_color_task,
    "comparison+2d": comparison_2d_task,
    "differentiation": differentiation_task,
    "differentiation+color": differentiation_color_task,
    "differentiation+2d": differentiation_2d_task,
}
