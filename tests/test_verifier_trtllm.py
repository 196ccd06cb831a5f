"""The trtllm backend against a strict fake ``tensorrt_llm`` module (TensorRT-LLM itself needs CUDA to install).

The fake accepts only the names of TensorRT-LLM 1.2's LLM API (read from its sources): ``LLM.__init__``'s explicit
parameters plus the ``TorchLlmArgs`` fields (the real constructor raises ``ValueError`` on any other keyword),
``KvCacheConfig``'s fields, ``SamplingParams``'s fields, and the exact signatures of ``generate`` /
``generate_async`` / ``get_stats``. It computes real logits with a tiny Qwen-VL model, expanding the image
placeholder the way TensorRT-LLM's input processor does, and models the KV cache the way the engine reuses it:

- a block cache keyed by ``(cache_salt, every token up to the end of the block)``, ``tokens_per_block`` tokens a
  block; image tokens are keyed by a hash of the image when image hashing works, and by the bare placeholder id when
  it "falls back" (``hashing=False``), as TensorRT-LLM does;
- requests are admitted in scheduler iterations: one iteration takes every pending request, looks its blocks up
  among those stored by earlier iterations, then stores its own; so requests admitted together do not share;
- cumulative reused / missed block counts reported through ``get_stats()`` when ``enable_iter_perf_stats`` is on;
- every block hit remembers which pixels filled the block: a hit between different images is counted as wrong.
"""
import dataclasses
import hashlib
import logging
import sys
import types

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from verifier_engine.backends.hf import HFVerifier  # noqa: E402
from verifier_engine.testing import make_tiny_model, random_images  # noqa: E402
from verifier_engine.vlm import VLBundle  # noqa: E402

# TensorRT-LLM 1.2: LLM.__init__'s explicit parameters, then the TorchLlmArgs fields accepted as keywords.
LLM_PARAMS = ("model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
              "tensor_parallel_size", "dtype", "revision", "tokenizer_revision")
TORCH_LLM_ARGS = frozenset({
    "backend", "pipeline_parallel_size", "context_parallel_size", "gpus_per_node", "moe_cluster_parallel_size",
    "moe_tensor_parallel_size", "moe_expert_parallel_size", "enable_attention_dp", "cp_config", "load_format",
    "enable_lora", "lora_config", "kv_cache_config", "enable_chunked_prefill", "guided_decoding_backend",
    "batched_logits_processor", "iter_stats_max_iterations", "request_stats_max_iterations", "peft_cache_config",
    "scheduler_config", "cache_transceiver_config", "speculative_config", "max_batch_size", "max_input_len",
    "max_seq_len", "max_beam_width", "max_num_tokens", "gather_generation_logits", "num_postprocess_workers",
    "postprocess_tokenizer_dir", "reasoning_parser", "garbage_collection_gen0_threshold", "return_perf_metrics",
    "otlp_traces_endpoint", "cuda_graph_config", "attention_dp_config", "disable_overlap_scheduler", "moe_config",
    "attn_backend", "sampler_type", "enable_iter_perf_stats", "enable_iter_req_stats", "print_iter_log",
    "torch_compile_config", "enable_autotuner", "enable_layerwise_nvtx_marker", "enable_min_latency",
    "stream_interval", "force_dynamic_quantization", "allreduce_strategy", "checkpoint_loader", "checkpoint_format",
    "kv_connector_config", "mm_encoder_only", "enable_sleep", "batch_wait_timeout_ms", "orchestrator_type",
})
INPUT_KEYS = frozenset({"prompt", "prompt_token_ids", "query", "query_token_ids", "multi_modal_data",
                        "multi_modal_embeddings", "mm_processor_kwargs"})


