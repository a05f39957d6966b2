"""One decode token through a grouped-query attention layer in one native call (``csrc/cpu/attention.c``).

``decode_plan(module)`` describes an ``engine.model.layers.attention.Attention`` to the kernel once (its
weights, biases, q/k norms, clip, window, KV cache; gpt-oss's ``SinkAttention``: its sinks and its
``SinkKVCache``, a sink row before position 0 and key rows padded past the head): a ctypes struct of pointers, which the module
makes again after ``setup_cache`` and after ``.to()`` (``plan_key`` says what it depends on). ``decode(plan, x, cos, sin, slot, pos)`` then runs the layer for
one bf16 token: q/k/v projections, q/k RMSNorm, clip, rotary, the KV-cache write, softmax attention
over the visible positions, the output projection; the result equals the torch path's within bf16
rounding (``tests/test_cuda_ext_attention.py``). None where the native path does not apply: no native
library, not bf16 on the CPU, block-quantised or non-contiguous weights, a head wider than 512.
"""

from __future__ import annotations

import ctypes

import torch

from cuda_ext import loader
from cuda_ext.blocks import bf16_cpu as _bf16_cpu


class _Plan(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("max_seq", ctypes.c_int64),
        ("window", ctypes.c_int64),
        ("wq", ctypes.c_void_p),
        ("wk", ctypes.c_void_p),
        ("wv", ctypes.c_void_p),
        ("wo", ctypes.c_void_p),
        ("bq", ctypes.c_void_p),
        ("bk", ctypes.c_void_p),
        ("bv", ctypes.c_void_p),
        ("bo", ctypes.c_void_p),
        ("qk_norm", ctypes.c_int64),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("norm_eps", ctypes.c_float),
        ("clip", ctypes.c_float),
        ("scaling", ctypes.c_float),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("k_row", ctypes.c_int64),
        ("v_row", ctypes.c_int64),
        ("row0", ctypes.c_int64),
        ("sinks", ctypes.c_void_p),
    ]


class DecodePlan:
    """The struct the kernel reads, the tensors it points into (kept alive), and the key it was made for."""

    def __init__(self, struct: ctypes.Structure, tensors: tuple, key: tuple = ()):
        self.struct = struct
        self.tensors = tensors
        self.key = key
        self.address = ctypes.addressof(struct)


def _cache(module):
    """The module's KV cache: gpt-oss's ``SinkKVCache`` (a sink row before position 0, keys padded) for a
    module with ``sinks``, else its ``KVCache``."""
    return module.sink_cache if getattr(module, "sinks", None) is not None else module.kv_cache


def plan_key(module) -> tuple:
    """What a plan depends on: every pointer it holds and the cache's shape."""
    cache = _cache(module)
    tensors = [
        module.q_proj.weight,
        module.k_proj.weight,
        module.v_proj.weight,
        module.o_proj.weight,
        module.q_proj.bias,
        module.k_proj.bias,
        module.v_proj.bias,
        module.o_proj.bias,
        getattr(module, "q_norm", None),
        getattr(module, "k_norm", None),
        getattr(module, "sinks", None),
    ]
    ptrs = tuple(
        None if t is None else (t.weight if isinstance(t, torch.nn.Module) else t).data_ptr() for t in tensors
    )
    return ptrs + (None if cache is None else (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape)),)


