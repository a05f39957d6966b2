"""The DeepSeek-V2 / V3 builder: multi-head latent attention, dense first layers,
MoE layers with shared experts.

* Attention: ``MultiHeadLatentAttention``; rotary over ``qk_rope_head_dim`` only, adjacent-pair
  convention (V2 always, in float32 as transformers' complex rope; V3 unless ``rope_interleave`` is
  false, in the model dtype); softmax scale
  ``qk_head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` for scaled (yarn) ropes.
* Which layers are sparse: the family's layout (``engine/model/families/deepseek/__init__.py``).
  Other layers are a dense SwiGLU MLP of ``intermediate_size``.
* MoE layers: the family's router (V2 softmax greedy / group-limited, V3 below), SwiGLU routed
  experts of ``moe_intermediate_size`` through the ``ExpertSource``, plus ``n_shared_experts`` shared
  experts as one MLP of ``moe_intermediate_size * n_shared_experts`` added to every token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.families.deepseek.mla import MLAArgs, MultiHeadLatentAttention
from engine.model.families.deepseek.router import DeepseekV2Router, DeepseekV3Router
from engine.model.layers.mlp import MLP
from engine.model.layers.moe import MoEBlock, swiglu_expert
from engine.model.layers.rope import RotaryEmbedding
from engine.model.transformer import CausalLM, DecoderLayer
from engine.store.families import moe_layout


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(rope: dict[str, Any], qk_head_dim: int) -> float:
    """MLA's attention scale: ``qk_head_dim**-0.5``, times ``mscale**2`` for a scaled rope with
    ``mscale_all_dim`` (as transformers' ``yarn_apply_mscale``)."""
    scale = qk_head_dim**-0.5
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        m = yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class Float32RotaryEmbedding(RotaryEmbedding):
    """Rotary tables kept in float32 whatever the model dtype (transformers' V2 rope is complex float32)."""

    def setup(self, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        super().setup(max_seq_len, torch.float32, device)


def mla_args(args: ModelArgs, rope_interleave: bool, rope_fp32: bool) -> MLAArgs:
    nope = int(args.get("qk_nope_head_dim"))
    rope_dim = int(args.get("qk_rope_head_dim"))
    q_lora = args.get("q_lora_rank")
    return MLAArgs(
        hidden_size=args.hidden_size,
        num_heads=args.num_heads,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(args.get("kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(args.get("v_head_dim")),
        softmax_scale=softmax_scale(args.rope, nope + rope_dim),
        attention_bias=bool(args.get("attention_bias", False)),
        rope_interleave=rope_interleave,
        rope_fp32=rope_fp32,
    )


def build_deepseek(args: ModelArgs, experts: ExpertSource, version: int) -> CausalLM:
    """The V2 (``version=2``) or V3 model of ``args``."""
    layout = moe_layout(args.config)
    rope_interleave = True if version == 2 else bool(args.config.get("rope_interleave", True))
    attn_args = mla_args(args, rope_interleave, rope_fp32=version == 2)
    mlp_bias = bool(args.get("mlp_bias", False)) if version == 2 else False
    moe_inter = layout.expert_intermediate_size
    n_shared = int(args.get("n_shared_experts", 0))
    layers = []
    for i in range(args.num_layers):
        mlp: nn.Module
        if layout.is_moe_layer(i):
            gate: nn.Module
            if version == 2:
                gate = DeepseekV2Router(
                    args.hidden_size,
                    layout.num_experts,
                    layout.top_k,
                    topk_method=str(args.get("topk_method", "greedy")),
                    n_group=args.get("n_group"),
                    topk_group=args.get("topk_group"),
                    routed_scaling_factor=float(args.get("routed_scaling_factor", 1.0)),
                )
            else:
                gate = DeepseekV3Router(
                    args.hidden_size,
                    layout.num_experts,
                    layout.top_k,
                    n_group=args.get("n_group"),
                    topk_group=args.get("topk_group"),
                    norm_topk_prob=bool(args.get("norm_topk_prob", True)),
                    routed_scaling_factor=float(args.get("routed_scaling_factor", 1.0)),
                )
            shared = (
                MLP(args.hidden_size, moe_inter * n_shared, args.hidden_act, bias=mlp_bias)
                if n_shared
                else None
            )
            mlp = MoEBlock(i, gate, experts, swiglu_expert(args.hidden_act), shared_expert=shared)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=mlp_bias)
        layers.append(
            DecoderLayer(MultiHeadLatentAttention(attn_args), mlp, args.hidden_size, args.rms_norm_eps)
        )
    rotary_cls = Float32RotaryEmbedding if version == 2 else RotaryEmbedding
    rotary = rotary_cls(args.rope, attn_args.qk_rope_head_dim, args.max_position_embeddings)
    return CausalLM(args, layers, rotary)
