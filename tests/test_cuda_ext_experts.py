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

from cuda_ext import cpu, loader
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


# (5, 256, 96) and (3, 128, 200) are split over two threads with an expert left over: four (two) run
# whole, one part each, the last by rows (moe.c)
@pytest.mark.parametrize(
    "k,h,i", [(1, 64, 32), (3, 100, 37), (8, 512, 192), (4, 1000, 1030), (5, 256, 96), (3, 128, 200)]
)
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


@pytest.mark.parametrize("fmt", list(BLOCKS))
def test_grouped_experts_on_stored_blocks_equal_one_call_per_expert(kernels, fmt):
    """Three experts on two threads: two run whole, the third by rows (its h quantised in a phase of
    its own); the same bits as one thread and as one call per expert."""
    rng = np.random.default_rng(7)
    h, i, k = (512, 256, 3) if BLOCKS[fmt].values == 256 else (96, 160, 3)
    experts = [
        ExpertWeights(_stored(fmt, i, h, rng)[0], _stored(fmt, i, h, rng)[0], _stored(fmt, h, i, rng)[0])
        for _ in range(k)
    ]
    coefs = [0.6, 0.3, 0.1]
    x = torch.randn(1, h, generator=torch.Generator().manual_seed(3)).bfloat16()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            one_by_one = torch.full((1, h), 0.25)
            for w, c in zip(experts, coefs, strict=True):
                assert cpu.swiglu_accumulate(x, w, c, one_by_one)
            grouped = torch.full((1, h), 0.25)
            assert cpu.experts_accumulate(x, experts, coefs, grouped)
            results += [one_by_one, grouped]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results[1:]), kernels


def test_big_bf16_experts_by_rows_are_the_experts_whole():
    """Experts over 4 MB go by rows in several parts a thread on two threads (whole experts on one): the
    same bits either way, and as one call per expert."""
    experts = _bf16_experts(3, 1024, 768, seed=9)
    coefs = [0.5, 0.3, 0.2]
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(4)).bfloat16()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grouped = torch.full((1, 1024), 0.5)
            assert cpu.experts_accumulate(x, experts, coefs, grouped)
            one_by_one = torch.full((1, 1024), 0.5)
            for w, c in zip(experts, coefs, strict=True):
                assert cpu.swiglu_accumulate(x, w, c, one_by_one)
            results += [grouped, one_by_one]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results[1:])


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


# ---------------------------------------------------------------- float32 activations on stored blocks


