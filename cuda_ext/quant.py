"""Products with weights in their stored block formats on the CPU, for decode and small batches, with
the PyTorch fallback left to the caller (None where the kernel does not apply).

* ``qlinear(x, blocks, fmt, k, bias)``: ``x @ W.T (+ bias)`` for x [M, K] (bf16 or float32, M <=
  ``MAX_TOKENS``, float32 up to ``max_tokens(torch.float32, fmt)``) and W [N, K] stored as ``blocks`` (uint8, N rows of ``row_bytes(fmt, K)`` bytes in
  the GGUF layout of ``fmt``: q8_0, q4_0, q4_1, q4_k, q5_k, q6_k, mxfp4). Rows are split over the thread
  pool (``torch.get_num_threads()`` threads, or the decode step's pool while
  ``cuda_ext.cpu.decode_threads`` holds them).

  bf16 x (``csrc/cpu/quant.c``): the activations are quantised to int8 per block of 32 (as llama.cpp
  does); the result differs from dequantise-then-multiply by at most ``sum_j |w_j| * d_x(j) / 2``
  (d_x: the activation block's scale, max|x| / 127), plus float32 rounding.

  float32 x (``csrc/cpu/quant_f32.c``): each block is dequantised in registers to exactly the values
  ``engine.formats`` unpacks, and multiplied with x in float32 FMAs; no activation is rounded, so the
  result is dequantise-then-multiply up to the order of the float32 sums (at most about
  ``(K / 64 + 7) * 2**-24 * sum_j |x_j w_j|``, and one rounding for the bias), the same bits for any
  number of tokens or threads.

* ``qgemm(x, blocks, fmt, k, bias)``: the same product for float32 x of any number of rows with int8
  activations (``csrc/cpu/qgemm.c``, llama.cpp's rounding): x quantised once per call to int8 per block
  (of 32 values; of 256 for q4_k and q6_k, as llama.cpp's Q8_K), tiles of 4 rows x 4 (or 3) tokens on
  the unpacked blocks, AVX-512 VNNI where the build has it. The error against dequantise-then-multiply
  is at most ``sum_j |w_j| * d_x(j) / 2`` (d_x(j): the scale max|x| / 127 of the activation block
  holding j) plus float32 rounding of the sums; fewer than ``QGEMM_MIN_TOKENS`` rows go through
  ``csrc/cpu/quant.c``'s row kernel instead (blocks of 32 for every format: the same bound).
  ``qgemm_swiglu(x, gate, up)``: a SwiGLU expert's ``silu(x Wg^T) * (x Wu^T)`` in one such call.

* ``int8_activations(mode)``: the switch the models set per forward (``engine.formats.linear`` and the
  experts read it): True rounds every product, "auto" those of ``AUTO_MIN_ROWS[format]`` rows or more,
  "kquants" those on the ``AUTO_INT8_FORMATS`` (q4_k, q5_k, q6_k: rounded by "auto" on decode too).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from cuda_ext import cpu, loader
from cuda_ext.blocks import BLOCKS, row_bytes

MAX_TOKENS = 16  # bf16: more tokens than this, a batched matmul on dequantised weights does better
# float32: with blocks of rows going through tiles of tokens (quant_f32.c) the kernel's rate no longer
# falls with the rows of x; it stays ahead of dequantise-then-F.linear to 256 rows and more for q8_0,
# q4_0, q4_1, q4_k and mxfp4 (1024 x 1024, 3584 x 1024, 1024 x 3584, 2 threads), to about 64 for
# q6_k, whose blocks cost the most to unpack: README "Computing on the stored blocks"
MAX_TOKENS_F32 = 256
MAX_TOKENS_F32_BY_FORMAT = {"q6_k": 64}


_INT8: contextvars.ContextVar[str | None] = contextvars.ContextVar("moeinf_int8_activations", default=None)

# activations "auto" on a prompt: the fewest rows of x one product needs to take the int8 GEMM, by format
# (measured against the float32 kernels, one thread, 3584 x 1024: the int8 GEMM is ahead from 16 rows on
# for the 32-value formats; README "Computing on the stored blocks"); fewer rows keep the float32 kernels
# (not rounded). The k-quants are not here: AUTO_INT8_FORMATS rounds them from one row on.
AUTO_MIN_ROWS = {"q8_0": 16, "q4_0": 16, "q4_1": 16, "mxfp4": 16}
# the formats that "auto" rounds on every forward, one-token decode included: their float32 kernels pay the
# most to unpack (6-bit sub-scales, q6_k's split codes) and the int8 row kernel (quant.c) is the faster
# from one row on (a Q4_K_M decode step's experts 7.8 -> 4.7 ms, its q6_k LM head 2.2 -> 1.1 ms); the
# 32-value formats keep float32 on decode and short prompts (q8_0's decode no faster in int8)
AUTO_INT8_FORMATS = frozenset({"q4_k", "q5_k", "q6_k"})


@contextlib.contextmanager
def int8_activations(mode: bool | str) -> Iterator[None]:
    """While it holds, float32 activations meet block-format weights with int8 activations: ``True``
    (or "int8") in every product (``engine.formats.linear``'s through ``qgemm``, one token's experts
    through ``cuda_ext.cpu.experts_accumulate``'s int8 call); "auto" (a prompt) in products of at least
    ``AUTO_MIN_ROWS[format]`` rows; "kquants" (decode, short prompts) in every product on the
    ``AUTO_INT8_FORMATS`` only; ``False`` in none (float32 activations are never rounded)."""
    value = "int8" if mode is True or mode == "int8" else mode if mode in ("auto", "kquants") else None
    token = _INT8.set(value)
    try:
        yield
    finally:
        _INT8.reset(token)


def int8_mode() -> str | None:
    """The ``int8_activations`` mode in force: "int8", "auto", "kquants" or None."""
    return _INT8.get()


def int8_active(fmt: str | None = None) -> bool:
    """Whether ``int8_activations`` rounds every product on ``fmt`` here, one token's included (``True``,
    or "auto" / "kquants" for the ``AUTO_INT8_FORMATS``)."""
    mode = _INT8.get()
    return mode == "int8" or (mode in ("auto", "kquants") and fmt in AUTO_INT8_FORMATS)


def int8_min_rows(fmt: str) -> int | None:
    """The fewest rows of x a product on ``fmt`` needs to take int8 activations here; None: not at all."""
    mode = _INT8.get()
    if mode is None:
        return None
    if mode == "int8" or fmt in AUTO_INT8_FORMATS:
        return 1
    return AUTO_MIN_ROWS.get(fmt, 2) if mode == "auto" else None


# int8 activations: fewer rows than this take quant.c's row kernel (no unpacking), more the tiled GEMM
QGEMM_MIN_TOKENS = 4


def max_tokens(dtype: torch.dtype, fmt: str | None = None) -> int:
    """The most rows of x the native kernel for activations of ``dtype`` (and weights in ``fmt``) takes."""
    if dtype != torch.float32:
        return MAX_TOKENS
    return MAX_TOKENS_F32_BY_FORMAT.get(fmt, MAX_TOKENS_F32) if fmt else MAX_TOKENS_F32



def _rows(x: torch.Tensor, blocks: torch.Tensor, fmt: str, k: int) -> int | None:
    """N, the rows of W stored as ``blocks`` in ``fmt`` (each ``row_bytes(fmt, k)``), when the kernels
    take x [M >= 1, k] on the CPU against them; None where they do not (then the caller's fallback)."""
    if (
        fmt not in BLOCKS
        or x.dim() != 2
        or x.shape[0] < 1
        or x.shape[1] != k
        or k % BLOCKS[fmt].values
        or x.device.type != "cpu"
        or blocks.device.type != "cpu"
        or blocks.dtype != torch.uint8
        or not blocks.is_contiguous()
    ):
        return None
    rb = row_bytes(fmt, k)
    return None if blocks.numel() % rb else blocks.numel() // rb


def qlinear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    fmt: str,
    k: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` ([M, N], ``out_dtype`` or x's dtype) with W stored as ``blocks``; None when
    the native kernel does not apply (no kernels, not the CPU, a shape or dtype it does not take)."""
    lib = loader.cpu()
    out_dtype = out_dtype or x.dtype
    if (
        lib is None
        or x.dtype not in (torch.bfloat16, torch.float32)
        or out_dtype not in (torch.bfloat16, torch.float32)
        or x.dim() != 2
        or x.shape[0] > max_tokens(x.dtype, fmt)
    ):
        return None
    n = _rows(x, blocks, fmt, k)
    if n is None:
        return None
    if bias is not None and (
        bias.dtype not in ((torch.bfloat16, torch.float32) if x.dtype == torch.float32 else (torch.bfloat16,))
        or bias.device.type != "cpu"
        or not bias.is_contiguous()
        or bias.numel() != n
    ):
        return None
    x = x.contiguous()
    if x.dtype == torch.float32:
        return _fgemv(lib, x, blocks, fmt, k, n, bias, out_dtype)
    out = torch.empty(x.shape[0], n, dtype=out_dtype)
    err = lib.lib.moeinf_qgemv(
        BLOCKS[fmt].ggml_type,
        blocks.data_ptr(),
        n,
        k,
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        x.shape[0],
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        int(out_dtype == torch.bfloat16),
        cpu.threads(blocks.numel() * 2),
    )
    return None if err else out


def _fgemv(lib, x, blocks, fmt, k, n, bias, out_dtype) -> torch.Tensor | None:
    """The float32-activation kernel: float32 out (then ``out_dtype``), a float32 bias."""
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    err = lib.lib.moeinf_fgemv(
        BLOCKS[fmt].ggml_type,
        blocks.data_ptr(),
        n,
        k,
        x.data_ptr(),
        x.shape[0],
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        cpu.threads(blocks.numel() * 2),
    )
    if err:
        return None
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def qgemm(
    x: torch.Tensor, blocks: torch.Tensor, fmt: str, k: int, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``x @ W.T + bias`` (float32 [M, N]) for float32 x [M, K], any M, with the activations rounded to
    int8 per block (module doc); None when the native kernel does not apply."""
    lib = loader.cpu()
    if lib is None or x.dtype != torch.float32:
        return None
    n = _rows(x, blocks, fmt, k)
    if n is None:
        return None
    if bias is not None:
        if bias.device.type != "cpu" or bias.numel() != n:
            return None
        bias = bias.to(torch.float32).contiguous()
    x = x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m < QGEMM_MIN_TOKENS:
        err = lib.lib.moeinf_qgemv(
            BLOCKS[fmt].ggml_type, blocks.data_ptr(), n, k, x.data_ptr(), 0, m, None, out.data_ptr(), 0,
            cpu.threads(blocks.numel() * 2),
        )
        if err:
            return None
        return out if bias is None else out.add_(bias)
    err = lib.lib.moeinf_qgemm(
        BLOCKS[fmt].ggml_type,
        blocks.data_ptr(),
        n,
        k,
        x.data_ptr(),
        m,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        cpu.threads(blocks.numel() * 2 * m),
    )
    return None if err else out


def qgemm_swiglu(x: torch.Tensor, gate, up) -> torch.Tensor | None:
    """``silu(x @ Wg.T) * (x @ Wu.T)`` (float32 [M, I]) for float32 x [M, H] and a SwiGLU expert's gate and
    up matrices (``QuantTensor``s [I, H] of one format), with int8 activations as ``qgemm`` (the same
    bound for each product), in one native call; None where it does not apply (the int8 mode off for
    this many rows, no kernels, other formats or shapes)."""
    from cuda_ext.blocks import block_weight

    lib = loader.cpu()
    if lib is None or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[0] < 1:
        return None
    shape = tuple(getattr(gate, "shape", ()))
    if len(shape) != 2 or tuple(getattr(up, "shape", ())) != shape or shape[1] != x.shape[1]:
        return None
    g, u = block_weight(gate, *shape), block_weight(up, *shape)
    if g is None or u is None or g[0] != u[0]:
        return None
    least = int8_min_rows(gate.format.name)
    if least is None or x.shape[0] < max(least, QGEMM_MIN_TOKENS):
        return None
    x = x.contiguous()
    out = torch.empty(x.shape[0], shape[0], dtype=torch.float32)
    err = lib.lib.moeinf_qgemm_swiglu(
        g[0], g[1].data_ptr(), u[1].data_ptr(), shape[0], shape[1], x.data_ptr(), x.shape[0], out.data_ptr(),
        cpu.threads(2 * g[1].numel() * x.shape[0]),
    )
    return None if err else out
