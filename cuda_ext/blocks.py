"""The block formats the native kernels take, by name: GGUF type number, values and bytes per block
(the GGUF layouts, bit for bit; ``csrc/cuda/dequant.cu`` has the byte maps)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Block(NamedTuple):
    ggml_type: int
    values: int
    bytes: int


BLOCKS: dict[str, Block] = {
    "q4_0": Block(2, 32, 18),
    "q4_1": Block(3, 32, 20),
    "q8_0": Block(8, 32, 34),
    "q4_k": Block(12, 256, 144),
    "q5_k": Block(13, 256, 176),
    "q6_k": Block(14, 256, 210),
    "mxfp4": Block(39, 32, 17),
}
BY_TYPE: dict[int, Block] = {b.ggml_type: b for b in BLOCKS.values()}


def row_bytes(name: str, k: int) -> int:
    """Bytes of one row of ``k`` values in format ``name`` (``k`` a multiple of its block)."""
    block = BLOCKS[name]
    if k % block.values:
        raise ValueError(f"{name} rows hold multiples of {block.values} values, not {k}")
    return k // block.values * block.bytes


def cpu_tensor(t, dtype: torch.dtype, numel: int | None = None) -> bool:
    """Whether ``t`` is a contiguous CPU tensor of ``dtype`` (of ``numel`` elements): what a kernel can
    be handed a pointer to."""
    return (
        isinstance(t, torch.Tensor)
        and t.dtype == dtype
        and t.device.type == "cpu"
        and t.is_contiguous()
        and (numel is None or t.numel() == numel)
    )


def bf16_cpu(t, numel: int | None = None) -> bool:
    return cpu_tensor(t, torch.bfloat16, numel)


def f32_cpu(t, numel: int | None = None) -> bool:
    return cpu_tensor(t, torch.float32, numel)


def block_weight(w, rows: int, cols: int) -> tuple[int, torch.Tensor] | None:
    """(GGUF type, raw blocks) of a block-quantised weight [rows, cols] (a ``QuantTensor``) in a format
    the kernels take, its blocks a contiguous CPU uint8 tensor; else None."""
    raw, block = getattr(w, "raw", None), BLOCKS.get(getattr(getattr(w, "format", None), "name", None))
    if (
        block is None
        or not isinstance(raw, torch.Tensor)
        or tuple(w.shape) != (rows, cols)
        or cols % block.values
        or raw.dtype != torch.uint8
        or raw.device.type != "cpu"
        or not raw.is_contiguous()
        or raw.numel() != rows * (cols // block.values) * block.bytes
    ):
        return None
    return block.ggml_type, raw
