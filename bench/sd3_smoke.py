"""SD3.5 on a GPU: parity, on-policy drift, memory and step time of a GRPO step, adapter round trip.

    # a user with the real weights (a local stable-diffusion-3.5-medium pipeline folder; nothing is downloaded):
    python -m bench.sd3_smoke --model /path/to/stable-diffusion-3.5-medium --out sd3_smoke.json
    # no weights: a randomly initialised transformer of SD3.5-Medium's shape (2.24B) with tiny text encoders and VAE
    python -m bench.sd3_smoke --random-shape --out bench/results/sd3_random_shape.json --time-budget 80
    # the script itself on a CPU, with the tiny random pipeline of the tests (seconds)
    python -m bench.sd3_smoke --tiny --device cpu --out /tmp/sd3_tiny.json

With ``--model``, per dtype of ``--dtypes`` (default bfloat16,float16): load time; parity of our ODE sampler (the
scheduler's grid) with the stock ``pipe()`` on the same noise at ``--resolution`` (max |latent difference|; the pipeline
keeps half-precision latents between steps, we keep float32, so half precision drifts a little by design); one GRPO
step's rollout (``--group`` samples of one prompt, ``--steps`` steps, an SDE window of ``--window``) and replay with
LoRA r32/alpha64 on: per window step the replay-vs-rollout log-prob difference and ``max |ratio - 1|`` against the
image clip 1e-5 (a drift above it means the on-policy step is already clipped); then, in the first dtype, peak memory
and the time split (rollout / replay / decode) with and without gradient checkpointing, and an adapter round trip (our
loader and a stock ``load_lora_weights``). ``--random-shape`` measures what needs no weights: rollout and replay
throughput and peak memory at 512 px with and without gradient checkpointing, and the LoRA layer counts (191 default,
337 with ``all``). Writes one JSON (``--out``) and prints it as the last line.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a red apple to the left of a blue cup on a wooden table"
CLIP = 1e-5


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev):
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def _versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for m in ("diffusers", "transformers", "peft"):
        try:
            out[m] = __import__(m).__version__
        except ImportError:
            out[m] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def grpo_step(pol, *, group: int, steps: int, window: int, grid: str, seed: int = 0) -> dict:
    """One GRPO step's model work on one prompt x ``group`` samples, as the trainer does it (rollout without grad,
    replay with grad and a backward per window step): times, peak memory, and the on-policy drift per window step."""
    from alphagrpo.kernels import flow_grpo_loss
    from alphagrpo.models.policy import CFGConfig, GenRequest, policy_sigmas
    from alphagrpo.sampler import euler_step, sde_step, sde_step_logprob
    dev = pol.device
    cfg = CFGConfig(text_scale=4.5, low=0.0, high=1.0, renorm=False)
    reqs = [GenRequest(PROMPT)] * group
    sig = policy_sigmas(pol, steps, 3.0, grid)
    gen = torch.Generator().manual_seed(seed)
    _peak_reset(dev)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        cond = pol.image_condition(reqs, None, cfg)
        x = torch.randn((group,) + tuple(pol.latent_shape), generator=gen).to(dev)
        records = []
        for k in range(steps):
            s, sn = float(sig[k]), float(sig[k + 1])
            v = pol.velocity(x, s, cond)
            if k < window:                    # the SDE window: the first `window` steps
                eps = torch.randn(x.shape, generator=gen).to(dev)
                prev, mean, std = sde_step(x, v, s, sn, 0.7, noise=eps)
                records.append((k, x, prev, sde_step_logprob(prev, mean, std), s, sn))
            else:
                prev = euler_step(x, v, s, sn)
            x = prev
    _sync(dev)
    t1 = time.perf_counter()
    images = pol.decode(x)
    _sync(dev)
    t2 = time.perf_counter()
    cond = pol.image_condition(reqs, None, cfg)
    adv = torch.linspace(-1, 1, group, device=dev)
    drift = []
    for k, xk, prev, logp_old, s, sn in records:
        v = pol.velocity(xk, s, cond)
        loss, m = flow_grpo_loss(v, xk, prev, s, sn, 0.7, logp_old, adv, clip=CLIP)
        (loss / len(records)).backward()
        with torch.no_grad():
            _, mean, std = sde_step(xk, v.detach(), s, sn, 0.7, noise=torch.zeros_like(xk))
            d = (sde_step_logprob(prev, mean, std) - logp_old).abs().max().item()
        r = max(abs(m["ratio_max"].item() - 1), abs(m["ratio_min"].item() - 1))
        drift.append({"step": k, "logp_abs_diff_max": d, "ratio_abs_dev_max": r, "within_clip": r < CLIP})
    _sync(dev)
    t3 = time.perf_counter()
    for p in pol.trainable_parameters():
        p.grad = None
    return {"group": group, "steps": steps, "window": window, "grid": grid, "image_shape": list(images.shape),
            "time_rollout_s": t1 - t0, "time_decode_s": t2 - t1, "time_replay_s": t3 - t2,
            "rollout_samples_per_s": group / (t1 - t0), "replay_samples_per_s": group / (t3 - t2),
            "peak_gib": _peak_gib(dev), "drift": drift,
            "drift_logp_max": max(d["logp_abs_diff_max"] for d in drift),
            "drift_ratio_max": max(d["ratio_abs_dev_max"] for d in drift),
            "all_within_clip": all(d["within_clip"] for d in drift)}


def parity(pol, steps: int, seed: int = 0) -> dict:
    """Our ODE sampler on the scheduler's grid vs the stock ``pipe()`` on the same noise (one prompt)."""
    from alphagrpo.models.policy import CFGConfig, GenRequest
    from alphagrpo.sampler import euler_step
    cfg = CFGConfig(text_scale=4.5, low=0.0, high=1.0, renorm=False)
    dev, R = pol.device, pol.resolution
    x0 = torch.randn((1,) + tuple(pol.latent_shape), generator=torch.Generator().manual_seed(seed)).to(dev)
    sig = pol.sigmas(steps, 3.0)
    with torch.no_grad():
        cond = pol.image_condition([GenRequest(PROMPT)], None, cfg)
        x = x0.clone()
        for k in range(steps):
            x = euler_step(x, pol.velocity(x, float(sig[k]), cond), float(sig[k]), float(sig[k + 1]))
        ref = pol.pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.5, height=R, width=R,
                       latents=x0.to(pol.dtype), output_type="latent",
                       max_sequence_length=pol.max_text_tokens).images.float()
    return {"steps": steps, "latent_abs_diff_max": (x - ref).abs().max().item(),
            "latent_abs_max": ref.abs().max().item()}


