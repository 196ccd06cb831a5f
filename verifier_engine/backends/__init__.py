"""Backend registry: ``load_verifier("native", "/path/to/Qwen3-VL")`` and friends.

Each backend is a class with ``from_pretrained(model, **kwargs)`` and ``score(images, question_lists,
expected_answers=None)``; it is imported only when asked for, so a missing optional dependency only matters to the
backend that needs it.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

_BACKENDS: dict[str, Any] = {
    "hf": "verifier_engine.backends.hf:HFVerifier",
    "native": "verifier_engine.backends.native:NativeVerifier",
    "openai": "verifier_engine.backends.openai:OpenAIVerifier",
    "trtllm": "verifier_engine.backends.trtllm:TRTLLMVerifier",
}


def register_backend(name: str, factory: Callable[..., Any] | str) -> None:
    """Add a backend: a class with ``from_pretrained``, or ``"module:Class"``."""
    _BACKENDS[name] = factory


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend(name: str):
    """The backend class registered as ``name``; raises with the valid names otherwise."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown verifier backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    target = _BACKENDS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def load_verifier(backend: str, model: str, **kwargs: Any):
    """Build the ``backend`` verifier for ``model`` (a local path; the served model name for ``openai``)."""
    return get_backend(backend).from_pretrained(model, **kwargs)
