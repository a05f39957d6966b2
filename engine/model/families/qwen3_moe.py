"""Qwen3-MoE: per-head q/k RMSNorm, explicit ``head_dim``, optional attention bias, softmax top-k
router (``norm_topk_prob``), no shared expert, dense layers from ``mlp_only_layers`` /
``decoder_sparse_step``; with ``use_sliding_window`` every layer uses ``sliding_window``.
GGUF: llama.cpp's ``qwen3moe`` architecture."""

from __future__ import annotations

from typing import Any

from engine.model.families.qwen2_moe import gguf_qwen_moe_config, sparse_layers, sparse_or_dense
from engine.store.families import Family, GGUFArch, SyntheticRecipe


def build(args, experts):
    from engine.model.layers.attention import model_attention
    from engine.model.layers.moe import softmax_moe
    from engine.model.transformer import decoder_stack

    layout = FAMILY.moe_layout(args.config)
    window = args.get("sliding_window") if args.get("use_sliding_window", False) else None
    bias = bool(args.get("attention_bias", False))

    def attention(i):
        return model_attention(
            args,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=window,
        )

    return decoder_stack(
        args, attention, sparse_or_dense(args, layout, lambda i: softmax_moe(i, args, layout, experts))
    )


def gguf_config(get, tensor_names: set[str]) -> dict[str, Any]:
    key_length = get("attention.key_length")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    return gguf_qwen_moe_config(get, tensor_names) | {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "head_dim": int(key_length) if key_length else hidden // heads,
        "norm_topk_prob": True,  # llama.cpp's qwen3moe graph renormalises the top-k weights
        "attention_bias": False,
    }


def synthetic_config(s) -> dict[str, Any]:
    return {
        "num_experts": s.num_experts,
        "moe_intermediate_size": s.intermediate,
        "intermediate_size": s.intermediate * 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "use_sliding_window": False,
    }


def synthetic_tensors(s) -> list[tuple[str, tuple[int, ...]]]:
    return [("self_attn.q_norm.weight", (s.head_dim,)), ("self_attn.k_norm.weight", (s.head_dim,))]


FAMILY = Family(
    "qwen3_moe",
    build,
    config_defaults={"rms_norm_eps": 1e-6},
    expert_count=("num_experts", "num_local_experts"),
    expert_size=("moe_intermediate_size", "intermediate_size"),
    sparse_layers=sparse_layers,
    gguf=GGUFArch("qwen3moe", gguf_config),
    synthetic=SyntheticRecipe(
        synthetic_config,
        synthetic_tensors,
        presets={
            "qwen3-30b-a3b": (48, 128, 8, 2048, 768, 151936, 32, 4),
            "qwen3-235b-a22b": (94, 128, 8, 4096, 1536, 151936, 64, 4),
        },
    ),
)
