"""SD3.5 as a flow-only policy (``alphagrpo.models.sd3``), on a tiny random pipeline built in code (CPU, no
downloads): parity with the stock diffusers pipeline, on-policy replay, LoRA through peft, adapter files that a stock
pipeline loads, and the command line."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")   # a guard only: the dev extra installs diffusers and peft
pytest.importorskip("peft")

from alphagrpo.kernels.flow_grpo import flow_grpo_loss_ref  # noqa: E402
from alphagrpo.models.policy import CFGConfig, GenRequest, policy_sigmas  # noqa: E402
from alphagrpo.models.registry import ModelConfig, load_policy  # noqa: E402
from alphagrpo.models.sd3 import TARGET_SETS, load_sd3  # noqa: E402
from alphagrpo.models.sd3_testing import tiny_sd3_pipeline  # noqa: E402
from alphagrpo.sampler import flow_sigmas, sample_flow, sde_step, sde_step_logprob  # noqa: E402

RES = 32
PROMPTS = ["a red circle", "two blue squares left of a green triangle", "a small yellow star", "no circles"]
FLOWGRPO_CFG = CFGConfig(text_scale=4.5, low=0.0, high=1.0, renorm=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3_pipeline(d, resolution=RES)
    return d


def model_cfg(path, **kw):
    return ModelConfig(kind="sd3", path=str(path), options=(f"resolution={RES}",), **kw)


def load(path, **kw):
    return load_policy(model_cfg(path, **kw), "cpu")


def reqs(prompts=PROMPTS):
    return [GenRequest(p) for p in prompts]


def randomize_adapters(pol, seed=1, scale=0.1):
    """Non-zero adapters (a fresh Gaussian-initialised adapter has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pol.transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def noise(pol, n, seed=0):
    return torch.randn((n,) + pol.latent_shape, generator=torch.Generator().manual_seed(seed))


def velocity(pol, x, sigma, prompts=PROMPTS, cfg=FLOWGRPO_CFG, grad=False):
    with torch.set_grad_enabled(grad):
        return pol.velocity(x, sigma, pol.image_condition(reqs(prompts), None, cfg))


def stock_latents(pipe, prompts, x, **kw):
    return pipe(prompts, guidance_scale=4.5, height=RES, width=RES, latents=x.clone(), output_type="latent",
                max_sequence_length=256, **kw).images


# ------------------------------------------------------------------ parity with the stock pipeline
def test_ode_sampling_equals_the_stock_pipeline_on_both_grids(tiny_dir):
    pol = load(tiny_dir)
    assert pol.has_think is False and pol.latent_shape == (16, RES // 8, RES // 8)
    n, N = 2, 6
    cond = pol.image_condition(reqs(PROMPTS[:n]), None, FLOWGRPO_CFG)
    # the scheduler's grid (sampler.grid=scheduler): bit-identical to pipe() on the same noise
    sig = policy_sigmas(pol, N, 3.0, grid="scheduler")
    assert torch.equal(sig, pol.sigmas(N, 3.0))
    x_ours, recs = sample_flow(pol, cond, n, sigmas=sig, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    x = noise(pol, n)                                  # the same draw sample_flow made for its starting noise
    ref = stock_latents(pol.pipe, PROMPTS[:n], x, num_inference_steps=N)
    # measured 0.0 here; the text encoders' batch composition (ours: unique prompts with "", the pipeline: prompts,
    # then negatives) may move it by ~1e-6 on other CPUs
    assert torch.allclose(x_ours, ref, rtol=0, atol=1e-5), (x_ours - ref).abs().max()
    # decoded images equal the pipeline's own uint8 conversion
    img = pol.decode(x_ours)
    pil = pol.pipe(PROMPTS[:n], num_inference_steps=N, guidance_scale=4.5, height=RES, width=RES, latents=x.clone(),
                   output_type="np", max_sequence_length=256).images
    assert img.dtype == np.uint8 and img.shape == (n, RES, RES, 3)
    assert np.array_equal(img, (pil * 255).round().astype(np.uint8))
    # the recipe's grid through sample_flow: the pipeline with unshifted sigmas linspace(1, 0, N+1)[:-1] (the
    # scheduler shifts them in float32, flow_sigmas in float64: the grids agree to 1 ulp)
    gen = torch.Generator().manual_seed(3)
    x0, recs = sample_flow(pol, cond, n, num_steps=N, shift=3.0, noise_level=0.0, window=None, generator=gen)
    x_init = torch.randn((n,) + pol.latent_shape, generator=torch.Generator().manual_seed(3))
    ref2 = stock_latents(pol.pipe, PROMPTS[:n], x_init, sigmas=np.linspace(1, 0, N + 1)[:-1].tolist())
    assert recs == [] and torch.allclose(x0, ref2, rtol=0, atol=1e-5), (x0 - ref2).abs().max()


def test_scheduler_grid_is_the_pipelines_and_differs_from_flow_sigmas(tiny_dir):
    pol = load(tiny_dir)
    sig = pol.sigmas(10, 3.0)
    pol.pipe.scheduler.set_timesteps(10)
    assert sig.dtype == torch.float32 and sig.shape == (11,)
    assert torch.equal(sig, pol.pipe.scheduler.sigmas.float())
    assert sig[0] == 1 and sig[-1] == 0 and 0.005 < float(sig[-2]) < 0.015   # the near-no-op last step
    gap = (sig - flow_sigmas(10, 3.0)).abs().max().item()
    assert 0.2 < gap < 0.3                                                   # up to ~0.24 at N = 10
    # the conventions of RECIPE section 2: the scheduler noises as (1 - s) x0 + s eps and steps x + (s' - s) v, so
    # the velocity it consumes (the transformer's output, trained on noise - x0) has our sign
    from alphagrpo.sampler import euler_step
    sch = pol.pipe.scheduler
    x0, eps, v = noise(pol, 1, 1), noise(pol, 1, 2), noise(pol, 1, 3)
    k = 4
    t = sch.timesteps[k:k + 1]
    assert torch.allclose(sch.scale_noise(x0, t, eps), (1 - sig[k]) * x0 + sig[k] * eps, atol=1e-6)
    assert torch.equal(sch.step(v, t[0], x0, return_dict=False)[0], euler_step(x0, v, float(sig[k]),
                                                                                float(sig[k + 1])))


# ------------------------------------------------------------------ on-policy replay
def test_on_policy_ratio_is_one_and_replay_reuses_the_prompt_encodings(tiny_dir):
    pol = load(tiny_dir, max_text_tokens=64)
    pol.enable_lora(4, 8.0, seed=0)
    randomize_adapters(pol)
    t5_runs = []
    pol.pipe.text_encoder_3.register_forward_hook(lambda *a: t5_runs.append(1))
    requests = reqs(PROMPTS[:2] * 2)
    gen = torch.Generator().manual_seed(0)
    cond = pol.image_condition(requests, None, FLOWGRPO_CFG)
    assert cond.embeds.shape[1] == 77 + 64            # CLIP tokens + max_text_tokens of T5
    sig_runs = len(t5_runs)
    assert sig_runs == 1                               # "" and the two prompts in one T5 batch
    x0, steps = sample_flow(pol, cond, 4, num_steps=6, noise_level=0.7, window=range(1, 4), generator=gen)
    assert [s.k for s in steps] == [1, 2, 3]
    # replay: a fresh image_condition call (as the trainer makes) finds every prompt cached: T5 does not run
    cond2 = pol.image_condition(requests, None, FLOWGRPO_CFG)
    assert len(t5_runs) == sig_runs and torch.equal(cond2.embeds, cond.embeds)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for st in steps:
        v = pol.velocity(st.x, st.sigma, cond2)
        assert v.dtype == torch.float32 and v.requires_grad
        _, mean, std = sde_step(st.x, v, st.sigma, st.sigma_next, 0.7, noise=torch.zeros_like(st.x))
        logp = sde_step_logprob(st.prev, mean, std)
        assert torch.equal(logp.detach(), st.logp)     # replay log-prob == rollout log-prob, bit for bit
        loss, m = flow_grpo_loss_ref(v, st.x, st.prev, st.sigma, st.sigma_next, 0.7, st.logp, adv)
        assert m["ratio_min"].item() == 1.0 and m["ratio_max"].item() == 1.0
        loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pol.transformer.named_parameters()
               if "lora_B" in n and "transformer_blocks.1.attn.add_q_proj" not in n)


def test_one_sample_alone_equals_it_inside_a_batch_within_measured_tolerance(tiny_dir):
    """Measured on this tiny model (float32, CPU, one thread): 0.0 for batches of 2-4. Bound: 1e-6 relative to the
    velocity's scale; batched GPU kernels (and bf16) choose other reduction orders, which is why rollout and replay
    keep the same batch composition instead of relying on this."""
    pol = load(tiny_dir)
    x = noise(pol, 4, 5)
    v_batch = velocity(pol, x, 0.55)
    for i in range(4):
        v_one = velocity(pol, x[i:i + 1], 0.55, prompts=PROMPTS[i:i + 1])
        err = (v_one - v_batch[i:i + 1]).abs().max().item()
        assert err <= 1e-6 * v_batch.abs().max().item(), err


def test_cfg_interval_and_renorm_follow_the_config(tiny_dir):
    pol = load(tiny_dir)
    x = noise(pol, 2, 7)
    v_c = velocity(pol, x, 0.3, PROMPTS[:2], CFGConfig(text_scale=1.0, renorm=False))
    v_u = velocity(pol, x, 0.3, ["", ""], CFGConfig(text_scale=1.0, renorm=False))
    v_cfg = velocity(pol, x, 0.3, PROMPTS[:2], FLOWGRPO_CFG)
    assert torch.allclose(v_cfg, v_u + 4.5 * (v_c - v_u), atol=1e-5)
    # sigma outside (low, high]: the conditional branch alone
    out = velocity(pol, x, 0.3, PROMPTS[:2], CFGConfig(text_scale=4.5, low=0.4, high=1.0, renorm=False))
    assert torch.allclose(out, v_c, atol=1e-6)
    # per-sample sigmas: CFG only for the samples inside the interval
    mixed = velocity(pol, x, torch.tensor([0.3, 0.7]), PROMPTS[:2],
                     CFGConfig(text_scale=4.5, low=0.4, high=1.0, renorm=False))
    v_c7 = velocity(pol, x, 0.7, PROMPTS[:2], CFGConfig(text_scale=1.0, renorm=False))
    v_u7 = velocity(pol, x, 0.7, ["", ""], CFGConfig(text_scale=1.0, renorm=False))
    assert torch.allclose(mixed[0], v_c[0], atol=1e-6)
    assert torch.allclose(mixed[1], (v_u7 + 4.5 * (v_c7 - v_u7))[1], atol=1e-5)
    # renorm: |v| never exceeds |v_cond| per sample
    r = velocity(pol, x, 0.3, PROMPTS[:2], CFGConfig(text_scale=4.5, low=0.0, high=1.0, renorm=True))
    assert (r.flatten(1).norm(dim=1) <= v_c.flatten(1).norm(dim=1) * (1 + 1e-5)).all()
    assert not torch.allclose(r, v_cfg)


# ------------------------------------------------------------------ LoRA
def test_gradients_reach_only_the_lora_weights(tiny_dir):
    pol = load(tiny_dir)
    pol.enable_lora(4, 8.0, seed=0)
    names = {n for n, p in pol.transformer.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(p.dtype == torch.float32 for p in pol.trainable_parameters())
    randomize_adapters(pol)
    velocity(pol, noise(pol, 4), 0.8, grad=True).square().mean().backward()
    frozen = [m for m in (pol.pipe.text_encoder, pol.pipe.text_encoder_2, pol.pipe.text_encoder_3, pol.pipe.vae,
                          pol.transformer)]
    assert all(p.grad is None for m in frozen for n, p in m.named_parameters() if "lora_" not in n)
    zero = sorted(n for n, p in pol.transformer.named_parameters() if "lora_" in n and not p.grad.abs().sum() > 0)
    # the last block's context stream is discarded (context_pre_only): its add_q_proj adapter gets no gradient
    assert zero == ["transformer_blocks.1.attn.add_q_proj.lora_A.default.weight",
                    "transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"]


def test_zero_adapter_is_a_no_op_and_disabled_adapters_reproduce_the_base(tiny_dir):
    pol = load(tiny_dir)
    x = noise(pol, 4, 3)
    v_base = velocity(pol, x, 0.7)
    pol.enable_lora(4, 8.0, seed=0)
    assert torch.equal(velocity(pol, x, 0.7), v_base)          # Gaussian A, zero B: a fresh adapter changes nothing
    randomize_adapters(pol)
    v_lora = velocity(pol, x, 0.7)
    assert (v_lora - v_base).abs().max() > 1e-2
    with pol.reference():
        with pol.reference():                                   # nests
            pass
        assert torch.equal(velocity(pol, x, 0.7), v_base)
    assert torch.equal(velocity(pol, x, 0.7), v_lora)          # adapters back on afterwards


def test_lora_target_sets(tiny_dir):
    counts = {}
    for targets in ((), ("dual_attention",), ("all",), ("transformer_blocks.0.ff.*",)):
        pol = load(tiny_dir)
        pol.enable_lora(2, 4.0, targets=targets)
        counts[targets] = pol.lora_layers()
    # two blocks, the last has no to_add_out: 8 + 7 joint-attention projections (Flow-GRPO's set)
    assert len(counts[()]) == 15 and all(".attn." in n for n in counts[()])
    assert len(counts[("dual_attention",)]) == 4 and all(".attn2." in n for n in counts[("dual_attention",)])
    # + attn2 of the dual block (4) + ff/ff_context of block 0 (4) + ff of the last block (2; no ff_context)
    assert len(counts[("all",)]) == 25
    assert counts[("transformer_blocks.0.ff.*",)] == ["transformer_blocks.0.ff.net.0.proj",
                                                      "transformer_blocks.0.ff.net.2"]
    assert set(TARGET_SETS) == {"joint_attention", "dual_attention", "feed_forward", "all"}
    with pytest.raises(ValueError, match="no linear layer"):
        load(tiny_dir).enable_lora(2, 4.0, targets=("nothing.*",))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    grads = []
    for ckpt in (False, True):
        pol = load(tiny_dir, gradient_checkpointing=ckpt)
        assert pol.transformer.gradient_checkpointing is ckpt
        pol.enable_lora(4, 8.0, seed=0)
        randomize_adapters(pol)
        velocity(pol, noise(pol, 2), 0.5, PROMPTS[:2], grad=True).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in pol.transformer.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8), n


def test_merge_lora_keeps_the_function_and_trains_every_weight(tiny_dir):
    pol = load(tiny_dir)
    pol.enable_lora(4, 8.0, seed=0)
    randomize_adapters(pol)
    x = noise(pol, 2)
    v = velocity(pol, x, 0.4, PROMPTS[:2])
    pol.merge_lora()
    assert pol.lora is None and pol.lora_layers() == []
    assert torch.allclose(velocity(pol, x, 0.4, PROMPTS[:2]), v, atol=1e-5)
    assert len(pol.trainable_parameters()) == len(list(pol.transformer.parameters()))


def test_half_precision_base_keeps_float32_adapters_and_velocity(tiny_dir):
    pol = load(tiny_dir, dtype="bfloat16")
    assert pol.dtype == torch.bfloat16 and pol.pipe.text_encoder_3.dtype == torch.bfloat16
    assert pol.pipe.vae.dtype == torch.float32
    pol.enable_lora(4, 8.0, seed=0)
    assert all(p.dtype == torch.float32 for p in pol.trainable_parameters())
    v = velocity(pol, noise(pol, 2), 0.5, PROMPTS[:2], grad=True)
    assert v.dtype == torch.float32
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in pol.trainable_parameters())


# ------------------------------------------------------------------ saving
def test_saved_adapters_reload_in_ours_and_in_a_stock_pipeline(tiny_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    pol = load(tiny_dir)
    pol.enable_lora(4, 16.0, seed=0)                  # alpha != rank: a reload that lost alpha would scale by 1, not 4
    randomize_adapters(pol)
    x = noise(pol, 4, 9)
    cond = pol.image_condition(reqs(), None, FLOWGRPO_CFG)
    with torch.no_grad():
        v = pol.velocity(x, 0.65, cond)
    out = tmp_path / "adapters"
    pol.save_pretrained(out)
    meta = json.loads((out / "config.json").read_text())
    assert meta["base"] == str(tiny_dir.resolve()) and meta["lora"]["alpha"] == 16.0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_lora_weights.safetensors"]  # no base
    # ours: model.path = the saved folder
    again = load(out)
    assert again.lora == pol.lora
    assert torch.equal(velocity(again, x, 0.65), v)
    # a stock diffusers pipeline: load_lora_weights, then its own transformer forward with the same inputs
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_dir))
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        t = torch.full((8,), 0.65, dtype=torch.float32) * 1000
        o = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0]
    stock = o[:4] + 4.5 * (o[4:] - o[:4])
    assert torch.allclose(stock, v, rtol=0, atol=1e-6), (stock - v).abs().max()
    with torch.no_grad():
        pipe.unload_lora_weights()
        o = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0]
    assert (o[:4] + 4.5 * (o[4:] - o[:4]) - v).abs().max() > 1e-2   # the adapters did matter


