"""One float32 decode token through attention with block-format projections in one native call
(cuda_ext.attention_f32) against the module's torch path on the same blocks.

Formats mixed within a layer as llama.cpp's quantisations mix them (q4_k q, q8_0 k and v, q6_k o (with
Qwen3's per-head q/k norms too), or
q5_k o as its Q4_K_M keeps a MoE model's attn_output; q4_1;
q4_0 with mxfp4), biases, GQA groups, a sliding window, no rotary, a cache long enough to be split over
threads, a second slot. Both paths start from the same cache; the native one must write the same keys
and values and give the same output up to the order of the float32 sums. Under
cuda_ext.quant.int8_activations ("kquants", as "auto" decodes; or every product) the products it names
take int8 activations on both paths (the torch path's through engine.formats.linear), so they agree again."""

from __future__ import annotations

import pytest
import torch

from cuda_ext import attention_f32 as native
from cuda_ext import loader
from cuda_ext.quant import int8_activations
from engine import formats
from engine.formats.tensor import QuantTensor
from engine.model.layers.attention import Attention
from engine.model.layers.context import StepContext
from engine.model.layers.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(loader.cpu() is None, reason="no C compiler: the native kernels are not built")

CASES = {
    "q4_k_m-mix": dict(hidden=256, heads=4, kv_heads=2, head_dim=64, fmts=("q4_k", "q8_0", "q8_0", "q6_k")),
    "q4_k_m-moe": dict(hidden=256, heads=4, kv_heads=2, head_dim=64, fmts=("q4_k", "q8_0", "q8_0", "q5_k")),
    "q4_1-biases": dict(fmts=("q4_1",) * 4, qkv_bias=True, o_bias=True),
    "q4_0-mxfp4-window": dict(kv_heads=1, fmts=("q4_0", "mxfp4", "q4_0", "mxfp4"), sliding_window=5),
    "q8_0-no-rotary": dict(fmts=("q8_0",) * 4, rotary=False),
    "q4_k-qwen3-head-norms": dict(hidden=256, heads=4, kv_heads=2, head_dim=64, fmts=("q4_k", "q8_0", "q8_0", "q6_k"),
                                  qk_norm="head"),
}


def _module(hidden=96, heads=3, kv_heads=3, head_dim=32, fmts=("q8_0",) * 4, rotary=True, **options):
    torch.manual_seed(0)
    m = Attention(hidden, heads, kv_heads, head_dim, **options)
    for proj, fmt in zip((m.q_proj, m.k_proj, m.v_proj, m.o_proj), fmts, strict=True):
        w = torch.randn(proj.weight.shape) * 0.2
        del proj.weight
        proj.weight = QuantTensor.quantise(w, formats.get(fmt))
        if proj.bias is not None:
            with torch.no_grad():
                proj.bias.copy_(torch.randn_like(proj.bias))
    if m.qk_norm is not None:
        with torch.no_grad():
            m.q_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.q_norm.weight))
            m.k_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.k_norm.weight))
    rope = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, head_dim, 4096) if rotary else None
    return m, rope


def _ctx(rope, pos, slot=0):
    ctx = StepContext(pos, 1, torch.device("cpu"), slot=slot)
    if rope is not None:
        ctx.cos, ctx.sin = rope(pos, 1)
    return ctx


def _run(m, rope, x, pos, slot, use_native):
    m._plan_f32 = False if use_native else None
    out = m(x, _ctx(rope, pos, slot))
    return out, m.kv_cache.k.clone(), m.kv_cache.v.clone()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("cache_len", "mode"), [(64, False), (2048, False), (64, "kquants"), (64, "int8")])
def test_native_decode_equals_the_torch_path(case, cache_len, mode):
    with int8_activations(mode):
        _native_equals_torch(case, cache_len)


