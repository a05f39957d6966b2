"""The int8-activation GEMM (cuda_ext.quant.qgemm, csrc/cpu/qgemm.c) against dequantise-then-multiply.

Every format, every build (native AVX-512 VNNI here, AVX2, portable C), token counts 1, 3, 12, 17, 30 and
130 (the row kernel below QGEMM_MIN_TOKENS, the tiles and their ragged ends above; for q4_k, q5_k and q6_k
on AVX-512 the bands of 16 tokens, a padded last band (12, 30) or the tiles after them), odd block counts, rows
not a multiple of the tiles, one and two threads. The documented bound: the activations are rounded
to int8 per block (of 32 values; of 256 for q4_k and q6_k from QGEMM_MIN_TOKENS rows on, as llama.cpp's
Q8_K), so |ours - exact| <= sum_j |w_j| d_x(j) / 2 (d_x(j) = max|x| / 127 over j's block) plus float32
rounding of the sums."""

from __future__ import annotations

import pytest
import torch
from test_cuda_ext_quant import _weights

from cuda_ext.blocks import BLOCKS
from cuda_ext.quant import QGEMM_MIN_TOKENS, qgemm

FORMATS = list(BLOCKS)
TOKENS = [1, 3, 12, 17, 30, 130]


def _shapes(fmt: str) -> list[tuple[int, int]]:
    if BLOCKS[fmt].values == 256:
        return [(5, 256), (19, 768), (33, 1280)]
    return [(5, 32), (19, 96), (33, 160), (70, 1056)]


def _block(fmt: str, tokens: int) -> int:
    """The activations' block: 256 for the k-formats in the tiled GEMM, else 32."""
    return 256 if BLOCKS[fmt].values == 256 and tokens >= QGEMM_MIN_TOKENS else 32


def _bound(x: torch.Tensor, dense: torch.Tensor, block: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    m, k = x.shape
    dx = x.double().abs().view(m, k // block, block).amax(-1) / 127
    rounding = (dx / 2).repeat_interleave(block, dim=1) @ dense.double().abs().T
    mag = x.double().abs() @ dense.double().abs().T + (0 if bias is None else bias.double().abs())
    return rounding + (k // 32 + 8) * 2.0**-24 * 2 * mag + 1e-30


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_qgemm_within_the_bound(kernels, fmt, tokens):
    for i, (n, k) in enumerate(_shapes(fmt)):
        blocks, dense = _weights(fmt, n, k, seed=100 * tokens + i)
        g = torch.Generator().manual_seed(7 * i + tokens)
        x = torch.randn(tokens, k, generator=g) * torch.rand(tokens, 1, generator=g) * 3
        bias = torch.randn(n, generator=g) if i % 2 else None
        ours = qgemm(x, blocks, fmt, k, bias)
        assert ours is not None and ours.shape == (tokens, n) and ours.dtype == torch.float32
        exact = x.double() @ dense.double().T + (0 if bias is None else bias.double())
        err = (ours.double() - exact).abs()
        bound = _bound(x, dense, _block(fmt, tokens), bias)
        assert (err <= bound).all(), (kernels, fmt, n, k, tokens, float((err / bound).max()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_qgemm_is_exact_where_the_activations_quantise_exactly(kernels, fmt):
    """Activations that int8 keeps exactly (integers up to 127 in every block, one of them +-127, times a
    power of two): only float32 rounding separates the result from dequantise-then-multiply, so a wrong
    scale, minimum, nibble or offset anywhere shows."""
    block = 256 if BLOCKS[fmt].values == 256 else 32
    n, k = (21, 768) if block == 256 else (21, 160)
    blocks, dense = _weights(fmt, n, k, seed=5)
    g = torch.Generator().manual_seed(2)
    tokens = 9
    q = torch.randint(-127, 128, (tokens, k // block, block), generator=g).double()
    q[:, :, 0] = 127
    scale = 2.0 ** torch.randint(-9, -4, (tokens, k // block, 1), generator=g).double()
    x = (q * scale).view(tokens, k).float()
    ours = qgemm(x, blocks, fmt, k)
    exact = x.double() @ dense.double().T
    mag = x.double().abs() @ dense.double().abs().T
    assert ((ours.double() - exact).abs() <= (k // 32 + 8) * 2.0**-24 * 2 * mag + 1e-30).all(), (kernels, fmt)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k", "q6_k", "q4_1"])
def test_qgemm_same_result_on_one_and_two_threads(kernels, fmt):
    """Rows are split over the pool, never a sum: the same bits on any thread count; and a token's result
    does not depend on the others in its call (the same tiles give the same sums)."""
    n, k = (300, 768) if BLOCKS[fmt].values == 256 else (300, 544)
    blocks, _ = _weights(fmt, n, k, seed=9)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qgemm(x, blocks, fmt, k)
        torch.set_num_threads(2)
        two = qgemm(x, blocks, fmt, k)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two), kernels


def test_qgemm_declines_what_it_cannot_do():
    blocks, _ = _weights("q8_0", 4, 64, seed=1)
    x = torch.randn(8, 64)
    assert qgemm(x, blocks, "q5_k", 64) is None
    assert qgemm(x.bfloat16(), blocks, "q8_0", 64) is None  # float32 activations only
    assert qgemm(x[:, :32], blocks, "q8_0", 33) is None
    assert qgemm(x, blocks[:, :-1].contiguous(), "q8_0", 64) is None  # not whole rows
    assert qgemm(x, blocks, "q8_0", 64) is not None


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k", "q6_k", "q4_0"])
def test_swiglu_is_silu_of_gate_times_up(kernels, fmt):
    """The fused gate/up call: the same products as two qgemm calls (the same tiles, so the same sums),
    then silu(g) * u; under int8_activations only, and None where its rows are too few."""
    from cuda_ext.quant import int8_activations, qgemm_swiglu
    from engine.formats import get as get_format
    from engine.formats.tensor import QuantTensor

    n, k = (40, 512) if BLOCKS[fmt].values == 256 else (40, 96)
    (gb, _), (ub, _) = _weights(fmt, n, k, seed=3), _weights(fmt, n, k, seed=4)
    gate = QuantTensor(gb, get_format(fmt), (n, k))
    up = QuantTensor(ub, get_format(fmt), (n, k))
    x = torch.randn(33, k, generator=torch.Generator().manual_seed(5))
    assert qgemm_swiglu(x, gate, up) is None  # not in an int8 forward
    with int8_activations(True):
        ours = qgemm_swiglu(x, gate, up)
        assert qgemm_swiglu(x[:2], gate, up) is None  # below QGEMM_MIN_TOKENS: the separate products
    with int8_activations("auto"):
        assert (qgemm_swiglu(x[:8], gate, up) is None) == (fmt in ("q8_0", "q4_0"))  # AUTO_MIN_ROWS
    expected = torch.nn.functional.silu(qgemm(x, gb, fmt, k)) * qgemm(x, ub, fmt, k)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6), kernels
