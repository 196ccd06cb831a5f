"""Run folders and trainer checkpoints that cannot be lost.

A checkpoint is ``run/checkpoints/step_XXXXXX/`` holding ``policy/`` (the policy's own ``save_pretrained``: for
LoRA runs the adapters and a pointer to the base), ``trainer.pt`` (optimizer, generator state, step, data position,
config) and ``manifest.json`` (a SHA-256 of every file). It is written into a temporary sibling and renamed into
place, then ``checkpoints/latest`` is replaced atomically: a checkpoint is complete or absent. At load the checksums
are verified and ``trainer.pt`` is read with ``weights_only=True`` (no pickled code runs). A corrupt or missing
latest checkpoint is one clear error that names the previous complete one.

Several ranks (or FSDP) write the same folder through ``torch.distributed.checkpoint`` instead (``save_distributed``):
``dcp/`` holds the trainable weights (every weight, or the LoRA adapters; sharded as they live on the ranks) and the
optimizer state, ``rank00000.pt``... each rank's generator states and data position, ``trainer.pt`` the step, the
config and ``world_size``, and ``policy/`` (replicate only: rank 0 holds the whole policy) the policy for inference.
Every rank writes into one temporary sibling; after a barrier rank 0 writes the manifest, renames the folder into
place and replaces ``latest``: complete or absent, as above. ``load_distributed`` restores it on any world size (DCP
reshards); on another world size the data order and random streams cannot continue exactly and a log line says so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from alphagrpo._files import atomic_dir, replace_dir  # noqa: F401  (atomic_dir: also the run loop's)

log = logging.getLogger(__name__)

CKPT_FORMAT = "alphagrpo.trainer/v2"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def point_latest(ck: Path, name: str) -> None:
    """Replace ``ck/latest`` (the name of the newest checkpoint) atomically."""
    fd, tmpname = tempfile.mkstemp(dir=ck, prefix=".latest.")
    with os.fdopen(fd, "w") as f:
        f.write(name)
    os.replace(tmpname, ck / "latest")


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
    point_latest(ck, final.name)
    return final


def _dcp_state(module, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    opts = StateDictOptions(ignore_frozen_params=True)   # LoRA: the adapters only; the base comes from model.path
    model_sd, optim_sd = get_state_dict(module, optimizer, options=opts)
    return {"model": model_sd, "optim": optim_sd}, opts


def save_distributed(run_dir: Path, step: int, policy, module, trainer, data: dict, cfg, *,
                     export_policy: bool) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXX`` from every rank (call on all ranks; see the module docstring).
    ``module``: the ``nn.Module`` holding the trainable parameters; ``export_policy``: rank 0 also writes
    ``policy/`` with the policy's ``save_pretrained`` (it must hold the whole policy: replicate)."""
    import torch.distributed.checkpoint as dcp

    from alphagrpo.train.dist import dist_info
    from alphagrpo.train.parallel import barrier
    rank, world = dist_info()
    ck = Path(run_dir) / "checkpoints"
    final = ck / f"step_{step:06d}"
    tmp = ck / f".step_{step:06d}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state, _ = _dcp_state(module, trainer.optimizer)
    dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    torch.save({"generator": trainer.gen.get_state(), "torch_rng": torch.get_rng_state(), "data": data},
               tmp / f"rank{rank:05d}.pt")
    if rank == 0:
        if export_policy:
            policy.save_pretrained(tmp / "policy")
        torch.save({"format": CKPT_FORMAT, "recipe": cfg.recipe, "step": step, "config": cfg.to_dict(),
                    "model_kind": cfg.model.kind, "dcp": True, "world_size": world, "data": data}, tmp / "trainer.pt")
    barrier()
    if rank == 0:
        (tmp / "manifest.json").write_text(json.dumps({"format": CKPT_FORMAT, "step": step,
                                                        "sha256": _manifest(tmp)}, indent=1))
        replace_dir(tmp, final)
        point_latest(ck, final.name)
    barrier()
    return final


