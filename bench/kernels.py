"""Microbenchmarks of the fused GRPO kernels against their references: ``python -m bench.kernels [--quick]``.

Prints a table and, last, one JSON line; writes the full report to ``bench/results/kernels_<device>.json`` (and to
``--out``). Forward+backward per call; median wall time (CUDA events on GPU), device-busy time from the profiler where
available, peak extra memory, and throughput as a fraction of a ceiling measured in the same run:
- AR (linear -> log-prob -> GRPO): useful FLOPs ``6 N H V`` (three GEMM-sized passes) per second; the ceiling is the
  three plain bf16 GEMMs of the same shape (``logits = h W^T``, ``dh = dlogits W``, ``dW = dlogits^T h``).
- Flow (SDE step -> log-prob -> GRPO): the bytes it must move (forward reads v, x, prev; backward reads them again and
  writes dL/dv) per second; the ceiling is a device-to-device copy.
Providers: ``eager`` (reference, materialised logits in bf16 as an eager model computes them), ``compile``
(``torch.compile`` of that reference), ``liger`` (Liger-Kernel's fused linear GRPO loss, when installed), ``ours``.
Providers that cannot run say why (listed under ``skipped``). ``--quick`` uses small shapes (CPU friendly; ``make
bench``); a time budget skips whatever is left rather than hang.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GIB = float(1 << 30)

AR_FULL = [(4096, 3584, 152064), (16384, 3584, 152064), (4096, 896, 152064), (16384, 896, 152064)]
AR_QUICK_CPU = [(256, 64, 1000)]
AR_QUICK_GPU = [(2048, 896, 32000)]
FLOW_FULL = [(32, 16 * 64 * 64), (32, 16 * 128 * 128)]
FLOW_QUICK_CPU = [(4, 16 * 16 * 16)]
FLOW_QUICK_GPU = [(32, 16 * 64 * 64)]
SEQ_LEN = 512          # the AR cases pack N / 512 sequences of 512 tokens (Liger needs a padded [B, T] layout)
TARGETS = {"ar_vs_3gemm_max": 1.35, "ar_speedup_vs_liger_min": 1.5, "ar_extra_gib_max": 2.0,
           "flow_frac_copy_min": 0.8, "flow_speedup_vs_eager_min": 3.0}


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn: Callable[[], None], dev: torch.device, warmup: int, reps: int) -> Dict[str, float]:
    """Median wall time in ms (each rep synchronised), peak extra memory in GiB over what was allocated before."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    peak = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / GIB
    return {"ms": statistics.median(times), "peak_gib": peak}


def _device_ms(fn: Callable[[], None], dev: torch.device, reps: int = 3) -> Optional[float]:
    """GPU-busy time per call from the profiler (kernels, copies, fills), free of host launch overhead; None on CPU."""
    if dev.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            _sync(dev)
        total_us = 0.0
        for e in prof.events():
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                total_us += float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0) or 0.0)
        return total_us / reps / 1e3 if total_us > 0 else None
    except Exception:  # the profiler is optional here; the wall time stays the primary number
        return None


