"""q6_k (GGUF type 14, llama.cpp's Q6_K): super-blocks of 256 values in 16 sub-blocks of 16.

Block bytes: ``ql`` [128] (low 4 bits) | ``qh`` [64] (high 2 bits) | ``scales`` int8 [16] | ``d`` fp16
= 210 bytes, 6.5625 bits per weight. Sub-block t: value = (d * scales_t) * (q - 32), q in 0..63.
The 256 values are two halves of 128; in half h, value 32 g + i (g in 0..3, i in 0..31) has its low
bits in ``ql[64 h + 32 (g % 2) + i]`` (low nibble for g < 2, high for g >= 2) and its high bits in
``qh[32 h + i]`` at bit 2 g.

The quantiser has no importance weights: each sub-block's float scale comes from
``search_symmetric`` (the value of largest magnitude mapped near -32 and +31, each scale refitted by
least squares, least squared error), the int8 scales are rounded against d = -(largest scale) / 128,
then each sub-block tries its scale one step either way and keeps the least squared error.
"""

from __future__ import annotations

import torch

from engine.formats._bits import codes, f16, f16_bytes, nearest, sq_err, to_f16
from engine.formats.base import Format
from engine.formats.q4_0 import search_symmetric

BLOCK, BYTES = 256, 210
_TARGETS = (-32.0, -31.5, -31.0, -30.5, -30.0, -32.5, -33.0, 31.0, 31.5, 30.5, 30.0)


def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    ql = raw[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 2, 4, 32)
    qh = raw[:, 128:192].reshape(n, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
    q = (ql | (qh << 4)).to(torch.float32).reshape(n, 16, 16) - 32
    scale = raw[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return ((f16(raw, 208) * scale).unsqueeze(2) * q).reshape(n, BLOCK)


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scale, _ = search_symmetric(sub, -32, 31, _TARGETS, rnd=lambda d: d)
    scale = scale.reshape(n, 16)
    imax = scale.abs().argmax(dim=1, keepdim=True)
    d = to_f16(torch.gather(scale, 1, imax) / -128)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    sc0 = nearest(scale / safe).clamp(-128, 127)
    xs = sub.reshape(n, 16, 16)
    best_e = best_sc = None
    for delta in (0, -1, 1):
        sc = (sc0 + delta).clamp(-128, 127)
        step = (d * sc).unsqueeze(2)
        e = sq_err(step * codes(xs, step, -32, 31), xs)
        if best_e is None:
            best_e, best_sc = e, sc
            continue
        better = e < best_e
        best_e, best_sc = torch.minimum(e, best_e), torch.where(better, sc, best_sc)
    step = (d * best_sc).unsqueeze(2)
    u = (codes(xs, step, -32, 31) + 32).to(torch.uint8).reshape(n, 2, 4, 32)
    low, high = u & 0x0F, u >> 4
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    sc8 = best_sc.to(torch.int8).view(torch.uint8)
    return torch.cat((ql, qh, sc8, f16_bytes(d)), dim=1)


FORMAT = Format("q6_k", BLOCK, BYTES, 14, unpack_blocks, pack_blocks)
