"""``alphagrpo score``: yes/no-question scoring of a folder ``alphagrpo generate`` wrote, by any verifier.

    alphagrpo score --suite tiif --in runs/tiif --judge openai:Qwen3-VL-30B-A3B-Instruct@http://127.0.0.1:30000
    alphagrpo score --suite prompts --in runs/mine --judge http://127.0.0.1:8000

TIIF-Bench and prompt files in the authors' schema are scored by their own protocol; GenEval, DPG-Bench and WISE get
a proxy score (labelled so): their official scorers are printed by ``generate``. Settings not given (suite folder,
variant, images per prompt) are read from the folder's manifest.json. Writes a JSON report (``--report``, default
``IN/scores-<suite>.json``), prints the table, and last one JSON line. The judge is named in both.
"""
from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    from alphagrpo.eval.suites import SUITES
    p.add_argument("--suite", required=True, choices=list(SUITES))
    p.add_argument("--in", dest="inp", metavar="DIR", required=True, help="the folder alphagrpo generate wrote")
    p.add_argument("--judge", required=True, help="verifier address: http://HOST:PORT (verifier-engine serve), "
                   "openai:MODEL@URL, native:PATH, hf:PATH")
    p.add_argument("--suite-dir", default=None, help="the benchmark's files (default: as recorded at generation)")
    p.add_argument("--variant", default=None)
    p.add_argument("--split", default=None, help="tiif: testmini or test (default: as recorded)")
    p.add_argument("--model-name", default=None, help="tiif: the <model_name> folder (default: as recorded)")
    p.add_argument("--n", type=int, default=None, help="images per prompt (default: as recorded)")
    p.add_argument("--limit", type=int, default=None, help="only the first K prompts (default: all; prompts not "
                   "generated are counted as missing)")
    p.add_argument("--batch", type=int, default=32, help="images per verifier call (the client splits them "
                   "into concurrent requests)")
    p.add_argument("--report", default=None, help="JSON report path (default IN/scores-<suite>.json)")


def run(args) -> int:
    from alphagrpo.commands.common import print_table, setup_logging
    from alphagrpo.eval.judge import format_report, score_suite
    from alphagrpo.eval.suites import get_suite, resolve_dir
    from alphagrpo.verifiers import build_verifier
    setup_logging()
    inp = Path(args.inp)
    mpath = inp / "manifest.json"
    m = json.loads(mpath.read_text()) if mpath.is_file() else {"settings": {}}
    ms = m.get("settings", {})
    if ms.get("suite") not in (None, args.suite):
        raise ValueError(f"{inp} was generated for --suite {ms['suite']}, not {args.suite}")
    kw = {}
    if args.suite == "tiif":
        kw = {"split": args.split or m.get("split", "testmini"), "model_name": args.model_name or
              m.get("model_name", "alphagrpo")}
    suite = get_suite(args.suite, **kw)
    variant = args.variant or ms.get("variant") or suite.variants[-1 if args.suite == "tiif" else 0]
    n = args.n or ms.get("n") or 1
    suite.check(variant, n)
    items = suite.read(resolve_dir(suite, args.suite_dir or m.get("suite_dir")), variant)
    if args.limit is not None:
        items = items[: args.limit]
    if args.judge.strip() == "world":
        raise ValueError("--judge needs a verifier address (http://..., openai:MODEL@URL, native:PATH, hf:PATH)")
    report = score_suite(suite, inp, items, build_verifier(args.judge), judge=args.judge, n=n, batch=args.batch)
    out = Path(args.report) if args.report else inp / f"scores-{args.suite}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    title, rows, header = format_report(report)
    print_table(title, rows, header)
    if "note" in report:
        print(report["note"])
    line = {"suite": args.suite, "judge": args.judge, "report": str(out), "scored_prompts": report["scored_prompts"],
            "missing_prompts": report["missing_prompts"]}
    for k in ("overall", "question_accuracy"):
        if k in report:
            line[k] = report[k]
    print(json.dumps(line))
    return 0

