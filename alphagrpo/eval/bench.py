"""Sample a benchmark suite with any policy: resumable, shardable, optionally refined, with a manifest.

Per item (one prompt): a generator seeded from ``(seed, item.key)`` draws its ``n`` images with the ODE sampler, so
an image never depends on which shard or which run drew it; or, with ``refine_rounds > 0``, inference-time
self-reflective refinement (``refine``, RECIPE.md section 7) draws them and keeps each sample's best. The images go
to the suite's layout atomically; an item whose output exists is skipped, which is how a stopped run resumes.

``OUT/manifest.json`` holds the settings (a rerun with other settings is refused: it would mix two runs in one
folder), the seed rule, and per item its seed and, when refined, the rounds each sample went through and its
rewards. It is updated under a file lock, so shards writing into one folder do not lose each other's entries.
Chose not to: batch several prompts into one sampler call (per-prompt seeding makes images independent of sharding).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from alphagrpo.eval.evaluate import EvalSettings, generate
from alphagrpo.eval.refine import refine
from alphagrpo.eval.suites import Item, Suite
from alphagrpo.models.policy import GenRequest, has_think

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "alphagrpo.bench/v1"


@dataclass
class GenSettings:
    """How a suite is drawn: the sampler settings (``EvalSettings``: steps, shift, guidance, think, batch, seed),
    images per prompt, saved size, and refinement. ``refine_only_failed``: refine only samples with a failing
    question (else every sample goes through all ``refine_rounds``; both keep each sample's best image)."""
    sampling: EvalSettings = field(default_factory=EvalSettings)
    n: int = 4                      # images per prompt
    resolution: Optional[int] = None   # saved image size in pixels (None: the policy's own)
    refine_rounds: int = 0
    refine_only_failed: bool = False

    def __post_init__(self):
        if self.n < 1 or self.sampling.num_steps < 1 or self.sampling.batch < 1:
            raise ValueError(f"--n, --steps and --batch must be >= 1, got {self.n}, {self.sampling.num_steps}, "
                             f"{self.sampling.batch}")
        if self.refine_rounds < 0:
            raise ValueError(f"--refine-rounds must be >= 0, got {self.refine_rounds}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be >= 8 pixels, got {self.resolution}")


def item_seed(seed: int, key: str) -> int:
    """The item's sampling seed: the run seed and the item's key, nothing else."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1)


@contextlib.contextmanager
def _locked(out: Path):
    import fcntl
    with open(out / ".manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def open_manifest(out: Path, header: dict) -> None:
    """Create ``OUT/manifest.json`` with ``header`` (settings), or check that an existing one has the same."""
    out.mkdir(parents=True, exist_ok=True)
    header = json.loads(json.dumps(header))          # compare as stored (tuples become lists)
    with _locked(out):
        path = out / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old["settings"]) | set(header["settings"])
                          if old["settings"].get(k) != header["settings"].get(k))
            if diff:
                raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)} differ); resume with the "
                                 "same settings or choose a new --out")
            return
        _write_json(path, {"format": FORMAT, **header, "items": {}})


def record_item(out: Path, key: str, entry: dict) -> None:
    with _locked(out):
        path = out / MANIFEST
        m = json.loads(path.read_text())
        m["items"][key] = entry
        _write_json(path, m)


def _resize(images: np.ndarray, size: Optional[int]) -> list:
    if size is None or images.shape[1:3] == (size, size):
        return list(images)
    from PIL import Image
    return [np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images]


def draw_item(policy, item: Item, s: GenSettings, reward=None) -> tuple[list, dict]:
    """Images ``[n]`` for one item, and its manifest entry."""
    think = s.sampling.think and has_think(policy)
    prompt = item.prompt + (f"\n{item.hint}" if think and item.hint else "")
    seed = item_seed(s.sampling.seed, item.key)
    sampling = replace(s.sampling, seed=seed)
    entry = {"seed": seed, "prompt": prompt}
    if s.refine_rounds > 0:
        rec = dict(item.record, prompt=prompt)
        res = refine(policy, reward, [rec] * s.n, sampling, rounds=s.refine_rounds,
                     threshold=None if s.refine_only_failed else float("inf"))
        images = res.images
        entry["refine"] = {"rounds_used": list(res.rounds_used),
                           "initial_reward": [t[0][2] for t in res.trace],
                           "final_reward": [float(r) for r in res.rewards],
                           "think": [[step[0] for step in t] for t in res.trace]}
    else:
        g = torch.Generator().manual_seed(seed)
        images, texts = generate(policy, [GenRequest(prompt)] * s.n, sampling, generator=g)
        if think:
            entry["think"] = list(texts)
    return _resize(np.asarray(images), s.resolution), entry


def run_suite(policy, suite: Suite, items: Sequence[Item], out: Path, s: GenSettings, *, reward=None,
              header: Optional[dict] = None, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Draw every item not yet in ``out``; returns ``{"generated", "skipped", "total"}``. ``reward``: a callable
    ``(images, records) -> RewardResult`` (needed for refinement). ``header``: manifest fields (settings, suite...)."""
    out = Path(out)
    if s.refine_rounds > 0:
        if reward is None:
            raise ValueError("refinement needs a judge: pass --judge ADDRESS")
        if not has_think(policy):
            raise ValueError(f"self-reflective refinement needs a policy that writes think text; "
                             f"{type(policy).__name__} has none (has_think is False)")
        empty = [it.key for it in items if not it.record.get("semantic_questions")]
        if empty:
            raise ValueError(f"refinement needs yes/no questions per prompt; {len(empty)} prompts have none (e.g. "
                             f"{empty[0]}): give the suite's question file, or decompose the prompts with "
                             "`alphagrpo data decompose` and use --suite prompts")
    open_manifest(out, header or {"settings": asdict(s)})
    done = skipped = 0
    for it in items:
        if suite.done(out, it):
            skipped += 1
        else:
            images, entry = draw_item(policy, it, s, reward)
            record_item(out, it.key, entry)       # before the images: an item is complete only once they exist
            suite.write(out, it, images)
            done += 1
        if progress is not None:
            progress(1)
    log.info("%s: %d generated, %d already there, %d in this shard", suite.name, done, skipped, len(items))
    return {"generated": done, "skipped": skipped, "total": len(items)}
