"""The fused flow GRPO kernel against its float64 reference (STYLE.md's tolerance rule), and the dispatch switch.

CPU tests run the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set per test): tiny shapes only.
Tests marked ``cuda`` repeat the comparison at the benchmark's shapes on a GPU.
Tolerance rule: ``max|kernel - float64| <= 2 * max|plain torch in the same dtype - float64| + atol``, where plain
torch is ``flow_grpo_loss_ref`` run on the same low-precision inputs and ``atol`` is the larger of 1e-6 and one
rounding of the output dtype (``finfo.eps``), times the quantity's scale.
"""
import math

import pytest
import torch

from alphagrpo.kernels import flow_grpo_loss, flow_grpo_loss_ref, use_fused
from alphagrpo.kernels.dispatch import backend_for

from _tolerance import _rule  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]




def _case(b, shape, dtype, device="cpu", per_sample=False, with_ref=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn((b,) + shape, generator=g)  # noqa: E731
    v, x = mk().to(device, dtype), mk().to(device, dtype)
    if per_sample:
        sig = torch.linspace(1.0, 0.3, b)
        sig_next = sig - 0.125
    else:
        sig, sig_next = 0.75, 0.5625                                 # exact in float32
    with torch.no_grad():                                            # a plausible prev: mean + std * eps
        _, m = flow_grpo_loss_ref(v, x, torch.zeros_like(v), sig, sig_next, 0.7, torch.zeros(b, device=device),
                                  torch.zeros(b, device=device))
    from alphagrpo.kernels import sde_mean_std
    mean, std = sde_mean_std(x, v, sig, sig_next, 0.7)
    prev = (mean + std * mk().to(device)).to(torch.float32)
    with torch.no_grad():
        _, m = flow_grpo_loss_ref(v, x, prev, sig, sig_next, 0.7, torch.zeros(b, device=device),
                                  torch.zeros(b, device=device))
    # ratios on policy, inside the 1e-5 clip range, clipped on either side, and far beyond the [-20, 20] clamp
    offsets = torch.tensor([0.0, 3e-6, -4e-6, 2e-3, -3e-3, 25.0, -1e30, 0.5] * b)[:b].to(device)
    logp_old = m["logp"] + offsets
    adv = torch.tensor([1.0, -2.0, 7.0, -0.5, 3.0, -9.0, 1.0, -1.0] * b)[:b].to(device)
    mean_ref = (mean + 0.1 * mk().to(device)).to(dtype) if with_ref else None
    return v, x, prev, sig, sig_next, logp_old, adv, mean_ref


def _run(fn, v, x, prev, sig, sig_next, logp_old, adv, mean_ref, cast=None, x_grad=True):
    cast = cast or (lambda t: t)
    v = cast(v).detach().requires_grad_()
    x = cast(x).detach().requires_grad_(x_grad)
    prev = cast(prev)
    ref = None if mean_ref is None else cast(mean_ref)
    loss, m = fn(v, x, prev, sig, sig_next, 0.7, logp_old, adv, mean_ref=ref, beta=0.3 if ref is not None else 0.0)
    loss.backward()
    return loss.detach(), m, v.grad, x.grad


def _check_against_oracle(args, dtype):
    got = _run(flow_grpo_loss, *args)
    with use_fused(False):
        plain = _run(flow_grpo_loss_ref, *args)
        oracle = _run(flow_grpo_loss_ref, *args, cast=lambda t: t.double())
    assert got[2].dtype == dtype and got[3].dtype == dtype
    for name, i in (("loss", 0), ("dL/dv", 2), ("dL/dx", 3)):
        _rule(name, got[i], plain[i], oracle[i])
    for key in ("logp", "ratio", "ratio_mean", "ratio_min", "ratio_max", "kl"):
        _rule(key, got[1][key], plain[1][key], oracle[1][key])
    assert got[1]["clip_frac"].item() == pytest.approx(oracle[1]["clip_frac"].item(), rel=1e-6)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample, with_ref", [(False, False), (True, True)])
def test_flow_kernel_matches_float64_reference(fused, dtype, per_sample, with_ref):
    args = _case(6, (3, 7, 11), dtype, per_sample=per_sample, with_ref=with_ref)
    got = _check_against_oracle(args, dtype)
    assert 0 < got[1]["clip_frac"].item() < 1                        # the case really exercises both branches


def test_flow_kernel_spans_several_blocks_and_odd_sizes(fused):
    args = _case(3, (1823,), torch.bfloat16, with_ref=True)          # D > the interpreter's block of 1024
    _check_against_oracle(args, torch.bfloat16)


def test_flow_kernel_without_x_grad_and_with_4d_latents(fused):
    v, x, prev, sig, sig_next, logp_old, adv, _ = _case(4, (2, 5, 3), torch.float32)
    got = _run(flow_grpo_loss, v, x, prev, sig, sig_next, logp_old, adv, None, x_grad=False)
    with use_fused(False):
        want = _run(flow_grpo_loss_ref, v, x, prev, sig, sig_next, logp_old, adv, None, x_grad=False)
    assert got[3] is None and got[2].shape == v.shape
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-9)


