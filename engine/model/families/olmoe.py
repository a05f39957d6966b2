"""OLMoE: q/k RMSNorm over the whole q / k projection (before splitting heads), optional
``clip_qkv``, softmax top-k router (``norm_topk_prob``), every layer sparse, no shared expert."""

from __future__ import annotations

from typing import Any

from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.layers.attention import Attention
from engine.model.layers.moe import softmax_moe
from engine.model.layers.rope import RotaryEmbedding
from engine.model.registry import Family, register
from engine.model.transformer import CausalLM, DecoderLayer
from engine.store.families import moe_layout


def parse(config: dict[str, Any]) -> ModelArgs:
    return ModelArgs.from_config(config, defaults={"rms_norm_eps": 1e-5})


def build(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    layout = moe_layout(args.config)
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


FAMILY = register(Family("olmoe", build, parse))
