"""The native bf16 GEMV used for CPU decode (cuda_ext.cpu): as accurate as F.linear, every shape, every
build (native, AVX2, portable), and the fallbacks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from cuda_ext import cpu as cpu_gemv
from cuda_ext import loader
from cuda_ext.cpu import Linear, linear


def native_on() -> bool:
    return loader.cpu() is not None


def test_kernel_builds_where_a_compiler_exists():
    """Built when a C compiler exists, unless MOEINF_NATIVE_KERNELS=0 turns the kernels off."""
    off = os.environ.get("MOEINF_NATIVE_KERNELS", "1") == "0"
    compiler = shutil.which(os.environ.get("CC") or "cc") is not None
    assert native_on() == (compiler and not off)


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
    if native_on():  # the kernel rounds the product, then the sum with the bias
        torch.testing.assert_close(with_bias.float(), (ours + b).float(), rtol=0, atol=0)
    else:  # F.linear rounds once
        assert torch.equal(with_bias, F.linear(x, w, b))


def test_fallbacks_are_f_linear(monkeypatch):
    w = torch.randn(16, 32)
    x = torch.randn(1, 32)
    assert torch.equal(linear(x, w), F.linear(x, w))  # float32: F.linear
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear(xb.expand(3, 32), wb), F.linear(xb.expand(3, 32), wb))  # several rows
    assert torch.equal(linear(xb, wb.T.contiguous().T), F.linear(xb, wb))  # non-contiguous weight
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "0")
    loader.reset()
    try:
        assert not native_on()
        assert torch.equal(linear(xb, wb), F.linear(xb, wb))
    finally:
        monkeypatch.undo()
        loader.reset()


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
    assert (
        (one.double() - exact).abs() <= (F.linear(x, w).double() - exact).abs() + exact.abs() * 2.0**-7 + 1e-3
    ).all()


# odd shapes: K not a multiple of 32, N not a multiple of 16 (or 4), tiny and split-sized products
ODD = [(1, 1), (5, 3), (17, 33), (31, 100), (100, 1000), (1030, 1031)]


def _within_bf16(ours: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    exact = x.double() @ w.double().T
    if b is not None:
        exact = exact + b.double()
    ref_err = (F.linear(x, w, b).double() - exact).abs()
    return bool(((ours.double() - exact).abs() <= ref_err + exact.abs() * 2.0**-7 + 1e-5 * x.shape[1]).all())


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_many_on_odd_shapes(kernels, threads):
    g = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in ODD:
            x = torch.randn(1, k, generator=g).bfloat16()
            ws = [torch.randn(n + d, k, generator=g).bfloat16() for d in (0, 3, 16)]
            bs = [None, torch.randn(n + 3, generator=g).bfloat16(), None]
            outs = cpu_gemv.linear_many(x, ws, bs)
            for o, w, b in zip(outs, ws, bs, strict=True):
                assert o.dtype == torch.bfloat16 and o.shape == (1, w.shape[0])
                assert _within_bf16(o, x, w, b), (kernels, n, k)
                assert torch.equal(o, linear(x, w, b))  # one matrix at a time: the same bits
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("h,i", [(1, 1), (33, 17), (100, 37), (64, 200), (1000, 1030)])
def test_swiglu_accumulate_matches_the_torch_expert(kernels, h, i):
    from engine.model.experts import ExpertWeights

    g = torch.Generator().manual_seed(h + i)
    w = ExpertWeights(
        gate=(torch.randn(i, h, generator=g) * 0.2).bfloat16(),
        up=(torch.randn(i, h, generator=g) * 0.2).bfloat16(),
        down=(torch.randn(h, i, generator=g) * 0.2).bfloat16(),
    )
    x = torch.randn(1, h, generator=g).bfloat16()
    for coef in (torch.tensor(0.37), torch.tensor(0.625, dtype=torch.bfloat16)):
        # the torch expert on the same (already checked) GEMV, then the MoE block's weighting
        y = linear(F.silu(linear(x, w.gate)) * linear(x, w.up), w.down) * coef
        ref = torch.ones(1, h) + y
        acc = torch.ones(1, h)
        assert cpu_gemv.swiglu_accumulate(x, w, float(coef), acc)
        # SiLU's exp is libm's here, Sleef's in torch: a rare one-ulp bf16 difference inside is allowed
        torch.testing.assert_close(acc, ref, rtol=2**-7, atol=1e-3 * h**0.5)
        # and against float64 throughout, as loosely as bf16 roundings of every intermediate need
        hh = F.silu(x.double() @ w.gate.double().T) * (x.double() @ w.up.double().T)
        exact = 1 + (hh @ w.down.double().T) * float(coef)
        assert ((acc.double() - exact).abs() <= 0.05 * (hh.abs() @ w.down.double().abs().T) + 1e-2).all()


def test_swiglu_accumulate_declines_what_it_cannot_do():
    from engine.model.experts import ExpertWeights

    w = ExpertWeights(gate=torch.randn(8, 4), up=torch.randn(8, 4), down=torch.randn(4, 8))  # float32
    acc = torch.zeros(1, 4)
    assert not cpu_gemv.swiglu_accumulate(torch.randn(1, 4), w, 1.0, acc)
    wb = ExpertWeights(gate=w.gate.bfloat16(), up=w.up.bfloat16(), down=w.down.bfloat16())
    assert not cpu_gemv.swiglu_accumulate(torch.randn(2, 4).bfloat16(), wb, 1.0, acc)  # two tokens
    assert not cpu_gemv.swiglu_accumulate(torch.randn(1, 4).bfloat16(), wb, 1.0, acc.bfloat16())
    assert torch.equal(acc, torch.zeros(1, 4))


def test_many_python_threads_at_once_get_right_answers():
    """The pool serves one caller at a time; a second caller meanwhile runs alone, never waits or mixes."""
    import threading

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1024, generator=g).bfloat16()
    ws = [torch.randn(512 + 16 * j, 1024, generator=g).bfloat16() for j in range(4)]
    expected = [linear(x, w) for w in ws]
    bad: list[int] = []

    def work(j: int) -> None:
        for _ in range(50):
            if not torch.equal(linear(x, ws[j]), expected[j]):
                bad.append(j)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_decode_threads_hands_torch_threads_to_the_pool_and_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_gemv.decode_threads(True):
            if native_on():
                assert torch.get_num_threads() == 1 and cpu_gemv.threads(1 << 20) == 2
        assert torch.get_num_threads() == 2 and cpu_gemv.threads(1 << 20) == 2
        with cpu_gemv.decode_threads(False):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), cpu_gemv.decode_threads(True):
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_forked_child_computes_with_a_fresh_pool():
    import multiprocessing as mp

    if not native_on():  # F.linear's OpenMP threads do not survive a fork: nothing to test here
        pytest.skip("no native kernels")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 1024, generator=g).bfloat16()
    w = torch.randn(1040, 1024, generator=g).bfloat16()
    expected = linear(x, w)  # starts the pool here
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(linear, (x, w)).get(timeout=120)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("h,i", [(33, 17), (100, 37), (1000, 1030)])
def test_clamped_swiglu_accumulate_matches_gpt_oss_expert(kernels, h, i):
    from engine.model.experts import ExpertWeights
    from engine.model.families.gpt_oss.experts import clamped_swiglu_expert

    g = torch.Generator().manual_seed(h * i)

    def r(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    w = ExpertWeights(
        gate=r(i, h), up=r(i, h), down=r(h, i), gate_bias=r(i, scale=3), up_bias=r(i, scale=3), down_bias=r(h)
    )
    x = r(1, h, scale=1)
    fn = clamped_swiglu_expert()
    coef = torch.tensor(0.3)
    ref = torch.zeros(1, h) + fn(x, w) * coef  # the torch expert (F.linear), then the MoE block's weighting
    acc = torch.zeros(1, h)
    assert fn.accumulate(x, [w], [float(coef)], acc)
    torch.testing.assert_close(acc, ref, rtol=2**-7, atol=2e-3 * h**0.5)


@pytest.mark.parametrize("bias", [False, True])
def test_dense_mlp_one_token_is_the_torch_mlp(bias):
    from engine.model.layers.mlp import MLP

    torch.manual_seed(4)
    m = MLP(100, 37, bias=bias)
    for p in m.parameters():
        p.data = torch.randn_like(p) * 0.3
    m = m.bfloat16()
    x = torch.randn(1, 100).bfloat16()
    fused = m(x)
    m.native_swiglu = False
    assert torch.equal(fused, m(x))


@pytest.mark.parametrize(
    "heads,nope,v,lat", [(1, 1, 1, 1), (3, 5, 7, 33), (5, 17, 3, 300), (16, 64, 64, 256)]
)
def test_heads_product_is_bmm_on_strided_head_blocks(kernels, heads, nope, v, lat):
    g = torch.Generator().manual_seed(heads * lat)
    weight = torch.randn(heads * (nope + v), lat, generator=g).bfloat16()
    w = weight.view(heads, nope + v, lat)
    q = torch.randn(heads, nope, generator=g).bfloat16()
    mixed = torch.randn(heads, lat, generator=g).bfloat16()
    cases = [
        (cpu_gemv.heads_product(q, weight, nope + v, 0, nope, True), q[:, None], w[:, :nope]),
        (
            cpu_gemv.heads_product(mixed, weight, nope + v, nope, v, False),
            mixed[:, None],
            w[:, nope:].transpose(1, 2),
        ),
    ]
    for ours, a, b in cases:
        ref = torch.bmm(a, b)[:, 0]
        exact = (a.double() @ b.double())[:, 0]
        assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
        assert (
            (ours.double() - exact).abs() <= (ref.double() - exact).abs() + exact.abs() * 2.0**-7 + 1e-5 * lat
        ).all()
    assert cpu_gemv.heads_product(q.float(), weight, nope + v, 0, nope, True) is None  # float32: torch's job
