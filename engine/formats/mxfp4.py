"""mxfp4 (OCP microscaling FP4, GGUF type 39): blocks of 32 E2M1 values sharing one power-of-two scale.

Block bytes: ``e`` (E8M0 exponent, bias 127) | ``qs`` [16] = 17 bytes, 4.25 bits per weight. Byte j
holds value j's 4-bit code in its low nibble and value j + 16's in its high nibble; code c decodes to
FP4_VALUES[c] * 2**(e - 127) (GGUF's layout, which the gguf package reads).

gpt-oss ships the same numbers in its own arrangement: ``<name>_blocks`` uint8 [..., G, 16] (values
2j and 2j + 1 in the low and high nibble of byte j) and ``<name>_scales`` uint8 [..., G] (the same
exponent bytes). ``from_gpt_oss`` regroups them into these blocks without touching a value, so a
gpt-oss expert is stored as it ships, bit for bit in value.

The quantiser tries, per block, llama.cpp's exponent (floor(log2 max|x|) - 2) and one either side,
with every code the nearest FP4 value, and keeps the least squared error: never worse than llama.cpp's.
"""

from __future__ import annotations

import torch

from engine.formats._bits import join_nibbles, low_high, sq_err
from engine.formats.base import Format

BLOCK, BYTES = 32, 17
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between successive FP4 magnitudes


def _half_scale(e: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (int32) -> 2**(e - 128) in float32, exactly (subnormal below e = 2), as GGUF decodes."""
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e.clamp(0, 1), (e - 1) << 23)
    return bits.view(torch.float32)


def _lut(device: torch.device) -> torch.Tensor:
    """Twice the FP4 values (integers; code 8 is +0 as GGUF decodes it), scaled by ``_half_scale``."""
    return torch.tensor([2 * v + 0.0 for v in FP4_VALUES], dtype=torch.float32, device=device)


def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
    q = low_high(raw[:, 1:]).reshape(raw.shape[0], BLOCK).long()
    return _half_scale(raw[:, :1].to(torch.int32)) * _lut(raw.device)[q]


def _fp4_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    mag = torch.bucketize((x.abs() / scale).contiguous(), mids)  # ties go to the smaller magnitude
    return torch.where((x < 0) & (mag > 0), mag + 8, mag)


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=1, keepdim=True)
    e0 = torch.where(
        amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2 + 127, torch.zeros_like(amax)
    )
    lut = _lut(x.device)
    best_e = best_q = best_err = None
    for shift in (0, 1, -1):
        e = (e0 + shift).clamp(0, 254).to(torch.int32)
        half = _half_scale(e)
        q = _fp4_codes(x, 2 * half)
        err = sq_err(half * lut[q], x)
        if best_err is None:
            best_e, best_q, best_err = e, q, err
            continue
        better = err < best_err
        best_err = torch.minimum(err, best_err)
        best_e, best_q = (
            torch.where(better.unsqueeze(1), e, best_e),
            torch.where(better.unsqueeze(1), q, best_q),
        )
    return torch.cat((best_e.to(torch.uint8), join_nibbles(best_q[:, :16], best_q[:, 16:])), dim=1)


def from_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss ``blocks`` [..., G, 16] + ``scales`` [..., G] -> raw mxfp4 [..., G * 17] (same values)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    *prefix, g, _ = blocks.shape
    b = blocks.to(torch.uint8).reshape(-1, 16)
    ordered = torch.stack((b & 0x0F, b >> 4), dim=2).reshape(-1, 32)  # value order
    packed = join_nibbles(ordered[:, :16], ordered[:, 16:])
    raw = torch.cat((scales.to(torch.uint8).reshape(-1, 1), packed), dim=1)
    return raw.reshape(*prefix, g * BYTES)


FORMAT = Format("mxfp4", BLOCK, BYTES, 39, unpack_blocks, pack_blocks)
