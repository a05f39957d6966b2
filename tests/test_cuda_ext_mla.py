"""One-token multi-head latent attention in one native call (cuda_ext.mla) against the module's torch
path (the absorbed decode): with and without a query rank, both rotary layouts, biases, a cache long
enough that the heads are split over the pool, a second slot. Both start from the same caches; the
native one must write the same latent and rope key and give the same output within bf16 rounding (the
torch path's matrix products sum in other orders)."""

from __future__ import annotations

import pytest
import torch

from cuda_ext import loader
from cuda_ext import mla as native_mla
from engine.model.families.deepseek.mla import MLAArgs, MultiHeadLatentAttention
from engine.model.layers.context import StepContext
from engine.model.layers.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(loader.cpu() is None, reason="no C compiler: the native kernels are not built")

CASES = {
    "v3": dict(),
    "no-q-rank": dict(q_lora_rank=None),
    "halves-bias": dict(rope_interleave=False, attention_bias=True),
    "wide-latent": dict(kv_lora_rank=128, qk_nope_head_dim=16),
}


def _module(**options):
    args = dict(hidden_size=96, num_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=24, softmax_scale=48**-0.5) | options
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(MLAArgs(**args))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.2)
    return m.to(torch.bfloat16)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cache_len", [64, 1024])
def test_native_mla_decode_equals_the_torch_path(case, cache_len):
    m = _module(**CASES[case])
    rope = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, m.args.qk_rope_head_dim, 4096)
    rope.setup(cache_len, torch.bfloat16, torch.device("cpu"))
    m.setup_cache(cache_len, torch.bfloat16, torch.device("cpu"), slots=2)
    assert native_mla.decode_plan(m) is not None, "the native path must take this module"
    torch.manual_seed(1)
    prefill = cache_len - 8
    m.cache_latent[:, :prefill] = torch.randn(2, prefill, m.args.kv_lora_rank).bfloat16()
    m.cache_k_rope[:, :prefill] = torch.randn(2, prefill, m.args.qk_rope_head_dim).bfloat16()
    start = (m.cache_latent.clone(), m.cache_k_rope.clone())
    for pos, slot in ((prefill, 0), (prefill + 1, 0), (prefill, 1), (3, 1), (0, 0)):
        x = torch.randn(1, 96).bfloat16()
        ctx = StepContext(pos, 1, torch.device("cpu"), slot=slot)
        ctx.cos, ctx.sin = rope(pos, 1)
        outs = []
        for native in (False, True):
            m.cache_latent.copy_(start[0])
            m.cache_k_rope.copy_(start[1])
            m._plan = False if native else None
            outs.append((m(x, ctx), m.cache_latent.clone(), m.cache_k_rope.clone()))
        assert isinstance(m._plan, native_mla.DecodePlan), "the native path did not run"
        (ref, c_ref, k_ref), (ours, c_ours, k_ours) = outs
        assert torch.equal(k_ours, k_ref), "the rope keys written differ"
        diff = (c_ours.float() - c_ref.float()).abs()  # the norm's statistics: a rare last bit
        assert (diff <= 2**-7 * c_ref.float().abs() + 1e-6).all()
        scale = ref.float().abs().max().item()
        err = (ours.float() - ref.float()).abs().max().item()
        assert err <= 2**-6 * scale, f"{case} pos {pos}: {err} against output scale {scale}"


def test_plan_refuses_what_it_cannot_run():
    m = _module()
    assert native_mla.decode_plan(m) is None  # no cache yet
    m.setup_cache(16, torch.float32, torch.device("cpu"))
    assert native_mla.decode_plan(m) is None  # float32 caches: the torch path
    v2 = MultiHeadLatentAttention(MLAArgs(96, 4, None, 32, 32, 16, 24, 0.1, rope_fp32=True)).bfloat16()
    v2.setup_cache(16, torch.bfloat16, torch.device("cpu"))
    assert native_mla.decode_plan(v2) is None  # V2's float32 rotary
