"""What every tensor format is: a name, a block of values, its bytes, pack and unpack.

A tensor in a block format is a row-major float tensor of logical shape ``[..., K]`` whose last
dimension is cut into blocks of ``block`` values; each block becomes ``block_bytes`` bytes. The raw
form is a uint8 tensor of shape ``[..., K // block * block_bytes]`` (``stored_shape``): every row's
blocks back to back, exactly as GGUF lays a tensor's rows out (``ne0`` = K is GGUF's first
dimension). Float formats (f32/bf16/f16) are the block-of-one case: raw bytes are the tensor's own.

``unpack(raw, dtype)`` turns the raw bytes into floats in PyTorch (any device; computed in float32,
cast once at the end), ``pack(x)`` quantises floats (float32 math; device of ``x``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Unpack = Callable[[torch.Tensor], torch.Tensor]  # uint8 [n, block_bytes] -> float32 [n, block]
Pack = Callable[[torch.Tensor], torch.Tensor]  # float32 [n, block] -> uint8 [n, block_bytes]


@dataclass(frozen=True)
class Format:
    name: str  # "q4_k"
    block: int  # values per block
    block_bytes: int  # bytes per block
    ggml_type: int | None  # GGMLQuantizationType value, None when GGUF has no such type
    unpack_blocks: Unpack
    pack_blocks: Pack
    torch_dtype: torch.dtype | None = None  # float formats only

    @property
    def quantised(self) -> bool:
        return self.torch_dtype is None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if self.block > 1 and (not shape or shape[-1] % self.block):
            raise ValueError(
                f"{self.name} needs a last dimension that is a multiple of {self.block}, got shape {tuple(shape)}"
            )

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the raw uint8 tensor that holds a tensor of logical ``shape``."""
        self.check_shape(shape)
        if not self.quantised:
            return tuple(shape)
        return (*shape[:-1], shape[-1] // self.block * self.block_bytes)

    def logical_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """Logical shape of a raw uint8 tensor of shape ``stored`` (inverse of ``stored_shape``)."""
        if not self.quantised:
            return tuple(stored)
        if not stored or stored[-1] % self.block_bytes:
            raise ValueError(
                f"{self.name} rows are whole blocks of {self.block_bytes} bytes, got {tuple(stored)}"
            )
        return (*stored[:-1], stored[-1] // self.block_bytes * self.block)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a tensor of logical ``shape`` takes in this format."""
        self.check_shape(shape)
        n = 1
        for d in shape:
            n *= d
        return n // self.block * self.block_bytes

    def unpack(self, raw: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Raw bytes (uint8 ``stored_shape``) -> float tensor of the logical shape in ``dtype``."""
        if not self.quantised:
            return raw.to(dtype) if raw.dtype == self.torch_dtype else raw.view(self.torch_dtype).to(dtype)
        if raw.dtype != torch.uint8:
            raise TypeError(f"{self.name} data must be uint8 blocks, got {raw.dtype}")
        shape = self.logical_shape(tuple(raw.shape))
        if raw.device.type == "cuda" and self.ggml_type is not None:  # the CUDA kernel, where built
            from cuda_ext.cuda import dequantize

            out = dequantize(self.ggml_type, raw.contiguous(), dtype)
            if out is not None:
                return out.reshape(shape)
        out = self.unpack_blocks(raw.reshape(-1, self.block_bytes))
        return out.reshape(shape).to(dtype)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Float tensor ``[..., K]`` -> raw bytes of this format (uint8 ``stored_shape``)."""
        if not self.quantised:
            return x.to(self.torch_dtype).contiguous()
        shape = self.stored_shape(tuple(x.shape))
        blocks = x.detach().to(torch.float32).reshape(-1, self.block)
        out = torch.empty(blocks.shape[0], self.block_bytes, dtype=torch.uint8, device=x.device)
        step = max(
            1, (1 << 18) // self.block
        )  # blocks per chunk (256 Ki values): bounds the searches' memory
        for i in range(0, blocks.shape[0], step):
            out[i : i + step] = self.pack_blocks(blocks[i : i + step])
        return out.reshape(shape)
