"""Mixtral: GQA attention (optional sliding window), softmax top-k router (always renormalised,
float32 weights), SwiGLU experts, every layer sparse.

Checkpoints: hub checkpoints name the MoE block ``block_sparse_moe`` and its experts ``w1`` (gate),
``w3`` (up), ``w2`` (down); transformers 5's fused layout (``mlp.experts.gate_up_proj`` [E, 2I, H])
is split by the default rule. GGUF: llama.cpp's ``llama`` architecture with expert tensors.
"""

from __future__ import annotations

from typing import Any

from engine.model.families.llama import gguf_llama_config
from engine.store.families import Family, GGUFArch, SyntheticRecipe


def build(args, experts):
    from engine.model.layers.attention import model_attention
    from engine.model.layers.moe import MoEBlock, swiglu_expert
    from engine.model.layers.router import SoftmaxTopKRouter
    from engine.model.transformer import decoder_stack

    num_experts = int(args.get("num_local_experts", 8))
    top_k = int(args.get("num_experts_per_tok", 2))

    def mlp(i):
        gate = SoftmaxTopKRouter(
            args.hidden_size, num_experts, top_k, renormalize=True, weights_dtype="float32"
        )
        return MoEBlock(i, gate, experts, swiglu_expert(args.hidden_act))

    return decoder_stack(args, lambda i: model_attention(args, sliding_window=args.get("sliding_window")), mlp)


def gguf_config(get, tensor_names: set[str]) -> dict[str, Any]:
    return gguf_llama_config(get, tensor_names) | {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "num_local_experts": int(get("expert_count", 0) or 0),
        "num_experts_per_tok": int(get("expert_used_count", 2)),
        "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
        "sliding_window": None,
    }


def synthetic_config(s) -> dict[str, Any]:
    return {"num_local_experts": s.num_experts, "intermediate_size": s.intermediate, "sliding_window": None}


FAMILY = Family(
    "mixtral",
    build,
    config_defaults={"rms_norm_eps": 1e-5},
    rope_theta=1e6,
    expert_count=("num_local_experts", "num_experts"),
    expert_size=("intermediate_size",),
    moe_module="block_sparse_moe",
    projections={"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
    gguf=GGUFArch("llama", gguf_config, unpermute_qk=True),
    synthetic=SyntheticRecipe(
        synthetic_config,
        presets={
            "mixtral-8x7b": (32, 8, 2, 4096, 14336, 32000, 32, 8),
            "mixtral-8x22b": (56, 8, 2, 6144, 16384, 32768, 48, 8),
        },
    ),
)
