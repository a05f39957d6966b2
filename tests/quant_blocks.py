"""Random blocks of the GGUF block formats (valid bit patterns, finite modest scales), and their
reference values by the gguf package's dequantiser; shared by the native-kernel tests."""

from __future__ import annotations

import numpy as np

from cuda_ext.blocks import BY_TYPE

# byte offsets of each format's f16 scales inside a block (mxfp4: an E8M0 byte at 0)
SCALE_OFFSETS = {2: [0], 3: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208], 39: []}


def random_blocks(ggml_type: int, n_blocks: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """[n_blocks, bytes] uint8: random bits, with f16 scales drawn from N(0, scale) (E8M0 near 1)."""
    size = BY_TYPE[ggml_type].bytes
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[ggml_type]:
        raw[:, off : off + 2] = rng.normal(0, scale, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    if ggml_type == 39:
        raw[:, 0] = rng.integers(118, 127, size=n_blocks)  # E8M0 exponents: scales 2^-9 .. 2^-1
    return raw


def reference(blocks: np.ndarray, ggml_type: int) -> np.ndarray:
    """The values of ``blocks`` (flat float32) by the gguf package's reference dequantiser."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    with np.errstate(over="ignore"):  # an E8M0 255 block is inf, as it should be
        return dequantize(blocks.reshape(-1), GGMLQuantizationType(ggml_type)).reshape(-1).astype(np.float32)
