"""Qwen3-MoE: per-head q/k RMSNorm, explicit ``head_dim``, optional attention bias, softmax top-k
router (``norm_topk_prob``), no shared expert, dense layers from ``mlp_only_layers`` /
``decoder_sparse_step``; with ``use_sliding_window`` every layer uses ``sliding_window``."""

from __future__ import annotations

from typing import Any

from torch import nn

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
    return ModelArgs.from_config(config, defaults={"rms_norm_eps": 1e-6})


def build(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    layout = moe_layout(args.config)
    window = args.get("sliding_window") if args.get("use_sliding_window", False) else None
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
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=window,
        )
        mlp: nn.Module
        if layout.is_moe_layer(i):
            mlp = softmax_moe(i, args, layout, experts)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps))
    rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    return CausalLM(args, layers, rotary)


FAMILY = register(Family("qwen3_moe", build, parse))
