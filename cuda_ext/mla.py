"""One decode token through DeepSeek's multi-head latent attention in one native call (``csrc/cpu/mla.c``).

``decode_plan(module)`` describes an ``engine.model.families.deepseek.mla.MultiHeadLatentAttention`` to
the kernel once (its projections, the two latent norms, the latent and rope-key caches): a ctypes
struct of pointers, made again after ``setup_cache`` and ``.to()``. ``decode(plan, x, cos, sin, slot,
pos, threads)`` runs the layer for one bf16 token as the module's absorbed path does: the query and
latent projections, the norms, the bf16 rotary, the cache write, the key half of ``kv_b_proj`` folded
into the query, softmax attention over the latents, the value half, ``o_proj``. The result equals the
torch path's within bf16 rounding (``tests/test_cuda_ext_mla.py``: the torch path sums its matrix
products in other orders). None where the native path does not apply: no native library, not bf16 on
the CPU, V2's float32 rotary, non-contiguous or block-quantised weights.
"""

from __future__ import annotations

import ctypes

import torch

from cuda_ext import loader
from cuda_ext.attention import DecodePlan
from cuda_ext.blocks import bf16_cpu as _bf16_cpu


class _Plan(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("q_rank", ctypes.c_int64),
        ("kv_rank", ctypes.c_int64),
        ("nope", ctypes.c_int64),
        ("rope", ctypes.c_int64),
        ("v", ctypes.c_int64),
        ("max_seq", ctypes.c_int64),
        ("interleave", ctypes.c_int64),
        ("wq", ctypes.c_void_p),
        ("wqa", ctypes.c_void_p),
        ("bqa", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("wqb", ctypes.c_void_p),
        ("wkva", ctypes.c_void_p),
        ("bkva", ctypes.c_void_p),
        ("kv_norm", ctypes.c_void_p),
        ("wkvb", ctypes.c_void_p),
        ("wo", ctypes.c_void_p),
        ("bo", ctypes.c_void_p),
        ("q_eps", ctypes.c_float),
        ("kv_eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("latent", ctypes.c_void_p),
        ("k_rope", ctypes.c_void_p),
    ]


def decode_plan(module) -> DecodePlan | None:
    """The kernel's description of ``module`` (a ``MultiHeadLatentAttention``), or None when the native
    path cannot run it."""
    if loader.cpu() is None:
        return None
    a = module.args
    H, nh, L, R = a.hidden_size, a.num_heads, a.kv_lora_rank, a.qk_rope_head_dim
    nope, v, QR = a.qk_nope_head_dim, a.v_head_dim, a.q_lora_rank or 0
    qk = nope + R
    c, kr = module.cache_latent, module.cache_k_rope
    if a.rope_fp32 or R % 2 or c is None or kr is None:
        return None
    if not (_bf16_cpu(c) and _bf16_cpu(kr) and c.dim() == 3 and c.shape[1:] == (module.max_seq_len, L)):
        return None
    if kr.shape != (c.shape[0], module.max_seq_len, R):
        return None
    mats = [
        (module.kv_a_proj_with_mqa.weight, (L + R) * H),
        (module.kv_a_layernorm.weight, L),
        (module.kv_b_proj.weight, nh * (nope + v) * L),
        (module.o_proj.weight, H * nh * v),
    ]
    biases = [(module.kv_a_proj_with_mqa.bias, L + R), (module.o_proj.bias, H)]
    if QR:
        mats += [(module.q_a_proj.weight, QR * H), (module.q_a_layernorm.weight, QR),
                 (module.q_b_proj.weight, nh * qk * QR)]
        biases.append((module.q_a_proj.bias, QR))
    else:
        mats.append((module.q_proj.weight, nh * qk * H))
    if not all(_bf16_cpu(w, n) for w, n in mats) or not all(b is None or _bf16_cpu(b, n) for b, n in biases):
        return None

    def ptr(t) -> int | None:
        return None if t is None else t.data_ptr()

    struct = _Plan(
        H, nh, QR, L, nope, R, v, module.max_seq_len, int(a.rope_interleave),
        None if QR else ptr(module.q_proj.weight),
        ptr(module.q_a_proj.weight) if QR else None,
        ptr(module.q_a_proj.bias) if QR else None,
        ptr(module.q_a_layernorm.weight) if QR else None,
        ptr(module.q_b_proj.weight) if QR else None,
        ptr(module.kv_a_proj_with_mqa.weight),
        ptr(module.kv_a_proj_with_mqa.bias),
        ptr(module.kv_a_layernorm.weight),
        ptr(module.kv_b_proj.weight),
        ptr(module.o_proj.weight),
        ptr(module.o_proj.bias),
        module.q_a_layernorm.eps if QR else 0.0,
        module.kv_a_layernorm.eps,
        float(a.softmax_scale),
        c.data_ptr(),
        kr.data_ptr(),
    )
    return DecodePlan(struct, tuple(w for w, _ in mats) + tuple(b for b, _ in biases) + (c, kr))


def decode(
    plan: DecodePlan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: int, pos: int, threads: int
) -> torch.Tensor | None:
    """The layer's output [1, hidden] (bf16) for one token x [1, hidden] at position ``pos`` of ``slot``;
    its latent and rope key are written to the caches. cos/sin: the rotary rows [1, rope dim] (bf16, of
    which the first half is used). None when the call cannot be made (nothing is written then)."""
    s = plan.struct
    if not _bf16_cpu(x, s.hidden) or not 0 <= pos < s.max_seq:
        return None
    if not (_bf16_cpu(cos) and _bf16_cpu(sin) and cos.numel() >= s.rope // 2 and sin.numel() >= s.rope // 2):
        return None
    lib = loader.cpu()
    if lib is None:
        return None
    out = torch.empty(1, s.hidden, dtype=torch.bfloat16)
    err = lib.lib.moeinf_mla_decode(
        plan.address, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot, pos, out.data_ptr(), threads
    )
    return out if err == 0 else None
