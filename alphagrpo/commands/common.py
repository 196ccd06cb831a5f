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
    cfg = apply_overrides(get_recipe(recipe), sets)
    check_device(cfg.device)
    return cfg


def check_device(device: str) -> None:
    """Refuse a CUDA device this torch cannot reach, before any slow work."""
    import torch
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} asks for CUDA, but this torch has no CUDA device; set device=cpu")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"device={device}: only {torch.cuda.device_count()} CUDA device(s) here")


def writable_dir(path):
    """Create folder ``path`` (and parents) and check that files can be written there; one clear error if not."""
    import os
    import tempfile
    from pathlib import Path
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p} is a file; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write into {p} ({e.strerror}); choose a folder you can write to") from None
    return p


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
