"""Golden values and properties of the recipe math (RECIPE.md sections 2-5, 7)."""
import math

import pytest
import torch

from alphagrpo import (dvreward, euler_step, flow_sigmas, group_advantages, rectify_false_positives,
                       sample_sde_window, sde_step, sde_step_logprob)


def test_flow_sigmas_golden_and_float32():
    s = flow_sigmas(2, shift=3.0)
    assert s.dtype == torch.float32
    assert s.tolist() == pytest.approx([1.0, 0.75, 0.0])
    s16 = flow_sigmas(16)
    assert s16.shape == (17,) and s16[0] == 1.0 and s16[-1] == 0.0
    assert bool((s16[1:] < s16[:-1]).all()), "grid must decrease strictly"
    unshifted = flow_sigmas(4, shift=1.0)
    assert torch.allclose(unshifted, torch.linspace(1, 0, 5))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_flow_sigmas_rejects_bad_step_counts(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(bad)


def test_sde_step_golden_hand_computed():
    # x=1, v=2, sigma=.5, sigma_next=.25, a=.5: dt=-.25, std_t=.5, c_x=.9375, c_v=1.125*-.25 -> mean=.375, std=.25
    x, v = torch.ones(1, 1), torch.full((1, 1), 2.0)
    prev, mean, std = sde_step(x, v, 0.5, 0.25, 0.5, noise=torch.full((1, 1), 2.0))
    assert mean.item() == pytest.approx(0.375)
    assert std.item() == pytest.approx(0.25)
    assert prev.item() == pytest.approx(0.375 + 0.25 * 2.0)


def test_sde_step_at_sigma_one_uses_substitute_in_denominator():
    x, v = torch.zeros(1, 3), torch.zeros(1, 3)
    _, _, std_default = sde_step(x, v, 1.0, 0.75, 0.7, noise=torch.zeros(1, 3))
    # default substitute is sigma_next (the grid's second value): std_t = .7 * sqrt(1 / (1 - .75)) = 1.4
    assert std_default.item() == pytest.approx(1.4 * math.sqrt(0.25))
    _, _, std_sub = sde_step(x, v, 1.0, 0.75, 0.7, noise=torch.zeros(1, 3), sigma_one_substitute=0.5)
    assert std_sub.item() == pytest.approx(0.7 * math.sqrt(1 / 0.5) * math.sqrt(0.25))
    assert torch.isfinite(std_default).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sde_step_with_zero_noise_equals_euler_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
    v = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
    sig = flow_sigmas(16)
    for k in range(16):
        prev, mean, std = sde_step(x, v, sig[k], sig[k + 1], 0.0, generator=g)
        euler = x.float() + v.float() * (sig[k + 1] - sig[k])
        assert torch.equal(mean, euler) and torch.equal(prev, euler)
        assert torch.equal(euler_step(x, v, sig[k], sig[k + 1]), euler)
        assert float(std.abs().max()) == 0.0


def test_sde_step_accepts_per_sample_sigmas():
    sig = flow_sigmas(16)
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    idx = torch.tensor([0, 4, 9])
    noise = torch.randn(3, 5)
    prev, mean, std = sde_step(x, v, sig[idx], sig[idx + 1], 0.7, noise=noise)
    for i, k in enumerate(idx.tolist()):
        p1, m1, s1 = sde_step(x[i:i + 1], v[i:i + 1], float(sig[k]), float(sig[k + 1]), 0.7, noise=noise[i:i + 1])
        assert torch.allclose(mean[i], m1[0]) and torch.allclose(std[i], s1[0]) and torch.allclose(prev[i], p1[0])
    assert std.shape == (3, 1)


def test_step_logprob_of_own_sample_is_minus_half_in_expectation():
    g = torch.Generator().manual_seed(1)
    sig = flow_sigmas(16)
    x, v = torch.randn(8, 4096, generator=g), torch.randn(8, 4096, generator=g)
    prev, mean, std = sde_step(x, v, sig[3], sig[4], 0.7, generator=g)
    lp = sde_step_logprob(prev, mean, std)
    assert lp.shape == (8,) and lp.dtype == torch.float32
    assert lp.mean().item() == pytest.approx(-0.5, abs=0.01)
    # a mean over elements, not a sum: doubling the elements does not double the log-prob
    assert lp.min().item() > -0.6


def test_step_logprob_golden_and_errors():
    prev, mean = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])
    assert sde_step_logprob(prev, mean, torch.tensor([[2.0]])).item() == pytest.approx(-(1 + 9) / 2 / 8)
    with pytest.raises(ValueError, match="positive"):
        sde_step_logprob(prev, mean, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        sde_step_logprob(prev, mean[:, :1], 1.0)


def test_sde_window_is_seeded_and_in_range():
    starts = {sample_sde_window(16, 10, [0, 1], torch.Generator().manual_seed(s)).start for s in range(40)}
    assert starts == {0, 1}
    w1 = [sample_sde_window(40, 5, range(11), torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(w1)) == 1 and len(w1[0]) == 5 and 0 <= w1[0].start <= 10
    g = torch.Generator().manual_seed(3)
    seq = [sample_sde_window(40, 5, range(11), g).start for _ in range(50)]
    assert len(set(seq)) > 3, "successive draws from one generator must differ"
    with pytest.raises(ValueError, match="do not fit"):
        sample_sde_window(16, 10, [0, 7])
    with pytest.raises(ValueError, match="empty"):
        sample_sde_window(16, 10, [])


def test_group_advantages_golden_global_std():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a = group_advantages(r, torch.tensor([0, 0, 1, 1]))
    std = math.sqrt(1.25)  # population std of 1..4
    assert a.tolist() == pytest.approx([-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)] * 2, rel=1e-6)
    ag = group_advantages(r, torch.tensor([0, 0, 1, 1]), std="group")
    assert ag.tolist() == pytest.approx([-0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4)] * 2, rel=1e-6)


