"""``alphagrpo data``: synthesize prompt data for an embedded world and measure its programmatic verifier.

    alphagrpo data synth --world shapes [--n-per-task 500] [--n-test 1024] [--out data/shapes_train.jsonl] [--seed 0]
    alphagrpo data verifier-accuracy [--n 100] [--seed 0] [--resolution 32]
                                     [--out bench/results/shapes_verifier_accuracy.json]
    alphagrpo data decompose --llm http://HOST:PORT --model NAME --in PROMPTS --out FILE.jsonl

Each prints a human table and, last, one JSON line for scripts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


DEFAULT_TRAIN = os.path.join("data", "shapes_train.jsonl")
DEFAULT_ACCURACY = os.path.join("bench", "results", "shapes_verifier_accuracy.json")


def split_test_path(train_path: str) -> str:
    """``data/shapes_train.jsonl -> data/shapes_test.jsonl``; any other name gets ``_test`` before its extension."""
    root, ext = os.path.splitext(train_path)
    if root.endswith("_train"):
        return root[: -len("_train")] + "_test" + (ext or ".jsonl")
    return root + "_test" + (ext or ".jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True
    s = sub.add_parser("synth", help="write train and test prompt records (JSONL) for a world")
    s.add_argument("--world", choices=("shapes",), default="shapes", help="which embedded world (default: shapes)")
    s.add_argument("--n-per-task", type=int, default=500, help="training prompts per task type (default 500)")
    s.add_argument("--n-test", type=int, default=1024, help="test prompts in all (default 1024)")
    s.add_argument("--out", default=DEFAULT_TRAIN, help=f"training JSONL (default {DEFAULT_TRAIN}); the test split "
                   "goes beside it, '_train' replaced by '_test'")
    s.add_argument("--test-out", default=None, help="test JSONL (default: derived from --out)")
    s.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same files (default 0)")
    a = sub.add_parser("verifier-accuracy", help="measure the shapes verifier on clean, noisy and blurred renders")
    a.add_argument("--n", type=int, default=100, help="positive and negative cases per question kind (default 100)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--resolution", type=int, default=32, help="render resolution in pixels (default 32)")
    a.add_argument("--out", default=DEFAULT_ACCURACY, help=f"results JSON (default {DEFAULT_ACCURACY})")
    from alphagrpo.commands import decompose
    decompose.add_arguments(sub.add_parser("decompose", help="free prompts -> yes/no questions in the authors' "
                                           "schema, by an LLM (OpenAI-compatible server)"))


def _progress(total: int, desc: str):
    """A tqdm-like ``update(n)`` callable and a closer; plain no-ops when tqdm is not installed or not a TTY."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return (lambda n=1: None), (lambda: None)
    bar = tqdm(total=total or None, desc=desc, disable=not sys.stderr.isatty(), leave=False)
    return bar.update, bar.close


def _synth(args) -> int:
    from alphagrpo.worlds.shapes import summary_table, synthesize, write_jsonl
    for name in ("n_per_task", "n_test"):
        if getattr(args, name) < 0:
            print(f"error: --{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    test_out = args.test_out or split_test_path(args.out)
    if os.path.abspath(test_out) == os.path.abspath(args.out):
        print("error: --out and --test-out name the same file", file=sys.stderr)
        return 2
    try:
        train, test = synthesize(n_per_task=args.n_per_task, n_test=args.n_test, seed=args.seed)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(args.out, train)
    write_jsonl(test_out, test)
    print(summary_table({"train": train, "test": test}))
    print(f"train: {args.out} ({len(train)} prompts)")
    print(f"test:  {test_out} ({len(test)} prompts)")
    print(json.dumps({"world": args.world, "seed": args.seed, "train": args.out, "test": test_out,
                      "n_train": len(train), "n_test": len(test)}))
    return 0


def _accuracy(args) -> int:
    from alphagrpo.worlds.shapes.accuracy import format_table, measure
    from alphagrpo.worlds.shapes.render import check_resolution
    if args.n < 1:
        print("error: --n must be >= 1", file=sys.stderr)
        return 2
    try:
        check_resolution(args.resolution)
    except ValueError as e:
        print(f"error: --resolution: {e}", file=sys.stderr)
        return 2
    update, close = _progress(0, "verifier accuracy")
    try:
        res = measure(n=args.n, seed=args.seed, resolution=args.resolution, progress=update)
    finally:
        close()
    res["command"] = "alphagrpo data verifier-accuracy " + " ".join(
        f"--{k} {v}" for k, v in (("n", args.n), ("seed", args.seed), ("resolution", args.resolution)))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(format_table(res))
    print("conditions: " + ", ".join(f"{k} (noise std {v['noise_std']:g}, blur {v['blur_sigma_px']:g} px)"
                                     for k, v in res["conditions"].items()))
    print(f"wrote {args.out}")
    summary = {"clean_accuracy": res["clean_accuracy"], "meets_target": res["meets_target"],
               "accuracy": {c: round(t["all_questions"]["acc"], 4) for c, t in res["results"].items()},
               "resolution": args.resolution, "n_per_kind": args.n, "out": args.out}
    print(json.dumps(summary))
    return 0


def run(args) -> int:
    if args.data_command == "synth":
        return _synth(args)
    if args.data_command == "decompose":
        from alphagrpo.commands import decompose
        return decompose.run(args)
    return _accuracy(args)
