"""gpt-oss fidelity on a tiny random model (tests/tiny_models.py) against transformers: sink attention
with a sliding (window 8) and a full layer, attention and router biases, yarn rope, clamped SwiGLU
experts with biases reached through the ExpertSource. Prompts up to 45 tokens, decode through the cache.
"""

from __future__ import annotations

import pytest
import torch
from deepseek_gpt_oss_fidelity import build_store, check_bf16, check_greedy, check_prefill_and_decode

from engine.model.experts import ExpertWeights
from engine.model.families.gpt_oss.attention import SinkAttention, SinkKVCache, attend_with_sinks
from engine.model.families.gpt_oss.experts import GptOssRouter, clamped_swiglu
from engine.model.layers.context import StepContext
from engine.model.loader import load_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster, and much faster when other jobs load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_store("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))


def test_structure(tiny):
    _, store = tiny
    model = load_model(store, torch.float32, max_seq_len=32)
    windows = [layer.self_attn.sliding_window for layer in model.layers]
    assert windows == [8, None]
    assert all(isinstance(layer.self_attn, SinkAttention) for layer in model.layers)
    assert model.layers[0].self_attn.sinks.abs().sum() > 0


def test_prefill_logits_and_decode_match_transformers(tiny):
    check_prefill_and_decode(*tiny)


def test_32_greedy_tokens_match_transformers_generate(tiny):
    check_greedy(*tiny, n=32)


def test_bf16_within_tolerance(tiny):
    check_bf16(*tiny)


def test_sliding_window_matters(tiny):
    """Changing a token more than `window` positions back changes nothing in the sliding layer's
    output but does change the full layer's: the window is really applied."""
    _, store = tiny
    model = load_model(store, torch.float32, max_seq_len=32)
    torch.manual_seed(0)
    x = torch.randn(20, model.args.hidden_size)
    y = x.clone()
    y[2] += 1.0
    for layer, same in ((model.layers[0].self_attn, True), (model.layers[1].self_attn, False)):
        ctx = StepContext(0, 20, x.device, *model.rotary(0, 20))
        a = layer(x, ctx)[-1]
        ctx = StepContext(0, 20, x.device, *model.rotary(0, 20))
        b = layer(y, ctx)[-1]
        assert torch.allclose(a, b) == same


def test_sinks_absorb_attention():
    """A huge sink drives the attention output to zero; a very negative one gives plain causal softmax
    attention; in between, each head's output is plain attention times sum(e^s) / (sum(e^s) + e^sink)."""
    torch.manual_seed(0)
    T, H, Hkv, D, scale = 3, 4, 2, 12, 0.35
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    cache = SinkKVCache(8, Hkv, D, scale, torch.float32, torch.device("cpu"))
    cache.update(0, k, v)
    ctx = StepContext(0, T, q.device)
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0), v.transpose(0, 1).repeat_interleave(2, 0),
        is_causal=True, scale=scale,
    ).transpose(0, 1)  # [T, H, D]
    out = attend_with_sinks(q, cache, ctx, scale, torch.full((H,), 50.0))
    assert out.abs().max() < 1e-12
    out = attend_with_sinks(q, cache, ctx, scale, torch.full((H,), -1e4))
    torch.testing.assert_close(out, plain.reshape(T, -1))
    sinks = torch.randn(H)
    scores = torch.einsum("thd,shd->hts", q, k.repeat_interleave(2, 1)) * scale
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    kept = scores.exp().sum(-1) / (scores.exp().sum(-1) + sinks.exp()[:, None])  # [H, T]
    out = attend_with_sinks(q, cache, ctx, scale, sinks)
    torch.testing.assert_close(out, (plain * kept.T[:, :, None]).reshape(T, -1))


def test_clamped_swiglu_and_router():
    torch.manual_seed(0)
    h, i = 6, 5
    w = ExpertWeights(gate=torch.randn(i, h) * 4, up=torch.randn(i, h) * 4, down=torch.randn(h, i),
                      gate_bias=torch.randn(i), up_bias=torch.randn(i), down_bias=torch.randn(h))
    x = torch.randn(7, h)
    g = (x @ w.gate.T + w.gate_bias).clamp(max=7.0)
    u = (x @ w.up.T + w.up_bias).clamp(-7.0, 7.0)
    assert (x @ w.gate.T + w.gate_bias).max() > 7 and (x @ w.up.T + w.up_bias).abs().max() > 7  # clamps bite
    want = ((u + 1) * g * torch.sigmoid(1.702 * g)) @ w.down.T + w.down_bias
    torch.testing.assert_close(clamped_swiglu(x, w), want)
    r = GptOssRouter(h, 8, 3)
    r.weight.normal_()
    r.bias.normal_()
    weights, ids = r(x)
    logits = x @ r.weight.T + r.bias
    assert torch.equal(ids, logits.topk(3).indices)
    torch.testing.assert_close(weights, logits.topk(3).values.softmax(-1))
