"""Microbenchmarks of the fused GRPO kernels against their references: ``python -m bench.kernels [--quick] --out DIR``.

Prints a table and, last, one JSON line; with ``--out DIR`` also writes the report to ``DIR/kernels_<device>.json``
(``--out FILE.json`` writes that file). Nothing is written elsewhere: the committed results in ``bench/results/``
change only when someone copies a report there on purpose.

Method (all providers of a case in one process, same shapes and dtypes):
- AR (linear -> log-prob -> GRPO), bf16 ``hidden [N, H]``, ``weight [V, H]``, sequences of ``T`` tokens. Each call is
  a full fwd+bwd. Time: CUDA events around each call (so host gaps count), median and IQR over ``--reps`` calls
  after warm-up (compilation excluded; its time is recorded as ``compile_s``); ``host_ms`` is the median time to
  issue one call (no sync); ``device_ms`` the GPU-busy time from the profiler; ``gap_ms = ms - device_ms`` is the
  host time not hidden behind device work. Memory: ``peak_gib`` is the peak above what was allocated before the call
  with the gradients cleared (inputs excluded); ``extra_gib = peak_gib - the gradients`` (counted once).
  Ceilings in the same run: ``gemm2`` (logits + dL/dhidden: a frozen head's minimum), ``gemm3`` (+ dL/dweight),
  ``gemm4`` (+ the logits again: GSPO sequences longer than a chunk, and the round-one kernel). ``x_vs_ceiling``
  divides by the ceiling that matches the provider (``ceiling`` field).
- Flow (SDE step -> log-prob -> GRPO), B x D latents (bf16 v, x; fp32 prev). The inputs rotate over enough copies
  that the working set is more than twice the L2 cache. ``device_us``: CUDA events over ``--flow-calls``
  back-to-back calls queued behind a GPU sleep (so the host cannot starve the GPU), per call; ``host_us``: time to
  issue one call; medians and IQR over rounds. Bytes per call (fwd reads v, x, prev; bwd reads them again and writes
  dL/dv) over ``device_us`` against a device-to-device copy of the same bytes (``copy``).
Providers: ``eager`` (reference, logits in bf16 as an eager model computes them), ``compile`` (``torch.compile`` of
that reference, ``dynamic=False``; its logits are bf16-rounded like eager's), ``compile-autotune`` (``mode=
"max-autotune"``; with ``--autotune``: minutes of compilation), ``liger`` (Liger-Kernel's fused linear GRPO loss,
bf16, ``chunk_size`` sequences per chunk so that a chunk holds about as many rows as ours), ``liger-tf32`` (the same
on float32 copies with TF32 matmuls), ``ours`` (GSPO, trainable head), ``ours-token``, ``ours-frozen`` (GSPO, frozen
head: LoRA), ``ours-nograd`` (log-probs only, one pass), ``tiled`` (the round-one kernel, ``impl="tiled"``). The
``long`` case has sequences longer than a chunk (GSPO's extra pass). Providers that cannot run say why
(``skipped``). ``--quick`` uses small shapes (CPU friendly; ``make bench``); a time budget skips whatever is left,
in three phases so that it costs comparison rows first: ceilings and ours for every case, then flow, then
torch.compile, Liger-Kernel and eager (their compilation dominates).
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
GIB = float(1 << 30)

# (N, H, V, T): T tokens per sequence (Liger needs a padded [B, T] layout)
AR_FULL = [(16384, 3584, 152064, 512), (16384, 896, 152064, 512), (16384, 3584, 152064, 8192),
           (4096, 3584, 152064, 512)]
AR_QUICK_CPU = [(256, 64, 1000, 64)]
AR_QUICK_GPU = [(2048, 896, 32000, 512)]
FLOW_FULL = [(32, 16 * 64 * 64), (32, 16 * 128 * 128)]
FLOW_QUICK_CPU = [(4, 16 * 16 * 16)]
FLOW_QUICK_GPU = [(32, 16 * 64 * 64)]
SEQ_LEN = 512
LONG_T = 8192
AR_DEFAULT = "eager,compile,liger,liger-tf32,ours,ours-token,ours-frozen,ours-nograd,tiled"
AR_LONG = {"ours", "ours-frozen", "compile", "liger"}      # what the long-sequence case runs
CEILING_OF = {"ours-frozen": "gemm2", "tiled": "gemm4", "ours-nograd": None}
# targets of issue #20 (docs/kernels.md), checked at N=16384, V=152064, bf16
TARGETS = {"ar_trainable_x_3gemm_max": 1.20, "ar_trainable_extra_gib_max": 4.0, "ar_h896_x_3gemm_max": 1.55,
           "ar_h896_speedup_vs_compile_min": 1.25, "ar_frozen_x_2gemm_max": 1.20, "ar_frozen_extra_gib_max": 1.5,
           "ar_long_x_3gemm_max": 1.45, "ar_gap_ms_max": 1.0, "flow_frac_copy_min": 0.8,
           "flow_speedup_vs_eager_min": 3.0}


SMOKE_ON_CPU = False   # tests only: run the GPU rows of ours and the ceilings on CPU (interpreter; timings meaningless)


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _quantiles(xs: List[float]) -> Dict[str, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return {"median": xs[0], "q25": xs[0], "q75": xs[0]}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q25": q[0], "q75": q[2]}


def _time(fn: Callable[[], None], dev: torch.device, warmup: int, reps: int,
          clear: Optional[Callable[[], None]] = None) -> Dict[str, Optional[float]]:
    """Per call: event (or wall) time and host issue time, median and IQR; peak memory above the state before a
    call with ``clear()`` applied (gradients dropped), in GiB. The first warm-up call's time is ``first_s``."""
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    first_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    _sync(dev)
    if clear is not None:
        clear()
    peak = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times, host = [], []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            h0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - h0) * 1e3)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            h0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - h0) * 1e3)
            host.append(times[-1])
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / GIB
    t, h = _quantiles(times), _quantiles(host)
    return {"ms": t["median"], "ms_q25": t["q25"], "ms_q75": t["q75"], "host_ms": h["median"], "peak_gib": peak,
            "first_s": first_s}


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
    except Exception:  # the profiler is optional here; the event time stays the primary number
        return None


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata
    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, dist in (("triton", "triton"), ("liger_kernel", "liger-kernel")):
        try:
            out[mod] = metadata.version(dist)
        except Exception:
            out[mod] = None
    out["cuda"] = torch.version.cuda
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
def _ar_inputs(n: int, h: int, v: int, dev: torch.device, seq_len: int = SEQ_LEN):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = max(1, n // seq_len)
    t = n // s
    n = s * t
    dt = torch.bfloat16
    hidden = torch.randn(n, h, generator=g).to(dev, dt).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(dev, dt).requires_grad_()
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[t - 7:t] = -100                                           # some padding
    logp_old = -torch.rand(n, generator=g) * 10
    adv = torch.randn(s, generator=g)
    cu = torch.arange(0, n + 1, t)
    inp = dict(hidden=hidden, weight=weight, tokens=tokens.to(dev), logp_old=logp_old.to(dev),
               advantages=adv.to(dev), cu_seqlens=cu.to(dev))
    inp["_cu_host"] = cu                                             # the host copy ours may use (no sync)
    return inp, s, t


def _liger_chunk(n_rows_ours: int, t: int) -> int:
    return max(1, n_rows_ours // max(t, 1))


def _ar_providers(inp, s, t, dev, wanted, compiled_cache, autotune: bool = False):
    """``[(name, make)]``: ``make()`` returns ``(fn, clear, meta)`` or raises Skip; ceilings come first."""
    from alphagrpo.kernels import ar_grpo_loss, ar_grpo_loss_ref, use_fused
    from alphagrpo.kernels.ar_grpo import DEFAULT_WORKSPACE_BYTES, chunk_rows_for
    hidden, weight = inp["hidden"], inp["weight"]
    n, h = hidden.shape
    v = weight.shape[0]
    args = {k: val for k, val in inp.items() if not k.startswith("_")}

    def clear():
        hidden.grad = weight.grad = None

    def run(loss_fn, frozen=False, grad=True):
        def call():
            hidden.grad = weight.grad = None
            weight.requires_grad_(not frozen)
            try:
                if grad:
                    loss_fn().backward()
                else:
                    with torch.no_grad():
                        loss_fn()
            finally:
                weight.requires_grad_(True)
        return call

    def cuda_only(what, smoke_ok=False):
        if dev.type != "cuda" and not (smoke_ok and SMOKE_ON_CPU):
            raise Skip(f"{what}: GPU only here (on CPU the Triton kernels run in the interpreter, whose timings mean "
                       "nothing; torch.compile and Liger are left out of the CPU quick run)")

    def eager():
        return run(lambda: ar_grpo_loss_ref(**args, upcast=False)[0]), clear, {"note": "bf16 logits"}

    def compiled(mode=None):
        cuda_only("torch.compile")
        key = ("ar", mode, n, h, v, t)
        if key not in compiled_cache:
            torch.compiler.reset()                                   # no recompile limits or stale guards
            compiled_cache.clear()
            compiled_cache[key] = torch.compile(lambda **kw: ar_grpo_loss_ref(**kw, upcast=False)[0], dynamic=False,
                                                mode=mode)
        fn = compiled_cache[key]
        return run(lambda: fn(**args)), clear, {"note": "bf16-rounded logits (the eager reference, compiled)",
                                                "mode": mode or "default", "dynamic": False}

    def liger(tf32=False):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as e:
            raise Skip(f"liger_kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel") from None
        cuda_only("Liger-Kernel")
        torch.compiler.reset()                                       # Liger compiles its chunk function
        chunk = _liger_chunk(chunk_rows_for(n, v, DEFAULT_WORKSPACE_BYTES, dev), t)
        mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                       loss_type="grpo", importance_sampling_level="sequence", chunk_size=chunk)
        tok2 = inp["tokens"].view(s, t)
        mask = (tok2 >= 0).to(torch.int64)
        ids = tok2.clamp(min=0)
        old = inp["logp_old"].view(s, t)
        x3, w = hidden.view(s, t, h), weight
        if tf32:
            x3 = hidden.detach().float().view(s, t, h).requires_grad_()
            w = weight.detach().float().requires_grad_()

        def call():
            x3.grad = w.grad = None
            hidden.grad = weight.grad = None
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32 or prev            # forward and backward alike
            try:
                out = mod(x3, w, ids, mask, inp["advantages"], old_per_token_logps=old)
                (out[0] if isinstance(out, (tuple, list)) else out).backward()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev

        def clr():
            x3.grad = w.grad = None
            clear()
        return call, clr, {"chunk_size": chunk, "note": "float32 copies, TF32 matmuls" if tf32 else "bf16",
                           "grad_bytes_per_elt": 4 if tf32 else 2}

    def ours(level="sequence", frozen=False, grad=True, impl=None):
        cuda_only("ours", smoke_ok=True)

        def loss_fn():
            with use_fused(True):
                return ar_grpo_loss(**args, level=level, cu_seqlens_host=inp["_cu_host"], impl=impl)[0]
        return run(loss_fn, frozen=frozen, grad=grad), clear, {"level": level, "impl": impl or "chunked"}

    def gemm(k):
        def make():
            cuda_only("the GEMM ceilings", smoke_ok=True)
            hd, wd = hidden.detach(), weight.detach()
            dl = torch.empty(n, v, dtype=hd.dtype, device=dev).normal_()

            def call():
                torch.mm(hd, wd.t())
                torch.mm(dl, wd)
                if k >= 3:
                    torch.mm(dl.t(), hd)
                if k >= 4:
                    torch.mm(hd, wd.t())
            return call, None, {"note": f"{k} plain bf16 GEMMs of the same shape"}
        return make

    table = {                                            # the order of measurement: most wanted first
        "gemm2": gemm(2), "gemm3": gemm(3), "gemm4": gemm(4),
        "ours": ours, "ours-token": lambda: ours("token"), "ours-frozen": lambda: ours(frozen=True),
        "ours-nograd": lambda: ours(grad=False), "tiled": lambda: ours(impl="tiled"),
        "compile": compiled, "liger": liger, "liger-tf32": lambda: liger(tf32=True), "eager": eager,
        "compile-autotune": lambda: compiled("max-autotune"),
    }
    want = set(wanted) | ({"compile-autotune"} if autotune else set())
    return [(name, make) for name, make in table.items() if name.startswith("gemm") or name in want]


# ---------------------------------------------------------------------------------------------------------- flow
def _flow_inputs(b: int, d: int, dev: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
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


def _flow_sets(b: int, d: int, dev: torch.device, moved: int) -> List[dict]:
    """Enough input copies that one sweep over them is more than twice the L2 cache (one on CPU)."""
    if dev.type != "cuda":
        return [_flow_inputs(b, d, dev)[0]]
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20) or (50 << 20)
    k = max(2, math.ceil(2 * l2 / max(moved, 1)) + 1)
    return [_flow_inputs(b, d, dev, seed=i)[0] for i in range(k)]


def _flow_providers(inp, moved, dev, wanted, compiled_cache, sets: Optional[List[dict]] = None):
    """``[(name, make)]``; ``make()`` returns a call that rotates over ``sets`` (default: ``[inp]``)."""
    from alphagrpo.kernels import flow_grpo_loss, flow_grpo_loss_ref, use_fused
    sets = sets or [inp]

    def run(loss_fn):
        i = [0]

        def call():
            kw = sets[i[0] % len(sets)]
            i[0] += 1
            kw["v"].grad = None
            loss_fn(kw).backward()
        return call

    def eager():
        return run(lambda kw: flow_grpo_loss_ref(**kw)[0])

    def compiled():
        if dev.type != "cuda":
            raise Skip("torch.compile on CPU is left out of the quick run (inductor's C++ build takes minutes here)")
        if "flow" not in compiled_cache:
            torch.compiler.reset()
            compiled_cache["flow"] = torch.compile(lambda **kw: flow_grpo_loss_ref(**kw)[0], dynamic=False)
        fn = compiled_cache["flow"]
        return run(lambda kw: fn(**kw))

    def ours():
        if dev.type != "cuda" and not SMOKE_ON_CPU:
            raise Skip("no CUDA: on CPU the Triton kernels run only in the interpreter, whose timings mean nothing")

        def loss_fn(kw):
            with use_fused(True):
                return flow_grpo_loss(**kw)[0]
        return run(loss_fn)

    def copy():
        if dev.type != "cuda" and not SMOKE_ON_CPU:
            raise Skip("the copy-bandwidth ceiling is measured on GPU only")
        k = len(sets)
        src = [torch.empty(moved // 2, dtype=torch.uint8, device=dev) for _ in range(k)]
        dst = [torch.empty_like(t) for t in src]
        i = [0]

        def call():
            j = i[0] % k
            i[0] += 1
            dst[j].copy_(src[j])
        return call

    table = {"copy": copy, "eager": eager, "compile": compiled, "ours": ours}
    return [(name, table[name]) for name in table if name == "copy" or name in wanted]


def _time_back_to_back(fn: Callable[[], None], dev: torch.device, calls: int, rounds: int) -> Dict[str, float]:
    """Device time per call over ``calls`` back-to-back calls queued behind a GPU sleep (so the GPU never waits for
    the host), and host time to issue one call; medians and IQR over ``rounds``. CPU: wall time for both."""
    for _ in range(3):
        fn()
    _sync(dev)
    dev_us, host_us = [], []
    for _ in range(rounds):
        if dev.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            dev_us.append((time.perf_counter() - t0) / calls * 1e6)
            host_us.append(dev_us[-1])
            continue
        t0 = time.perf_counter()
        fn()
        issue_s = time.perf_counter() - t0
        _sync(dev)
        torch.cuda._sleep(int(min(2e9, issue_s * calls * 2.5 * 2e9)))   # ~2 GHz cycles: longer than issuing
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        h0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host_us.append((time.perf_counter() - h0) / calls * 1e6)
        end.record()
        end.synchronize()
        dev_us.append(start.elapsed_time(end) * 1e3 / calls)
    d, h = _quantiles(dev_us), _quantiles(host_us)
    return {"device_us": d["median"], "device_us_q25": d["q25"], "device_us_q75": d["q75"],
            "host_us": h["median"], "host_us_q25": h["q25"], "host_us_q75": h["q75"],
            "ms": d["median"] / 1e3}


# ---------------------------------------------------------------------------------------------------------- main
def _measure_ar(case, providers, dev, warmup, reps, deadline, rows, skipped, grads_bytes):
    for name, make in providers:
        if time.monotonic() > deadline:
            skipped.append({"kind": "ar", "case": case, "provider": name, "reason": "time budget spent"})
            continue
        try:
            fn, clear, meta = make()
            res = _time(fn, dev, warmup, reps, clear)
            res["device_ms"] = _device_ms(fn, dev) if (name.startswith(("ours", "gemm", "tiled"))) else None
            frozen = name == "ours-frozen"
            g = 0 if name in ("ours-nograd",) or name.startswith("gemm") else grads_bytes(frozen)
            g = g * meta.get("grad_bytes_per_elt", 2) // 2                # float32 gradients of the TF32 row
            res["extra_gib"] = (res["peak_gib"] - g / GIB) if res["peak_gib"] is not None and g else None
            if res["device_ms"] is not None:
                res["gap_ms"] = res["ms"] - res["device_ms"]
            if name.startswith("compile"):
                res["compile_s"] = res["first_s"]
            rows.append({"kind": "ar", "case": case, "provider": name, **meta, **res})
        except Skip as e:
            skipped.append({"kind": "ar", "case": case, "provider": name, "reason": str(e)})
        except torch.cuda.OutOfMemoryError:
            skipped.append({"kind": "ar", "case": case, "provider": name, "reason": "out of GPU memory"})
        except Exception as e:  # one provider failing must not lose the others' numbers
            skipped.append({"kind": "ar", "case": case, "provider": name,
                            "reason": f"failed: {type(e).__name__}: {str(e)[:300]}"})
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _measure_flow(case, providers, dev, calls, rounds, deadline, rows, skipped):
    for name, make in providers:
        if time.monotonic() > deadline:
            skipped.append({"kind": "flow", "case": case, "provider": name, "reason": "time budget spent"})
            continue
        try:
            fn = make()
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            first_s = time.perf_counter() - t0
            res = _time_back_to_back(fn, dev, calls, rounds)
            rows.append({"kind": "flow", "case": case, "provider": name, "first_s": first_s, **res})
        except Skip as e:
            skipped.append({"kind": "flow", "case": case, "provider": name, "reason": str(e)})
        except Exception as e:
            skipped.append({"kind": "flow", "case": case, "provider": name,
                            "reason": f"failed: {type(e).__name__}: {str(e)[:300]}"})


def _derive(rows: List[dict]) -> None:
    """Throughput, the ratio to the matching in-run ceiling, and ratios of ours to the other providers, per case."""
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["kind"], tuple(r["case"])), {})[r["provider"]] = r
    for (kind, case), prov in by_case.items():
        if kind == "ar":
            n, h, v, _ = case
            for name, r in prov.items():
                r["tflops"] = 6.0 * n * h * v / (r["ms"] * 1e-3) / 1e12
                ceil_name = CEILING_OF.get(name, "gemm3") if not name.startswith("gemm") else None
                ceil = prov.get(ceil_name) if ceil_name else None
                if ceil:
                    r["ceiling"] = ceil_name
                    r["x_vs_ceiling"] = r["ms"] / ceil["ms"]
                if "gemm3" in prov and not name.startswith("gemm"):
                    r["x_vs_3gemm"] = r["ms"] / prov["gemm3"]["ms"]
            ours = prov.get("ours")
            if ours:
                for other in ("eager", "compile", "compile-autotune", "liger", "liger-tf32", "tiled"):
                    if other in prov:
                        ours[f"speedup_vs_{other}"] = prov[other]["ms"] / ours["ms"]
        else:
            b, d, moved = case
            ceil = prov.get("copy")
            for r in prov.values():
                r["gbps"] = moved / (r["device_us"] * 1e-6) / 1e9
                if ceil:
                    r["frac_of_ceiling"] = ceil["device_us"] / r["device_us"]
            ours = prov.get("ours")
            if ours:
                for other in ("eager", "compile"):
                    if other in prov:
                        ours[f"speedup_vs_{other}"] = prov[other]["device_us"] / ours["device_us"]


def _targets(rows: List[dict]) -> Dict[str, object]:
    get = {(r["kind"], tuple(r["case"]), r["provider"]): r for r in rows}
    big, small, long_ = (16384, 3584, 152064, SEQ_LEN), (16384, 896, 152064, SEQ_LEN), (16384, 3584, 152064, LONG_T)

    def val(case, prov, key):
        r = get.get(("ar", case, prov))
        return None if r is None else r.get(key)

    flow = [r for r in rows if r["kind"] == "flow" and r["provider"] == "ours"]
    worst = lambda xs: None if not xs or any(x is None for x in xs) else min(xs)  # noqa: E731
    ours_ar = [r for r in rows if r["kind"] == "ar" and r["provider"].startswith("ours")]
    checks = {
        "ar_gspo_vs_3gemm": (val(big, "ours", "x_vs_ceiling"), lambda x: x <= TARGETS["ar_trainable_x_3gemm_max"]),
        "ar_token_vs_3gemm": (val(big, "ours-token", "x_vs_ceiling"),
                              lambda x: x <= TARGETS["ar_trainable_x_3gemm_max"]),
        "ar_gspo_vs_compile": (val(big, "ours", "speedup_vs_compile"), lambda x: x >= 1.0),
        "ar_extra_memory": (val(big, "ours", "extra_gib"), lambda x: x <= TARGETS["ar_trainable_extra_gib_max"]),
        "ar_h896_vs_3gemm": (val(small, "ours", "x_vs_ceiling"), lambda x: x <= TARGETS["ar_h896_x_3gemm_max"]),
        "ar_h896_vs_compile": (val(small, "ours", "speedup_vs_compile"),
                               lambda x: x >= TARGETS["ar_h896_speedup_vs_compile_min"]),
        "ar_frozen_vs_2gemm": (val(big, "ours-frozen", "x_vs_ceiling"),
                               lambda x: x <= TARGETS["ar_frozen_x_2gemm_max"]),
        "ar_frozen_extra_memory": (val(big, "ours-frozen", "extra_gib"),
                                   lambda x: x <= TARGETS["ar_frozen_extra_gib_max"]),
        "ar_long_gspo_vs_3gemm": (val(long_, "ours", "x_vs_ceiling"), lambda x: x <= TARGETS["ar_long_x_3gemm_max"]),
        "ar_vs_liger": (worst([r.get("speedup_vs_liger") for r in rows if r["provider"] == "ours"
                               and r["kind"] == "ar"]) if any("speedup_vs_liger" in r for r in rows) else None,
                        lambda x: x > 1.0),
        "ar_host_gap": (max((r["gap_ms"] for r in ours_ar if r.get("gap_ms") is not None), default=None),
                        lambda x: x <= TARGETS["ar_gap_ms_max"]),
        "flow_bandwidth": (worst([r.get("frac_of_ceiling") for r in flow]),
                           lambda x: x >= TARGETS["flow_frac_copy_min"]),
        "flow_vs_eager": (worst([r.get("speedup_vs_eager") for r in flow]),
                          lambda x: x >= TARGETS["flow_speedup_vs_eager_min"]),
    }
    return {"values": {k: v for k, (v, _) in checks.items()},
            "met": {k: (None if v is None else bool(ok(v))) for k, (v, ok) in checks.items()}, "limits": TARGETS}


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _table(report: dict) -> str:
    v = report["versions"]
    lines = [f"device: {report['device']}   torch {v['torch']}   triton {v.get('triton')}   liger "
             f"{v.get('liger_kernel')}   commit {(v.get('git_commit') or '?')[:10]}",
             f"{'kind':4} {'case':>24} {'provider':16} {'ms':>9} {'IQR':>15} {'dev ms':>8} {'host ms':>8} "
             f"{'GiB+':>6} {'x ceil':>7} {'ceiling':>7}"]
    for r in report["rows"]:
        if r["kind"] != "ar":
            continue
        case = "x".join(str(c) for c in r["case"])
        lines.append(f"{'ar':4} {case:>24} {r['provider']:16} {_fmt(r['ms'], '.3f'):>9} "
                     f"{_fmt(r.get('ms_q25'), '.2f') + '-' + _fmt(r.get('ms_q75'), '.2f'):>15} "
                     f"{_fmt(r.get('device_ms'), '.3f'):>8} {_fmt(r.get('host_ms'), '.3f'):>8} "
                     f"{_fmt(r.get('extra_gib') if r.get('extra_gib') is not None else r.get('peak_gib')):>6} "
                     f"{_fmt(r.get('x_vs_ceiling')):>7} {r.get('ceiling', '-'):>7}")
    lines.append(f"{'kind':4} {'case':>24} {'provider':16} {'dev us':>9} {'IQR':>15} {'host us':>8} {'GB/s':>8} "
                 f"{'frac':>6}")
    for r in report["rows"]:
        if r["kind"] != "flow":
            continue
        case = "x".join(str(c) for c in r["case"][:2])
        lines.append(f"{'flow':4} {case:>24} {r['provider']:16} {_fmt(r['device_us'], '.1f'):>9} "
                     f"{_fmt(r['device_us_q25'], '.1f') + '-' + _fmt(r['device_us_q75'], '.1f'):>15} "
                     f"{_fmt(r['host_us'], '.1f'):>8} {_fmt(r.get('gbps'), '.0f'):>8} "
                     f"{_fmt(r.get('frac_of_ceiling')):>6}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['kind']} {s['case']} {s['provider']}: {s['reason']}")
    t = report["targets"]
    lines.append("targets: " + ", ".join(f"{k}={'n/a' if v is None else ('met' if v else 'MISSED')}"
                                         for k, v in t["met"].items()))
    return "\n".join(lines)


def _out_path(out: str, quick: bool, dev: torch.device) -> pathlib.Path:
    p = pathlib.Path(out)
    if p.suffix == ".json":
        return p
    return p / f"kernels_{'quick_' if quick else ''}{dev.type}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU friendly; `make bench`)")
    ap.add_argument("--only", choices=("ar", "flow"), help="run one kernel's cases")
    ap.add_argument("--providers", default=AR_DEFAULT + ",copy",
                    help="comma list (ceilings always run): " + AR_DEFAULT + ", compile-autotune; flow uses eager, "
                         "compile, ours")
    ap.add_argument("--cases", default=None,
                    help="AR cases as N:H:V:T,... (default: the full set, or the quick one with --quick)")
    ap.add_argument("--autotune", action="store_true", help="add torch.compile(mode='max-autotune') rows (slow)")
    ap.add_argument("--reps", type=int, default=None, help="timed AR calls per provider (default 10 GPU, 3 CPU)")
    ap.add_argument("--flow-calls", type=int, default=50, help="back-to-back flow calls per round")
    ap.add_argument("--flow-rounds", type=int, default=7, help="rounds of back-to-back flow calls")
    ap.add_argument("--out", help="output folder (writes kernels_<device>.json there) or a .json file")
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
    if args.cases:
        ar_cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",") if c.strip()]
    warmup = 2 if cuda else 1
    reps = args.reps or (10 if cuda else 3)
    rows: List[dict] = []
    skipped: List[dict] = []
    compiled_cache: Dict[object, object] = {}
    ours_rows = {"ours", "ours-token", "ours-frozen", "ours-nograd", "tiled"}

    def ar_phase(names: set, with_ceilings: bool) -> None:
        for n, h, v, t in ar_cases:
            want = (names if t < LONG_T else names & AR_LONG) & wanted   # the long case: GSPO rows
            if not want and not with_ceilings:
                continue
            if time.monotonic() > deadline:
                skipped.append({"kind": "ar", "case": (n, h, v, t), "provider": "*", "reason": "time budget spent"})
                continue
            try:
                inp, s, t = _ar_inputs(n, h, v, dev, t)
            except torch.cuda.OutOfMemoryError:
                skipped.append({"kind": "ar", "case": (n, h, v, t), "provider": "*", "reason": "inputs do not fit"})
                continue
            providers = [(name, make) for name, make in
                         _ar_providers(inp, s, t, dev, want, compiled_cache, args.autotune and t < LONG_T)
                         if with_ceilings or not name.startswith("gemm")]
            grads = lambda frozen, _n=s * t, _h=h, _v=v: 2 * (_n * _h + (0 if frozen else _v * _h))  # noqa: E731
            _measure_ar((s * t, h, v, t), providers, dev, warmup, reps, deadline, rows, skipped, grads)
            del inp
            if cuda:
                torch.cuda.empty_cache()

    # phases, so that a spent time budget costs comparison rows first: ceilings and ours for every case, flow, then
    # torch.compile / Liger / eager (compilation dominates their time)
    if args.only != "flow":
        ar_phase(ours_rows, with_ceilings=True)
    if args.only != "ar":
        for b, d in flow_cases:
            inp, moved = _flow_inputs(b, d, dev)
            sets = _flow_sets(b, d, dev, moved)
            _measure_flow((b, d, moved), _flow_providers(inp, moved, dev, wanted, compiled_cache, sets), dev,
                          args.flow_calls if cuda else 3, args.flow_rounds if cuda else 2, deadline, rows, skipped)
    if args.only != "flow":
        ar_phase({"compile", "compile-autotune", "liger", "liger-tf32", "eager"}, with_ceilings=False)
    rows.sort(key=lambda r: (r["kind"] != "ar", [c for c in r["case"]]))
    _derive(rows)
    versions = _versions()
    if cuda:                                             # whether the AR logits GEMM writes float32 directly
        from alphagrpo.kernels.ar_grpo import _out_dtype_mm_ok
        versions["cublas_out_dtype_f32"] = _out_dtype_mm_ok(dev)
    report = {"bench": "kernels", "quick": args.quick, "device": _device_name(dev), "versions": versions,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": "python -m bench.kernels " +
              " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows, "skipped": skipped,
              "targets": _targets(rows)}
    path = None
    if args.out:
        path = _out_path(args.out, args.quick, dev)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(_table(report))
    summary = {"bench": "kernels", "device": report["device"], "quick": args.quick,
               "report": str(path) if path else None, "targets": report["targets"]["met"],
               "rows": [{k: r.get(k) for k in ("kind", "case", "provider", "ms", "device_ms", "device_us",
                                                "extra_gib", "x_vs_ceiling")} for r in rows],
               "skipped": [f"{s['kind']}/{s['provider']}: {s['reason']}" for s in skipped]}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
