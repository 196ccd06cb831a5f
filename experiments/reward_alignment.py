"""Does a reward rank a GRPO group the way the ground truth does?

    python -m experiments.reward_alignment [--prompts 64] [--group 8] [--out experiments/results/reward_alignment_cpu.json]

From a checkpoint (default: the shipped TinyUMM), draw ``--group`` samples (think text at temperature 1, ODE
images) for each of ``--prompts`` RL prompts, judge each image with the world's strict judge (the evaluation's
ground truth), and score it with several rewards. GRPO only sees differences inside a group, so for every group
with both correct and wrong images the report gives, per reward: the pairwise agreement (the share of
(correct, wrong) pairs where the correct image scores higher; ties count half; 0.5 is a reward that carries no
signal about correctness) and the mean group-normalized advantage of the correct images. Also the mean semantic
and quality halves of correct and wrong images, to show which half pays for being wrong.

Rewards: ``dvreward`` (the recipe's sqrt(S * Q)), ``arithmetic``, ``semantic`` (S alone), ``quality`` (Q alone),
and the same three with the quality half scored by per-object quality
questions averaged over objects instead of required of every object (``*_objmean``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def pairwise_agreement(rewards: np.ndarray, correct: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Share of (correct, wrong) pairs inside a group where the correct one scores higher (ties half)."""
    wins, pairs = 0.0, 0
    for g in np.unique(groups):
        m = groups == g
        r, c = rewards[m], correct[m]
        pos, neg = r[c], r[~c]
        if len(pos) == 0 or len(neg) == 0:
            continue
        diff = pos[:, None] - neg[None, :]
        wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        pairs += diff.size
    return (wins / pairs if pairs else float("nan")), pairs


def correct_advantage(rewards: np.ndarray, correct: np.ndarray, groups: np.ndarray) -> float:
    """Mean (r - group mean) / global std of the correct images, over mixed groups (the recipe's normalization)."""
    std = rewards.std() + 1e-6
    adv = np.zeros_like(rewards)
    for g in np.unique(groups):
        m = groups == g
        adv[m] = (rewards[m] - rewards[m].mean()) / std
    mixed = np.array([correct[groups == g].any() and not correct[groups == g].all() for g in groups])
    sel = mixed & correct
    return float(adv[sel].mean()) if sel.any() else float("nan")


def main(argv=None) -> int:
    from alphagrpo.models.policy import GenRequest
    from alphagrpo.models.registry import ModelConfig, load_policy
    from alphagrpo.train.config import get_recipe
    from alphagrpo.eval.evaluate import generate
    from alphagrpo.worlds.registry import load_world

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "test"), default="train", help="RL prompts (default) or held-out")
    p.add_argument("--out", default="experiments/results/reward_alignment_cpu.json")
    args = p.parse_args(argv)

    t0 = time.time()
    cfg = get_recipe("tiny_shapes")
    world = load_world(cfg.data)
    policy = load_policy(ModelConfig(path=args.checkpoint), cfg.device, world=world)
    pool = world.train if args.split == "train" else world.test
    rng = np.random.default_rng(args.seed)
    records = [pool[i] for i in rng.choice(len(pool), size=min(args.prompts, len(pool)), replace=False)]
    rows = [r for r in records for _ in range(args.group)]
    groups = np.repeat(np.arange(len(records)), args.group)
    g = torch.Generator().manual_seed(args.seed)
    images, _ = generate(policy, [GenRequest(r["prompt"]) for r in rows], num_steps=cfg.sampler.eval_steps,
                         shift=cfg.sampler.shift, cfg=cfg.cfg, generator=g, batch=cfg.eval_batch,
                         max_think_tokens=cfg.max_think_tokens)
    correct = np.array([bool(world.judge(img, r)) for img, r in zip(images, rows)])
    from alphagrpo.worlds.shapes import ShapesVerifier
    v, v_mean = ShapesVerifier(), ShapesVerifier(quality_per_object="mean")
    sem, qua, qua_mean = [], [], []
    for img, r in zip(images, rows):
        sq = [q["question"] if isinstance(q, dict) else q for q in r["semantic_questions"]]
        qq = [q["question"] if isinstance(q, dict) else q for q in r["quality_questions"]]
        scores = v.score([img], [sq + qq])[0]          # one detector pass per image for both halves
        sem.append(float(np.mean(scores[:len(sq)])))
        qua.append(float(np.mean(scores[len(sq):])))
        qua_mean.append(float(np.mean(v_mean.score([img], [qq])[0])))
    sem, qua = np.array(sem), np.array(qua)
    rewards = {"dvreward": np.sqrt(sem * qua), "arithmetic": 0.5 * (sem + qua), "semantic": sem, "quality": qua}
    qm = np.array(qua_mean)
    rewards.update({"dvreward_objmean": np.sqrt(sem * qm), "arithmetic_objmean": 0.5 * (sem + qm),
                    "quality_objmean": qm})
    n_mixed = sum(1 for gi in range(len(records)) if 0 < correct[groups == gi].sum() < args.group)
    report = {"bench": "reward_alignment", "checkpoint": args.checkpoint or "shipped", "split": args.split,
              "prompts": len(records), "group": args.group, "seed": args.seed, "accuracy": float(correct.mean()),
              "mixed_groups": n_mixed,
              "halves": {"correct": {"semantic": float(sem[correct].mean()), "quality": float(qua[correct].mean())},
                         "wrong": {"semantic": float(sem[~correct].mean()), "quality": float(qua[~correct].mean())}},
              "rewards": {}}
    print(f"{len(records)} prompts x {args.group}: accuracy {correct.mean():.3f}, {n_mixed} mixed groups; "
          f"semantic/quality correct {sem[correct].mean():.3f}/{qua[correct].mean():.3f}, "
          f"wrong {sem[~correct].mean():.3f}/{qua[~correct].mean():.3f}")
    print(f"{'reward':<22}{'pairwise':>10}{'pairs':>8}{'adv(correct)':>14}")
    for name, r in rewards.items():
        agree, pairs = pairwise_agreement(r, correct, groups)
        adv = correct_advantage(r, correct, groups)
        report["rewards"][name] = {"pairwise_agreement": agree, "pairs": pairs, "correct_advantage": adv}
        print(f"{name:<22}{agree:>10.3f}{pairs:>8d}{adv:>14.3f}")
    report["minutes"] = (time.time() - t0) / 60
    report["command"] = "python -m experiments.reward_alignment " + " ".join(argv or [])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("accuracy", "mixed_groups", "minutes")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
