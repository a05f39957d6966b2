"""Per-layer expert heat maps: statistics, a colour scale, and a dependency-free PNG writer."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# anchors of a dark-to-bright scale (black, purple, red, orange, pale yellow)
_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


def colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (..., 3) on the scale above."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    return (_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).round().astype(np.uint8)


def normalise(heat: np.ndarray) -> np.ndarray:
    """Each layer's row scaled to [0, 1] by its maximum (layers compared by shape, not volume)."""
    peak = heat.max(axis=1, keepdims=True)
    return np.where(peak > 0, heat / np.maximum(peak, 1e-12), 0.0)


@dataclass
class LayerStats:
    layer: int
    effective_experts: float  # exp(entropy) of the layer's usage distribution
    top_share: float  # share of routing the single most used expert takes
    half_cover: int  # fewest experts that take half of the layer's routing
    unused: int  # experts never routed


def layer_stats(heat: np.ndarray) -> list[LayerStats]:
    out = []
    for layer, row in enumerate(heat):
        total = float(row.sum())
        if total <= 0:
            out.append(LayerStats(layer, 0.0, 0.0, 0, int(row.size)))
            continue
        p = row / total
        nz = p[p > 0]
        srt = np.sort(p)[::-1]
        out.append(
            LayerStats(
                layer,
                float(np.exp(-(nz * np.log(nz)).sum())),
                float(srt[0]),
                int(np.searchsorted(np.cumsum(srt), 0.5) + 1),
                int((row <= 0).sum()),
            )
        )
    return out


def heat_image(heat: np.ndarray, cell: int | None = None) -> np.ndarray:
    """RGB image [H, W, 3] of a layer x expert heat map, each cell ``cell`` pixels square."""
    L, E = heat.shape
    if cell is None:
        cell = int(max(2, min(24, 1200 // max(E, 1), 800 // max(L, 1))))
    rgb = colours(normalise(heat))
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image [H, W, 3] as a PNG (zlib, no dependencies), atomically."""
    path = Path(path)
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
