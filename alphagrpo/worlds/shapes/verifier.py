"""The shapes world's programmatic verifier: answers yes/no questions from pixels (the ``Verifier`` protocol).

Two answers per question:
- a soft ``P(yes)``, computed from the detector's distributions (objectness, shape, color, size, cell) as the
  probability that the check holds, treating objects as independent: counts are Poisson-binomial, "is there"
  is ``1 - prod(1 - p_i)``, relations use a logistic of the centre distance. A clean render answers ~1 or ~0; a
  blurry, noisy or ambiguous one lands in between. Quality questions are a logistic of a margin.
- a strict ``yes``: the check evaluated exactly (``checks.evaluate``) on the hard detections (every object with
  ``P(object) >= 0.5``, each at its most likely shape, color, size and cell), or the margin's sign. ``judge``
  (all strict answers yes) is the ground truth for evaluation, the way GenEval uses a detector.

Questions are read from their text (``checks.parse_question``), so the verifier works with the texts alone.
An empty image is a documented case: every "is there" is no, every "is there no" yes, and the quality questions
are judged on what is there (an empty black image is clean).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from alphagrpo.worlds.shapes.checks import evaluate, parse_question
from alphagrpo.worlds.shapes.detect import Analysis, Unit, analyze, min_object_area
from alphagrpo.worlds.shapes.render import MAX_RESOLUTION, MIN_RESOLUTION, as_uint8_image, cell_size

# quality thresholds: (threshold, scale) of each margin, in the units of its statistic
BACKGROUND_RMS = (40.0, 5.0)     # RGB distance of background pixels from black (noise std 15 -> rms ~26)
BLOB_MASS = (0.04, 0.008)        # largest stray blob, as a fraction of the smallest object's area
PURITY = (0.8, 0.04)             # share of an object's solid pixels that have its color
HOLE_PIXELS = (1.5, 0.3)         # background pixels enclosed by an object (in pixels of a 32 px image)
FIT = (0.05, 0.01)               # template fit error relative to the object's mass


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(x, -60, 60))))


def _poisson_binomial(ps: Sequence[float]) -> np.ndarray:
    """``P(N = n)`` for ``n = 0..len(ps)``, ``N`` a sum of independent Bernoullis."""
    dist = np.zeros(len(ps) + 1)
    dist[0] = 1.0
    for p in ps:
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    return dist


def _p_attr(u: Unit, key: str, value) -> float:
    if key == "shape":
        return u.p_shape.get(value, 0.0)
    if key == "color":
        return u.p_color.get(value, 0.0)
    if key == "size":
        return u.p_size.get(value, 0.0)
    if key == "x":
        return u.p_cell_x[value]
    return u.p_cell_y[value]


def _p_match(u: Unit, f: Mapping[str, Any]) -> float:
    p = u.p_object
    for k, v in f.items():
        p *= _p_attr(u, k, v)
    return p


def _p_relation(ua: Unit, ub: Unit, rel: str, c: float) -> float:
    delta = {"left": ub.cx - ua.cx, "right": ua.cx - ub.cx, "above": ub.cy - ua.cy, "below": ua.cy - ub.cy}[rel]
    return _sigmoid((delta - 0.5 * c) / (0.08 * c))


def _quality_margins(an: Analysis, name: str) -> list[float]:
    """Margins (> 0 means yes) of a quality check: one per object for per-object checks, else one."""
    if name == "plain_background":
        return [(BACKGROUND_RMS[0] - an.background_rms) / BACKGROUND_RMS[1]]
    if name == "no_stray_blobs":
        area = min_object_area(an.resolution)
        worst = max([u.mass for u in an.units if u.p_object < 0.5] + an.faint_blobs, default=0.0) / area
        return [(BLOB_MASS[0] - worst) / BLOB_MASS[1]]
    objs = an.objects
    if name == "solid_shapes":
        return [min((u.purity - PURITY[0]) / PURITY[1], (HOLE_PIXELS[0] - u.hole_pixels) / HOLE_PIXELS[1],
                    -5.0 if u.fragments else 5.0) for u in objs]
    if name == "clean_edges":
        return [(FIT[0] - u.fit_error) / FIT[1] for u in objs]
    raise ValueError(f"unknown quality check {name!r}")


QUALITY_PER_OBJECT = ("every", "mean")


def soft_answer(an: Analysis, check: Mapping[str, Any], quality_per_object: str = "every") -> float:
    """``P(yes)`` of ``check`` given the detector's reading ``an``. ``quality_per_object``: how a per-object quality
    question ("is every shape ...") combines its objects: ``"every"`` (the product: every object must pass) or
    ``"mean"`` (the average object's P(pass), which does not fall as the objects grow in number)."""
    units, kind = an.units, check["kind"]
    c = cell_size(an.resolution)
    if kind == "quality":
        ps = [_sigmoid(m) for m in _quality_margins(an, check["name"])]
        if quality_per_object == "mean":
            return float(np.mean(ps)) if ps else 1.0
        return float(np.prod(ps))
    if kind == "count":
        dist = _poisson_binomial([_p_match(u, check["of"]) for u in units])
        n = check["n"]
        if check["op"] == "ge":
            return float(dist[n:].sum())
        return float(dist[n]) if n < len(dist) else 0.0
    if kind == "attr":
        s = [_p_match(u, check["of"]) for u in units]
        v = [_p_attr(u, check["attr"], check["value"]) for u in units]
        if check.get("negate"):
            v = [1 - x for x in v]
        some = 1 - np.prod([1 - si * vi for si, vi in zip(s, v)])
        none_wrong = np.prod([1 - si * (1 - vi) for si, vi in zip(s, v)])
        return float(some * none_wrong)
    if kind in ("rel", "larger", "smaller"):
        pa = [_p_match(u, check["a"]) for u in units]
        pb = [_p_match(u, check["b"]) for u in units]
        miss = 1.0
        for i, ua in enumerate(units):
            for j, ub in enumerate(units):
                if i == j:
                    continue
                if kind == "rel":
                    r = _p_relation(ua, ub, check["rel"], c)
                else:
                    big, small = ("large", "small") if kind == "larger" else ("small", "large")
                    r = ua.p_size[big] * ub.p_size[small]
                miss *= 1 - pa[i] * pb[j] * r
        if kind == "rel" and check.get("negate"):
            exist = (1 - np.prod([1 - p for p in pa])) * (1 - np.prod([1 - p for p in pb]))
            return float(exist * miss)
        return float(1 - miss)
    if kind == "more":
        na = _poisson_binomial([_p_match(u, check["a"]) for u in units])
        nb = _poisson_binomial([_p_match(u, check["b"]) for u in units])
        cb = np.cumsum(nb)
        return float(sum(na[n] * cb[n - 1] for n in range(1, len(na))))
    raise ValueError(f"unknown check kind {kind!r}")


def hard_answer(an: Analysis, check: Mapping[str, Any]) -> bool:
    """The strict answer: the check on the hard detections (or the quality margins all positive)."""
    if check["kind"] == "quality":
        return all(m > 0 for m in _quality_margins(an, check["name"]))
    return evaluate(an.objects, check)


def check_image(image) -> np.ndarray:
    """Validate one image: a PIL image or uint8 ``[R, R, 3]`` array, square, ``R`` in the supported range."""
    img = as_uint8_image(image)
    h, w = img.shape[:2]
    if h != w:
        raise ValueError(f"images must be square [R, R, 3]; got {h} x {w} (resize or crop to a square)")
    if not MIN_RESOLUTION <= h <= MAX_RESOLUTION:
        raise ValueError(f"image resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] px, got {h}")
    return img


def _question_text(q) -> str:
    if isinstance(q, Mapping):
        q = q.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"a question must be a non-empty string (or a dict with 'question'), got {q!r}")
    return q