def _native_equals_torch(case, cache_len):
    m, rope = _module(**CASES[case])
    if rope is not None:
        rope.setup(cache_len, torch.float32, torch.device("cpu"))
    m.setup_cache(cache_len, torch.float32, torch.device("cpu"), slots=2)
    assert native.decode_plan(m) is not None, "the native path must take this module"
    torch.manual_seed(1)
    prefill = cache_len - 8
    for slot in (0, 1):
        keys = torch.randn(m.num_kv_heads, prefill, m.head_dim)
        m.kv_cache.k[slot, :, :prefill] = keys
        m.kv_cache.v[slot, :, :prefill] = torch.randn_like(keys)
    start = (m.kv_cache.k.clone(), m.kv_cache.v.clone())
    for pos, slot in ((prefill, 0), (prefill + 1, 0), (prefill, 1), (3, 1)):
        x = torch.randn(1, m.q_proj.weight.shape[1])
        m.kv_cache.k.copy_(start[0])
        m.kv_cache.v.copy_(start[1])
        ref, k_ref, v_ref = _run(m, rope, x, pos, slot, use_native=False)
        m.kv_cache.k.copy_(start[0])
        m.kv_cache.v.copy_(start[1])
        ours, k_ours, v_ours = _run(m, rope, x, pos, slot, use_native=True)
        assert isinstance(m._plan_f32, native.DecodePlan), "the native path did not run"
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        for a, b in ((k_ours, k_ref), (v_ours, v_ref)):  # only the written position differs from start
            diff = (a - b).abs()
            assert (diff <= 1e-5 * (1 + b.abs())).all(), f"{case}: cache differs by {diff.max()}"
        scale = ref.abs().max().item()
        err = (ours - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"{case} pos {pos}: {err} against output scale {scale}"


def test_int8_products_are_taken_where_the_mode_says():
    """q4_k q and q5_k o are rounded under "kquants" (the q8_0 k and v are not): the output moves by the
    int8 error, far more than the float32 sums' order; on a q8_0-only layer "kquants" changes nothing."""
    outs = {}
    for case in ("q4_k_m-moe", "q8_0-no-rotary"):
        m, rope = _module(**CASES[case])
        if rope is not None:
            rope.setup(64, torch.float32, torch.device("cpu"))
        m.setup_cache(64, torch.float32, torch.device("cpu"))
        plan = native.decode_plan(m)
        x = torch.randn(1, m.q_proj.weight.shape[1])
        cos, sin = rope(5, 1) if rope is not None else (None, None)
        for mode in (False, "kquants"):
            with int8_activations(mode):
                outs[case, mode] = native.decode(plan, x, cos, sin, 0, 5, 2)
                assert native.int8_bits(plan) == (0b1001 if mode and case == "q4_k_m-moe" else 0)
    ref = outs["q4_k_m-moe", False]
    assert (outs["q4_k_m-moe", "kquants"] - ref).abs().max() > 1e-3 * ref.abs().max()
    assert torch.equal(outs["q8_0-no-rotary", "kquants"], outs["q8_0-no-rotary", False])


def test_native_decode_is_the_same_on_any_thread_count():
    m, rope = _module(**CASES["q4_k_m-mix"])
    rope.setup(600, torch.float32, torch.device("cpu"))
    m.setup_cache(600, torch.float32, torch.device("cpu"))
    plan = native.decode_plan(m)
    x = torch.randn(1, 256)
    cos, sin = rope(500, 1)
    for mode in (False, "kquants"):
        outs = []
        with int8_activations(mode):
            for t in (1, 2, 3):
                outs.append(native.decode(plan, x, cos, sin, 0, 500, t))
        assert all(torch.equal(o, outs[0]) for o in outs)


def test_plan_refuses_what_it_cannot_run():
    m, _ = _module()
    m.setup_cache(32, torch.bfloat16, torch.device("cpu"))
    assert native.decode_plan(m) is None  # a bf16 cache
    m.setup_cache(32, torch.float32, torch.device("cpu"))
    plan = native.decode_plan(m)
    assert plan is not None
    assert native.decode(plan, torch.randn(1, 96), None, None, 0, 10_000, 1) is None  # outside the cache
    assert native.decode(plan, torch.randn(1, 96), None, None, 1, 0, 1) is None  # no second slot
    dense = Attention(96, 4, 4, 32)
    dense.setup_cache(32, torch.float32, torch.device("cpu"))
    assert native.decode_plan(dense) is None  # float weights: the torch path
    normed, _ = _module(qk_norm="proj")
    normed.setup_cache(32, torch.float32, torch.device("cpu"))
    assert native.decode_plan(normed) is None  # OLMoE's norms over the whole projection: the torch path