def _f32_expert_bound(x, mats, biases, clamped):
    """How far float32 summation order may move acc from the exact value, term by term: the gate and up
    sums (chains of H/64 + 8 roundings, the bias included), through the activation (SiLU and gpt-oss's
    clamped form are 1.1-Lipschitz, clamps 1-Lipschitz, each evaluation within a few ulps), the down sum
    (I/64 + 8) and the weighting; u = 2^-24, gamma_n < 1.01 n u. Returns (exact, bound) in float64."""
    u = 2.0**-24
    (gate, up, down), (gb, ub, db) = mats, biases
    xd = x.double()
    h_in, i_in = x.shape[1], gate.shape[0]
    g = xd @ gate.double().T + gb.double()
    v = xd @ up.double().T + ub.double()
    g_mag = xd.abs() @ gate.double().abs().T + gb.double().abs()
    v_mag = xd.abs() @ up.double().abs().T + ub.double().abs()
    gam_a, gam_b = 1.01 * (h_in // 64 + 9) * u, 1.01 * (i_in // 64 + 9) * u
    if clamped is None:
        s, t = F.silu(g), v
    else:
        alpha, limit = clamped
        gc = g.clamp(max=limit)
        s, t = gc * torch.sigmoid(gc * alpha), v.clamp(-limit, limit) + 1
    h = s * t
    dh = s.abs() * gam_a * v_mag + t.abs() * 1.1 * gam_a * g_mag + 8 * u * h.abs()
    d = h @ down.double().T + db.double()
    dd = dh @ down.double().abs().T + gam_b * (h.abs() @ down.double().abs().T + db.double().abs())
    return d, dd


@pytest.mark.parametrize("fmt", list(BLOCKS))
@pytest.mark.parametrize("clamped", [None, (1.702, 7.0)])
def test_grouped_float32_experts_on_stored_blocks(kernels, fmt, clamped):
    """float32 x: every expert's blocks dequantised in registers, nothing rounded to bf16 or int8; the
    torch expert on the dequantised weights within float32 summation-order rounding, the same bits on
    one and two threads."""
    _check_float32_experts(kernels, fmt, fmt, clamped)


@pytest.mark.parametrize("fmt,down_fmt", [("q4_k", "q6_k"), ("q4_k", "q5_k"), ("q8_0", "q4_1"), ("q4_0", "q4_k")])
def test_grouped_float32_experts_with_down_in_another_format(kernels, fmt, down_fmt):
    """float32 x: the down matrices in a format of their own (llama.cpp's Q4_K_M keeps some layers'
    ffn_down in Q6_K), still one native call, the same bound."""
    _check_float32_experts(kernels, fmt, down_fmt, None)


def _check_float32_experts(kernels, fmt, down_fmt, clamped):
    rng = np.random.default_rng(11)
    big = 256 in (BLOCKS[fmt].values, BLOCKS[down_fmt].values)
    h, i, k = (512, 256, 3) if big else (96, 160, 4)
    g = torch.Generator().manual_seed(9)
    stored, dense, biases = [], [], []
    for _ in range(k):
        mats = [_stored(fmt, i, h, rng), _stored(fmt, i, h, rng), _stored(down_fmt, h, i, rng)]
        b = (
            torch.randn(i, generator=g) * 0.1,
            torch.randn(i, generator=g) * 0.1,
            torch.randn(h, generator=g) * 0.1,
        )
        stored.append(ExpertWeights(*(m[0] for m in mats), *b))
        dense.append([m[1] for m in mats])
        biases.append(b)
    coefs = [0.6, 0.3, 0.1, 0.05][:k]
    x = torch.randn(1, h, generator=g) * 4
    start = torch.randn(1, h, generator=g)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            acc = start.clone()
            assert cpu.experts_accumulate(x, stored, coefs, acc, clamped)
            results.append(acc)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    exact, bound = start.double().clone(), torch.zeros(1, h, dtype=torch.float64)
    for mats, b, c in zip(dense, biases, coefs, strict=True):
        d, dd = _f32_expert_bound(x, mats, b, clamped)
        exact += d * c
        bound += dd * c + 2.0**-24 * (k + 2) * (d.abs() * c + exact.abs())  # weighting and accumulation
    err = (results[0].double() - exact).abs()
    assert (err <= bound).all(), (kernels, fmt, float(err.max()), float(bound.min()))


def test_grouped_float32_experts_decline_what_they_cannot_do():
    rng = np.random.default_rng(1)
    q = [
        ExpertWeights(
            _stored("q8_0", 32, 64, rng)[0], _stored("q8_0", 32, 64, rng)[0], _stored("q8_0", 64, 32, rng)[0]
        )
    ]
    x = torch.randn(1, 64)
    acc = torch.zeros(1, 64)
    assert not cpu.experts_accumulate(
        x, _bf16_experts(1, 64, 32, seed=2), [1.0], acc
    )  # bf16 weights, float32 x
    with_bf16_bias = [ExpertWeights(q[0].gate, q[0].up, q[0].down, torch.zeros(32).bfloat16())]
    assert not cpu.experts_accumulate(x, with_bf16_bias, [1.0], acc)  # float32 x takes float32 biases
    assert torch.equal(acc, torch.zeros(1, 64))
    assert cpu.experts_accumulate(x, q, [1.0], acc) == (loader.cpu() is not None)  # what it takes
    mixed = [ExpertWeights(q[0].gate, q[0].up, _stored("q4_0", 64, 32, rng)[0])]
    before = acc.clone()
    assert not cpu.experts_accumulate(x.bfloat16(), mixed, [1.0], acc)  # bf16 x: one format only
    assert torch.equal(acc, before)
