"""Where does the generator fail when the plan is right?

    python -m experiments.drawing_errors [--checkpoint DIR] [--n 256] [--out experiments/results/drawing_errors_cpu.json]

For ``--n`` held-out prompts, a right plan of the world's own (a satisfying scene, as ``alphagrpo eval
--oracle-plans`` draws from) is given to the model as its think text and drawn with the evaluation's ODE sampler.
Every planned object is then looked up in its cell by the shapes detector: drawn right when shape, color and size
all match. The report gives per-object accuracy by the scene's object count, by how many planned neighbours the
object has, by size, shape and color, and the shape confusion table (planned shape -> detected shape, ``missing``
when nothing is detected in the cell). Shapes world only.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence


def tally(planned: Sequence[Iterable], detected: Sequence[Mapping[tuple, Mapping]]) -> dict:
    """``planned[i]``: the planned objects of scene i (with ``shape, color, size, x, y``); ``detected[i]``: the
    detections of image i keyed by cell ``(x, y)`` (dicts with ``shape, color, size``). Returns per-object accuracy
    tables (``{"by_count": {n: acc}, "by_neighbours", "by_size", "by_shape", "by_color"}``), the overall per-object
    accuracy and the shape confusion counts."""
    by = defaultdict(lambda: defaultdict(list))
    confusion: dict = defaultdict(Counter)
    for objs, det in zip(planned, detected):
        objs = list(objs)
        cells = {(o.x, o.y) for o in objs}
        for o in objs:
            d = det.get((o.x, o.y))
            ok = d is not None and (d["shape"], d["color"], d["size"]) == (o.shape, o.color, o.size)
            near = sum((o.x + dx, o.y + dy) in cells for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy)
            for table, key in (("by_count", len(objs)), ("by_neighbours", near), ("by_size", o.size),
                               ("by_shape", o.shape), ("by_color", o.color), ("all", "all")):
                by[table][key].append(ok)
            confusion[o.shape]["missing" if d is None else str(d["shape"])] += 1
    out = {t: {str(k): sum(v) / len(v) for k, v in sorted(rows.items(), key=lambda kv: str(kv[0]))}
           for t, rows in by.items() if t != "all"}
    out["objects"] = len(by["all"]["all"])
    out["accuracy_per_object"] = sum(by["all"]["all"]) / max(1, len(by["all"]["all"]))
    out["shape_confusion"] = {s: dict(c) for s, c in sorted(confusion.items())}
    return out


def main(argv=None) -> int:
    import numpy as np
    import torch

    from alphagrpo.models.policy import GenRequest
    from alphagrpo.models.registry import ModelConfig, load_policy
    from alphagrpo.train.config import get_recipe
    from alphagrpo.eval.evaluate import generate
    from alphagrpo.worlds.registry import load_world
    from alphagrpo.worlds import shapes as S

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="TinyUMM checkpoint folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=256, help="held-out prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/drawing_errors_cpu.json")
    args = p.parse_args(argv)
    if args.n < 1:
        raise SystemExit("--n must be >= 1")
    t0 = time.time()
    cfg = get_recipe("tiny_shapes")
    cfg.data.test_size = max(cfg.data.test_size, args.n)
    world = load_world(cfg.data)
    pol = load_policy(ModelConfig(path=args.checkpoint), "cpu", world=world)
    recs = world.test[: args.n]
    rng = np.random.default_rng(args.seed)
    scenes = [S.sample_scene(r, rng) for r in recs]
    images, _ = generate(pol, [GenRequest(r["prompt"]) for r in recs], num_steps=cfg.sampler.eval_steps,
                         shift=cfg.sampler.shift, cfg=cfg.cfg, generator=torch.Generator().manual_seed(args.seed),
                         think_texts=[S.plan_text(s) for s in scenes])
    v = S.ShapesVerifier()
    detected = [{tuple(d["cell"]): d for d in v.detect(img)} for img in images]
    report = tally([s.objects for s in scenes], detected)
    report["scene_accuracy"] = float(np.mean([world.judge(img, r) for img, r in zip(images, recs)]))
    report.update({"checkpoint": args.checkpoint or "shipped", "n": args.n, "seed": args.seed,
                   "eval_steps": cfg.sampler.eval_steps, "seconds": round(time.time() - t0, 1),
                   "device": "cpu", "torch": torch.__version__})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("scene_accuracy", "accuracy_per_object", "by_count", "by_size")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
