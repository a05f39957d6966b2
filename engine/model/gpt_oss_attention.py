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
    """q [T, H, D] over keys/values [Hkv, S, D] (S = ctx.end_pos) with per-head sinks [H] -> [T, H*D]."""
    T, H, D = q.shape
    Hkv = keys.shape[0]
    G = H // Hkv
    lo = 0
    if sliding_window is not None:
        lo = max(0, ctx.start_pos - sliding_window + 1)  # no query of this step sees keys below lo
    keys, values = keys[:, lo:], values[:, lo:]
    mask = ctx.mask(sliding_window)
    # query head h = kv_head * G + g reads key/value head kv_head
    qg = q.view(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D)
    scores = torch.bmm(qg, keys.transpose(1, 2)).view(Hkv, G, T, -1).float() * scaling  # [Hkv, G, T, S']
    if mask is not None:
        scores = scores.masked_fill(~mask[:, lo:], float("-inf"))
    sink = sinks.float().view(Hkv, G, 1, 1).expand(Hkv, G, T, 1)
    logits = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(values.dtype)
    out = torch.bmm(probs.reshape(Hkv, G * T, -1), values)  # [Hkv, G*T, D]
    return out.view(Hkv, G, T, -1).permute(2, 0, 1, 3).reshape(T, -1)
