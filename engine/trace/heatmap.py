"""Per-layer expert heat maps: statistics, a colour scale, digits for a pipe, and a PNG with axes."""

from __future__ import annotations

import os
import tempfile
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


def digits(values: np.ndarray) -> list[str]:
    """One character per cell of values in [0, 1], for a terminal without colour or a pipe: "." for an
    expert never routed, else the tenth of the busiest expert's count it reached ("0".."9")."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    return ["".join("." if x <= 0 else str(min(9, int(x * 10))) for x in row) for row in v]


def plot_png(path: str | Path, heat: np.ndarray, title: str) -> Path:
    """The layer x expert heat map as a PNG with axes, labels and a colour scale (matplotlib), written
    aside and renamed into place. Each layer is scaled to its busiest expert, as in the terminal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from engine.errors import MoeinfError

        raise MoeinfError("--png needs matplotlib: pip install 'moeinf[plot]' (or matplotlib)") from None
    path = Path(path)
    layers, experts = heat.shape
    width = min(16.0, max(5.0, 0.12 * experts + 2.5))
    height = min(12.0, max(3.0, 0.22 * layers + 1.5))
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    try:
        image = ax.imshow(normalise(heat), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(title)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("tokens routed, share of the layer's busiest expert")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path
