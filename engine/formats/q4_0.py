"""q4_0 (GGUF type 2): blocks of 32 values, fp16 scale ``d`` + 4-bit codes; value = d * (q - 8).

Block bytes: ``d`` (2) | ``qs`` [16] = 18 bytes, 4.5 bits per weight. Byte j holds value j in its low
nibble and value j + 16 in its high nibble.
The quantiser searches the scale per block (the value of largest magnitude mapped to each code near
-8 and +7, each scale refitted by least squares), keeping the candidate of least squared error with
the codes nearest for the fp16 scale; llama.cpp's choice (d = max / -8) is one candidate, so the
error is never above llama.cpp's.
"""

from __future__ import annotations

import torch

from engine.formats._bits import codes, f16, f16_bytes, join_nibbles, low_high, sq_err, to_f16
from engine.formats.base import Format

BLOCK, BYTES = 32, 18
_TARGETS = (-8.0, -7.75, -7.5, -7.25, -7.0, -8.25, -8.5, 7.0, 7.25, 7.5, 6.75, 6.5)


def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
    q = low_high(raw[:, 2:]).reshape(raw.shape[0], BLOCK).to(torch.float32) - 8
    return f16(raw, 0) * q


def search_symmetric(
    x: torch.Tensor, lo: int, hi: int, targets: tuple[float, ...], rnd=to_f16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best scale [n, 1] and codes [n, B] for ``x ~ d * q``, q in [lo, hi] (least squared error).

    Each candidate maps the value of largest magnitude to one of ``targets`` (the first is
    llama.cpp's), with and without a least-squares refit of the scale for its codes; ``rnd`` rounds
    a scale to what is stored. All candidates are tried at once (a leading candidate dimension);
    ties go to the first, llama.cpp's.
    """
    imax = x.abs().argmax(dim=1, keepdim=True)
    peak = torch.gather(x, 1, imax)  # [n, 1]
    t = torch.tensor(targets, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    d = rnd(peak.unsqueeze(0) / t)  # [T, n, 1]
    q = codes(x, d, lo, hi)  # [T, n, B]
    qq = (q * q).sum(dim=2, keepdim=True)
    refit = rnd(torch.where(qq > 0, (x * q).sum(dim=2, keepdim=True) / qq.clamp_min(1), d))
    d = torch.cat((d, refit))
    q = torch.cat((q, codes(x, refit, lo, hi)))
    best = sq_err(d * q, x).argmin(dim=0)  # [n]
    rows = torch.arange(x.shape[0], device=x.device)
    return d[best, rows], q[best, rows]


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    d, q = search_symmetric(x, -8, 7, _TARGETS)
    q = (q + 8).reshape(-1, 2, BLOCK // 2)
    return torch.cat((f16_bytes(d), join_nibbles(q[:, 0], q[:, 1])), dim=1)


FORMAT = Format("q4_0", BLOCK, BYTES, 2, unpack_blocks, pack_blocks)
