"""llama.cpp's reference (importance-free) Q4_K, Q5_K and Q6_K quantisers, restated in NumPy as a yardstick.

The ``gguf`` package has no quantiser for the k-quants, so the formats tests measure moeinf's
against this statement of llama.cpp's ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` /
``quantize_row_q6_K_ref`` algorithm (``make_qkx2_quants`` with weights av|x| + |x|: for Q4_K nmax 15,
rmin -1, rdelta 0.1, 20 steps; for Q5_K nmax 31, rmin -0.5, rdelta 0.1, 15 steps; ``make_qx_quants``
with weights x^2 and 18 extra scales), vectorised over sub-blocks. It returns the
dequantised values only (its bytes are never stored).
"""

from __future__ import annotations

import numpy as np


def _round(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _qkx2(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float = -1.0, nstep: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [n, 32]: (scale, min) with value = scale * l - min (min >= 0)."""
    lo = np.minimum(x.min(1, keepdims=True), 0)
    hi = x.max(1, keepdims=True)
    span = hi - lo
    flat = span[:, 0] == 0
    span = np.where(span == 0, 1, span)
    sw, swx = w.sum(1, keepdims=True), (w * x).sum(1, keepdims=True)
    iscale = nmax / span
    scale = 1 / iscale
    q = np.clip(_round(iscale * (x - lo)), 0, nmax)
    best = (w * (scale * q + lo - x) ** 2).sum(1, keepdims=True)
    mn = lo.copy()
    for i in range(nstep + 1):
        iscale = (rmin + 0.1 * i + nmax) / span
        q = np.clip(_round(iscale * (x - lo)), 0, nmax)
        sl, sl2, sxl = (
            (w * q).sum(1, keepdims=True),
            (w * q * q).sum(1, keepdims=True),
            (w * q * x).sum(1, keepdims=True),
        )
        det = sw * sl2 - sl * sl
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (sw * sxl - swx * sl) / det
            m = (sl2 * swx - sl * sxl) / det
            pos = m > 0
            s = np.where(pos, sxl / sl2, s)
        m = np.where(pos, 0, m)
        err = (w * (s * q + m - x) ** 2).sum(1, keepdims=True)
        take = (det > 0) & (err < best)
        best, scale, mn = np.where(take, err, best), np.where(take, s, scale), np.where(take, m, mn)
    scale = np.where(flat[:, None], 0, scale)
    return scale[:, 0], -mn[:, 0]


def q4_k(x: np.ndarray, nmax: int = 15, rmin: float = -1.0, nstep: int = 20) -> np.ndarray:
    """Dequantised values of llama.cpp's Q4_K of x (rows of 256 multiples)."""
    sb = x.reshape(-1, 8, 32).astype(np.float32)
    n = sb.shape[0]
    sub = sb.reshape(-1, 32)
    av = np.sqrt((sub**2).sum(1, keepdims=True) / 32)
    scale, mins = _qkx2(sub, av + np.abs(sub), nmax, rmin, nstep)
    scale, mins = scale.reshape(n, 8), mins.reshape(n, 8)
    ms, mm = scale.max(1, keepdims=True), mins.max(1, keepdims=True)
    with np.errstate(divide="ignore"):
        ls = np.minimum(63, _round(np.where(ms > 0, 63 / ms, 0) * scale))
        lm = np.minimum(63, _round(np.where(mm > 0, 63 / mm, 0) * mins))
    d, dmin = _f16(ms / 63), _f16(mm / 63)
    step, off = (d * ls)[..., None], (dmin * lm)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_round((sb + off) / step), 0, nmax)
    q = np.where(step == 0, 0, q)
    return (step * q - off).reshape(x.shape)


def q5_k(x: np.ndarray) -> np.ndarray:
    """Dequantised values of llama.cpp's Q5_K of x (rows of 256 multiples): Q4_K's steps, codes to 31."""
    return q4_k(x, nmax=31, rmin=-0.5, nstep=15)


def _qx(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per row of x [n, 16]: llama.cpp's make_qx_quants scale (rmse_type 1: weights x^2)."""
    idx = np.abs(x).argmax(1)[:, None]
    peak = np.take_along_axis(x, idx, 1)
    zero = np.abs(peak[:, 0]) < 1e-15
    peak = np.where(zero[:, None], 1, peak)
    w = x * x

    def fit(iscale):
        q = np.clip(_round(iscale * x), -nmax, nmax - 1)
        return (w * x * q).sum(1, keepdims=True), (w * q * q).sum(1, keepdims=True)

    slx, sl2 = fit(-nmax / peak)
    scale = np.where(sl2 > 0, slx / np.where(sl2 > 0, sl2, 1), 0)
    best = scale * slx
    for i in range(-9, 10):
        if i == 0:
            continue
        slx, sl2 = fit(-(nmax + 0.1 * i) / peak)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        s = slx / np.where(sl2 > 0, sl2, 1)
        scale, best = np.where(take, s, scale), np.where(take, s * slx, best)
    return np.where(zero, 0, scale[:, 0])


def q6_k(x: np.ndarray) -> np.ndarray:
    """Dequantised values of llama.cpp's Q6_K of x (rows of 256 multiples)."""
    sb = x.reshape(-1, 16, 16).astype(np.float32)
    n = sb.shape[0]
    scale = _qx(sb.reshape(-1, 16), 32).reshape(n, 16)
    idx = np.abs(scale).argmax(1)[:, None]
    top = np.take_along_axis(scale, idx, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(top != 0, -128 / top, 0)
        d = _f16(np.where(top != 0, 1 / iscale, 0))
    sc = np.minimum(127, _round(iscale * scale))
    step = (d * sc)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_round(sb / step), -32, 31)
    q = np.where(step == 0, 0, q)
    return (step * q).reshape(x.shape)
