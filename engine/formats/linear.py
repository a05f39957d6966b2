"""``linear(x, weight, bias)``: y = x @ weight.T + bias for a float or a block-quantised weight.

A quantised weight is computed on as stored: a native kernel when one is registered for its format
and device (``register_kernel``; ``cuda_ext`` registers its CPU kernels), otherwise the PyTorch
path, which dequantises the weight to ``x``'s dtype and multiplies (any device, CPU or CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.formats.tensor import QuantTensor

Kernel = Callable[[torch.Tensor, QuantTensor, torch.Tensor | None], torch.Tensor | None]
_KERNELS: dict[tuple[str, str], Kernel] = {}


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
