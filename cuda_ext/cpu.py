"""Native bf16 matrix-vector products for CPU decode, with ``F.linear`` as the fallback.

One token at a time, every weight matrix is read once per step and ``F.linear`` on bf16 is the
bottleneck: on the machines measured here (AMD EPYC, AVX-512 BF16) oneDNN's M=1 path reads expert
and LM-head matrices at 1-8 GB/s. ``csrc/cpu/bf16.c`` holds row-blocked dot-product loops (AVX-512
BF16 dot products over sixteen rows at a time with the next block prefetched, where the CPU has them;
auto-vectorised C elsewhere), float32 accumulation, round-to-nearest-even to bf16 exactly where torch
rounds. ``cuda_ext.loader`` builds and loads it; calls go through ctypes (which releases the GIL).
Rows are split over ``torch.get_num_threads()`` threads: the caller and a small pool of persistent
workers (``csrc/cpu/pool.c``) that spin briefly between calls and then sleep.

* ``linear(x, weight, bias)``: the kernel for x [1, K] bf16 on the CPU with a contiguous bf16 weight,
  ``F.linear`` for everything else (prefill, float32, CUDA) and whenever no compiler is available or
  ``MOEINF_NATIVE_KERNELS=0``. ``Linear`` is an ``nn.Linear`` whose forward does that.
* ``linear_many(x, weights, biases)``: several products of one x (q/k/v) in one native call.
* ``rms_norm(x, weight, eps)`` and ``route_topk(x, weight, bias, k, ...)``: a decode token's RMSNorm and
  softmax top-k router, one native call each (PyTorch runs them as several small kernels).
* ``experts_accumulate(x, experts, coefs, acc)``: a token's routed SwiGLU experts (gate, up, SiLU,
  product, down, routing weight, float32 accumulation), bf16 or in a block format, all in one native
  call with the roundings of the torch path (bf16 x; or float32 x on block formats, nothing rounded);
  ``swiglu_accumulate`` for one expert.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ext import loader
from cuda_ext.blocks import bf16_cpu, block_weight, f32_cpu

# products of fewer elements than this run on the calling thread alone (waking a worker costs more)
_SPLIT_MIN = 1 << 16
_MAX_EXPERTS = 32  # moe.c's MAX_EXPERTS
_state: dict[str, object] = {}


def _native() -> ctypes.CDLL | None:
    found = loader.cpu()
    return None if found is None else found.lib


def _native_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        isinstance(weight, torch.Tensor)
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] == x.shape[1]
        and weight.is_contiguous()
    )


def _bias_ok(bias: torch.Tensor | None, n: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    return bias is None or (
        bias.dtype == dtype and bias.device.type == "cpu" and bias.is_contiguous() and bias.numel() == n
    )


def threads(elements: int) -> int:
    """Threads for a product of ``elements`` weights: the pool's share while decoding, else torch's count."""
    if elements < _SPLIT_MIN:
        return 1
    pool = _state.get("pool_threads")
    return pool if isinstance(pool, int) else torch.get_num_threads()


@contextlib.contextmanager
def decode_threads(active: bool = True):
    """While one token is decoded on the CPU: torch's own (small) ops on one thread, and torch's thread
    count given to the kernels' pool instead. Both at once oversubscribe the cores (OpenMP's workers
    and the pool's spin between calls): a decode step ran ~2x slower that way on 2 cores."""
    count = torch.get_num_threads()
    if not active or count <= 1 or _native() is None or "pool_threads" in _state:
        yield
        return
    _state["pool_threads"] = count
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(count)
        del _state["pool_threads"]