def _versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:
            out[mod] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git_dirty_kernels"] = bool(dirty)
    except Exception:
        out["git_commit"] = None
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------------------------------ AR
def _ar_inputs(n: int, h: int, v: int, dev: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = max(1, n // SEQ_LEN)
    t = n // s
    n = s * t
    dt = torch.bfloat16
    hidden = torch.randn(n, h, generator=g).to(dev, dt).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(dev, dt).requires_grad_()
    tokens = torch.randint(0, v, (n,), generator=g).to(dev)
    tokens[t - 7:t] = -100                                           # some padding
    logp_old = (-torch.rand(n, generator=g) * 10).to(dev)
    adv = torch.randn(s, generator=g).to(dev)
    cu = torch.arange(0, n + 1, t).to(dev)
    return dict(hidden=hidden, weight=weight, tokens=tokens, logp_old=logp_old, advantages=adv, cu_seqlens=cu), s, t


def _ar_providers(inp, s, t, dev, wanted, compiled_cache):
    from alphagrpo.kernels import ar_grpo_loss, ar_grpo_loss_ref, use_fused
    hidden, weight = inp["hidden"], inp["weight"]
    n, h = hidden.shape
    v = weight.shape[0]

    def run(loss_fn):
        def call():
            hidden.grad = weight.grad = None
            loss = loss_fn()
            loss.backward()
        return call

    def eager():
        return run(lambda: ar_grpo_loss_ref(**inp, upcast=False)[0])

    def compiled():
        if dev.type != "cuda":
            raise Skip("torch.compile on CPU is left out of the quick run (inductor's C++ build takes minutes here)")
        if "ar" not in compiled_cache:
            compiled_cache["ar"] = torch.compile(lambda **kw: ar_grpo_loss_ref(**kw, upcast=False)[0], dynamic=True)
        fn = compiled_cache["ar"]
        return run(lambda: fn(**inp))

    def liger():
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as e:
            raise Skip(f"liger_kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel") from None
        if dev.type != "cuda":
            raise Skip("Liger-Kernel needs CUDA")
        mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                       loss_type="grpo", importance_sampling_level="sequence")
        x3, tok2 = hidden.view(s, t, h), inp["tokens"].view(s, t)
        mask = (tok2 >= 0).to(torch.int64)
        ids = tok2.clamp(min=0)
        old = inp["logp_old"].view(s, t)

        def loss_fn():
            out = mod(x3, weight, ids, mask, inp["advantages"], old_per_token_logps=old)
            return out[0] if isinstance(out, (tuple, list)) else out
        return run(loss_fn)

    def ours():
        if dev.type != "cuda":
            raise Skip("no CUDA: on CPU the Triton kernels run only in the interpreter, whose timings mean nothing")

        def loss_fn():
            with use_fused(True):
                return ar_grpo_loss(**inp)[0]
        return run(loss_fn)

    def gemm3():
        if dev.type != "cuda":
            raise Skip("the bf16 GEMM ceiling is measured on GPU only")
        hd, wd = hidden.detach(), weight.detach()
        dl = torch.empty(n, v, dtype=hd.dtype, device=dev).normal_()

        def call():
            torch.mm(hd, wd.t())
            torch.mm(dl, wd)
            torch.mm(dl.t(), hd)
        return call

    table = {"gemm3": gemm3, "eager": eager, "compile": compiled, "liger": liger, "ours": ours}
    return [(name, table[name]) for name in table if name == "gemm3" or name in wanted]


# ---------------------------------------------------------------------------------------------------------- flow
def _flow_inputs(b: int, d: int, dev: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (b, 16, d // 16)
    v = torch.randn(shape, generator=g).to(dev, torch.bfloat16).requires_grad_()
    x = torch.randn(shape, generator=g).to(dev, torch.bfloat16)
    prev = torch.randn(shape, generator=g).to(dev)
    logp_old = torch.full((b,), -0.5, device=dev)
    adv = torch.randn(b, generator=g).to(dev)
    inp = dict(v=v, x=x, prev=prev, sigma=0.75, sigma_next=0.6875, noise_level=0.7, logp_old=logp_old,
               advantages=adv)
    moved = b * d * (2 * (v.element_size() + x.element_size() + prev.element_size()) + v.element_size())
    return inp, moved


def _flow_providers(inp, moved, dev, wanted, compiled_cache):
    from alphagrpo.kernels import flow_grpo_loss, flow_grpo_loss_ref, use_fused
    v = inp["v"]

    def run(loss_fn):
        def call():
            v.grad = None
            loss_fn().backward()
        return call

    def eager():
        return run(lambda: flow_grpo_loss_ref(**inp)[0])

    def compiled():
        if dev.type != "cuda":
            raise Skip("torch.compile on CPU is left out of the quick run (inductor's C++ build takes minutes here)")
        if "flow" not in compiled_cache:
            compiled_cache["flow"] = torch.compile(lambda **kw: flow_grpo_loss_ref(**kw)[0], dynamic=True)
        fn = compiled_cache["flow"]
        return run(lambda: fn(**inp))

    def ours():
        if dev.type != "cuda":
            raise Skip("no CUDA: on CPU the Triton kernels run only in the interpreter, whose timings mean nothing")

        def loss_fn():
            with use_fused(True):
                return flow_grpo_loss(**inp)[0]
        return run(loss_fn)

    def copy():
        if dev.type != "cuda":
            raise Skip("the copy-bandwidth ceiling is measured on GPU only")
        src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    table = {"copy": copy, "eager": eager, "compile": compiled, "ours": ours}
    return [(name, table[name]) for name in table if name == "copy" or name in wanted]


# --------------------------------------------------------------------------------------------------------- sweep
SWEEP_TILES = ["128,128,64,8,3", "128,128,64,8,4", "128,256,64,8,3", "64,256,64,4,4", "256,128,64,8,3",
               "128,64,64,4,4"]


def _sweep_ar_tiles(case, dev, deadline, rows, skipped):
    """Time ``ours`` at one AR shape under each ``ALPHAGRPO_AR_TILES`` candidate (tuning aid; GPU only)."""
    if dev.type != "cuda":
        skipped.append({"kind": "ar-sweep", "case": case, "provider": "ours", "reason": "needs CUDA"})
        return
    inp, s, t = _ar_inputs(*case, dev)
    saved = os.environ.get("ALPHAGRPO_AR_TILES")
    try:
        for tiles in SWEEP_TILES:
            os.environ["ALPHAGRPO_AR_TILES"] = tiles
            providers = [(f"ours[{tiles}]", make) for name, make in _ar_providers(inp, s, t, dev, {"ours"}, {})
                         if name == "ours"]
            _measure("ar-sweep", (s * t,) + tuple(case[1:]), providers, dev, 1, 3, deadline, rows, skipped)
    finally:
        if saved is None:
            os.environ.pop("ALPHAGRPO_AR_TILES", None)
        else:
            os.environ["ALPHAGRPO_AR_TILES"] = saved


# ---------------------------------------------------------------------------------------------------------- main
def _measure(kind, case, providers, dev, warmup, reps, deadline, rows, skipped):
    for name, make in providers:
        if time.monotonic() > deadline:
            skipped.append({"kind": kind, "case": case, "provider": name, "reason": "time budget spent"})
            continue
        try:
            fn = make()
            res = _time(fn, dev, warmup, reps)
            res["device_ms"] = _device_ms(fn, dev) if kind == "flow" or name in ("ours", "gemm3") else None
            rows.append({"kind": kind, "case": case, "provider": name, **res})
        except Skip as e:
            skipped.append({"kind": kind, "case": case, "provider": name, "reason": str(e)})
        except torch.cuda.OutOfMemoryError:
            skipped.append({"kind": kind, "case": case, "provider": name, "reason": "out of GPU memory"})
        except Exception as e:  # one provider failing must not lose the others' numbers
            skipped.append({"kind": kind, "case": case, "provider": name,
                            "reason": f"failed: {type(e).__name__}: {str(e)[:300]}"})
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _derive(rows: List[dict]) -> None:
    """Add throughput, fraction of the in-run ceiling and ratios to the other providers, per case."""
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["kind"], r["case"]), {})[r["provider"]] = r
    for (kind, case), prov in by_case.items():
        if kind in ("ar", "ar-sweep"):
            n, h, v = case
            flops = 6.0 * n * h * v
            ceil = prov.get("gemm3")
            for r in prov.values():
                r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
                if ceil:
                    r["frac_of_ceiling"] = ceil["ms"] / r["ms"]
                    r["x_vs_3gemm"] = r["ms"] / ceil["ms"]
                if r["peak_gib"] is not None:
                    outputs = (n * h + v * h) * 2 / GIB                   # the bf16 gradients themselves
                    r["extra_gib"] = r["peak_gib"] - outputs if r["provider"] != "gemm3" else None
        else:
            b, d, moved = case
            ceil = prov.get("copy")
            for r in prov.values():
                t = r.get("device_ms") or r["ms"]
                r["gbps"] = moved / (t * 1e-3) / 1e9
                r["gbps_wall"] = moved / (r["ms"] * 1e-3) / 1e9
                if ceil:
                    ceil_gbps = moved / ((ceil.get("device_ms") or ceil["ms"]) * 1e-3) / 1e9
                    r["frac_of_ceiling"] = r["gbps"] / ceil_gbps
        ours = prov.get("ours")
        if ours:
            for other in ("eager", "compile", "liger"):
                if other in prov:
                    ours[f"speedup_vs_{other}"] = prov[other]["ms"] / ours["ms"]


def _targets(rows: List[dict]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for r in rows:
        if r["provider"] != "ours":
            continue
        if r["kind"] == "ar" and tuple(r["case"]) == (16384, 3584, 152064):
            out["ar_x_vs_3gemm"] = r.get("x_vs_3gemm")
            out["ar_speedup_vs_liger"] = r.get("speedup_vs_liger")
            out["ar_extra_gib"] = r.get("extra_gib")
        if r["kind"] == "flow":
            out.setdefault("flow_frac_copy", []).append(r.get("frac_of_ceiling"))
            out.setdefault("flow_speedup_vs_eager", []).append(r.get("speedup_vs_eager"))
    checks = {
        "ar_vs_3gemm": (out.get("ar_x_vs_3gemm"), lambda x: x <= TARGETS["ar_vs_3gemm_max"]),
        "ar_vs_liger": (out.get("ar_speedup_vs_liger"), lambda x: x >= TARGETS["ar_speedup_vs_liger_min"]),
        "ar_extra_memory": (out.get("ar_extra_gib"), lambda x: x <= TARGETS["ar_extra_gib_max"]),
        "flow_bandwidth": (min(out["flow_frac_copy"]) if all(out.get("flow_frac_copy") or [None]) else None,
                           lambda x: x >= TARGETS["flow_frac_copy_min"]),
        "flow_vs_eager": (min(out["flow_speedup_vs_eager"]) if all(out.get("flow_speedup_vs_eager") or [None])
                          else None, lambda x: x >= TARGETS["flow_speedup_vs_eager_min"]),
    }
    out["met"] = {k: (None if val is None else bool(ok(val))) for k, (val, ok) in checks.items()}
    out["limits"] = TARGETS
    return out


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _table(report: dict) -> str:
    lines = [f"device: {report['device']}   torch {report['versions']['torch']}   triton "
             f"{report['versions'].get('triton')}   liger {report['versions'].get('liger_kernel')}   commit "
             f"{(report['versions'].get('git_commit') or '?')[:10]}",
             f"{'kind':5} {'case':>22} {'provider':9} {'ms':>9} {'dev ms':>8} {'GiB':>7} {'TFLOP/s':>8} "
             f"{'GB/s':>8} {'frac':>6} {'vs ours':>8}"]
    for r in report["rows"]:
        case = "x".join(str(c) for c in (r["case"][:3] if r["kind"] != "flow" else r["case"][:2]))
        ours_ms = report["ours_ms"].get(r["kind"] + str(r["case"]))
        lines.append(f"{r['kind']:5} {case:>22} {r['provider']:9} {_fmt(r['ms'], '.3f'):>9} "
                     f"{_fmt(r.get('device_ms'), '.3f'):>8} {_fmt(r.get('peak_gib')):>7} "
                     f"{_fmt(r.get('tflops'), '.1f'):>8} {_fmt(r.get('gbps'), '.0f'):>8} "
                     f"{_fmt(r.get('frac_of_ceiling')):>6} {_fmt(r['ms'] / ours_ms if ours_ms else None):>8}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['kind']} {s['case']} {s['provider']}: {s['reason']}")
    t = report["targets"]
    lines.append("targets: " + ", ".join(f"{k}={'n/a' if v is None else ('met' if v else 'MISSED')}"
                                         for k, v in t["met"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU friendly; `make bench`)")
    ap.add_argument("--only", choices=("ar", "flow"), help="run one kernel's cases")
    ap.add_argument("--providers", default="eager,compile,liger,ours",
                    help="comma list among eager, compile, liger, ours (ceilings always run)")
    ap.add_argument("--out", help="also write the JSON report here")
    ap.add_argument("--sweep-ar-tiles", action="store_true",
                    help="also time the AR kernel under several tile configurations (GPU tuning aid)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; later measurements are skipped (default 60 with --quick, 400 otherwise)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.time_budget if args.time_budget is not None else (60.0 if args.quick else 400.0)
    deadline = time.monotonic() + budget
    wanted = {p.strip() for p in args.providers.split(",") if p.strip()}
    cuda = dev.type == "cuda"
    ar_cases = (AR_QUICK_GPU if cuda else AR_QUICK_CPU) if args.quick else AR_FULL
    flow_cases = (FLOW_QUICK_GPU if cuda else FLOW_QUICK_CPU) if args.quick else FLOW_FULL
    if not cuda and not args.quick:
        print("no CUDA device: the full shapes need a GPU; running --quick shapes instead", file=sys.stderr)
        ar_cases, flow_cases = AR_QUICK_CPU, FLOW_QUICK_CPU
    warmup, reps = (1, 3) if not cuda else (2, 5)
    rows: List[dict] = []
    skipped: List[dict] = []
    compiled_cache: Dict[str, object] = {}
    if args.only != "flow":
        for n, h, v in ar_cases:
            if time.monotonic() > deadline:
                skipped.append({"kind": "ar", "case": (n, h, v), "provider": "*", "reason": "time budget spent"})
                continue
            try:
                inp, s, t = _ar_inputs(n, h, v, dev)
            except torch.cuda.OutOfMemoryError:
                skipped.append({"kind": "ar", "case": (n, h, v), "provider": "*", "reason": "inputs do not fit"})
                continue
            _measure("ar", (s * t, h, v), _ar_providers(inp, s, t, dev, wanted, compiled_cache), dev, warmup, reps,
                     deadline, rows, skipped)
            del inp
    if args.only != "ar":
        for b, d in flow_cases:
            inp, moved = _flow_inputs(b, d, dev)
            _measure("flow", (b, d, moved), _flow_providers(inp, moved, dev, wanted, compiled_cache), dev,
                     max(warmup, 3), max(reps, 10) if cuda else reps, deadline, rows, skipped)
    if args.sweep_ar_tiles:
        _sweep_ar_tiles(ar_cases[min(1, len(ar_cases) - 1)], dev, deadline, rows, skipped)
    _derive(rows)
    report = {"bench": "kernels", "quick": args.quick, "device": _device_name(dev), "versions": _versions(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows, "skipped": skipped,
              "targets": _targets(rows)}
    report["ours_ms"] = {r["kind"] + str(r["case"]): r["ms"] for r in rows if r["provider"] == "ours"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / f"kernels_{'quick_' if args.quick else ''}{dev.type}.json"]
    if args.out:
        paths.append(pathlib.Path(args.out))
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(_table(report))
    summary = {"bench": "kernels", "device": report["device"], "quick": args.quick, "report": str(paths[-1]),
               "targets": report["targets"],
               "rows": [{k: r.get(k) for k in ("kind", "case", "provider", "ms", "device_ms", "peak_gib",
                                                "frac_of_ceiling")} for r in rows],
               "skipped": [f"{s['kind']}/{s['provider']}: {s['reason']}" for s in skipped]}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
