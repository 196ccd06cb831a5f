"""The reference GRPO losses (RECIPE.md section 6): golden hand-computed cases and the properties the recipe relies on.

Plain PyTorch only (no Triton): these are the oracles the fused kernels are tested against.
"""
import math

import pytest
import torch

from alphagrpo.kernels import ar_grpo_loss_ref, flow_grpo_loss_ref, sde_mean_std


# ---------------------------------------------------------------------------------------------------- flow (image)
def _flow_golden_inputs():
    # sigma 0.5 -> 0.25, a = 0.7: std_t = 0.7, dt = -0.25, c_x = 1 - 0.49*0.25 = 0.8775,
    # c_v = (1 + 0.49*0.5)*(-0.25) = -0.31125, transition std = 0.7*sqrt(0.25) = 0.35, 2 std^2 = 0.245
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    v = torch.tensor([[0.0, 2.0], [0.0, 0.0]], requires_grad=True)
    mean = torch.tensor([[0.8775, -0.6225], [0.0, 0.0]])
    prev = mean + torch.tensor([[0.2, 0.0], [0.35, -0.35]])
    logp = [-(0.2 ** 2 / 2) / 0.245, -(0.35 ** 2) / 0.245]          # -0.0816..., -0.5
    return x, v, prev, logp


def test_flow_loss_golden_hand_computed():
    x, v, prev, logp = _flow_golden_inputs()
    logp_old = torch.tensor([logp[0] - 1e-3, logp[1]])
    adv = torch.tensor([2.0, -7.0])                                  # -7 is clamped to -5
    loss, m = flow_grpo_loss_ref(v, x, prev, 0.5, 0.25, 0.7, logp_old, adv)
    r0 = math.exp(1e-3)
    # sample 0: max(-2 r0, -2 (1 + 1e-5)) takes the clipped branch; sample 1: ratio 1, -(-5) * 1 = 5
    want = (-2.0 * (1 + 1e-5) + 5.0) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["logp"].tolist() == pytest.approx(logp, rel=1e-6)
    assert m["clip_frac"].item() == 0.5
    assert m["ratio_mean"].item() == pytest.approx((r0 + 1) / 2, rel=1e-6)
    assert m["ratio_min"].item() == pytest.approx(1.0, abs=1e-6)
    assert m["ratio_max"].item() == pytest.approx(r0, rel=1e-6)
    loss.backward()
    # only sample 1 is live: dL/dlogp1 = 5 / 2; dlogp/dmean = (prev - mean) / (D std^2); dmean/dv = c_v
    g = 2.5 * 0.35 / (2 * 0.35 ** 2)
    assert v.grad[0].tolist() == [0.0, 0.0]
    assert v.grad[1].tolist() == pytest.approx([g * -0.31125, -g * -0.31125], rel=1e-5)


def test_flow_loss_golden_kl_term():
    x, v, prev, logp = _flow_golden_inputs()
    base, _ = flow_grpo_loss_ref(v, x, prev, 0.5, 0.25, 0.7, torch.tensor(logp), torch.ones(2))
    loss, m = flow_grpo_loss_ref(v, x, prev, 0.5, 0.25, 0.7, torch.tensor(logp), torch.ones(2),
                                 mean_ref=torch.zeros(2, 2), beta=0.5)
    kl0 = ((0.8775 ** 2 + 0.6225 ** 2) / 2) / 0.245                  # sample 1's mean equals the reference
    assert m["kl"].item() == pytest.approx(kl0 / 2, rel=1e-6)
    assert (loss - base).item() == pytest.approx(0.5 * kl0 / 2, rel=1e-5)


def test_flow_loss_gradient_reaches_x_only_when_asked():
    x, v, prev, logp = _flow_golden_inputs()
    x = x.clone().requires_grad_()
    loss, _ = flow_grpo_loss_ref(v, x, prev, 0.5, 0.25, 0.7, torch.tensor(logp), torch.tensor([0.0, 1.0]))
    loss.backward()
    g = -0.5 * 0.35 / (2 * 0.35 ** 2)                                 # A' = 1, ratio 1: dL/dlogp1 = -1/2
    assert x.grad[1].tolist() == pytest.approx([g * 0.8775, -g * 0.8775], rel=1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 7, 6)])
def test_flow_loss_on_policy_ratio_is_one_and_gradient_is_policy_gradient(shape):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=g, requires_grad=True)
    x, prev = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    adv = torch.tensor([1.5, -0.5, 9.0, 0.0])
    sig, sig_next = torch.tensor([1.0, 0.8, 0.6, 0.4]), torch.tensor([0.9, 0.6, 0.5, 0.1])
    with torch.no_grad():
        _, m = flow_grpo_loss_ref(v, x, prev, sig, sig_next, 0.7, torch.zeros(4), adv)
    loss, m = flow_grpo_loss_ref(v, x, prev, sig, sig_next, 0.7, m["logp"], adv)
    assert torch.equal(m["ratio"], torch.ones(4)) and m["clip_frac"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, v)
    mean, std = sde_mean_std(x, v, sig, sig_next, 0.7)              # the plain policy gradient of mean_i -A' logp_i
    logp = -(prev - mean).pow(2).flatten(1).mean(1) / (2 * std.flatten() ** 2)
    (want,) = torch.autograd.grad((-adv.clamp(-5, 5) * logp).mean(), v)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


