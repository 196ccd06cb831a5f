"""Tests of the shapes-world research probes (not part of the default suite: ``pytest experiments``)."""
import json


TINY = ["--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "micro_batch=4", "--set",
        "sampler.num_steps=3", "--set", "sampler.window=1", "--set", "sampler.window_starts=0", "--set",
        "sampler.eval_steps=2", "--set", "data.train_per_task=2", "--set", "image_every=0"]

def test_rl_step_probe_shares_random_numbers_across_moved_copies(tmp_path, capsys):
    """experiments/rl_step_probe.py: a zero-length move scores exactly as the unmoved weights (every copy is scored with
    the same sampling seed), and every other row is a reward in [0, 1]."""
    from experiments.rl_step_probe import main as probe
    out = tmp_path / "probe.json"
    assert probe(["--prompts", "2", "--group", "2", "--rounds", "1", "--etas", "0,0.5", "--sign-lrs", "1e-4",
                  "--random-lrs", "1e-4", "--out", str(out), *TINY]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [r["move"] for r in rows][:2] == ["none", "along gradient (L2 length)"]
    assert rows[1]["size"] == 0.0 and rows[1]["same"] == rows[0]["same"] and rows[1]["held_out"] == rows[0]["held_out"]
    assert res["grad_norm"] > 0 and all(0.0 <= r[k] <= 1.0 for r in rows for k in ("same", "held_out"))


def test_reward_alignment_counts_pairs_inside_groups_only():
    import numpy as np

    from experiments.reward_alignment import correct_advantage, pairwise_agreement

    groups = np.array([0, 0, 0, 1, 1, 2, 2])
    correct = np.array([True, False, False, True, False, True, True])
    perfect = np.array([0.9, 0.1, 0.2, 0.3, 0.2, 0.0, 0.0])   # group 1's correct one beats only its own wrong one
    assert pairwise_agreement(perfect, correct, groups) == (1.0, 3)     # group 2 has no wrong image: no pairs
    inverted = np.array([0.1, 0.9, 0.1, 0.2, 0.3, 5.0, 5.0])
    assert pairwise_agreement(inverted, correct, groups) == (0.5 / 3, 3)  # one loss, one tie (half), one loss
    assert correct_advantage(perfect, correct, groups) > 0 > correct_advantage(inverted, correct, groups)


def test_drawing_errors_tallies_each_planned_object_in_its_cell():
    from alphagrpo.worlds.shapes import ShapeObject

    from experiments.drawing_errors import tally
    a = ShapeObject("circle", "red", "large", 0, 0)
    b = ShapeObject("square", "blue", "small", 1, 0)       # neighbour of a
    c = ShapeObject("cross", "green", "large", 2, 2)
    det = [{(0, 0): {"shape": "circle", "color": "red", "size": "large"},
            (1, 0): {"shape": "circle", "color": "blue", "size": "small"}},      # b drawn as a circle
           {(2, 2): {"shape": "cross", "color": "green", "size": "large"}},
           {}]                                                                  # c missing
    out = tally([[a, b], [c], [c]], det)
    assert out["objects"] == 4 and out["accuracy_per_object"] == 0.5
    assert out["by_count"] == {"1": 0.5, "2": 0.5}
    assert out["by_neighbours"] == {"0": 0.5, "1": 0.5}
    assert out["by_size"] == {"large": 2 / 3, "small": 0.0}
    assert out["shape_confusion"] == {"circle": {"circle": 1}, "cross": {"cross": 1, "missing": 1},
                                      "square": {"circle": 1}}


def test_plan_rl_probe_scores_plans_with_shared_sampling_seeds(tmp_path):
    """experiments/plan_rl_probe.py: with a zero learning rate the weights do not move, so the plan accuracies after equal
    the ones before (both sampled with the same seeds); the reward curve has one entry per step."""
    from experiments.plan_rl_probe import main as probe
    out = tmp_path / "p.json"
    assert probe(["--steps", "2", "--lr", "0", "--prompts", "2", "--group", "2", "--eval-n", "8", "--rl-eval-n", "8",
                  "--train-per-task", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["after"] == res["before"] and len(res["reward_curve"]) == 2
    assert all(0.0 <= v <= 1.0 for part in ("before", "after") for v in res[part].values())
