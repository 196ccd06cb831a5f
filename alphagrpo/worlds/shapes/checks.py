"""Questions of the shapes world: their machine-readable form (a *check*), their text, and the way back.

A check is a small JSON-able dict. Object sets are *filters*: ``{"shape", "color", "size", "x", "y"}`` with any
subset of keys (``x`` a column, ``y`` a row; at most one of them). The kinds:

- ``{"kind": "count", "of": F, "op": "ge" | "eq", "n": N}``: "is there a F?" (ge 1), "is there no F?" (eq 0),
  "is there exactly one F?", "are there exactly N Fs?"
- ``{"kind": "attr", "of": F, "attr": "color" | "shape" | "size", "value": V, "negate": bool}``: "is the F red?",
  "is the F a circle?", "is the F large?", and "... not ...". True when some object matches F and every one has V.
- ``{"kind": "rel", "a": F, "rel": "left" | "right" | "above" | "below", "b": G, "negate": bool}``: "is the F to the
  left of the G?" True when some pair of distinct objects is so placed (negated: both exist and no pair is).
- ``{"kind": "larger" | "smaller", "a": F, "b": G}``: "is the F larger than the G?" (a large F and a small G).
- ``{"kind": "more", "a": F, "b": G}``: "are there more Fs than Gs?" (strictly more; ``b`` may be 0).
- ``{"kind": "quality", "name": N}``: the four fixed quality questions (``QUALITY``).

``evaluate(objects, check)`` is the truth on a scene (cells compared exactly); ``question_text`` and
``parse_question`` convert both ways and round-trip exactly. Every question is phrased so that "yes" means good.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence

from alphagrpo.worlds.shapes.primitives import (COL_WORDS, COLORS, GRID, NUMBER_WORDS, PLURALS, ROW_WORDS, SHAPES,
                                                SIZES, words)

FILTER_KEYS = ("shape", "color", "size", "x", "y")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
# Quality questions: name -> (question text, RECIPE dimension).
QUALITY: dict[str, tuple[str, str]] = {
    "plain_background": ("is the background plain black?", "Texture"),
    "solid_shapes": ("is every shape one solid region of a single color?", "Coherence"),
    "clean_edges": ("does every shape have clean, regular edges?", "Geometry"),
    "no_stray_blobs": ("is the picture free of stray specks and blobs?", "Aesthetics"),
}
_SINGULAR = {v: k for k, v in PLURALS.items()}
_RELATION_WORDS = {tuple(v.split()): k for k, v in RELATIONS.items()}


class QuestionParseError(ValueError):
    """A question text that is not in the shapes world's grammar."""


# ----------------------------------------------------------------------------------------------------- filters
def check_filter(f: Mapping[str, Any]) -> dict:
    if not isinstance(f, Mapping):
        raise ValueError(f"a filter must be a dict with keys among {FILTER_KEYS}, got {f!r}")
    bad = set(f) - set(FILTER_KEYS)
    if bad:
        raise ValueError(f"unknown filter keys {sorted(bad)}; use keys among {FILTER_KEYS}")
    if "x" in f and "y" in f:
        raise ValueError("a filter names a row (y) or a column (x), not both")
    allowed = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "x": tuple(range(GRID)), "y": tuple(range(GRID))}
    for k, v in f.items():
        if v not in allowed[k]:
            raise ValueError(f"filter {k}={v!r} is not one of {allowed[k]}")
    return dict(f)


def matches(obj: Any, f: Mapping[str, Any]) -> bool:
    """Whether ``obj`` (anything with shape, color, size, x, y attributes) passes filter ``f``."""
    return all(getattr(obj, k) == v for k, v in f.items())


def _count(objects: Sequence[Any], f) -> int:
    return sum(1 for o in objects if matches(o, f))


def relation_holds(a: Any, b: Any, rel: str) -> bool:
    if rel == "left":
        return a.x < b.x
    if rel == "right":
        return a.x > b.x
    if rel == "above":
        return a.y < b.y
    if rel == "below":
        return a.y > b.y
    raise ValueError(f"unknown relation {rel!r}; use one of {tuple(RELATIONS)}")


