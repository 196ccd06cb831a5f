"""Reading a shapes-world image: colored components -> objects with shape, color, size and cell distributions.

Steps (plain numpy, a few ms for a 32 x 32 image):
1. Background level and noise from the pixels far from anything bright (noise on black is clipped at 0, so its
   mean is removed). Per pixel, the palette color whose line from the background best explains it, and how far
   along that line the pixel is (its *coverage*: 1 for a solid pixel, 0.5 for a half-covered edge, whatever the
   blur).
2. Foreground = coverage >= 0.35; 8-connected components; a component spanning several grid cells is cut along the
   cell borders (blurred neighbours may touch), small leftovers rejoin their main part. Each piece is a *unit*.
3. Per unit: color from the angle of its mean color to each palette color; shape and size by matching its coverage
   map against the renderer's own templates (every shape and size, 4 blur levels, +-1 px shifts) with a Gaussian
   likelihood whose variance is the measured pixel noise plus a floor; an "unknown" hypothesis takes the mass
   when nothing fits. Objectness from the unit's mass against the smallest object's area.
4. For the quality questions: background RMS away from the objects, stray blobs (units too small to be objects),
   color purity, enclosed holes and same-colored fragments per object, template fit per object.
Chosen not to do: learned detectors, sub-cell positions, overlapping objects (the world has none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np

from alphagrpo.worlds.shapes.primitives import BACKGROUND, COLORS, GRID, SHAPES, SIZES
from alphagrpo.worlds.shapes.render import cell_box, cell_size, check_resolution, gaussian_blur, object_coverage

FG_THRESHOLD = 0.35
BLUR_LEVELS = (0.0, 0.6, 1.0, 1.5)      # template blur sigmas, in pixels of a 32 px image
COLOR_TAU_DEG = 4.0                      # angular scale of the color likelihood
MODEL_VAR = 0.05 ** 2                    # per-pixel coverage variance templates do not explain
NOISE_INFLATION = 16.0                  # widens the pixel-noise variance; set by measuring calibration under noise+blur
UNKNOWN_ERROR = 0.30                     # fit error (relative to the mass) of the "unknown shape" hypothesis
_PALETTE_NAMES = tuple(COLORS)
_BG = np.asarray(BACKGROUND, dtype=np.float32)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32) - _BG   # [K, 3]
_PAL_NORM2 = (_PALETTE ** 2).sum(1)                                                   # [K]
_PAL_UNIT = _PALETTE / np.sqrt(_PAL_NORM2)[:, None]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


@dataclass
class Unit:
    """One detected object (or stray blob). Probabilities are dicts over names; ``shape`` is None when "unknown"
    wins. ``cx, cy`` is the object's centre in pixels; ``x, y`` its grid cell."""
    shape: Optional[str]
    color: str
    size: str
    x: int
    y: int
    pixels: int
    mass: float
    p_object: float
    p_shape: dict
    p_color: dict
    p_size: dict
    cx: float
    cy: float
    fit_error: float = 0.0
    purity: float = 1.0
    hole_pixels: float = 0.0      # enclosed background pixels next to it, in pixels of a 32 px image
    fragments: int = 0            # other pieces of its color right next to it
    p_cell_x: list = field(default_factory=list)
    p_cell_y: list = field(default_factory=list)

    @property
    def confidence(self) -> float:
        """P(object) x P(its shape) x P(its color) x P(its size)."""
        ps = self.p_shape.get(self.shape, self.p_shape.get("unknown", 0.0)) if self.shape else self.p_shape["unknown"]
        return float(self.p_object * ps * self.p_color[self.color] * self.p_size[self.size])

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "cell": (self.x, self.y),
                "pixels": self.pixels, "mass": round(self.mass, 2), "confidence": round(self.confidence, 4),
                "p_object": round(self.p_object, 4), "center": (round(self.cx, 2), round(self.cy, 2))}


