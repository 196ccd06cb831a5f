"""Hostile inputs for the verifier server's tests: odd PNGs, decompression bombs, process memory (/proc)."""
from __future__ import annotations

import base64
import functools
import io
import struct
import threading
import time
import zlib

import numpy as np


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@functools.lru_cache(maxsize=256)
def png_bytes(width: int, height: int, colour=(200, 30, 60), noise_seed: int | None = None, mode: str = "RGB") -> bytes:
    """A PNG of one colour (tiny on the wire whatever its size) or, with ``noise_seed``, of coloured noise."""
    from PIL import Image
    if noise_seed is None:
        img = Image.new(mode, (width, height), colour if mode == "RGB" else colour[0])
    else:
        rng = np.random.default_rng(noise_seed)
        img = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=256)
def text_bomb_png() -> bytes:
    """A valid 8x8 PNG whose compressed text chunk inflates to 50 MB (about 50 KB on the wire)."""
    png = png_bytes(8, 8)
    return png[:33] + _chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"\0" * 50_000_000, 9)) + png[33:]


@functools.lru_cache(maxsize=256)
def huge_header_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels with (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=256)
def gif_bytes() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every few milliseconds while active; ``growth`` = peak - RSS at the start."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.base, self.peak = every_s, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base
