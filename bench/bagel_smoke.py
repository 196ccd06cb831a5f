"""BAGEL-7B-MoT on one GPU: does the adapter work on real weights, and what does a training step cost?

Two modes (docs/bagel.md):

``--model DIR`` (real weights, a local BAGEL-7B-MoT folder):
  1. load time and memory;
  2. a sample with and without think text at ``--resolution`` (PNGs in ``--images``);
  3. an RT2I rollout of ``--group`` samples, replayed at once: the distribution of ``|logp_replay - logp_rollout|``
     over think tokens, and of ``|ratio - 1|`` per image step against the 1e-5 clip (bf16 drift);
  4. one LoRA GRPO step of the ``bagel_rt2i`` recipe (G = ``--group``, a brightness stub verifier: the cost, not the
     learning) with its time split and peak memory;
  5. one SRR round: the initial image (no think), a reflection with think, the refined image (both PNGs saved).
``--random 7b`` (no weights): a randomly initialised BAGEL-7B-MoT-shaped model in bf16: rollout and replay seconds
  per sample at 512 px, peak memory of the replay of one G = ``--group`` chunk with gradient checkpointing, and the
  same drift figure. ``--random tiny`` runs the same code on the tiny test model (a CPU check of this script).

Prints a table and, last, one JSON line; writes the JSON to ``--out``.

    python -m bench.bagel_smoke --model /ckpt/BAGEL-7B-MoT --out bench/results/bagel_smoke_h200.json
    python -m bench.bagel_smoke --random 7b --out bench/results/bagel_random_h200.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["A tree in front partially hides a bench behind it", "Three red apples on a blue plate, no bananas",
           "A cat sitting to the left of a dog under a yellow umbrella", "The word HELLO written in the sand"]
CLIP = 1e-5


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _quantiles(x: torch.Tensor) -> dict:
    x = x.detach().double().flatten().cpu()
    if x.numel() == 0:
        return {}
    q = torch.quantile(x, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"n": x.numel(), "mean": float(x.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": float(x.max())}


def _save(img: np.ndarray, path: Path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _cfg(args):
    from alphagrpo.train.config import apply_overrides, get_recipe
    c = get_recipe("bagel_rt2i")
    c.device = args.device
    over = [f"group_size={args.group}", f"micro_batch={args.group}", "prompts_per_step=1",
            f"max_think_tokens={args.think_tokens}"] + list(args.set)
    return apply_overrides(c, over)


def drift(policy, cfg, records, gen) -> dict:
    """Roll out one group and replay it immediately (grad on, as in training): think-token |delta logp| and
    |ratio - 1| per image step."""
    from alphagrpo import kernels
    from alphagrpo.kernels.sde import sde_mean_std
    from alphagrpo.rewards import DVReward
    from alphagrpo.sampler import sde_step_logprob
    from alphagrpo.models.bagel.testing import BrightnessJudge
    from alphagrpo.train.trainer import GRPOTrainer
    tr = GRPOTrainer(policy, DVReward(BrightnessJudge()), cfg, generator=gen)
    try:
        _sync()
        t0 = time.perf_counter()
        chunks, *_ = tr.rollout(records, srr=False)
        _sync()
        t_roll = time.perf_counter() - t0
        for ro in chunks:
            ro.reward_future.result()
        dtext, dimg, steps = [], [], []
        _reset_peak()
        t0 = time.perf_counter()
        for ro in chunks:
            rep = policy.think_replay(ro.requests, ro.think)
            old = torch.cat(ro.think_logp).to(rep.hidden.device)
            zeros = torch.zeros(len(ro.requests), device=rep.hidden.device)
            loss, m = kernels.ar_grpo_loss(rep.hidden, rep.weight, rep.targets, old, zeros, rep.cu_seqlens)
            loss.backward()
            dtext.append((m["logp"].detach() - old).abs())
            cond = policy.image_condition(ro.requests, ro.think, cfg.cfg)
            for st in ro.steps:
                v = policy.velocity(st.x, st.sigma, cond)
                mean, std = sde_mean_std(st.x, v, st.sigma, st.sigma_next, cfg.sampler.noise_level)
                lp = sde_step_logprob(st.prev, mean, std)
                lp.sum().backward()
                r = (lp.detach() - st.logp.to(lp.device)).exp()
                dimg.append((r - 1).abs())
                steps.append({"k": st.k, "sigma": st.sigma, **_quantiles((r - 1).abs())})
        _sync()
        t_replay = time.perf_counter() - t0
        n = sum(len(ro.requests) for ro in chunks)
        ratio = torch.cat(dimg) if dimg else torch.zeros(0)
        return {"rollout_s_per_sample": t_roll / n, "replay_s_per_sample": t_replay / n,
                "replay_peak_gib": _peak_gib(), "samples": n,
                "think_tokens": int(sum(len(t) for ro in chunks for t in ro.think)),
                "think_abs_dlogp": _quantiles(torch.cat(dtext)),
                "image_abs_ratio_minus_1": _quantiles(ratio),
                "image_frac_beyond_clip": float((ratio > CLIP).float().mean()) if ratio.numel() else None,
                "per_step": steps}
    finally:
        for p in policy.trainable_parameters():
            p.grad = None
        tr.close()


def real(args, out: dict):
    from alphagrpo.models.policy import GenRequest
    from alphagrpo.models.registry import ModelConfig, load_policy
    from alphagrpo.sampler import sample_flow
    from alphagrpo.train.srr import reflection_instruction
    imgs = Path(args.images)
    _reset_peak()
    t0 = time.perf_counter()
    pol = load_policy(ModelConfig(kind="bagel", path=args.model, dtype="bfloat16", gradient_checkpointing=True,
                                  attention=args.attention, options=(f"resolution={args.resolution}",)), args.device)
    _sync()
    out["load_s"], out["load_peak_gib"] = time.perf_counter() - t0, _peak_gib()
    cfg = _cfg(args)
    gen = torch.Generator().manual_seed(args.seed)
    req = [GenRequest(PROMPTS[0])]
    for think in (False, True):
        _sync()
        t0 = time.perf_counter()
        th = pol.sample_think(req, generator=gen, max_new_tokens=args.think_tokens) if think else None
        cond = pol.image_condition(req, None if th is None else th.tokens, cfg.cfg)
        x, _ = sample_flow(pol, cond, 1, num_steps=cfg.sampler.eval_steps, shift=cfg.sampler.shift,
                           noise_level=0.0, generator=gen, device=pol.device)
        img = pol.decode(x)[0]
        _sync()
        key = "sample_think" if think else "sample"
        out[key] = {"s": time.perf_counter() - t0, "think": th.texts[0] if th else None,
                    "png": str(imgs / f"{key}.png")}
        _save(img, imgs / f"{key}.png")
    records = [{"prompt": PROMPTS[1], "semantic_questions": [{"question": "is the image bright ?", "tag": "Attribute"}],
                "quality_questions": [{"question": "is the image bright ?", "tag": "Aesthetics"}]}]
    pol.enable_lora(cfg.lora.rank, cfg.lora.alpha, seed=cfg.seed)
    out["drift"] = drift(pol, cfg, records, gen)
    from alphagrpo.rewards import DVReward
    from alphagrpo.models.bagel.testing import BrightnessJudge
    from alphagrpo.train.trainer import GRPOTrainer
    tr = GRPOTrainer(pol, DVReward(BrightnessJudge()), cfg, generator=gen)
    try:
        _reset_peak()
        m = tr.step(records).metrics
        out["grpo_step"] = {k: m[k] for k in ("time_rollout", "time_reward_wait", "time_train", "samples_per_s",
                                              "skipped") if k in m}
        out["grpo_step"]["peak_gib"] = _peak_gib()
    finally:
        tr.close()
    init = pol.decode(sample_flow(pol, pol.image_condition(req, None, cfg.cfg), 1, num_steps=cfg.srr.num_steps,
                                  shift=cfg.sampler.shift, noise_level=0.0, generator=gen, device=pol.device)[0])[0]
    ref = [GenRequest(PROMPTS[0], image=init, instruction=reflection_instruction(PROMPTS[0]))]
    th = pol.sample_think(ref, generator=gen, max_new_tokens=args.think_tokens)
    x, _ = sample_flow(pol, pol.image_condition(ref, th.tokens, cfg.cfg_refine), 1, num_steps=cfg.srr.num_steps,
                       shift=cfg.sampler.shift, noise_level=0.0, generator=gen, device=pol.device)
    _save(init, imgs / "srr_initial.png")
    _save(pol.decode(x)[0], imgs / "srr_refined.png")
    out["srr"] = {"reflection": th.texts[0], "pngs": [str(imgs / "srr_initial.png"), str(imgs / "srr_refined.png")]}


def random_model(args, out: dict):
    from alphagrpo.models.bagel import testing as T
    from alphagrpo.models.bagel.attention import set_attention
    from alphagrpo.models.bagel.policy import BagelPolicy
    set_attention(args.attention)
    tok = T.tiny_tokenizer()
    special = {k: tok.convert_tokens_to_ids(v) for k, v in T.SPECIAL.items()}
    if args.random == "7b":
        shapes = dict(llm=T.BAGEL_7B_LLM, vit=T.BAGEL_7B_VIT, ae=T.BAGEL_7B_AE, max_latent=64, vit_side=70)
        dtype, res = torch.bfloat16, args.resolution
    else:
        shapes = dict(llm=T.TINY_LLM, vit=T.TINY_VIT, ae=T.TINY_AE, max_latent=T.TINY_MAX_LATENT,
                      vit_side=T.TINY_VIT_SIDE)
        dtype, res = torch.bfloat16, T.TINY_RESOLUTION
    out["resolution"] = res
    _reset_peak()
    t0 = time.perf_counter()
    bagel, vae = T.random_bagel(**shapes, tokenizer=tok, seed=args.seed, device=args.device, dtype=dtype)
    pol = BagelPolicy(bagel.eval(), vae.float().eval(), tok, special, resolution=res, gradient_checkpointing=True)
    _sync()
    out["build_s"], out["build_peak_gib"] = time.perf_counter() - t0, _peak_gib()
    out["parameters_b"] = sum(p.numel() for p in bagel.parameters()) / 1e9
    cfg = _cfg(args)
    pol.enable_lora(cfg.lora.rank, cfg.lora.alpha, seed=cfg.seed)
    out["lora_parameters_m"] = sum(p.numel() for p in pol.trainable_parameters()) / 1e6
    records = [{"prompt": PROMPTS[0], "semantic_questions": [{"question": "is the image bright ?", "tag": "A"}],
                "quality_questions": [{"question": "is the image bright ?", "tag": "B"}]}]
    out["drift"] = drift(pol, cfg, records, torch.Generator().manual_seed(args.seed))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model", help="a local BAGEL-7B-MoT folder")
    mode.add_argument("--random", choices=("7b", "tiny"), help="random weights of this shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--group", type=int, default=14, help="G: samples rolled out and replayed together")
    p.add_argument("--think-tokens", type=int, default=256, help="think length limit")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "flash"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="bagel_rt2i overrides")
    p.add_argument("--images", default="bench/results/bagel_smoke", help="folder for the PNGs (--model)")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    out = {"mode": "real" if args.model else f"random-{args.random}", "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
           "torch": torch.__version__, "commit": commit, "group": args.group, "resolution": args.resolution,
           "think_tokens_limit": args.think_tokens}
    t0 = time.perf_counter()
    (real if args.model else random_model)(args, out)
    out["total_s"] = time.perf_counter() - t0
    d = out.get("drift", {})
    rows = [("rollout s/sample", d.get("rollout_s_per_sample")), ("replay s/sample", d.get("replay_s_per_sample")),
            ("replay peak GiB", d.get("replay_peak_gib")),
            ("think |dlogp| p50/p99/max", "/".join(f"{d.get('think_abs_dlogp', {}).get(k, float('nan')):.2e}"
                                                  for k in ("p50", "p99", "max"))),
            ("image |r-1| p50/p99/max", "/".join(f"{d.get('image_abs_ratio_minus_1', {}).get(k, float('nan')):.2e}"
                                                for k in ("p50", "p99", "max"))),
            ("image |r-1| > 1e-5", d.get("image_frac_beyond_clip"))]
    for name, value in rows:
        print(f"{name:28s} {value if isinstance(value, str) else ('-' if value is None else f'{value:.4g}')}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
