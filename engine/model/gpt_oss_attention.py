"""gpt-oss attention: grouped-query attention with learned per-head sinks and optional sliding window.

Projections (with biases), rotary (rotate-half convention, gpt-oss's yarn rope) and the static KV
cache are the framework's ``Attention``; what differs is the softmax: each head has a learned
logit ``sink`` that joins every query's softmax as one extra column and is then dropped, so a head
can put weight "nowhere" (``probs = softmax([scores, sink])[:-1]``). Sliding layers see only the last
``sliding_window`` positions (key ``j`` visible from query ``p`` when ``p - window < j <= p``); keys older
than every query's window are not read at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.attention import Attention
from engine.model.context import StepContext
from engine.model.rope import apply_rotary


class SinkAttention(Attention):
    """``Attention`` with gpt-oss's sinks (parameter ``sinks`` [num_heads])."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        sliding_window: int | None = None,
    ):
        super().__init__(
            hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias=bias, o_bias=bias, sliding_window=sliding_window
        )
        self.sinks = nn.Parameter(torch.zeros(num_heads))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        assert ctx.cos is not None and ctx.sin is not None, "gpt-oss attention needs the model's rotary rows"
        q = apply_rotary(q, ctx.cos, ctx.sin)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        assert self.kv_cache is not None, "setup_cache() was not called"
        keys, values = self.kv_cache.update(ctx.start_pos, k, v)
        out = attend_with_sinks(q, keys[0], values[0], ctx, self.scaling, self.sinks, self.sliding_window)
        return self.o_proj(out)


def attend_with_sinks(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    ctx: StepContext,
    scaling: float,
    sinks: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, H, D] over keys/values [Hkv, S, D] (S = ctx.end_pos) with per-head sinks [H] -> [T, H*D].

    The sink becomes one extra key that every query sees, with a zero value: queries get one more
    component holding their head's sink logit, real keys a zero there, the sink key ``1/scaling``
    there and zeros elsewhere, so its score is exactly the sink. Then one fused
    ``scaled_dot_product_attention`` (no [H, T, S] score tensor in memory); head dims are padded
    with zeros to a multiple of 8.
    """
    T, H, D = q.shape
    Hkv = keys.shape[0]
    lo = 0
    if sliding_window is not None:
        lo = max(0, ctx.start_pos - sliding_window + 1)  # no query of this step sees keys below lo
    S = keys.shape[1] - lo
    Dx = (D // 8 + 1) * 8  # room for the sink component
    qx = q.new_zeros(1, H, T, Dx)
    qx[0, :, :, :D] = q.transpose(0, 1)
    qx[0, :, :, D] = sinks.to(q.dtype)[:, None]
    kx = keys.new_zeros(1, Hkv, S + 1, Dx)
    kx[0, :, 0, D] = 1.0 / scaling
    kx[0, :, 1:, :D] = keys[:, lo:]
    vx = values.new_zeros(1, Hkv, S + 1, values.shape[-1])
    vx[0, :, 1:] = values[:, lo:]
    mask = ctx.mask(sliding_window)
    attn_mask = None
    if mask is not None:
        attn_mask = torch.ones(T, S + 1, dtype=torch.bool, device=q.device)
        attn_mask[:, 1:] = mask[:, lo:]
    out = F.scaled_dot_product_attention(qx, kx, vx, attn_mask=attn_mask, scale=scaling, enable_gqa=H != Hkv)
    return out[0].transpose(0, 1).reshape(T, -1)
