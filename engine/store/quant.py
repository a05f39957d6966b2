"""Dequantisation of quantised checkpoints at pull: gpt-oss MXFP4 and DeepSeek-V3 block FP8.

* MXFP4 (OCP microscaling, as gpt-oss ships its experts): ``<name>_blocks`` uint8 [..., G, 16] holds
  two 4-bit E2M1 codes per byte (low nibble first), ``<name>_scales`` uint8 [..., G] one power-of-two
  exponent (biased by 127) per group of 32 values. Value = FP4_VALUES[code] * 2**(scale - 127).
  gpt-oss stores [E, rows, cols] with the last dim packed; transformers' parameter is the transpose,
  [E, cols, rows]; ``dequant_mxfp4`` returns the transformers layout.
* FP8 block scaling (DeepSeek-V3): ``weight`` float8_e4m3fn [N, K] and ``weight_scale_inv`` float32
  [ceil(N/bn), ceil(K/bk)] (block [bn, bk], default 128x128); value = weight * scale of its block.
  Computed in float32, then cast once (as DeepSeek's reference ``weight_dequant``).
"""

from __future__ import annotations

import torch

from engine.formats.mxfp4 import FP4_VALUES


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``dequant_mxfp4`` output for blocks of ``blocks_shape`` ([E, rows, G, B] -> [E, G*B*2, rows])."""
    *prefix, g, b = blocks_shape
    e, rows = prefix
    return (e, g * b * 2, rows)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 ``blocks`` [E, rows, G, B] uint8 + ``scales`` [E, rows, G] uint8 -> [E, G*B*2, rows] ``dtype``."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    blocks = blocks.to(torch.uint8)
    exp = scales.to(torch.int32) - 127
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    *prefix, g, b = blocks.shape
    out = torch.empty(*prefix, g, b * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, exp.unsqueeze(-1).to(torch.float32))
    out = out.reshape(*prefix, g * b * 2)
    return out.transpose(-1, -2).contiguous().to(dtype)


def dequant_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """FP8 ``weight`` [..., N, K] times its per-block ``scale_inv`` [..., ceil(N/bn), ceil(K/bk)] -> ``dtype``."""
    bn, bk = block
    n, k = weight.shape[-2:]
    expect = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape[-2:]) != expect:
        raise ValueError(f"FP8 scale {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)} in {block} blocks")
    s = scale_inv.to(torch.float32)
    s = s.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return (weight.to(torch.float32) * s).to(dtype)