@dataclass
class Analysis:
    """Everything read from one image: objects (``p_object >= 0.5``), blobs (smaller units), image statistics."""
    resolution: int
    units: list
    background_rms: float
    noise_var: float
    faint_blobs: list = field(default_factory=list)   # masses of faint blobs away from every unit

    @property
    def objects(self) -> list:
        return [u for u in self.units if u.p_object >= 0.5]


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary dilation by a ``(2r+1) x (2r+1)`` square (separable, by slicing)."""
    out = mask.copy()
    for _ in range(r):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        out = m.copy()
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
    return out


def components(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """8- (or 4-) connected component labels of a boolean mask: int ``[H, W]``, 0 off the mask, 1..n on it
    (union-find with pointer jumping, vectorised: a few passes whatever the component shapes)."""
    h, w = mask.shape
    idx = np.arange(h * w).reshape(h, w)
    src, dst = [], []
    steps = ((0, 1), (1, 0), (1, 1), (1, -1)) if connectivity == 8 else ((0, 1), (1, 0))
    for dy, dx in steps:
        a = idx[:h - dy, max(0, -dx):w - max(0, dx)]
        b = idx[dy:, max(0, dx):w + min(0, dx)]
        both = mask[:h - dy, max(0, -dx):w - max(0, dx)] & mask[dy:, max(0, dx):w + min(0, dx)]
        src.append(a[both])
        dst.append(b[both])
    src, dst = np.concatenate(src), np.concatenate(dst)
    parent = np.arange(h * w)
    while True:
        ps, pd = parent[src], parent[dst]
        hi, lo = np.maximum(ps, pd), np.minimum(ps, pd)
        moved = hi != lo
        if not moved.any():
            break
        np.minimum.at(parent, hi[moved], lo[moved])
        while True:
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp
    lab = np.where(mask.ravel(), parent + 1, 0)
    _, inv = np.unique(lab, return_inverse=True)
    return inv.reshape(h, w)


@lru_cache(maxsize=16)
def templates(resolution: int) -> dict:
    """Per cell ``(x, y)``: ``(box, T, keys)`` with window box ``(x0, y0, x1, y1)`` (the cell box plus a margin,
    may extend past the image), templates ``T`` float32 ``[n, h, w]`` and ``keys[i] = (shape, size, blur)``."""
    r = check_resolution(resolution)
    c = cell_size(r)
    margin = int(np.ceil(0.15 * c))
    scale = r / 32.0
    out = {}
    for y in range(GRID):
        for x in range(GRID):
            bx0, by0, bx1, by1 = cell_box(x, y, r)
            box = (bx0 - margin, by0 - margin, bx1 + margin, by1 + margin)
            h, w = box[3] - box[1], box[2] - box[0]
            pad = int(np.ceil(3 * max(BLUR_LEVELS) * scale)) + 1
            T, keys = [], []
            for shape in SHAPES:
                for size in SIZES:
                    (x0, y0, x1, y1), cov = object_coverage(shape, size, x, y, r)
                    canvas = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
                    oy, ox = y0 - box[1] + pad, x0 - box[0] + pad
                    canvas[oy:oy + cov.shape[0], ox:ox + cov.shape[1]] = cov
                    for s in BLUR_LEVELS:
                        T.append(gaussian_blur(canvas, s * scale)[pad:pad + h, pad:pad + w])
                        keys.append((shape, size, s))
            T = np.stack(T)
            T[T < 1e-4] = 0.0   # no denormals from the Gaussian tails (they make float math ~1000x slower)
            out[(x, y)] = (box, T, keys)
    return out


@lru_cache(maxsize=16)
def _template_centroid_offsets(resolution: int) -> dict:
    """``(shape, size) -> (dx, dy)``: the shape's coverage centroid minus its cell centre (e.g. a triangle's)."""
    c = cell_size(resolution)
    out = {}
    for shape in SHAPES:
        for size in SIZES:
            (x0, y0, _, _), cov = object_coverage(shape, size, 1, 1, resolution)
            yy, xx = np.mgrid[0:cov.shape[0], 0:cov.shape[1]]
            m = cov.sum()
            out[(shape, size)] = (float((cov * (xx + 0.5)).sum() / m + x0 - 1.5 * c),
                                  float((cov * (yy + 0.5)).sum() / m + y0 - 1.5 * c))
    return out


def _cell_probs(v: float, c: float) -> list:
    """Soft membership of a centre coordinate ``v`` (px) in each of the GRID bands of width ``c``."""
    tau = 0.08 * c
    edges = [_sigmoid((v - i * c) / tau) if 0 < i < GRID else (1.0 if i == 0 else 0.0) for i in range(GRID + 1)]
    return [float(edges[i] - edges[i + 1]) for i in range(GRID)]


def min_object_area(resolution: int) -> float:
    """Coverage mass of the smallest object at ``resolution`` (a small diamond)."""
    return float(min(object_coverage(s, "small", 1, 1, resolution)[1].sum() for s in SHAPES))


def _coverage(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of ``d`` (image minus background, ``[R, R, 3]``): the index of the palette color whose line best
    explains it ``[R, R]`` and the coverage along that line, clipped to ``[0, 1.5]``."""
    dot = np.einsum("hwc,kc->hwk", d, _PALETTE)                                      # [R, R, K]
    a = np.clip(dot / _PAL_NORM2, 0, None)
    resid2 = -2 * a * dot + a * a * _PAL_NORM2          # |d - a P|^2 - |d|^2 (the |d|^2 term is the same for all K)
    best = resid2.argmin(-1)
    return best, np.clip(np.take_along_axis(a, best[..., None], -1)[..., 0], 0, 1.5)