def adapter_round_trip(pol, base: str) -> dict:
    """Save non-zero adapters, reload them with our loader and with a stock ``load_lora_weights``: max |dv|."""
    from diffusers import StableDiffusion3Pipeline

    from alphagrpo.models.policy import CFGConfig, GenRequest
    from alphagrpo.models.registry import ModelConfig, load_policy
    cfg = CFGConfig(text_scale=4.5, low=0.0, high=1.0, renorm=False)
    dev = pol.device
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pol.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 1e-3)
        x = torch.randn((2,) + tuple(pol.latent_shape), generator=g).to(dev)
        cond = pol.image_condition([GenRequest(PROMPT)] * 2, None, cfg)
        v = pol.velocity(x, 0.6, cond)
    with tempfile.TemporaryDirectory() as d:
        pol.save_pretrained(d + "/a")
        mc = ModelConfig(kind="sd3", path=d + "/a", dtype=str(pol.dtype).split(".")[-1],
                         max_text_tokens=pol.max_text_tokens, options=(f"resolution={pol.resolution}",))
        ours = load_policy(mc, str(dev))
        with torch.no_grad():
            v_ours = ours.velocity(x, 0.6, ours.image_condition([GenRequest(PROMPT)] * 2, None, cfg))
        del ours
        with warnings.catch_warnings():   # newer diffusers rename torch_dtype to dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusion3Pipeline.from_pretrained(base, torch_dtype=pol.dtype).to(dev)
        pipe.load_lora_weights(d + "/a")
        with torch.no_grad():
            t = torch.full((4,), 600.0, device=dev)
            o = pipe.transformer(hidden_states=torch.cat([x, x]).to(pol.dtype), timestep=t,
                                 encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                                 return_dict=False)[0].float()
        del pipe
    v_stock = o[:2] + 4.5 * (o[2:] - o[:2])
    return {"ours_abs_diff_max": (v_ours - v).abs().max().item(),
            "stock_abs_diff_max": (v_stock - v).abs().max().item(), "velocity_abs_max": v.abs().max().item()}


def timing_pair(pol, args, t_start: float) -> dict:
    out = {}
    for ckpt in (False, True):
        if time.perf_counter() - t_start > args.time_budget:
            out["checkpointing" if ckpt else "no_checkpointing"] = "skipped: time budget"
            continue
        if ckpt:
            pol.transformer.enable_gradient_checkpointing()
        else:
            pol.transformer.disable_gradient_checkpointing()
        try:
            out["checkpointing" if ckpt else "no_checkpointing"] = grpo_step(
                pol, group=args.group, steps=args.steps, window=args.window, grid=args.grid)
        except torch.cuda.OutOfMemoryError as e:      # a smaller GPU: report it and go on with the next setting
            for p in pol.trainable_parameters():
                p.grad = None
            torch.cuda.empty_cache()
            out["checkpointing" if ckpt else "no_checkpointing"] = f"out of memory: {str(e)[:200]}"
    pol.transformer.disable_gradient_checkpointing()
    return out


