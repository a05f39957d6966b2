"""Llama (dense, no experts): the GGUF demo path (SmolLM2) and upcycling sources. Optional
attention / MLP biases, tied embeddings, llama3 / linear / dynamic rope scaling."""

from __future__ import annotations

from typing import Any

from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.layers.attention import Attention
from engine.model.layers.mlp import MLP
from engine.model.layers.rope import RotaryEmbedding
from engine.model.registry import Family, register
from engine.model.transformer import CausalLM, DecoderLayer


def parse(config: dict[str, Any]) -> ModelArgs:
    return ModelArgs.from_config(config, defaults={"rms_norm_eps": 1e-6})


def build(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    bias = bool(args.get("attention_bias", False))
    layers = []
    for _ in range(args.num_layers):
        attn = Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, qkv_bias=bias, o_bias=bias)
        mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=bool(args.get("mlp_bias", False)))
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps))
    rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    return CausalLM(args, layers, rotary)


FAMILY = register(Family("llama", build, parse))
