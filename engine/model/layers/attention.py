"""Grouped-query attention over a static KV cache (Mixtral, Qwen2/3-MoE, OLMoE, Llama).

Options cover the families here: q/k/v and output biases; q/k RMSNorm per head (Qwen3) or over the
whole projection (OLMoE); OLMoE's ``clip_qkv``; a sliding window. The module reads positions and
rotary rows from the ``StepContext`` and keeps its own ``KVCache`` (made by ``setup_cache``).

Any module with the same two methods (``setup_cache(max_seq_len, dtype, device, slots=1)`` and
``forward(x [T, hidden], ctx) -> [T, hidden]``, ctx a ``StepContext`` or a ``BatchContext`` of several
sequences) can stand in for it (MLA, attention with sinks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ext import attention as native_attention
from cuda_ext import attention_f32 as native_attention_f32
from cuda_ext.cpu import Linear, linear_many, threads
from engine.model.layers.context import BatchContext, StepContext
from engine.model.layers.kv_cache import KVCache
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rope import apply_rotary


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        clip_qkv: float | None = None,
        sliding_window: int | None = None,
        scaling: float | None = None,
    ):
        """``qk_norm``: None, ``"head"`` (RMSNorm over head_dim, Qwen3) or ``"proj"`` (RMSNorm over
        the whole q / k projection before splitting heads, OLMoE)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling if scaling is not None else head_dim**-0.5
        self.sliding_window = sliding_window or None
        self.clip_qkv = clip_qkv
        self.qk_norm = qk_norm
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)
        elif qk_norm == "proj":
            self.q_norm = RMSNorm(num_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(num_kv_heads * head_dim, norm_eps)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'head' or 'proj', not {qk_norm!r}")
        self.kv_cache: KVCache | None = None
        self._plan: native_attention.DecodePlan | None | bool = False  # False: not made yet
        self._plan_f32: native_attention_f32.DecodePlan | None | bool = False  # float32 on block formats

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype, device: torch.device, slots: int = 1) -> None:
        self.kv_cache = KVCache(max_seq_len, self.num_kv_heads, self.head_dim, dtype, device, slots=slots)
        self._plan = self._plan_f32 = False

    def _apply(self, fn, recurse=True):
        self._plan = self._plan_f32 = False  # new tensors: describe them again
        return super()._apply(fn, recurse)

    def _native_decode(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """One bf16 token on the CPU in one native call (``cuda_ext.attention``), or None."""
        plan = self._plan
        if plan is False:  # made at the first decode after setup_cache (or after .to(): _apply)
            plan = self._plan = native_attention.decode_plan(self)
        if plan is None:
            return None
        return native_attention.decode(
            plan, x, ctx.cos, ctx.sin, ctx.slot, ctx.start_pos, threads(self.q_proj.weight.numel())
        )

    def _native_decode_f32(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """One float32 token on the CPU with block-format projections (a GGUF model's) in one native
        call (``cuda_ext.attention_f32``), or None."""
        plan = self._plan_f32
        if plan is False:
            plan = self._plan_f32 = native_attention_f32.decode_plan(self)
        if plan is None:
            return None
        return native_attention_f32.decode(
            plan, x, ctx.cos, ctx.sin, ctx.slot, ctx.start_pos, threads(1 << 30)
        )

    def forward(self, x: torch.Tensor, ctx: StepContext | BatchContext) -> torch.Tensor:
        T = x.shape[0]
        if T == 1 and x.device.type == "cpu" and isinstance(ctx, StepContext):
            if x.dtype == torch.bfloat16:
                out = self._native_decode(x, ctx)
            elif x.dtype == torch.float32:
                out = self._native_decode_f32(x, ctx)
            else:
                out = None
            if out is not None:
                return out
        q, k, v = linear_many(  # one native call for one token on the CPU
            x,
            [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight],
            [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias],
        )
        if self.qk_norm == "proj":
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.clip_qkv is not None:
            q = q.clamp(-self.clip_qkv, self.clip_qkv)
            k = k.clamp(-self.clip_qkv, self.clip_qkv)
            v = v.clamp(-self.clip_qkv, self.clip_qkv)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q = self.q_norm(q)
            k = self.k_norm(k)
        if ctx.cos is not None and ctx.sin is not None:
            q = apply_rotary(q, ctx.cos, ctx.sin)
            k = apply_rotary(k, ctx.cos, ctx.sin)
        assert self.kv_cache is not None, "setup_cache() was not called"
        outs = []
        for a, b, step in ctx.segments():  # one sequence (KV-cache slot) at a time
            keys, values = self.kv_cache.update(step.start_pos, k[a:b], v[a:b], step.slot)
            outs.append(attend(q[a:b], keys, values, step, self.scaling, self.sliding_window))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    ctx: StepContext,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of q [T, H, D] over cached keys/values [1, Hkv, S, D(v)].

    Returns [T, H * Dv]. Query heads are grouped over key/value heads (GQA)."""
    T, H, D = q.shape
    Hkv = keys.shape[1]
    Dv = values.shape[-1]
    mask = ctx.mask(sliding_window)
    if T == 1 and mask is None:
        # one new token sees the whole cache: fold the query-head groups into the query length
        # so each key/value head is read once, no mask and no repeat
        qg = q.view(Hkv, H // Hkv, D).unsqueeze(0)  # [1, Hkv, group, D]
        out = F.scaled_dot_product_attention(qg, keys, values, scale=scaling)  # [1, Hkv, group, Dv]
        return out.reshape(1, H * Dv)
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    if ctx.is_plain_causal_prefill(sliding_window):
        out = F.scaled_dot_product_attention(
            qh, keys, values, is_causal=True, scale=scaling, enable_gqa=H != Hkv
        )
    else:
        out = F.scaled_dot_product_attention(
            qh, keys, values, attn_mask=mask, scale=scaling, enable_gqa=H != Hkv
        )
    return out[0].transpose(0, 1).reshape(T, H * Dv)


def model_attention(args, **options) -> Attention:
    """``Attention`` with the model's hidden size, head counts and head size; ``options`` as
    ``Attention`` takes them (biases, q/k norm, window, ...)."""
    return Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, **options)
