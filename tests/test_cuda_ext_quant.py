"""Native products on stored block formats (cuda_ext.quant) against dequantise-then-multiply.

Every format, every build of the kernels (native AVX-512 VNNI here, AVX2, portable C), odd sizes
(an odd number of 32-blocks, rows not a multiple of the split), one token and small batches. The
tolerance is the one the kernel documents: the activations are rounded to int8 per block of 32, so
|ours - exact| <= sum_j |w_j| * d_x(j) / 2 with d_x = max|x_block| / 127, plus float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quant_blocks import random_blocks, reference

from cuda_ext import loader
from cuda_ext.blocks import BLOCKS, row_bytes
from cuda_ext.quant import qlinear

FORMATS = list(BLOCKS)


def _shapes(fmt: str) -> list[tuple[int, int]]:
    if BLOCKS[fmt].values == 256:
        return [(1, 256), (7, 512), (33, 768), (130, 1280)]
    return [(1, 32), (5, 96), (17, 160), (64, 1024), (131, 2080)]


def _weights(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    block = BLOCKS[fmt]
    raw = random_blocks(block.ggml_type, n * k // block.values, np.random.default_rng(seed))
    dense = torch.from_numpy(reference(raw, block.ggml_type).reshape(n, k))
    return torch.from_numpy(raw.reshape(n, row_bytes(fmt, k))), dense


def _rounding(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """float32 rounding of the sums: a few roundings per block, and one per block summed."""
    blocks = x.shape[1] // 32
    return (blocks + 4) * 2.0**-24 * (x.double().abs() @ dense.double().abs().T) + 1e-30


def _bound(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The activation-rounding bound of every output, plus float32 rounding."""
    dx = x.double().abs().view(x.shape[0], -1, 32).amax(-1) / 127  # [M, K/32]
    half_step = (dx / 2).repeat_interleave(32, dim=1)  # [M, K]
    return half_step @ dense.double().abs().T + _rounding(x, dense)


def _exact_int8_activations(tokens: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Activations the int8 quantisation keeps exactly: integers up to 127 in every block of 32 (one
    of them 127 or -127) times a power of two."""
    q = torch.randint(-127, 128, (tokens, k // 32, 32), generator=g).double()
    q[:, :, 0] = 127 * torch.where(torch.rand(tokens, k // 32, generator=g) < 0.5, -1.0, 1.0)
    scale = 2.0 ** torch.randint(-9, -4, (tokens, k // 32, 1), generator=g).double()
    return (q * scale).view(tokens, k).float()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_qlinear_is_dequantise_then_multiply(kernels, fmt, tokens):
    for i, (n, k) in enumerate(_shapes(fmt)):
        blocks, dense = _weights(fmt, n, k, seed=1000 * tokens + i)
        g = torch.Generator().manual_seed(i)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, k, generator=g).to(dtype)
            ours = qlinear(x, blocks, fmt, k, out_dtype=torch.float32)
            assert ours is not None and ours.shape == (tokens, n) and ours.dtype == torch.float32
            exact = x.double() @ dense.double().T
            err = (ours.double() - exact).abs()
            assert (err <= _bound(x, dense)).all(), (kernels, fmt, n, k, float(err.max()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_when_the_activations_quantise_exactly(kernels, fmt):
    """No activation rounding left: only float32 rounding separates the kernel from the reference, so
    a wrong scale, min or nibble anywhere shows."""
    for i, (n, k) in enumerate(_shapes(fmt)):
        blocks, dense = _weights(fmt, n, k, seed=77 + i)
        x = _exact_int8_activations(2, k, torch.Generator().manual_seed(i))
        ours = qlinear(x, blocks, fmt, k, out_dtype=torch.float32)
        err = (ours.double() - x.double() @ dense.double().T).abs()
        assert (err <= _rounding(x, dense)).all(), (kernels, fmt, n, k, float(err.max()))


@pytest.mark.parametrize("fmt", ["q4_k", "q8_0"])
def test_bf16_output_bias_and_threads(kernels, fmt):
    n, k = 300, 512
    blocks, dense = _weights(fmt, n, k, seed=7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qlinear(x, blocks, fmt, k, out_dtype=torch.float32)
        torch.set_num_threads(2)
        two = qlinear(x, blocks, fmt, k, out_dtype=torch.float32)
        with_bias = qlinear(x, blocks, fmt, k, bias=bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # rows are split, never a sum: the same bits on any thread count
    assert with_bias.dtype == torch.bfloat16
    assert torch.equal(with_bias, (one + bias.float()).bfloat16())


def test_qlinear_declines_what_it_cannot_do(monkeypatch):
    blocks, _ = _weights("q8_0", 4, 64, seed=1)
    x = torch.randn(1, 64)
    assert qlinear(x, blocks, "q5_k", 64) is None  # a format it does not take
    assert qlinear(x[:, :32], blocks, "q8_0", 32 + 1) is None  # a K the format cannot hold
    assert qlinear(torch.randn(17, 64), blocks, "q8_0", 64) is None  # a batch: dequantise and matmul
    assert qlinear(x.double(), blocks, "q8_0", 64) is None
    assert qlinear(x, blocks[:, :-1].contiguous(), "q8_0", 64) is None  # not whole rows
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "0")
    loader.reset()
    try:
        assert qlinear(x, blocks, "q8_0", 64) is None
    finally:
        monkeypatch.undo()
        loader.reset()
