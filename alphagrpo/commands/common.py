"""What the commands share: logging set-up, printed tables, the config from ``--recipe`` and ``--set``, and the
pieces of an evaluating command (config, world, policy, reward, held-out records)."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

log = logging.getLogger("alphagrpo")


def setup_logging(level=logging.INFO, rank: int = 0) -> None:
    """Console logging for a command (never at import time); non-zero ranks only warn."""
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def print_table(title: str, rows: Sequence[Sequence], header: Sequence[str]) -> None:
    """A plain fixed-width table on stdout."""
    cols = list(zip(*([header] + [list(map(str, r)) for r in rows]))) if rows else [[h] for h in header]
    widths = [max(len(str(x)) for x in c) for c in cols]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def add_config_arguments(p, default_recipe: str = "tiny_shapes") -> None:
    """``--recipe`` and ``--set`` (every command that builds a config)."""
    from alphagrpo.train.config import RECIPES
    p.add_argument("--recipe", default=default_recipe, help=f"named recipe ({', '.join(sorted(RECIPES))})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. optim.lr=1e-4 or model.kind=sd3 (see docs/cli.md)")


def resolve_config(recipe: str, overrides: Sequence[str], checkpoint: Optional[str] = None):
    """The recipe with ``--set`` overrides applied; ``checkpoint`` (a policy folder) becomes ``model.path``."""
    from alphagrpo.train.config import apply_overrides, get_recipe
    sets = list(overrides) + ([f"model.path={checkpoint}"] if checkpoint else [])
    return apply_overrides(get_recipe(recipe), sets)


def eval_context(recipe: str, overrides, n: int, checkpoint: Optional[str] = None):
    """What the evaluating commands share: ``(cfg, world, policy, reward, held-out records[:n])``. The reward is the
    recipe's DVReward over ``reward.verifier``."""
    from alphagrpo.models.registry import load_policy
    from alphagrpo.train.loop import build_reward
    from alphagrpo.worlds.registry import load_world
    setup_logging()
    if n < 1:
        raise ValueError(f"--n must be >= 1 (held-out prompts), got {n}")
    cfg = resolve_config(recipe, overrides, checkpoint)
    cfg.data.test_size = max(cfg.data.test_size, n)
    world = load_world(cfg.data)
    if not world.test:
        raise ValueError(f"the {world.name} world has no held-out prompts (data.test_file for the jsonl world)")
    policy = load_policy(cfg.model, cfg.device, world=world)
    reward = build_reward(cfg, world)
    return cfg, world, policy, reward, world.test[:n]
