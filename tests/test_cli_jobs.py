"""The user-facing jobs end to end on the shipped checkpoint, shrunk to seconds: ``alphagrpo demo`` (the README's
main job) and ``alphagrpo refine --compare``; bad input ends with a one-line error and status 2."""
import json

import pytest

from alphagrpo.cli import main

TINY = ["--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "micro_batch=4", "--set",
        "sampler.num_steps=3", "--set", "sampler.window=1", "--set", "sampler.window_starts=0", "--set",
        "sampler.eval_steps=2", "--set", "data.train_per_task=2", "--set", "image_every=0"]


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_runs_end_to_end_and_ends_with_the_before_after_json(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1", "--eval-n", "3", "--rl-eval", "2", *TINY]) == 0
    res = _last_json(capsys)
    assert res["steps"] == 1 and res["eval_n"] == 3
    saved = json.loads((out / "metrics.json").read_text())
    for part, stored, n in ((res, saved, 3), (res["rl_prompts"], saved["rl_prompts"], 38 * 2)):
        for k in ("before", "after"):   # the printed line is the report's numbers; accuracy counts whole prompts
            assert part[k]["accuracy"] == stored[k]["accuracy"] and part[k]["reward"] == stored[k]["reward"]
            assert abs(part[k]["accuracy"] * n - round(part[k]["accuracy"] * n)) < 1e-9
    assert saved["rl_prompts"]["prompts"] == 38 and saved["rl_prompts"]["samples_each"] == 2   # 2 per task type
    for f in ("before.png", "after.png", "reward_curve.png", "metrics.json"):
        assert (out / f).is_file(), f
    assert (out / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_refine_compare_reports_both_modes_per_round(tmp_path, capsys):
    assert main(["refine", "--compare", "--seeds", "0,1", "--n", "2", "--rounds", "1", "--out", str(tmp_path),
                 *TINY]) == 0
    res = _last_json(capsys)
    assert set(res) == {"reflect", "resample"}
    for mode in res.values():
        assert [r["round"] for r in mode] == [0, 1]
        assert mode[1]["accuracy"] >= mode[0]["accuracy"] and mode[1]["reward"] >= mode[0]["reward"]
    assert (tmp_path / "refinement.png").is_file()
    saved = json.loads((tmp_path / "refine.json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["history"]["reflect"]) == {"0", "1"}
    for r in (0, 1):   # the printed split is the mean over seeds of each seed's split (None sides left out)
        for k in ("thought", "direct"):
            v = [h[str(s)][r]["drawn_accuracy_given_thought"][k] for h in [saved["history"]["reflect"]] for s in (0, 1)
                 if h[str(s)][r]["drawn_accuracy_given_thought"] and h[str(s)][r]["drawn_accuracy_given_thought"][k]
                 is not None]
            assert res["reflect"][r]["drawn_accuracy_given_thought"][k] == (sum(v) / len(v) if v else None)


def test_eval_writes_accuracy_grid_and_the_x0_diagnostic(tmp_path, capsys):
    assert main(["eval", "--n", "2", "--x0", "2", "--oracle-plans", "--out", str(tmp_path), *TINY]) == 0
    res = _last_json(capsys)
    assert res["n"] == 2
    for f in ("eval.json", "grid.png", "x0.png"):
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert res["accuracy"] == saved["accuracy"] and res["plan_accuracy"] == saved["plan_accuracy"]
    assert res["oracle_plan_accuracy"] == saved["oracle_plans"]["accuracy"]
    assert all(v in (0.0, 0.5, 1.0) for v in (res["accuracy"], res["plan_accuracy"], res["oracle_plan_accuracy"]))
    # DVReward's two parts are reported; per image r = sqrt(S * Q), so mean r <= sqrt(mean S * mean Q)
    assert 0.0 < saved["semantic"] <= 1.0 and 0.0 < saved["quality"] <= 1.0
    assert saved["reward"] <= (saved["semantic"] * saved["quality"]) ** 0.5 + 1e-6


def test_bad_input_gets_one_line_error_and_status_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--set", "optim.lr=-1"]) == 2
    assert "optim.lr must be positive" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--rl-eval", "-1"]) == 2
    assert "--rl-eval must be >= 0" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--n", "2", "--set", "data.train_per_task=2"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_plan_split_separates_reasoning_from_drawing():
    from types import SimpleNamespace

    from alphagrpo.eval.evaluate import plan_split
    world = SimpleNamespace(plan_ok=lambda text, rec: text == "right")
    recs = [{"task": "a"}, {"task": "a"}, {"task": "b"}, {"task": "b"}, {"task": "b"}]
    texts = ["right", "wrong", "right", "right", "wrong"]
    correct = [True, False, False, True, True]
    out = plan_split(world, texts, recs, correct)
    assert out["plan_accuracy"] == 3 / 5
    assert out["accuracy_given_plan"] == {"right": 2 / 3, "wrong": 1 / 2}
    assert out["per_task_plan"] == {"a": 1 / 2, "b": 2 / 3}
    assert plan_split(world, ["right"], recs[:1], [True])["accuracy_given_plan"]["wrong"] is None


def test_drawing_from_given_think_texts_uses_them_and_needs_encode_think():
    import numpy as np
    import torch

    from alphagrpo.eval.evaluate import EvalSettings, generate
    from alphagrpo.models.policy import GenRequest
    from alphagrpo.models.registry import ModelConfig, load_policy
    pol = load_policy(ModelConfig())
    reqs = [GenRequest("a red circle"), GenRequest("a blue square")]
    plans = ["large red circle at x1y1", "small blue square at x0y2"]
    s = EvalSettings(num_steps=2, shift=3.0)
    imgs, texts = generate(pol, reqs, s, generator=torch.Generator().manual_seed(0), think_texts=plans)
    assert texts == plans and imgs.shape[0] == 2
    again, _ = generate(pol, reqs, s, generator=torch.Generator().manual_seed(0), think_texts=plans[::-1])
    assert not np.array_equal(imgs, again)      # the image follows the given text
    with pytest.raises(ValueError, match="2 think texts for 1 requests"):
        generate(pol, reqs[:1], s, generator=torch.Generator(), think_texts=plans)

    class NoEncode:
        pass
    with pytest.raises(ValueError, match="encode_think"):
        generate(NoEncode(), reqs, s, generator=torch.Generator(), think_texts=plans)


def test_think_split_counts_how_often_the_model_reasons_and_what_it_buys():
    from alphagrpo.eval.evaluate import think_split
    texts = ["plan : a", "", "plan : b", " ", "plan : c"]
    correct = [True, False, False, True, True]
    out = think_split(texts, correct)
    assert out["think_rate"] == 3 / 5                              # blank counts as no think
    assert out["accuracy_given_think"] == {"thought": 2 / 3, "direct": 1 / 2}
    assert think_split(["", ""], [True, False]) == {"think_rate": 0.0,
                                                    "accuracy_given_think": {"thought": None, "direct": 0.5}}


