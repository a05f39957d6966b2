"""Native products on stored block formats (cuda_ext.quant) against dequantise-then-multiply.

Every format, every build of the kernels (native AVX-512 VNNI here, AVX2, portable C), odd sizes
(an odd number of 32-blocks, rows not a multiple of the split), one token and small batches. The
tolerance is the one each kernel documents. bf16 activations are rounded to int8 per block of 32, so
|ours - exact| <= sum_j |w_j| * d_x(j) / 2 with d_x = max|x_block| / 127, plus float32 rounding.
float32 activations are not rounded and the blocks dequantise exactly, so only the order of the
float32 sums is left (the bound is derived above ``_f32_bound``)."""

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
    assert qlinear(x, blocks, "q3_k", 64) is None  # a format it does not take
    assert qlinear(x[:, :32], blocks, "q8_0", 32 + 1) is None  # a K the format cannot hold
    assert qlinear(torch.randn(17, 64).bfloat16(), blocks, "q8_0", 64) is None  # bf16: up to 16 rows
    assert qlinear(torch.randn(257, 64), blocks, "q8_0", 64) is None  # float32 takes up to 256 rows
    q6, _ = _weights("q6_k", 4, 256, seed=1)
    assert qlinear(torch.randn(65, 256), q6, "q6_k", 256) is None  # q6_k up to 64
    assert qlinear(torch.randn(64, 256), q6, "q6_k", 256) is not None
    assert qlinear(x.double(), blocks, "q8_0", 64) is None
    assert qlinear(x, blocks[:, :-1].contiguous(), "q8_0", 64) is None  # not whole rows
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "0")
    loader.reset()
    try:
        assert qlinear(x, blocks, "q8_0", 64) is None
    finally:
        monkeypatch.undo()
        loader.reset()


# ---------------------------------------------------------------- float32 activations (quant_f32.c)
# No activation is rounded and every block dequantises, in registers, to exactly the values of the
# reference dequantiser (each is an exact product of scale and code, plus the one rounding of an
# offset in q4_1 and q4_k, which an FMA rounds the same way). What is left is the order of the
# float32 sums: each output's longest chain holds ceil(nb / 2) fused products (nb = K / 32 chunks
# over 64 lanes, two chunks per lane pass), 6 pairwise additions of the lanes and the bias's one;
# the portable build rounds each product once more. By the classic bound on recursive summation,
# |ours - exact| <= gamma_n * (sum_j |x_j w_j| + |bias|) with n = ceil(nb / 2) + 8 and
# gamma_n = n u / (1 - n u) < 1.01 n u (u = 2^-24); the float64 reference adds nothing that shows.


