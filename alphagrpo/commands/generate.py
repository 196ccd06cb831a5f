"""``alphagrpo generate``: sample a benchmark's prompts with any policy into the benchmark's official layout.

    alphagrpo generate --suite geneval --out runs/geneval --set model.kind=bagel --set model.path=/ckpt/BAGEL-7B-MoT
    alphagrpo generate --suite tiif --suite-dir TIIF-Bench/data --out runs/tiif --refine-rounds 2 --judge URL

The policy comes from the config (``--set model.kind=... --set model.path=...``, on ``--recipe``, default
tiny_shapes), and so do the sampler's defaults (guidance, grid, think length) except the 40 ODE steps of the paper's
evaluation; the flags below override them. Resumable (rerun the same command: finished prompts are skipped),
shardable (``--shard i/n``, or RANK/WORLD_SIZE under torchrun). Prints a summary, the official scorer's command, and
last one JSON line. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from alphagrpo.commands.common import add_config_arguments

DEFAULT_N = {"geneval": 4, "dpg": 4, "tiif": 1, "wise": 1, "prompts": 1}


def add_arguments(p) -> None:
    from alphagrpo.eval.suites import SUITES
    p.add_argument("--suite", required=True, choices=list(SUITES))
    p.add_argument("--suite-dir", default=None, help="the benchmark's prompt files (default: the copy shipped with "
                   "alphagrpo, GenEval and DPG-Bench only); for --suite prompts, a JSONL or text file")
    p.add_argument("--variant", default=None, help="geneval: short|long (the long rewrite); tiif: short|long|both "
                   "(default both); wise: default|rewrite")
    p.add_argument("--split", default="testmini", help="tiif: testmini or test")
    p.add_argument("--model-name", default="alphagrpo", help="tiif: the <model_name> folder of its layout")
    p.add_argument("--out", required=True, help="output folder (the benchmark's layout + manifest.json)")
    p.add_argument("--n", type=int, default=None, help="images per prompt (default: geneval/dpg 4, others 1)")
    p.add_argument("--steps", type=int, default=40, help="ODE steps (default 40, the paper's evaluation, whatever "
                   "the recipe's eval_steps)")
    p.add_argument("--shift", type=float, default=None, help="sigma shift (default: the recipe's)")
    p.add_argument("--cfg-scale", type=float, default=None, help="text CFG scale (default: the recipe's, 4.0)")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=True,
                   help="think before drawing (--no-think: off)")
    p.add_argument("--max-think-tokens", type=int, default=None, help="default: the recipe's")
    p.add_argument("--temperature", type=float, default=None, help="think sampling temperature (default: the "
                   "recipe's)")
    p.add_argument("--resolution", type=int, default=None, help="saved image size (default: the policy's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="images per sampler call")
    p.add_argument("--refine-rounds", type=int, default=0, help="inference-time refinement rounds (needs --judge)")
    p.add_argument("--refine-only-failed", action="store_true",
                   help="refine only samples with a failing question (default: every sample, best kept)")
    p.add_argument("--judge", default=None, help="verifier address for refinement (http://..., openai:MODEL@URL, "
                   "native:PATH, hf:PATH)")
    p.add_argument("--shard", default=None, metavar="I/N", help="this process's shard (default: RANK/WORLD_SIZE "
                   "when set, else all)")
    p.add_argument("--limit", type=int, default=None, help="only the first K prompts of the suite")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available")
    add_config_arguments(p)     # --recipe and --set (model.kind, model.path, model.dtype, model.options, ...)


def sampling_settings(cfg, args):
    """The recipe's evaluation sampler settings, with the flags given on the command line applied."""
    from alphagrpo.eval.evaluate import EvalSettings
    s = EvalSettings.from_config(cfg, seed=args.seed, think=args.think, batch=args.batch)
    changes = {k: v for k, v in (("num_steps", args.steps), ("shift", args.shift),
                                 ("max_think_tokens", args.max_think_tokens), ("temperature", args.temperature))
               if v is not None}
    if args.cfg_scale is not None:
        changes["cfg"] = dataclasses.replace(s.cfg, text_scale=args.cfg_scale)
    return dataclasses.replace(s, **changes)


def default_device(explicit):
    import torch
    if explicit:
        return explicit
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def run(args) -> int:
    from alphagrpo.commands.common import resolve_config, setup_logging
    from alphagrpo.eval.bench import GenSettings, run_suite
    from alphagrpo.eval.suites import get_suite, parse_shard, resolve_dir, shard
    from alphagrpo.models.registry import load_policy
    i, k = parse_shard(args.shard)
    setup_logging(rank=i)
    suite = get_suite(args.suite, **({"split": args.split, "model_name": args.model_name}
                                     if args.suite == "tiif" else {}))
    variant = args.variant or suite.variants[-1 if args.suite == "tiif" else 0]
    n = args.n if args.n is not None else DEFAULT_N[args.suite]
    suite.check(variant, n)
    if args.refine_rounds > 0 and not args.judge:
        raise ValueError("--refine-rounds needs --judge ADDRESS (the verifier that scores each round)")
    cfg = resolve_config(args.recipe, args.set)
    s = GenSettings(sampling_settings(cfg, args), n=n, resolution=args.resolution, refine_rounds=args.refine_rounds,
                    refine_only_failed=args.refine_only_failed)
    suite_dir = resolve_dir(suite, args.suite_dir)
    items = suite.read(suite_dir, variant)
    if args.limit is not None:
        items = items[: args.limit]
    mine = shard(items, i, k)
    reward = None
    if args.refine_rounds > 0:
        from alphagrpo.eval.judge import QuestionReward
        from alphagrpo.verifiers import build_verifier
        reward = QuestionReward(build_verifier(args.judge))
    header = {"settings": {**dataclasses.asdict(s), "suite": suite.name, "variant": variant,
                           "model": dataclasses.asdict(cfg.model),
                           "judge": args.judge if args.refine_rounds else None},
              "recipe": args.recipe, "suite_dir": str(suite_dir), "prompts": len(items), "split": args.split,
              "model_name": args.model_name,
              "seed_rule": "per prompt: (seed * 1000003 + crc32(key)) mod (2^63 - 1), see alphagrpo.eval.bench"}
    policy = load_policy(cfg.model, default_device(args.device))
    res = run_suite(policy, suite, mine, Path(args.out), s, reward=reward, header=header,
                    progress=_progress(len(mine)))
    print(f"{suite.name}: {res['generated']} prompts generated, {res['skipped']} already done (shard {i}/{k}: "
          f"{res['total']} of {len(items)} prompts) -> {args.out}")
    print(f"official scorer: {suite.official.replace('OUT', args.out).replace('MODEL_NAME', args.model_name)}")
    print(json.dumps({"suite": suite.name, "out": args.out, "shard": f"{i}/{k}", **res}))
    return 0


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="generate", unit="prompt", disable=not sys.stderr.isatty()).update
