"""Run folders and trainer checkpoints that cannot be lost.

A checkpoint is ``run/checkpoints/step_XXXXXX/`` holding ``policy/`` (the policy's own ``save_pretrained``: for
LoRA runs the adapters and a pointer to the base), ``trainer.pt`` (optimizer, generator state, step, data position,
config) and ``manifest.json`` (a SHA-256 of every file). It is written into a temporary sibling and renamed into
place, then ``checkpoints/latest`` is replaced atomically: a checkpoint is complete or absent. At load the checksums
are verified and ``trainer.pt`` is read with ``weights_only=True`` (no pickled code runs). A corrupt or missing
latest checkpoint is one clear error that names the previous complete one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

CKPT_FORMAT = "alphagrpo.trainer/v2"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Create folder ``final`` atomically: ``write(tmp)`` fills a temporary sibling, renamed into place at the end."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is not
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def save_checkpoint(run_dir: Path, step: int, policy, state: dict, cfg) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXX`` atomically (``policy``, the trainer ``state``: optimizer,
    generator, data position; the config; checksums), then point ``checkpoints/latest`` at it (atomic rename)."""
    ck = Path(run_dir) / "checkpoints"
    final = ck / f"step_{step:06d}"

    def write(tmp: Path):
        policy.save_pretrained(tmp / "policy")
        torch.save({"format": CKPT_FORMAT, "recipe": cfg.recipe, "step": step, "config": cfg.to_dict(),
                    "model_kind": cfg.model.kind, **state}, tmp / "trainer.pt")
        (tmp / "manifest.json").write_text(json.dumps({"format": CKPT_FORMAT, "step": step,
                                                        "sha256": _manifest(tmp)}, indent=1))

    atomic_dir(final, write)
    fd, tmpname = tempfile.mkstemp(dir=ck, prefix=".latest.")
    with os.fdopen(fd, "w") as f:
        f.write(final.name)
    os.replace(tmpname, ck / "latest")
    return final


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's complete-looking checkpoint folders, oldest first."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted((p for p in ck.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def remove_partial(run_dir: Path) -> list[str]:
    """Delete temporary folders and files a killed checkpoint write left behind; returns their names."""
    ck = Path(run_dir) / "checkpoints"
    gone = []
    if ck.is_dir():
        for p in ck.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def verify(ck: Path) -> Optional[str]:
    """None when checkpoint folder ``ck`` is complete and every checksum matches, else what is wrong."""
    man = ck / "manifest.json"
    if not man.is_file():
        return "no manifest.json (not a complete checkpoint)"
    try:
        sums = json.loads(man.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, want in sums.items():
        f = ck / rel
        if not f.is_file():
            return f"{rel} is missing"
        if _sha256(f) != want:
            return f"{rel} does not match its checksum (truncated or damaged)"
    return None


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its latest), a checkpoints folder, or the folder itself."""
    path = Path(path)
    for cand in (path / "checkpoints" / "latest", path / "latest"):
        if cand.is_file():
            return cand.parent / cand.read_text().strip()
    if (path / "trainer.pt").is_file():
        return path
    found = step_dirs(path)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no trainer checkpoint under {path} (expected checkpoints/latest or trainer.pt)")


def load_checkpoint(path: Path, recipe: Optional[str] = None) -> dict:
    """Read and verify a trainer checkpoint. Errors say what is wrong and name the previous complete checkpoint."""
    ck = find_checkpoint(path)
    problem = "is missing" if not ck.is_dir() else verify(ck)
    if problem is not None:
        run = ck.parent.parent
        good = [d for d in step_dirs(run) if d != ck and d.name < ck.name and verify(d) is None]
        hint = (f"; the previous complete checkpoint is {good[-1]}: delete {ck} and --resume continues from it"
                if good else "; no earlier complete checkpoint exists: start a new run")
        raise ValueError(f"checkpoint {ck} {problem}" + hint)
    try:
        state = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # an unreadable file that still matched its checksum: written by something else
        raise ValueError(f"{ck / 'trainer.pt'} cannot be read safely ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ValueError(f"{ck} is not an alphagrpo trainer checkpoint (format {CKPT_FORMAT})")
    if recipe is not None and state["recipe"] != recipe:
        raise ValueError(f"checkpoint {ck} was written by recipe {state['recipe']!r}, not {recipe!r}; resume with "
                         f"--recipe {state['recipe']} or start a new run folder")
    state["policy_path"] = ck / "policy"
    state["path"] = ck
    return state


def has_checkpoints(run_dir: Path) -> bool:
    ck = Path(run_dir) / "checkpoints"
    return (ck / "latest").is_file() or bool(step_dirs(run_dir))
