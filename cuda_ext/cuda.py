"""The CUDA kernels' calls (``csrc/cuda``), each None where it does not apply so the caller takes
the PyTorch path: no CUDA device, no nvcc, ``MOEINF_NATIVE_KERNELS=0``, or an input it does not take.

* ``dequantize(ggml_type, blocks, dtype)``: the values of GGUF-layout blocks (q8_0, q4_0, q4_1,
  q4_k, q5_k, q6_k, mxfp4; uint8 on a CUDA device) as a flat float32 / bf16 / fp16 tensor on the same
  device, on torch's current stream, bit-identical in float32 to the gguf package's dequantiser.
"""

from __future__ import annotations

import torch

from cuda_ext import loader
from cuda_ext.blocks import BY_TYPE

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dequantize(
    ggml_type: int, blocks: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor | None:
    if (
        ggml_type not in BY_TYPE
        or dtype not in _DTYPES
        or blocks.dtype != torch.uint8
        or blocks.device.type != "cuda"
        or not blocks.is_contiguous()
        or blocks.numel() % BY_TYPE[ggml_type].bytes
    ):
        return None
    lib = loader.cuda()
    if lib is None:
        return None
    _, values, size = BY_TYPE[ggml_type]
    n_blocks = blocks.numel() // size
    out = torch.empty(n_blocks * values, dtype=dtype, device=blocks.device)
    with torch.cuda.device(blocks.device):
        stream = torch.cuda.current_stream().cuda_stream
        err = lib.lib.moeinf_cuda_dequant(
            ggml_type, blocks.data_ptr(), out.data_ptr(), n_blocks, _DTYPES[dtype], stream
        )
    if err:
        raise RuntimeError(f"moeinf_cuda_dequant failed with CUDA error {err}")
    return out
