"""q8_0 (GGUF type 8): blocks of 32 values, fp16 scale ``d`` + 32 int8 codes; value = d * q.

Block bytes: ``d`` (2) | ``qs`` int8[32] = 34 bytes, 8.5 bits per weight.
The quantiser takes d = max|x| / 127 as llama.cpp does, then picks every code as the nearest for the
fp16 ``d`` actually stored (llama.cpp rounds with the float32 ``d``): never worse, element by element.
"""

from __future__ import annotations

import torch

from engine.formats._bits import codes, f16, f16_bytes, to_f16
from engine.formats.base import Format

BLOCK, BYTES = 32, 34


def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
    return raw[:, 2:].contiguous().view(torch.int8).to(torch.float32) * f16(raw, 0)


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    d = to_f16(x.abs().amax(dim=1, keepdim=True) / 127)
    q = codes(x, d, -128, 127).to(torch.int8)
    return torch.cat((f16_bytes(d), q.view(torch.uint8)), dim=1)


FORMAT = Format("q8_0", BLOCK, BYTES, 8, unpack_blocks, pack_blocks)
