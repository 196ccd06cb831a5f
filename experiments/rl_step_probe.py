"""Probe one GRPO update of a checkpoint: is the policy gradient informative, and how large a step does it take?

Accumulates the trainer's gradient (the same replay and losses as ``GRPOTrainer.step``) over ``--rounds`` rollouts on
``--prompts`` training prompts, then scores moved copies of the weights by the mean rollout reward on fresh samples
(one fixed sampling seed for every copy, so the comparisons share their random numbers):
- along the normalized gradient, ``theta - eta * g / |g|`` for each ``--etas`` (L2 step length; negative = against);
- Adam's first step, ``theta - lr * sign(g)``, for each ``--sign-lrs`` (what AdamW does at step 1 with lr);
- a random-sign control of the same per-weight size, ``theta + lr * sign(noise)``, for each ``--random-lrs``.
Scored on the prompts the gradient came from (``same``) and on as many held-out prompts (``held_out``).

    python -m experiments.rl_step_probe --which image --out experiments/results/rl_step_probe_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _floats(s: str):
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny_shapes")
    p.add_argument("--checkpoint", default=None, help="TinyUMM folder (default: the shipped one)")
    p.add_argument("--which", choices=("image", "text", "both"), default="image", help="which loss makes the gradient")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="rollouts accumulated into the gradient")
    p.add_argument("--etas", default="0.15,-0.15,0.5,1.5")
    p.add_argument("--sign-lrs", default="1e-4,-1e-4,3e-4")
    p.add_argument("--random-lrs", default="1e-4,3e-4,6e-3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from alphagrpo.advantages import group_advantages
    from alphagrpo.rewards import DVReward
    from alphagrpo.models.registry import ModelConfig, load_policy
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.train.trainer import GRPOTrainer
    from alphagrpo.worlds.registry import load_world

    sets = [f"prompts_per_step={args.prompts}", f"group_size={args.group}", *args.set]
    sets += {"image": ["loss.text_weight=0"], "text": ["loss.image_weight=0"], "both": []}[args.which]
    cfg = apply_overrides(get_recipe(args.recipe), sets)
    world = load_world(cfg.data)
    policy = load_policy(ModelConfig(path=args.checkpoint or cfg.model.path), cfg.device, world=world)
    reward = DVReward(world.verifier, mode=cfg.reward.mode, binary=cfg.reward.binary)
    trainer = GRPOTrainer(policy, reward, cfg, generator=torch.Generator().manual_seed(cfg.seed))
    stride = max(1, len(world.train) // args.prompts)
    sets_of = {"same": world.train[::stride][: args.prompts], "held_out": world.test[: args.prompts]}
    t0 = time.perf_counter()

    grads = [torch.zeros_like(q) for q in trainer.params]
    for r in range(args.rounds):
        trainer.gen.manual_seed(100 + r)
        chunks, _, gids, _ = trainer.rollout(sets_of["same"], srr=False)
        rw = torch.cat([c.reward_future.result().rewards for c in chunks]).float()
        adv = group_advantages(rw, gids, std=cfg.loss.adv_std, eps=cfg.loss.adv_eps).to(trainer.device)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.backward(chunks, adv)
        for g, q in zip(grads, trainer.params):
            if q.grad is not None:
                g += q.grad / args.rounds
    gnorm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
    base = [q.detach().clone() for q in trainer.params]

    @torch.no_grad()
    def score(records) -> float:
        trainer.gen.manual_seed(7)
        out = []
        for _ in range(2):
            chunks, _, _, _ = trainer.rollout(records, srr=False)
            out.append(torch.cat([c.reward_future.result().rewards for c in chunks]))
        return float(torch.cat(out).float().mean())

    @torch.no_grad()
    def moved(delta_fn) -> dict:
        for q, b, g in zip(trainer.params, base, grads):
            q.copy_(b + delta_fn(g))
        res = {k: round(score(v), 4) for k, v in sets_of.items()}
        for q, b in zip(trainer.params, base):
            q.copy_(b)
        return res

    noise_gen = torch.Generator().manual_seed(1)
    rows = [{"move": "none", "size": 0.0, **moved(lambda g: torch.zeros_like(g))}]
    for eta in _floats(args.etas):
        rows.append({"move": "along gradient (L2 length)", "size": eta, **moved(lambda g, e=eta: -e * g / gnorm)})
    for lr in _floats(args.sign_lrs):
        rows.append({"move": "Adam first step (lr * sign)", "size": lr, **moved(lambda g, s=lr: -s * torch.sign(g))})
    for lr in _floats(args.random_lrs):
        rows.append({"move": "random sign (control)", "size": lr,
                     **moved(lambda g, s=lr: s * torch.sign(torch.randn(g.shape, generator=noise_gen)))})
    n_params = sum(q.numel() for q in trainer.params)
    result = {"bench": "rl_step_probe", "which": args.which, "recipe": args.recipe, "prompts": args.prompts,
              "group": args.group, "rounds": args.rounds, "grad_norm": gnorm, "params": n_params,
              "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads, torch "
                        f"{torch.__version__}", "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    trainer.close()
    print(f"{'move':30s} {'size':>8s} {'same':>7s} {'held_out':>8s}   (|g| = {gnorm:.4g}, {n_params} weights)")
    for r in rows:
        print(f"{r['move']:30s} {r['size']:8.2g} {r['same']:7.4f} {r['held_out']:8.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
