"""Run plumbing shared by the commands: logging set-up, tables, the shipped checkpoint, atomic trainer
checkpoints with exact resume, and metrics (JSONL + TensorBoard + image grids)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("alphagrpo")

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "tinyumm_shapes"
CKPT_FORMAT = "alphagrpo.trainer/v1"


def require(module: str, extra: str):
    """Import an optional dependency, or raise an ImportError that names the extra to install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed here: pip install 'alphagrpo[{extra}]' (or pip install "
                          f"{module.split('.')[0]})") from e


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


def load_policy(path: Optional[str] = None, device: str = "cpu", world=None):
    """A TinyUMM policy from ``path`` (default: the checkpoint shipped in the package). With ``world``, refuse a
    checkpoint whose tokenizer lacks words the world's prompts and plans use (a checkpoint of another world or of
    an older plan format), naming the missing words, instead of failing later in the middle of a run."""
    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    p = Path(path) if path else SHIPPED
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}; run `alphagrpo pretrain --recipe tiny_shapes --out {p}` "
                                "or pass --checkpoint PATH")
    pol = TinyUMMPolicy.from_pretrained(p)
    if world is not None:
        from alphagrpo.train.trainer import reflection_words
        missing = sorted(w for w in set(world.words) | set(reflection_words()) if w not in pol.tok.stoi)
        if missing:
            raise ValueError(f"checkpoint {p} does not cover this world's vocabulary (missing {len(missing)} words, "
                             f"e.g. {missing[:6]}); it was pretrained for another world or plan format. Pretrain "
                             "one with `alphagrpo pretrain --recipe RECIPE --out DIR` and pass --checkpoint DIR")
    pol.model.to(device)
    return pol


def eval_context(recipe: str, overrides, n: int, checkpoint: Optional[str] = None):
    """What the evaluating commands share: ``(cfg, world, policy, reward, held-out records[:n])``."""
    from alphagrpo.rewards import DVReward
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.train.world import load_world
    setup_logging()
    cfg = apply_overrides(get_recipe(recipe), list(overrides))
    cfg.data.test_size = max(cfg.data.test_size, n)
    world = load_world(cfg.data)
    policy = load_policy(checkpoint or cfg.init, cfg.device, world)
    reward = DVReward(world.verifier, mode=cfg.reward.mode, binary=cfg.reward.binary)
    return cfg, world, policy, reward, world.test[:n]


def atomic_dir(final: Path, write) -> None:
    """Create folder ``final`` atomically: ``write(tmp)`` fills a temporary sibling, renamed into place at the end."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is not
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, policy, trainer, data_state: dict, cfg) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXX`` atomically (policy, optimizer, generator state, step, data
    position, config), then point ``run_dir/checkpoints/latest`` at it (atomic rename)."""
    ck = Path(run_dir) / "checkpoints"
    final = ck / f"step_{step:06d}"

    def write(tmp: Path):
        policy.save_pretrained(tmp / "policy")
        torch.save({"format": CKPT_FORMAT, "recipe": cfg.recipe, "step": step, "config": cfg.to_dict(),
                    "optimizer": trainer.optimizer.state_dict(), "generator": trainer.gen.get_state(),
                    "data": data_state}, tmp / "trainer.pt")

    atomic_dir(final, write)
    fd, tmpname = tempfile.mkstemp(dir=ck, prefix=".latest.")
    with os.fdopen(fd, "w") as f:
        f.write(final.name)
    os.replace(tmpname, ck / "latest")
    return final


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its latest), a checkpoints folder, or the folder itself."""
    path = Path(path)
    for cand in (path / "checkpoints" / "latest", path / "latest"):
        if cand.is_file():
            return cand.parent / cand.read_text().strip()
    if (path / "trainer.pt").is_file():
        return path
    raise FileNotFoundError(f"no trainer checkpoint under {path} (expected checkpoints/latest or trainer.pt)")


def load_checkpoint(path: Path, recipe: str) -> dict:
    """Read a trainer checkpoint; a clear error if it belongs to another recipe or is not one."""
    ck = find_checkpoint(path)
    state = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ValueError(f"{ck} is not an alphagrpo trainer checkpoint (format {CKPT_FORMAT})")
    if state["recipe"] != recipe:
        raise ValueError(f"checkpoint {ck} was written by recipe {state['recipe']!r}, not {recipe!r}; resume with "
                         f"--recipe {state['recipe']} or start a new run folder")
    state["policy_path"] = ck / "policy"
    return state


class MetricsLogger:
    """One JSON line per step in ``metrics.jsonl``; TensorBoard scalars and image grids when tensorboard is
    installed (extra ``train``); a warning, not an error, when it is not."""

    def __init__(self, run_dir: Path, enabled_tb: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / "metrics.jsonl", "a")
        self.tb = None
        if enabled_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install 'alphagrpo[train]'): no TensorBoard logs")

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def images(self, tag: str, step: int, images) -> None:
        if self.tb is not None and len(images):
            import numpy as np
            grid = np.concatenate(list(images[:8]), axis=1)
            self.tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def format_step(step: int, m: dict) -> str:
    """The fixed one-line step log."""
    def g(k, fmt="{:.3f}"):
        return fmt.format(m[k]) if k in m else "-"
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else _rss_gib()
    return (f"step {step:4d} | reward {g('reward_mean')} ± {g('reward_std')} | think {g('think_rate', '{:.2f}')} "
            + (f"impr {g('improved_frac', '{:.2f}')} " if "improved_frac" in m else "") + f"| loss img {g('loss_image', '{:+.4f}')} "
            f"txt {g('loss_text', '{:+.4f}')} | clip img {g('clip_image', '{:.2f}')} txt {g('clip_text', '{:.2f}')} "
            f"| ratio txt {g('ratio_text', '{:.4f}')} img|r-1|max {g('ratio_image_max', '{:.1e}')} "
            f"| gnorm {g('grad_norm')} | t roll {g('time_rollout', '{:.1f}')}s wait {g('time_reward_wait', '{:.1f}')}s "
            f"train {g('time_train', '{:.1f}')}s | {g('samples_per_s', '{:.1f}')} samp/s | mem {mem:.2f}GiB"
            + (f" | kl txt {g('kl_text', '{:.1e}')} img {g('kl_image', '{:.1e}')}" if "kl_text" in m or "kl_image" in m
               else "") + (" | SKIP" if m.get("skipped") else ""))


def _rss_gib() -> float:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0