def test_flow_kernel_huge_log_ratios_give_no_nan(fused):
    v, x, prev, sig, sig_next, _, adv, _ = _case(4, (9, 9), torch.bfloat16)
    logp_old = torch.tensor([1e30, -1e30, float("inf"), -float("inf")])
    loss, m, gv, gx = _run(flow_grpo_loss, v, x, prev, sig, sig_next, logp_old, adv, None)
    assert torch.isfinite(loss) and torch.isfinite(gv.float()).all() and torch.isfinite(gx.float()).all()
    assert m["ratio"].tolist() == pytest.approx([math.exp(-20), math.exp(20), math.exp(-20), math.exp(20)], rel=1e-6)
    assert (gv == 0).all()                                           # every log-ratio was clamped: no gradient


def test_flow_kernel_reference_mean_without_beta_only_reports_kl(fused):
    v, x, prev, sig, sig_next, logp_old, adv, ref = _case(4, (6, 5), torch.float32, with_ref=True)
    ref[0, 0, 0] = float("inf")                                      # would poison the gradient if it were read
    v1 = v.clone().requires_grad_()
    loss, m = flow_grpo_loss(v1, x, prev, sig, sig_next, 0.7, logp_old, adv, mean_ref=ref, beta=0.0)
    loss.backward()
    v2 = v.clone().requires_grad_()
    base, _ = flow_grpo_loss(v2, x, prev, sig, sig_next, 0.7, logp_old, adv)
    base.backward()
    assert torch.equal(loss, base) and torch.equal(v1.grad, v2.grad) and m["kl"].item() == float("inf")