def _f32_bound(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    n = (x.shape[1] // 32 + 1) // 2 + 8
    mag = x.double().abs() @ dense.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return 1.01 * n * 2.0**-24 * mag + 1e-30


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_float32_qlinear_is_dequantise_then_multiply(kernels, fmt, tokens):
    for i, (n, k) in enumerate(_shapes(fmt)):
        blocks, dense = _weights(fmt, n, k, seed=500 * tokens + i)
        g = torch.Generator().manual_seed(10 + i)
        x = torch.randn(tokens, k, generator=g)
        bias = torch.randn(n, generator=g)
        ours = qlinear(x, blocks, fmt, k, bias=bias)
        assert ours is not None and ours.shape == (tokens, n) and ours.dtype == torch.float32
        exact = x.double() @ dense.double().T + bias.double()
        err = (ours.double() - exact).abs()
        assert (err <= _f32_bound(x, dense, bias)).all(), (kernels, fmt, n, k, float(err.max()))
        # against the PyTorch path (dequantise, then F.linear, whose sums may run in any order: within
        # gamma_(K+1) of exact), the two bounds added
        torch_path = torch.nn.functional.linear(x, dense, bias)
        theirs = 1.01 * (k + 1) * 2.0**-24 * (x.double().abs() @ dense.double().abs().T + bias.double().abs())
        assert ((ours.double() - torch_path.double()).abs() <= _f32_bound(x, dense, bias) + theirs).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_reads_every_dequantised_value_exactly(kernels, fmt):
    """One-hot activations: each output is one product w[n, j] * 1 among exact zeros, so the kernel
    returns every dequantised weight bit for bit (a wrong scale, min, nibble or sign anywhere shows)."""
    n, k = (9, 512) if BLOCKS[fmt].values == 256 else (9, 96)
    blocks, dense = _weights(fmt, n, k, seed=31)
    columns = []
    for j0 in range(0, k, 16):
        eye = torch.zeros(min(16, k - j0), k)
        eye[torch.arange(eye.shape[0]), j0 + torch.arange(eye.shape[0])] = 1.0
        columns.append(qlinear(eye, blocks, fmt, k))
    assert torch.equal(torch.cat(columns).T.contiguous(), dense), (kernels, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_same_bits_for_any_tokens_and_threads(kernels, fmt):
    """The order of the sums does not depend on how many tokens share a call (tiles of four on
    AVX-512), nor on how the rows are split over threads."""
    n, k = (300, 768) if BLOCKS[fmt].values == 256 else (300, 544)  # big enough to split over threads
    blocks, _ = _weights(fmt, n, k, seed=8)
    x = torch.randn(41, k, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([qlinear(x[m : m + 1], blocks, fmt, k) for m in range(41)])
        torch.set_num_threads(2)
        together = qlinear(x, blocks, fmt, k)
        three = qlinear(x[:3], blocks, fmt, k)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, together) and torch.equal(three, alone[:3]), kernels


@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_one_token_rows_together_are_the_one_row_kernel(kernels, fmt):
    """One token on several rows (AVX-512: four rows a pass over x, short rows; long rows one at a
    time): every row the bits of the row alone, any row count (a remainder of 1-3 rows), and within the
    float32 bound of the dequantised product."""
    shapes = [(7, 768), (13, 2304), (4, 256)] if BLOCKS[fmt].values == 256 else [(7, 96), (13, 2080), (6, 1024), (4, 32)]
    for i, (n, k) in enumerate(shapes):
        blocks, dense = _weights(fmt, n, k, seed=70 + i)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(i))
        together = qlinear(x, blocks, fmt, k)
        alone = torch.cat([qlinear(x, blocks[r : r + 1], fmt, k) for r in range(n)], dim=1)
        assert torch.equal(together, alone), (kernels, fmt, n, k)
        err = (together.double() - x.double() @ dense.double().T).abs()
        assert (err <= _f32_bound(x, dense)).all(), (kernels, fmt, n, k, float(err.max()))


def test_float32_vector_builds_give_the_same_bits(monkeypatch):
    """AVX-512 and AVX2 sum in the same order (64 lanes, the same pairwise tree): identical outputs."""
    features = loader.cpu_features() or frozenset()
    if loader.cpu() is None or not {"avx2", "fma", "f16c", "avx512f"} <= features:
        pytest.skip("needs a CPU with AVX-512 and AVX2 and the native kernels")
    outs = {}
    for build in ("native", "avx2"):
        monkeypatch.setenv("MOEINF_NATIVE_KERNELS", build)
        loader.reset()
        outs[build] = []
        for fmt in FORMATS:
            n, k = _shapes(fmt)[2]
            blocks, _ = _weights(fmt, n, k, seed=2)
            x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
            outs[build].append(qlinear(x, blocks, fmt, k))
            outs[build].append(qlinear(x[:1], blocks, fmt, k))  # one token: several rows a pass
    loader.reset()
    for fmt, a, b in zip([f for f in FORMATS for _ in (3, 1)], outs["native"], outs["avx2"], strict=True):
        assert torch.equal(a, b), fmt


def test_float32_bias_and_output_dtype(kernels):
    n, k = 40, 256
    blocks, _ = _weights("q4_1", n, k, seed=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, k, generator=g)
    plain = qlinear(x, blocks, "q4_1", k)
    bias = torch.randn(n, generator=g)
    assert torch.equal(qlinear(x, blocks, "q4_1", k, bias=bias), plain + bias)  # one rounding, as here
    assert torch.equal(qlinear(x, blocks, "q4_1", k, bias=bias.bfloat16()), plain + bias.bfloat16().float())
    assert torch.equal(qlinear(x, blocks, "q4_1", k, out_dtype=torch.bfloat16), plain.bfloat16())
    assert qlinear(x, blocks, "q4_1", k, bias=bias.double()) is None
