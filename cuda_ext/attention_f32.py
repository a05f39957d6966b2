"""One float32 decode token through a grouped-query attention layer whose q/k/v/o projections are kept in
block formats (a GGUF model's), in one native call (``csrc/cpu/attention_f32.c``).

``decode_plan(module)`` describes an ``engine.model.layers.attention.Attention`` once (each projection's
blocks and format, float32 biases, the float32 KV cache), or gives None where the call does not apply:
no native library, a projection that is not block-quantised, q/k norms over the whole projection
(OLMoE's; Qwen3's per-head norms are taken) or clip_qkv, a cache that is
not float32, a head wider than 512. ``decode(plan, x, cos, sin, slot, pos, threads)`` then runs the
layer for one float32 token: q/k/v (every block dequantised in registers to the values
``engine.formats`` unpacks, as ``cuda_ext.quant``'s float32 kernel; where ``cuda_ext.quant.int8_activations``
rounds a matrix's products, as "auto" does the k-quants' on decode, x or o quantised per block of 32 and
``quant.c``'s int8 rows, the same bits as ``engine.formats.linear`` there), rotary, the KV-cache write,
softmax attention over the visible positions, the output projection, all in float32; the result is
the torch path's up to the order of the float32 sums (``tests/test_cuda_ext_attention_f32.py``).
"""

from __future__ import annotations

import ctypes

import torch

from cuda_ext import loader
from cuda_ext.attention import DecodePlan, run_decode
from cuda_ext.blocks import BLOCKS
from cuda_ext.blocks import block_weight as _blocks
from cuda_ext.blocks import f32_cpu as _f32_cpu
from cuda_ext.quant import int8_active


class _Plan(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("max_seq", ctypes.c_int64),
        ("window", ctypes.c_int64),
        ("tq", ctypes.c_int64),
        ("tk", ctypes.c_int64),
        ("tv", ctypes.c_int64),
        ("to", ctypes.c_int64),
        ("wq", ctypes.c_void_p),
        ("wk", ctypes.c_void_p),
        ("wv", ctypes.c_void_p),
        ("wo", ctypes.c_void_p),
        ("bq", ctypes.c_void_p),
        ("bk", ctypes.c_void_p),
        ("bv", ctypes.c_void_p),
        ("bo", ctypes.c_void_p),
        ("scaling", ctypes.c_float),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("norm_eps", ctypes.c_float),
    ]


_NAMES = {b.ggml_type: name for name, b in BLOCKS.items()}


def int8_bits(plan: DecodePlan) -> int:
    """The call's int8 bits under the current ``cuda_ext.quant.int8_activations``: bit i set where the
    product of q, k, v, o (i = 0..3) takes int8 activations (as ``engine.formats.linear`` would for that
    matrix's format)."""
    s = plan.struct
    return sum(1 << i for i, t in enumerate((s.tq, s.tk, s.tv, s.to)) if int8_active(_NAMES.get(t)))


def decode_plan(module) -> DecodePlan | None:
    """The kernel's description of ``module`` (an ``Attention``), or None when the native path cannot run it."""
    if loader.cpu() is None or module.qk_norm not in (None, "head") or module.clip_qkv is not None:
        return None
    cache = module.kv_cache
    nh, nkv, D = module.num_heads, module.num_kv_heads, module.head_dim
    shape = getattr(module.q_proj.weight, "shape", None)
    if cache is None or shape is None or len(shape) != 2 or D > 512 or D % 2 or nh % nkv:
        return None
    H, nq, nk = int(shape[1]), nh * D, nkv * D
    dims = ((nq, H), (nk, H), (nk, H), (H, nq))
    projs = (module.q_proj, module.k_proj, module.v_proj, module.o_proj)
    found = [_blocks(p.weight, r, c) for p, (r, c) in zip(projs, dims, strict=True)]
    if any(f is None for f in found):
        return None
    biases = tuple(p.bias for p in projs)
    if not all(b is None or _f32_cpu(b, r) for b, (r, _) in zip(biases, dims, strict=True)):
        return None
    if not (_f32_cpu(cache.k) and _f32_cpu(cache.v) and cache.k.shape == cache.v.shape):
        return None
    if tuple(cache.k.shape[1:]) != (nkv, cache.max_seq_len, D):
        return None

    def ptr(t) -> int | None:
        return None if t is None else t.data_ptr()

    norms = (module.q_norm.weight, module.k_norm.weight) if module.qk_norm == "head" else (None, None)
    if not all(w is None or _f32_cpu(w, D) for w in norms):
        return None
    if module.qk_norm == "head" and module.q_norm.eps != module.k_norm.eps:
        return None
    struct = _Plan(
        H, nh, nkv, D, cache.max_seq_len, int(module.sliding_window or 0),
        *(f[0] for f in found),
        *(f[1].data_ptr() for f in found),
        *(ptr(b) for b in biases),
        float(module.scaling),
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        *(ptr(w) for w in norms),
        float(module.q_norm.eps) if module.qk_norm == "head" else 0.0,
    )
    key = tuple(id(p.weight) for p in projs) + tuple(ptr(b) for b in biases) + (cache.k.data_ptr(), cache.v.data_ptr())
    key += tuple(ptr(w) for w in norms)
    return DecodePlan(struct, tuple(f[1] for f in found) + biases + norms + (cache.k, cache.v), key)


def decode(
    plan: DecodePlan,
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    slot: int,
    pos: int,
    threads: int,
) -> torch.Tensor | None:
    """The layer's output [1, hidden] (float32) for one token x [1, hidden] at position ``pos`` of
    ``slot``; its k/v are written to the cache. cos/sin: the rotary rows [1, head_dim] (float32) or None.
    None when the call cannot be made (nothing is written then)."""
    s = plan.struct
    if not _f32_cpu(x, s.hidden) or not 0 <= pos < s.max_seq or not 0 <= slot < plan.tensors[-2].shape[0]:
        return None
    return run_decode(
        "moeinf_attn_decode_f32", plan, x, cos, sin, slot, pos, threads, _f32_cpu, torch.float32, int8_bits(plan)
    )