def test_group_advantages_have_zero_mean_per_group_and_any_labels():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5 * 7, generator=g)
    ids = torch.tensor([10, 3, 99, 4, 5]).repeat_interleave(7)
    for mode in ("global", "group"):
        a = group_advantages(r, ids, std=mode)
        for gid in ids.unique():
            assert abs(a[ids == gid].mean().item()) < 1e-5
    assert torch.equal(group_advantages(torch.full((6,), 0.3), torch.arange(6) // 3), torch.zeros(6))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.rand(4), torch.zeros(3))
    with pytest.raises(ValueError, match="'global' or 'group'"):
        group_advantages(torch.rand(4), torch.zeros(4), std="batch")


def test_fpr_never_gives_positive_advantage_to_a_non_improving_refinement():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n_groups, G = 4, 6
        init = torch.rand(n_groups, generator=g).repeat_interleave(G)
        r = torch.rand(n_groups * G, generator=g)
        rect = rectify_false_positives(r, init)
        a = group_advantages(rect, torch.arange(n_groups).repeat_interleave(G))
        non_improving = r <= init
        assert bool((a[non_improving] <= 1e-6).all())
        assert torch.equal(rect[~non_improving], r[~non_improving])
        assert torch.equal(rect[non_improving], init[non_improving])


def test_fpr_with_nothing_improved_gives_all_zero_advantages():
    rect = rectify_false_positives(torch.tensor([0.2, 0.1, 0.3]), 0.3)
    assert torch.equal(group_advantages(rect, torch.zeros(3)), torch.zeros(3))


def test_dvreward_golden_modes_and_binary():
    sem, qua = [1.0, 0.5], [0.5, 0.5]
    assert dvreward(sem, qua).item() == pytest.approx(math.sqrt(0.75 * 0.5))
    assert dvreward(sem, qua, mode="arithmetic").item() == pytest.approx(0.625)
    assert dvreward(sem, mode="semantic").item() == pytest.approx(0.75)
    assert dvreward(sem, qua, binary=True).item() == pytest.approx(0.0)  # 0.5 is not > 0.5
    batch = dvreward(torch.tensor([[1.0, 0.5], [0.2, 0.2]]), torch.tensor([[0.5, 0.5], [0.8, 0.8]]))
    assert batch.tolist() == pytest.approx([math.sqrt(0.375), math.sqrt(0.16)])
    ragged = dvreward([[1.0], [0.5, 0.0, 1.0]], [[1.0, 1.0], [0.5]])
    assert ragged.tolist() == pytest.approx([1.0, 0.5])


def test_dvreward_rejects_missing_questions():
    with pytest.raises(ValueError, match="mode='semantic'"):
        dvreward([1.0], [])
    with pytest.raises(ValueError, match="mode"):
        dvreward([1.0], [1.0], mode="harmonic")
