"""The float formats: f32, bf16, f16 (GGUF types 0, 30, 1), stored as the tensor's own bytes."""

from __future__ import annotations

import torch

from engine.formats.base import Format


def _float(name: str, dtype: torch.dtype, ggml_type: int) -> Format:
    size = torch.empty((), dtype=dtype).element_size()

    def unpack_blocks(raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(dtype).to(torch.float32)

    def pack_blocks(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).contiguous().view(torch.uint8)

    return Format(name, 1, size, ggml_type, unpack_blocks, pack_blocks, torch_dtype=dtype)


F32 = _float("f32", torch.float32, 0)
F16 = _float("f16", torch.float16, 1)
BF16 = _float("bf16", torch.bfloat16, 30)