def fake_trtllm(version="1.2.0", registered=("Qwen2_5_VLForConditionalGeneration",), hashing=True,
                tokens_per_block=8, poison=False, calls=None):
    """The fake ``tensorrt_llm`` package as ``{module name: module}`` (to put into ``sys.modules``).

    ``poison``: every logit outside the yes/no ids is +inf (reading any of them spoils the score);
    ``calls``: a list the fake appends ``(method, kwargs)`` to."""
    calls = calls if calls is not None else []
    mod = types.ModuleType("tensorrt_llm")
    mod.__version__ = version
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    torch_pkg = types.ModuleType("tensorrt_llm._torch")
    models = types.ModuleType("tensorrt_llm._torch.models")
    modeling_utils = types.ModuleType("tensorrt_llm._torch.models.modeling_utils")
    modeling_utils.MODEL_CLASS_MAPPING = {name: object for name in registered}

    class KvCacheConfig:  # keyword-only: an unknown field is a TypeError, as pydantic's StrictBaseModel rejects it
        def __init__(self, *, enable_block_reuse=True, max_tokens=None, max_attention_window=None,
                     sink_token_length=None, free_gpu_memory_fraction=0.9, host_cache_size=None, onboard_blocks=True,
                     cross_kv_cache_fraction=None, secondary_offload_min_priority=None, event_buffer_max_size=0,
                     enable_partial_reuse=True, copy_on_partial_reuse=True, dtype="auto"):
            if free_gpu_memory_fraction is not None and not 0 <= free_gpu_memory_fraction <= 1:
                raise ValueError("free_gpu_memory_fraction must be in [0, 1]")
            self.enable_block_reuse, self.free_gpu_memory_fraction = enable_block_reuse, free_gpu_memory_fraction
            self.max_tokens = max_tokens

    @dataclasses.dataclass
    class SamplingParams:
        end_id: int | None = None
        pad_id: int | None = None
        max_tokens: int = 32
        bad: object = None
        bad_token_ids: object = None
        stop: object = None
        stop_token_ids: object = None
        include_stop_str_in_output: bool = False
        embedding_bias: object = None
        logits_processor: object = None
        apply_batched_logits_processor: bool = False
        n: int = 1
        best_of: int | None = None
        use_beam_search: bool = False
        top_k: int | None = None
        top_p: float | None = None
        seed: int | None = None
        temperature: float | None = None
        min_tokens: int | None = None
        repetition_penalty: float | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        min_p: float | None = None
        logprobs: int | None = None
        prompt_logprobs: int | None = None
        return_context_logits: bool = False
        return_generation_logits: bool = False
        exclude_input_from_output: bool = True
        return_encoder_output: bool = False
        return_perf_metrics: bool = False
        additional_model_outputs: object = None
        guided_decoding: object = None
        ignore_eos: bool = False
        detokenize: bool = True
        add_special_tokens: bool = True
        truncate_prompt_tokens: int | None = None
        skip_special_tokens: bool = True
        spaces_between_special_tokens: bool = True

    class Result:
        def __init__(self, llm, req):
            self._llm, self._req, self.outputs, self.finished = llm, req, [], False
            self.prompt = req["inputs"].get("prompt")

        def result(self, timeout=None):
            while not self.finished:
                self._llm._iteration()
            return self

    class LLM:
        def __init__(self, model, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init=False,
                     trust_remote_code=False, tensor_parallel_size=1, dtype="auto", revision=None,
                     tokenizer_revision=None, **kwargs):
            for key in kwargs:
                if key not in TORCH_LLM_ARGS:
                    raise ValueError(f"LLM got invalid argument: {key}")
            if kwargs.get("kv_cache_config") is not None and not isinstance(kwargs["kv_cache_config"], KvCacheConfig):
                raise TypeError("kv_cache_config must be a KvCacheConfig")
            calls.append(("LLM", dict(model=model, **kwargs)))
            self.args = types.SimpleNamespace(**{"max_num_tokens": 8192, "max_batch_size": 2048,
                                                 "gather_generation_logits": False, "enable_iter_perf_stats": False,
                                                 "enable_chunked_prefill": False,
                                                 "kv_cache_config": KvCacheConfig(), **kwargs})
            self.bundle = VLBundle.from_pretrained(model, device="cpu", dtype="float32")
            self.input_processor = types.SimpleNamespace(multimodal_hashing_supported=None)
            self.blocks = {}  # (salt, tokens up to the block's end) -> digest of the pixels that filled it
            self.reused = self.missed = self.wrong_reuse = 0
            self.iterations, self.pending, self.stats, self.prompt_lengths = [], [], [], []

        def generate(self, inputs, sampling_params=None, use_tqdm=True, lora_request=None,
                     prompt_adapter_request=None, kv_cache_retention_config=None, disaggregated_params=None,
                     scheduling_params=None, cache_salt=None):
            single = isinstance(inputs, dict)
            inputs = [inputs] if single else list(inputs)
            salts = cache_salt if isinstance(cache_salt, (list, tuple)) else [cache_salt] * len(inputs)
            futures = [self.generate_async(x, sampling_params, cache_salt=s) for x, s in zip(inputs, salts)]
            for f in futures:
                f.result()
            return futures[0] if single else futures

        def generate_async(self, inputs, sampling_params=None, lora_request=None, prompt_adapter_request=None,
                           streaming=False, kv_cache_retention_config=None, disaggregated_params=None,
                           _postproc_params=None, scheduling_params=None, cache_salt=None):
            if not isinstance(sampling_params, SamplingParams):
                raise TypeError(f"The sampling_params must be type SamplingParams or None, got {sampling_params!r}")
            unknown = set(inputs) - INPUT_KEYS
            if unknown:
                raise TypeError(f"unknown prompt input keys {sorted(unknown)}")
            calls.append(("generate_async", {"cache_salt": cache_salt}))
            b = self.bundle
            (img,) = inputs["multi_modal_data"]["image"]
            digest = hashlib.sha256(img.tobytes()).hexdigest()
            pv, grid, n_tok, _ = b.preprocess([img])
            ids = b.tokenizer.encode(inputs["prompt"].replace("<|image_pad|>", "<|image_pad|>" * n_tok[0]),
                                     add_special_tokens=False)
            if not self.args.enable_chunked_prefill and len(ids) > self.args.max_num_tokens:
                raise ValueError(f"The sum of prompt length ({len(ids)}) should not exceed max_num_tokens "
                                 f"({self.args.max_num_tokens})")
            self.prompt_lengths.append(len(ids))
            if self.input_processor.multimodal_hashing_supported is None:
                self.input_processor.multimodal_hashing_supported = hashing
            pad = b.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            keys = [("mm", digest) if (t == pad and hashing) else t for t in ids]
            req = dict(inputs=inputs, sampling=sampling_params, salt=cache_salt, ids=ids, keys=keys, pv=pv,
                       grid=grid, digest=digest)
            res = Result(self, req)
            self.pending.append(res)
            return res

        def _iteration(self):
            batch, self.pending = self.pending[:self.args.max_batch_size], self.pending[self.args.max_batch_size:]
            reuse = self.args.kv_cache_config.enable_block_reuse
            new_blocks = {}
            for res in batch:  # look up only what earlier iterations stored
                req = res._req
                for end in range(tokens_per_block, len(req["keys"]) + 1, tokens_per_block):
                    key = (req["salt"], tuple(req["keys"][:end]))
                    if reuse and key in self.blocks:
                        self.reused += 1
                        self.wrong_reuse += self.blocks[key] != req["digest"]
                    else:
                        self.missed += 1
                        new_blocks.setdefault(key, req["digest"])
                res.outputs = [self._compute(req)]
                res.finished = True
            if reuse:
                self.blocks.update(new_blocks)
            self.iterations.append(len(batch))
            if self.args.enable_iter_perf_stats:
                total = self.reused + self.missed
                self.stats.append({"iter": len(self.iterations), "kvCacheStats": {
                    "reusedBlocks": self.reused, "missedBlocks": self.missed,
                    "cacheHitRate": self.reused / total if total else 0.0}})

        def _compute(self, req):
            b, sp = self.bundle, req["sampling"]
            assert sp.max_tokens == 1 and sp.return_generation_logits
            ids = torch.tensor([req["ids"]])
            with torch.no_grad():
                logits = b.model(**b.model_inputs(ids, torch.ones_like(ids), req["pv"], req["grid"])).logits[:, -1]
            if poison:
                keep = torch.tensor(b.answers.ids)
                spoiled = torch.full_like(logits, float("inf"))
                spoiled[:, keep] = logits[:, keep]
                logits = spoiled
            return types.SimpleNamespace(generation_logits=logits.reshape(1, 1, -1), text="",
                                         token_ids=[int(logits.argmax())])

        def get_stats(self, timeout=2):
            out, self.stats = self.stats, []
            return out

        def shutdown(self):
            pass

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    llmapi.LLM, llmapi.SamplingParams, llmapi.KvCacheConfig = LLM, SamplingParams, KvCacheConfig
    mod.llmapi, mod._torch, torch_pkg.models, models.modeling_utils = llmapi, torch_pkg, models, modeling_utils
    return {"tensorrt_llm": mod, "tensorrt_llm.llmapi": llmapi, "tensorrt_llm._torch": torch_pkg,
            "tensorrt_llm._torch.models": models, "tensorrt_llm._torch.models.modeling_utils": modeling_utils}


