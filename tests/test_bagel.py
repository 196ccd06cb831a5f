"""BAGEL through nemo-automodel's modules, on the tiny random BAGEL (``alphagrpo.models.bagel.testing``), CPU only.

Covers: strict loading, batch independence, rollout/replay parity of both paths (think tokens, image steps), the CFG
and renorm formulas against float64, LoRA gradients and checkpointing, the no-op of fresh adapters, the reference,
and LoRA checkpoints (adapters + a pointer to the base).
"""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("nemo_automodel.components.models.bagel", reason="needs the bagel extra (nemo-automodel --no-deps)")
pytest.importorskip("peft")

from alphagrpo import kernels  # noqa: E402
from alphagrpo.kernels.sde import sde_mean_std  # noqa: E402
from alphagrpo.models.bagel.policy import Condition, combine_cfg  # noqa: E402
from alphagrpo.models.policy import CFGConfig, GenRequest  # noqa: E402
from alphagrpo.models.registry import ModelConfig, load_policy  # noqa: E402
from alphagrpo.sampler import euler_step, sample_flow, sde_step, sde_step_logprob  # noqa: E402

PROMPTS = ["a red circle", "two blue squares left of a big green triangle", "a cat", "three small stars"]
T2I = CFGConfig(text_scale=4.0, low=0.4, high=1.0)
REFINE = CFGConfig(text_scale=4.0, image_scale=2.0, low=0.0, high=1.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from alphagrpo.models.bagel.testing import save_tiny_bagel
    return save_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny")


def load(path, **kw):
    return load_policy(ModelConfig(kind="bagel", path=str(path), dtype="bfloat16", **kw))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def refine_requests(pol, n=2):
    img = pol.decode(torch.randn(n, *pol.latent_shape, generator=gen(5)))
    return [GenRequest(PROMPTS[i], image=img[i], instruction=f"make the {PROMPTS[i]} bigger") for i in range(n)]


def test_loader_is_strict_and_round_trips_every_key(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from alphagrpo.models.bagel.loading import load_modules
    from alphagrpo.models.bagel.testing import tiny_bagel
    bagel, vae, _ = load_modules(folder)
    saved = load_file(str(folder / "ema.safetensors"))
    got = {k.removeprefix("model."): v for k, v in bagel.state_dict().items()}
    assert set(got) == set(saved)                       # 0 missing, 0 unexpected
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    ref, _, _ = tiny_bagel()
    assert set(got) == {k.removeprefix("model.") for k in ref.state_dict()}
    assert not bagel.training and not vae.training and next(bagel.parameters()).dtype == torch.bfloat16
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    extra = dict(saved, **{"connector.fc3.weight": torch.zeros(2)})
    save_file(extra, str(bad / "ema.safetensors"))
    with pytest.raises(ValueError, match="1 unexpected"):
        load_modules(bad)
    save_file({k: v for k, v in saved.items() if k != "llm2vae.bias"}, str(bad / "ema.safetensors"))
    with pytest.raises(ValueError, match="1 missing"):
        load_modules(bad)


def test_loader_refuses_other_dtypes_and_names_the_missing_folder(folder):
    with pytest.raises(ValueError, match="bfloat16"):
        load_policy(ModelConfig(kind="bagel", path=str(folder)))
    with pytest.raises(ValueError, match="model.path"):
        load_policy(ModelConfig(kind="bagel", dtype="bfloat16"))
    with pytest.raises(ValueError, match="resolution=N"):
        load(folder, options=("size=3",))
    assert load(folder, options=("resolution=32",)).latent_shape == (4, 16)


def test_one_sample_alone_equals_the_same_sample_in_a_ragged_batch(folder):
    pol = load(folder)
    reqs = [GenRequest(p) for p in PROMPTS]
    alone = pol.sample_think(reqs[1:2], generator=gen(), max_new_tokens=12, temperature=0)
    batch = pol.sample_think(reqs, generator=gen(), max_new_tokens=12, temperature=0)
    assert torch.equal(alone.tokens[0], batch.tokens[1])
    torch.testing.assert_close(alone.logp[0], batch.logp[1], rtol=0, atol=2e-6)
    x = torch.randn(len(reqs), *pol.latent_shape, generator=gen(1))
    va = pol.velocity(x[1:2], 0.7, pol.image_condition(reqs[1:2], batch.tokens[1:2], T2I))
    vb = pol.velocity(x, 0.7, pol.image_condition(reqs, batch.tokens, T2I))
    assert torch.equal(va[0], vb[1])
    ra = pol.think_replay(reqs[1:2], batch.tokens[1:2]).hidden
    rb = pol.think_replay(reqs, batch.tokens)
    lo = int(rb.cu_seqlens[1])
    assert torch.equal(ra, rb.hidden[lo:lo + len(ra)])


def test_think_sampling_stops_per_sample_and_replay_log_probs_equal_the_sampled_ones(folder):
    pol = load(folder)
    reqs = [GenRequest(p) for p in PROMPTS] * 2
    th = pol.sample_think(reqs, generator=gen(0), max_new_tokens=30)
    eos = pol.special["eos"]
    lengths = [len(t) for t in th.tokens]
    assert len(set(lengths)) > 2                        # each sample stops at its own end token
    for t in th.tokens:
        assert (t[-1] == eos) or len(t) == 30
        assert not (t[:-1] == eos).any()
    rep = pol.think_replay(reqs, th.tokens)
    old = torch.cat(th.logp)
    zeros = torch.zeros(len(reqs))
    logp = kernels.ar_grpo_loss(rep.hidden, rep.weight, rep.targets, old, zeros, rep.cu_seqlens)[1]["logp"]
    # decoding (one query per step) and replay (one causal pass) run different attention shapes, so a bf16 hidden
    # value can round the other way now and then: almost every token must agree to float32 precision, none beyond
    # a few bf16 roundings of the logits (an off-by-one position or a missing context would be off by O(1))
    diff = (logp.detach() - old).abs()
    assert (diff <= 1e-4).float().mean() >= 0.95, diff
    assert diff.max() <= 1e-2, diff.max()
    assert rep.hidden.requires_grad and rep.weight is pol.lm.lm_head.weight


@pytest.mark.parametrize("refine", [False, True])
def test_image_step_replay_log_prob_equals_rollout(folder, refine):
    pol = load(folder)
    reqs, cfg = (refine_requests(pol, 3), REFINE) if refine else ([GenRequest(p) for p in PROMPTS[:3]], T2I)
    th = pol.sample_think(reqs, generator=gen(2), max_new_tokens=8)
    cond = pol.image_condition(reqs, th.tokens, cfg)
    x0, recs = sample_flow(pol, cond, len(reqs), num_steps=6, window=range(0, 4), generator=gen(3))
    assert len(recs) == 4 and x0.shape == (3, *pol.latent_shape)
    replay = pol.image_condition(reqs, th.tokens, cfg)       # rebuilt through the same path, as the trainer does
    for st in recs:
        v = pol.velocity(st.x, st.sigma, replay)
        mean, std = sde_mean_std(st.x, v, st.sigma, st.sigma_next, 0.7)
        torch.testing.assert_close(sde_step_logprob(st.prev, mean, std), st.logp, rtol=0, atol=1e-6)


def test_zero_noise_sde_step_equals_euler_through_the_policy(folder):
    pol = load(folder)
    reqs = [GenRequest(p) for p in PROMPTS[:2]]
    cond = pol.image_condition(reqs, None, T2I)
    x = torch.randn(2, *pol.latent_shape, generator=gen(4))
    v = pol.velocity(x, 0.8, cond)
    prev, _, _ = sde_step(x, v, 0.8, 0.6, 0.0, noise=torch.randn(x.shape, generator=gen(9)))
    assert torch.equal(prev, euler_step(x, v, 0.8, 0.6))


def _formula64(v, refine, cfg):
    v = v.double()
    vc, vu = v[0], v[1]
    out = vu + cfg.text_scale * (vc - vu)
    dims = (-1,) if refine else (1, 2)
    scale = (vc.norm(dim=dims, keepdim=True) / (out.norm(dim=dims, keepdim=True) + 1e-8)).clamp(max=1.0)
    out = out * scale
    if refine:
        out = v[2] + cfg.image_scale * (out - v[2])
    return out, scale


@pytest.mark.parametrize("refine", [False, True])
def test_cfg_and_renorm_equal_a_float64_formula_on_the_branch_outputs(folder, refine):
    pol = load(folder)
    if refine:
        reqs, cfg = refine_requests(pol), REFINE
    else:
        reqs, cfg = [GenRequest(p) for p in PROMPTS[:2]], T2I
    th = pol.sample_think(reqs, generator=gen(6), max_new_tokens=6)
    cond = pol.image_condition(reqs, th.tokens, cfg)
    assert cond.branches == (("full", "no_text", "no_image") if refine else ("full", "no_text"))
    x = torch.randn(2, *pol.latent_shape, generator=gen(7))
    # each branch alone, from its own contexts: the packed forward must not mix branches
    sep = torch.stack([pol.branch_velocities(x, 0.7, Condition(cond.seqs[b * 2:(b + 1) * 2], ("full",), 2, cfg,
                                                              refine), ("full",))[0]
                       for b in range(len(cond.branches))])
    assert torch.equal(sep, pol.branch_velocities(x, 0.7, cond, cond.branches))
    want, scale = _formula64(sep, refine, cfg)
    assert (scale < 1).any()                             # the renorm is exercised
    got = pol.velocity(x, 0.7, cond)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    if not refine:   # outside (low, high] only the full branch runs
        at03 = pol.branch_velocities(x, 0.3, cond, ("full",))[0]
        assert torch.equal(pol.velocity(x, 0.3, cond), at03)
        mixed = pol.velocity(x, torch.tensor([0.7, 0.3]), cond)    # per-sample sigmas: one in, one out
        assert torch.equal(mixed[0], got[0]) and torch.equal(mixed[1], at03[1])


def test_contexts_hold_what_each_branch_should_and_think_enters_the_full_branch_only(folder):
    pol = load(folder)
    S = len(pol._system) + 2                                   # each text segment is <|im_start|> ... <|im_end|>
    reqs = [GenRequest(PROMPTS[2])]
    P_ = len(pol._text(PROMPTS[2])) + 2
    eos = pol.special["eos"]
    a, b = [torch.tensor([5, 6, 7, eos])], [torch.tensor([9, 9, eos])]
    ca, cb = pol.image_condition(reqs, a, T2I), pol.image_condition(reqs, b, T2I)
    assert [s.length for s in ca.seqs] == [S + P_ + 3 + 2, S]     # think ids without the final <|im_end|>, rewrapped
    assert all(torch.equal(x, y) for x, y in zip(ca.seqs[1].k, cb.seqs[1].k))   # no-text: no think in it
    assert cb.seqs[0].length == ca.seqs[0].length - 1 and torch.equal(ca.seqs[0].k[0][:S + P_],
                                                                    cb.seqs[0].k[0][:S + P_])  # same up to think
    plain = pol.image_condition(reqs, None, T2I)                  # no think: no system prompt either
    assert [s.length for s in plain.seqs] == [P_, 0]
    ref = refine_requests(pol, 1)
    instr = len(pol._text(ref[0].instruction)) + 2
    vae, vit = pol.latent_shape[0] + 2, (64 // 8) ** 2 + 2       # tiny: 16 latent tokens, 8 x 8 ViT patches
    cr = pol.image_condition(ref, a, REFINE)
    assert [s.length for s in cr.seqs] == [S + vae + vit + instr + 5, S + vae + vit, S + instr]
    assert [s.rope for s in cr.seqs] == [S + 2 + instr + 5, S + 2, S + instr]   # an image block is one position


def test_combine_cfg_without_renorm_is_plain_guidance():
    v = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    out = combine_cfg(v, ("full", "no_text"), CFGConfig(text_scale=3.0, renorm=False), False)
    torch.testing.assert_close(out, v[1] + 3.0 * (v[0] - v[1]))


def _lora_loss(pol, reqs, th, cond, x):
    rep = pol.think_replay(reqs, th.tokens)
    logits = rep.hidden.float() @ rep.weight.float().t()
    lp = torch.log_softmax(logits, -1).gather(1, rep.targets[:, None]).sum()
    return pol.velocity(x, 0.7, cond).pow(2).mean() + lp


def _perturb_lora_b(pol, seed=11):
    g = gen(seed)
    with torch.no_grad():
        for m in pol._lora_layers().values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)


def test_gradients_reach_lora_of_both_experts_and_nothing_in_the_context(folder):
    pol = load(folder)
    pol.enable_lora(4, 8.0, seed=0)
    names = sorted(pol._lora_layers())
    assert len(names) == 28 and sum("moe_gen" in n for n in names) == 14
    _perturb_lora_b(pol)                                # with B = 0 the A matrices get no gradient
    reqs = refine_requests(pol)
    th = pol.sample_think(reqs, generator=gen(8), max_new_tokens=6)
    cond = pol.image_condition(reqs, th.tokens, REFINE)
    assert not any(k.requires_grad for s in cond.seqs for k in s.k)
    x = torch.randn(2, *pol.latent_shape, generator=gen(9))
    _lora_loss(pol, reqs, th, cond, x).backward()
    params = dict(pol.bagel.named_parameters())
    lora = {n: p for n, p in params.items() if ".lora_" in n}
    assert len(lora) == 56 and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in params.items() if ".lora_" not in n)
    assert all(p.grad is None for p in pol.vae.parameters())
    assert {id(p) for p in pol.trainable_parameters()} == {id(p) for p in lora.values()}


def test_lora_targets_are_fnmatch_patterns_over_module_names(folder):
    pol = load(folder)
    pol.enable_lora(2, 4.0, targets=("*.mlp_moe_gen.*", "*.language_model.*.layers.0.self_attn.q_proj"))
    names = sorted(pol._lora_layers())
    assert len(names) == 7 and all("mlp_moe_gen" in n or n.endswith("layers.0.self_attn.q_proj") for n in names)
    with pytest.raises(ValueError, match="match no linear layer"):
        load(folder).enable_lora(2, 4.0, targets=("*.no_such_layer",))


def test_gradient_checkpointing_gives_equal_gradients(folder):
    grads = []
    for ckpt in (False, True):
        pol = load(folder, gradient_checkpointing=ckpt)
        pol.enable_lora(4, 8.0, seed=0)
        assert all(hasattr(layer, "_checkpoint_wrapped_module") == ckpt for layer in pol.lm.model.layers)
        _perturb_lora_b(pol)
        reqs = [GenRequest(p) for p in PROMPTS[:2]]
        th = pol.sample_think(reqs, generator=gen(1), max_new_tokens=6)
        cond = pol.image_condition(reqs, th.tokens, T2I)
        _lora_loss(pol, reqs, th, cond, torch.randn(2, *pol.latent_shape, generator=gen(2))).backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in pol.bagel.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 56
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)