class ShapesVerifier:
    """Programmatic verifier of the shapes world (implements ``verifier_engine.protocol.Verifier``).

    ``quality_per_object`` (soft answers only; the strict answer always requires every object): ``"every"``
    (default) or ``"mean"``, see :func:`soft_answer`.
    """

    def __init__(self, quality_per_object: str = "every"):
        if quality_per_object not in QUALITY_PER_OBJECT:
            raise ValueError(f"quality_per_object must be one of {QUALITY_PER_OBJECT}, got {quality_per_object!r}")
        self.quality_per_object = quality_per_object

    def analyze(self, image) -> Analysis:
        """The detector's full reading of ``image`` (objects, blobs, statistics)."""
        return analyze(check_image(image))

    def detect(self, image) -> list[dict]:
        """Detected objects (``P(object) >= 0.5``): dicts with shape (None if unknown), color, size, cell ``(x, y)``,
        pixels, mass, confidence, p_object, center."""
        return [u.as_dict() for u in self.analyze(image).objects]

    def answers(self, image, questions: Sequence) -> list[tuple[float, bool]]:
        """``[(p_yes, strict_yes)]`` for each question (strings, or dicts with a ``question``)."""
        checks = [parse_question(_question_text(q)) for q in questions]
        an = self.analyze(image)
        return [(soft_answer(an, c, self.quality_per_object), hard_answer(an, c)) for c in checks]

    def answer(self, image, question) -> tuple[float, bool]:
        """``(p_yes, strict_yes)`` for one question."""
        return self.answers(image, [question])[0]

    def judge(self, image, questions: Sequence) -> bool:
        """Strict judgement: every question answered yes."""
        return all(yes for _, yes in self.answers(image, questions))

    def score(self, images: Sequence, question_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        """The Verifier protocol: ``out[i][j] = P(yes)`` of question ``j`` about image ``i``."""
        from verifier_engine.protocol import check_batch
        check_batch(images, question_lists)
        return [[p for p, _ in self.answers(img, qs)] for img, qs in zip(images, question_lists)]


def failed_questions(image, record: Mapping[str, Any], verifier: ShapesVerifier | None = None) -> list[dict]:
    """The record's questions (semantic, then quality) that the strict judge answers "no", each a copy of the
    question dict with ``p_yes`` added; what a self-reflective refinement step should fix."""
    v = verifier or ShapesVerifier()
    qs = [q if isinstance(q, Mapping) else {"question": q}
          for key in ("semantic_questions", "quality_questions") for q in record.get(key) or []]
    out = []
    for q, (p, yes) in zip(qs, v.answers(image, qs)):
        if not yes:
            out.append({**q, "p_yes": p})
    return out
