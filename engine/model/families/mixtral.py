"""Mixtral: GQA attention (optional sliding window), softmax top-k router (always renormalised,
float32 weights), SwiGLU experts, every layer sparse."""

from __future__ import annotations

from typing import Any

from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.layers.attention import Attention
from engine.model.layers.moe import MoEBlock, swiglu_expert
from engine.model.layers.rope import RotaryEmbedding
from engine.model.layers.router import SoftmaxTopKRouter
from engine.model.registry import Family, register
from engine.model.transformer import CausalLM, DecoderLayer


def parse(config: dict[str, Any]) -> ModelArgs:
    return ModelArgs.from_config(config, default_rope_theta=1e6, defaults={"rms_norm_eps": 1e-5})


def build(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    num_experts = int(args.get("num_local_experts", 8))
    top_k = int(args.get("num_experts_per_tok", 2))
    layers = []
    for i in range(args.num_layers):
        attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            sliding_window=args.get("sliding_window"),
        )
        gate = SoftmaxTopKRouter(args.hidden_size, num_experts, top_k, renormalize=True, weights_dtype="float32")
        mlp = MoEBlock(i, gate, experts, swiglu_expert(args.hidden_act))
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps))
    rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    return CausalLM(args, layers, rotary)


FAMILY = register(Family("mixtral", build, parse))
