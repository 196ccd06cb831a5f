"""The reward's verifier from one setting (``reward.verifier``): the world's own judge or a verifier address.

Addresses:
- ``world``: the world's programmatic verifier (the shapes world has one; the ``jsonl`` world has none).
- ``http://host:port`` or several, comma-separated: the project's verifier server(s) (``verifier-engine serve``),
  through ``verifier_engine.VerifierClient`` (least-busy server, retries, the failure policy).
- ``openai:MODEL@http://host:port[,http://...]``: an OpenAI-compatible server (SGLang, vLLM) serving ``MODEL``.
- ``BACKEND:PATH`` for an in-process backend of ``verifier_engine`` (``native``, ``hf``, ``trtllm``) on a local
  model folder, e.g. ``native:/ckpt/Qwen3-VL-8B-Instruct``.
A wrong address is a ``ValueError`` that names the setting and the accepted forms.
"""
from __future__ import annotations

from typing import Any, Optional

FORMS = ("world", "http://HOST:PORT[,http://...]", "openai:MODEL@http://HOST:PORT", "native:PATH", "hf:PATH",
         "trtllm:PATH")


def _bad(address: str, why: str) -> ValueError:
    return ValueError(f"reward.verifier={address!r}: {why}; accepted forms: {', '.join(FORMS)}")


def parse_address(address: str) -> tuple[str, Optional[str], list]:
    """``address`` -> ``(kind, model, urls)``: kind is ``world``, ``server``, ``openai`` or a backend name."""
    a = (address or "").strip()
    if not a:
        raise _bad(address, "empty")
    if a == "world":
        return "world", None, []
    if a.startswith(("http://", "https://")):
        urls = [u.strip() for u in a.split(",") if u.strip()]
        bad = [u for u in urls if not u.startswith(("http://", "https://")) or len(u.split("://", 1)[1]) == 0]
        if bad:
            raise _bad(address, f"not a server URL: {bad[0]!r}")
        return "server", None, urls
    kind, sep, rest = a.partition(":")
    if not sep or not rest:
        raise _bad(address, "unrecognised")
    if kind == "openai":
        model, at, urls = rest.rpartition("@")
        if not at or not model or not urls.startswith(("http://", "https://")):
            raise _bad(address, "the openai form is openai:MODEL@http://HOST:PORT")
        return "openai", model, [u.strip() for u in urls.split(",") if u.strip()]
    from verifier_engine import backend_names
    if kind not in backend_names():
        raise _bad(address, f"unknown backend {kind!r}")
    return kind, rest, []


def build_verifier(address: str, *, world=None, on_failure: str = "zero", timeout: float = 120.0,
                   concurrency: int = 8, retries: int = 3, device: str = "cpu") -> Any:
    """The ``Verifier`` an address names (see the module docstring). ``world``: needed for ``world``."""
    kind, model, urls = parse_address(address)
    if kind == "world":
        v = getattr(world, "verifier", None) if world is not None else None
        if v is None:
            name = getattr(world, "name", "this world")
            raise ValueError(f"reward.verifier=world, but the {name} world has no judge of its own: point "
                             "reward.verifier at a verifier (http://HOST:PORT for `verifier-engine serve`, "
                             "openai:MODEL@URL for SGLang/vLLM, native:PATH for an in-process model)")
        return v
    if kind == "server":
        from verifier_engine.client import VerifierClient
        return VerifierClient(urls, on_failure=on_failure, timeout=timeout, concurrency=concurrency, retries=retries)
    from verifier_engine import load_verifier
    if kind == "openai":
        return load_verifier("openai", model, base_url=urls if len(urls) > 1 else urls[0], on_failure=on_failure)
    return load_verifier(kind, model, device=device)
