"""q4_k (GGUF type 12, llama.cpp's Q4_K): super-blocks of 256 values in 8 sub-blocks of 32.

Block bytes: ``d`` fp16 | ``dmin`` fp16 | ``scales`` [12] (eight 6-bit scales and eight 6-bit mins)
| ``qs`` [128] = 144 bytes, 4.5 bits per weight. Sub-block j: value = (d * sc_j) * q - dmin * m_j,
q in 0..15. ``scales``: bytes 0-3 hold sc_0..3 (low 6 bits) and the top 2 bits of sc_4..7; bytes 4-7
the same for the mins; bytes 8-11 the low 4 bits of sc_4..7 (low nibble) and m_4..7 (high nibble).
``qs``: four runs of 32 bytes, run r holding sub-block 2r in its low nibbles and 2r+1 in its high.

The quantiser has no importance weights (as llama.cpp without an imatrix): each sub-block's float
scale and minimum come from ``fit_affine`` (least squared error over a sweep of scales, each refitted
by least squares), the 6-bit scales and mins are rounded against d = max scale / 63 and
dmin = max min / 63, then each sub-block tries its scale and min one step either way and keeps the
pair whose nearest codes give the least squared error with the stored values.
"""

from __future__ import annotations

import torch

from engine.formats._bits import codes, f16, f16_bytes, join_nibbles, low_high, nearest, sq_err, to_f16
from engine.formats.base import Format
from engine.formats.q4_1 import fit_affine

BLOCK, BYTES = 256, 144


def scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes [n, 12] -> 6-bit scales [n, 8] and mins [n, 8] (int32)."""
    s = s.to(torch.int32)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 63, (c & 0x0F) | ((a >> 2) & 0x30)), dim=1)
    mn = torch.cat((b & 63, (c >> 4) | ((b >> 2) & 0x30)), dim=1)
    return sc, mn


def pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    a = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    b = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat((a, b, c), dim=1).to(torch.uint8)


def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    sc, mn = scale_min(raw[:, 4:16])
    step = (f16(raw, 0) * sc.to(torch.float32)).unsqueeze(2)
    off = (f16(raw, 2) * mn.to(torch.float32)).unsqueeze(2)
    q = low_high(raw[:, 16:].reshape(n, 4, 32).reshape(n * 4, 32)).reshape(n, 8, 32).to(torch.float32)
    return (step * q - off).reshape(n, BLOCK)


def _identity(d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return d, m


def fit_super_blocks(
    x: torch.Tensor, nmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k-quant fit of super-blocks x [n, 256] (eight sub-blocks of 32, value = (d sc) q - dmin mn,
    q in 0..nmax, 6-bit sc and mn): d, dmin [n, 1] (their fp16 values), sc, mn [n, 8] and the codes
    q [n, 8, 32]; shared by q4_k (nmax 15) and q5_k (nmax 31)."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scale, m, _ = fit_affine(sub, nmax, _identity, nonpositive_min=True)
    scale, mins = scale.reshape(n, 8).clamp_min(0), (-m).reshape(n, 8).clamp_min(0)
    d = to_f16(scale.amax(dim=1, keepdim=True) / 63)
    dmin = to_f16(mins.amax(dim=1, keepdim=True) / 63)
    safe_d, safe_dmin = (
        torch.where(d > 0, d, torch.ones_like(d)),
        torch.where(dmin > 0, dmin, torch.ones_like(dmin)),
    )
    sc0 = nearest(scale / safe_d).clamp(0, 63)
    mn0 = nearest(mins / safe_dmin).clamp(0, 63)
    xs = sub.reshape(n, 8, 32)
    best_e = best_sc = best_mn = None
    for dsc in (0, -1, 1):
        for dmn in (0, -1, 1):
            sc = (sc0 + dsc).clamp(0, 63)
            mn = (mn0 + dmn).clamp(0, 63)
            step, off = (d * sc).unsqueeze(2), (dmin * mn).unsqueeze(2)
            q = codes(xs, step, 0, nmax, offset=off)
            e = sq_err(step * q - off, xs)
            if best_e is None:
                best_e, best_sc, best_mn = e, sc, mn
                continue
            better = e < best_e
            best_e = torch.minimum(e, best_e)
            best_sc, best_mn = torch.where(better, sc, best_sc), torch.where(better, mn, best_mn)
    step, off = (d * best_sc).unsqueeze(2), (dmin * best_mn).unsqueeze(2)
    return d, dmin, best_sc, best_mn, codes(xs, step, 0, nmax, offset=off)


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d, dmin, sc, mn, q = fit_super_blocks(x, 15)
    q = q.reshape(n, 4, 2, 32)
    qs = join_nibbles(q[:, :, 0], q[:, :, 1]).reshape(n, 128)
    return torch.cat((f16_bytes(d), f16_bytes(dmin), pack_scale_min(sc, mn), qs), dim=1)


FORMAT = Format("q4_k", BLOCK, BYTES, 12, unpack_blocks, pack_blocks)
