"""Verifier throughput: native (shared prefix) vs hf (one forward per question) vs hf batched without prefix sharing.

    python -m bench.verifier [--quick] [--out bench/results/verifier_cpu.json] [--device auto|cpu|cuda]

Random-weight models built from configs (nothing downloaded): on CPU the "small" Qwen2.5-VL / Qwen3-VL shapes of
``verifier_engine.testing.SHAPES`` (hidden 256, 4 layers, 448 px images); on CUDA models shaped like Qwen2.5-VL-3B
and Qwen3-VL-2B in bfloat16 (512 px images). For 1, 4, 16 and 32 questions per image, each backend scores the same
images; questions/s = questions scored / wall time over at least ``min_time`` seconds after a warm-up call.
Also reports native-vs-hf agreement (max |difference| at 4 questions per image) and the speedup at 16 questions per
image against the targets (8x on GPU, 3x on CPU). A time budget (default 150 s) skips what would not fit, so the GPU
run stays inside bench/gpu_check.sh's budget. Prints a table, then one JSON line
``{"results": [{"backend", "questions_per_image", "questions_per_s", ...}, ...], "device": ...}`` last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

QPI = (1, 4, 16, 32)
MEASURE_ORDER = (16, 4, 1, 32)
TARGET = {"cuda": 8.0, "cpu": 3.0}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def plan(device: str, quick: bool) -> dict:
    if device == "cuda":
        return dict(families=[("qwen2_5_vl", "3b"), ("qwen3_vl", "2b")], images=2 if quick else 8, size=512,
                    min_time=0.5 if quick else 1.0, max_calls=10)
    return dict(families=[("qwen2_5_vl", "small")] + ([] if quick else [("qwen3_vl", "small")]),
                images=2, size=448, min_time=0.3 if quick else 1.0, max_calls=10)


def measure(verifier, images, qls, min_time: float, max_calls: int, sync, full_warmup: bool = True) -> dict:
    """Warm up (the whole call, or one image: enough for the baselines' kernels), then time whole calls."""
    verifier.score(images, qls) if full_warmup else verifier.score(images[:1], qls[:1])
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < max_calls:
        verifier.score(images, qls)
        calls += 1
        sync()
        if time.perf_counter() - t0 >= min_time:
            break
    wall = time.perf_counter() - t0
    n_q = calls * sum(len(q) for q in qls)
    return {"calls": calls, "seconds_per_call": wall / calls, "questions_per_s": n_q / wall,
            "images_per_s": calls * len(images) / wall}


def run(args) -> dict:
    import numpy as np
    import torch
    import transformers

    from verifier_engine.backends.hf import HFVerifier
    from verifier_engine.backends.native import NativeVerifier
    from verifier_engine.profiler import synthetic_batch
    from verifier_engine.testing import build_tiny
    from verifier_engine.vlm import VLBundle

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    p = plan(device, args.quick)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    deadline = time.perf_counter() + args.time_budget
    results, agreement, speedups, models = [], {}, {}, {}
    for family, shape in p["families"]:
        try:
            model, tok, ip = build_tiny(family, shape, seed=0, dtype=dtype, device=device, max_pixels=1024 * 1024)
            bundle = VLBundle(model, tok, ip)
            backends = {"native": NativeVerifier(bundle), "hf": HFVerifier(bundle),
                        "hf_batched": HFVerifier(bundle, batch_size=16)}
            images, q4 = synthetic_batch(p["images"], 4, p["size"], seed=1)
            ref = np.array(backends["hf"].score(images, q4)).ravel()
            agreement[family] = float(np.abs(np.array(backends["native"].score(images, q4)).ravel() - ref).max())
            models[family] = (shape, backends)
        except Exception as e:  # report and go on: a partial report beats none inside a shared GPU budget
            results.append({"family": family, "shape": shape, "backend": None, "questions_per_image": None,
                            "questions_per_s": None, "error": f"{type(e).__name__}: {e}"})
    for qpi in MEASURE_ORDER:  # the target's point first, so a tight budget still reports it for every family
        for family, (shape, backends) in models.items():
            images, qls = synthetic_batch(p["images"], qpi, p["size"], seed=qpi)
            for name, v in backends.items():
                row = {"backend": name, "family": family, "shape": shape, "questions_per_image": qpi,
                       "images_per_call": len(images), "image_size": p["size"]}
                if time.perf_counter() > deadline:
                    results.append(dict(row, skipped="time budget", questions_per_s=None))
                    continue
                try:
                    results.append(dict(row, **measure(v, images, qls, p["min_time"], p["max_calls"], sync,
                                                       full_warmup=name == "native")))
                except Exception as e:  # e.g. out of memory: record it, keep measuring the rest
                    results.append(dict(row, error=f"{type(e).__name__}: {e}", questions_per_s=None))
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                r = results[-1]
                if name == "native":
                    r["cuda_graphs"] = bool(v.graphs is not None and not v.graphs.disabled and v.graphs.replays)
                print(f"{family:<11} {shape:<5} {name:<10} q/img={qpi:<3} {r['questions_per_s']:10.1f} q/s "
                      f"{r['seconds_per_call'] * 1000:9.1f} ms/call", file=sys.stderr, flush=True)
    results.sort(key=lambda r: (str(r["family"]), r["questions_per_image"] or 0))
    for family in models:
        by = {(r["backend"], r["questions_per_image"]): r.get("questions_per_s") for r in results
              if r["family"] == family}
        speedups[family] = {f"native_vs_{b}_at_{q}": (by[("native", q)] / by[(b, q)])
                            if by.get(("native", q)) and by.get((b, q)) else None
                            for b in ("hf", "hf_batched") for q in QPI}
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu {cpu_name()}"
    at16 = [s["native_vs_hf_at_16"] for s in speedups.values() if s["native_vs_hf_at_16"]]
    return {"results": results, "device": name, "device_type": device,
            "speedups": speedups, "target_native_vs_hf_at_16": TARGET[device],
            "target_met": bool(at16) and min(at16) >= TARGET[device],
            "max_abs_diff_native_vs_hf_at_4": agreement, "dtype": str(dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads() if device == "cpu" else None,
            "command": " ".join(["python -m bench.verifier"] + (args.argv or [])),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()}, "git_commit": git_commit()}


def table(report: dict) -> str:
    lines = [f"device: {report['device']}  dtype: {report['dtype']}",
             f"{'family':<11} {'backend':<10} {'q/img':>5} {'questions/s':>12} {'ms/call':>9}"]
    for r in report["results"]:
        if r.get("error"):
            lines.append(f"{r['family']:<11} {str(r['backend']):<10} {str(r['questions_per_image']):>5} "
                         f"error: {r['error'][:80]}")
            continue
        qps = f"{r['questions_per_s']:12.1f}" if r.get("questions_per_s") else f"{'skipped':>12}"
        ms = f"{r['seconds_per_call'] * 1000:9.1f}" if r.get("seconds_per_call") else f"{'':>9}"
        lines.append(f"{r['family']:<11} {r['backend']:<10} {r['questions_per_image']:>5} {qps} {ms}")
    for fam, s in report["speedups"].items():
        lines.append(f"{fam}: native vs hf " + ", ".join(
            f"{q}q {s[f'native_vs_hf_at_{q}']:.1f}x" for q in QPI if s[f"native_vs_hf_at_{q}"]))
    lines.append(f"target native/hf at 16 q/img >= {report['target_native_vs_hf_at_16']}x: "
                 f"{'met' if report['target_met'] else 'NOT met'}; max |native - hf| at 4 q/img: "
                 f"{report['max_abs_diff_native_vs_hf_at_4']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verifier", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and shorter timing (CI)")
    ap.add_argument("--out", help="write the JSON report here (default bench/results/verifier_<cpu|cuda>.json)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--time-budget", type=float, default=150.0, help="seconds; later measurements are skipped")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    report = run(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"verifier_{report['device_type']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(table(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
