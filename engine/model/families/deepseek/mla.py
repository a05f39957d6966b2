"""Multi-head latent attention (DeepSeek-V2/V3) with a static cache of the compressed latent.

Per token: ``q = q_b(norm(q_a(x)))`` (or ``q_proj(x)`` when ``q_lora_rank`` is None), split per head
into ``q_nope [qk_nope_head_dim]`` and ``q_rope [qk_rope_head_dim]``; ``kv_a_proj_with_mqa(x)`` gives
the latent ``c [kv_lora_rank]`` (RMS-normed) and one shared ``k_rope [qk_rope_head_dim]``. Keys are
``[k_nope, k_rope]`` and values ``v`` with ``[k_nope, v] = kv_b_proj(c)`` per head. Rotary is
applied to ``q_rope``/``k_rope`` only.

The cache holds only ``c`` and the roped ``k_rope`` (``kv_lora_rank + qk_rope_head_dim`` numbers a
token, shared by all heads). Attention runs in one of two exactly equivalent ways:

* expanded (long prompts): ``kv_b_proj`` is applied to every cached latent, then ordinary
  attention;
* absorbed (decode, short chunks): ``kv_b_proj``'s key half is folded into the query
  (``q_nope @ W_uk`` lives in latent space) and its value half applied after attention to the
  per-head latent mix, so nothing of size ``heads x positions`` is ever expanded.

One bf16 decode token on the CPU runs the absorbed path in one native call (``cuda_ext.mla``).

Rotary conventions: DeepSeek-V2, and V3 with ``rope_interleave`` (the default), rotate adjacent pairs
``(x[2i], x[2i+1])``; V3 without it rotates ``(x[i], x[i + d/2])``. ``cos``/``sin`` passed in are
``[T, d/2]`` tables for the tokens' positions, already multiplied by the rope's attention scaling.
Parameter names are transformers' (``self_attn.q_a_proj`` ...), so dense checkpoints load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ext import mla as native_mla
from cuda_ext.cpu import Linear, heads_product, threads
from engine.model.layers.context import BatchContext, StepContext
from engine.model.layers.norm import RMSNorm


@dataclass(frozen=True)
class MLAArgs:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    attention_bias: bool = False
    rope_interleave: bool = True
    rope_fp32: bool = False  # V2: rotate in float32 (its rotary tables are float32 too)
    latent_norm_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm use transformers' default eps


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, fp32: bool = False
) -> torch.Tensor:
    """Rotate ``x [..., T, d]`` by the angles of ``cos``/``sin [T, d/2]``.

    ``interleaved``: pairs ``(x[2i], x[2i+1])``, the result keeping the pair layout; otherwise pairs
    ``(x[i], x[i+d/2])``. ``fp32``: compute in float32 and cast back (transformers' V2 complex-number
    rope does); else in x's dtype (V3). Any fixed layout works as long as q and k share it.
    """
    dtype = x.dtype
    if fp32:
        x, cos, sin = x.float(), cos.float(), sin.float()
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)


class MultiHeadLatentAttention(nn.Module):
    """MLA for one decoder layer with its own static latent cache (one slot per sequence of a batch)."""

    def __init__(self, args: MLAArgs):
        super().__init__()
        a = self.args = args
        self.qk_head_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        self.max_seq_len = 0
        if a.q_lora_rank is None:
            self.q_proj = Linear(a.hidden_size, a.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, a.latent_norm_eps)
            self.q_b_proj = Linear(a.q_lora_rank, a.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(
            a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim, bias=a.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, a.latent_norm_eps)
        self.kv_b_proj = Linear(a.kv_lora_rank, a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = Linear(a.num_heads * a.v_head_dim, a.hidden_size, bias=a.attention_bias)
        for p in self.parameters():
            p.requires_grad_(False)
        self.cache_latent: torch.Tensor | None = None  # [slots, max_seq_len, kv_lora_rank]
        self.cache_k_rope: torch.Tensor | None = None  # [slots, max_seq_len, qk_rope_head_dim]
        # Chunks of at most this many tokens use the absorbed path (fewer flops than expanding).
        lat, nope, rope, v = a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.absorb_max_tokens = max(1, (lat * (nope + v)) // max(1, (2 * lat + rope) - (nope + rope + v)))
        self._plan: object = False  # the native decode's (cuda_ext.mla); False: not made yet, None: does not apply

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype, device: torch.device | str, slots: int = 1) -> None:
        """Allocate the latent cache for ``max_seq_len`` positions of ``slots`` sequences (replacing any earlier one)."""
        a = self.args
        self.max_seq_len = max_seq_len
        self.cache_latent = torch.zeros(slots, max_seq_len, a.kv_lora_rank, dtype=dtype, device=device)
        self.cache_k_rope = torch.zeros(slots, max_seq_len, a.qk_rope_head_dim, dtype=dtype, device=device)
        self._plan = False

    def _apply(self, fn, recurse=True):
        self._plan = False  # new tensors: describe them again
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, ctx: StepContext | BatchContext, absorb: bool | None = None) -> torch.Tensor:
        """Framework entry point: ``ctx`` carries each sequence's slot and ``start_pos`` and every row's
        rotary rows ``[T, rope_dim]`` (``cat(freqs, freqs)`` layout, of which the first half is used)."""
        assert ctx.cos is not None and ctx.sin is not None, "MLA needs the model's rotary rows"
        if (
            x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and isinstance(ctx, StepContext) and absorb is not False
        ):
            out = self._native_decode(x, ctx)  # one decode token: one native call (the absorbed path)
            if out is not None:
                return out
        half = self.args.qk_rope_head_dim // 2
        segments = [(a, b, step.slot, step.start_pos) for a, b, step in ctx.segments()]
        return self._attend(x, segments, ctx.cos[:, :half], ctx.sin[:, :half], absorb)

    def _native_decode(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """One bf16 token on the CPU in one native call (``cuda_ext.mla``), or None."""
        if self._plan is False:  # made at the first decode after setup_cache (or after .to())
            self._plan = native_mla.decode_plan(self)
        if self._plan is None or ctx.start_pos >= self.max_seq_len:
            return None
        return native_mla.decode(
            self._plan, x, ctx.cos, ctx.sin, ctx.slot, ctx.start_pos, threads(1 << 30)  # mla.c splits what is large
        )

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.args.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.args.num_heads, self.qk_head_dim).transpose(0, 1)  # [nH, T, qk]

    def attend(
        self,
        x: torch.Tensor,
        start_pos: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        absorb: bool | None = None,
        slot: int = 0,
    ) -> torch.Tensor:
        """``x [T, H]`` at positions ``start_pos..start_pos+T-1`` -> ``[T, H]``; writes the cache."""
        return self._attend(x, [(0, x.shape[0], slot, start_pos)], cos, sin, absorb)

    def _attend(
        self,
        x: torch.Tensor,
        segments: list[tuple[int, int, int, int]],
        cos: torch.Tensor,
        sin: torch.Tensor,
        absorb: bool | None,
    ) -> torch.Tensor:
        """Rows ``a..b-1`` of ``x [N, H]`` are one sequence in cache ``slot`` from ``start_pos``
        (``segments``: (a, b, slot, start_pos)); projections run on every row at once, attention per sequence."""
        a = self.args
        N = x.shape[0]
        assert self.cache_latent is not None and self.cache_k_rope is not None, "setup_cache() was not called"
        for r0, r1, _, start_pos in segments:
            if start_pos + r1 - r0 > self.max_seq_len:
                raise ValueError(f"positions up to {start_pos + r1 - r0} exceed the KV cache of {self.max_seq_len}")
        q = self._queries(x)
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, a.rope_interleave, a.rope_fp32)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rope(k_rope, cos, sin, a.rope_interleave, a.rope_fp32)
        outs = []
        for r0, r1, slot, start_pos in segments:
            end = start_pos + r1 - r0
            self.cache_latent[slot, start_pos:end] = latent[r0:r1]
            self.cache_k_rope[slot, start_pos:end] = k_rope[r0:r1]
            outs.append(
                self._core(
                    q_nope[:, r0:r1], q_rope[:, r0:r1], self.cache_latent[slot, :end], self.cache_k_rope[slot, :end],
                    start_pos, absorb,
                )
            )
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [nH, N, v]
        return self.o_proj(out.transpose(0, 1).reshape(N, a.num_heads * a.v_head_dim))

    def _core(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        c: torch.Tensor,
        k_r: torch.Tensor,
        start_pos: int,
        absorb: bool | None,
    ) -> torch.Tensor:
        """One sequence's attention: queries [nH, T, nope] / [nH, T, rope] over its cached latents
        c [S, lat] and roped keys k_r [S, rope] (S = start_pos + T) -> [nH, T, v]."""
        a = self.args
        T = q_nope.shape[1]
        end = start_pos + T
        dtype = c.dtype
        # causal mask: query i (position start_pos+i) sees keys 0..start_pos+i
        mask = None
        if T > 1:
            pos_q = torch.arange(start_pos, end, device=c.device)[:, None]
            mask = torch.arange(end, device=c.device)[None, :] <= pos_q  # [T, S]

        if absorb is None:
            absorb = T <= self.absorb_max_tokens
        w = self.kv_b_proj.weight.view(a.num_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        w_uk, w_uv = w[:, : a.qk_nope_head_dim], w[:, a.qk_nope_head_dim :]  # [nH, nope, lat], [nH, v, lat]
        if absorb:
            nHT = a.num_heads * T
            head_rows = a.qk_nope_head_dim + a.v_head_dim
            q_lat = None
            if T == 1:  # the same products on the strided weight views, without bmm's copies of them
                q_lat = heads_product(
                    q_nope[:, 0], self.kv_b_proj.weight, head_rows, 0, a.qk_nope_head_dim, True
                )
            if q_lat is None:
                q_lat = torch.bmm(q_nope, w_uk).reshape(nHT, -1)  # [nH*T, lat]: heads share the latent keys
            scores = torch.addmm(q_lat @ c.T, q_rope.reshape(nHT, -1), k_r.T)  # [nH*T, S]
            scores = scores.float().view(a.num_heads, T, end) * a.softmax_scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1).to(dtype).view(nHT, end)
            mixed = (probs @ c).view(a.num_heads, T, -1)  # [nH, T, lat]
            out = None
            if T == 1:
                out = heads_product(
                    mixed[:, 0], self.kv_b_proj.weight, head_rows, a.qk_nope_head_dim, a.v_head_dim, False
                )
                out = None if out is None else out[:, None]
            if out is None:
                out = torch.bmm(mixed, w_uv.transpose(1, 2))  # [nH, T, v]
            return out
        kv = F.linear(c, self.kv_b_proj.weight).view(end, a.num_heads, -1).transpose(0, 1)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)  # [nH, S, *]
        k = torch.cat((k_nope, k_r.unsqueeze(0).expand(a.num_heads, -1, -1)), dim=-1)
        qf = torch.cat((q_nope, q_rope), dim=-1)
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=a.softmax_scale)
