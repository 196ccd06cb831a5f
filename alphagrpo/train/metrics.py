"""Training logs: one JSON line per step in ``metrics.jsonl``, TensorBoard scalars and image grids (extra
``train``), the fixed one-line step log, and, on request, each N-th step's rollout saved for inspection."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("alphagrpo")


def thought(texts: Sequence[str]) -> list:
    """Per think text, whether the model wrote one (an empty or blank text: it drew without reasoning)."""
    return [bool(t.strip()) for t in texts]


class MetricsLogger:
    """One JSON line per step in ``metrics.jsonl``; TensorBoard scalars and image grids when tensorboard is
    installed (extra ``train``); a warning, not an error, when it is not."""

    def __init__(self, run_dir: Path, enabled_tb: bool = True, resume_step: Optional[int] = None):
        """``resume_step``: a resumed run drops the rows after its checkpoint's step (steps about to be redone), so
        ``metrics.jsonl`` never holds a step twice."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and _row_step(ln) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(path)
        self.file = open(path, "a")
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
    mem = m.get("peak_mem_gib_max")          # the largest rank's peak, when the run loop gathered it
    if mem is None:
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else _rss_gib()
    sps = m.get("samples_per_s_total", m.get("samples_per_s"))
    return (f"step {step:4d} | reward {g('reward_mean')} ± {g('reward_std')} | think {g('think_rate', '{:.2f}')} "
            + (f"impr {g('improved_frac', '{:.2f}')} " if "improved_frac" in m else "") + f"| loss img {g('loss_image', '{:+.4f}')} "
            f"txt {g('loss_text', '{:+.4f}')} | clip img {g('clip_image', '{:.2f}')} txt {g('clip_text', '{:.2f}')} "
            f"| ratio txt {g('ratio_text', '{:.4f}')} img|r-1|max {g('ratio_image_max', '{:.1e}')} "
            f"| gnorm {g('grad_norm')} | t roll {g('time_rollout', '{:.1f}')}s wait {g('time_reward_wait', '{:.1f}')}s "
            f"train {g('time_train', '{:.1f}')}s"
            + (f" comm {m['time_comm']:.2f}s" if m.get("world_size", 1) > 1 else "")
            + f" | {'-' if sps is None else f'{sps:.1f}'} samp/s"
            + (f" ({m['world_size']} ranks, slowest {m['samples_per_s_rank_min']:.1f})" if m.get("world_size", 1) > 1
               else "") + f" | mem {mem:.2f}GiB"
            + (f" | kl txt {g('kl_text', '{:.1e}')} img {g('kl_image', '{:.1e}')}" if "kl_text" in m or "kl_image" in m
               else "") + (" | SKIP" if m.get("skipped") else ""))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def save_rollout(run_dir: Path, step: int, result) -> Path:
    """``rollouts/step_XXXXXX.npz``: the step's images (uint8), prompts, think texts, rewards and per-question
    scores, exactly as the reward saw them."""
    out = Path(run_dir) / "rollouts"
    out.mkdir(parents=True, exist_ok=True)
    images = np.concatenate([np.asarray(ro.images) for ro in result.chunks])
    texts = [t for ro in result.chunks for t in (ro.think_texts or [""] * len(ro.requests))]
    scores = [s + q for r in result.scores for s, q in zip(r.semantic, r.quality)]
    path = out / f"step_{step:06d}.npz"
    np.savez_compressed(path, images=images, prompts=np.array([r["prompt"] for r in result.records]),
                        think=np.array(texts), rewards=result.rewards.numpy(),
                        scores=np.array(json.dumps(scores)))
    return path


def _rss_gib() -> float:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0
