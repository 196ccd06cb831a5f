"""``alphagrpo`` command line: ``alphagrpo {demo,pretrain,train,eval,refine,ablate,data,generate,score} ...``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; this file only
wires them, so importing it does no work and a command's heavy imports happen when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("alphagrpo.commands.demo", "short RT2I GRPO run from the shipped checkpoint, with before/after evaluation"),
    "pretrain": ("alphagrpo.commands.pretrain", "supervised pretraining of TinyUMM on rendered scenes"),
    "train": ("alphagrpo.commands.train", "GRPO training (RT2I or SRR) of any policy from a named recipe"),
    "eval": ("alphagrpo.commands.eval", "held-out accuracy and mean DVReward of a policy"),
    "refine": ("alphagrpo.commands.refine", "inference-time self-reflective refinement on held-out prompts"),
    "ablate": ("alphagrpo.commands.ablate", "the paper's ablations (FPR, scoring, reward) in the shapes world"),
    "data": ("alphagrpo.commands.data", "synthesize prompt data, decompose prompts with an LLM, check the verifier"),
    "generate": ("alphagrpo.commands.generate", "sample a benchmark (GenEval, TIIF, DPG, WISE, prompts) in its layout"),
    "score": ("alphagrpo.commands.score", "yes/no-question scores of a generated benchmark folder by any judge"),
}


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alphagrpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in commands.items():
        p = sub.add_parser(name, help=help_)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a command whose module is not in this build
            if e.name is None or not module.startswith(e.name):
                raise
            p.set_defaults(_run=lambda args, _m=module: _missing(_m))
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _missing(module: str) -> int:
    print(f"error: this install has no module {module}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. Bad input (a wrong config value, a missing or incompatible checkpoint or data file, an
    unwritable folder, a missing optional extra) ends with one line ``error: <what to change>`` on stderr and exit
    status 2 instead of a traceback; ``ALPHAGRPO_DEBUG=1`` re-raises for the traceback."""
    import os
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError) as e:
        if os.environ.get("ALPHAGRPO_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