def test_full_fine_tuning_saves_the_transformer_and_a_pointer(tiny_dir, tmp_path):
    pol = load(tiny_dir)
    with torch.no_grad():
        pol.transformer.proj_out.bias.add_(0.05)
    x = noise(pol, 2)
    v = velocity(pol, x, 0.5, PROMPTS[:2])
    pol.save_pretrained(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.json", "transformer"]
    assert torch.equal(velocity(load(tmp_path / "full"), x, 0.5, PROMPTS[:2]), v)


# ------------------------------------------------------------------ refusals
def test_refusals_name_what_to_change(tiny_dir, tmp_path):
    pol = load(tiny_dir)
    img = np.zeros((RES, RES, 3), np.uint8)
    with pytest.raises(ValueError, match="SRR"):
        pol.image_condition([GenRequest("a", image=img, instruction="fix it")], None, FLOWGRPO_CFG)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_sd3(ModelConfig(kind="sd3", options=("resolution=40",)), str(tiny_dir), "cpu")
    with pytest.raises(ValueError, match="model.path"):
        load_sd3(ModelConfig(kind="sd3"), None, "cpu")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_sd3(ModelConfig(kind="sd3"), str(tmp_path), "cpu")
    with pytest.raises(ValueError, match="unknown model.options"):
        load_sd3(ModelConfig(kind="sd3", options=("resolutoin=32",)), str(tiny_dir), "cpu")
    with pytest.raises(ValueError, match="sdpa"):
        load(tiny_dir, attention="flash")
    with pytest.raises(ValueError, match="no LoRA"):
        pol.reference()


def test_encode_decode_round_trip_uses_model_space(tiny_dir):
    pol = load(tiny_dir)
    vae = pol.pipe.vae
    img = (np.random.default_rng(0).random((2, RES, RES, 3)) * 255).astype(np.uint8)
    z = pol.encode(img)
    assert z.shape == (2,) + pol.latent_shape and z.dtype == torch.float32
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
    assert torch.allclose(z, (raw - vae.config.shift_factor) * vae.config.scaling_factor, atol=1e-6)
    with torch.no_grad():
        dec = vae.decode(raw, return_dict=False)[0]
    expect = ((dec / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(pol.decode(z), expect)
    with pytest.raises(ValueError, match="multiples of 16"):
        pol.encode(np.zeros((1, 40, 40, 3), np.uint8))


def test_sd35_medium_shape_has_the_documented_lora_sizes():
    """The LoRA sizes docs/sd3.md states, on SD3.5-Medium's real shape (built on the meta device: no memory, no weights)."""
    from diffusers import SD3Transformer2DModel

    from alphagrpo.models.sd3 import lora_target_names
    from alphagrpo.models.sd3_testing import SD35_MEDIUM_TRANSFORMER
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    assert abs(sum(p.numel() for p in tr.parameters()) / 1e9 - 2.243) < 0.001
    mods = dict(tr.named_modules())
    sizes = {}
    for t in ((), ("all",)):
        names = lora_target_names(tr, t)
        sizes[t] = (len(names), sum(32 * (mods[n].in_features + mods[n].out_features) for n in names) / 1e6)
    assert sizes[()][0] == 191 and abs(sizes[()][1] - 18.8) < 0.05
    assert sizes[("all",)][0] == 337 and abs(sizes[("all",)][1] - 47.0) < 0.05


# ------------------------------------------------------------------ the command line
def test_command_line_trains_sd3_with_the_shapes_judge_checkpoints_and_resumes(tiny_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """``alphagrpo train --recipe tiny_shapes --set model.kind=sd3 --set model.path=TINY ...``: 2 steps, a checkpoint
    of adapters only, then ``--resume`` to step 3. The world is the shapes world's prompt machinery and judge with one
    prompt per task type (registered as ``shapes_mini``: the full world synthesizes 20k prompts, 5-15 s here)."""
    from alphagrpo.cli import main
    from alphagrpo.worlds import registry
    from alphagrpo.worlds.base import World

    def shapes_mini(data):
        from alphagrpo.worlds import shapes as S
        train, test, _ = S.synthesize_splits(n_per_task=1, n_test=1, seed=data.seed)
        judge = S.ShapesVerifier()
        return World(train=train, test=test, verifier=judge, name="shapes_mini",
                     judge=lambda img, r: judge.judge(img, [q["question"] for q in r["semantic_questions"]]))

    monkeypatch.setitem(registry._WORLDS, "shapes_mini", shapes_mini)
    out = tmp_path / "run"
    args = ["train", "--recipe", "tiny_shapes", "--out", str(out)]
    for s in ("model.kind=sd3", f"model.path={tiny_dir}", f"model.options=resolution={RES}", "model.max_text_tokens=32",
              "prompts_per_step=1", "group_size=3", "micro_batch=3", "sampler.num_steps=4", "sampler.window=2",
              "sampler.window_starts=0,1", "sampler.grid=scheduler", "cfg.text_scale=4.5", "cfg.low=0",
              "cfg.renorm=false", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "reward.verifier=world",
              "data.world=shapes_mini", "image_every=0", "ckpt_every=1"):
        args += ["--set", s]
    assert main(args + ["--steps", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 2
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002"
    pol_dir = ck / "step_000002" / "policy"
    meta = json.loads((pol_dir / "config.json").read_text())
    assert meta["format"] == "alphagrpo.sd3/v1" and meta["base"] == str(tiny_dir.resolve())
    assert meta["lora"]["rank"] == 4 and (pol_dir / "pytorch_lora_weights.safetensors").is_file()
    assert not (pol_dir / "transformer").exists()                      # adapters only, never the base
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and "loss_text" not in lines[-1]   # flow only: no text loss
    assert all(0.0 <= m["reward_mean"] <= 1.0 for m in lines)
    from safetensors.torch import load_file
    a1 = load_file(str(ck / "step_000001" / "policy" / "pytorch_lora_weights.safetensors"))
    a2 = load_file(str(pol_dir / "pytorch_lora_weights.safetensors"))
    trained = [m for m in lines if not m["skipped"]]
    assert trained, "both steps were skipped (all advantages zero): the test could not see training"
    assert any(not torch.equal(a1[k], a2[k]) for k in a1) or lines[1]["skipped"]
    # --resume continues from step 2 to 3
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    assert (ck / "latest").read_text().strip() == "step_000003"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_sd35m_recipes_run_a_step_on_the_tiny_pipeline(tiny_dir):
    """Both recipes, shrunk to the tiny pipeline on a CPU, run a GRPO step: sd35m (recipe grid, LoRA on every
    attention and feed-forward linear, gradient checkpointing) and sd35m_flowgrpo (scheduler grid, KL to the
    adapters-disabled policy)."""
    from alphagrpo.rewards import DVReward
    from alphagrpo.testing import brightness_world
    from alphagrpo.train.config import apply_overrides, get_recipe
    from alphagrpo.train.loop import enable_lora
    from alphagrpo.train.trainer import GRPOTrainer
    world = brightness_world()
    for name in ("sd35m", "sd35m_flowgrpo"):
        cfg = apply_overrides(get_recipe(name), [
            "device=cpu", f"model.path={tiny_dir}", f"model.options=resolution={RES}", "model.dtype=float32",
            "model.max_text_tokens=16", "prompts_per_step=1", "group_size=3", "micro_batch=3", "sampler.num_steps=4",
            "sampler.window=2", "sampler.window_starts=0", "lora.rank=2", "lora.alpha=4"])
        pol = load_policy(cfg.model, "cpu")
        enable_lora(pol, cfg)
        tr = GRPOTrainer(pol, DVReward(world.verifier), cfg, generator=torch.Generator().manual_seed(0))
        res = tr.step(world.train[:1])
        tr.close()
        m = res.metrics
        assert m["samples"] == 3 and "loss_image" in m and "loss_text" not in m
        assert ("kl_image" in m) == (name == "sd35m_flowgrpo")
        assert m["ratio_image_max"] == 0.0                   # on-policy: every ratio is exactly 1


def test_gpu_smoke_script_runs_on_the_tiny_pipeline(tiny_dir, tmp_path):
    """``bench/sd3_smoke.py`` end to end on a CPU (its GPU numbers are not measured here): the real-weights path on
    the tiny pipeline folder, and the random-shape path with the tiny transformer."""
    from bench import sd3_smoke
    out = tmp_path / "real.json"
    assert sd3_smoke.main(["--model", str(tiny_dir), "--device", "cpu", "--resolution", str(RES), "--dtypes",
                           "float32", "--group", "2", "--steps", "3", "--window", "2", "--parity-steps", "3",
                           "--out", str(out)]) == 0
    r = json.loads(out.read_text())["per_dtype"]["float32"]
    assert r["parity"]["latent_abs_diff_max"] < 1e-5
    assert r["grpo_step"]["all_within_clip"] and r["grpo_step"]["drift_logp_max"] == 0.0
    assert len(r["grpo_step"]["drift"]) == 2
    assert set(r["timing"]) == {"no_checkpointing", "checkpointing"}
    assert r["adapter_round_trip"]["ours_abs_diff_max"] == 0.0 and r["adapter_round_trip"]["stock_abs_diff_max"] < 1e-6
    out = tmp_path / "tiny.json"
    assert sd3_smoke.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    t = json.loads(out.read_text())
    assert t["lora"]["default"]["layers"] == 15 and t["lora"]["all"]["layers"] == 25
    assert t["timing"]["checkpointing"]["all_within_clip"]


def test_prompt_cache_keeps_recent_prompts_and_warns_on_a_re_encode(tiny_dir, caplog):
    pol = load_sd3(ModelConfig(kind="sd3", options=(f"resolution={RES}", "prompt_cache=2")), str(tiny_dir), "cpu")
    e1, _ = pol.encode_prompts(["a", "b", "c"])      # one call may exceed the capacity: all three stay for it
    assert pol.encode_calls == 1 and len(pol._cache) == 3
    pol.encode_prompts(["c", "d"])                    # "a" and "b" are the oldest: evicted
    assert pol.encode_calls == 2 and list(pol._cache) == ["c", "d"]
    with caplog.at_level("WARNING", logger="alphagrpo.models.sd3"):
        e2, _ = pol.encode_prompts(["a"])
    assert pol.encode_calls == 3 and "prompt_cache" in caplog.text
    assert torch.allclose(e2[0], e1[0], atol=1e-6)
