"""Machinery shared by the prompt generators: a prompt under construction, random helpers, and the scene sampler.

A prompt's constraints are *groups*: ``{"shape"?, "color"?, "size"?, "x"?, "y"?, "count": [lo, hi], "not"?: {attr:
[values]}}``; a group stands for ``lo..hi`` objects with the fixed attributes, the others drawn at random (never a
value listed under ``"not"``). ``draw_scene`` draws counts, free attributes and cells, and keeps the first scene on
which every semantic check holds (rejection sampling: simple, and correct by construction).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from alphagrpo.worlds.shapes.checks import evaluate, make_question, noun_phrase
from alphagrpo.worlds.shapes.primitives import COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, ShapeObject

ATTR_VALUES = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}
ALL_CELLS = tuple((x, y) for y in range(GRID) for x in range(GRID))


def pick(rng: np.random.Generator, seq: Sequence):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def distinct(rng: np.random.Generator, seq: Sequence, k: int) -> list:
    seq = list(seq)
    return [seq[i] for i in rng.permutation(len(seq))[:k]]


def maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def between(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def join(parts: Sequence[str]) -> str:
    """``[a] -> a``, ``[a, b] -> "a and b"``, ``[a, b, c] -> "a, b, and c"``."""
    parts = list(parts)
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + ", and " + parts[-1]


def a(f: Mapping[str, Any]) -> str:
    return noun_phrase(f, det="a")


def the(f: Mapping[str, Any]) -> str:
    return noun_phrase(f, det="the")


def plural(f: Mapping[str, Any]) -> str:
    return noun_phrase(f, plural=True)


def random_cells(rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    return distinct(rng, ALL_CELLS, k)


def true_relations(ca: tuple[int, int], cb: tuple[int, int]) -> list[str]:
    """Relations ``r`` with "object at ``ca`` is r the object at ``cb``" true."""
    out = []
    if ca[0] < cb[0]:
        out.append("left")
    if ca[0] > cb[0]:
        out.append("right")
    if ca[1] < cb[1]:
        out.append("above")
    if ca[1] > cb[1]:
        out.append("below")
    return out


class Builder:
    """A prompt under construction: groups (what the sampler draws) and questions (what the verifier asks)."""

    def __init__(self):
        self.groups: list[dict] = []
        self.questions: list[dict] = []

    def group(self, f: Mapping[str, Any], count=1, avoid: Optional[Mapping[str, Sequence]] = None) -> dict:
        lo, hi = (count, count) if isinstance(count, int) else count
        g = dict(f)
        g["count"] = [int(lo), int(hi)]
        if avoid:
            g["not"] = {k: sorted(set(v)) for k, v in avoid.items()}
        self.groups.append(g)
        return g

    def ask(self, check: Mapping[str, Any], tag: Optional[str] = None) -> None:
        q = make_question(check, tag)
        if all(q["question"] != o["question"] for o in self.questions):
            self.questions.append(q)

    # shorthands for the common checks
    def exists(self, f, tag=None):
        self.ask({"kind": "count", "of": dict(f), "op": "ge", "n": 1}, tag)

    def count(self, f, n, tag=None):
        self.ask({"kind": "count", "of": dict(f), "op": "eq", "n": int(n)}, tag)

    def absent(self, f):
        self.ask({"kind": "count", "of": dict(f), "op": "eq", "n": 0})

    def attr(self, f, attr, value, negate=False):
        self.ask({"kind": "attr", "of": dict(f), "attr": attr, "value": value, "negate": negate})

    def rel(self, fa, rel, fb, negate=False):
        self.ask({"kind": "rel", "a": dict(fa), "rel": rel, "b": dict(fb), "negate": negate})


def _draw_once(groups: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> Optional[Scene]:
    specs = []
    for g in groups:
        lo, hi = g.get("count", [1, 1])
        specs += [g] * between(rng, lo, hi)
    if not 1 <= len(specs) <= MAX_OBJECTS:
        return None
    # place the objects bound to a row/column first, then the free ones
    order = sorted(range(len(specs)), key=lambda i: -int("x" in specs[i] or "y" in specs[i]))
    free = list(ALL_CELLS)
    cells: list = [None] * len(specs)
    for i in order:
        s = specs[i]
        cand = [c for c in free if s.get("x", c[0]) == c[0] and s.get("y", c[1]) == c[1]]
        if not cand:
            return None
        cells[i] = pick(rng, cand)
        free.remove(cells[i])
    objs = []
    for s, (x, y) in zip(specs, cells):
        attrs = {}
        for k, values in ATTR_VALUES.items():
            if k in s:
                attrs[k] = s[k]
            else:
                allowed = [v for v in values if v not in s.get("not", {}).get(k, ())]
                attrs[k] = pick(rng, allowed)
        objs.append(ShapeObject(attrs["shape"], attrs["color"], attrs["size"], x, y))
    return Scene(tuple(objs))


def draw_scene(groups: Sequence[Mapping[str, Any]], checks: Sequence[Mapping[str, Any]], rng: np.random.Generator,
               tries: int = 1000) -> Optional[Scene]:
    """A random scene of the groups on which every check holds, or ``None`` after ``tries`` failed draws."""
    for _ in range(tries):
        scene = _draw_once(groups, rng)
        if scene is not None and all(evaluate(scene.objects, c) for c in checks):
            return scene
    return None
