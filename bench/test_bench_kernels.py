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
        fn = make()
    except K.Skip as e:
        pytest.skip(str(e))

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
