"""Routers: hidden states [T, H] -> (routing weights [T, k], expert ids [T, k] int64).

Any nn.Module with that forward can be an ``MoEBlock``'s router (DeepSeek's grouped sigmoid router,
gpt-oss's biased router); its parameters load under ``mlp.gate.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from cuda_ext.cpu import linear, route_topk, route_topk_f32


class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts (float32), then top-k; optionally renormalised to sum to one.

    ``weights_dtype``: "float32" keeps the weights in float32 (Mixtral); "input" casts them to the
    hidden-state dtype (Qwen2-MoE, Qwen3-MoE, OLMoE), as transformers does.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        weights_dtype: str = "input",
        bias: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_dtype = weights_dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            routed = route_topk(  # one decode token: one native call
                x, self.weight, self.bias, self.top_k, self.renormalize, self.weights_dtype == "input"
            )
            if routed is not None:
                return routed
        if x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu":
            routed = route_topk_f32(x, self.weight, self.bias, self.top_k, self.renormalize)  # a float32 model's
            if routed is not None:
                return routed
        logits = linear(x, self.weight, self.bias)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_dtype == "input":
            weights = weights.to(logits.dtype)
        return weights, ids