def evaluate(objects: Sequence[Any], check: Mapping[str, Any]) -> bool:
    """The truth of ``check`` about ``objects`` (a Scene, or any objects with shape/color/size/x/y; a detected object
    whose shape is unknown has ``shape=None``). Quality checks are about pixels: they raise here."""
    kind = check.get("kind")
    objects = list(objects)
    if kind == "count":
        n = _count(objects, check["of"])
        return n >= check["n"] if check["op"] == "ge" else n == check["n"]
    if kind == "attr":
        subj = [o for o in objects if matches(o, check["of"])]
        if not subj:
            return False
        same = [getattr(o, check["attr"]) == check["value"] for o in subj]
        return not any(same) if check.get("negate") else all(same)
    if kind == "rel":
        A = [o for o in objects if matches(o, check["a"])]
        B = [o for o in objects if matches(o, check["b"])]
        if not A or not B:
            return False
        hit = any(relation_holds(a, b, check["rel"]) for a in A for b in B if a is not b)
        return not hit if check.get("negate") else hit
    if kind in ("larger", "smaller"):
        big, small = ("large", "small") if kind == "larger" else ("small", "large")
        return any(a is not b and a.size == big and b.size == small
                   for a in objects if matches(a, check["a"]) for b in objects if matches(b, check["b"]))
    if kind == "more":
        return _count(objects, check["a"]) > _count(objects, check["b"])
    if kind == "quality":
        raise ValueError("quality checks are judged from pixels (ShapesVerifier), not from a scene")
    raise ValueError(f"unknown check kind {kind!r}")


def tag_of(check: Mapping[str, Any]) -> str:
    """The RECIPE dimension of a check (Existence, Count, Attribute, Spatial, Negative, or a quality one)."""
    kind = check["kind"]
    if kind == "count":
        if check["op"] == "ge":
            return "Existence"
        return "Negative" if check["n"] == 0 else "Count"
    if kind in ("attr", "rel") and check.get("negate"):
        return "Negative"
    return {"attr": "Attribute", "rel": "Spatial", "larger": "Attribute", "smaller": "Attribute",
            "more": "Count"}.get(kind) or QUALITY[check["name"]][1]


def kind_of(check: Mapping[str, Any]) -> str:
    """A finer label than the tag, for accuracy tables: existence, count, no_object, color, shape, size,
    not_attribute, spatial, not_spatial, size_comparison, count_comparison, or the quality check's name."""
    kind = check["kind"]
    if kind == "count":
        return "existence" if check["op"] == "ge" else ("no_object" if check["n"] == 0 else "count")
    if kind == "attr":
        return "not_attribute" if check.get("negate") else check["attr"]
    if kind == "rel":
        return "not_spatial" if check.get("negate") else "spatial"
    if kind in ("larger", "smaller"):
        return "size_comparison"
    if kind == "more":
        return "count_comparison"
    return check["name"]


# ------------------------------------------------------------------------------------------------ text <-> check
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(f: Mapping[str, Any], plural: bool = False, det: Optional[str] = None) -> str:
    """``{"size": "large", "color": "red", "shape": "circle", "y": 0}`` -> ``"large red circle in the top row"``;
    ``det="a"`` picks a/an, ``det="the"`` prefixes it."""
    f = check_filter(f)
    parts = [f[k] for k in ("size", "color") if k in f]
    noun = f.get("shape", "shape")
    parts.append(PLURALS.get(noun, "shapes") if plural else noun)
    if "y" in f:
        parts += ["in", "the", ROW_WORDS[f["y"]], "row"]
    if "x" in f:
        parts += ["in", "the", COL_WORDS[f["x"]], "column"]
    if det == "a":
        parts.insert(0, article(parts[0]))
    elif det:
        parts.insert(0, det)
    return " ".join(parts)


def _region_phrase(f: Mapping[str, Any]) -> str:
    if "y" in f:
        return f"in the {ROW_WORDS[f['y']]} row"
    return f"in the {COL_WORDS[f['x']]} column"


