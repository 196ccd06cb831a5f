"""The fused AR (linear -> log-prob -> GRPO) kernel against its float64 reference, by STYLE.md's tolerance rule.

CPU tests run the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set per test): tiny shapes only.
Tests marked ``cuda`` repeat the comparison on a GPU. Tolerance rule: ``max|kernel - float64| <= 2 * max|plain
torch in the same dtype - float64| + atol``. Plain torch is ``ar_grpo_loss_ref`` on the same low-precision inputs with
float32 logits (the stricter of its two modes: ``upcast=False``, bf16 logits as an eager bf16 model computes them, has
2-4x larger gradient errors). ``atol`` is the larger of 1e-6 and one rounding of the output dtype, times the
quantity's scale.
The default fused path is the chunked one (``impl="chunked"``); ``chunk_rows`` forces many chunks on tiny shapes.
``_case``'s sequences have lengths 6, 0, 1, 12, 4, 17: with ``chunk_rows=6`` the first fills a chunk exactly and two
are longer than a chunk (the GSPO extra pass).
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
    logp_old[9] = -1e30                                              # ... in a sequence with A < 0 (unclipped branch)
    logp_old[tokens < 0] = float("nan")                              # garbage at padding must not leak
    logp_ref = m["logp"] + 0.2 * torch.randn(n, generator=g)
    return [t.to(device) for t in (hidden, weight, tokens, logp_old, adv, cu, logp_ref)]


def _run(fn, hidden, weight, tokens, logp_old, adv, cu, logp_ref, cast=None, level="sequence", weight_grad=True,
         gout=1.0, **kw):
    cast = cast or (lambda t: t)
    h = cast(hidden).detach().requires_grad_()
    w = cast(weight).detach().requires_grad_(weight_grad)
    loss, m = fn(h, w, tokens, logp_old, adv, cu, level=level, logp_ref=logp_ref, beta=0.05, temperature=0.9, **kw)
    (loss * gout).backward()
    return loss.detach(), m, h.grad, w.grad


def _check_against_oracle(case, dtype, level, weight_grad=True, gout=1.0, **kw):
    got = _run(ar_grpo_loss, *case, level=level, weight_grad=weight_grad, gout=gout, **kw)
    with use_fused(False):
        plain = _run(ar_grpo_loss_ref, *case, level=level, gout=gout)
        oracle = _run(ar_grpo_loss_ref, *case, level=level, gout=gout, cast=lambda t: t.double())
    assert got[2].dtype == dtype
    _rule("loss", got[0], plain[0], oracle[0])
    for key in ("logp", "ratio_mean", "ratio_min", "ratio_max", "kl"):
        _rule(key, got[1][key], plain[1][key], oracle[1][key])
    assert got[1]["clip_frac"].item() == pytest.approx(oracle[1]["clip_frac"].item(), rel=1e-6)
    _rule("dL/dhidden", got[2], plain[2], oracle[2])
    if weight_grad:
        assert got[3].dtype == dtype
        _rule("dL/dweight", got[3], plain[3], oracle[3])
    else:
        assert got[3] is None
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable_head", "frozen_head"])
def test_ar_kernel_matches_float64_reference(fused, dtype, level, weight_grad):
    got = _check_against_oracle(_case(dtype), dtype, level, weight_grad=weight_grad)
    assert 0 < got[1]["clip_frac"].item() < 1                        # both branches of the clip are exercised
    assert (got[1]["logp"][_case(dtype)[2] < 0] == 0).all()


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("rows", [1, 5, 6, 13])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable_head", "frozen_head"])
def test_ar_kernel_many_chunks_match_float64_reference(fused, level, rows, weight_grad):
    # rows=6: sequence 0 fills a chunk exactly; sequences of 12 and 17 tokens take the GSPO extra pass
    _check_against_oracle(_case(torch.bfloat16), torch.bfloat16, level, weight_grad=weight_grad, chunk_rows=rows)


def test_ar_kernel_gspo_without_a_host_plan_takes_the_extra_pass(fused, monkeypatch):
    import alphagrpo.kernels.ar_grpo as A
    monkeypatch.setattr(A, "_host_cu", lambda cu, host: None)       # as with cu_seqlens on the GPU, no host copy
    calls = []
    real = A._logits_into
    monkeypatch.setattr(A, "_logits_into", lambda out, h, w: calls.append(out.shape[0]) or real(out, h, w))
    _check_against_oracle(_case(torch.float32), torch.float32, "sequence", chunk_rows=16)
    assert calls == [16, 16, 8, 16, 16]          # 40 rows in 3 chunks; the extra pass reuses the last one's logits


def test_ar_plan_keeps_sequences_whole_and_splits_long_ones():
    from alphagrpo.kernels.ar_grpo import plan_chunks
    cu = [0, 6, 6, 7, 19, 23, 40]                                    # lengths 6, 0, 1, 12, 4, 17
    assert plan_chunks(40, 6, "sequence", cu, 6) == [
        0, 2, 1, 0, 6,                                               # seq 0 (+ the empty seq 1) fills the chunk
        2, 3, 1, 6, 7,                                               # seq 2 alone: seq 3 is long
        3, 4, 2, 7, 13, 19,                                          # seq 3: two sub-chunks (extra pass)
        4, 5, 1, 19, 23,
        5, 6, 3, 23, 29, 35, 40]
    assert plan_chunks(40, 40, "sequence", cu, 6) == [0, 6, 1, 0, 40]
    assert plan_chunks(40, 16, "token", None, 6) == [0, 0, 1, 0, 16, 0, 0, 1, 16, 32, 0, 0, 1, 32, 40]
    assert plan_chunks(40, 16, "sequence", None, 6) == [0, 6, 3, 0, 16, 32, 40]


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_kernel_scales_its_forward_gradients_by_the_incoming_gradient(fused, level):
    _check_against_oracle(_case(torch.float32), torch.float32, level, gout=-2.5, chunk_rows=6)


def test_ar_kernel_second_backward_says_what_to_do(fused):
    hidden, weight, tokens, logp_old, adv, cu, _ = _case(torch.float32)
    loss, _ = ar_grpo_loss(hidden.clone().requires_grad_(), weight, tokens, logp_old, adv, cu)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_ar_kernel_without_grad_is_one_pass_and_computes_no_gradient(fused, monkeypatch):
    import alphagrpo.kernels.ar_grpo as A
    hidden, weight, tokens, logp_old, adv, cu, logp_ref = _case(torch.bfloat16)
    with_grad = _run(ar_grpo_loss, hidden, weight, tokens, logp_old, adv, cu, logp_ref, chunk_rows=16)
    for name in ("_dlogits_rows", "_mm_into", "_ar_chunked"):
        monkeypatch.setattr(A, name, lambda *a, **k: pytest.fail("a gradient pass ran without grad"))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        loss, m = ar_grpo_loss(h, w, tokens, logp_old, adv, cu, logp_ref=logp_ref, beta=0.05, temperature=0.9,
                               chunk_rows=16)
    assert not loss.requires_grad
    loss2, m2 = ar_grpo_loss(hidden, weight, tokens, logp_old, adv, cu, logp_ref=logp_ref, beta=0.05,
                             temperature=0.9, chunk_rows=16)              # inputs without requires_grad
    assert torch.equal(m["logp"], with_grad[1]["logp"]) and torch.equal(loss, with_grad[0])
    assert torch.equal(m2["logp"], m["logp"]) and torch.equal(loss2, loss)


def test_ar_kernel_frozen_head_runs_no_weight_gradient_gemm(fused, monkeypatch):
    import alphagrpo.kernels.ar_grpo as A
    hidden, weight, *_ = case = _case(torch.bfloat16)
    outs = []
    for name in ("_mm_into", "_mm_f32"):
        real = getattr(A, name)
        monkeypatch.setattr(A, name, lambda out, *a, _r=real, **k: outs.append(tuple(out.shape)) or _r(out, *a, **k))
    frozen = _run(ar_grpo_loss, *case, weight_grad=False, chunk_rows=16)
    assert tuple(weight.shape) not in outs and outs.count((16, hidden.shape[1])) == 2   # only dL/dhidden GEMMs
    both = _run(ar_grpo_loss, *case, chunk_rows=16)
    assert frozen[3] is None and torch.equal(frozen[2], both[2])


def test_ar_kernel_does_not_write_into_its_inputs(fused):
    case = _case(torch.bfloat16)
    saved = [t.clone() for t in case]
    _run(ar_grpo_loss, *case, chunk_rows=6)
    for before, after in zip(saved, case):
        assert torch.equal(before, after) or (before.isnan() == after.isnan()).all() and torch.equal(
            before.nan_to_num(), after.nan_to_num())


def test_ar_host_plan_argument_matches_the_cpu_plan(fused, monkeypatch):
    """``cu_seqlens_host`` gives the same plan as a CPU ``cu_seqlens`` (here the CPU copy is hidden from the kernel):
    8 logits GEMMs for the whole-sequence chunks + 3 for the extra pass of the 12- and 17-token sequences, where the
    plan-less layout (7 chunks of one group) would take 13."""
    import alphagrpo.kernels.ar_grpo as A
    case = _case(torch.float32)
    calls = []
    real = A._logits_into
    monkeypatch.setattr(A, "_logits_into", lambda out, h, w: calls.append(out.shape[0]) or real(out, h, w))
    a = _run(ar_grpo_loss, *case, chunk_rows=6)
    assert len(calls) == 11
    calls.clear()
    monkeypatch.setattr(A, "_host_cu", lambda cu, host, _real=A._host_cu: _real(torch.zeros(1, device="meta"), host))
    b = _run(ar_grpo_loss, *case, chunk_rows=6, cu_seqlens_host=[0, 6, 6, 7, 19, 23, 40])
    assert len(calls) == 11
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    calls.clear()
    _run(ar_grpo_loss, *case, chunk_rows=6)                          # no host copy at all now: one group
    assert len(calls) == 13
    with pytest.raises(ValueError, match="host copy of cu_seqlens"):
        _run(ar_grpo_loss, *case, chunk_rows=6, cu_seqlens_host=[0, 6, 40])
    wrong = [0, 6, 6, 8, 19, 23, 40]                                 # well formed, but not cu_seqlens: opt-in check
    with pytest.raises(ValueError, match="differs from cu_seqlens"):
        _run(ar_grpo_loss, *case, chunk_rows=6, cu_seqlens_host=wrong, validate=True)


def test_ar_checks_and_surrogate_never_read_device_tensors_on_the_host():
    """On a non-CPU device (``meta`` here: any host read raises) validation and the O(N) surrogate run without a
    sync unless ``validate=True`` asks for one."""
    from alphagrpo.kernels.ar_grpo import _check, _surrogate, _surrogate_grad
    n, s = 12, 3
    hid, w = torch.empty(n, 8, device="meta"), torch.empty(11, 8, device="meta")
    tok, lp, adv = torch.empty(n, dtype=torch.long, device="meta"), torch.empty(n, device="meta"), \
        torch.empty(s, device="meta")
    cu = torch.empty(s + 1, dtype=torch.long, device="meta")
    lengths = _check(hid, w, tok, lp, adv, cu, "sequence", 0.2, 0.28, 1.0, lp, 0.1)
    for level in ("sequence", "token"):
        loss, m = _surrogate(lp, tok, lp, adv, lengths, level, 0.2, 0.28, lp, 0.1)
        g = _surrogate_grad(lp, tok >= 0, lp, lp, lp, level, 0.2, 0.28, lp, 0.1, seq_lengths=lengths, seq_adv=adv,
                            seq_inv_n=adv)
        assert loss.device.type == "meta" and g.shape == (n,)
    with pytest.raises((NotImplementedError, RuntimeError)):
        _check(hid, w, tok, lp, adv, cu, "sequence", 0.2, 0.28, 1.0, lp, 0.1, validate=True)


def test_ar_kernel_tiled_fallback_still_matches(fused, monkeypatch):
    _check_against_oracle(_case(torch.bfloat16), torch.bfloat16, "sequence", impl="tiled")
    import alphagrpo.kernels.ar_grpo_tiled as T
    used = []
    monkeypatch.setattr(T.LinearLogProbFunction, "apply",
                        lambda *a, _f=T.LinearLogProbFunction.apply: used.append(1) or _f(*a))
    monkeypatch.setenv("ALPHAGRPO_AR_IMPL", "tiled")
    _run(ar_grpo_loss, *_case(torch.float32))
    assert used == [1]
    with pytest.raises(ValueError, match="impl"):
        _run(ar_grpo_loss, *_case(torch.float32), impl="fast")


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


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_kernel_is_deterministic(fused, level):
    case = _case(torch.bfloat16)
    a, b = _run(ar_grpo_loss, *case, level=level, chunk_rows=6), _run(ar_grpo_loss, *case, level=level, chunk_rows=6)
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


@pytest.mark.parametrize("fn", [ar_grpo_loss, ar_grpo_loss_ref])
@pytest.mark.parametrize("cu", [[0], [0, 0, 0]], ids=["no_sequences", "empty_sequences"])
def test_ar_loss_of_an_empty_batch_is_a_zero_that_backpropagates(fused, fn, cu):
    h, w = torch.zeros(0, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss, m = fn(h, w, torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(len(cu) - 1), torch.tensor(cu))
    loss.backward()
    assert loss.item() == 0.0 and m["ratio_min"].item() == m["ratio_max"].item() == 1.0
    assert h.grad.shape == (0, 8) and (w.grad == 0).all()


def test_ar_kernel_takes_int32_tokens_and_boundaries(fused):
    case = _case(torch.float32)
    narrow = list(case)
    narrow[2], narrow[5] = case[2].int(), case[5].int()
    a, b = _run(ar_grpo_loss, *narrow, chunk_rows=6), _run(ar_grpo_loss, *case, chunk_rows=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("host", [None, [0, 6, 6, 7, 19, 23, 40]], ids=["no_host_plan", "host_plan"])
def test_ar_kernel_traces_under_torch_compile(fused, host):
    """The chunked Triton path itself under torch.compile (an opaque custom op; ``aot_eager``: the CPU has no
    inductor-compiled Triton). Inside the trace a CPU ``cu_seqlens`` is not read: GSPO plans without it."""
    torch.compiler.reset()
    hidden, weight, tokens, logp_old, adv, cu, logp_ref = _case(torch.float32)

    def step(h, w):
        loss, m = ar_grpo_loss(h, w, tokens, logp_old, adv, cu, logp_ref=logp_ref, beta=0.05, temperature=0.9,
                               chunk_rows=16, cu_seqlens_host=host)
        return loss, m["clip_frac"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = compiled(h, w)
    loss.backward()
    want = _run(ar_grpo_loss, hidden, weight, tokens, logp_old, adv, cu, logp_ref, chunk_rows=16)
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(h.grad, want[2])
    torch.testing.assert_close(w.grad, want[3])


def test_eager_calls_launch_directly_and_match_the_custom_op_path(fused, monkeypatch):
    """Plain eager calls skip the torch.library op (its dispatch costs host time); the op path gives the same bits."""
    import alphagrpo.kernels.ar_grpo as A
    case = _case(torch.bfloat16)
    used = []
    for name in ("_chunked_op", "_logp_op"):
        op = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _op=op, _n=name: used.append(_n) or _op(*a))
    direct = _run(ar_grpo_loss, *case, chunk_rows=6)
    with torch.no_grad():
        direct_ng = ar_grpo_loss(*case[:6], chunk_rows=6)
    assert used == []
    monkeypatch.setattr(A, "direct_launch", lambda *tensors: False)
    via_op = _run(ar_grpo_loss, *case, chunk_rows=6)
    with torch.no_grad():
        via_op_ng = ar_grpo_loss(*case[:6], chunk_rows=6)
    assert used == ["_chunked_op", "_logp_op"]
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[2], via_op[2]) and torch.equal(direct[3], via_op[3])
    assert torch.equal(direct_ng[1]["logp"], via_op_ng[1]["logp"])


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


@pytest.mark.cuda
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable_head", "frozen_head"])
def test_ar_kernel_many_chunks_and_long_sequences_cuda(level, weight_grad):
    case = _case(torch.bfloat16, n=1000, h=320, v=5003, device="cuda")
    case[5] = torch.tensor([0, 128, 128, 300, 999, 1000], device="cuda")   # 128 = a chunk edge, 699 > a chunk
    case[4] = case[4][:5]
    with use_fused(True):
        _check_against_oracle(case, torch.bfloat16, level, weight_grad=weight_grad, chunk_rows=128,
                              cu_seqlens_host=case[5].cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable_head", "frozen_head"])
def test_ar_kernel_never_syncs_the_host_cuda(level, weight_grad):
    """After a warm-up call (Triton compiles, cuBLAS probes once), a fwd+bwd and a no-grad call run with
    ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host synchronisation raises."""
    case = _case(torch.bfloat16, n=1000, h=320, v=5003, device="cuda")
    host = case[5].cpu()
    with use_fused(True):
        _run(ar_grpo_loss, *case, level=level, weight_grad=weight_grad, chunk_rows=128, cu_seqlens_host=host)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _run(ar_grpo_loss, *case, level=level, weight_grad=weight_grad, chunk_rows=128, cu_seqlens_host=host)
            with torch.no_grad():
                ar_grpo_loss(*case[:6], level=level, logp_ref=case[6], chunk_rows=128)
        finally:
            torch.cuda.set_sync_debug_mode("default")
