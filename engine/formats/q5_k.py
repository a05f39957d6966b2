"""q5_k (GGUF type 13, llama.cpp's Q5_K): super-blocks of 256 values in 8 sub-blocks of 32.

Block bytes: ``d`` fp16 | ``dmin`` fp16 | ``scales`` [12] (eight 6-bit scales and eight 6-bit mins,
packed as q4_k's) | ``qh`` [32] | ``qs`` [128] = 176 bytes, 5.5 bits per weight. Sub-block j:
value = (d * sc_j) * q - dmin * m_j, q in 0..31. ``qs`` holds the low 4 bits as q4_k's codes (four
runs of 32 bytes, run r holding sub-block 2r in its low nibbles and 2r + 1 in its high); value l of
sub-block j has its fifth bit in bit j of ``qh[l]``.

The quantiser is q4_k's with codes up to 31 (``q4_k.fit_super_blocks``): no importance weights (as
llama.cpp without an imatrix), each sub-block's scale and minimum from ``fit_affine`` (a sweep of
scales, each refitted by least squares, least squared error; the sweep holds llama.cpp's
make_qkx2_quants steps for Q5_K), the 6-bit scales and mins rounded against d = max scale / 63 and
dmin = max min / 63, then each sub-block tries its scale and min one step either way and keeps the
pair of least squared error.
"""

from __future__ import annotations

import torch

from engine.formats._bits import f16, f16_bytes, join_nibbles, low_high
from engine.formats.base import Format
from engine.formats.q4_k import fit_super_blocks, pack_scale_min, scale_min

BLOCK, BYTES = 256, 176
_SHIFTS = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)  # bit j of qh: sub-block j


def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    sc, mn = scale_min(raw[:, 4:16])
    step = (f16(raw, 0) * sc.to(torch.float32)).unsqueeze(2)
    off = (f16(raw, 2) * mn.to(torch.float32)).unsqueeze(2)
    low = low_high(raw[:, 48:].reshape(n * 4, 32)).reshape(n, 8, 32)
    high = ((raw[:, 16:48].unsqueeze(1) >> _SHIFTS.to(raw.device)) & 1) << 4  # [n, 8, 32]
    return (step * (low | high).to(torch.float32) - off).reshape(n, BLOCK)


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d, dmin, sc, mn, q = fit_super_blocks(x, 31)
    q = q.to(torch.int32)  # [n, 8, 32]
    low = (q & 15).reshape(n, 4, 2, 32)
    qs = join_nibbles(low[:, :, 0], low[:, :, 1]).reshape(n, 128)
    qh = ((q >> 4) << torch.arange(8, dtype=torch.int32, device=x.device).view(1, 8, 1)).sum(dim=1)
    return torch.cat((f16_bytes(d), f16_bytes(dmin), pack_scale_min(sc, mn), qh.to(torch.uint8), qs), dim=1)


FORMAT = Format("q5_k", BLOCK, BYTES, 13, unpack_blocks, pack_blocks)
