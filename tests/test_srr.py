"""Self-reflective refinement inside the trainer (RECIPE.md section 7) and the inference-time refinement loop."""
import numpy as np
import pytest
import torch

from alphagrpo.rewards import DVReward
from alphagrpo.testing import BrightnessVerifier, brightness_world, micro_policy
from alphagrpo.train.config import apply_overrides, get_recipe
from alphagrpo.eval.refine import refine
from alphagrpo.train.trainer import GRPOTrainer
from alphagrpo.eval.evaluate import EvalSettings

S3 = EvalSettings(num_steps=3, batch=8, max_think_tokens=3)   # a tiny evaluation sampler


def srr_cfg(**over):
    sets = ["prompts_per_step=2", "group_size=4", "micro_batch=8", "max_think_tokens=4", "cfg.text_scale=1.0",
            "cfg.image_scale=1.0", "cfg_refine.text_scale=1.0", "cfg_refine.image_scale=1.0", "srr.initial_samples=3", "srr.num_steps=6", "srr.window=2",
            "srr.window_starts=0,1,2,3,4", "sampler.num_steps=4", "sampler.window=2", "sampler.window_starts=0",
            "optim.lr=1e-2"] + [f"{k}={v}" for k, v in over.items()]
    return apply_overrides(get_recipe("tiny_shapes_srr"), sets)


def make_trainer(cfg, verifier=None, seed=0):
    torch.manual_seed(seed)
    world = brightness_world()
    reward = DVReward(verifier or world.verifier)
    return GRPOTrainer(micro_policy(seed), reward, cfg, generator=torch.Generator().manual_seed(seed)), world


def test_fpr_in_the_trainer_never_rewards_a_non_improving_refinement():
    seen_non_improving = 0
    for seed in range(3):
        tr, world = make_trainer(srr_cfg(), seed=seed)
        res = tr.step(world.train[:2])
        assert res.metrics["srr"] == 1
        non_improving = res.rewards <= res.init
        seen_non_improving += int(non_improving.sum())
        assert torch.equal(res.rectified[non_improving], res.init[non_improving])
        assert bool((res.advantages[non_improving] <= 1e-6).all())
        assert not torch.equal(res.rectified, res.rewards) or not bool(non_improving.any())
        tr.close()
    assert seen_non_improving > 0, "no refinement was non-improving: the FPR check above tested nothing"


def test_srr_step_reports_how_often_a_diagnosis_was_written():
    import dataclasses
    tr, world = make_trainer(srr_cfg(**{"micro_batch": "3"}), seed=2)   # 8 refinements in chunks of 3, 3, 2
    sample = tr.policy.sample_think

    def blank_some(requests, **kw):   # the micro policy always writes; blank every other text (one also just spaces)
        th = sample(requests, **kw)
        texts = [("" if i % 3 == 0 else "  ") if i % 2 == 0 else t for i, t in enumerate(th.texts)]
        return dataclasses.replace(th, texts=texts)
    tr.policy.sample_think = blank_some
    res = tr.step(world.train[:2])
    m, chunks = res.metrics, res.chunks
    assert [len(ro.think_texts) for ro in chunks] == [3, 3, 2]
    written = sum(bool(t.strip()) for ro in chunks for t in ro.think_texts)
    assert written == 3 and m["samples"] == 8 and m["think_rate"] == 3 / 8
    tr.close()


class WorseAfterStage1(BrightnessVerifier):
    """Scores 0.9 while the trainer picks initial images, 0.1 afterwards: no refinement can improve."""

    def __init__(self, n_stage1):
        self.calls, self.n_stage1 = 0, n_stage1

    def score(self, images, qls):
        self.calls += len(images)
        v = 0.9 if self.calls <= self.n_stage1 else 0.1
        return [[v] * len(q) for q in qls]


def test_fpr_off_keeps_raw_rewards():
    cfg = srr_cfg(**{"reward.fpr": "false"})
    tr, world = make_trainer(cfg, verifier=WorseAfterStage1(n_stage1=2 * cfg.srr.initial_samples))
    res = tr.step(world.train[:2])
    assert bool((res.rewards <= res.init).any()), "no non-improving refinement: FPR off would be untested"
    assert torch.equal(res.rectified, res.rewards)
    tr.close()


def test_srr_step_is_skipped_when_no_refinement_improved():
    cfg = srr_cfg()
    tr, world = make_trainer(cfg, verifier=WorseAfterStage1(n_stage1=2 * cfg.srr.initial_samples))
    before = {k: v.clone() for k, v in tr.policy.model.state_dict().items()}
    m = tr.step(world.train[:2]).metrics
    assert m["skipped"] == 1 and m["improved_frac"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in tr.policy.model.state_dict().items())
    tr.close()