def test_flow_loss_huge_log_ratio_stays_finite():
    x, v, prev, logp = _flow_golden_inputs()
    loss, m = flow_grpo_loss_ref(v, x, prev, 0.5, 0.25, 0.7, torch.tensor([-1e30, 1e30]), torch.tensor([-1.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v.grad).all()
    assert m["ratio"].tolist() == pytest.approx([math.exp(20), math.exp(-20)], rel=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(prev=torch.zeros(2, 3)), "one shape"),
    (dict(logp_old=torch.zeros(3)), "logp_old"),
    (dict(beta=0.1), "needs mean_ref"),
    (dict(noise_level=0.0), "deterministic"),
])
def test_flow_loss_rejects_bad_input_with_a_clear_message(bad, match):
    x, v, prev, logp = _flow_golden_inputs()
    kw = dict(v=v, x=x, prev=prev, sigma=0.5, sigma_next=0.25, noise_level=0.7, logp_old=torch.zeros(2),
              advantages=torch.zeros(2))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        flow_grpo_loss_ref(**kw)


# ------------------------------------------------------------------------------------------------------ AR (text)
def _ar_golden_inputs():
    # weight rows e_1/e_2 make the logits readable: hidden t -> logits [0, h_t0, h_t1]
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    hidden = torch.tensor([[0.0, 0.0], [math.log(2), 0.0], [5.0, 5.0], [0.0, math.log(3)]], dtype=torch.float64,
                          requires_grad=True)
    tokens = torch.tensor([0, 1, -100, 2])
    logp = [-math.log(3), math.log(0.5), 0.0, math.log(0.6)]        # softmax [1/3..], [1/4,1/2,1/4], pad, [.2,.2,.6]
    cu = torch.tensor([0, 3, 4])
    logp_old = torch.tensor([logp[0] - 0.1, logp[1] + 0.3, float("nan"), logp[3] - 0.5], dtype=torch.float64)
    return hidden, weight, tokens, logp, cu, logp_old


def test_ar_loss_sequence_level_golden_hand_computed():
    hidden, weight, tokens, logp, cu, logp_old = _ar_golden_inputs()
    loss, m = ar_grpo_loss_ref(hidden, weight, tokens, logp_old, torch.tensor([1.0, 2.0]), cu)
    s0, s1 = math.exp((0.1 - 0.3) / 2), math.exp(0.5)               # padding (NaN logp_old) is ignored
    want = (-min(s0, max(min(s0, 1.28), 0.8)) - min(2 * s1, 2 * 1.28)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["logp"].tolist() == pytest.approx(logp, rel=1e-12)
    assert m["clip_frac"].item() == 0.5 and m["ratio_mean"].item() == pytest.approx((s0 + s1) / 2, rel=1e-12)
    assert (m["ratio_min"].item(), m["ratio_max"].item()) == pytest.approx((s0, s1), rel=1e-12)


def test_ar_loss_token_level_golden_hand_computed():
    hidden, weight, tokens, logp, cu, logp_old = _ar_golden_inputs()
    loss, m = ar_grpo_loss_ref(hidden, weight, tokens, logp_old, torch.tensor([1.0, 2.0]), cu, level="token")
    r = [math.exp(0.1), math.exp(-0.3), math.exp(0.5)]
    seq0 = (-r[0] - r[1]) / 2                                        # both unclipped (0.74 < 0.8 is the smaller)
    seq1 = -2 * 1.28                                                 # 2 * 1.65 > 2 * 1.28: clipped
    assert loss.item() == pytest.approx((seq0 + seq1) / 2, rel=1e-12)
    assert m["clip_frac"].item() == pytest.approx(1 / 3) and m["ratio_max"].item() == pytest.approx(r[2])


def test_ar_loss_golden_k3_kl():
    hidden, weight, tokens, logp, cu, logp_old = _ar_golden_inputs()
    logp_ref = torch.tensor([logp[0] + 0.2, logp[1], 7.0, logp[3] - 0.1], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0])
    base, _ = ar_grpo_loss_ref(hidden, weight, tokens, logp_old, adv, cu)
    loss, m = ar_grpo_loss_ref(hidden, weight, tokens, logp_old, adv, cu, logp_ref=logp_ref, beta=0.1)
    k = lambda d: math.exp(d) - d - 1  # noqa: E731
    kl = ((k(0.2) + k(0.0)) / 2 + k(-0.1)) / 2
    assert m["kl"].item() == pytest.approx(kl, rel=1e-10)
    assert (loss - base).item() == pytest.approx(0.1 * kl, rel=1e-9)


