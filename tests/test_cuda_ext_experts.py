"""A token's routed experts in one native call (cuda_ext.cpu.experts_accumulate): the same bits as
one call per expert in the same order (which tests/test_cuda_ext_cpu.py checks against the torch
expert), on every build and thread count, and for experts stored in block formats, the torch expert
on the dequantised weights within the activations' int8 rounding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from quant_blocks import random_blocks, reference

from cuda_ext import cpu
from cuda_ext.blocks import BLOCKS, row_bytes
from engine.model.experts import ExpertWeights


def _bf16_experts(k: int, h: int, i: int, seed: int, biases: bool = False) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    return [
        ExpertWeights(
            gate=r(i, h),
            up=r(i, h),
            down=r(h, i),
            gate_bias=r(i, scale=2) if biases else None,
            up_bias=r(i, scale=2) if biases else None,
            down_bias=r(h) if biases else None,
        )
        for _ in range(k)
    ]


@pytest.mark.parametrize("k,h,i", [(1, 64, 32), (3, 100, 37), (8, 512, 192), (4, 1000, 1030)])
@pytest.mark.parametrize("clamped", [None, (1.702, 7.0)])
def test_grouped_experts_equal_one_call_per_expert(kernels, k, h, i, clamped):
    experts = _bf16_experts(k, h, i, seed=k * h + i, biases=clamped is not None)
    coefs = [0.5 / (e + 1) for e in range(k)]
    x = torch.randn(1, h, generator=torch.Generator().manual_seed(1)).bfloat16()
    one_by_one = torch.full((1, h), 0.25)
    for w, c in zip(experts, coefs, strict=True):
        assert cpu.swiglu_accumulate(x, w, c, one_by_one, clamped)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grouped = torch.full((1, h), 0.25)
            assert cpu.experts_accumulate(x, experts, coefs, grouped, clamped)
            assert torch.equal(grouped, one_by_one), (kernels, threads)
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Format:
    name: str


@dataclass(frozen=True)
class _Stored:
    """A matrix in a block format, as the store keeps it (the shape of engine.formats' QuantTensor)."""

    raw: torch.Tensor
    format: _Format
    shape: tuple[int, int]


def _stored(fmt: str, rows: int, cols: int, rng) -> tuple[_Stored, torch.Tensor]:
    block = BLOCKS[fmt]
    raw = random_blocks(block.ggml_type, rows * cols // block.values, rng, scale=0.002)
    dense = torch.from_numpy(reference(raw, block.ggml_type).reshape(rows, cols))
    return _Stored(
        torch.from_numpy(raw.reshape(rows, row_bytes(fmt, cols))), _Format(fmt), (rows, cols)
    ), dense


@pytest.mark.parametrize("fmt", list(BLOCKS))
def test_grouped_experts_on_stored_blocks_are_the_dequantised_experts(kernels, fmt):
    rng = np.random.default_rng(5)
    h, i, k = (512, 256, 3) if BLOCKS[fmt].values == 256 else (96, 160, 4)
    stored, dense = [], []
    for _ in range(k):
        mats = [_stored(fmt, i, h, rng), _stored(fmt, i, h, rng), _stored(fmt, h, i, rng)]
        stored.append(ExpertWeights(*(m[0] for m in mats)))
        dense.append([m[1] for m in mats])
    coefs = [0.6, 0.3, 0.1, 0.05][:k]
    x = torch.randn(1, h, generator=torch.Generator().manual_seed(2)).bfloat16()
    acc = torch.zeros(1, h)
    assert cpu.experts_accumulate(x, stored, coefs, acc)
    exact = torch.zeros(1, h, dtype=torch.float64)
    scale = torch.zeros(1, h, dtype=torch.float64)
    for (gate, up, down), c in zip(dense, coefs, strict=True):
        xd = x.double()
        hh = F.silu(xd @ gate.double().T) * (xd @ up.double().T)
        exact += (hh @ down.double().T) * c
        # what int8 activations and bf16 roundings of h may move: a few percent of each term's size
        scale += (
            hh.abs() @ down.double().abs().T + (xd.abs() @ gate.double().abs().T) @ down.double().abs().T
        ) * c
    assert ((acc.double() - exact).abs() <= 0.03 * scale + 1e-4).all(), float(
        (acc.double() - exact).abs().max()
    )


def test_grouped_experts_decline_what_they_cannot_do():
    experts = _bf16_experts(2, 64, 32, seed=1)
    x = torch.randn(1, 64).bfloat16()
    acc = torch.zeros(1, 64)
    assert not cpu.experts_accumulate(x, experts, [1.0, 1.0], acc.bfloat16())  # bf16 accumulator
    assert not cpu.experts_accumulate(torch.randn(2, 64).bfloat16(), experts, [1.0, 1.0], acc)  # two tokens
    mixed = [experts[0], ExpertWeights(experts[1].gate.float(), experts[1].up, experts[1].down)]
    assert not cpu.experts_accumulate(x, mixed, [1.0, 1.0], acc)  # a float32 matrix
    assert not cpu.experts_accumulate(x, experts * 17, [1.0] * 34, acc)  # more than the kernel takes
    assert torch.equal(acc, torch.zeros(1, 64))
