"""``linear(x, weight, bias)``: y = x @ weight.T + bias for a float or a block-quantised weight.

A quantised weight is computed on as stored: a native kernel when one is registered for its format
and device (``register_kernel``; cuda_ext's CPU kernels are registered below), otherwise the PyTorch
path, which dequantises the weight to ``x``'s dtype and multiplies (any device, CPU or CUDA).

``int8_activations(True)``: while it holds, float32 activations meet block-format weights on the CPU
with int8 activations (``cuda_ext.quant.qgemm``: quantised per block, as llama.cpp does; its documented
bound), any number of rows; ``int8_activations("auto")``: in products of at least
``cuda_ext.quant.AUTO_MIN_ROWS[format]`` rows, where the int8 GEMM is the faster. The models set it per forward from their ``activations`` mode
(``ACTIVATIONS``); outside it (the default) float32 activations are never rounded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cuda_ext.quant import int8_activations, int8_min_rows  # noqa: F401  (re-exported: the models set it)
from engine.formats.tensor import QuantTensor

Kernel = Callable[[torch.Tensor, QuantTensor, torch.Tensor | None], torch.Tensor | None]
_KERNELS: dict[tuple[str, str], Kernel] = {}

# how a float32 model's activations meet block-format weights: "auto" (int8 on prompts, multi-token
# forwards; float32 on one-token decode), "float32" (never rounded), "int8" (always, as llama.cpp).
# The switch itself lives with the kernels (cuda_ext.quant), which read it.
ACTIVATIONS = ("auto", "float32", "int8")


def check_activations(mode: str) -> str:
    """``mode`` as one of ``ACTIVATIONS`` (case-insensitive); ValueError otherwise."""
    m = str(mode).strip().lower()
    if m not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {mode!r}")
    return m


def register_kernel(format_name: str, device_type: str, kernel: Kernel) -> None:
    """Use ``kernel(x, weight, bias)`` for ``format_name`` weights on ``device_type`` ("cpu", "cuda").

    A kernel returns None for a case it does not take (a shape, a dtype); the PyTorch path runs then.
    """
    _KERNELS[(format_name, device_type)] = kernel


def dequantized(weight: torch.Tensor | QuantTensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a float tensor of ``dtype`` (a float weight is only cast)."""
    if isinstance(weight, QuantTensor):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] -> [..., N] for a weight [N, K] (float, or quantised along K)."""
    if isinstance(weight, QuantTensor):
        kernel = _KERNELS.get((weight.format.name, weight.device.type))
        if kernel is not None:
            y = kernel(x, weight, bias)
            if y is not None:
                return y
        return F.linear(x, weight.dequantize(x.dtype), bias)
    return F.linear(x, weight, bias)


def _cpu_kernel(x: torch.Tensor, weight: QuantTensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """cuda_ext's native product on the stored blocks, for a 2-D weight and up to
    ``max_tokens(x.dtype, format)`` rows of x (16 for bf16, 256 for float32, 64 on q6_k): bf16 activations are rounded to int8 per block of 32 (as llama.cpp does); float32 ones are
    not (each block is dequantised in registers to the values the PyTorch path multiplies, so the
    result is that path's up to the order of the float32 sums). None (the PyTorch path) otherwise,
    and wherever the native kernels are off or missing."""
    from cuda_ext.quant import max_tokens, qgemm, qlinear

    if (
        x.dtype not in (torch.bfloat16, torch.float32)
        or len(weight.shape) != 2
        or x.shape[-1] != weight.shape[1]
    ):
        return None
    rows = x.reshape(-1, weight.shape[1])
    least = int8_min_rows(weight.format.name) if x.dtype == torch.float32 else None
    if least is not None and rows.shape[0] >= least:
        y = qgemm(rows, weight.raw, weight.format.name, weight.shape[1], bias)
        if y is not None:
            return y.view(*x.shape[:-1], weight.shape[0])
    if rows.shape[0] > max_tokens(x.dtype, weight.format.name):
        return None
    y = qlinear(rows, weight.raw, weight.format.name, weight.shape[1], bias)
    return None if y is None else y.view(*x.shape[:-1], weight.shape[0])


def _cuda_kernel(x: torch.Tensor, weight: QuantTensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The weight dequantised by cuda_ext's CUDA kernel (the same float32 values as ``unpack``, in one
    launch on torch's current stream), then ``F.linear``; None (the PyTorch path) where there is no
    CUDA library (no nvcc, no device, or the native kernels turned off) or x's dtype is not a float."""
    from cuda_ext.blocks import BLOCKS
    from cuda_ext.cuda import dequantize

    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    dense = dequantize(BLOCKS[weight.format.name].ggml_type, weight.raw.reshape(-1), x.dtype)
    return None if dense is None else F.linear(x, dense.view(weight.shape), bias)


def _register_native_kernels() -> None:
    from cuda_ext.blocks import BLOCKS

    for name in BLOCKS:
        register_kernel(name, "cpu", _cpu_kernel)
        register_kernel(name, "cuda", _cuda_kernel)


_register_native_kernels()
