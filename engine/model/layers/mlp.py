"""Dense gated MLP (``down(act(gate(x)) * up(x))``): dense layers and shared experts."""

from __future__ import annotations

import torch
from torch import nn

from cuda_ext.cpu import Linear, swiglu_accumulate
from cuda_ext.quant import qgemm_swiglu
from engine.model.experts import ExpertWeights
from engine.model.layers.activations import activation


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)
        self.native_swiglu = act in ("silu", "swish")
        self._weights: ExpertWeights | None = None

    def _expert_weights(self) -> ExpertWeights:
        """The three projections as one ``ExpertWeights``, kept while they are the same tensors: the
        native call's checks are cached on that object (``cuda_ext.cpu._expert_entry``), so a kept
        one costs a lookup per token instead of the checks."""
        tensors = (
            self.gate_proj.weight,
            self.up_proj.weight,
            self.down_proj.weight,
            self.gate_proj.bias,
            self.up_proj.bias,
            self.down_proj.bias,
        )
        w = self._weights
        if w is None or not all(
            a is b
            for a, b in zip((w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias), tensors, strict=True)
        ):
            w = self._weights = ExpertWeights(*tensors)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_swiglu and x.shape[0] == 1:
            # one token: the whole MLP in one native call (same roundings; acc + y is exact from 0)
            w = self._expert_weights()
            acc = torch.zeros(x.shape, dtype=torch.float32)
            if swiglu_accumulate(x, w, 1.0, acc):
                return acc.to(x.dtype)
        if self.native_swiglu and x.dtype == torch.float32 and self.gate_proj.bias is None and x.dim() == 2:
            h = qgemm_swiglu(x, self.gate_proj.weight, self.up_proj.weight)  # an int8 prompt: one call
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
