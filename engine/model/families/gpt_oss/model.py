"""The gpt-oss model: sink attention layers (sliding or full per ``layer_types``), the biased router
and clamped SwiGLU experts (``experts``), yarn rope. Routed experts come from the ``ExpertSource``
(the store untangles gpt-oss's fused interleaved ``gate_up_proj``). The norms compute
``(w * x_normed)`` in float32 before casting back, as transformers does.
"""

from __future__ import annotations

import torch
from torch import nn

from cuda_ext.cpu import rms_norm
from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.families.gpt_oss.attention import SinkAttention
from engine.model.families.gpt_oss.experts import (
    SWIGLU_ALPHA,
    SWIGLU_LIMIT,
    GptOssRouter,
    clamped_swiglu_expert,
)
from engine.model.layers.moe import MoEBlock
from engine.model.layers.rope import RotaryEmbedding
from engine.model.transformer import CausalLM, DecoderLayer


class GptOssRMSNorm(nn.Module):
    """RMSNorm with the weight applied in float32 before casting back (gpt-oss's variant)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            out = rms_norm(x, self.weight, self.eps, weight_f32=True)  # one decode token: one native call
            if out is not None:
                return out
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


def layer_windows(args: ModelArgs) -> list[int | None]:
    """Sliding window of each decoder layer (None = full attention), from ``layer_types``."""
    window = args.get("sliding_window")
    types = args.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(args.num_layers)
    ]
    return [window if t == "sliding_attention" else None for t in types[: args.num_layers]]


def build_gpt_oss(args: ModelArgs, experts: ExpertSource) -> CausalLM:
    num_experts = int(args.get("num_local_experts") or args.get("num_experts"))
    top_k = int(args.get("num_experts_per_tok", 4))
    expert_fn = clamped_swiglu_expert(
        float(args.get("swiglu_alpha", SWIGLU_ALPHA)), float(args.get("swiglu_limit", SWIGLU_LIMIT))
    )
    layers = []
    for i, window in enumerate(layer_windows(args)):
        attn = SinkAttention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            bias=bool(args.get("attention_bias", True)),
            sliding_window=window,
        )
        gate = GptOssRouter(args.hidden_size, num_experts, top_k)
        layer = DecoderLayer(attn, MoEBlock(i, gate, experts, expert_fn), args.hidden_size, args.rms_norm_eps)
        layer.input_layernorm = GptOssRMSNorm(args.hidden_size, args.rms_norm_eps)
        layer.post_attention_layernorm = GptOssRMSNorm(args.hidden_size, args.rms_norm_eps)
        layers.append(layer)
    rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    model = CausalLM(args, layers, rotary)
    model.norm = GptOssRMSNorm(args.hidden_size, args.rms_norm_eps)
    return model