def install(monkeypatch, **kw):
    mods = fake_trtllm(**kw)
    for name, m in mods.items():
        monkeypatch.setitem(sys.modules, name, m)
    return mods["tensorrt_llm"]


@pytest.fixture(scope="module")
def tiny25(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("ckpt") / "tiny25"), "qwen2_5_vl", seed=5)


@pytest.fixture(scope="module")
def oracle(tiny25):
    return HFVerifier.from_pretrained(tiny25, device="cpu", dtype="float32")


QLS = [["Is there a red circle?", "Is the text legible?", "Is it a painting?"], ["Are there two squares?"], []]


def _load(path, **kw):
    from verifier_engine import load_verifier
    return load_verifier("trtllm", path, **kw)


def test_matches_the_hf_oracle_and_builds_the_llm_with_1_2_names(tiny25, oracle, monkeypatch):
    calls = []
    install(monkeypatch, calls=calls)
    v = _load(tiny25, kv_cache_fraction=0.6)
    images = random_images(3, (64, 64), seed=9)
    got = v.score(images, QLS, [None, ["no"], []])
    ref = oracle.score(images, QLS)
    assert np.allclose(got[0], ref[0], atol=1e-6) and got[2] == []
    assert got[1][0] == pytest.approx(1 - ref[1][0], abs=1e-6)
    (name, kw), = [c for c in calls if c[0] == "LLM"]
    assert kw["gather_generation_logits"] is True and kw["enable_iter_perf_stats"] is True
    assert kw["kv_cache_config"].enable_block_reuse is True and kw["kv_cache_config"].free_gpu_memory_fraction == 0.6
    assert kw["max_num_tokens"] >= v.longest_prompt and "use_tqdm" not in kw
    salts = [c[1]["cache_salt"] for c in calls if c[0] == "generate_async"]
    assert len(salts) == 4 and all(salts)  # every request salted
    assert len(set(salts)) == 2  # one salt per image


