"""DeepSeek building blocks against transformers' modules on the same random weights (fp32).

MLA (q_lora_rank set / None, V2 complex rope, V3 interleaved and non-interleaved rope, yarn with
mscale), prefill and token-by-token decode through the latent cache, both attention paths;
the V2 and V3 routers.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as tv2
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as tv3
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config

from engine.model.families.deepseek.mla import MLAArgs, MultiHeadLatentAttention
from engine.model.families.deepseek.router import DeepseekV2Router, DeepseekV3Router
from engine.model.layers.context import StepContext


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster, and much faster when other jobs load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _config(version: int, q_lora_rank: int | None, rope: dict, interleave: bool = True):
    common = dict(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=24,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
        max_position_embeddings=128,
        rope_parameters=dict(rope),
        attention_bias=False,
        vocab_size=64,
        num_hidden_layers=1,
        intermediate_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
    )
    if version == 2:
        cfg = DeepseekV2Config(**common)
    else:
        cfg = DeepseekV3Config(rope_interleave=interleave, n_group=2, topk_group=1, **common)
    cfg._attn_implementation = "eager"
    return cfg


def _reference(version: int, cfg, seed: int):
    torch.manual_seed(seed)
    mod = tv2 if version == 2 else tv3
    attn = (mod.DeepseekV2Attention if version == 2 else mod.DeepseekV3Attention)(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    rotary = (mod.DeepseekV2RotaryEmbedding if version == 2 else mod.DeepseekV3RotaryEmbedding)(cfg)
    return attn, rotary


def _cos_sin(version: int, rotary, positions: torch.Tensor, x: torch.Tensor):
    """[T, d/2] cos/sin tables (with the rope's attention scaling) from transformers' rotary module."""
    emb = rotary(x, positions[None])
    if version == 2:
        return emb[0].real, emb[0].imag
    cos, sin = emb
    half = cos.shape[-1] // 2
    return cos[0, :, :half], sin[0, :, :half]


def _ctx(start_pos: int, cos: torch.Tensor, sin: torch.Tensor) -> StepContext:
    """A framework step context whose rotary rows are [T, rope_dim] in the cat(freqs, freqs) layout."""
    return StepContext(start_pos, cos.shape[0], cos.device, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))


def _mine(cfg, ref_attn, max_seq: int = 64) -> MultiHeadLatentAttention:
    args = MLAArgs(
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        softmax_scale=ref_attn.scaling,
        rope_interleave=getattr(cfg, "rope_interleave", True),
        rope_fp32=isinstance(cfg, DeepseekV2Config),
    )
    mine = MultiHeadLatentAttention(args)
    mine.setup_cache(max_seq, torch.float32, "cpu")
    missing, unexpected = mine.load_state_dict(ref_attn.state_dict(), strict=True)
    assert not missing and not unexpected
    return mine


CASES = [
    pytest.param(2, 16, DEFAULT_ROPE, True, id="v2-qlora"),
    pytest.param(2, None, YARN, True, id="v2-noqlora-yarn"),
    pytest.param(3, 16, YARN, True, id="v3-interleave-yarn"),
    pytest.param(3, None, DEFAULT_ROPE, False, id="v3-halfrope"),
]


@pytest.mark.parametrize("version,q_lora_rank,rope,interleave", CASES)
def test_mla_matches_transformers_prefill_and_decode(version, q_lora_rank, rope, interleave):
    cfg = _config(version, q_lora_rank, rope, interleave)
    ref, rotary = _reference(version, cfg, seed=version * 10 + (q_lora_rank or 0))
    if rope["rope_type"] == "yarn":
        assert ref.scaling != pytest.approx((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)
    T = 40  # past original_max_position_embeddings, where yarn's interpolation matters
    torch.manual_seed(1)
    x = torch.randn(1, T, cfg.hidden_size)
    pos = torch.arange(T)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = ref(x, position_embeddings=rotary(x, pos[None]), attention_mask=mask)[0][0]
        cos, sin = _cos_sin(version, rotary, pos, x)
        for absorb in (False, True):
            mine = _mine(cfg, ref)
            got = mine.attend(x[0], 0, cos, sin, absorb=absorb)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # prefill 25 tokens, then decode one at a time through the latent cache
        mine = _mine(cfg, ref)
        outs = [mine.attend(x[0, :25], 0, cos[:25], sin[:25])]
        for t in range(25, T):
            outs.append(mine(x[0, t : t + 1], _ctx(t, cos[t : t + 1], sin[t : t + 1])))
        torch.testing.assert_close(torch.cat(outs), want, atol=1e-5, rtol=1e-5)
        # rewinding: rerunning from an earlier position overwrites the cache
        for absorb in (False, True):  # a later chunk (start_pos > 0, masked) on both paths
            again = mine(x[0, 30:], _ctx(30, cos[30:], sin[30:]), absorb=absorb)
            torch.testing.assert_close(again, want[30:], atol=1e-5, rtol=1e-5)


def test_mla_cache_overflow_is_an_error():
    cfg = _config(3, 16, DEFAULT_ROPE)
    ref, rotary = _reference(3, cfg, seed=0)
    mine = _mine(cfg, ref, max_seq=8)
    x = torch.randn(9, cfg.hidden_size)
    cos, sin = _cos_sin(3, rotary, torch.arange(9), x[None])
    with pytest.raises(ValueError, match="exceed"):
        mine.attend(x, 0, cos, sin)


def _router_input(cfg, seed: int):
    torch.manual_seed(seed)
    return torch.randn(37, cfg.hidden_size)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_router_matches_transformers(method):
    cfg = DeepseekV2Config(
        hidden_size=48, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=3, topk_method=method, n_group=4,
        topk_group=2, routed_scaling_factor=1.7, norm_topk_prob=False,
    )
    ref = tv2.DeepseekV2TopkRouter(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        ref.weight.normal_()
    mine = DeepseekV2Router(48, 16, 3, method, 4, 2, 1.7)
    mine.load_state_dict(ref.state_dict())
    x = _router_input(cfg, 4)
    _, want_w, want_ids = ref(x)
    got_w, got_ids = mine(x)
    _assert_same_routing(got_w, got_ids, want_w, want_ids)
    if method == "group_limited_greedy":  # every token's experts lie in at most topk_group groups
        assert all(len(set((row // 4).tolist())) <= 2 for row in got_ids)


@pytest.mark.parametrize("norm", [True, False])
def test_v3_router_matches_transformers(norm):
    cfg = DeepseekV3Config(
        hidden_size=48, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=norm,
    )
    ref = tv3.DeepseekV3TopkRouter(cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        ref.weight.normal_()
        ref.e_score_correction_bias.normal_(0, 0.5)
    mine = DeepseekV3Router(48, 16, 3, 4, 2, norm, 2.5)
    mine.load_state_dict(ref.state_dict())
    x = _router_input(cfg, 6)
    _, want_w, want_ids = ref(x)
    got_w, got_ids = mine(x)
    _assert_same_routing(got_w, got_ids, want_w, want_ids)
    if norm:
        torch.testing.assert_close(got_w.sum(-1), torch.full((37,), 2.5))
    # the correction bias changes the choice but not the weights: without it the picks differ
    plain = DeepseekV3Router(48, 16, 3, 4, 2, norm, 2.5)
    plain.weight.copy_(mine.weight)
    assert not torch.equal(plain(x)[1].sort(-1)[0], got_ids.sort(-1)[0])


def test_v3_router_bias_stays_float32_in_bf16():
    r = DeepseekV3Router(8, 4, 2, 2, 1)
    r.e_score_correction_bias.fill_(1.0 + 2**-12)
    r.to(torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16
    assert r.e_score_correction_bias.dtype == torch.float32
    assert r.e_score_correction_bias[0].item() == 1.0 + 2**-12


def _assert_same_routing(got_w, got_ids, want_w, want_ids):
    """Same expert set and weights per token (top-k order is unspecified with sorted=False)."""
    go, wo = got_ids.sort(-1), want_ids.sort(-1)
    assert torch.equal(go.values, wo.values)
    torch.testing.assert_close(got_w.gather(1, go.indices), want_w.gather(1, wo.indices))
    assert got_w.dtype == torch.float32 and got_ids.dtype == torch.int64