def load_distributed(state: dict, module, trainer) -> dict:
    """Restore a ``save_distributed`` checkpoint (``state``: what ``load_checkpoint`` returned) into ``module``
    and ``trainer`` (optimizer, this rank's generator). Returns the data position for this rank. On another world
    size the weights and optimizer load exactly; the prompt shards and random streams are this world's (logged)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from alphagrpo.train.dist import dist_info
    rank, world = dist_info()
    ck = Path(state["path"])
    sd, opts = _dcp_state(module, trainer.optimizer)
    # partial: a parameter that never had a gradient (e.g. the input-image path of a text-to-image run) has no
    # optimizer state in the checkpoint; DCP's fresh state for it stays, and is unused until it gets a gradient
    with warnings.catch_warnings():   # one process: DCP warns that it loads without a process group, as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(ck / "dcp"), planner=DefaultLoadPlanner(allow_partial_load=True),
                 no_dist=world == 1)
    missing = _frozen_names(module)   # a LoRA run saved its adapters only: the base stays as model.path loaded it
    load_opts = StateDictOptions(ignore_frozen_params=True, strict=not missing)
    result = set_state_dict(module, trainer.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                            options=load_opts)
    lost = [k for k in (getattr(result, "missing_keys", None) or []) if k not in missing]
    if lost:
        raise ValueError(f"checkpoint {ck} lacks trainable weights {lost[:4]}: it was written by another model or "
                         "LoRA setting")
    saved_world = int(state.get("world_size", 1))
    mine = ck / f"rank{rank:05d}.pt"
    if saved_world == world and mine.is_file():
        r = torch.load(mine, map_location="cpu", weights_only=True)
        trainer.gen.set_state(r["generator"])
        torch.set_rng_state(r["torch_rng"])
        return r["data"]
    if rank == 0:
        log.warning("resume of a %d-rank checkpoint on %d rank(s): weights and optimizer state load exactly; the "
                    "prompt order (shards per rank) and the random streams start anew for this world size, so the "
                    "run does not continue bit for bit", saved_world, world)
    data = dict(state.get("data") or {"epoch": 0, "cursor": 0})
    data["cursor"] = int(data.get("cursor", 0)) * saved_world // world   # the prompts consumed, re-divided
    return data


def _frozen_names(module) -> set:
    """Fully qualified names of the frozen parameters (what a LoRA checkpoint leaves out), wrapper prefixes
    removed as DCP's state dicts remove them."""
    out = set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            out.add(name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""))
    return out


def load_weights_distributed(state: dict, module) -> None:
    """Only the trainable weights of a ``save_distributed`` checkpoint into ``module`` (no optimizer), e.g. to
    export an FSDP run's policy in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    from alphagrpo.train.dist import dist_info
    opts = StateDictOptions(ignore_frozen_params=True)
    sd = {"model": get_model_state_dict(module, options=opts)}
    with warnings.catch_warnings():   # one process: DCP warns that it loads without a process group, as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(Path(state["path"]) / "dcp"),
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=dist_info()[1] == 1)
    set_model_state_dict(module, sd["model"], options=StateDictOptions(ignore_frozen_params=True,
                                                                       strict=not _frozen_names(module)))


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
    """A checkpoint folder from a run folder (its latest; the newest remaining one when latest was deleted), a
    checkpoints folder, or the folder itself."""
    path = Path(path)
    for cand in (path / "checkpoints" / "latest", path / "latest"):
        if cand.is_file():
            target = cand.parent / cand.read_text().strip()
            if target.is_dir():
                return target
            older = step_dirs(cand.parent.parent)   # latest was deleted (e.g. a damaged one): the newest left
            if older:
                return older[-1]
            return target
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
    state["policy_path"] = ck / "policy" if (ck / "policy").is_dir() else None
    state["path"] = ck
    return state


def has_checkpoints(run_dir: Path) -> bool:
    ck = Path(run_dir) / "checkpoints"
    return (ck / "latest").is_file() or bool(step_dirs(run_dir))
