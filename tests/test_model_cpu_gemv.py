"""The native bf16 GEMV used for CPU decode: as accurate as F.linear, every shape, and the fallbacks."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine.model import cpu_gemv
from engine.model.cpu_gemv import Linear, linear, native_gemv


def test_kernel_builds_where_a_compiler_exists():
    assert (native_gemv() is not None) == (shutil.which("cc") is not None or shutil.which("gcc") is not None)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (7, 33), (13, 64), (64, 1024), (256, 96), (1027, 3584)])
def test_native_matches_exact_product_as_well_as_f_linear(n, k):
    g = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(1, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    exact = x.double() @ w.double().T
    ours = linear(x, w)
    assert ours.dtype == torch.bfloat16 and ours.shape == (1, n)
    ulp = exact.abs().clamp_min(1e-3) * 2.0**-7  # one bf16 ulp (8-bit significand) of the exact value
    ref_err = (F.linear(x, w).double() - exact).abs()
    assert ((ours.double() - exact).abs() <= ref_err + ulp + 1e-6 * k).all()
    with_bias = linear(x, w, b)
    torch.testing.assert_close(with_bias.float(), (ours + b).float(), rtol=0, atol=0)


def test_fallbacks_are_f_linear(monkeypatch):
    w = torch.randn(16, 32)
    x = torch.randn(1, 32)
    assert torch.equal(linear(x, w), F.linear(x, w))  # float32: F.linear
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear(xb.expand(3, 32), wb), F.linear(xb.expand(3, 32), wb))  # several rows
    assert torch.equal(linear(xb, wb.T.contiguous().T), F.linear(xb, wb))  # non-contiguous weight
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "0")
    monkeypatch.setattr(cpu_gemv, "_state", {})
    assert native_gemv() is None
    assert torch.equal(linear(xb, wb), F.linear(xb, wb))


def test_linear_module_keeps_nn_linear_parameters():
    m = Linear(8, 4, bias=True)
    assert isinstance(m, torch.nn.Linear) and set(dict(m.named_parameters())) == {"weight", "bias"}
    x = torch.randn(2, 8)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))


def test_two_thread_split_equals_one_thread():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 1024, generator=g).bfloat16()
    w = torch.randn(1030, 1024, generator=g).bfloat16()  # over a million elements: split when 2 threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = [linear(x, w) for _ in range(3)]
        torch.set_num_threads(1)
        one = linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(t, one) for t in two)
    exact = x.double() @ w.double().T
    assert ((one.double() - exact).abs() <= (F.linear(x, w).double() - exact).abs() + exact.abs() * 2.0**-7 + 1e-3).all()
