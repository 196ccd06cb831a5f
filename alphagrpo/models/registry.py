"""Policies by name: ``model.kind`` + ``model.path`` -> a ``Policy``.

Training, resume, the KL reference and evaluation all load policies here, so a model added by registration (in
this package, or from outside it) reaches every command with no change to ``alphagrpo/train/``.

A loader is ``loader(model: ModelConfig, path: str | None, device: str) -> Policy``. ``path`` is the user's model
folder, or a folder the policy's own ``save_pretrained`` wrote (a run's checkpoint: for LoRA runs, adapters plus a
pointer to the base), and the loader must accept both. ``model.kind`` is a registered name or ``"module:function"``
(imported on use), which is how a policy defined outside the package is named on the command line.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

Loader = Callable[..., Any]

_POLICIES: dict[str, Union[str, Loader]] = {
    "tiny_umm": "alphagrpo.models.tiny_policy:load_tiny_umm",
    "sd3": "alphagrpo.models.sd3:load_sd3",
    "bagel": "alphagrpo.models.bagel:load_bagel",
}

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    kind: str = "tiny_umm"          # a registered policy ("tiny_umm", "sd3", "bagel") or "module:function"
    path: Optional[str] = None      # local model folder (None: the policy's default; TinyUMM: the shipped checkpoint)
    dtype: str = "float32"          # weights of the frozen base: "float32", "bfloat16", "float16"
    gradient_checkpointing: bool = False   # recompute activations in replay (memory for time)
    attention: str = "sdpa"         # attention implementation where the policy offers a choice ("sdpa", "flash", ...)
    max_text_tokens: int = 0        # prompt-encoder length where the policy has one (SD3.5's T5); 0: its default
    options: tuple = ()             # "key=value" settings passed to the policy's loader as strings

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_text_tokens < 0:
            raise ValueError(f"model.max_text_tokens must be >= 0 (0: the policy's default), got {self.max_text_tokens}")
        bad = [o for o in self.options if "=" not in str(o)]
        if bad:
            raise ValueError(f"model.options are key=value strings, got {bad}")

    def option_dict(self, allowed=None, owner: str = "this policy", hint: str = "") -> dict:
        """``model.options`` as a dict; with ``allowed``, a name outside it is an error naming ``owner``'s options."""
        opts = dict(str(o).split("=", 1) for o in self.options)
        unknown = sorted(set(opts) - set(allowed)) if allowed is not None else []
        if unknown:
            raise ValueError(f"unknown model.options {unknown}: not {owner} options; it takes {sorted(allowed)}"
                             + (f" ({hint})" if hint else ""))
        return opts


def register_policy(kind: str, loader: Optional[Union[str, Loader]] = None):
    """Register ``loader`` (a callable or ``"module:function"``) as ``model.kind=kind``; usable as a decorator."""
    if loader is not None:
        _POLICIES[kind] = loader
        return loader

    def deco(fn: Loader) -> Loader:
        _POLICIES[kind] = fn
        return fn
    return deco


def policy_kinds() -> tuple[str, ...]:
    return tuple(_POLICIES)


def get_loader(kind: str) -> Loader:
    """The loader of ``kind`` (a registered name or ``module:function``); a clear error otherwise."""
    target = _POLICIES.get(kind)
    if target is None:
        if ":" not in kind:
            raise ValueError(f"unknown model.kind {kind!r}; choose one of {', '.join(_POLICIES)} or name a loader "
                             "as module:function")
        target = kind
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise ValueError(f"model.kind={kind!r}: no module {module!r} (is it on PYTHONPATH?)") from None
            raise
        if not hasattr(mod, attr):
            raise ValueError(f"model.kind={kind!r}: module {module!r} has no {attr!r}")
        target = getattr(mod, attr)
    return target


def load_policy(model: ModelConfig, device: str = "cpu", path: Optional[str] = None, world=None):
    """Load the policy ``model`` describes onto ``device`` (``path`` overrides ``model.path``: a checkpoint's
    policy folder, or the KL reference's). With ``world``, a policy that can check its vocabulary against the
    world's words (``check_vocabulary``) does, so an incompatible checkpoint fails here, not mid-run."""
    policy = get_loader(model.kind)(model, path if path is not None else model.path, device)
    if world is not None and getattr(world, "words", None) and hasattr(policy, "check_vocabulary"):
        policy.check_vocabulary(world.words)
    return policy