def test_srr_gradient_reaches_only_think_text_and_window_steps():
    cfg = srr_cfg()
    tr, world = make_trainer(cfg)
    pol = tr.policy
    calls = []
    orig_velocity, orig_cond = pol.velocity, pol.image_condition

    def velocity(x, sigma, cond):
        calls.append((float(sigma), torch.is_grad_enabled()))
        return orig_velocity(x, sigma, cond)

    conds = []

    def image_condition(*a, **k):
        c = orig_cond(*a, **k)
        conds.append(c)
        return c

    pol.velocity, pol.image_condition = velocity, image_condition
    und0 = [p.detach().clone() for p in pol.model.und_parameters()]
    res = tr.step(world.train[:2])
    assert res.metrics["skipped"] == 0
    window_sigmas = {st.sigma for ro in res.chunks for st in ro.steps}
    grad_sigmas = [s for s, g in calls if g]
    assert len(window_sigmas) == cfg.srr.window
    assert set(grad_sigmas) == window_sigmas, "grad-enabled velocity calls must be exactly the window steps"
    assert all(not t.requires_grad for c in conds for kv in c.kv for t in kv), "context must be detached"
    # the text path got gradient from the think replay: the understanding weights changed
    assert not all(torch.equal(a, b) for a, b in zip(und0, pol.model.und_parameters()))
    tr.close()


def test_srr_updates_text_weights_through_the_think_loss():
    cfg = srr_cfg(**{"loss.text_weight": "1.0"})
    tr, world = make_trainer(cfg, seed=1)
    head = tr.policy.model.lm_head.weight.clone()
    tr.step(world.train[:2])
    assert not torch.equal(head, tr.policy.model.lm_head.weight)
    tr.close()


class Scripted:
    """Reward per call from a script, to drive the refinement loop deterministically."""

    def __init__(self, values):
        self.values, self.i = list(values), 0

    def __call__(self, images, records):
        from alphagrpo.rewards import RewardResult
        v = self.values[min(self.i, len(self.values) - 1)]
        self.i += 1
        n = len(images)
        return RewardResult(rewards=torch.full((n,), v), semantic=[[v]] * n, quality=[[v]] * n)


def test_refinement_stops_at_the_round_limit_and_keeps_the_best_image():
    world = brightness_world(n_test=3)
    pol = micro_policy(0)
    # initial 0.2, round 1 better (0.4), round 2 worse (0.3), round 3 would be 0.45 but the limit is 2
    res = refine(pol, Scripted([0.2, 0.4, 0.3, 0.45]), world.test, S3, rounds=2, judge=world.judge)
    assert [h["round"] for h in res.history] == [0, 1, 2]
    assert res.rounds_used == [2, 2, 2]
    assert torch.allclose(res.rewards, torch.full((3,), 0.4))
    for i in range(3):
        assert len(res.trace[i]) == 3
        assert np.array_equal(res.images[i], res.trace[i][1][1]), "best image must be round 1's"
    for r, h in enumerate(res.history):   # how often the model wrote a think text before drawing, per round
        assert h["thought"] == np.mean([bool(res.trace[i][r][0].strip()) for i in range(3)])
        # accuracy of the images drawn in this round, split by whether a think text came before them
        split = {k: [world.judge(res.trace[i][r][1], world.test[i]) for i in range(3)
                     if bool(res.trace[i][r][0].strip()) == (k == "thought")] for k in ("thought", "direct")}
        assert h["drawn_accuracy_given_thought"] == {k: (float(np.mean(v)) if v else None) for k, v in split.items()}


def test_refinement_figure_shows_the_most_improved_prompts(tmp_path):
    from alphagrpo.eval.figures import refinement_figure
    world = brightness_world(n_test=3)
    res = refine(micro_policy(0), Scripted([0.2, 0.4]), world.test, S3, rounds=1)
    res.trace[1][-1] = res.trace[1][-1][:2] + (0.9, [0.9])  # prompt 1 improved most
    recs = [dict(r, quality_questions=[]) for r in world.test]
    shown = refinement_figure(tmp_path / "f.png", res, recs, n=2)
    assert shown[0] == 1 and len(shown) == 2 and (tmp_path / "f.png").stat().st_size > 0


def test_refinement_stops_early_when_every_question_passes():
    world = brightness_world(n_test=2)
    res = refine(micro_policy(0), Scripted([0.9]), world.test, S3, rounds=5)
    assert res.rounds_used == [0, 0] and len(res.history) == 1
    with pytest.raises(ValueError, match="rounds"):
        refine(micro_policy(0), Scripted([0.9]), world.test, rounds=-1)


