"""The one switch between the fused Triton kernels and their plain-PyTorch references.

Every public loss in ``alphagrpo.kernels`` (``flow_grpo_loss``, ``ar_grpo_loss``) asks :func:`backend_for` which path
to take; nothing else in the project branches on it. The choice, in order of precedence:

1. :func:`use_fused` (``True`` -> Triton, ``False`` -> reference, ``None`` -> fall through), usable as a plain call
   or as a context manager that restores the previous setting (tests force either path this way);
2. the environment variable ``ALPHAGRPO_KERNELS`` = ``auto`` (default) | ``triton`` | ``ref``, read at every call;
3. ``auto``: CUDA tensors -> Triton; CPU tensors -> the reference, unless ``TRITON_INTERPRET=1`` is set, in which
   case the Triton kernels run in Triton's CPU interpreter (how CI tests them: slow, tiny shapes only). The
   interpreter needs ``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported.

Forcing ``triton`` where it cannot run (Triton not installed; CPU tensors without ``TRITON_INTERPRET=1``) raises an
error that says what to change instead of silently falling back. The project's kernels are jitted on first use, per
value of ``TRITON_INTERPRET``, so a process whose ``triton`` was imported in interpreter mode may switch the variable
off and on between calls (``tests/conftest.py`` does so: only kernel tests use the interpreter).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:  # optional at import time: CPU-only or non-Linux installs have no Triton and use the references
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

__all__ = ["use_fused", "backend_for", "triton_interpret", "interpreter_ready", "direct_launch", "HAS_TRITON",
           "ENV_VAR"]

ENV_VAR = "ALPHAGRPO_KERNELS"
_MODES = ("auto", "triton", "ref")
_override: Optional[bool] = None


class use_fused:
    """Force the fused Triton kernels (``True``), the references (``False``), or defer to ``ALPHAGRPO_KERNELS``
    (``None``).

    Takes effect immediately; as a context manager (``with use_fused(False): ...``) it restores the previous setting
    on exit.
    """

    def __init__(self, enabled: Optional[bool]):
        global _override
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"use_fused takes True, False or None, got {enabled!r}")
        self.previous = _override
        _override = enabled

    def __enter__(self) -> "use_fused":
        return self

    def __exit__(self, *exc) -> None:
        global _override
        _override = self.previous


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read now, not at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    """Whether Triton's interpreter can run here: ``triton.language`` must have been imported with
    ``TRITON_INTERPRET=1`` (its own helpers such as ``tl.sum`` are jitted at import time)."""
    if not HAS_TRITON:
        return False
    import triton.language as tl
    return type(tl.sum).__name__ == "InterpretedFunction"


def _mode() -> str:
    if _override is not None:
        return "triton" if _override else "ref"
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {list(_MODES)}: set it to auto, triton or ref")
    return mode


def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"ref"`` for tensors on ``device``, by the rules in the module docstring."""
    mode = _mode()
    if mode == "ref":
        return "ref"
    runnable = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and triton_interpret()
                                                         and interpreter_ready()))
    if mode == "auto":
        return "triton" if runnable else "ref"
    if not HAS_TRITON:
        raise RuntimeError("the fused kernels were forced (use_fused(True) or ALPHAGRPO_KERNELS=triton) but Triton "
                           "is not installed: pip install triton, or use the references (ALPHAGRPO_KERNELS=ref)")
    if device.type == "cpu" and triton_interpret() and not interpreter_ready():
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so Triton's CPU interpreter cannot "
                           "run: set it in the environment before Python starts (tests/conftest.py does this for "
                           "the test suite), or use the references (use_fused(False) or ALPHAGRPO_KERNELS=ref)")
    if not runnable:
        raise RuntimeError(f"the fused Triton kernels cannot run on {device.type} tensors: move them to CUDA, set "
                           "TRITON_INTERPRET=1 to use Triton's CPU interpreter, or use the references "
                           "(use_fused(False) or ALPHAGRPO_KERNELS=ref)")
    return "triton"


def direct_launch(*tensors) -> bool:
    """Whether a kernel's launcher may be called directly instead of through its ``torch.library`` custom op: in
    plain eager mode with plain tensors. The custom op is what ``torch.compile`` and other tracers need (an opaque
    call with known output shapes), but its eager dispatch costs about 0.2 ms of host time per call, more than the
    kernels themselves at image-step sizes; so tracing (``torch.compile``, ``make_fx``, any dispatch mode, fake or
    functional tensors) goes through the op and everything else skips it."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors if t is not None)
