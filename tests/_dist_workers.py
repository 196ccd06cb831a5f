"""Rank functions of tests/test_distributed.py (``torch.multiprocessing.spawn`` imports them by module name)."""
from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from alphagrpo.rewards import DVReward
from alphagrpo.testing import brightness_world
from alphagrpo.train.config import apply_overrides, get_recipe
from alphagrpo.train.dist import gather_all
from alphagrpo.train.loop import train
from alphagrpo.train.trainer import GRPOTrainer


def small_cfg(out: str, strategy: str, steps: int = 2, model_path: str | None = None):
    sets = [f"steps={steps}", "prompts_per_step=2", "group_size=4", "micro_batch=4", "max_think_tokens=4",
            "sampler.num_steps=4", "sampler.window=2", "sampler.window_starts=0,1", "cfg.text_scale=1.0",
            "optim.lr=1e-3", "optim.grad_clip=0.1", "ckpt_every=1", "image_every=0", f"out_dir={out}",
            f"parallel.strategy={strategy}"]
    if model_path:
        sets.append(f"model.path={model_path}")
    return apply_overrides(get_recipe("tiny_shapes"), sets)


def full(t: torch.Tensor) -> torch.Tensor:
    """A (possibly FSDP-sharded) tensor as a whole plain tensor (a collective for DTensors: call on every rank)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state(policy) -> dict:
    return {n: full(p.detach()).clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def grads(policy) -> dict:
    return {n: full(p.grad).clone() for n, p in policy.model.named_parameters() if p.grad is not None}


class AllGatherCounter:
    """Counts the all-gathers and reduce-scatters FSDP2 issues (it calls ``torch.distributed.all_gather_single``
    and ``reduce_scatter_single``) and the all-reduces of replicate."""

    NAMES = ("all_gather_single", "reduce_scatter_single", "all_reduce")

    def __init__(self):
        self.counts = dict.fromkeys(self.NAMES, 0)

    @property
    def n(self) -> int:
        return self.counts["all_gather_single"]

    def __enter__(self):
        self._orig = {k: getattr(dist, k) for k in self.NAMES}
        for k in self.NAMES:
            def counted(*a, _k=k, **kw):
                self.counts[_k] += 1
                return self._orig[_k](*a, **kw)
            setattr(dist, k, counted)
        return self

    def __exit__(self, *exc):
        for k, f in self._orig.items():
            setattr(dist, k, f)


def strategy_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One rank, for each strategy: (1) one update on this rank's half of fixed rollouts; (2) all-gathers per
    rollout; (3) a 2-step run checking after every step that the trainable weights agree across ranks; (4) 1 step +
    resume to 2."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for strategy in ("replicate", "fsdp"):
            _one_strategy(rank, world_size, Path(out), strategy)
    finally:
        dist.destroy_process_group()


def _one_strategy(rank: int, world_size: int, o: Path, strategy: str) -> None:
    from alphagrpo.models.registry import load_policy
    out = str(o)
    world = brightness_world()
    model_path = str(o / "micro")
    cfg = small_cfg(out, strategy, model_path=model_path)
    # (1) gradient synchronisation on fixed rollouts (made by the test in one process)
    fixed = torch.load(o / "rollouts.pt", weights_only=False)
    chunks, adv = fixed["chunks"], fixed["adv"]
    per = len(chunks) // world_size
    mine = chunks[rank * per:(rank + 1) * per]
    n_mine = sum(len(c.requests) for c in mine)
    a0 = sum(len(c.requests) for c in chunks[:rank * per])
    policy = load_policy(cfg.model, "cpu", path=model_path)
    tr = GRPOTrainer(policy, DVReward(world.verifier), cfg, generator=torch.Generator().manual_seed(rank))
    with AllGatherCounter() as upd:
        t = tr.update(mine, adv[a0:a0 + n_mine])
    res = {"grad_norm": t["grad_norm"], "grads": grads(policy), "weights": trainable_state(policy),
           "update_collectives": upd.counts}
    # (2) all-gathers of one rollout: inside the trainer's gathered() window, and (for the record) without it
    tr.gen.manual_seed(rank)
    with AllGatherCounter() as inside:
        with tr.parallel.gathered():
            tr.rollout(world.train[:2], srr=False)
    with AllGatherCounter() as outside:
        tr.rollout(world.train[:2], srr=False)
    for u in getattr(tr.parallel, "units", []):
        u.reshard()
    res.update(ag_rollout=inside.n, ag_rollout_ungathered=outside.n)
    tr.close()

    # (3) a 2-step run: after every step the trainable weights are identical on every rank
    holder = {"policy": load_policy(cfg.model, "cpu", path=model_path)}
    same, skipped = [], []

    def check(step, m):
        flat = torch.cat([full(p.detach()).reshape(-1) for p in holder["policy"].trainable_parameters()])
        both = gather_all(flat).view(world_size, -1)
        same.append(bool(all(torch.equal(both[0], both[r]) for r in range(world_size))))
        skipped.append(int(m["skipped"]))
    _, pa = train(cfg, world, o / f"A_{strategy}", policy=holder["policy"], on_step=check)
    res.update(same=same, skipped=skipped, straight=trainable_state(pa))
    # (4) the same run stopped after 1 step and resumed
    train(small_cfg(out, strategy, steps=1, model_path=model_path), world, o / f"B_{strategy}")
    _, pb = train(cfg, world, o / f"B_{strategy}", resume=True)
    res["resumed"] = trainable_state(pb)
    torch.save(res, o / f"{strategy}_rank{rank}.pt")
