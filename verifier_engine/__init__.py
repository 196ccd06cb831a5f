"""verifier_engine: fast yes/no scoring of images by multimodal LLMs (RECIPE.md section 4).

Standalone: never imports ``alphagrpo``. Backends import their heavy dependencies lazily.

    from verifier_engine import load_verifier, VerifierClient
    v = load_verifier("native", "/ckpt/Qwen3-VL-8B-Instruct")       # in-process, shared-prefix scoring
    v = VerifierClient(["http://127.0.0.1:8000"])                   # a `verifier-engine serve` server
    v = load_verifier("openai", "Qwen/Qwen3-VL-30B-A3B-Instruct", base_url="http://127.0.0.1:30000")  # SGLang/vLLM
    scores = v.score(images, [["Is there a red circle?", ...], ...])  # P(yes) / (P(yes) + P(no)) per question
"""
from .protocol import FAILURE_POLICIES, ImageLike, Verifier, VerifierError, check_batch
from .prompt import SYSTEM_PROMPT
from .backends import backend_names, get_backend, load_verifier, register_backend

__all__ = ["ImageLike", "Verifier", "VerifierError", "FAILURE_POLICIES", "check_batch", "SYSTEM_PROMPT",
           "load_verifier", "get_backend", "register_backend", "backend_names", "VerifierClient"]


def __getattr__(name):  # the client needs httpx (an extra): import it on first use only
    if name == "VerifierClient":
        from .client import VerifierClient
        return VerifierClient
    raise AttributeError(f"module 'verifier_engine' has no attribute {name!r}")
