"""The trtllm backend against a fake ``tensorrt_llm`` module (TensorRT-LLM itself needs CUDA to install).

The fake implements exactly the API subset the backend uses (``LLM(model=...)``, ``LLM.generate(inputs,
sampling_params)``, ``SamplingParams(max_tokens=1, return_generation_logits=True)``, ``outputs[0].generation_logits``)
and computes real logits with a tiny Qwen-VL model, expanding the image placeholder the way TensorRT-LLM's input
processor does. So the test checks the prompts and images the backend sends and how it reads the logits.
"""
import sys
import types

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from verifier_engine.backends.hf import HFVerifier  # noqa: E402
from verifier_engine.testing import make_tiny_model, random_images  # noqa: E402
from verifier_engine.vlm import VLBundle  # noqa: E402



def fake_trtllm(log: list):
    mod = types.ModuleType("tensorrt_llm")

    class SamplingParams:
        def __init__(self, max_tokens=32, return_generation_logits=False, **kw):
            self.max_tokens, self.return_generation_logits = max_tokens, return_generation_logits

    class LLM:
        def __init__(self, model, **kwargs):
            self.bundle = VLBundle.from_pretrained(model, device="cpu", dtype="float32")

        def generate(self, inputs, sampling_params):
            assert sampling_params.max_tokens == 1 and sampling_params.return_generation_logits
            b, outs = self.bundle, []
            for inp in inputs:
                log.append(inp)
                (img,) = inp["multi_modal_data"]["image"]
                pv, grid, n_tok, _ = b.preprocess([img])
                text = inp["prompt"].replace("<|image_pad|>", "<|image_pad|>" * n_tok[0])
                ids = torch.tensor([b.tokenizer.encode(text, add_special_tokens=False)])
                with torch.no_grad():
                    logits = b.model(**b.model_inputs(ids, torch.ones_like(ids), pv, grid)).logits[:, -1]  # (1, V)
                comp = types.SimpleNamespace(generation_logits=logits, text="", token_ids=[int(logits.argmax())])
                outs.append(types.SimpleNamespace(outputs=[comp], prompt=inp["prompt"]))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_trtllm_backend_matches_hf_oracle_through_the_llm_api_subset(tmp_path, monkeypatch):
    path = make_tiny_model(str(tmp_path / "tiny"), "qwen2_5_vl", seed=5)
    log = []
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake_trtllm(log))
    from verifier_engine import load_verifier
    v = load_verifier("trtllm", path, batch_size=2)
    images = random_images(2, (64, 64), seed=9)
    qls = [["Is there a red circle?", "Is the text legible?", "Is it a painting?"], ["Are there two squares?"]]
    got = v.score(images, qls, [None, ["no"]])
    ref = HFVerifier.from_pretrained(path, device="cpu", dtype="float32").score(images, qls)
    assert np.allclose(got[0], ref[0], atol=1e-6)
    assert got[1][0] == pytest.approx(1 - ref[1][0], abs=1e-6)
    assert len(log) == 4 and log[0]["prompt"].count("<|image_pad|>") == 1  # placeholder left for TRT-LLM


def test_trtllm_backend_names_the_extra_when_tensorrt_llm_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes `import tensorrt_llm` fail
    from verifier_engine.backends.trtllm import TRTLLMVerifier
    with pytest.raises(ImportError, match=r"alphagrpo\[trtllm\]"):
        TRTLLMVerifier("/nonexistent")
