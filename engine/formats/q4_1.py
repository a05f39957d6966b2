"""q4_1 (GGUF type 3): blocks of 32 values, fp16 scale ``d`` and minimum ``m`` + 4-bit codes;
value = d * q + m.

Block bytes: ``d`` (2) | ``m`` (2) | ``qs`` [16] = 20 bytes, 5 bits per weight. Byte j holds value j
in its low nibble and value j + 16 in its high nibble.
The quantiser (``fit_affine``, shared with q4_k) tries llama.cpp's range fit (d = (max - min) / 15,
m = min) and a sweep of scales, each refitted by least squares for its codes, and keeps the one of
least squared error with the codes nearest for the stored fp16 values: never worse than llama.cpp's.
"""

from __future__ import annotations

import torch

from engine.formats._bits import codes, f16, f16_bytes, join_nibbles, low_high, nearest, sq_err, to_f16
from engine.formats.base import Format

BLOCK, BYTES = 32, 20


def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
    q = low_high(raw[:, 4:]).reshape(raw.shape[0], BLOCK).to(torch.float32)
    return f16(raw, 0) * q + f16(raw, 2)


def fit_affine(
    x: torch.Tensor, nmax: int, rnd, nonpositive_min: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale d [n, 1], offset m [n, 1] and squared error [n] of the best ``x ~ d * q + m``, q in [0, nmax].

    Candidates: llama.cpp's range fit (d = span / nmax, m = min) and, for 21 scales
    (nmax - 1 + 0.1 i) / span (as llama.cpp's make_qkx2_quants sweeps), the least-squares (d, m) for
    the codes that scale gives; each is judged with the codes nearest for its stored values, all at
    once (a leading candidate dimension), ties to llama.cpp's. ``rnd(d, m)`` rounds a candidate to
    what will be stored; ``nonpositive_min`` keeps m <= 0 (the k-quants subtract a non-negative minimum).
    """
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    if nonpositive_min:
        lo = lo.clamp_max(0)
    span = hi - lo
    n = x.shape[1]
    steps = torch.tensor([nmax - 1 + 0.1 * i for i in range(21)], dtype=x.dtype, device=x.device).view(
        -1, 1, 1
    )
    iscale = torch.where(span > 0, steps / span.clamp_min(1e-30), torch.zeros_like(span))  # [S, n, 1]
    q = nearest(iscale * (x - lo)).clamp(0, nmax)  # [S, n, B]
    sq, sqq = q.sum(2, keepdim=True), (q * q).sum(2, keepdim=True)
    sx, sxq = x.sum(1, keepdim=True), (x * q).sum(2, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (n * sxq - sq * sx) / safe, span / nmax)
    m = torch.where(ok, (sqq * sx - sq * sxq) / safe, lo.expand_as(d))
    if nonpositive_min:
        pos = m > 0
        d = torch.where(pos & (sqq > 0), sxq / sqq.clamp_min(1e-30), d)
        m = torch.where(pos, torch.zeros_like(m), m)
    d = torch.cat(((span / nmax).unsqueeze(0), d))
    m = torch.cat((lo.unsqueeze(0), m))
    d, m = rnd(d, m)
    err = sq_err(d * codes(x, d, 0, nmax, offset=-m) + m, x)  # [S + 1, n]
    best = err.argmin(dim=0)
    rows = torch.arange(x.shape[0], device=x.device)
    return d[best, rows], m[best, rows], err[best, rows]


def _fp16_pair(d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return to_f16(d), to_f16(m)


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    d, m, _ = fit_affine(x, 15, _fp16_pair)
    q = codes(x, d, 0, 15, offset=-m).reshape(-1, 2, BLOCK // 2)
    return torch.cat((f16_bytes(d), f16_bytes(m), join_nibbles(q[:, 0], q[:, 1])), dim=1)


FORMAT = Format("q4_1", BLOCK, BYTES, 3, unpack_blocks, pack_blocks)
