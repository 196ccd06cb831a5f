"""Measured accuracy of the shapes verifier, per question kind, on clean and degraded renders.

Cases come from synthesized prompts. For every semantic question of a record: a *positive* case (a scene sampled
for the record: the question is true) and a *negative* case (the scene mutated until that question is false: an
attribute changed, an object moved, removed, added or duplicated; truth judged on the scene). For the quality
questions: positives are renders of valid scenes; negatives are renders with one defect injected (a tinted or
textured background, stray specks, a hole or a second color in a shape, a bitten or bulging outline). Every image
then goes through each condition (``CONDITIONS``: Gaussian pixel noise and blur) before the verifier sees it.

Reported per condition and kind: strict accuracy on positives and on negatives, mean P(yes), the Brier score of
P(yes); plus the strict judge ("all questions satisfied") on whole records.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional

import numpy as np

from alphagrpo.worlds.shapes.build import ALL_CELLS, pick
from alphagrpo.worlds.shapes.checks import QUALITY, evaluate, kind_of
from alphagrpo.worlds.shapes.detect import analyze
from alphagrpo.worlds.shapes.primitives import BACKGROUND, COLORS, SHAPES, SIZES, Scene, ShapeObject
from alphagrpo.worlds.shapes.prompts import DIFFICULTIES, DIFFICULTY_RATIO, TASKS, make_prompt, sample_scene
from alphagrpo.worlds.shapes.render import check_resolution, degrade, gaussian_blur, object_coverage, render
from alphagrpo.worlds.shapes.verifier import hard_answer, soft_answer

# name -> (noise std on the 0-255 scale, blur sigma in pixels of a 32 px image; scaled with the resolution)
# The first four are what a reasonable small generator's images look like; the last three are stress tests.
CONDITIONS = {"clean": (0.0, 0.0), "noise": (12.0, 0.0), "blur": (0.0, 0.8), "noise+blur": (12.0, 0.8),
              "noise25": (25.0, 0.0), "blur1.2": (0.0, 1.2), "noise25+blur1.2": (25.0, 1.2)}
TARGET_CLEAN_ACCURACY = 0.99


# ------------------------------------------------------------------------------------------------- negatives
def _mutate(scene: Scene, rng: np.random.Generator) -> Optional[Scene]:
    objs = list(scene.objects)
    free = [c for c in ALL_CELLS if c not in {(o.x, o.y) for o in objs}]
    op = pick(rng, ["attr", "attr", "move", "remove", "add", "duplicate"])
    if op == "attr" and objs:
        i = int(rng.integers(len(objs)))
        key = pick(rng, ["shape", "color", "size"])
        values = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}[key]
        o = objs[i]
        objs[i] = ShapeObject(**{**o.__dict__, key: pick(rng, [v for v in values if v != getattr(o, key)])})
    elif op == "move" and objs and free:
        i = int(rng.integers(len(objs)))
        x, y = pick(rng, free)
        objs[i] = ShapeObject(objs[i].shape, objs[i].color, objs[i].size, x, y)
    elif op == "remove" and len(objs) > 1:
        objs.pop(int(rng.integers(len(objs))))
    elif op in ("add", "duplicate") and free:
        x, y = pick(rng, free)
        if op == "duplicate" and objs:
            o = pick(rng, objs)
            objs.append(ShapeObject(o.shape, o.color, o.size, x, y))
        else:
            objs.append(ShapeObject(pick(rng, SHAPES), pick(rng, COLORS), pick(rng, SIZES), x, y))
    else:
        return None
    return Scene(tuple(objs))


def falsify(scene: Scene, check: dict, rng: np.random.Generator, tries: int = 300) -> Optional[Scene]:
    """A near miss: ``scene`` changed by one (later two) random edits so that ``check`` is false, or None."""
    for t in range(tries):
        s = _mutate(scene, rng)
        if s is not None and t >= tries // 2:
            s = _mutate(s, rng)
        if s is not None and not evaluate(s.objects, check):
            return s
    return None


def _object_pixels(o: ShapeObject, r: int):
    (x0, y0, x1, y1), cov = object_coverage(o.shape, o.size, o.x, o.y, r)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    c = r / 3
    return (x0, y0, x1, y1), cov, xx + 0.5 - (o.x + 0.5) * c, yy + 0.5 - (o.y + 0.5) * c


def _far_color(color: str, rng) -> str:
    v = np.asarray(COLORS[color], float)
    cos = {c: np.dot(v, COLORS[c]) / np.linalg.norm(v) / np.linalg.norm(COLORS[c]) for c in COLORS}
    far = [c for c in COLORS if np.degrees(np.arccos(np.clip(cos[c], -1, 1))) > 35]
    return pick(rng, far)


def inject_defect(scene: Scene, name: str, r: int, rng: np.random.Generator) -> np.ndarray:
    """A render of ``scene`` with one defect that makes quality question ``name`` false."""
    img = render(scene, r).astype(np.float32)
    bg = np.asarray(BACKGROUND, np.float32)
    empty = np.all(img == bg, axis=-1)
    if name == "plain_background":
        if rng.random() < 0.5:
            tint = rng.uniform(0.3, 1.0, 3)
            tint *= rng.uniform(60, 100) / np.linalg.norm(tint)
            img[empty] = bg + tint
        else:
            tex = np.abs(gaussian_blur(rng.normal(0, 1, (r, r, 3)).astype(np.float32), 1.0 * r / 32))
            tex *= 80 / np.sqrt((tex ** 2).sum(-1).mean())
            img[empty] = bg + tex[empty]
    elif name == "no_stray_blobs":
        k = max(1, int(round(2 * r / 32)))
        near = np.zeros((r, r), bool)
        for o in scene.objects:
            (x0, y0, x1, y1), cov, _, _ = _object_pixels(o, r)
            near[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] |= True
        for _ in range(int(rng.integers(1, 4))):
            for _ in range(100):
                y, x = (int(v) for v in rng.integers(1, r - k - 1, 2))
                if not near[y - 1:y + k + 1, x - 1:x + k + 1].any():
                    img[y:y + k, x:x + k] = COLORS[pick(rng, COLORS)]
                    near[y - 2:y + k + 2, x - 2:x + k + 2] = True
                    break
    else:
        large = [o for o in scene.objects if o.size == "large"]
        if not large:  # the shape defects are made on a large object, so that they are plainly visible
            small = pick(rng, scene.objects)
            large = [ShapeObject(small.shape, small.color, "large", small.x, small.y)]
            scene = Scene(tuple(large[0] if ob is small else ob for ob in scene.objects))
            img = render(scene, r).astype(np.float32)
        o = pick(rng, large)
        (x0, y0, x1, y1), cov, dx, dy = _object_pixels(o, r)
        span = (0.9 if o.size == "large" else 0.6) * r / 3
        col = np.asarray(COLORS[o.color], np.float32)
        patch = img[y0:y1, x0:x1]
        if name == "solid_shapes":
            if o.shape != "cross" and rng.random() < 0.5:   # a hole inside (a cross's arms are too thin for one)
                oy, rad = (span / 6, 0.15 * span) if o.shape == "triangle" else (0.0, 0.2 * span)
                patch[np.hypot(dx, dy - oy) < rad] = bg
            else:                                             # about half of the shape in another color
                t = dx if rng.random() < 0.5 else dy
                order = np.argsort(t.ravel())
                half = t.ravel()[order][np.searchsorted(np.cumsum(cov.ravel()[order]), cov.sum() / 2)]
                side = t < half
                other = np.asarray(COLORS[_far_color(o.color, rng)], np.float32)
                patch[side] = bg + cov[side][:, None] * (other - bg)
        elif name == "clean_edges":
            # bite a corner quadrant out, or fill the quadrant of the bounding box: whichever changes a clearly
            # visible share (>= 20%) of the shape
            options = []
            for sx in (-1, 1):
                for sy in (-1, 1):
                    quad = (dx * sx > 0) & (dy * sy > 0) & (np.abs(dx) < span / 2) & (np.abs(dy) < span / 2)
                    if cov[quad].sum() >= 0.2 * cov.sum():
                        options.append((quad, bg))
                    if (1 - cov[quad]).sum() >= 0.2 * cov.sum():
                        options.append((quad, col))
            quad, value = options[int(rng.integers(len(options)))]
            patch[quad] = value
        else:
            raise ValueError(f"unknown quality check {name!r}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ measuring
def build_cases(n: int, seed: int, resolution: int, max_records: int = 4000,
                progress: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Cases ``{"kind", "truth", "image", "checks" (list), "record" (bool)}``: enough prompts that every kind has
    ``n`` positives and ``n`` negatives (or ``max_records`` prompts were used). ``image`` is the clean render."""
    rng = np.random.default_rng(seed)
    r = check_resolution(resolution)
    have = defaultdict(int)
    cases = []
    diffs = [d for d, w in zip(DIFFICULTIES, DIFFICULTY_RATIO) for _ in range(w)]
    for i in range(max_records):
        rec = make_prompt(TASKS[i % len(TASKS)], diffs[(i // len(TASKS)) % len(diffs)], rng)
        scene = sample_scene(rec, rng)
        checks = [q["check"] for q in rec["semantic_questions"]]
        img = render(scene, r)
        wanted = [c for c in checks if have[(kind_of(c), True)] < n]
        if wanted:
            cases.append({"kind": "judge", "truth": True, "image": img, "checks": checks})
            cases.append({"kind": None, "truth": True, "image": img, "checks": wanted})
            for c in wanted:
                have[(kind_of(c), True)] += 1
        for c in checks:
            if have[(kind_of(c), False)] >= n:
                continue
            neg = falsify(scene, c, rng)
            if neg is not None:
                nimg = render(neg, r)
                cases.append({"kind": None, "truth": False, "image": nimg, "checks": [c]})
                cases.append({"kind": "judge", "truth": False, "image": nimg, "checks": checks})
                have[(kind_of(c), False)] += 1
        for name in QUALITY:
            if have[(name, True)] < n:
                cases.append({"kind": None, "truth": True, "image": img, "checks": [{"kind": "quality", "name": name}]})
                have[(name, True)] += 1
            if have[(name, False)] < n:
                cases.append({"kind": None, "truth": False, "image": inject_defect(scene, name, r, rng),
                              "checks": [{"kind": "quality", "name": name}]})
                have[(name, False)] += 1
        if progress:
            progress(1)
        kinds = {k for k, _ in have}
        if i >= len(TASKS) * 10 and all(have[(k, t)] >= n for k in kinds for t in (True, False)):
            break
    return cases


def measure(n: int = 100, seed: int = 0, resolution: int = 32, conditions: Optional[dict] = None,
            progress: Optional[Callable[[int], None]] = None) -> dict:
    """Run every case through every condition; return the results (JSON-able, see ``format_table``)."""
    t0 = time.time()
    conditions = conditions or CONDITIONS
    cases = build_cases(n, seed, resolution)
    scale = resolution / 32.0
    results: dict = {}
    for ci, (cname, (noise, blur)) in enumerate(conditions.items()):
        rng = np.random.default_rng([seed, 7, ci])
        acc = defaultdict(lambda: {True: [], False: []})
        probs = defaultdict(lambda: {True: [], False: []})
        seen: dict = {}   # the same render serves several cases: degrade and read it once per condition
        for case in cases:
            key = id(case["image"])
            if key not in seen:
                img = degrade(case["image"], rng, noise, blur * scale) if (noise or blur) else case["image"]
                seen[key] = analyze(img)
            an = seen[key]
            if case["kind"] == "judge":
                yes = all(hard_answer(an, c) for c in case["checks"])
                acc["judge"][case["truth"]].append(yes == case["truth"])
                continue
            for c in case["checks"]:
                p, yes = soft_answer(an, c), hard_answer(an, c)
                acc[kind_of(c)][case["truth"]].append(yes == case["truth"])
                probs[kind_of(c)][case["truth"]].append(p)
            if progress:
                progress(1)
        table = {}
        for kind in acc:
            row = {}
            for truth, label in ((True, "pos"), (False, "neg")):
                a, p = acc[kind][truth], probs[kind][truth]
                row[label] = {"n": len(a), "acc": float(np.mean(a)) if a else None,
                              "mean_p": float(np.mean(p)) if p else None}
            both = acc[kind][True] + acc[kind][False]
            row["acc"] = float(np.mean(both)) if both else None
            ps = probs[kind][True] + probs[kind][False]
            ts = [1.0] * len(probs[kind][True]) + [0.0] * len(probs[kind][False])
            row["brier"] = float(np.mean((np.array(ps) - np.array(ts)) ** 2)) if ps else None
            table[kind] = row
        allq = [x for k in acc if k != "judge" for t in (True, False) for x in acc[k][t]]
        table["all_questions"] = {"acc": float(np.mean(allq)), "n": len(allq)}
        results[cname] = table
    clean = results.get("clean", {}).get("all_questions", {}).get("acc")
    return {"resolution": resolution, "n_per_kind": n, "seed": seed,
            "conditions": {k: {"noise_std": v[0], "blur_sigma_px": v[1] * scale} for k, v in conditions.items()},
            "results": results, "target_clean_accuracy": TARGET_CLEAN_ACCURACY,
            "clean_accuracy": clean, "meets_target": bool(clean is not None and clean >= TARGET_CLEAN_ACCURACY),
            "n_cases": len(cases), "seconds": round(time.time() - t0, 1), "numpy": np.__version__}


KIND_ORDER = ("existence", "count", "no_object", "color", "shape", "size", "not_attribute", "spatial", "not_spatial",
              "size_comparison", "count_comparison", *QUALITY, "judge")


def format_table(res: dict) -> str:
    """Human table: one row per kind; per condition the strict accuracy on positives / negatives (%) and the
    Brier score of P(yes) on both."""
    conds = list(res["results"])
    head = f"{'kind':<18}{'n+/n-':>10}" + "".join(f"{c:>20}" for c in conds)
    sub = f"{'':<18}{'':>10}" + "".join(f"{'pos%/neg% brier':>20}" for _ in conds)
    lines = [head, sub, "-" * len(head)]
    first = res["results"][conds[0]]
    for kind in [k for k in KIND_ORDER if k in first] + sorted(set(first) - set(KIND_ORDER) - {"all_questions"}):
        row = first[kind]
        line = f"{kind:<18}{str(row['pos']['n']) + '/' + str(row['neg']['n']):>10}"
        for c in conds:
            rr = res["results"][c][kind]
            pa, na = rr["pos"]["acc"], rr["neg"]["acc"]
            cell = f"{'-' if pa is None else f'{100 * pa:.1f}'}/{'-' if na is None else f'{100 * na:.1f}'}"
            brier = rr.get("brier")
            cell += " " + ("     " if brier is None else f"{brier:.3f}")
            line += f"{cell:>20}"
        lines.append(line)
    lines.append("-" * len(head))
    line = f"{'all questions':<18}{first['all_questions']['n']:>10}"
    for c in conds:
        line += f"{100 * res['results'][c]['all_questions']['acc']:>19.2f}%"
    lines.append(line)
    return "\n".join(lines)