def question_text(check: Mapping[str, Any]) -> str:
    """The question for ``check`` (lowercase, ends with "?")."""
    kind = check["kind"]
    if kind == "quality":
        return QUALITY[check["name"]][0]
    if kind == "count":
        f, n = check["of"], check["n"]
        if check["op"] == "ge":
            if n != 1:
                raise ValueError("existence checks use n=1 (use op 'eq' for exact counts)")
            return f"is there {noun_phrase(f, det='a')}?"
        if n == 0:
            return f"is there no {noun_phrase(f)}?"
        if n == 1:
            return f"is there exactly one {noun_phrase(f)}?"
        return f"are there exactly {NUMBER_WORDS[n]} {noun_phrase(f, plural=True)}?"
    if kind == "attr":
        neg = "not " if check.get("negate") else ""
        v = check["value"]
        pred = f"{article(v)} {v}" if check["attr"] == "shape" else v
        return f"is {noun_phrase(check['of'], det='the')} {neg}{pred}?"
    if kind == "rel":
        neg = "not " if check.get("negate") else ""
        return (f"is {noun_phrase(check['a'], det='the')} {neg}{RELATIONS[check['rel']]} "
                f"{noun_phrase(check['b'], det='the')}?")
    if kind in ("larger", "smaller"):
        return f"is {noun_phrase(check['a'], det='the')} {kind} than {noun_phrase(check['b'], det='the')}?"
    if kind == "more":
        a, b = check["a"], check["b"]
        strip = lambda f: {k: v for k, v in f.items() if k not in ("x", "y")}  # noqa: E731
        if strip(a) == strip(b) and ("x" in a or "y" in a) and ("x" in b or "y" in b):
            return f"are there more {noun_phrase(a, plural=True)} than {_region_phrase(b)}?"
        return f"are there more {noun_phrase(a, plural=True)} than {noun_phrase(b, plural=True)}?"
    raise ValueError(f"unknown check kind {kind!r}")


def _parse_np(t: list[str], i: int, plural: bool) -> tuple[dict, int]:
    f: dict = {}
    if i < len(t) and t[i] in SIZES:
        f["size"] = t[i]
        i += 1
    if i < len(t) and t[i] in COLORS:
        f["color"] = t[i]
        i += 1
    if i >= len(t):
        raise QuestionParseError("expected a shape noun")
    w = t[i]
    if plural:
        if w in _SINGULAR:
            f["shape"] = _SINGULAR[w]
        elif w != "shapes":
            raise QuestionParseError(f"expected a plural shape noun, got {w!r}")
    else:
        if w in SHAPES:
            f["shape"] = w
        elif w != "shape":
            raise QuestionParseError(f"expected a shape noun, got {w!r}")
    i += 1
    region, j = _parse_region(t, i)
    if region is not None:
        f.update(region)
        i = j
    return f, i


def _parse_region(t: list[str], i: int) -> tuple[Optional[dict], int]:
    if t[i:i + 2] == ["in", "the"] and len(t) >= i + 4:
        w, kind = t[i + 2], t[i + 3]
        if kind == "row" and w in ROW_WORDS:
            return {"y": ROW_WORDS.index(w)}, i + 4
        if kind == "column" and w in COL_WORDS:
            return {"x": COL_WORDS.index(w)}, i + 4
    return None, i


def _expect_end(t: list[str], i: int) -> None:
    if i != len(t):
        raise QuestionParseError(f"unexpected words {' '.join(t[i:])!r}")


def _parse(t: list[str]) -> dict:
    if t and t[-1] == "?":
        t = t[:-1]
    if t[:2] == ["is", "there"]:
        rest = t[2:]
        if rest[:1] == ["no"]:
            f, i = _parse_np(rest, 1, False)
            _expect_end(rest, i)
            return {"kind": "count", "of": f, "op": "eq", "n": 0}
        if rest[:2] == ["exactly", "one"]:
            f, i = _parse_np(rest, 2, False)
            _expect_end(rest, i)
            return {"kind": "count", "of": f, "op": "eq", "n": 1}
        if rest[:1] in (["a"], ["an"]):
            f, i = _parse_np(rest, 1, False)
            _expect_end(rest, i)
            return {"kind": "count", "of": f, "op": "ge", "n": 1}
        raise QuestionParseError("after 'is there' expected 'a', 'no' or 'exactly one'")
    if t[:3] == ["are", "there", "exactly"] and len(t) > 3 and t[3] in NUMBER_WORDS[2:]:
        f, i = _parse_np(t, 4, True)
        _expect_end(t, i)
        return {"kind": "count", "of": f, "op": "eq", "n": NUMBER_WORDS.index(t[3])}
    if t[:3] == ["are", "there", "more"]:
        a, i = _parse_np(t, 3, True)
        if t[i:i + 1] != ["than"]:
            raise QuestionParseError("expected 'than'")
        region, j = _parse_region(t, i + 1)
        if region is not None and ("x" in a or "y" in a):
            b = {k: v for k, v in a.items() if k not in ("x", "y")}
            b.update(region)
        else:
            b, j = _parse_np(t, i + 1, True)
        _expect_end(t, j)
        return {"kind": "more", "a": a, "b": b}
    if t[:2] == ["is", "the"]:
        a, i = _parse_np(t, 2, False)
        neg = t[i:i + 1] == ["not"]
        i += neg
        rest = t[i:]
        if len(rest) == 1 and rest[0] in COLORS:
            return {"kind": "attr", "of": a, "attr": "color", "value": rest[0], "negate": neg}
        if len(rest) == 1 and rest[0] in SIZES:
            return {"kind": "attr", "of": a, "attr": "size", "value": rest[0], "negate": neg}
        if len(rest) == 2 and rest[0] in ("a", "an") and rest[1] in SHAPES:
            return {"kind": "attr", "of": a, "attr": "shape", "value": rest[1], "negate": neg}
        for rw, rel in _RELATION_WORDS.items():
            if tuple(rest[:len(rw)]) == rw and rest[len(rw):len(rw) + 1] == ["the"]:
                b, j = _parse_np(rest, len(rw) + 1, False)
                _expect_end(rest, j)
                return {"kind": "rel", "a": a, "rel": rel, "b": b, "negate": neg}
        if not neg and len(rest) >= 3 and rest[0] in ("larger", "smaller") and rest[1:3] == ["than", "the"]:
            b, j = _parse_np(rest, 3, False)
            _expect_end(rest, j)
            return {"kind": rest[0], "a": a, "b": b}
        raise QuestionParseError(f"cannot read the predicate {' '.join(rest)!r}")
    raise QuestionParseError("unknown question form")


