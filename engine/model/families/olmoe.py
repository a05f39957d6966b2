"""OLMoE: q/k RMSNorm over the whole q / k projection (before splitting heads), optional
``clip_qkv``, softmax top-k router (``norm_topk_prob``), every layer sparse, no shared expert."""

from __future__ import annotations

from typing import Any

from engine.store.families import Family, SyntheticRecipe


def build(args, experts):
    from engine.model.layers.attention import Attention
    from engine.model.layers.moe import softmax_moe
    from engine.model.layers.rope import RotaryEmbedding
    from engine.model.transformer import CausalLM, DecoderLayer

    layout = FAMILY.moe_layout(args.config)
    bias = bool(args.get("attention_bias", False))
    layers = []
    for i in range(args.num_layers):
        attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="proj",
            norm_eps=args.rms_norm_eps,
            clip_qkv=args.get("clip_qkv"),
        )
        mlp = softmax_moe(i, args, layout, experts)
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps))
    rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    return CausalLM(args, layers, rotary)


def synthetic_config(s) -> dict[str, Any]:
    return {
        "num_experts": s.num_experts,
        "intermediate_size": s.intermediate,
        "norm_topk_prob": False,
        "clip_qkv": None,
    }


def synthetic_tensors(s) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("self_attn.q_norm.weight", (s.heads * s.head_dim,)),
        ("self_attn.k_norm.weight", (s.kv_heads * s.head_dim,)),
    ]


FAMILY = Family(
    "olmoe",
    build,
    config_defaults={"rms_norm_eps": 1e-5},
    expert_count=("num_experts", "num_local_experts"),
    expert_size=("intermediate_size",),
    synthetic=SyntheticRecipe(
        synthetic_config, synthetic_tensors, presets={"olmoe-1b-7b": (16, 64, 8, 2048, 1024, 50304, 16, 16)}
    ),
)
