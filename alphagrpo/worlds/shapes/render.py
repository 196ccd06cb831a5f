"""Deterministic renderer of shapes-world scenes, plus the degradations used to test the verifier.

Each shape is drawn by 8x supersampling with PIL and box-averaged down, so its edge pixels are exact mixtures of
its color and the background (anti-aliased, identical on every machine). The per-object coverage maps are cached
per (resolution, shape, size, cell) and shared with the verifier, which matches them as templates.

``degrade`` adds Gaussian blur and Gaussian pixel noise, the two ways a small generative model's images differ most
from clean renders. Chosen not to do: JPEG artefacts, color shifts, geometric warps.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from alphagrpo.worlds.shapes.primitives import (BACKGROUND, COLORS, DEFAULT_RESOLUTION, GRID, SHAPES, SIZE_FRACTION,
                                                SIZES, Scene)

SUPERSAMPLE = 8
MIN_RESOLUTION, MAX_RESOLUTION = 24, 512


def check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ValueError(f"resolution must be an integer number of pixels, got {resolution!r}")
    r = int(resolution)
    if not MIN_RESOLUTION <= r <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] (a cell needs at least 8 px), "
                         f"got {r}")
    return r


def cell_size(resolution: int) -> float:
    return resolution / GRID


def cell_box(x: int, y: int, resolution: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (end exclusive) covering cell ``(x, y)``; boxes of neighbours share a pixel
    column/row where the cell border falls inside a pixel."""
    c = cell_size(resolution)
    return (int(np.floor(x * c)), int(np.floor(y * c)), int(np.ceil((x + 1) * c)), int(np.ceil((y + 1) * c)))


def shape_polygon(shape: str, cx: float, cy: float, span: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred at ``(cx, cy)`` with bounding box ``span x span`` (pixel units, y down).
    Circles are returned as their bounding box (drawn as an ellipse)."""
    h = span / 2
    if shape in ("circle", "square"):
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        a = span / 6  # arm half-width: arms are a third of the span wide
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
                (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
                (cx - h, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _draw_coverage(shape: str, cx: float, cy: float, span: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Coverage in ``[0, 1]`` of the pixels of ``box`` by the shape, float32 ``[y1 - y0, x1 - x0]``."""
    x0, y0, x1, y1 = box
    f = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * f, (y1 - y0) * f), 0)
    draw = ImageDraw.Draw(canvas)
    pts = [((px - x0) * f, (py - y0) * f) for px, py in shape_polygon(shape, cx, cy, span)]
    if shape == "circle":
        draw.ellipse([pts[0][0], pts[0][1], pts[2][0] - 1, pts[2][1] - 1], fill=255)
    else:
        draw.polygon(pts, fill=255)
    a = np.asarray(canvas, dtype=np.float32) / 255.0
    return a.reshape(y1 - y0, f, x1 - x0, f).mean(axis=(1, 3))


@lru_cache(maxsize=4096)
def object_coverage(shape: str, size: str, x: int, y: int, resolution: int,
                    dx: float = 0.0, dy: float = 0.0) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """``(box, coverage)``: the cell box of ``(x, y)`` and the coverage of a ``shape`` of ``size`` centred in it
    (optionally displaced by ``(dx, dy)`` pixels), float32 ``[box_h, box_w]``, read-only."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {SIZES}")
    c = cell_size(resolution)
    box = cell_box(x, y, resolution)
    cov = _draw_coverage(shape, (x + 0.5) * c + dx, (y + 0.5) * c + dy, SIZE_FRACTION[size] * c, box)
    cov.setflags(write=False)
    return box, cov


def render(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Draw ``scene`` on the plain background: uint8 ``[R, R, 3]``, deterministic. An empty scene gives a plain
    background image."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render() needs a Scene, got {type(scene).__name__}; use Scene.from_json or parse_plan")
    r = check_resolution(resolution)
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    img = np.zeros((r, r, 3), dtype=np.float32) + bg
    for o in scene.objects:
        (x0, y0, x1, y1), cov = object_coverage(o.shape, o.size, o.x, o.y, r)
        col = np.asarray(COLORS[o.color], dtype=np.float32)
        img[y0:y1, x0:x1] += cov[..., None] * (col - bg)  # objects never overlap: coverages add
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def gaussian_kernel(sigma: float) -> np.ndarray:
    rad = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-rad, rad + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float array ``[H, W]`` or ``[H, W, C]`` with edge padding (``sigma`` in px)."""
    if sigma <= 0:
        return a.astype(np.float32, copy=True)
    k = gaussian_kernel(sigma)
    rad = len(k) // 2
    out = a.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (rad, rad)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * np.take(p, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def as_uint8_image(image, name: str = "image") -> np.ndarray:
    """A PIL image or uint8 ``[H, W, 3]`` array -> uint8 ``[H, W, 3]`` array; ``ValueError`` saying what to change."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a PIL image or a uint8 numpy array [H, W, 3], got {type(image).__name__}")
    if image.dtype != np.uint8:
        hint = " (scale floats in [0, 1] with (x * 255).round().astype(np.uint8))" if image.dtype.kind == "f" else ""
        raise ValueError(f"{name} must have dtype uint8, got {image.dtype}{hint}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape [H, W, 3] (RGB), got {list(image.shape)}")
    return image


def degrade(image, rng: np.random.Generator, noise_std: float = 0.0, blur_sigma: float = 0.0) -> np.ndarray:
    """Blur (Gaussian, ``blur_sigma`` px) then add Gaussian noise (``noise_std`` on the 0-255 scale, per channel and
    pixel), clip and round: uint8 ``[H, W, 3]``. ``rng`` drives the noise."""
    img = as_uint8_image(image)
    if noise_std < 0 or blur_sigma < 0:
        raise ValueError(f"noise_std and blur_sigma must be >= 0, got {noise_std}, {blur_sigma}")
    out = gaussian_blur(img.astype(np.float32), blur_sigma)
    if noise_std > 0:
        out = out + rng.normal(0.0, noise_std, size=out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