def test_flow_kernel_is_deterministic(fused):
    args = _case(5, (40,), torch.bfloat16, with_ref=True)
    a, b = _run(flow_grpo_loss, *args), _run(flow_grpo_loss, *args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_flow_kernel_rejects_a_deterministic_step(fused):
    v, x, prev, *_ = _case(2, (4,), torch.float32)
    with pytest.raises(ValueError, match="deterministic"):
        flow_grpo_loss(v, x, prev, 0.75, 0.5625, 0.0, torch.zeros(2), torch.zeros(2))


def test_flow_kernel_traces_under_torch_compile(fused):
    args = _case(4, (5, 6), torch.float32, with_ref=True)
    v, x, prev, sig, sig_next, logp_old, adv, ref = args

    def step(v, x):
        loss, m = flow_grpo_loss(v, x, prev, sig, sig_next, 0.7, logp_old, adv, mean_ref=ref, beta=0.3)
        return loss, m["clip_frac"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    v1, x1 = v.clone().requires_grad_(), x.clone().requires_grad_()
    loss, frac = compiled(v1, x1)
    loss.backward()
    got = _run(flow_grpo_loss, *args)
    torch.testing.assert_close(loss.detach(), got[0])
    torch.testing.assert_close(v1.grad, got[2])
    torch.testing.assert_close(x1.grad, got[3])


def test_eager_calls_launch_directly_and_match_the_custom_op_path(fused, monkeypatch):
    """Plain eager calls skip the torch.library op (its dispatch costs host time); the op path gives the same bits."""
    import alphagrpo.kernels.flow_grpo as F
    args = _case(4, (5, 6), torch.bfloat16, per_sample=True, with_ref=True)
    used = []
    for name in ("_fwd_op", "_bwd_op"):
        op = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _op=op, _n=name: used.append(_n) or _op(*a))
    direct = _run(flow_grpo_loss, *args)
    assert used == []
    monkeypatch.setattr(F, "direct_launch", lambda *tensors: False)
    via_op = _run(flow_grpo_loss, *args)
    assert used == ["_fwd_op", "_bwd_op"]
    for a, b in zip((direct[0], direct[2], direct[3]), (via_op[0], via_op[2], via_op[3])):
        assert torch.equal(a, b)
    assert all(torch.equal(direct[1][k], via_op[1][k]) for k in direct[1])


def test_flow_kernel_is_two_launches_into_one_output_buffer(fused, monkeypatch):
    import alphagrpo.kernels.flow_grpo as F
    real = F._kernels(True)
    launches = []

    class Count:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(F, "_kernels", lambda interpret: (Count(real[0], "fwd"), Count(real[1], "bwd")))
    for per_sample in (False, True):
        launches.clear()
        args = _case(3, (1823,), torch.bfloat16, per_sample=per_sample, with_ref=True)   # several blocks per sample
        loss, m, gv, gx = _run(flow_grpo_loss, *args)
        assert launches == ["fwd", "bwd"]
        base = loss.untyped_storage().data_ptr()
        assert all(m[k].untyped_storage().data_ptr() == base for k in ("logp", "ratio", "clip_frac", "kl"))
        assert F._counter(torch.device("cpu")).item() == 0           # the ticket is reset for the next call
        with use_fused(False):
            want = _run(flow_grpo_loss_ref, *args)
        torch.testing.assert_close(loss, want[0].float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sigma, sigma_next, sub", [(0.75, 0.5625, None), (1.0, 0.9375, None), (1.0, 0.9375, 0.96)])
def test_flow_kernel_device_schedule_matches_the_scalar_one(fused, sigma, sigma_next, sub):
    """Coefficients computed in the kernel from device tensors (CUDA-graph safe) equal kernels.sde's float32 ones."""
    v, x, prev, _, _, logp_old, adv, ref = _case(5, (40,), torch.float32, with_ref=True)
    outs = []
    for as_tensor in (False, True):
        t = (lambda z: torch.tensor(z)) if as_tensor else (lambda z: z)
        vv = v.clone().requires_grad_()
        loss, m = flow_grpo_loss(vv, x, prev, t(sigma), t(sigma_next), t(0.7), logp_old, adv, mean_ref=ref, beta=0.3,
                                 sigma_one_substitute=None if sub is None else t(sub))
        loss.backward()
        outs.append((loss.detach(), m["logp"], vv.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_auto_on_cpu_uses_the_reference_unless_interpreting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ALPHAGRPO_KERNELS", raising=False)
    assert backend_for(torch.device("cpu")) == "ref"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(torch.device("cpu")) == "triton"
    monkeypatch.setenv("ALPHAGRPO_KERNELS", "ref")
    assert backend_for(torch.device("cpu")) == "ref"
    with use_fused(True):
        assert backend_for(torch.device("cpu")) == "triton"          # the programmatic switch wins over the env
    assert backend_for(torch.device("cpu")) == "ref"                 # and is restored on exit


def test_dispatch_forcing_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ALPHAGRPO_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(torch.device("cpu"))
    monkeypatch.setenv("ALPHAGRPO_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, triton or ref"):
        backend_for(torch.device("cpu"))


def test_dispatch_reference_path_is_the_reference_bit_for_bit(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ALPHAGRPO_KERNELS", raising=False)
    args = _case(3, (4, 4), torch.bfloat16, with_ref=True)
    a, b = _run(flow_grpo_loss, *args), _run(flow_grpo_loss_ref, *args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


# ---------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16 * 64 * 64, 16 * 128 * 128 + 3])
def test_flow_kernel_matches_float64_reference_cuda(dtype, d):
    with use_fused(True):
        args = _case(32, (d,), dtype, device="cuda", per_sample=d % 2 == 1, with_ref=True)
        _check_against_oracle(args, dtype)


@pytest.mark.cuda
def test_flow_kernel_cuda_graph_replay_follows_changed_coefficient_tensors():
    """Capture fwd+bwd once with the schedule as device tensors; replays with new values match fresh eager calls."""
    g = torch.Generator().manual_seed(0)
    b, d = 8, 16 * 32 * 32
    v = torch.randn(b, d, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    x = torch.randn(b, d, generator=g).to("cuda", torch.bfloat16)
    prev = torch.randn(b, d, generator=g).to("cuda")
    logp_old = torch.full((b,), -0.6, device="cuda")
    adv = torch.randn(b, generator=g).to("cuda")
    sig, sig_next = torch.tensor(0.75, device="cuda"), torch.tensor(0.5625, device="cuda")

    def step(s, sn):
        loss, m = flow_grpo_loss(v, x, prev, s, sn, 0.7, logp_old, adv)
        gv, = torch.autograd.grad(loss, v)
        return loss, m["logp"], gv

    with use_fused(True):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(sig, sig_next)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step(sig, sig_next)
        for s, sn in [(0.5, 0.4375), (1.0, 0.9375), (0.75, 0.5625)]:
            sig.fill_(s)
            sig_next.fill_(sn)
            graph.replay()
            torch.cuda.synchronize()
            want = step(s, sn)                                       # eager, Python-number schedule
            for got, ref in zip(static, want):
                torch.testing.assert_close(got.float(), ref.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("per_sample", [False, True])
def test_flow_kernel_never_syncs_the_host_cuda(per_sample):
    args = _case(8, (4, 16, 16), torch.bfloat16, device="cuda", per_sample=per_sample, with_ref=True)
    if per_sample:                                                   # the schedule as device tensors
        args = args[:3] + (args[3].cuda(), args[4].cuda()) + args[5:]
    with use_fused(True):
        _run(flow_grpo_loss, *args)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _run(flow_grpo_loss, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
