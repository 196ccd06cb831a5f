"""Can GRPO on the think text alone fix a checkpoint's plans, given a noise-free reward?

    python -m experiments.plan_rl_probe --checkpoint DIR [--steps 300] [--lr 3e-4] [--prompts 8] [--group 8]
                                  [--level sequence] [--out experiments/results/plan_rl_probe_cpu.json]

The reward of a sampled think text is 1 when the layout it states satisfies the prompt (``World.plan_ok``), else 0:
no image is drawn, so there is no drawing noise and a step costs only the text. GRPO (group advantages, the text
loss of ``alphagrpo.kernels``, AdamW, grad clip 1) on the RL prompts (``data.train_split=unseen``, shuffled), and the
fraction of right plans on ``--eval-n`` held-out prompts and on ``--rl-eval-n`` of the RL prompts before and after (temperature
1, fixed sampling seeds). An upper bound on what the think-text half of RT2I GRPO can learn about plans at a given
budget; a checkpoint that does not reason (empty think texts) scores its empty texts as wrong plans.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def plan_accuracy(policy, world, records, seed: int, batch: int = 128, max_think_tokens: int = 48) -> float:
    import torch

    from alphagrpo.models.policy import GenRequest
    g = torch.Generator().manual_seed(seed)
    ok = []
    for a in range(0, len(records), batch):
        part = records[a:a + batch]
        s = policy.sample_think([GenRequest(r["prompt"]) for r in part], generator=g, max_new_tokens=max_think_tokens)
        ok += [bool(world.plan_ok(t, r)) for t, r in zip(s.texts, part)]
    return sum(ok) / max(len(ok), 1)


def main(argv=None) -> int:
    import torch

    from alphagrpo import kernels
    from alphagrpo.advantages import group_advantages
    from alphagrpo.models.policy import GenRequest
    from alphagrpo.models.registry import ModelConfig, load_policy
    from alphagrpo.train.config import get_recipe
    from alphagrpo.worlds.registry import load_world
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="TinyUMM checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--level", default="sequence", choices=("sequence", "token"))
    p.add_argument("--eval-n", type=int, default=512, help="held-out prompts scored before and after")
    p.add_argument("--rl-eval-n", type=int, default=256, help="RL prompts scored before and after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-task", type=int, default=40, help="RL prompts per task type (the recipe's: 40)")
    p.add_argument("--out", default="experiments/results/plan_rl_probe_cpu.json")
    a = p.parse_args(argv)
    cfg = get_recipe("tiny_shapes")
    cfg.data.test_size = max(cfg.data.test_size, a.eval_n)
    cfg.data.train_per_task = a.train_per_task
    world = load_world(cfg.data)
    if getattr(world, "plan_ok", None) is None:
        raise ValueError("this probe needs a world that reads plans (World.plan_ok)")
    policy = load_policy(ModelConfig(path=a.checkpoint or cfg.model.path), "cpu", world=world)
    test, train = world.test[:a.eval_n], list(world.train)
    t0 = time.time()
    before = {"held_out": plan_accuracy(policy, world, test, 1), "rl_prompts": plan_accuracy(policy, world, train[:a.rl_eval_n], 2)}
    params = list(policy.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(a.seed)
    order = train[:]
    random.Random(a.seed).shuffle(order)
    curve = []
    for step in range(a.steps):
        at = (step * a.prompts) % len(order)
        recs = order[at:at + a.prompts]
        reqs = [GenRequest(r["prompt"]) for r in recs for _ in range(a.group)]
        rows = [r for r in recs for _ in range(a.group)]
        s = policy.sample_think(reqs, generator=g, max_new_tokens=cfg.max_think_tokens)
        reward = torch.tensor([float(world.plan_ok(t, r)) for t, r in zip(s.texts, rows)])
        adv = group_advantages(reward, torch.arange(len(recs)).repeat_interleave(a.group))
        opt.zero_grad(set_to_none=True)
        if (adv != 0).any():
            rep = policy.think_replay(reqs, s.tokens)
            loss, _ = kernels.ar_grpo_loss(rep.hidden, rep.weight, rep.targets, torch.cat(s.logp), adv,
                                           rep.cu_seqlens, level=a.level)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        curve.append(float(reward.mean()))
        if step % 20 == 0:
            print(f"step {step:4d} | plan reward {curve[-1]:.3f} | {time.time() - t0:.0f}s", flush=True)
    after = {"held_out": plan_accuracy(policy, world, test, 1), "rl_prompts": plan_accuracy(policy, world, train[:a.rl_eval_n], 2)}
    res = {"args": vars(a), "before": before, "after": after, "reward_curve": curve, "seconds": time.time() - t0,
           "threads": torch.get_num_threads(), "device": "cpu"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({"before": before, "after": after}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