def test_resample_control_draws_fresh_text_to_image_samples_and_keeps_the_best(monkeypatch):
    import alphagrpo.eval.refine as R
    seen = []
    real = R.generate

    def spy(policy, reqs, s, **kw):
        seen.append([(r.image is None, r.instruction) for r in reqs])
        return real(policy, reqs, s, **kw)

    monkeypatch.setattr(R, "generate", spy)
    world = brightness_world(n_test=2)
    kw = dict(rounds=2, judge=world.judge)
    res = refine(micro_policy(0), Scripted([0.2, 0.1, 0.3]), world.test, S3, mode="resample", **kw)
    assert len(seen) == 3 and all(no_img and instr is None for call in seen for no_img, instr in call)
    assert torch.allclose(res.rewards, torch.full((2,), 0.3))
    seen.clear()
    refine(micro_policy(0), Scripted([0.2, 0.1, 0.3]), world.test, S3, mode="reflect", **kw)
    assert all(not no_img and instr for call in seen[1:] for no_img, instr in call), "reflect shows the image"
    with pytest.raises(ValueError, match="mode"):
        refine(micro_policy(0), Scripted([0.9]), world.test, mode="bestof")


def test_redraw_accuracy_weights_diagnosed_and_undiagnosed_redraws_by_the_diagnosis_rate():
    from alphagrpo.commands.ablate import redraw_accuracy
    row = {"reflect_rate": 0.25, "redraw_accuracy_diagnosed": 0.6, "redraw_accuracy_undiagnosed": 0.2}
    assert redraw_accuracy(row) == pytest.approx(0.25 * 0.6 + 0.75 * 0.2)
    assert redraw_accuracy(dict(row, reflect_rate=1.0, redraw_accuracy_undiagnosed=None)) == 0.6
    assert redraw_accuracy(dict(row, reflect_rate=None)) is None       # no refinement round was run


def test_ablation_study_trains_every_variant_and_seed_and_writes_a_table(tmp_path):
    import json

    from alphagrpo.commands.ablate import START_ROW_RL, run_study
    ck = tmp_path / "ck"
    micro_policy(0).save_pretrained(ck)
    extra = ["prompts_per_step=2", "group_size=4", "micro_batch=8", "max_think_tokens=3", "cfg.text_scale=1.0",
             "sampler.num_steps=3", "sampler.window=1", "sampler.window_starts=0", "sampler.eval_steps=3",
             "image_every=0", "eval_batch=8"]
    t = run_study("scoring", seeds=[0, 1], steps=1, eval_n=4, out=tmp_path / "ab", extra=extra, checkpoint=str(ck),
                  world=brightness_world(n_test=4))
    assert list(t["variants"]) == [START_ROW_RL, "confidence", "binary"]
    for v in t["variants"].values():   # the table's mean and spread are those of its seeds' runs
        accs = [r["accuracy"] for r in v["runs"]]
        assert len(accs) == 2 and v["accuracy_mean"] == pytest.approx(sum(accs) / 2)
        assert v["accuracy_sd"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert json.loads((tmp_path / "ab" / "ablation_scoring.json").read_text())["steps"] == 1


def test_fpr_study_reports_initial_and_refined_accuracy_with_the_start_checkpoint_as_reference(tmp_path):
    from alphagrpo.commands.ablate import START_ROW, redraw_accuracy, run_study
    ck = tmp_path / "ck"
    micro_policy(0).save_pretrained(ck)
    extra = ["prompts_per_step=2", "group_size=4", "micro_batch=8", "max_think_tokens=3", "cfg.text_scale=1.0",
             "cfg.image_scale=1.0", "sampler.num_steps=3", "sampler.window=1", "sampler.window_starts=0",
             "sampler.eval_steps=3", "image_every=0", "eval_batch=8", "srr.initial_samples=2", "srr.num_steps=3",
             "srr.window=1", "srr.window_starts=0"]
    t = run_study("fpr", seeds=[0], steps=1, eval_n=3, out=tmp_path / "ab", extra=extra, checkpoint=str(ck),
                  world=brightness_world(n_test=3))
    assert list(t["variants"]) == [START_ROW, "fpr on", "fpr off"]
    for v in t["variants"].values():
        run = v["runs"][0]
        # the refined accuracy is measured on the best image so far: never below the initial images'
        assert run["accuracy"] >= run["initial_accuracy"] and run["reward"] >= run["initial_reward"]
        assert ("reflect_rate_mean" in v) == (run["reflect_rate"] is not None)
        # rates over at most 3 refined prompts, and the redraw accuracy is their diagnosis-weighted combination
        fractions = {0.0, 1 / 3, 0.5, 2 / 3, 1.0}
        for k in ("reflect_rate", "redraw_accuracy_diagnosed", "redraw_accuracy_undiagnosed"):
            assert run[k] is None or min(abs(run[k] - f) for f in fractions) < 1e-9, (k, run[k])
        assert run["redraw_accuracy"] == redraw_accuracy(run)
    for name in ("fpr_on_s0", "fpr_off_s0"):   # each trained policy is kept, loadable for `refine --checkpoint`
        from alphagrpo.models.registry import ModelConfig, load_policy
        pol = load_policy(ModelConfig(path=str(tmp_path / "ab" / name / "policy")), "cpu", world=brightness_world(n_test=3))
        ref = micro_policy(0).model.state_dict()
        assert {k: v.shape for k, v in pol.model.state_dict().items()} == {k: v.shape for k, v in ref.items()}
