"""Host time around the fused flow kernel: what one eager fwd+bwd call costs on the CPU with the launches stubbed out.

    python -m bench.host_overhead [--b 32] [--d 4096] [--calls 400] [--out bench/results/host_overhead_cpu.json]
    python -m bench.host_overhead --kernel ar [--n 16384] [--chunk-rows 1664] [--out FILE]   (the AR loss)

At image-step sizes the flow kernels take microseconds on a GPU (0.012 ms for B=32, D=65536 on an H200) while a
call's Python, autograd and dispatch work takes far longer, so this host time is what a training step pays per SDE
step. The Triton launchers are replaced by no-ops (outputs stay uninitialized), everything else runs as in
training: input checks, coefficient cache, allocations, the autograd Function, the backward. Two paths are timed in
one process, interleaved: ``direct`` (eager calls launch the kernels directly, the default) and ``custom_op`` (the
``torch.library`` ops that torch.compile needs, forced). Runs on any machine; no GPU needed.

``--kernel ar``: the same for the chunked AR loss, with its Triton launches AND its GEMMs stubbed (the O(N) torch work,
the chunk plan, allocations, autograd run for real), at N rows in chunks of ``--chunk-rows`` (1664 is what the
default 1 GiB workspace gives at V = 152064: 10 chunks for N = 16384) and a small H and V (the host work does not
depend on them). GSPO and token level, trainable and frozen head, interleaved. Writes only with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.verifier import cpu_name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON report (flow default: bench/results/host_overhead_cpu.json)")
    p.add_argument("--kernel", choices=("flow", "ar"), default="flow")
    p.add_argument("--n", type=int, default=16384, help="AR rows")
    p.add_argument("--chunk-rows", type=int, default=1664, help="AR rows per chunk")
    args = p.parse_args(argv)
    if args.kernel == "ar":
        return _ar_main(args, argv)
    if args.out is None:
        args.out = "bench/results/host_overhead_cpu.json"
    os.environ["TRITON_INTERPRET"] = "1"     # lets the fused path run on CPU tensors; no kernel runs (stubbed)
    import torch
    torch.set_num_threads(1)
    import alphagrpo.kernels.flow_grpo as F
    from alphagrpo.kernels import flow_grpo_loss, use_fused

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    F._kernels = lambda interpret: (_NoLaunch(), _NoLaunch())
    b, d = args.b, args.d
    v = torch.randn(b, d, requires_grad=True)
    x, prev = torch.randn(b, d), torch.randn(b, d)
    logp_old, adv = torch.zeros(b), torch.randn(b)

    def call():
        v.grad = None
        with use_fused(True):
            loss, _ = flow_grpo_loss(v, x, prev, 0.75, 0.6875, 0.7, logp_old, adv)
        loss.backward()

    direct = F.direct_launch
    paths = {"direct": direct, "custom_op": lambda *tensors: False}
    samples = {k: [] for k in paths}
    for _ in range(args.rounds):                 # interleaved rounds: drift on a shared machine hits both paths
        for name, fn in paths.items():
            F.direct_launch = fn
            for _ in range(20):
                call()
            t = time.perf_counter()
            for _ in range(args.calls):
                call()
            samples[name].append((time.perf_counter() - t) / args.calls * 1e6)
    F.direct_launch = direct
    res = {k: statistics.median(v) for k, v in samples.items()}
    report = {"bench": "host_overhead", "what": "flow_grpo_loss fwd+bwd, launches stubbed, median of rounds",
              "b": b, "d": d, "us_per_call": res, "rounds_us": samples,
              "saved_us": res["custom_op"] - res["direct"], "cpu": cpu_name(),
              "torch": torch.__version__, "command": "python -m bench.host_overhead " + " ".join(argv or [])}
    print(f"flow fwd+bwd host time per call (B={b}, D={d}, launches stubbed): direct {res['direct']:.0f} us, "
          f"custom op {res['custom_op']:.0f} us")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"us_per_call": res}))
    return 0


def _ar_main(args, argv) -> int:
    os.environ["TRITON_INTERPRET"] = "1"     # lets the fused path run on CPU tensors; no kernel runs (stubbed)
    import torch
    torch.set_num_threads(1)
    import alphagrpo.kernels.ar_grpo as A
    from alphagrpo.kernels import ar_grpo_loss, use_fused

    def no_dlogits(logits, tokens, lse, g, temperature, dtype):
        return logits if dtype == torch.float32 else logits.view(dtype)[:, :logits.shape[1]]

    A._logits_into = lambda *a, **k: None
    A._lse_rows = lambda *a, **k: None
    A._dlogits_rows = no_dlogits
    A._mm_into = lambda *a, **k: None
    A._mm_f32 = lambda *a, **k: None
    n, h, v, t = args.n, 64, 1024, 512
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(v, h, generator=g).bfloat16()
    tokens = torch.randint(0, v, (n,), generator=g)
    cu = torch.arange(0, n + 1, t)
    logp_old, adv = -torch.rand(n, generator=g), torch.randn(n // t, generator=g)
    variants = {f"{lvl}/{'frozen' if fr else 'trainable'}": (lvl, fr) for lvl in ("sequence", "token")
                for fr in (False, True)}

    def call(level, frozen):
        hidden.grad = weight.grad = None
        weight.requires_grad_(not frozen)
        with use_fused(True):
            loss, _ = ar_grpo_loss(hidden, weight, tokens, logp_old, adv, cu, level=level, chunk_rows=args.chunk_rows)
        loss.backward()

    calls = max(5, args.calls // 20)
    samples = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (level, frozen) in variants.items():
            for _ in range(3):
                call(level, frozen)
            t0 = time.perf_counter()
            for _ in range(calls):
                call(level, frozen)
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    res = {k: statistics.median(x) for k, x in samples.items()}
    chunks = -(-n // args.chunk_rows)
    report = {"bench": "host_overhead", "kernel": "ar", "what": "ar_grpo_loss fwd+bwd, launches and GEMMs stubbed, "
              "median of rounds", "n": n, "chunk_rows": args.chunk_rows, "chunks": chunks, "us_per_call": res,
              "rounds_us": samples, "cpu": cpu_name(), "torch": torch.__version__,
              "command": "python -m bench.host_overhead " + " ".join(argv or [])}
    for k, us in res.items():
        print(f"ar fwd+bwd host time per call ({k}, N={n}, {chunks} chunks, launches and GEMMs stubbed): {us:.0f} us")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"us_per_call": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
