"""The ``Verifier`` protocol: the only thing the trainer knows about scoring.

A verifier answers yes/no questions about images. For every image it receives a list of questions (phrased so
that "yes" means good) and returns one float per question, ``P(yes) / (P(yes) + P(no))`` in ``[0, 1]``.
Implementations: the in-process backends of this package, the HTTP client, and domain verifiers such as the
shapes world's programmatic one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

import numpy as np

try:  # PIL is a core dependency; the alias only documents what an image may be.
    from PIL import Image as _PILImage
    ImageLike = Union["_PILImage.Image", np.ndarray]
except ImportError:  # pragma: no cover
    ImageLike = np.ndarray  # type: ignore[misc]


@runtime_checkable
class Verifier(Protocol):
    """Scores yes/no questions about images.

    ``images``: a sequence of ``B`` images, each a ``PIL.Image.Image`` or a ``uint8`` array of shape ``[H, W, 3]``.
    ``question_lists``: ``B`` sequences of question strings (the questions verbatim, as in RECIPE.md section 4).
    Returns ``B`` lists of floats, ``out[i][j]`` the score of question ``j`` about image ``i``.
    """

    def score(self, images: Sequence[ImageLike], question_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        ...


def check_batch(images: Sequence[object], question_lists: Sequence[Sequence[str]]) -> None:
    """Raise a ``ValueError`` that says what to change when a score call's arguments do not line up."""
    if len(images) != len(question_lists):
        raise ValueError(
            f"score() got {len(images)} images but {len(question_lists)} question lists; pass one list per image")
    for i, qs in enumerate(question_lists):
        if isinstance(qs, str):
            raise ValueError(f"question_lists[{i}] is a string; pass a list of question strings per image")
        for j, q in enumerate(qs):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question_lists[{i}][{j}] must be a non-empty string, got {q!r}")


class VerifierError(RuntimeError):
    """A verifier could not score: a remote call failed after its retries, or a server refused the request."""


FAILURE_POLICIES = ("zero", "raise")


def check_failure_policy(policy: str) -> str:
    """``"zero"``: a query that fails after retries scores 0 (the authors' choice); ``"raise"``: raise."""
    if policy not in FAILURE_POLICIES:
        raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {policy!r}")
    return policy


@dataclass(frozen=True)
class ImageSpec:
    """What a backend's image processor does with an image, so a server can refuse or shrink it before the backend.

    A backend may expose it as ``image_spec()``. ``max_aspect_ratio``: longer side / shorter side beyond which the
    processor refuses the image (Qwen-VL: 200). ``target_size(width, height)``: the ``(width, height)`` the processor
    resizes to, or ``None`` when no exact resize can be done ahead of it; the server then decodes large images straight
    to that size with ``resample`` (a PIL filter number), so queued images hold no more pixels than the model sees.
    """
    max_aspect_ratio: float | None = None
    target_size: Callable[[int, int], tuple[int, int] | None] | None = None
    resample: int = 3  # PIL bicubic

    def check(self, width: int, height: int) -> None:
        """Raise a ``ValueError`` saying what is wrong when the backend would refuse a ``width`` x ``height`` image."""
        if width < 1 or height < 1:
            raise ValueError(f"the image is {width}x{height} pixels; it needs at least one pixel each way")
        ratio = max(width, height) / min(width, height)
        if self.max_aspect_ratio is not None and ratio > self.max_aspect_ratio:
            raise ValueError(f"the image is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; this model "
                             f"accepts at most {self.max_aspect_ratio:g}:1")
