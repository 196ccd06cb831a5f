"""pytest-benchmark wrappers around ``bench.kernels`` (not part of the default test run: testpaths is ``tests/``).

Run: ``pytest bench/test_bench_kernels.py --benchmark-only`` (GPU for the ``ours`` rows; CPU runs the references).
"""
import pytest
import torch

from bench import kernels as K

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOW = (32, 16 * 64 * 64) if DEV.type == "cuda" else (4, 16 * 16 * 16)
AR = (4096, 896, 152064) if DEV.type == "cuda" else (256, 64, 1000)


def _bench(benchmark, make):
    try:
        made = make()
    except K.Skip as e:
        pytest.skip(str(e))
    fn = made[0] if isinstance(made, tuple) else made            # AR providers return (call, clear, meta)

    def call():
        fn()
        K._sync(DEV)

    benchmark.pedantic(call, rounds=5, warmup_rounds=2)


@pytest.mark.parametrize("provider", ["eager", "compile", "ours"])
def test_flow_grpo_fwd_bwd(benchmark, provider):
    inp, moved = K._flow_inputs(*FLOW, DEV)
    makers = dict(K._flow_providers(inp, moved, DEV, {provider}, {}))
    benchmark.extra_info.update(case=list(FLOW), bytes_moved=moved, device=K._device_name(DEV))
    _bench(benchmark, makers[provider])


@pytest.mark.parametrize("provider", ["eager", "compile", "liger", "ours"])
def test_ar_grpo_fwd_bwd(benchmark, provider):
    inp, s, t = K._ar_inputs(*AR, DEV)
    makers = dict(K._ar_providers(inp, s, t, DEV, {provider}, {}))
    benchmark.extra_info.update(case=list(AR), flops=6 * AR[0] * AR[1] * AR[2], device=K._device_name(DEV))
    _bench(benchmark, makers[provider])


@pytest.mark.skipif(DEV.type == "cuda", reason="the CPU smoke test of the GPU rows")
def test_every_ar_and_flow_row_runs_and_derives(monkeypatch):
    """Smoke test of the GPU-only rows (ours in every variant, the GEMM ceilings, the copy) on tiny CPU shapes in
    Triton's interpreter, and of the derived columns and targets; the timings mean nothing here."""
    from alphagrpo.kernels import use_fused
    from alphagrpo.kernels.dispatch import interpreter_ready
    if not interpreter_ready():
        pytest.skip("Triton's interpreter needs TRITON_INTERPRET=1 before triton is imported (run with tests/)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "SMOKE_ON_CPU", True)
    rows, skipped = [], []
    inp, s, t = K._ar_inputs(96, 16, 37, torch.device("cpu"), seq_len=32)
    wanted = {"eager", "ours", "ours-token", "ours-frozen", "ours-nograd", "tiled"}
    grads = lambda frozen: 2 * (96 * 16 + (0 if frozen else 37 * 16))  # noqa: E731
    with use_fused(True):
        K._measure_ar((96, 16, 37, 32), K._ar_providers(inp, s, t, torch.device("cpu"), wanted, {}),
                      torch.device("cpu"), 1, 1, float("inf"), rows, skipped, grads)
    inp, moved = K._flow_inputs(2, 64, torch.device("cpu"))
    with use_fused(True):
        K._measure_flow((2, 64, moved), K._flow_providers(inp, moved, torch.device("cpu"), {"eager", "ours"}, {}),
                        torch.device("cpu"), 2, 1, float("inf"), rows, skipped)
    assert skipped == []
    got = {(r["kind"], r["provider"]) for r in rows}
    assert got == {("ar", p) for p in wanted | {"gemm2", "gemm3", "gemm4"}} | {("flow", p) for p in
                                                                              ("copy", "eager", "ours")}
    K._derive(rows)
    by = {(r["kind"], r["provider"]): r for r in rows}
    assert by[("ar", "ours-frozen")]["ceiling"] == "gemm2" and by[("ar", "tiled")]["ceiling"] == "gemm4"
    assert by[("ar", "ours")]["ceiling"] == "gemm3" and "speedup_vs_tiled" in by[("ar", "ours")]
    assert by[("flow", "ours")]["frac_of_ceiling"] > 0
    assert set(K._targets(rows)["met"]) >= {"ar_frozen_vs_2gemm", "ar_long_gspo_vs_3gemm", "flow_bandwidth"}
