"""``alphagrpo pretrain``: reproducible from its seed, it learns, it stops where told, it continues a checkpoint,
and it refuses a checkpoint that lacks the world's words or a CUDA device that is not there."""
import json

import numpy as np
import pytest
import torch

from alphagrpo.models.policy import GenRequest
from alphagrpo.testing import brightness_world
from alphagrpo.train import pretrain as P

SIZE = dict(dim=32, n_layers=1, n_heads=2, image_size=16, max_positions=160)


@pytest.fixture(autouse=True)
def _tiny_size(monkeypatch):
    monkeypatch.setitem(P.MODEL_SIZES, "test", SIZE)


def _run(tmp_path, name, **kw):
    args = dict(size="test", steps=8, batch=4, lr=3e-3, seed=0, log_every=1000)
    args.update(kw)
    return P.pretrain(brightness_world(n_train=8), out=tmp_path / name, **args)


def _fixed_losses(policy):
    world = brightness_world(n_train=8)
    rng = np.random.default_rng(5)
    recs = world.train[:4]
    reqs, thinks, imgs = P.make_batch(world, recs, rng, edit_frac=0.0)
    with torch.no_grad():
        lm, flow = policy.supervised_losses(reqs, thinks, imgs, generator=torch.Generator().manual_seed(0), p_drop=0.0)
    return lm.item(), flow.item()


def test_pretraining_is_reproducible_from_the_seed(tmp_path):
    a, rep = _run(tmp_path, "a")
    b, _ = _run(tmp_path, "b")
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["pretrain"]
    assert saved["steps"] == 8 and saved["seed"] == 0 and saved["device"] == "cpu" and rep["parameters"] > 0


def test_pretraining_lowers_both_losses_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    from alphagrpo.train.srr import reflection_words
    world = brightness_world(n_train=8)
    fresh = TinyUMMPolicy.create(sorted(set(world.words) | set(reflection_words())), **SIZE)
    lm0, flow0 = _fixed_losses(fresh)
    trained, _ = _run(tmp_path, "t", steps=60)
    lm1, flow1 = _fixed_losses(trained)
    assert lm1 < 0.5 * lm0 and flow1 < flow0, (lm0, lm1, flow0, flow1)


def test_stop_after_and_init_continue_a_checkpoint(tmp_path):
    _, rep = _run(tmp_path, "s", steps=10, stop_after=3)
    assert rep["steps"] == 3
    cont, rep2 = _run(tmp_path, "c", steps=2, init=str(tmp_path / "s"))
    assert rep2["init"] == str(tmp_path / "s") and rep2["previous"]["steps"] == 3
    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    assert cont.tok.itos == TinyUMMPolicy.from_pretrained(tmp_path / "s").tok.itos


def test_init_without_the_world_words_is_refused(tmp_path):
    _run(tmp_path, "s", steps=1)
    with pytest.raises(ValueError, match="lacks words"):
        P.pretrain(brightness_world(n_train=4), out=tmp_path / "x", size="test", steps=1, batch=2,
                   init=str(tmp_path / "s"), extra_words=["zebra"])


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from alphagrpo.cli import main
    assert main(["pretrain", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_edit_examples_pair_a_wrong_image_with_the_reflection_instruction():
    from alphagrpo.train.config import get_recipe
    from alphagrpo.worlds.registry import load_world
    cfg = get_recipe("tiny_shapes")
    cfg.data.train_per_task = 1
    world = load_world(cfg.data)
    reqs, thinks, imgs = P.make_batch(world, world.train[:6], np.random.default_rng(0), edit_frac=1.0)
    assert all(isinstance(r, GenRequest) and r.image is not None and r.instruction for r in reqs)
    assert all("plan :" in t for t in thinks) and imgs.shape == (6, 32, 32, 3)


def test_think_and_reflect_drop_empty_that_share_of_their_examples_think_texts(tmp_path):
    from alphagrpo.train.config import get_recipe
    from alphagrpo.worlds.registry import load_world
    cfg = get_recipe("tiny_shapes")
    cfg.data.train_per_task = 8
    world = load_world(cfg.data)
    recs = world.train[:120]
    # think_drop=0 draws no extra random numbers: the batch is the one pretraining made before the option existed
    base = P.make_batch(world, recs, np.random.default_rng(3), edit_frac=0.3, think_drop=0.0, reflect_drop=0.0)
    rng, same = np.random.default_rng(3), []           # the batch as pretraining drew it before the options
    for r in recs:
        same.append(world.sample_edit(r, rng) if rng.random() < 0.3 else world.sample_target(r, rng))
    assert base[1] == [x[1] if len(x) == 3 else x[0] for x in same]
    assert np.array_equal(base[2], np.stack([x[2] if len(x) == 3 else x[1] for x in same]))
    assert all(t for t in base[1])
    reqs, thinks, _ = P.make_batch(world, recs * 4, np.random.default_rng(3), edit_frac=0.3, think_drop=0.5)
    t2i = [t for r, t in zip(reqs, thinks) if r.image is None]
    edits = [t for r, t in zip(reqs, thinks) if r.image is not None]
    assert edits and all("plan :" in t for t in edits)          # refinement examples always keep their reflection
    empty = sum(1 for t in t2i if t == "") / len(t2i)
    assert 0.4 < empty < 0.6, empty                              # ~330 T2I examples: 0.5 +- 0.1 is > 3 sigma
    assert all(" at x" in t for t in t2i if t)                  # the others keep their plan
    with pytest.raises(ValueError, match="think_drop"):
        _run(tmp_path, "x", think_drop=1.0)
    # reflect_drop does the same to the refinement examples only
    reqs, thinks, _ = P.make_batch(world, recs * 4, np.random.default_rng(3), edit_frac=0.3, reflect_drop=0.5)
    t2i = [t for r, t in zip(reqs, thinks) if r.image is None]
    edits = [t for r, t in zip(reqs, thinks) if r.image is not None]
    assert all(" at x" in t for t in t2i)
    empty = sum(1 for t in edits if t == "") / len(edits)
    assert 0.35 < empty < 0.65, empty                            # ~140 refinement examples: > 3 sigma
    assert all("plan :" in t for t in edits if t)
    with pytest.raises(ValueError, match="reflect_drop"):
        _run(tmp_path, "y", reflect_drop=-0.1)