def run_real(args, dev) -> dict:
    from alphagrpo.models.registry import ModelConfig, load_policy
    report = {"mode": "model", "model": args.model, "per_dtype": {}}
    t_start = time.perf_counter()
    for i, dtype in enumerate(args.dtypes.split(",")):
        if time.perf_counter() - t_start > args.time_budget:
            report["per_dtype"][dtype] = "skipped: time budget"
            continue
        mc = ModelConfig(kind="sd3", path=args.model, dtype=dtype, options=(f"resolution={args.resolution}",))
        t0 = time.perf_counter()
        pol = load_policy(mc, str(dev))
        _sync(dev)
        r = {"load_s": time.perf_counter() - t0, "parity": parity(pol, args.parity_steps)}
        pol.enable_lora(32, 64.0, seed=0)
        r["lora_trainable_params"] = sum(p.numel() for p in pol.trainable_parameters())
        pol.transformer.enable_gradient_checkpointing()     # the drift check needs no speed, only to fit
        try:
            r["grpo_step"] = grpo_step(pol, group=args.group, steps=args.steps, window=args.window, grid=args.grid)
        except torch.cuda.OutOfMemoryError as e:
            r["grpo_step"] = f"out of memory: {str(e)[:200]}"
            torch.cuda.empty_cache()
        pol.transformer.disable_gradient_checkpointing()
        if i == 0:
            r["timing"] = timing_pair(pol, args, t_start)
            r["adapter_round_trip"] = adapter_round_trip(pol, args.model)
        report["per_dtype"][dtype] = r
        del pol
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return report


def random_shape_policy(dev, resolution: int, dtype: torch.dtype, tiny: bool = False):
    """An ``SD3Policy`` whose transformer has SD3.5-Medium's shape and random weights (tiny text encoders and
    VAE); ``tiny`` uses the tests' tiny transformer instead (a CPU check of this script)."""
    from alphagrpo.models.sd3 import SD3Policy
    from alphagrpo.models.sd3_testing import SD35_MEDIUM_TRANSFORMER, tiny_sd3_pipeline
    pipe = tiny_sd3_pipeline(None, resolution=resolution, transformer=None if tiny else SD35_MEDIUM_TRANSFORMER,
                             device=dev)
    return SD3Policy(pipe, resolution=resolution, dtype=dtype, device=dev)


def run_random(args, dev) -> dict:
    dtype = getattr(torch, args.dtypes.split(",")[0])
    t0 = time.perf_counter()
    pol = random_shape_policy(dev, args.resolution, dtype, tiny=args.tiny)
    _sync(dev)
    report = {"mode": "tiny" if args.tiny else "random_shape", "dtype": str(dtype).split(".")[-1],
              "build_s": time.perf_counter() - t0,
              "transformer_params": sum(p.numel() for p in pol.transformer.parameters()),
              "resolution": args.resolution}
    from alphagrpo.models.sd3 import lora_target_names
    counts = {}
    for name, targets in (("default", ()), ("all", ("all",))):
        layers = lora_target_names(pol.transformer, targets)
        mods = dict(pol.transformer.named_modules())
        counts[name] = {"layers": len(layers),
                        "params_r32": sum(32 * (mods[n].in_features + mods[n].out_features) for n in layers)}
    report["lora"] = counts             # SD3.5-Medium: 191 layers / 18.8M, and 337 / 47.0M with "all"
    pol.enable_lora(32, 64.0, seed=0)
    report["timing"] = timing_pair(pol, args, t0)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local StableDiffusion3Pipeline folder (stable-diffusion-3.5-medium)")
    src.add_argument("--random-shape", action="store_true", help="random transformer of SD3.5-Medium's shape")
    src.add_argument("--tiny", action="store_true", help="the tests' tiny random pipeline (checks this script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated (default: bfloat16,float16; tiny: float32)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (tiny: 32)")
    p.add_argument("--group", type=int, default=14)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--grid", default="flow", choices=("flow", "scheduler"))
    p.add_argument("--parity-steps", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds; later dtypes are skipped past it")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        print(json.dumps({"skipped": "diffusers/peft not installed: pip install 'alphagrpo[diffusers]'"}))
        return 0
    dev = torch.device(args.device)
    args.dtypes = args.dtypes or ("float32" if args.tiny else "bfloat16,float16")
    args.resolution = args.resolution or (32 if args.tiny else 512)
    if args.tiny:
        args.group, args.steps, args.window = min(args.group, 4), min(args.steps, 4), min(args.window, 2)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    report = run_real(args, dev) if args.model else run_random(args, dev)
    report.update({"bench": "sd3_smoke", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                   platform.processor() or platform.machine(), "versions": _versions(),
                   "argv": sys.argv[1:] if argv is None else list(argv), "total_s": time.perf_counter() - t0})
    line = json.dumps(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
