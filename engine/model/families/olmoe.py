"""OLMoE: q/k RMSNorm over the whole q / k projection (before splitting heads), optional
``clip_qkv``, softmax top-k router (``norm_topk_prob``), every layer sparse, no shared expert."""

from __future__ import annotations

from typing import Any

from engine.store.families import Family, SyntheticRecipe


def build(args, experts):
    from engine.model.layers.attention import model_attention
    from engine.model.layers.moe import softmax_moe
    from engine.model.transformer import decoder_stack

    layout = FAMILY.moe_layout(args.config)
    bias = bool(args.get("attention_bias", False))

    def attention(i):
        return model_attention(
            args,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="proj",
            norm_eps=args.rms_norm_eps,
            clip_qkv=args.get("clip_qkv"),
        )

    return decoder_stack(args, attention, lambda i: softmax_moe(i, args, layout, experts))


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
