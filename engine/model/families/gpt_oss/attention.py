"""gpt-oss attention: grouped-query attention with learned per-head sinks and optional sliding window.

Projections (with biases), rotary (rotate-half convention, gpt-oss's yarn rope) and the static KV
cache are the framework's ``Attention``; what differs is the softmax: each head has a learned
logit ``sink`` that joins every query's softmax as one extra column and is then dropped, so a head
can put weight "nowhere" (``probs = softmax([scores, sink])[:-1]``). Sliding layers see only the last
``sliding_window`` positions (key ``j`` visible from query ``p`` when ``p - window < j <= p``); keys older
than every query's window are not read at all.

The sink is computed as one extra key that every query sees, with a zero value, inside one fused
``scaled_dot_product_attention`` (no [heads, T, S] score tensor in memory): queries get one more
component holding their head's sink logit, real keys a zero there, and the sink key (slot 0 of the
cache) ``1/scaling`` there and zeros elsewhere, so its score is exactly the sink. Head dims are padded
with zeros to a multiple of 8; the cache is kept in that layout, so a step copies nothing but its own
keys (and, on sliding layers past the window, the window's rows).

One bf16 decode token on the CPU takes the native attention (``cuda_ext.attention``, which reads this
cache layout and adds the sink's score), as the base ``Attention`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.layers.attention import Attention
from engine.model.layers.context import BatchContext, StepContext
from engine.model.layers.rope import apply_rotary


def padded_dim(head_dim: int) -> int:
    """Head dim plus room for the sink component, rounded up to a multiple of 8."""
    return (head_dim // 8 + 1) * 8


class SinkKVCache(nn.Module):
    """Keys [slots, Hkv, 1 + max_seq_len, Dx] and values [slots, Hkv, 1 + max_seq_len, D], one slot per
    sequence; in each, row 0 holds the sink key (``1/scaling`` at component D) and a zero value,
    position p lives in row p + 1."""

    def __init__(
        self,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        scaling: float,
        dtype: torch.dtype,
        device: torch.device,
        slots: int = 1,
    ):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.head_dim = head_dim
        k = torch.zeros(slots, kv_heads, max_seq_len + 1, padded_dim(head_dim), dtype=dtype, device=device)
        k[:, :, 0, head_dim] = 1.0 / scaling
        self.register_buffer("k", k, persistent=False)
        self.register_buffer(
            "v", torch.zeros(slots, kv_heads, max_seq_len + 1, head_dim, dtype=dtype, device=device), persistent=False
        )

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0) -> None:
        """Store k/v [T, Hkv, D] at positions ``start_pos..start_pos+T-1`` of ``slot``."""
        end = start_pos + k.shape[0]
        if end > self.max_seq_len:
            raise ValueError(f"positions up to {end} exceed the KV cache of {self.max_seq_len}")
        self.k[slot, :, start_pos + 1 : end + 1, : self.head_dim] = k.transpose(0, 1)
        self.v[slot, :, start_pos + 1 : end + 1] = v.transpose(0, 1)

    def visible(self, lo: int, end: int, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink row followed by positions ``lo..end-1`` of ``slot``: keys [1, Hkv, 1+end-lo, Dx], values."""
        ks, vs = self.k[slot : slot + 1], self.v[slot : slot + 1]
        if lo == 0:
            return ks[:, :, : end + 1], vs[:, :, : end + 1]
        k = torch.cat((ks[:, :, :1], ks[:, :, lo + 1 : end + 1]), dim=2)
        v = torch.cat((vs[:, :, :1], vs[:, :, lo + 1 : end + 1]), dim=2)
        return k, v


class SinkAttention(Attention):
    """``Attention`` with gpt-oss's sinks (parameter ``sinks`` [num_heads]) and its own ``SinkKVCache``."""

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
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias=bias,
            o_bias=bias,
            sliding_window=sliding_window,
        )
        self.sinks = nn.Parameter(torch.zeros(num_heads))
        self.sink_cache: SinkKVCache | None = None

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype, device: torch.device, slots: int = 1) -> None:
        self.sink_cache = SinkKVCache(
            max_seq_len, self.num_kv_heads, self.head_dim, self.scaling, dtype, device, slots=slots
        )
        self._plan = False

    def forward(self, x: torch.Tensor, ctx: StepContext | BatchContext) -> torch.Tensor:
        T = x.shape[0]
        if T == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and isinstance(ctx, StepContext):
            out = self._native_decode(x, ctx)  # one decode token: one native call, sinks included
            if out is not None:
                return out
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        assert ctx.cos is not None and ctx.sin is not None, "gpt-oss attention needs the model's rotary rows"
        q = apply_rotary(q, ctx.cos, ctx.sin)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        assert self.sink_cache is not None, "setup_cache() was not called"
        outs = []
        for a, b, step in ctx.segments():  # one sequence (KV-cache slot) at a time
            self.sink_cache.update(step.start_pos, k[a:b], v[a:b], step.slot)
            outs.append(attend_with_sinks(q[a:b], self.sink_cache, step, self.scaling, self.sinks, self.sliding_window))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


def attend_with_sinks(
    q: torch.Tensor,
    cache: SinkKVCache,
    ctx: StepContext,
    scaling: float,
    sinks: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, H, D] over the cached positions ``0..ctx.end_pos-1`` plus the sink -> [T, H*D]."""
    T, H, D = q.shape
    lo = 0
    if sliding_window is not None:
        lo = max(0, ctx.start_pos - sliding_window + 1)  # no query of this step sees keys below lo
    keys, values = cache.visible(lo, ctx.end_pos, ctx.slot)
    qx = q.new_zeros(1, H, T, keys.shape[-1])
    qx[0, :, :, :D] = q.transpose(0, 1)
    qx[0, :, :, D] = sinks.to(q.dtype)[:, None]
    mask = ctx.mask(sliding_window)
    attn_mask = None
    if mask is not None:
        attn_mask = torch.ones(T, keys.shape[2], dtype=torch.bool, device=q.device)
        attn_mask[:, 1:] = mask[:, lo:]
    out = F.scaled_dot_product_attention(
        qx, keys, values, attn_mask=attn_mask, scale=scaling, enable_gqa=H != keys.shape[1]
    )
    return out[0].transpose(0, 1).reshape(T, -1)
