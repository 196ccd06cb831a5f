"""TinyUMM and its Policy adapter: shapes, positions, the KV-cached think sampler against the replay, CFG, save/load."""
import json

import numpy as np
import pytest
import torch

from alphagrpo.models.policy import CFGConfig, GenRequest
from alphagrpo.models.tiny_policy import TinyUMMPolicy
from alphagrpo.models.tiny_umm import TinyUMM, TinyUMMConfig, patchify, sincos_2d, unpatchify
from alphagrpo.testing import micro_policy

PROMPTS = ["a bright image", "a dark image", "a bright image please"]


def test_patchify_round_trips_and_orders_patches_row_major():
    x = torch.randn(2, 3, 16, 16)
    t = patchify(x, 4)
    assert t.shape == (2, 16, 48)
    assert torch.equal(unpatchify(t, 4, 3, 16), x)
    # patch 1 is the second patch of the first row: columns 4..7 of rows 0..3
    assert torch.equal(t[0, 1].reshape(4, 4, 3).permute(2, 0, 1), x[0, :, 0:4, 4:8])


def test_sincos_table_encodes_row_in_first_half_and_column_in_second():
    tab = sincos_2d(4, 16)
    assert tab.shape == (16, 16)
    grid = tab.reshape(4, 4, 16)
    assert torch.equal(grid[1, 0, :8], grid[1, 3, :8]) and not torch.equal(grid[0, 0, :8], grid[1, 0, :8])
    assert torch.equal(grid[0, 2, 8:], grid[3, 2, 8:]) and not torch.equal(grid[0, 0, 8:], grid[0, 1, 8:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 10)
    with pytest.raises(ValueError, match="patch_pos"):
        TinyUMMConfig(vocab_size=20, patch_pos="rope")


def test_cached_think_sampling_log_probs_equal_the_full_replay():
    pol = micro_policy(0)
    reqs = [GenRequest(p) for p in PROMPTS]
    th = pol.sample_think(reqs, generator=torch.Generator().manual_seed(0), max_new_tokens=6)
    rep = pol.think_replay(reqs, th.tokens)
    with torch.no_grad():
        logp = torch.log_softmax(rep.hidden @ rep.weight.T, dim=-1).gather(1, rep.targets[:, None]).squeeze(1)
    assert torch.allclose(logp, torch.cat(th.logp), atol=1e-5)
    assert rep.cu_seqlens.tolist() == [0] + np.cumsum([len(t) for t in th.tokens]).tolist()


def test_greedy_think_ignores_the_generator_and_bad_temperature_is_refused():
    pol = micro_policy(0)
    reqs = [GenRequest(p) for p in PROMPTS]
    a = pol.sample_think(reqs, generator=torch.Generator().manual_seed(0), max_new_tokens=5, temperature=0)
    b = pol.sample_think(reqs, generator=torch.Generator().manual_seed(9), max_new_tokens=5, temperature=0)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    with pytest.raises(ValueError, match="temperature"):
        pol.sample_think(reqs, generator=torch.Generator(), max_new_tokens=5, temperature=-1)


def test_cfg_scale_one_is_the_conditional_velocity_and_guidance_uses_the_unconditional_branch():
    pol = micro_policy(0)
    for p in pol.model.parameters():  # zero-initialised heads would make every branch equal
        torch.nn.init.normal_(p, std=0.1)
    reqs = [GenRequest(p) for p in PROMPTS]
    th = [torch.tensor(pol.tok.encode("bright")) for _ in reqs]
    x = torch.randn(3, *pol.latent_shape, generator=torch.Generator().manual_seed(1))
    c1 = pol.image_condition(reqs, th, CFGConfig(text_scale=1.0))
    c4 = pol.image_condition(reqs, th, CFGConfig(text_scale=4.0, renorm=False))
    v1 = pol.velocity(x, 0.8, c1)
    v4 = pol.velocity(x, 0.8, c4)
    vu = pol.model.velocity(x, torch.full((3,), 0.8), [(k[3:], v[3:]) for k, v in c4.kv], c4.mask[3:])
    assert torch.allclose(v4, vu + 4.0 * (v1 - vu), atol=1e-5)
    # outside the guidance interval only the conditional branch runs
    assert torch.allclose(pol.velocity(x, 0.2, c4), pol.velocity(x, 0.2, c1), atol=1e-6)


def test_supervised_losses_reach_the_text_and_the_generation_path():
    pol = micro_policy(0)
    reqs = [GenRequest(p) for p in PROMPTS]
    imgs = np.random.default_rng(0).integers(0, 255, size=(3, 16, 16, 3), dtype=np.uint8)
    lm, flow = pol.supervised_losses(reqs, ["bright", "dark", "bright"], imgs, generator=torch.Generator().manual_seed(0))
    (lm + flow).backward()
    m = pol.model
    assert m.lm_head.weight.grad.abs().sum() > 0
    assert m.layers[0].und.qkv.weight.grad.abs().sum() > 0
    assert m.x_in.weight.grad.abs().sum() > 0 or m.v_head.weight.grad.abs().sum() > 0


def test_save_load_round_trip_and_older_checkpoints_load_with_learned_positions(tmp_path):
    pol = micro_policy(3)
    for p in pol.model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    pol.save_pretrained(tmp_path / "ck", extra={"note": 1})
    back = TinyUMMPolicy.from_pretrained(tmp_path / "ck")
    assert back.model.cfg == pol.model.cfg and back.tok.itos == pol.tok.itos
    for (k, a), (_, b) in zip(pol.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert "patch_pos_fixed" not in pol.model.state_dict(), "the fixed table is derived from the config"
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    del meta["model"]["patch_pos"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    old = TinyUMMPolicy.from_pretrained(tmp_path / "ck")
    assert old.model.cfg.patch_pos == "learned" and not old.model.patch_pos_fixed.any()
    meta["format"] = "something/else"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        TinyUMMPolicy.from_pretrained(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TinyUMMPolicy.from_pretrained(tmp_path / "nothing")


def test_model_and_tokenizer_sizes_must_agree():
    pol = micro_policy(0)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyUMMPolicy(TinyUMM(TinyUMMConfig(vocab_size=len(pol.tok) + 1, dim=32, n_layers=1, n_heads=2)), pol.tok)
