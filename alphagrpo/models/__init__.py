"""Model adapters implementing the ``Policy`` protocol. ``TinyUMM`` is the built-in one (the embedded default)."""
from alphagrpo.models.policy import CFGConfig, GenRequest, Policy, TextReplay, ThinkSample

__all__ = ["Policy", "GenRequest", "ThinkSample", "TextReplay", "CFGConfig"]