def _units(fg: np.ndarray, cover: np.ndarray, c: float, area_min: float) -> list[np.ndarray]:
    """Foreground components, cut along cell borders where a component holds more than one object's worth of
    mass in several cells (blurred neighbours touching); small leftovers rejoin the biggest piece."""
    r = fg.shape[0]
    labels = components(fg)
    band = np.minimum((np.arange(r) + 0.5) // c, GRID - 1).astype(int)
    cell_id = band[:, None] * GRID + band[None, :]                                    # [R, R]
    out = []
    for lab in range(1, labels.max() + 1):
        comp = labels == lab
        ids = np.unique(cell_id[comp])
        if len(ids) == 1:
            out.append(comp)
            continue
        parts = {int(k): comp & (cell_id == k) for k in ids}
        mass = {k: float(cover[m].sum()) for k, m in parts.items()}
        main = [k for k in parts if mass[k] >= 0.5 * area_min]
        if len(main) <= 1:
            out.append(comp)
            continue
        biggest = max(main, key=mass.get)
        for k in parts:
            if k not in main:
                parts[biggest] |= parts[k]
        out += [parts[k] for k in main]
    return out


def analyze(img: np.ndarray) -> Analysis:
    """Read a uint8 ``[R, R, 3]`` image (already validated) into objects and statistics."""
    r = img.shape[0]
    c = cell_size(r)
    d = img.astype(np.float32) - _BG                                                  # [R, R, 3]
    _, cover = _coverage(d)
    near_fg = dilate(cover >= FG_THRESHOLD, max(2, int(round(2 * r / 32))))
    bg_pix = d[~near_fg]                                                              # [N, 3]
    # Pixel noise on a black background is clipped at 0, so it has a positive mean: remove it, keep its variance.
    bias = bg_pix.mean(0) if len(bg_pix) >= 8 else np.zeros(3, np.float32)
    noise_var = float(bg_pix.var(0).mean()) if len(bg_pix) >= 8 else 0.0              # per channel
    d = d - bias
    best, cover = _coverage(d)
    fg = cover >= FG_THRESHOLD
    best_smooth, _ = _coverage(gaussian_blur(d, 0.7))   # denoised hues, for color purity
    area_min = min_object_area(r)
    masks = [m for m in _units(fg, cover, c, area_min) if cover[m].sum() >= 0.05 * area_min]
    # background pockets enclosed by foreground: a hole of the unit that surrounds it alone
    bg_lab = components(~fg, connectivity=4)   # 4-connected background around 8-connected objects
    border = np.unique(np.concatenate([bg_lab[0], bg_lab[-1], bg_lab[:, 0], bg_lab[:, -1]]))
    holes = np.zeros(len(masks))
    for lab in np.setdiff1d(np.unique(bg_lab[bg_lab > 0]), border):
        pocket = bg_lab == lab
        rim = dilate(pocket, 1) & ~pocket
        for i, m in enumerate(masks):
            if not (rim & ~m).any():
                holes[i] += pocket.sum()
    colors = [_color_probs(d, cover, m) for m in masks]
    ctx = _Context(r, c, d, cover, best_smooth, holes, masks, [int(p.argmax()) for p in colors], area_min,
                   noise_var)
    units = [_read_unit(ctx, i, colors[i]) for i in range(len(masks))]
    # pieces of one object: a same-colored neighbour too small to be an object, or one sharing the cell
    for i, u in enumerate(units):
        near = dilate(masks[i], 2)
        u.fragments = sum(1 for j, v in enumerate(units) if j != i and v.color == u.color
                          and (v.p_object < 0.5 or (v.x, v.y) == (u.x, u.y)) and (masks[j] & near).any())
    # faint blobs (a blurred speck never reaches the foreground threshold): a lower threshold, above the noise,
    # away from every unit
    sigma_cov = np.sqrt(noise_var) / np.sqrt(_PAL_NORM2.min())
    faint_thr = float(np.clip(5 * sigma_cov, 0.12, FG_THRESHOLD))
    claimed = dilate(np.logical_or.reduce(masks) if masks else np.zeros((r, r), bool), 2)
    faint = (cover >= faint_thr) & ~claimed
    faint_lab = components(faint)
    faint_mass = [float(cover[faint_lab == k].sum()) for k in range(1, faint_lab.max() + 1)]
    # background: everything away from the well-fitting objects (a textured background's blobs stay in it)
    real = np.zeros((r, r), bool)
    for u, m in zip(units, masks):
        if u.p_object >= 0.5 and u.fit_error <= 0.1:
            real |= m
    away = ~dilate(real, max(2, int(round(2 * r / 32))))
    d0 = img.astype(np.float32) - _BG
    background_rms = float(np.sqrt((d0[away] ** 2).sum(-1).mean())) if away.any() else 0.0
    return Analysis(r, units, background_rms, noise_var, faint_mass)


@dataclass
class _Context:
    r: int
    c: float
    d: np.ndarray
    cover: np.ndarray
    best_smooth: np.ndarray
    holes: np.ndarray
    masks: list
    color_index: list
    area_min: float
    noise_var: float


def _color_probs(d: np.ndarray, cover: np.ndarray, um: np.ndarray) -> np.ndarray:
    """P(color) ``[K]`` from the angle between the unit's coverage-weighted mean color and each palette color."""
    core = um & (cover >= 0.6)
    sel = core if core.sum() >= 3 else um
    w = cover[sel]
    mean = (d[sel] * w[:, None]).sum(0) / max(w.sum(), 1e-6)
    cosang = np.clip(_PAL_UNIT @ (mean / max(np.linalg.norm(mean), 1e-6)), -1, 1)
    lc = -0.5 * (np.degrees(np.arccos(cosang)) / COLOR_TAU_DEG) ** 2
    pc = np.exp(lc - lc.max())
    return pc / pc.sum()


def _read_unit(ctx: _Context, i: int, pc: np.ndarray) -> Unit:
    um, r, c = ctx.masks[i], ctx.r, ctx.c
    others = np.zeros_like(um)
    for j, m in enumerate(ctx.masks):
        if j != i:
            others |= m
    keep = ~dilate(others, 1)
    halo = dilate(um, 1) & keep
    mass = float(ctx.cover[halo].sum())
    k = ctx.color_index[i]
    core = um & (ctx.cover >= 0.6)
    sel = core if core.any() else um
    purity = float((ctx.cover[sel] * (ctx.best_smooth[sel] == k)).sum() / max(ctx.cover[sel].sum(), 1e-6))
    hole_px = float(ctx.holes[i])

    w = ctx.cover[um]
    ys, xs = np.nonzero(um)
    ccx = float((w * (xs + 0.5)).sum() / w.sum())
    ccy = float((w * (ys + 0.5)).sum() / w.sum())
    cell = (int(min(GRID - 1, ccx // c)), int(min(GRID - 1, ccy // c)))

    # coverage of this unit's color, signed (noise stays zero-mean); others' pixels and halos masked out
    a_col = np.clip(np.einsum("hwc,c->hw", ctx.d, _PALETTE[k]) / _PAL_NORM2[k], -1.0, 1.5) * keep
    sigma_a2 = ctx.noise_var / _PAL_NORM2[k]                                          # coverage noise variance
    box, T, keys = templates(r)[cell]
    n_t = len(keys)
    smax = max(1, int(round(r / 32)))
    pad = smax + max(0, -box[0], -box[1], box[2] - r, box[3] - r)
    a_pad, k_pad = np.pad(a_col, pad), np.pad(keep, pad)
    h, wd = box[3] - box[1], box[2] - box[0]
    shifts = [(dx, dy) for dy in range(-smax, smax + 1) for dx in range(-smax, smax + 1)]
    win = np.stack([a_pad[box[1] + dy + pad:box[1] + dy + pad + h, box[0] + dx + pad:box[0] + dx + pad + wd]
                    for dx, dy in shifts]).reshape(len(shifts), -1)                  # [S, h*w]
    kwin = np.stack([k_pad[box[1] + dy + pad:box[1] + dy + pad + h, box[0] + dx + pad:box[0] + dx + pad + wd]
                     for dx, dy in shifts]).reshape(len(shifts), -1).astype(np.float32)
    Tf = T.reshape(n_t, -1)                                                           # [n_t, h*w]
    # SSE of (window - template * keep) for every shift and template: |a|^2 - 2 a.T + keep.T^2   [S, n_t]
    # (einsum, not @: these products are small, and a multithreaded BLAS on a busy machine makes them 1000x slower)
    sse = ((win ** 2).sum(1)[:, None] - 2 * np.einsum("sp,tp->st", win, Tf)
           + np.einsum("sp,tp->st", kwin, Tf ** 2)
           - kwin.sum(1)[:, None] * sigma_a2)
    err = sse.min(0).reshape(len(SHAPES), len(SIZES), len(BLUR_LEVELS)).min(-1)       # [shapes, sizes]
    norm = max(mass, 0.5 * ctx.area_min)
    # Gaussian likelihood of the coverage map under each template: SSE / (2 variance), the variance being pixel
    # noise (widened, see NOISE_INFLATION) plus a floor for what templates cannot model
    temp = 2 * (NOISE_INFLATION * sigma_a2 + MODEL_VAR)
    logits = -np.append(err.ravel(), UNKNOWN_ERROR * norm) / temp
    p = np.exp(logits - logits.max())
    p /= p.sum()
    p_pairs = p[:-1].reshape(len(SHAPES), len(SIZES))
    p_shape = {s: float(v) for s, v in zip(SHAPES, p_pairs.sum(1))}
    p_shape["unknown"] = float(p[-1])
    q = np.exp(logits[:-1] - logits[:-1].max())     # size: over the known shapes only (a blob still has a size)
    p_size = {z: float(v) for z, v in zip(SIZES, (q / q.sum()).reshape(len(SHAPES), len(SIZES)).sum(0))}
    si, zi = np.unravel_index(int(err.argmin()), err.shape)
    shape, size = SHAPES[si], SIZES[zi]
    fit = float(max(err[si, zi], 0) / norm)
    if p_shape["unknown"] > max(p_shape[s] for s in SHAPES):
        shape_out = None
    else:
        shape_out = shape
    ox, oy = _template_centroid_offsets(r)[(shape, size)]
    cx, cy = ccx - ox, ccy - oy
    p_obj = float(_sigmoid((mass - 0.35 * ctx.area_min) / (0.08 * ctx.area_min)))
    return Unit(shape=shape_out, color=_PALETTE_NAMES[k], size=size, x=cell[0], y=cell[1], pixels=int(um.sum()),
                mass=mass, p_object=p_obj, p_shape=p_shape, p_color={n: float(v) for n, v in zip(_PALETTE_NAMES, pc)},
                p_size=p_size, cx=cx, cy=cy, fit_error=fit, purity=purity, hole_pixels=hole_px / (r / 32) ** 2,
                p_cell_x=_cell_probs(cx, c), p_cell_y=_cell_probs(cy, c))
