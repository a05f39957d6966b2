"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, softmax top-k router (renormalised when
``norm_topk_prob``), a sigmoid-gated shared expert, dense MLP layers from ``mlp_only_layers`` /
``decoder_sparse_step``, optional sliding-window layers (``use_sliding_window``/``layer_types``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from cuda_ext.cpu import Linear
from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.layers.attention import Attention
from engine.model.layers.mlp import MLP
from engine.model.layers.moe import softmax_moe
from engine.model.layers.rope import RotaryEmbedding
from engine.model.registry import Family, register
from engine.model.transformer import CausalLM, DecoderLayer
from engine.store.families import moe_layout


def parse(config: dict[str, Any]) -> ModelArgs:
    return ModelArgs.from_config(config, defaults={"rms_norm_eps": 1e-6, "qkv_bias": True})


def layer_windows(args: ModelArgs) -> list[int | None]:
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


def build(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    layout = moe_layout(args.config)
    windows = layer_windows(args)
    layers = []
    for i in range(args.num_layers):
        attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=bool(args.get("qkv_bias", True)),
            sliding_window=windows[i],
        )
        mlp: nn.Module
        if layout.is_moe_layer(i):
            shared = MLP(args.hidden_size, int(args.get("shared_expert_intermediate_size")), args.hidden_act)
            mlp = softmax_moe(i, args, layout, experts, shared, Linear(args.hidden_size, 1, bias=False))
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps))
    rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    return CausalLM(args, layers, rotary)


FAMILY = register(Family("qwen2_moe", build, parse))
