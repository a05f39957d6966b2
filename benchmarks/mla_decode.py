"""Decode cost of one DeepSeek multi-head latent attention layer: moeinf's absorbed path (attention in
the latent space over the cached latents) against expanding every cached latent through kv_b_proj
each step (what transformers 5.23 does; its attention module is timed too), plus the KV-cache bytes a
token costs each way.

Shapes of DeepSeek-V2-Lite (hidden 2048, 16 heads, kv_lora_rank 512, qk_nope 128, qk_rope 64, v 128),
random weights, one layer, one CPU thread by default. Prints medians of ``--runs`` decode steps at
each context length.

    .venv/bin/python benchmarks/mla_decode.py [--contexts 512 2048] [--dtype bfloat16] [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.model.families.deepseek.mla import MLAArgs, MultiHeadLatentAttention

HIDDEN, HEADS, LORA, NOPE, ROPE, V = 2048, 16, 512, 128, 64, 128


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)

    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2Attention,
        DeepseekV2RotaryEmbedding,
    )

    cfg = DeepseekV2Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=None, kv_lora_rank=LORA,
        qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, max_position_embeddings=max(a.contexts) + 8,
    )
    cfg._attn_implementation = "sdpa"
    ref = DeepseekV2Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ref = ref.to(dtype)
    rotary = DeepseekV2RotaryEmbedding(cfg)
    mine = MultiHeadLatentAttention(MLAArgs(HIDDEN, HEADS, None, LORA, NOPE, ROPE, V, ref.scaling))
    mine.load_state_dict(ref.state_dict())
    mine = mine.to(dtype)

    lat_bytes = (LORA + ROPE) * dtype.itemsize
    full_bytes = HEADS * (NOPE + ROPE + V) * dtype.itemsize
    print(f"KV cache per token per layer: latent {lat_bytes} B, expanded K/V {full_bytes} B "
          f"({full_bytes / lat_bytes:.0f}x)")
    print(f"{'context':>8} {'absorbed ms':>12} {'expanded ms':>12} {'transformers ms':>16} {'speedup vs tf':>14}")
    for S in a.contexts:
        absorbed, expanded, theirs = _measure(S, mine, ref, rotary, cfg, dtype, a.runs)
        print(f"{S:>8} {absorbed:>12.2f} {expanded:>12.2f} {theirs:>16.2f} {theirs / absorbed:>13.1f}x")


def _measure(S: int, mine, ref, rotary, cfg, dtype: torch.dtype, runs: int) -> tuple[float, float, float]:
    """Median ms of one decode step at context S: absorbed, expanded, transformers."""
    from transformers import DynamicCache

    mine.setup_cache(S + 1, dtype, "cpu")
    x = torch.randn(S + 1, HIDDEN, dtype=dtype)
    freqs = rotary(x, torch.arange(S + 1)[None])[0]
    cos, sin = freqs.real, freqs.imag
    cache = DynamicCache(config=cfg)
    with torch.inference_mode():
        mine.attend(x[:S], 0, cos[:S], sin[:S])
        ref(x[None, :S], position_embeddings=rotary(x, torch.arange(S)[None]), attention_mask=None,
            past_key_values=cache)
        step = (x[S : S + 1], S, cos[S : S + 1], sin[S : S + 1])
        absorbed = _median_ms(lambda: mine.attend(*step, absorb=True), runs)
        expanded = _median_ms(lambda: mine.attend(*step, absorb=False), runs)
        pe = rotary(x, torch.tensor([[S]]))

        def tf_step() -> None:
            ref(x[None, S : S + 1], position_embeddings=pe, attention_mask=None, past_key_values=cache)
            cache.crop(-1)  # drop the token just added: the context stays S

        theirs = _median_ms(tf_step, runs)
    return absorbed, expanded, theirs

if __name__ == "__main__":
    main()
