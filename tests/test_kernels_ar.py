"""The fused AR (linear -> log-prob -> GRPO) kernel against its float64 reference, by STYLE.md's tolerance rule.

CPU tests run the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set per test): tiny shapes only.
Tests marked ``cuda`` repeat the comparison on a GPU. Tolerance rule: ``max|kernel - float64| <= 2 * max|plain
torch in the same dtype - float64| + atol``. Plain torch is ``ar_grpo_loss_ref`` on the same low-precision inputs with
float32 logits (the stricter of its two modes: ``upcast=False``, bf16 logits as an eager bf16 model computes them, has
2-4x larger gradient errors). ``atol`` is the larger of 1e-6 and one rounding of the output dtype, times the
quantity's scale.
"""
import math

import pytest
import torch

from alphagrpo.kernels import ar_grpo_loss, ar_grpo_loss_ref, use_fused

from _tolerance import _rule  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]




def _case(dtype, n=40, h=40, v=203, device="cpu", seed=0, scale=1.0):
    """Packed sequences with an empty one, a single-token one, a fully padded one and scattered padding."""
    g = torch.Generator().manual_seed(seed)
    # built on the CPU (the reference call below included), moved to ``device`` at the end
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 2).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[[0, 7, 31]] = -100
    bounds = [0, 6, 6, 7, 19, 23, n]
    tokens[19:23] = -100
    cu = torch.tensor(bounds)
    s = len(bounds) - 1
    adv = torch.tensor([1.0, -2.0, 0.5, -1.0, 3.0, 2.0])[:s]
    with torch.no_grad(), use_fused(False):
        _, m = ar_grpo_loss_ref(hidden.float(), weight.float(), tokens, torch.zeros(n), adv, cu)
    logp_old = m["logp"] + 0.3 * torch.randn(n, generator=g)
    logp_old[5] = -1e30                                              # a log-ratio far beyond the clamp
    logp_old[tokens < 0] = float("nan")                              # garbage at padding must not leak
    logp_ref = m["logp"] + 0.2 * torch.randn(n, generator=g)
    return [t.to(device) for t in (hidden, weight, tokens, logp_old, adv, cu, logp_ref)]


def _run(fn, hidden, weight, tokens, logp_old, adv, cu, logp_ref, cast=None, level="sequence", weight_grad=True,
         **kw):
    cast = cast or (lambda t: t)
    h = cast(hidden).detach().requires_grad_()
    w = cast(weight).detach().requires_grad_(weight_grad)
    loss, m = fn(h, w, tokens, logp_old, adv, cu, level=level, logp_ref=logp_ref, beta=0.05, temperature=0.9, **kw)
    loss.backward()
    return loss.detach(), m, h.grad, w.grad


def _check_against_oracle(case, dtype, level):
    got = _run(ar_grpo_loss, *case, level=level)
    with use_fused(False):
        plain = _run(ar_grpo_loss_ref, *case, level=level)
        oracle = _run(ar_grpo_loss_ref, *case, level=level, cast=lambda t: t.double())
    assert got[2].dtype == dtype and got[3].dtype == dtype
    _rule("loss", got[0], plain[0], oracle[0])
    for key in ("logp", "ratio_mean", "ratio_min", "ratio_max", "kl"):
        _rule(key, got[1][key], plain[1][key], oracle[1][key])
    assert got[1]["clip_frac"].item() == pytest.approx(oracle[1]["clip_frac"].item(), rel=1e-6)
    _rule("dL/dhidden", got[2], plain[2], oracle[2])
    _rule("dL/dweight", got[3], plain[3], oracle[3])
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_kernel_matches_float64_reference(fused, dtype, level):
    got = _check_against_oracle(_case(dtype), dtype, level)
    assert 0 < got[1]["clip_frac"].item() < 1                        # both branches of the clip are exercised
    assert (got[1]["logp"][_case(dtype)[2] < 0] == 0).all()


