"""engine.formats.linear on bf16 activations goes to cuda_ext's native product on the stored blocks
(within its documented int8-activation bound of the PyTorch path), on float32 activations to the
float32 kernel (the PyTorch path's dequantised values, within float32 summation-order rounding); a
batch over max_tokens(dtype) rows and MOEINF_NATIVE_KERNELS=0 keep the PyTorch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_ext import loader
from cuda_ext.blocks import BLOCKS
from cuda_ext.quant import max_tokens, qlinear
from engine import formats
from engine.formats.linear import linear
from engine.formats.tensor import QuantTensor

needs_native = pytest.mark.skipif(
    loader.cpu() is None, reason="no native kernels (no C compiler, or turned off)"
)


def _weight(fmt: str, n: int, k: int) -> QuantTensor:
    return QuantTensor.quantise(
        torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.1, formats.get(fmt)
    )


@needs_native
@pytest.mark.parametrize("fmt", list(BLOCKS))
def test_bf16_activations_take_the_native_kernel(fmt):
    k = 512
    w = _weight(fmt, 37, k)
    bias = torch.randn(37).bfloat16()
    for rows in (1, 3):
        x = torch.randn(rows, k).bfloat16()
        ours = linear(x, w, bias)
        assert torch.equal(ours, qlinear(x, w.raw, fmt, k, bias))
        dense = w.dequantize(torch.float32)
        exact = x.double() @ dense.double().T + bias.double()
        dx = x.double().abs().view(rows, -1, 32).amax(-1).repeat_interleave(32, dim=1) / 127
        bound = (dx / 2) @ dense.double().abs().T + exact.abs() * 2.0**-8 + 1e-3
        assert ((ours.double() - exact).abs() <= bound).all()
    x3 = torch.randn(2, 5, k).bfloat16()  # leading dimensions are kept
    assert linear(x3, w).shape == (2, 5, 37)


@needs_native
@pytest.mark.parametrize("fmt", list(BLOCKS))
def test_float32_activations_take_the_float32_kernel(fmt):
    k = 512
    w = _weight(fmt, 37, k)
    bias = torch.randn(37)
    dense = w.dequantize(torch.float32)
    for rows in (1, 3):
        x = torch.randn(rows, k)
        ours = linear(x, w, bias)
        assert ours.dtype == torch.float32 and torch.equal(ours, qlinear(x, w.raw, fmt, k, bias))
        exact = x.double() @ dense.double().T + bias.double()
        mag = x.double().abs() @ dense.double().abs().T + bias.double().abs()
        # summation order only (tests/test_cuda_ext_quant.py derives it): (K/64 + 8) roundings
        assert ((ours.double() - exact).abs() <= 1.01 * (k // 64 + 8) * 2.0**-24 * mag).all()
    assert linear(torch.randn(2, 5, k), w).shape == (2, 5, 37)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_batches_and_switch_keep_the_pytorch_path(monkeypatch, fmt):
    k = 256
    w = _weight(fmt, 16, k)
    for dtype in (torch.float32, torch.bfloat16):
        xb = torch.randn(max_tokens(dtype) + 1, k).to(dtype)
        assert torch.equal(linear(xb, w), F.linear(xb, w.dequantize(dtype)))
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "0")
    loader.reset()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            one = torch.randn(1, k).to(dtype)
            assert torch.equal(linear(one, w), F.linear(one, w.dequantize(dtype)))
    finally:
        monkeypatch.undo()
        loader.reset()


def test_the_cuda_kernel_declines_without_a_cuda_library():
    from engine.formats.linear import _cuda_kernel

    w = _weight("q4_k", 8, 256)
    assert _cuda_kernel(torch.randn(1, 256), w, None) is None  # the weight is on the CPU: no CUDA launch
