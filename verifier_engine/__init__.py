"""verifier_engine: fast yes/no scoring of images by multimodal LLMs (RECIPE.md section 4).

Standalone: never imports ``alphagrpo``. Backends import their heavy dependencies lazily.
"""
from .protocol import ImageLike, Verifier, check_batch

__all__ = ["ImageLike", "Verifier", "check_batch"]
