"""The block formats the native kernels take, by name: GGUF type number, values and bytes per block
(the GGUF layouts, bit for bit; ``csrc/cuda/dequant.cu`` has the byte maps)."""

from __future__ import annotations

from typing import NamedTuple


class Block(NamedTuple):
    ggml_type: int
    values: int
    bytes: int


BLOCKS: dict[str, Block] = {
    "q4_0": Block(2, 32, 18),
    "q4_1": Block(3, 32, 20),
    "q8_0": Block(8, 32, 34),
    "q4_k": Block(12, 256, 144),
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
