"""One-token attention in one native call (cuda_ext.attention) against the module's torch path.

Every option the Attention module has (q/k/v and output biases, q/k RMSNorm per head and over the
projection, clip_qkv, a sliding window, GQA groups, no rotary), positions before and after the window,
a cache long enough that the heads are split over the pool, and a second slot. Both paths start from
the same cache; the native one must write the same keys and values and give the same output within
bf16 rounding (a few units in the last place of the output's scale: the two sum in other orders)."""

from __future__ import annotations

import pytest
import torch

from cuda_ext import attention as native_attention
from cuda_ext import loader
from engine.model.layers.attention import Attention
from engine.model.layers.context import StepContext
from engine.model.layers.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(loader.cpu() is None, reason="no C compiler: the native kernels are not built")

CASES = {
    "plain": dict(),
    "gqa-biases": dict(kv_heads=2, qkv_bias=True, o_bias=True),
    "head-norm": dict(kv_heads=1, qk_norm="head"),
    "proj-norm-clip": dict(qk_norm="proj", clip_qkv=0.4, qkv_bias=True),
    "window": dict(kv_heads=2, sliding_window=5),
    "no-rotary": dict(rotary=False),
    "wide-head": dict(heads=2, kv_heads=1, head_dim=256),
}


def _module(heads=4, kv_heads=4, head_dim=32, hidden=96, rotary=True, **options):
    torch.manual_seed(0)
    m = Attention(hidden, heads, kv_heads, head_dim, **options)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    m = m.to(torch.bfloat16)
    rope = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, head_dim, 4096) if rotary else None
    return m, rope


def _ctx(rope, pos, slot=0):
    ctx = StepContext(pos, 1, torch.device("cpu"), slot=slot)
    if rope is not None:
        ctx.cos, ctx.sin = rope(pos, 1)
    return ctx


def _run(m, rope, x, pos, slot, native):
    m._plan = False if native else None
    out = m(x, _ctx(rope, pos, slot))
    return out, m.kv_cache.k.clone(), m.kv_cache.v.clone()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cache_len", [64, 2048])
def test_native_decode_equals_the_torch_path(case, cache_len):
    m, rope = _module(**CASES[case])
    if rope is not None:
        rope.setup(cache_len, torch.bfloat16, torch.device("cpu"))
    m.setup_cache(cache_len, torch.bfloat16, torch.device("cpu"), slots=2)
    assert native_attention.decode_plan(m) is not None, "the native path must take this module"
    torch.manual_seed(1)
    # fill the cache's first positions as a prefill would, in both slots
    prefill = cache_len - 8
    for slot in (0, 1):
        keys = torch.randn(m.num_kv_heads, prefill, m.head_dim).bfloat16()
        m.kv_cache.k[slot, :, :prefill] = keys
        m.kv_cache.v[slot, :, :prefill] = torch.randn_like(keys)
    start = (m.kv_cache.k.clone(), m.kv_cache.v.clone())
    for pos, slot in ((prefill, 0), (prefill + 1, 0), (prefill, 1), (3, 1)):
        x = torch.randn(1, m.q_proj.weight.shape[1]).bfloat16()
        m.kv_cache.k.copy_(start[0])
        m.kv_cache.v.copy_(start[1])
        ref, k_ref, v_ref = _run(m, rope, x, pos, slot, native=False)
        m.kv_cache.k.copy_(start[0])
        m.kv_cache.v.copy_(start[1])
        ours, k_ours, v_ours = _run(m, rope, x, pos, slot, native=True)
        assert isinstance(m._plan, native_attention.DecodePlan), "the native path did not run"
        assert ours.dtype == torch.bfloat16 and ours.shape == ref.shape
        # keys/values: the same projections, norms and rotary roundings; a rare last-bit difference
        # from the float32 norm statistics summed in another order
        for a, b in ((k_ours, k_ref), (v_ours, v_ref)):
            diff = (a.float() - b.float()).abs()
            assert (diff <= 2 ** -7 * b.float().abs() + 1e-6).all(), f"{case}: cache differs by {diff.max()}"
        scale = ref.float().abs().max().item()
        err = (ours.float() - ref.float()).abs().max().item()
        assert err <= 2 ** -6 * scale, f"{case} pos {pos}: {err} against output scale {scale}"


def test_plan_follows_a_new_cache_and_refuses_what_it_cannot_run():
    m, rope = _module()
    m.setup_cache(32, torch.bfloat16, torch.device("cpu"))
    plan = native_attention.decode_plan(m)
    assert plan is not None and plan.key == native_attention.plan_key(m)
    m._plan = plan
    m.setup_cache(48, torch.bfloat16, torch.device("cpu"))
    assert native_attention.plan_key(m) != plan.key and m._plan is False  # the next decode remakes it
    m._plan = plan
    m.to(torch.bfloat16)
    assert m._plan is False
    f32 = Attention(96, 4, 4, 32)
    f32.setup_cache(32, torch.float32, torch.device("cpu"))
    assert native_attention.decode_plan(f32) is None  # float32: the torch path
    x = torch.randn(1, 96).bfloat16()
    assert native_attention.decode(plan, x, None, None, 0, 10_000, 1) is None  # outside the cache


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cache_len", [64, 2048])
def test_native_decode_with_sinks_equals_the_torch_path(window, cache_len):
    """gpt-oss's SinkAttention: the sink joins each head's softmax; its cache (a sink row, padded keys)."""
    from engine.model.families.gpt_oss.attention import SinkAttention

    torch.manual_seed(0)
    m = SinkAttention(96, 4, 2, 32, bias=True, sliding_window=window)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 1.0))
        m.sinks.mul_(3.0)  # sinks from well below to well above the scores
    m = m.to(torch.bfloat16)
    rope = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, 32, 4096)
    rope.setup(cache_len, torch.bfloat16, torch.device("cpu"))
    m.setup_cache(cache_len, torch.bfloat16, torch.device("cpu"), slots=2)
    assert native_attention.decode_plan(m) is not None, "the native path must take this module"
    cache = m.sink_cache
    prefill = cache_len - 8
    for slot in (0, 1):
        keys = torch.randn(2, prefill, 32).bfloat16()
        cache.k[slot, :, 1 : prefill + 1, :32] = keys
        cache.v[slot, :, 1 : prefill + 1] = torch.randn_like(keys)
    start = (cache.k.clone(), cache.v.clone())
    for pos, slot in ((prefill, 0), (prefill + 1, 0), (prefill, 1), (3, 1), (0, 1)):
        x = torch.randn(1, 96).bfloat16()
        outs = []
        for native in (False, True):
            cache.k.copy_(start[0])
            cache.v.copy_(start[1])
            m._plan = False if native else None
            outs.append((m(x, _ctx(rope, pos, slot)), cache.k.clone(), cache.v.clone()))
        assert isinstance(m._plan, native_attention.DecodePlan), "the native path did not run"
        (ref, k_ref, v_ref), (ours, k_ours, v_ours) = outs
        for a, b in ((k_ours, k_ref), (v_ours, v_ref)):
            assert torch.equal(a, b), "the cache rows written differ"
        scale = ref.float().abs().max().item()
        err = (ours.float() - ref.float()).abs().max().item()
        assert err <= 2 ** -6 * scale, f"window {window} pos {pos}: {err} against output scale {scale}"
