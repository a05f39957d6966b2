"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, softmax top-k router (renormalised when
``norm_topk_prob``), a sigmoid-gated shared expert, dense MLP layers from ``mlp_only_layers`` /
``decoder_sparse_step``, optional sliding-window layers (``use_sliding_window``/``layer_types``).
GGUF: llama.cpp's ``qwen2moe`` architecture (its shared expert as ``ffn_*_shexp``)."""

from __future__ import annotations

import re
from typing import Any

from engine.store.families import Family, GGUFArch


def sparse_layers(config, num_layers: int) -> list[int]:
    """Qwen-MoE's sparse layers: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``."""
    step = int(config.get("decoder_sparse_step") or 1)
    only_mlp = set(config.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i not in only_mlp and (i + 1) % step == 0]


def layer_windows(args) -> list[int | None]:
    """Sliding window of each layer (None = full attention), as Qwen2MoeConfig derives it."""
    if not args.get("use_sliding_window", False):
        return [None] * args.num_layers
    window = args.get("sliding_window")
    types = args.get("layer_types")
    if types is None:
        max_window_layers = args.get("max_window_layers", 28)
        types = [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention"
            for i in range(args.num_layers)
        ]
    return [window if t == "sliding_attention" else None for t in types]


def sparse_or_dense(args, layout, moe):
    """The MLP of layer i for Qwen-MoE's mixed stacks: ``moe(i)`` on a sparse layer, else the dense MLP
    of ``intermediate_size``."""
    from engine.model.layers.mlp import MLP

    def mlp(i):
        if layout.is_moe_layer(i):
            return moe(i)
        return MLP(args.hidden_size, args.intermediate_size, args.hidden_act)

    return mlp


def build(args, experts):
    from cuda_ext.cpu import Linear
    from engine.model.layers.attention import model_attention
    from engine.model.layers.mlp import MLP
    from engine.model.layers.moe import softmax_moe
    from engine.model.transformer import decoder_stack

    layout = FAMILY.moe_layout(args.config)
    windows = layer_windows(args)
    qkv_bias = bool(args.get("qkv_bias", True))

    def moe(i):
        shared = MLP(args.hidden_size, int(args.get("shared_expert_intermediate_size")), args.hidden_act)
        return softmax_moe(i, args, layout, experts, shared, Linear(args.hidden_size, 1, bias=False))

    return decoder_stack(
        args,
        lambda i: model_attention(args, qkv_bias=qkv_bias, sliding_window=windows[i]),
        sparse_or_dense(args, layout, moe),
    )


def gguf_qwen_moe_config(get, tensor_names: set[str]) -> dict[str, Any]:
    """The keys llama.cpp's ``qwen2moe`` and ``qwen3moe`` share: a layer with a plain FFN instead of
    experts is listed in ``mlp_only_layers``."""
    expert_ff = int(get("expert_feed_forward_length"))
    dense_layers = sorted(
        int(n.split(".")[1]) for n in tensor_names if re.fullmatch(r"blk\.\d+\.ffn_gate\.weight", n)
    )
    return {
        "mlp_only_layers": dense_layers,
        "num_experts": int(get("expert_count", 0) or 0),
        "num_experts_per_tok": int(get("expert_used_count")),
        "moe_intermediate_size": expert_ff,
        "intermediate_size": int(get("feed_forward_length", expert_ff) or expert_ff),
        "decoder_sparse_step": 1,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "use_sliding_window": False,
        "sliding_window": None,
    }


def gguf_config(get, tensor_names: set[str]) -> dict[str, Any]:
    return gguf_qwen_moe_config(get, tensor_names) | {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "shared_expert_intermediate_size": int(get("expert_shared_feed_forward_length", 0) or 0),
        "norm_topk_prob": False,  # llama.cpp's qwen2moe graph does not renormalise the top-k weights
        "qkv_bias": True,
    }


FAMILY = Family(
    "qwen2_moe",
    build,
    config_defaults={"rms_norm_eps": 1e-6, "qkv_bias": True},
    expert_count=("num_experts", "num_local_experts"),
    expert_size=("moe_intermediate_size", "intermediate_size"),
    sparse_layers=sparse_layers,
    gguf=GGUFArch(
        "qwen2moe",
        gguf_config,
        block_names={
            "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
            "ffn_up_shexp": "mlp.shared_expert.up_proj",
            "ffn_down_shexp": "mlp.shared_expert.down_proj",
            "ffn_gate_inp_shexp": "mlp.shared_expert_gate",  # the shared expert's sigmoid gate [1, H]
        },
        row_vectors=("ffn_gate_inp_shexp",),
    ),
)
