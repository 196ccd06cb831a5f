"""The trtllm backend on a GPU: agreement with hf, a repeated call served from the KV cache, image hashing,
throughput next to native.

    python -m bench.trtllm_check --out DIR [--model /ckpt/Qwen2.5-VL-3B-Instruct] [--quick] [--device cuda]

``--model``: a local Qwen2.5-VL checkpoint (Qwen3-VL when the installed TensorRT-LLM has it). Without it, a
random-weight checkpoint shaped like Qwen2.5-VL-3B (``--random-shape 3b``; ``small`` for a quick look) is built on
the device and saved to a temporary folder first (nothing is downloaded); its tokenizer is the test tokenizer.

Checks, in this order (hf and native first, freed, then TensorRT-LLM, so the two never share the GPU):

1. ``hf`` and ``native`` score the agreement batch (``--images`` images x 4 questions, two of the images the same
   size and differing in one patch); native is timed at 1/4/16 questions per image.
2. ``trtllm`` scores the same batch: max |trtllm - hf| (pass: <= ``--tolerance``, 0.02 for bf16); the call is
   repeated: scores must be identical and the repeat's blocks should come from the cache (hit rate of the repeat,
   from the engine's own statistics); ``image_hashing`` is what TensorRT-LLM's input processor says after the call.
3. ``trtllm`` is timed at 1/4/16 questions per image on fresh images each call (a repeated image would be all cache
   hits and flatter it), next to native on the same images.

Writes ``DIR/trtllm_check.json`` (also when TensorRT-LLM is missing: ``{"skipped": ...}``, exit status 3) and
prints a table, then the JSON line. Exit status 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

QPI = (1, 4, 16)


def _sync(device):
    import torch
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _fresh_batches(n_images, qpi, size, n_calls, seed0):
    from verifier_engine.profiler import synthetic_batch
    return [synthetic_batch(n_images, qpi, size, seed=seed0 + k) for k in range(n_calls)]


def _time(verifier, batches, sync) -> dict:
    """Warm up on the first batch, then time one call per remaining batch (each with new images)."""
    verifier.score(*batches[0])
    sync()
    t0 = time.perf_counter()
    n_q = n_img = 0
    for images, qls in batches[1:]:
        verifier.score(images, qls)
        n_q += sum(len(q) for q in qls)
        n_img += len(images)
    sync()
    wall = time.perf_counter() - t0
    calls = len(batches) - 1
    return {"calls": calls, "seconds_per_call": wall / calls, "questions_per_s": n_q / wall,
            "images_per_s": n_img / wall}


def agreement_batch(n_images: int, size: int):
    """``n_images`` images x 4 questions; images 0 and 1 have the same size and differ in one patch only."""
    from verifier_engine.profiler import synthetic_batch
    images, qls = synthetic_batch(n_images, 4, size, seed=123)
    if n_images >= 2:
        twin = images[0].copy()
        twin[size // 4:size // 2, size // 4:size // 2] = 255 - twin[size // 4:size // 2, size // 4:size // 2]
        images[1], qls[1] = twin, list(qls[0])  # same size, same questions, different pixels
    return images, qls


def random_checkpoint(shape: str, device: str, folder: str) -> str:
    import torch

    from verifier_engine.testing import build_tiny
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok, ip = build_tiny("qwen2_5_vl", shape, seed=0, dtype=dtype, device=device, max_pixels=1024 * 1024)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ip.save_pretrained(folder)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def run(args) -> dict:
    import numpy as np
    import torch
    import transformers

    from verifier_engine.backends.hf import HFVerifier
    from verifier_engine.backends.native import NativeVerifier
    from verifier_engine.backends.trtllm import TRTLLMVerifier, import_trtllm

    trt = import_trtllm()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sync = _sync(device)
    dtype = "bfloat16" if device == "cuda" else "float32"
    n_img, size = (2, 224) if args.quick else (args.images, args.image_size)
    n_calls = 3 if args.quick else 6
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": dtype,
              "versions": {"tensorrt_llm": getattr(trt, "__version__", None), "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()},
              "tolerance": args.tolerance, "checks": {}, "throughput": []}
    tmp = None
    model = args.model
    if not model:
        tmp = tempfile.TemporaryDirectory(prefix="trtllm-check-")
        model = random_checkpoint(args.random_shape, device, tmp.name)
        report["model"] = f"random-weight Qwen2.5-VL shape {args.random_shape!r}"
    else:
        report["model"] = model
    images, qls = agreement_batch(n_img, size)
    fresh = {q: _fresh_batches(n_img, q, size, n_calls, seed0=1000 * q) for q in QPI}

    # 1. hf oracle and native
    hf = HFVerifier.from_pretrained(model, device=device, dtype=dtype)
    ref = np.array(hf.score(images, qls), dtype=float)
    del hf
    native = NativeVerifier.from_pretrained(model, device=device, dtype=dtype)
    native_scores = np.array(native.score(images, qls), dtype=float)
    report["checks"]["native_vs_hf_max_abs_diff"] = float(np.abs(native_scores - ref).max())
    for q in QPI:
        report["throughput"].append(dict(backend="native", questions_per_image=q, images_per_call=n_img,
                                         image_size=size, **_time(native, fresh[q], sync)))
    del native
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    # 2. trtllm: agreement, repeat from the cache, image hashing
    t0 = time.perf_counter()
    llm_kwargs = json.loads(args.llm_kwargs) if args.llm_kwargs else None
    v = TRTLLMVerifier.from_pretrained(model, kv_cache_fraction=args.kv_cache_fraction, llm_kwargs=llm_kwargs)
    report["trtllm_startup_s"] = time.perf_counter() - t0
    got = np.array(v.score(images, qls), dtype=float)
    before = v.backend_metrics()
    again = np.array(v.score(images, qls), dtype=float)
    time.sleep(0.5)  # the engine's last iteration statistics arrive asynchronously
    v._poll_stats(timeout=2.0)
    after = v.backend_metrics()
    reused = after["kv_cache_reused_blocks"] - before["kv_cache_reused_blocks"]
    missed = after["kv_cache_missed_blocks"] - before["kv_cache_missed_blocks"]
    c = report["checks"]
    c["trtllm_vs_hf_max_abs_diff"] = float(np.abs(got - ref).max())
    c["trtllm_agrees_with_hf"] = c["trtllm_vs_hf_max_abs_diff"] <= args.tolerance
    c["twin_images_scores"] = {"image0": got[0].tolist(), "image1_same_size_one_patch_changed": got[1].tolist(),
                               "hf_image0": ref[0].tolist(), "hf_image1": ref[1].tolist()} if n_img >= 2 else None
    c["repeat_max_abs_diff"] = float(np.abs(again - got).max())
    c["repeat_identical"] = bool(np.array_equal(again, got))
    c["repeat_hit_rate"] = reused / (reused + missed) if reused + missed else None
    c["repeat_hit"] = bool(reused > 0)
    c["image_hashing"] = v.image_hashing()
    c["backend_metrics_after_repeat"] = after
    report["trtllm_settings"] = {"max_num_tokens": getattr(getattr(v.llm, "args", None), "max_num_tokens", None),
                                 "longest_prompt": v.longest_prompt, "kv_cache_fraction": args.kv_cache_fraction,
                                 "architecture": v.architecture}
    # 3. throughput on fresh images
    for q in QPI:
        m0 = v.backend_metrics()
        row = dict(backend="trtllm", questions_per_image=q, images_per_call=n_img, image_size=size,
                   **_time(v, fresh[q], sync))
        m1 = v.backend_metrics()
        r = m1["kv_cache_reused_blocks"] - m0["kv_cache_reused_blocks"]
        m = m1["kv_cache_missed_blocks"] - m0["kv_cache_missed_blocks"]
        row["kv_cache_hit_rate"] = r / (r + m) if r + m else None
        report["throughput"].append(row)
    v.close()
    if tmp is not None:
        tmp.cleanup()
    by = {(r["backend"], r["questions_per_image"]): r["questions_per_s"] for r in report["throughput"]}
    report["trtllm_vs_native"] = {f"at_{q}": by[("trtllm", q)] / by[("native", q)] for q in QPI}
    report["passed"] = bool(c["trtllm_agrees_with_hf"] and c["repeat_identical"] and c["repeat_hit"]
                            and c["image_hashing"] is not False)
    return report


def table(report: dict) -> str:
    c = report["checks"]
    lines = [f"device: {report['device']}  dtype: {report['dtype']}  TensorRT-LLM {report['versions']['tensorrt_llm']}"
             f"  model: {report['model']}",
             f"max |trtllm - hf| = {c['trtllm_vs_hf_max_abs_diff']:.4f} (tolerance {report['tolerance']}): "
             f"{'ok' if c['trtllm_agrees_with_hf'] else 'FAILED'}; max |native - hf| = "
             f"{c['native_vs_hf_max_abs_diff']:.4f}",
             f"repeat: identical={c['repeat_identical']} (max diff {c['repeat_max_abs_diff']:.2e}), KV hit rate "
             f"{c['repeat_hit_rate']}; image hashing: {c['image_hashing']}",
             f"{'backend':<8} {'q/img':>5} {'questions/s':>12} {'ms/call':>9} {'kv hit':>7}"]
    for r in report["throughput"]:
        hit = r.get("kv_cache_hit_rate")
        lines.append(f"{r['backend']:<8} {r['questions_per_image']:>5} {r['questions_per_s']:12.1f} "
                     f"{r['seconds_per_call'] * 1000:9.1f} {'' if hit is None else f'{hit:7.2f}'}")
    lines.append("trtllm / native: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["trtllm_vs_native"].items()))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trtllm_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for trtllm_check.json")
    ap.add_argument("--model", help="local Qwen2.5-VL checkpoint (default: a random-weight one, see --random-shape)")
    ap.add_argument("--random-shape", default="3b", choices=("small", "3b"))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="for hf and native")
    ap.add_argument("--images", type=int, default=8, help="images per call")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--tolerance", type=float, default=0.02, help="max |trtllm - hf| (bf16)")
    ap.add_argument("--kv-cache-fraction", type=float, default=0.6)
    ap.add_argument("--llm-kwargs", help="JSON object of extra tensorrt_llm.LLM arguments")
    ap.add_argument("--quick", action="store_true", help="2 images of 224 px, 2 timed calls")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trtllm_check.json")
    try:
        import tensorrt_llm  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA install raising something else at import
        report = {"skipped": f"tensorrt_llm does not import here: {type(e).__name__}: {e}"}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"SKIPPED: {report['skipped']}")
        print(json.dumps(report))
        return 3
    report = run(args)
    report["command"] = " ".join(["python -m bench.trtllm_check"] + list(sys.argv[1:] if argv is None else argv))
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(table(report))
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