def decode_plan(module) -> DecodePlan | None:
    """The kernel's description of ``module`` (an ``Attention``), or None when the native path cannot run it."""
    if loader.cpu() is None:
        return None
    cache = _cache(module)
    H = module.q_proj.weight.shape[1] if isinstance(module.q_proj.weight, torch.Tensor) else None
    nh, nkv, D = module.num_heads, module.num_kv_heads, module.head_dim
    if cache is None or H is None or D > 512 or D % 2 or nh % nkv:
        return None
    nq, nk = nh * D, nkv * D
    weights = (module.q_proj.weight, module.k_proj.weight, module.v_proj.weight, module.o_proj.weight)
    if not all(_bf16_cpu(w, n) for w, n in zip(weights, (nq * H, nk * H, nk * H, H * nq), strict=True)):
        return None
    biases = (module.q_proj.bias, module.k_proj.bias, module.v_proj.bias, module.o_proj.bias)
    if not all(b is None or _bf16_cpu(b, n) for b, n in zip(biases, (nq, nk, nk, H), strict=True)):
        return None
    if not (_bf16_cpu(cache.k) and _bf16_cpu(cache.v) and cache.k.dim() == 4 and cache.v.dim() == 4):
        return None
    sinks = getattr(module, "sinks", None)
    row0 = 0 if sinks is None else 1
    rows = cache.max_seq_len + row0
    if cache.k.shape[:3] != cache.v.shape[:3] or tuple(cache.v.shape[1:]) != (nkv, rows, D):
        return None
    if cache.k.shape[-1] != D if sinks is None else cache.k.shape[-1] <= D:  # the sink's component: past D
        return None
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.numel() != nh or sinks.device.type != "cpu":
            return None
        sinks = sinks.detach().to(torch.bfloat16).contiguous()  # as the torch path rounds them
    mode = {None: 0, "head": 1, "proj": 2}[module.qk_norm]
    q_norm = getattr(module, "q_norm", None)
    k_norm = getattr(module, "k_norm", None)
    eps = 0.0
    if mode:
        sizes = (D, D) if mode == 1 else (nq, nk)
        if not (_bf16_cpu(q_norm.weight, sizes[0]) and _bf16_cpu(k_norm.weight, sizes[1])):
            return None
        if q_norm.eps != k_norm.eps:
            return None
        eps = q_norm.eps

    def ptr(t) -> int | None:
        return None if t is None else t.data_ptr()

    struct = _Plan(
        H,
        nh,
        nkv,
        D,
        cache.max_seq_len,
        int(module.sliding_window or 0),
        *(ptr(w) for w in weights),
        *(ptr(b) for b in biases),
        mode,
        ptr(q_norm.weight) if mode else None,
        ptr(k_norm.weight) if mode else None,
        eps,
        float(module.clip_qkv) if module.clip_qkv is not None else 0.0,
        float(module.scaling),
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        cache.k.shape[-1],
        D,
        row0,
        ptr(sinks),
    )
    return DecodePlan(struct, weights + biases + (cache.k, cache.v, sinks), plan_key(module))


def decode(
    plan: DecodePlan,
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    slot: int,
    pos: int,
    threads: int,
) -> torch.Tensor | None:
    """The layer's output [1, hidden] (bf16) for one token x [1, hidden] at position ``pos`` of ``slot``;
    its k/v are written to the cache. cos/sin: the rotary rows [1, head_dim] (bf16) or None. None when the
    call cannot be made (nothing is written then)."""
    s = plan.struct
    if not _bf16_cpu(x, s.hidden) or not 0 <= pos < s.max_seq:
        return None
    return run_decode("moeinf_attn_decode", plan, x, cos, sin, slot, pos, threads, _bf16_cpu, torch.bfloat16)


def run_decode(
    name: str,
    plan: DecodePlan,
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    slot: int,
    pos: int,
    threads: int,
    ok,
    dtype: torch.dtype,
    *extra: int,
) -> torch.Tensor | None:
    """The native decode call ``name`` of a plan (x already checked): the rotary rows checked with ``ok``
    (``blocks.bf16_cpu`` or ``f32_cpu``), the output [1, hidden] of ``dtype``; None when it cannot run."""
    s = plan.struct
    if cos is not None:
        if sin is None or not (ok(cos, s.head_dim) and ok(sin, s.head_dim)):
            return None
    lib = loader.cpu()
    if lib is None:
        return None
    out = torch.empty(1, s.hidden, dtype=dtype)
    err = getattr(lib.lib, name)(
        plan.address,
        x.data_ptr(),
        None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(),
        slot,
        pos,
        out.data_ptr(),
        threads,
        *extra,
    )
    return out if err == 0 else None