def test_the_fake_rejects_what_the_real_api_rejects(tiny25, monkeypatch):
    trt = install(monkeypatch)
    with pytest.raises(ValueError, match="invalid argument: enable_prefix_caching"):
        trt.LLM(model=tiny25, enable_prefix_caching=True)  # vLLM's name, not TensorRT-LLM's
    with pytest.raises(TypeError):
        trt.SamplingParams(max_tokens=1, return_logits=True)
    with pytest.raises(TypeError):
        sys.modules["tensorrt_llm.llmapi"].KvCacheConfig(enable_prefix_caching=True)
    with pytest.raises(ValueError, match="invalid argument: use_tqdm"):  # a generate() argument, not a constructor one
        _load(tiny25, llm_kwargs={"use_tqdm": False})


def test_different_images_never_share_blocks_even_when_image_hashing_falls_back(tiny25, oracle, monkeypatch, caplog):
    install(monkeypatch, hashing=False)
    v = _load(tiny25)
    a = random_images(1, (64, 64), seed=1)[0]
    b = a.copy()
    b[10:20, 10:20] = 255 - b[10:20, 10:20]  # same size, different pixels
    qls = [["Is there a red circle?", "Is it a painting?"]] * 2
    with caplog.at_level(logging.WARNING, logger="verifier_engine.backends.trtllm"):
        got = v.score([a, b], qls)
    assert v.llm.wrong_reuse == 0 and v.llm.reused > 0  # reuse happened, within each image only
    assert v.image_hashing() is False and v.backend_metrics()["image_hashing"] == 0.0
    assert "fell back from image hashing" in caplog.text
    assert np.allclose(got, oracle.score([a, b], qls), atol=1e-6)
    # the hazard the salt closes: without it, the fallback keys let the second image reuse the first one's blocks
    llm, sp = v.llm, v.sampling
    for img in (a, b):
        llm.generate({"prompt": v.parts.render("Is it red?"), "multi_modal_data": {"image": [v_pil(img)]}}, sp)
    assert llm.wrong_reuse > 0


def v_pil(arr):
    from verifier_engine.vlm import to_pil
    return to_pil(arr)


