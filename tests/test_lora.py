"""LoRA fine-tuning (the paper's setup): a fresh adapter changes nothing, merging keeps the function, adapters
survive save/load, a LoRA run trains the adapters only and resumes exactly."""
import pytest
import torch

from alphagrpo.models.lora import LoRALinear, add_lora, lora_layers, merge_lora
from alphagrpo.models.policy import CFGConfig, GenRequest
from alphagrpo.models.tiny_policy import TinyUMMPolicy
from alphagrpo.testing import brightness_world, micro_policy
from alphagrpo.train.config import apply_overrides, get_recipe
from alphagrpo.train.loop import train

REQS = [GenRequest("make a bright image"), GenRequest("make a dark image please")]


def _outputs(pol):
    """Think-token hidden states and a velocity, deterministic functions of the weights."""
    think = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    with torch.no_grad():
        h = pol.think_replay(REQS, think).hidden
        cond = pol.image_condition(REQS, think, CFGConfig(text_scale=2.0))
        x = torch.randn((2,) + pol.latent_shape, generator=torch.Generator().manual_seed(0))
        v = pol.velocity(x, 0.7, cond)
    return h, v


def _policy():
    """A micro policy whose zero-initialised output layers are randomized too, so every output depends on every
    layer."""
    pol = micro_policy(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pol


def _perturb_adapters(pol, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_fresh_adapters_change_nothing_and_are_all_that_trains():
    pol = _policy()
    h0, v0 = _outputs(pol)
    n_all = sum(p.numel() for p in pol.model.parameters())
    pol.enable_lora(rank=2, alpha=4.0)
    h1, v1 = _outputs(pol)
    assert torch.equal(h0, h1) and torch.equal(v0, v1)
    train_p = list(pol.trainable_parameters())
    names = lora_layers(pol.model)
    assert names and all((".und." in n or ".gen." in n) for n in names)
    assert len(train_p) == 2 * len(names) and sum(p.numel() for p in train_p) < n_all / 5
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        pol.enable_lora(rank=2, alpha=4.0)


def test_merging_keeps_the_function():
    pol = _policy()
    pol.enable_lora(rank=2, alpha=4.0)
    _perturb_adapters(pol)
    h, v = _outputs(pol)
    h0, v0 = _outputs(_policy())
    assert not torch.allclose(v, v0) and not torch.allclose(h, h0)   # the adapters do something once trained
    pol.merge_lora()
    assert not lora_layers(pol.model) and pol.lora is None
    hm, vm = _outputs(pol)
    torch.testing.assert_close(hm, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vm, v, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in pol.model.parameters())


def test_adapters_survive_save_and_load(tmp_path):
    pol = _policy()
    pol.enable_lora(rank=3, alpha=6.0, targets=("layers.*.gen.qkv",))
    _perturb_adapters(pol)
    pol.save_pretrained(tmp_path / "p")
    back = TinyUMMPolicy.from_pretrained(tmp_path / "p")
    assert back.lora == pol.lora and lora_layers(back.model) == ["layers.0.gen.qkv"]
    for a, b in zip(_outputs(pol), _outputs(back)):
        assert torch.equal(a, b)


def test_bad_targets_and_ranks_get_clear_errors():
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(micro_policy(0).model, 2, 4.0, ["decoder.*"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(torch.nn.Linear(4, 4), 0, 1.0)
    with pytest.raises(ValueError, match="lora.rank must be >= 0"):
        apply_overrides(get_recipe("tiny_shapes"), ["lora.rank=-1"])
    cfg = apply_overrides(get_recipe("tiny_shapes"), ["lora.targets=layers.*.gen.qkv,layers.*.gen.proj"])
    assert cfg.lora.targets == ("layers.*.gen.qkv", "layers.*.gen.proj")


def test_merge_lora_on_a_plain_module_is_a_no_op():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3))
    assert merge_lora(m) == 0 and isinstance(m[0], torch.nn.Linear)


def _cfg(tmp_path, steps):
    sets = [f"steps={steps}", "prompts_per_step=2", "group_size=4", "micro_batch=4", "max_think_tokens=4",
            "sampler.num_steps=4", "sampler.window=2", "sampler.window_starts=0,1", "sampler.eval_steps=4",
            "cfg.text_scale=1.0", "optim.lr=3e-3", "ckpt_every=2", "image_every=0", f"out_dir={tmp_path}",
            "lora.rank=2", "lora.alpha=4"]
    return apply_overrides(get_recipe("tiny_shapes"), sets)


def test_a_lora_run_trains_only_the_adapters_and_resumes_exactly(tmp_path):
    start = micro_policy(1)
    base0 = {k: v.clone() for k, v in start.model.state_dict().items()}
    hist, straight = train(_cfg(tmp_path, 4), brightness_world(), tmp_path / "a", policy=start)
    assert not all(h["skipped"] for h in hist)
    sd = straight.model.state_dict()
    moved = [k for k in sd if "lora_" in k and not torch.equal(sd[k], torch.zeros_like(sd[k]))]
    assert any(k.endswith("lora_B.weight") for k in moved), "no adapter was trained"
    for k, v in base0.items():                 # every base weight is where it started
        key = k if k in sd else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(sd[key], v), f"{k} moved under LoRA"
    train(_cfg(tmp_path, 2), brightness_world(), tmp_path / "b", policy=micro_policy(1))
    _, resumed = train(_cfg(tmp_path, 4), brightness_world(), tmp_path / "b", resume=True)
    assert resumed.lora == straight.lora
    sb = resumed.model.state_dict()
    assert set(sb) == set(sd) and all(torch.equal(sd[k], sb[k]) for k in sd), "resumed LoRA run diverged"
