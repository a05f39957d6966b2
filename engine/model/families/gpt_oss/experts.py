"""gpt-oss routing and its clamped SwiGLU expert.

* Router: ``logits = hidden @ W.T + b`` (in the hidden dtype), top-k of the logits (sorted), then a
  softmax over those k logits. Parameter names ``weight``/``bias`` as transformers' ``mlp.router``.
* Expert (weights from the store, untangled to nn.Linear layout with biases):
  ``gate = x @ Wg.T + bg`` clamped above at ``limit``, ``up = x @ Wu.T + bu`` clamped to ``±limit``,
  ``h = (up + 1) * gate * sigmoid(alpha * gate)``, ``out = h @ Wd.T + bd``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ext.cpu import experts_accumulate, route_topk
from engine.formats.linear import linear
from engine.model.experts import ExpertWeights

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class GptOssRouter(nn.Module):
    """Top-k of biased router logits, softmax over the k chosen."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.dim() == 2 and hidden.shape[0] == 1 and hidden.dtype == torch.bfloat16:
            routed = route_topk(hidden, self.weight, self.bias, self.top_k, False, False, topk_first=True)
            if routed is not None:  # one decode token on the CPU: one native call
                return routed
        logits = F.linear(hidden, self.weight, self.bias)  # [T, E], hidden dtype
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        return weights.float(), ids


def clamped_swiglu(
    x: torch.Tensor, w: ExpertWeights, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    """One gpt-oss expert on tokens ``x [n, H]`` -> ``[n, H]``."""
    gate = linear(x, w.gate, w.gate_bias).clamp(max=limit)
    up = linear(x, w.up, w.up_bias).clamp(min=-limit, max=limit)
    return linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), w.down, w.down_bias)


def clamped_swiglu_expert(alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """``clamped_swiglu`` with these constants, as an ``MoEBlock`` expert function; its ``accumulate``
    runs one token through all its experts in one native call on the CPU (``cuda_ext.cpu.experts_accumulate``)."""

    def run(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        return clamped_swiglu(x, w, alpha, limit)

    def accumulate(
        x: torch.Tensor, experts: list[ExpertWeights], coefs: list[float], acc: torch.Tensor
    ) -> bool:
        return experts_accumulate(x, experts, coefs, acc, clamped=(alpha, limit))

    accumulate.clamped = (alpha, limit)  # type: ignore[attr-defined]  # for the native step (engine.model.native_step)
    run.accumulate = accumulate  # type: ignore[attr-defined]
    return run