def test_questions_of_one_image_reuse_its_prefix_and_the_hit_rate_is_reported(tiny25, monkeypatch):
    install(monkeypatch, tokens_per_block=8)
    v = _load(tiny25)
    images = random_images(2, (64, 64), seed=3)
    qls = [["Is there a red circle?", "Is the text legible?", "Is it a painting?"],
           ["Are there two squares?", "Is the sky blue?"]]
    v.score(images, qls)
    llm = v.llm
    # the shared prefix of an image's questions: the template before the question, with the image expanded
    b = llm.bundle
    shared = []
    for img in images:
        _, _, n_tok, _ = b.preprocess([v_pil(img)])
        shared.append(len(b.tokenizer.encode(v.parts.before.replace("<|image_pad|>", "<|image_pad|>" * n_tok[0]),
                                             add_special_tokens=False)) // 8)
    expected_hits = shared[0] * 2 + shared[1] * 1  # every question after the first reuses the full prefix blocks
    assert expected_hits > 0 and llm.reused == expected_hits and llm.wrong_reuse == 0
    m = v.backend_metrics()
    assert m["kv_cache_reused_blocks"] == llm.reused and m["kv_cache_missed_blocks"] == llm.missed
    assert m["kv_cache_hit_rate"] == pytest.approx(llm.reused / (llm.reused + llm.missed))
    assert m["image_hashing"] == 1.0
    # submitting everything at once (admitted in one iteration) reuses nothing: the order is what makes the hits
    before = llm.reused
    other = random_images(1, (64, 64), seed=11)[0]
    llm.generate([{"prompt": v.parts.render(q), "multi_modal_data": {"image": [v_pil(other)]}} for q in qls[0]],
                 v.sampling, cache_salt="all-at-once")
    assert llm.reused == before


def test_a_repeated_call_hits_the_cache_and_gives_identical_scores(tiny25, monkeypatch):
    install(monkeypatch)
    v = _load(tiny25)
    images = random_images(2, (64, 64), seed=4)
    qls = [["Is there a red circle?", "Is it a painting?"], ["Are there two squares?"]]
    first = v.score(images, qls)
    hits, misses = v.llm.reused, v.llm.missed
    second = v.score(images, qls)
    assert second == first
    assert v.llm.missed - misses < misses and v.llm.reused - hits > hits  # the second call mostly hits


def test_only_the_yes_no_logits_are_read(tiny25, oracle, monkeypatch):
    install(monkeypatch, poison=True)  # every other vocabulary entry is +inf: a softmax or top-k would break
    v = _load(tiny25)
    images = random_images(2, (64, 64), seed=6)
    qls = [["Is there a red circle?"], ["Is it a painting?", "Is the sky blue?"]]
    got = v.score(images, qls)
    assert np.isfinite(np.concatenate(got)).all()
    assert np.allclose(np.concatenate(got), np.concatenate(oracle.score(images, qls)), atol=1e-6)


def test_max_num_tokens_holds_the_largest_image_and_a_long_question(tiny25, monkeypatch):
    install(monkeypatch)
    v = _load(tiny25)
    big = random_images(1, (512, 512), seed=2)[0]  # larger than max_pixels: resized down to the largest size
    q = "Is there " + "a red circle and " * 20 + "nothing else?"
    v.score([big], [[q]])
    assert v.llm.prompt_lengths[-1] <= v.longest_prompt <= v.llm.args.max_num_tokens
    with pytest.raises(ValueError, match="below the longest prompt"):
        _load(tiny25, max_num_tokens=16)


def test_version_and_model_checks_say_what_is_supported(tiny25, tmp_path, monkeypatch):
    install(monkeypatch, version="0.21.0")
    with pytest.raises(RuntimeError, match=r"needs TensorRT-LLM >= 1\.2.*found 0\.21\.0"):
        _load(tiny25)
    tiny3 = make_tiny_model(str(tmp_path / "tiny3"), "qwen3_vl", seed=1)
    install(monkeypatch, version="1.2.0")
    with pytest.raises(ValueError, match=r"runs Qwen2_5_VLForConditionalGeneration; .*Qwen3VLForConditionalGeneration"):
        _load(tiny3)
    install(monkeypatch, version="1.2.1", registered=("Qwen2_5_VLForConditionalGeneration",
                                                      "Qwen3VLForConditionalGeneration"))
    v = _load(tiny3)
    assert v.architecture == "Qwen3VLForConditionalGeneration"
    got = v.score(random_images(1, (64, 64), seed=8), [["Is it red?"]])
    assert 0.0 < got[0][0] < 1.0


def test_names_the_extra_when_tensorrt_llm_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes `import tensorrt_llm` fail
    from verifier_engine.backends.trtllm import TRTLLMVerifier
    with pytest.raises(ImportError, match=r"alphagrpo\[trtllm\]"):
        TRTLLMVerifier("/nonexistent")


def test_server_metrics_and_the_profiler_report_the_kv_cache_hit_rate(tiny25, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from verifier_engine._http import encode_image
    from verifier_engine.metrics import parse_metrics
    from verifier_engine.profiler import profile_verifier
    from verifier_engine.server import create_app
    install(monkeypatch)
    v = _load(tiny25)
    images = random_images(2, (64, 64), seed=12)
    body = {"images": [encode_image(im) for im in images],
            "questions": [["Is there a red circle?", "Is it a painting?", "Is the sky blue?"], ["Is it red?"]]}
    with TestClient(create_app(v, backend="trtllm", model="tiny")) as client:
        assert client.post("/v1/score", json=body).status_code == 200
        m = parse_metrics(client.get("/metrics").text)
    rate = m['verifier_backend_stat{name="kv_cache_hit_rate"}']
    assert 0.0 < rate < 1.0 and rate == pytest.approx(v.llm.reused / (v.llm.reused + v.llm.missed))
    assert m['verifier_backend_stat{name="kv_cache_reused_blocks"}'] == v.llm.reused
    assert m['verifier_backend_stat{name="image_hashing"}'] == 1.0
    res = profile_verifier(v, batch_images=2, questions_per_image=4, image_size=64, iterations=2, duration=30, warmup=1)
    assert res["backend"]["kv_cache_hit_rate"] == pytest.approx(v.llm.reused / (v.llm.reused + v.llm.missed))
    assert res["backend"]["kv_cache_hit_rate_window"] == 1.0  # warmed up: the timed calls find every block cached
    from verifier_engine.profiler import profile_server
    from verifier_engine.testing import serve_in_thread
    with serve_in_thread(create_app(v, backend="trtllm", model="tiny")) as url:
        res = profile_server(url, concurrency=1, requests=3, duration=30, batch_images=1, questions_per_image=2,
                             image_size=64)
    assert res["errors"] == 0 and res["backend"]["kv_cache_hit_rate_window"] == 1.0  # same image each request
    assert res["backend"]["kv_cache_hit_rate"] == pytest.approx(v.llm.reused / (v.llm.reused + v.llm.missed))


def test_the_gpu_check_script_runs_end_to_end_against_the_fake(tiny25, tmp_path, monkeypatch, capsys):
    import json

    from bench import trtllm_check
    install(monkeypatch, hashing=False)  # a fallback must fail the check even though every score agrees
    rc = trtllm_check.main(["--model", tiny25, "--device", "cpu", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "trtllm_check.json").read_text())
    c = report["checks"]
    assert c["trtllm_vs_hf_max_abs_diff"] < 1e-5 and c["trtllm_agrees_with_hf"]
    assert c["repeat_identical"] and c["repeat_hit"] and c["repeat_hit_rate"] == 1.0
    assert c["image_hashing"] is False and report["passed"] is False and rc == 1
    assert c["twin_images_scores"]["image0"] != c["twin_images_scores"]["image1_same_size_one_patch_changed"]
    assert {(r["backend"], r["questions_per_image"]) for r in report["throughput"]} == \
        {(b, q) for b in ("native", "trtllm") for q in (1, 4, 16)}
    assert all(r["questions_per_s"] > 0 for r in report["throughput"])
    assert "trtllm / native" in capsys.readouterr().out
    install(monkeypatch)  # hashing works: the check passes
    assert trtllm_check.main(["--model", tiny25, "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0


def test_the_gpu_check_script_says_when_it_is_skipped(tmp_path, monkeypatch, capsys):
    import json

    from bench import trtllm_check
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    assert trtllm_check.main(["--out", str(tmp_path)]) == 3
    assert "tensorrt_llm does not import" in json.loads((tmp_path / "trtllm_check.json").read_text())["skipped"]
    assert capsys.readouterr().out.startswith("SKIPPED")


def test_refuses_an_llm_whose_generate_async_has_no_cache_salt(tiny25, monkeypatch):
    trt = install(monkeypatch)
    real = trt.LLM.generate_async

    def old_generate_async(self, inputs, sampling_params=None, lora_request=None, prompt_adapter_request=None,
                           streaming=False, kv_cache_retention_config=None, disaggregated_params=None):
        return real(self, inputs, sampling_params)

    monkeypatch.setattr(trt.LLM, "generate_async", old_generate_async)
    with pytest.raises(RuntimeError, match="no cache_salt"):
        _load(tiny25)