def test_ar_kernel_bounded_workspace_gives_the_same_gradients(fused):
    case = _case(torch.float32, n=70)
    whole = _run(ar_grpo_loss, *case)
    # 2 row blocks x 1 tile of float32: forces several vocab slices and several row chunks
    tiny = _run(ar_grpo_loss, *case, workspace_bytes=32 * 32 * 4 * 2)
    assert torch.equal(whole[0], tiny[0])
    torch.testing.assert_close(tiny[2], whole[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiny[3], whole[3], rtol=1e-5, atol=1e-6)


def test_ar_kernel_frozen_head_returns_only_the_hidden_gradient(fused):
    case = _case(torch.bfloat16)
    both = _run(ar_grpo_loss, *case)
    frozen = _run(ar_grpo_loss, *case, weight_grad=False)
    assert frozen[3] is None and torch.equal(frozen[2], both[2])


def test_ar_kernel_is_deterministic(fused):
    case = _case(torch.bfloat16)
    a, b = _run(ar_grpo_loss, *case, level="token"), _run(ar_grpo_loss, *case, level="token")
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ar_kernel_huge_logits_give_no_nan(fused, dtype):
    case = _case(dtype, scale=300.0)                                 # logits of order 1e3 - 1e4
    got = _run(ar_grpo_loss, *case, level="token")
    with use_fused(False):
        want = _run(ar_grpo_loss_ref, *case, level="token")
    assert torch.isfinite(got[0]) and torch.isfinite(got[2].float()).all() and torch.isfinite(got[3].float()).all()
    scale = want[1]["logp"].abs().max()
    assert (got[1]["logp"] - want[1]["logp"]).abs().max() <= 1e-5 * scale


def test_ar_kernel_rows_whose_logits_are_all_far_below_zero(fused):
    # every logit about -200: exp underflows unless the online log-sum-exp's running max starts at -inf
    hidden, weight, tokens, logp_old, adv, cu, logp_ref = _case(torch.float32)
    weight = 1.0 + 0.1 * weight
    hidden = -5.0 + 0.1 * hidden
    got = _run(ar_grpo_loss, hidden, weight, tokens, logp_old, adv, cu, logp_ref)
    with use_fused(False):
        want = _run(ar_grpo_loss_ref, hidden, weight, tokens, logp_old, adv, cu, logp_ref)
    assert torch.isfinite(got[1]["logp"]).all()
    torch.testing.assert_close(got[1]["logp"], want[1]["logp"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-5)   # gradients cancel to ~1e-3 here


def test_ar_kernel_all_padding_and_single_token(fused):
    hidden, weight, tokens, logp_old, adv, cu, logp_ref = _case(torch.float32)
    pad = torch.full_like(tokens, -100)
    loss, m, gh, gw = _run(ar_grpo_loss, hidden, weight, pad, logp_old, adv, cu, logp_ref)
    assert loss.item() == 0.0 and (gh == 0).all() and (gw == 0).all()
    one = [t[:1] for t in (hidden, tokens.abs(), logp_old.nan_to_num(), logp_ref)]
    got = _run(ar_grpo_loss, one[0], weight, one[1], one[2], adv[:1], torch.tensor([0, 1]), one[3])
    with use_fused(False):
        want = _run(ar_grpo_loss_ref, one[0], weight, one[1], one[2], adv[:1], torch.tensor([0, 1]), one[3])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)


def test_ar_kernel_traces_under_torch_compile(fused):
    hidden, weight, tokens, logp_old, adv, cu, logp_ref = _case(torch.float32)

    def step(h, w):
        loss, m = ar_grpo_loss(h, w, tokens, logp_old, adv, cu, logp_ref=logp_ref, beta=0.05, temperature=0.9)
        return loss, m["clip_frac"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = compiled(h, w)
    loss.backward()
    want = _run(ar_grpo_loss, hidden, weight, tokens, logp_old, adv, cu, logp_ref)
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(h.grad, want[2])
    torch.testing.assert_close(w.grad, want[3])


def test_eager_calls_launch_directly_and_match_the_custom_op_path(fused, monkeypatch):
    """Plain eager calls skip the torch.library op (its dispatch costs host time); the op path gives the same bits."""
    import alphagrpo.kernels.ar_grpo as A
    case = _case(torch.bfloat16)
    used = []
    for name in ("_fwd_op", "_bwd_op"):
        op = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _op=op, _n=name: used.append(_n) or _op(*a))
    direct = _run(ar_grpo_loss, *case)
    assert used == []
    monkeypatch.setattr(A, "direct_launch", lambda *tensors: False)
    via_op = _run(ar_grpo_loss, *case)
    assert used == ["_fwd_op", "_bwd_op"]
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[2], via_op[2]) and torch.equal(direct[3], via_op[3])


def test_ar_kernel_rejects_mixed_dtypes(fused):
    hidden, weight, tokens, logp_old, adv, cu, _ = _case(torch.bfloat16)
    with pytest.raises(TypeError, match="weight.to"):
        ar_grpo_loss(hidden, weight.float(), tokens, logp_old, adv, cu)


# ---------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_kernel_matches_float64_reference_cuda(dtype, level):
    with use_fused(True):
        _check_against_oracle(_case(dtype, n=1000, h=320, v=5003, device="cuda"), dtype, level)


@pytest.mark.cuda
def test_ar_kernel_bounded_workspace_and_determinism_cuda():
    case = _case(torch.bfloat16, n=2048, h=256, v=20001, device="cuda")
    with use_fused(True):
        a = _run(ar_grpo_loss, *case)
        b = _run(ar_grpo_loss, *case)
        small = _run(ar_grpo_loss, *case, workspace_bytes=8 << 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    torch.testing.assert_close(small[2].float(), a[2].float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(small[3].float(), a[3].float(), rtol=2e-2, atol=1e-3)