_QUALITY_BY_TEXT = {tuple(words(text)): name for name, (text, _) in QUALITY.items()}
QUESTION_FORMS = ("is there a F?", "is there no F?", "is there exactly one F?", "are there exactly N Fs?",
                  "are there more Fs than Gs?", "is the F <color|size|a shape>?", "is the F not <...>?",
                  "is the F <to the left of|to the right of|above|below> the G?", "is the F larger|smaller than the G?",
                  "or one of the quality questions")


def parse_question(text: str) -> dict:
    """The check behind a question text (case and spacing free). Raises ``QuestionParseError`` (a ``ValueError``)
    naming the forms the shapes world understands. Returns a fresh dict each call."""
    return _copy(_parse_cached(text))


@lru_cache(maxsize=65536)
def _parse_cached(text: str) -> dict:
    if not isinstance(text, str) or not text.strip():
        raise QuestionParseError(f"a question must be a non-empty string, got {text!r}")
    t = words(text)
    q = _QUALITY_BY_TEXT.get(tuple(t))
    if q is not None:
        return {"kind": "quality", "name": q}
    try:
        return _parse(t)
    except QuestionParseError as e:
        raise QuestionParseError(f"cannot parse shapes-world question {text!r}: {e}. Known forms: "
                                 f"{'; '.join(QUESTION_FORMS)} (F, G: [size] [color] shape|circle|... "
                                 f"[in the top row|in the left column|...])") from None


def _copy(c):
    if isinstance(c, dict):
        return {k: _copy(v) for k, v in c.items()}
    return c


def make_question(check: Mapping[str, Any], tag: Optional[str] = None) -> dict:
    """``{"question", "tag", "check"}`` for a check (the record form of a question); ``tag`` overrides the default
    dimension (e.g. "Attribute" for "is there a red circle?" in an attribute-binding prompt)."""
    c = normalize(check)
    return {"question": question_text(c), "tag": tag or tag_of(c), "check": c}


def normalize(check: Mapping[str, Any]) -> dict:
    """A validated copy in canonical form (``negate`` present exactly where the kind has it)."""
    c = _copy(dict(check))
    kind = c.get("kind")
    for key in ("of", "a", "b"):
        if key in c:
            c[key] = check_filter(c[key])
    if kind in ("attr", "rel"):
        c["negate"] = bool(c.get("negate", False))
    if kind == "count" and (c.get("op") not in ("ge", "eq") or not isinstance(c.get("n"), int)):
        raise ValueError(f"count check needs op 'ge' or 'eq' and an integer n, got {check!r}")
    if kind == "quality" and c.get("name") not in QUALITY:
        raise ValueError(f"unknown quality check {c.get('name')!r}; use one of {tuple(QUALITY)}")
    if kind not in ("count", "attr", "rel", "larger", "smaller", "more", "quality"):
        raise ValueError(f"unknown check kind {kind!r}")
    return c