def _packed(seed=0, n=23, h=8, v=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    tokens = torch.randint(0, v, (n,), generator=g)
    cu = torch.tensor([0, 5, 5, 6, 14, 18, 23])                      # an empty and a single-token sequence
    tokens[14:18] = -100                                             # a fully padded sequence
    tokens[[2, 9]] = -100
    adv = torch.tensor([1.0, 3.0, -2.0, 0.5, 4.0, -1.0], dtype=dtype)
    return hidden, weight, tokens, cu, adv


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_loss_on_policy_ratio_is_one_and_gradient_is_policy_gradient(level):
    hidden, weight, tokens, cu, adv = _packed()
    with torch.no_grad():
        _, m = ar_grpo_loss_ref(hidden, weight, tokens, torch.zeros(23), adv, cu)
    loss, m2 = ar_grpo_loss_ref(hidden, weight, tokens, m["logp"], adv, cu, level=level)
    assert m2["ratio_min"].item() == 1.0 and m2["ratio_max"].item() == 1.0 and m2["clip_frac"].item() == 0.0
    got = torch.autograd.grad(loss, (hidden, weight))
    # plain policy gradient: -A_s * logp_t, averaged over each sequence's valid tokens, then over valid sequences
    logp = torch.log_softmax(hidden @ weight.t(), -1).gather(1, tokens.clamp(min=0)[:, None]).squeeze(1)
    terms = []
    for s in range(len(cu) - 1):
        idx = [t for t in range(int(cu[s]), int(cu[s + 1])) if tokens[t] >= 0]
        if idx:
            terms.append(-adv[s] * logp[idx].mean())
    want = torch.autograd.grad(torch.stack(terms).mean(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_loss_ignores_padding_and_empty_sequences(level):
    hidden, weight, tokens, cu, adv = _packed()
    logp_old = torch.randn(23, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 3
    logp_old[tokens < 0] = float("nan")
    logp_old[2] = float("inf")                                       # garbage at padding must not leak
    loss, m = ar_grpo_loss_ref(hidden, weight, tokens, logp_old, adv, cu, level=level)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert (m["logp"][tokens < 0] == 0).all()
    # the same loss from only the non-empty sequences, with their padding dropped
    keep = tokens >= 0
    new_cu = torch.tensor([0] + [int(keep[: int(c)].sum()) for c in cu[1:]])
    nonempty = (new_cu[1:] - new_cu[:-1]) > 0
    bounds = torch.cat([new_cu[:1], new_cu[1:][nonempty]])
    sub, _ = ar_grpo_loss_ref(hidden[keep], weight, tokens[keep], logp_old[keep], adv[nonempty], bounds, level=level)
    assert loss.item() == pytest.approx(sub.item(), rel=1e-12)
    assert (grads[0][~keep] == 0).all()


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_loss_all_padding_is_a_zero_that_backpropagates(level):
    hidden, weight, tokens, cu, adv = _packed()
    tokens = torch.full_like(tokens, -100)
    loss, m = ar_grpo_loss_ref(hidden, weight, tokens, torch.full((23,), float("nan")), adv, cu, level=level,
                               logp_ref=torch.zeros(23), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and (hidden.grad == 0).all() and (weight.grad == 0).all()
    assert m["ratio_mean"].item() == 1.0 and m["ratio_min"].item() == 1.0 and m["clip_frac"].item() == 0.0


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ar_loss_huge_logits_and_log_ratios_stay_finite(level):
    hidden, weight, tokens, cu, adv = _packed(dtype=torch.float32)
    with torch.no_grad():
        hidden.mul_(1e3)
    logp_old = torch.tensor([-1e30, 1e30] * 11 + [-1e30])
    loss, m = ar_grpo_loss_ref(hidden, weight, tokens, logp_old, adv, cu, level=level,
                               logp_ref=torch.full((23,), 1e30), beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert m["ratio_max"].item() <= math.exp(20) * (1 + 1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 23])), "never decrease"),
    (dict(cu_seqlens=torch.tensor([0, 22])), "end at N"),
    (dict(advantages=torch.zeros(3)), "one per sequence"),
    (dict(level="sentence"), "level"),
    (dict(beta=0.1), "needs logp_ref"),
    (dict(tokens=torch.full((23,), 11)), "out of range"),
])
def test_ar_loss_rejects_bad_input_with_a_clear_message(bad, match):
    hidden, weight, tokens, cu, adv = _packed()
    kw = dict(hidden=hidden, weight=weight, tokens=tokens, logp_old=torch.zeros(23), advantages=adv, cu_seqlens=cu)
    kw.update(bad)
    if "advantages" in bad or "cu_seqlens" in bad:
        kw["advantages"] = bad.get("advantages", torch.zeros(len(kw["cu_seqlens"]) - 1))
    with pytest.raises(ValueError, match=match):
        ar_grpo_loss_ref(**kw)
