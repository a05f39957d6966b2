"""RMSNorm as the families here compute it (normalise in float32, scale in the input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from cuda_ext.cpu import rms_norm


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``; statistics in float32, result in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            out = rms_norm(x, self.weight, self.eps)  # one decode token: one native call
            if out is not None:
                return out
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