def linear_many(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """``[linear(x, w, b) for w, b in zip(weights, biases)]``, in one native call when it applies."""
    biases = biases if biases is not None else [None] * len(weights)
    lib = _native()
    if lib is None or not all(
        _native_ok(x, w) and _bias_ok(b, w.shape[0]) for w, b in zip(weights, biases, strict=True)
    ):
        return [linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    x = x.contiguous()
    count = len(weights)
    outs = [torch.empty(1, w.shape[0], dtype=torch.bfloat16) for w in weights]
    ptrs = (ctypes.c_void_p * (3 * count))(
        *(w.data_ptr() for w in weights),
        *(b.data_ptr() if b is not None else None for b in biases),
        *(o.data_ptr() for o in outs),
    )
    ns = (ctypes.c_int64 * count)(*(w.shape[0] for w in weights))
    base = ctypes.addressof(ptrs)
    size = ctypes.sizeof(ctypes.c_void_p) * count
    elements = sum(w.numel() for w in weights)
    lib.moeinf_gemv_many(
        x.data_ptr(),
        x.shape[1],
        count,
        base,
        base + size,
        base + 2 * size,
        ctypes.addressof(ns),
        threads(elements),
    )
    return outs


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with the native kernel for one bf16 row on the CPU. A weight that is not a tensor
    (a block-quantised ``engine.formats.QuantTensor``) computes itself: ``weight.linear(x, bias)``."""
    if not isinstance(weight, torch.Tensor):
        return weight.linear(x, bias)
    if _native_ok(x, weight) and _bias_ok(bias, weight.shape[0]):
        lib = _native()
        if lib is not None:
            x = x.contiguous()
            n, k = weight.shape
            out = torch.empty(1, n, dtype=torch.bfloat16)
            ptrs = (ctypes.c_void_p * 3)(
                weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr()
            )
            base = ctypes.addressof(ptrs)
            step = ctypes.sizeof(ctypes.c_void_p)
            rows = ctypes.c_int64(n)  # kept alive across the call (a temporary's address would dangle)
            lib.moeinf_gemv_many(
                x.data_ptr(),
                k,
                1,
                base,
                base + step,
                base + 2 * step,
                ctypes.addressof(rows),
                threads(n * k),
            )
            return out
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_f32: bool = False) -> torch.Tensor | None:
    """RMSNorm of one bf16 or float32 row x [1, H] on the CPU (``engine.model.layers.norm.RMSNorm``'s
    roundings; with ``weight_f32``, bf16 only, gpt-oss's: the weight applied before the one rounding) in
    one native call (``csrc/cpu/decode.c``), or None where that does not apply."""
    lib = _native()
    if lib is None or x.dim() != 2 or x.shape[0] != 1 or x.device.type != "cpu":
        return None
    if x.dtype == torch.float32 and not weight_f32:
        if not _bias_ok(weight, x.shape[1], torch.float32):
            return None
        fn = lib.moeinf_rms_norm_f32
    elif _native_ok(x, x) and _bias_ok(weight, x.shape[1]):
        fn = lib.moeinf_rms_norm_f32w if weight_f32 else lib.moeinf_rms_norm
    else:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    fn(x.data_ptr(), weight.data_ptr(), x.shape[1], eps, out.data_ptr())
    return out


def route_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    renormalize: bool,
    bf16: bool,
    topk_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A softmax top-k router for one bf16 token x [1, H] (``engine.model.layers.router``): logits
    bf16(W x + b), softmax in float32, the k largest (descending), renormalised when asked, as float32 or
    bf16 weights [1, k] and int64 ids [1, k], in one native call; None where that does not apply.
    ``topk_first`` (gpt-oss): the k largest logits, then their softmax rounded to bf16, as float32."""
    lib = _native()
    if lib is None or not (_native_ok(x, weight) and _bias_ok(bias, weight.shape[0])):
        return None
    x = x.contiguous()
    ids = torch.empty(1, k, dtype=torch.int64)
    bf16 = bf16 and not topk_first
    weights = torch.empty(1, k, dtype=torch.bfloat16 if bf16 else torch.float32)
    n, h = weight.shape
    err = lib.moeinf_route(
        x.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        n,
        h,
        k,
        int(renormalize),
        int(topk_first),
        ids.data_ptr(),
        weights.data_ptr(),
        int(bf16),
        threads(n * h),
    )
    return None if err else (weights, ids)


def route_topk_f32(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``route_topk`` for one float32 token x [1, H] and a float32 router matrix [E, H] (a float32 model's
    router): float32 logits (the kernel's order of the sums), softmax, the k largest, renormalised when
    asked; float32 weights [1, k] and int64 ids [1, k] in one native call, None where that does not apply."""
    lib = _native()
    if (
        lib is None
        or x.dim() != 2
        or x.shape[0] != 1
        or not f32_cpu(x)
        or not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or weight.shape[1] != x.shape[1]
        or not f32_cpu(weight)
        or not _bias_ok(bias, weight.shape[0], torch.float32)
    ):
        return None
    ids = torch.empty(1, k, dtype=torch.int64)
    weights = torch.empty(1, k, dtype=torch.float32)
    n, h = weight.shape
    err = lib.moeinf_route_f32(
        x.contiguous().data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        n,
        h,
        k,
        int(renormalize),
        ids.data_ptr(),
        weights.data_ptr(),
    )
    return None if err else (weights, ids)


def route_v3(
    x: torch.Tensor,
    weight: torch.Tensor,
    correction: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V3's sigmoid group-limited router for one bf16 token x [1, H] (float32 logits of the bf16
    router matrix, ``correction`` [E] float32 for the choice only): float32 weights [1, k] and int64 ids
    [1, k] in one native call (``csrc/cpu/decode.c``), None where that does not apply."""
    lib = _native()
    if (
        lib is None
        or not _native_ok(x, weight)
        or correction.dtype != torch.float32
        or correction.device.type != "cpu"
        or not correction.is_contiguous()
        or correction.numel() != weight.shape[0]
    ):
        return None
    x = x.contiguous()
    ids = torch.empty(1, k, dtype=torch.int64)
    weights = torch.empty(1, k, dtype=torch.float32)
    n, h = weight.shape
    err = lib.moeinf_route_v3_mt(  # the logits' rows over the pool; the result does not depend on the count
        x.data_ptr(), weight.data_ptr(), correction.data_ptr(), n, h, k, n_group, topk_group,
        int(renormalize), scale, ids.data_ptr(), weights.data_ptr(), threads(n * h),
    )
    return None if err else (weights, ids)


def _expert_matrix(t, rows: int, cols: int) -> tuple[int, int] | None:
    """(GGUF type or 0 for bf16, data pointer) of one expert matrix [rows, cols] the native path takes."""
    if isinstance(t, torch.Tensor):
        return (0, t.data_ptr()) if bf16_cpu(t) and t.shape == (rows, cols) else None
    found = block_weight(t, rows, cols)  # a QuantTensor
    return None if found is None else (found[0], found[1].data_ptr())


def _expert_entry(w, f32: bool) -> tuple | None:
    """(type, I, H, gate, up, down, gate bias, up bias, down bias pointers) of one ``ExpertWeights`` for
    the native experts call, or None where it does not apply. Checked once per expert object and kept on
    it (a hit's call then costs a lookup), redone if any of its tensors is replaced."""
    tensors = (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)
    cached = w.__dict__.get("_native_entry")
    if cached is not None and cached[0] == f32 and all(a is b for a, b in zip(cached[1], tensors, strict=True)):
        return cached[2]
    entry = None
    shape = tuple(w.gate.shape)
    if len(shape) == 2:
        i, h = shape
        mats = (_expert_matrix(w.gate, i, h), _expert_matrix(w.up, i, h), _expert_matrix(w.down, h, i))
        bias_dtype = torch.float32 if f32 else torch.bfloat16
        types = {m[0] for m in mats if m is not None}
        # float32 x: the down matrices may be in a format of their own (moe.c: its type in the second byte)
        mixed = f32 and None not in mats and mats[0][0] == mats[1][0] != mats[2][0] and 0 not in types
        if (
            None not in mats
            and (len(types) == 1 or mixed)
            and not (f32 and 0 in types)  # float32 x: block formats only
            and _bias_ok(w.gate_bias, i, bias_dtype)
            and _bias_ok(w.up_bias, i, bias_dtype)
            and _bias_ok(w.down_bias, h, bias_dtype)
        ):
            biases = tuple(None if b is None else b.data_ptr() for b in tensors[3:])
            kind = mats[0][0] | (mats[2][0] << 8) if mixed else types.pop()
            entry = (kind, i, h, *(m[1] for m in mats), *biases)
    w.__dict__["_native_entry"] = (f32, tensors, entry)
    return entry


def experts_accumulate(
    x: torch.Tensor,
    experts: list,
    coefs: list[float],
    acc: torch.Tensor,
    clamped: tuple[float, float] | None = None,
) -> bool:
    """``acc += sum_e (down_e(silu(gate_e(x)) * up_e(x)) * coefs[e])`` for one token and its routed
    experts (``ExpertWeights``: bf16 tensors, or block-format ``QuantTensor``s all of one format; with float32 x
    the down matrices may be in another), in
    one native call (``csrc/cpu/moe.c``: every expert back to back in the pool), added in the order
    given; acc [1, H] float32 contiguous. x [1, H] bf16: rounded to bf16 where the torch path rounds
    (block formats: the activations quantised to int8 per block, as ``cuda_ext.quant``; where every
    row is short, as many small experts' are, x and h instead meet the blocks unrounded in the float32
    rows, within that bound). x float32
    (block formats only, float32 biases): everything in float32, each block dequantised in registers
    to the values the torch path multiplies, no activation rounded; under
    ``cuda_ext.quant.int8_activations(True)`` (``activations="int8"``; "auto" on the gate's format in
    ``cuda_ext.quant.AUTO_INT8_FORMATS``) x and h rounded to int8 per block of 32 instead (``quant.c``'s rows). False (and acc untouched) when the native path does not apply.
    ``clamped=(alpha, limit)``: gpt-oss's clamped SwiGLU instead (``gpt_oss_moe.clamped_swiglu``)."""
    lib = _native()
    k = len(experts)
    if (
        lib is None
        or not 1 <= k <= _MAX_EXPERTS
        or x.dim() != 2
        or x.shape[0] != 1
        or x.dtype not in (torch.bfloat16, torch.float32)
        or x.device.type != "cpu"
        or acc.dtype != torch.float32
        or not acc.is_contiguous()
        or acc.device.type != "cpu"
        or acc.numel() != x.shape[1]
    ):
        return False
    h = x.shape[1]
    entries = [_expert_entry(w, x.dtype == torch.float32) for w in experts]
    first = entries[0]
    if first is None or any(e is None or e[:3] != first[:3] for e in entries) or first[2] != h:
        return False
    f32 = x.dtype == torch.float32
    i = first[1]
    table = (ctypes.c_void_p * (6 * k))(*(e[m] for m in range(3, 9) for e in entries))
    c = (ctypes.c_float * k)(*coefs)
    base, step = ctypes.addressof(table), ctypes.sizeof(ctypes.c_void_p) * k
    if f32:
        from cuda_ext.quant import int8_active

        fmt = getattr(getattr(experts[0].gate, "format", None), "name", None)
        fn = lib.moeinf_experts_acc_f32_int8 if int8_active(fmt) else lib.moeinf_experts_acc_f32
    else:
        fn = lib.moeinf_experts_acc
    err = fn(
        x.contiguous().data_ptr(),
        k,
        *(base + m * step for m in range(6)),
        c,
        first[0],
        h,
        i,
        0 if clamped is None else 1,
        0.0 if clamped is None else clamped[0],
        0.0 if clamped is None else clamped[1],
        acc.data_ptr(),
        threads(3 * i * h),  # as one expert decides: a small job split over cores costs more than it saves
    )
    return err == 0


def swiglu_accumulate(
    x: torch.Tensor, w, coef: float, acc: torch.Tensor, clamped: tuple[float, float] | None = None
) -> bool:
    """``experts_accumulate`` for one expert ``w``."""
    return experts_accumulate(x, [w], [coef], acc, clamped)


def heads_product(
    x: torch.Tensor, weight: torch.Tensor, head_rows: int, row0: int, n_rows: int, transposed: bool
):
    """Per-head products with row blocks of one bf16 matrix ``weight`` [heads * head_rows, K], for one token.

    Head h's block is ``B_h = weight[h * head_rows + row0 : h * head_rows + row0 + n_rows]`` ([n_rows, K]).
    ``transposed``: x [heads, n_rows] -> ``x[h] @ B_h`` [heads, K]; else x [heads, K] -> ``B_h @ x[h]``
    [heads, n_rows]. That is ``torch.bmm`` over strided views of ``weight`` (MLA's absorbed decode)
    without copying them. None when the native path does not apply (the caller uses torch)."""
    lib = _native()
    heads = x.shape[0]
    k = weight.shape[1] if weight.dim() == 2 else -1
    if (
        lib is None
        or x.dim() != 2
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or not weight.is_contiguous()
        or weight.dim() != 2
        or weight.shape[0] != heads * head_rows
        or row0 < 0
        or row0 + n_rows > head_rows
        or x.shape[1] != (n_rows if transposed else k)
    ):
        return None
    x = x.contiguous()
    out = torch.empty(heads, k if transposed else n_rows, dtype=torch.bfloat16)
    fn = lib.moeinf_heads_xtw if transposed else lib.moeinf_heads_wx
    fn(
        x.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        heads,
        head_rows,
        row0,
        n_rows,
        k,
        threads(heads * n_rows * k),
    )
    return out


def read_bandwidth(buffer: torch.Tensor, threads: int, repeats: int = 3) -> float:
    """Bytes per second the kernels' pool reads from ``buffer`` (a CPU tensor larger than the caches)
    on ``threads`` threads, the best of ``repeats`` passes; the bound decode benchmarks compare with.
    Falls back to ``torch.sum`` on torch's threads without the native kernels."""
    import time

    lib = _native()
    data = buffer.contiguous().view(torch.uint8).view(-1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if lib is not None:
            lib.moeinf_read_bytes(data.data_ptr(), data.numel(), threads)
        else:
            data.view(torch.int64)[: data.numel() // 8].sum()
        best = min(best, time.perf_counter() - t0)
    return data.numel() / best


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose forward goes through ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