def test_fresh_lora_is_a_no_op_and_the_reference_disables_trained_adapters(folder):
    pol = load(folder)
    reqs = [GenRequest(p) for p in PROMPTS[:2]]
    th = pol.sample_think(reqs, generator=gen(3), max_new_tokens=6)
    x = torch.randn(2, *pol.latent_shape, generator=gen(4))

    def outputs():
        with torch.no_grad():
            return (pol.velocity(x, 0.7, pol.image_condition(reqs, th.tokens, T2I)),
                    pol.think_replay(reqs, th.tokens).hidden)
    base = outputs()
    pol.enable_lora(4, 8.0, seed=0)
    fresh = outputs()
    assert all(torch.equal(a, b) for a, b in zip(base, fresh))
    _perturb_lora_b(pol)
    trained = outputs()
    assert not torch.equal(trained[0], base[0])
    with pol.reference():
        ref = outputs()
    assert all(torch.equal(a, b) for a, b in zip(base, ref))
    assert torch.equal(outputs()[0], trained[0])       # adapters back on after the context
    assert all(p.requires_grad for p in pol.trainable_parameters())


def test_lora_checkpoint_holds_adapters_and_a_pointer_to_the_base(folder, tmp_path):
    pol = load(folder, gradient_checkpointing=True)
    pol.enable_lora(4, 8.0, seed=0)
    _perturb_lora_b(pol)
    pol.save_pretrained(tmp_path / "ckpt")
    files = sorted(f.name for f in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "alphagrpo_bagel.json"]
    from safetensors.torch import load_file
    keys = list(load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors")))
    assert len(keys) == 56 and all(k.startswith("base_model.model.model.language_model.") for k in keys)
    assert not any("_checkpoint_wrapped_module" in k for k in keys)
    meta = json.loads((tmp_path / "ckpt" / "alphagrpo_bagel.json").read_text())
    assert meta["base"] == str(folder.resolve()) and meta["lora"]["rank"] == 4
    back = load(tmp_path / "ckpt")
    assert back.lora == pol.lora
    a, b = pol.adapter_state_dict(), back.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reqs = [GenRequest(PROMPTS[0])]
    x = torch.randn(1, *pol.latent_shape, generator=gen(5))
    with torch.no_grad():
        assert torch.equal(pol.velocity(x, 0.5, pol.image_condition(reqs, None, T2I)),
                           back.velocity(x, 0.5, back.image_condition(reqs, None, T2I)))


def test_encode_decode_shapes_and_determinism(folder):
    pol = load(folder)
    imgs = pol.decode(torch.randn(2, *pol.latent_shape, generator=gen(6)))
    assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.uint8
    z1, z2 = pol.encode(imgs), pol.encode(imgs)
    assert z1.shape == (2, *pol.latent_shape) and torch.equal(z1, z2)   # posterior mean: no hidden noise
    big = np.repeat(np.repeat(imgs, 2, axis=1), 2, axis=2)                # other sizes are resized first
    assert pol.encode(big).shape == z1.shape
    with pytest.raises(ValueError, match="uint8"):
        pol.encode(imgs.astype(np.float32))


def test_merged_adapters_and_a_full_save_reload_as_a_plain_bagel_folder(folder, tmp_path):
    pol = load(folder)
    pol.enable_lora(4, 8.0, seed=0)
    _perturb_lora_b(pol)
    reqs = [GenRequest(PROMPTS[1])]
    x = torch.randn(1, *pol.latent_shape, generator=gen(8))
    with torch.no_grad():
        before = pol.velocity(x, 0.5, pol.image_condition(reqs, None, T2I))
    pol.merge_lora()
    assert pol.lora is None and not pol._lora_layers()
    assert all(not p.requires_grad for p in pol.m.vit_model.parameters())
    assert any(p.requires_grad for p in pol.lm.parameters())
    with torch.no_grad():
        merged = pol.velocity(x, 0.5, pol.image_condition(reqs, None, T2I))
    # folding float32 adapters into bfloat16 weights rounds each weight once: close, not equal
    torch.testing.assert_close(merged, before, rtol=0.05, atol=0.05 * before.abs().max().item())
    pol.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "ema.safetensors").is_file()
    assert not (tmp_path / "full" / "alphagrpo_bagel.json").exists()     # a plain BAGEL folder
    back = load(tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(back.velocity(x, 0.5, back.image_condition(reqs, None, T2I)), merged)


# ---------------------------------------------------------------- the command line, on the paper's recipes
def _tiny_run(folder, recipe):
    over = {"model.path": folder, "device": "cpu", "data.world": "alphagrpo.models.bagel.testing:brightness",
            "reward.verifier": "world", "prompts_per_step": 2, "group_size": 3, "micro_batch": 6,
            "sampler.num_steps": 4, "sampler.window": 2, "sampler.window_starts": "0,1", "sampler.eval_steps": 2,
            "max_think_tokens": 8, "lora.rank": 4, "lora.alpha": 8, "ckpt_every": 1, "image_every": 0}
    if recipe == "bagel_srr":
        over.update({"srr.initial_samples": 2, "srr.num_steps": 4, "srr.window": 2, "srr.window_starts": "0,1"})
    return ["--recipe", recipe] + [a for k, v in over.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("recipe", ["bagel_rt2i", "bagel_srr"])
def test_alphagrpo_train_runs_the_bagel_recipe_and_resumes_exactly(folder, tmp_path, recipe, capsys):
    from safetensors.torch import load_file

    from alphagrpo.cli import main
    args = _tiny_run(folder, recipe)
    assert main(["train", *args, "--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and any(m["skipped"] == 0 and m["grad_norm"] > 0 for m in metrics)
    if recipe == "bagel_srr":
        assert all(m["srr"] == 1 for m in metrics)
    policy = tmp_path / "a" / "checkpoints" / "step_000002" / "policy"
    assert json.loads((policy / "alphagrpo_bagel.json").read_text())["base"] == str(folder.resolve())
    assert not (policy / "ema.safetensors").exists()
    straight = load_file(str(policy / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in straight.items())   # it trained
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--steps", "1"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--steps", "2", "--resume"]) == 0
    resumed = load_file(str(tmp_path / "b" / "checkpoints" / "step_000002" / "policy" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_missing_extra_names_the_install_line(monkeypatch):
    import sys

    from alphagrpo.models.bagel import _nemo
    monkeypatch.setattr(_nemo, "_NS", None)
    monkeypatch.setitem(sys.modules, "nemo_automodel.components.models.bagel", None)   # the import now fails
    with pytest.raises(ImportError, match="bagel.*--no-deps nemo-automodel==0.7.0 einops"):
        _nemo.require()


def test_sdpa_varlen_equals_flash_semantics_in_float64():
    """Bottom-right causal alignment (a segment appended to a cache), grouped-query heads, ragged sequences."""
    from alphagrpo.models.bagel.attention import sdpa_varlen
    g = gen(12)
    lq, lk, h, hkv, d = [3, 1, 5], [7, 4, 5], 4, 2, 8
    q = torch.randn(sum(lq), h, d, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lk), hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), hkv, d, generator=g, dtype=torch.float64)
    cq, ck = torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0)
    for causal in (False, True):
        got = sdpa_varlen(q, k, v, cq, ck, causal)
        for i in range(3):
            qi, ki, vi = q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
            for head in range(h):
                s = qi[:, head] @ ki[:, head // (h // hkv)].T / d ** 0.5          # (Lq, Lk)
                if causal:
                    allowed = torch.arange(lq[i])[:, None] + lk[i] - lq[i] >= torch.arange(lk[i])[None]
                    s = s.masked_fill(~allowed, float("-inf"))
                want = torch.softmax(s, -1) @ vi[:, head // (h // hkv)]
                torch.testing.assert_close(got[cq[i]:cq[i + 1], head], want)


@pytest.mark.cuda
def test_cuda_rollout_and_replay_agree_on_the_tiny_bagel(folder):
    """The same parity on a GPU (flash-attn when installed, else SDPA): image steps replay to within the 1e-5 clip's
    scale, think tokens to a few bf16 roundings."""
    pol = load_policy(ModelConfig(kind="bagel", path=str(folder), dtype="bfloat16", attention="auto"), "cuda")
    pol.enable_lora(4, 8.0, seed=0)
    reqs = [GenRequest(p) for p in PROMPTS] * 2
    th = pol.sample_think(reqs, generator=gen(0), max_new_tokens=30)
    rep = pol.think_replay(reqs, th.tokens)
    old = torch.cat(th.logp).cuda()
    logp = kernels.ar_grpo_loss(rep.hidden, rep.weight, rep.targets, old, torch.zeros(len(reqs), device="cuda"),
                                rep.cu_seqlens)[1]["logp"].detach()
    diff = (logp - old).abs()
    assert (diff <= 1e-3).float().mean() >= 0.9 and diff.max() <= 5e-2, diff
    cond = pol.image_condition(reqs, th.tokens, T2I)
    _, recs = sample_flow(pol, cond, len(reqs), num_steps=6, window=range(0, 4), generator=gen(3), device="cuda")
    replay = pol.image_condition(reqs, th.tokens, T2I)
    for st in recs:
        v = pol.velocity(st.x, st.sigma, replay)
        mean, std = sde_mean_std(st.x, v, st.sigma, st.sigma_next, 0.7)
        assert (sde_step_logprob(st.prev, mean, std) - st.logp).abs().max() <= 1e-6


def test_image_sizes_follow_the_official_resize_rule():
    from alphagrpo.models.bagel.packing import fit_size
    assert fit_size(512, 512, 1024, 512, 16) == (512, 512)      # VAE: a 512 px image is 32 x 32 latent tokens
    assert fit_size(512, 512, 980, 224, 14) == (518, 518)       # ViT: 37 x 37 patches
    assert fit_size(300, 200, 1024, 512, 16) == (768, 512)      # short side raised to the minimum
    assert fit_size(300, 200, 980, 224, 14) == (336, 224)
    assert fit_size(4000, 1000, 1024, 512, 16) == (1024, 256)   # long side capped, short side follows


def test_fsdp2_over_the_decoder_layers_and_the_root_gives_the_one_process_gradients(folder, tmp_path):
    """Two gloo ranks shard the tiny BAGEL with the training loop's FSDP2 strategy (layers, then the root entered
    through ``alphagrpo_call``), sample think text through it, then replay: the loss and every LoRA gradient equal
    the unsharded ones. (Without the root's registered method the first embedding call fails on sharded weights.)"""
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp
    sys.path.insert(0, str(Path(__file__).parent))
    from _bagel_workers import fsdp_worker, lora_loss_and_grads
    loss, grads = lora_loss_and_grads(str(folder), shard=False)
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), str(folder), str(tmp_path / "r0.pt")), nprocs=2,
             join=True)
    got = torch.load(tmp_path / "r0.pt", weights_only=False)
    assert len(grads) == 56 and got["grads"].keys() == grads.keys()
    assert got["loss"] == loss
    for k, g in grads.items():
        torch.testing.assert_close(got["grads"][k], g, rtol=1e-5, atol=1e-7)
