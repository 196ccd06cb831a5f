"""The training-side view of the shapes world: refinement examples and the holistic-judge emulation."""
import numpy as np
import pytest

from alphagrpo.worlds.shapes.world import HolisticShapesVerifier, shapes_edit_example, shapes_plan_ok
from alphagrpo.worlds import shapes as S


def test_edit_examples_show_a_wrong_image_name_a_failed_question_and_target_the_right_scene():
    rng = np.random.default_rng(0)
    v = S.ShapesVerifier()
    named = 0
    for task in S.TASKS[:8]:
        rec = S.make_prompt(task, "medium", rng)
        wrong, think, right = shapes_edit_example(rec, rng)
        qs = [q["question"] for q in rec["semantic_questions"]]
        assert v.judge(right, qs), "the target must satisfy the prompt"
        plan = think.split("plan :", 1)[1].strip()
        assert S.satisfies(S.parse_plan(plan), rec), "the think text's plan must satisfy the prompt"
        if think.startswith("wrong :"):
            named += 1
            q = think[len("wrong :"):].split(" ; plan :")[0].strip()
            assert q in qs and not v.answer(wrong, q)[1], "the named question must fail on the wrong image"
        assert wrong.dtype == np.uint8 and wrong.shape == right.shape
    assert named >= 6


def test_holistic_verifier_gives_a_coarse_overall_score_and_passes_other_questions_through():
    rng = np.random.default_rng(1)
    rec = S.make_prompt("color", "hard", rng)
    hv = HolisticShapesVerifier(S.ShapesVerifier(), [rec])
    good = S.render(S.Scene.from_json(rec["scene"]))
    empty = S.render(S.Scene(()))
    q = f"Does this image match: {rec['prompt']}?"
    (g,), (e,) = hv.score([good], [[q]])[0], hv.score([empty], [[q]])[0]
    assert g == 1.0 and e < 0.5 and round(e * 10) == e * 10
    direct = rec["semantic_questions"][0]["question"]
    assert hv.score([good], [[direct]]) == S.ShapesVerifier().score([good], [[direct]])


@pytest.fixture
def small_world_synth(monkeypatch):
    """load_world with a 2-per-task pretraining split (the real one is 500 per task and takes seconds)."""
    real = S.synthesize_splits

    def small(n_per_task, n_test, n_extra_per_task, seed):
        return real(n_per_task=2, n_test=n_test, n_extra_per_task=n_extra_per_task, seed=seed)

    monkeypatch.setattr(S, "synthesize_splits", small)
    return lambda seed: real(n_per_task=2, n_test=1024, n_extra_per_task=0, seed=seed)


def test_held_out_subset_covers_every_task_type(small_world_synth):
    """The test split is ordered by task; the world must hand out a shuffled prefix, not the first few tasks."""
    from alphagrpo.worlds import registry as W
    from alphagrpo.train.config import DataConfig

    w = W.load_world(DataConfig(train_per_task=1, test_size=64))
    assert len({r["task"] for r in w.test}) >= 15
    assert len(w.train) == len(S.TASKS)


def test_rl_prompts_are_unseen_by_pretraining_unless_asked(small_world_synth):
    from alphagrpo.worlds import registry as W
    from alphagrpo.train.config import DataConfig

    pre_train, pre_test, _ = small_world_synth(0)
    seen = {r["prompt"] for r in pre_train}
    unseen = W.load_world(DataConfig(train_per_task=2, test_size=32))
    assert len(unseen.train) == 2 * len(S.TASKS)
    assert not {r["prompt"] for r in unseen.train} & seen
    assert not {r["prompt"] for r in unseen.train} & {r["prompt"] for r in pre_test}
    pre = W.load_world(DataConfig(train_per_task=2, test_size=32, train_split="pretrain"))
    assert [r["prompt"] for r in pre.train] == [r["prompt"] for r in pre_train]
    assert [r["prompt"] for r in pre.test] == [r["prompt"] for r in unseen.test]
    with pytest.raises(ValueError, match="train_split"):
        DataConfig(train_split="all")


def test_a_checkpoint_for_another_vocabulary_is_refused_with_the_missing_words(tmp_path):
    from alphagrpo.testing import brightness_world, micro_policy
    from alphagrpo.models.registry import ModelConfig, load_policy
    world = brightness_world(n_test=2)
    micro_policy(0).save_pretrained(tmp_path / "ok")
    assert load_policy(ModelConfig(path=str(tmp_path / "ok")), world=world).tok.stoi
    world.words = list(world.words) + ["x1y2"]
    with pytest.raises(ValueError, match=r"missing 1 words.*x1y2.*alphagrpo pretrain"):
        load_policy(ModelConfig(path=str(tmp_path / "ok")), world=world)


def test_quality_per_object_changes_the_reward_not_the_judge(small_world_synth):
    """data.quality_per_object="mean": the reward's per-object quality scores average the objects; the strict judge
    (evaluation's ground truth) is the same."""
    import numpy as np

    from alphagrpo.worlds import registry as W
    from alphagrpo.train.config import DataConfig
    from alphagrpo.worlds.shapes.accuracy import inject_defect

    every = W.load_world(DataConfig(train_per_task=1, test_size=8))
    mean = W.load_world(DataConfig(train_per_task=1, test_size=8, quality_per_object="mean"))
    scene = S.Scene((S.ShapeObject("circle", "red", "large", 0, 0), S.ShapeObject("cross", "blue", "small", 2, 1),
                     S.ShapeObject("square", "yellow", "small", 1, 0)))
    bad = inject_defect(scene, "solid_shapes", 32, np.random.default_rng(0))
    q = [[S.QUALITY["solid_shapes"][0], S.QUALITY["plain_background"][0]]]
    (pe, be), (pm, bm) = every.verifier.score([bad], q)[0], mean.verifier.score([bad], q)[0]
    assert pe < 0.05 < 0.5 < pm and be == bm
    rec = every.test[0]
    assert every.judge(bad, rec) == mean.judge(bad, rec)
    with pytest.raises(ValueError, match="quality_per_object"):
        DataConfig(quality_per_object="all")


def test_plan_ok_reads_the_stated_layout_of_a_think_text():
    rng = np.random.default_rng(3)
    rec = S.make_prompt("2d_spatial_relation", "medium", rng)
    plan = S.plan_text(S.sample_scene(rec, rng))
    assert shapes_plan_ok(plan, rec)
    assert shapes_plan_ok(f"wrong : {rec['semantic_questions'][0]['question']} ; plan : {plan}", rec)  # refinement
    dropped = "; ".join(plan.split("; ")[1:]) or "empty"      # one required object left out
    assert not shapes_plan_ok(dropped, rec)
    assert not shapes_plan_ok("large red circle at", rec)      # unreadable: not ok, no exception
    assert not shapes_plan_ok("", rec)
