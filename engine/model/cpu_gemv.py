"""A native bf16 matrix-vector product for CPU decode, with ``F.linear`` as the fallback.

One token at a time, every weight matrix is read once per step and ``F.linear`` on bf16 is the
bottleneck: on the machines measured here (AMD EPYC, AVX-512 BF16) oneDNN's M=1 path reads expert
and LM-head matrices at 1-8 GB/s, while a plain row-blocked dot-product loop (AVX-512 BF16 dot products over eight rows at a
time where the CPU has them, auto-vectorised C elsewhere) reaches 12-18 GB/s, about what a plain
sum over memory reaches. This
module compiles such a loop (C, ~50 lines, float32 accumulation, round-to-nearest-even to bf16) with
the system C compiler on first use, caches the shared library under ``~/.cache/moeinf/kernels``
(``$XDG_CACHE_HOME`` honoured), and calls it through ctypes (which releases the GIL). Matrices of a
million elements or more are split over two threads (the caller and one persistent worker) when
``torch.get_num_threads() > 1``: 10-20% more bandwidth here.

``linear(x, weight, bias)`` uses it for x [1, K] bf16 on the CPU with a contiguous bf16 weight and
falls back to ``F.linear`` for everything else (prefill, float32, CUDA) and whenever no compiler is
available or ``MOEINF_NATIVE_KERNELS=0``. ``Linear`` is an ``nn.Linear`` whose forward does that.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define MOEINF_DPBF16 1
#endif

static inline float bf16_to_f32(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                               /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* y[n] = sum_k x[k] * W[n, k] for rows n0 <= n < n1 of a row-major [N, K] bf16 matrix. */
void moeinf_gemv_bf16(const uint16_t *restrict x, const uint16_t *restrict W, uint16_t *restrict y,
                      int64_t n0, int64_t n1, int64_t K) {
    int64_t n = n0;
#ifdef MOEINF_DPBF16
    int64_t K32 = K & ~(int64_t)31;
    for (; n + 8 <= n1; n += 8) {  /* eight rows share each load of x */
        const uint16_t *w0 = W + n * K;
        __m512 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K32; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
            for (int r = 0; r < 8; r++)
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(w0 + r * K + k), xv);
        }
        for (int r = 0; r < 8; r++) {
            float s = _mm512_reduce_add_ps(a[r]);
            for (int64_t k = K32; k < K; k++) s += bf16_to_f32(x[k]) * bf16_to_f32(w0[r * K + k]);
            y[n + r] = f32_to_bf16(s);
        }
    }
    for (; n + 4 <= n1; n += 4) {
        const uint16_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K32; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + k), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + k), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + k), xv);
        }
        float s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
        float s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
        for (int64_t k = K32; k < K; k++) {
            float xv = bf16_to_f32(x[k]);
            s0 += xv * bf16_to_f32(w0[k]); s1 += xv * bf16_to_f32(w1[k]);
            s2 += xv * bf16_to_f32(w2[k]); s3 += xv * bf16_to_f32(w3[k]);
        }
        y[n] = f32_to_bf16(s0); y[n + 1] = f32_to_bf16(s1); y[n + 2] = f32_to_bf16(s2); y[n + 3] = f32_to_bf16(s3);
    }
#else
    for (; n + 4 <= n1; n += 4) {
        const uint16_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            for (int j = 0; j < 16; j++) {
                float xv = bf16_to_f32(x[k + j]);
                a0[j] += xv * bf16_to_f32(w0[k + j]); a1[j] += xv * bf16_to_f32(w1[k + j]);
                a2[j] += xv * bf16_to_f32(w2[k + j]); a3[j] += xv * bf16_to_f32(w3[k + j]);
            }
        }
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int j = 0; j < 16; j++) { s0 += a0[j]; s1 += a1[j]; s2 += a2[j]; s3 += a3[j]; }
        for (; k < K; k++) {
            float xv = bf16_to_f32(x[k]);
            s0 += xv * bf16_to_f32(w0[k]); s1 += xv * bf16_to_f32(w1[k]);
            s2 += xv * bf16_to_f32(w2[k]); s3 += xv * bf16_to_f32(w3[k]);
        }
        y[n] = f32_to_bf16(s0); y[n + 1] = f32_to_bf16(s1); y[n + 2] = f32_to_bf16(s2); y[n + 3] = f32_to_bf16(s3);
    }
#endif
    for (; n < n1; n++) {
        const uint16_t *w0 = W + n * K;
        float s = 0;
        for (int64_t k = 0; k < K; k++) s += bf16_to_f32(x[k]) * bf16_to_f32(w0[k]);
        y[n] = f32_to_bf16(s);
    }
}

/* The same product on two threads: one persistent worker takes the upper half of the rows. */
#include <pthread.h>
static pthread_mutex_t mt_call = PTHREAD_MUTEX_INITIALIZER, mt_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t mt_job_cv = PTHREAD_COND_INITIALIZER, mt_done_cv = PTHREAD_COND_INITIALIZER;
static const uint16_t *mt_x, *mt_W; static uint16_t *mt_y; static int64_t mt_n0, mt_n1, mt_K;
static int mt_pending, mt_done, mt_started, mt_atfork;

static void *mt_worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&mt_mu);
        while (!mt_pending) pthread_cond_wait(&mt_job_cv, &mt_mu);
        mt_pending = 0;
        const uint16_t *x = mt_x, *W = mt_W; uint16_t *y = mt_y; int64_t n0 = mt_n0, n1 = mt_n1, K = mt_K;
        pthread_mutex_unlock(&mt_mu);
        moeinf_gemv_bf16(x, W, y, n0, n1, K);
        pthread_mutex_lock(&mt_mu);
        mt_done = 1;
        pthread_cond_signal(&mt_done_cv);
        pthread_mutex_unlock(&mt_mu);
    }
    return 0;
}

static void mt_child_after_fork(void) { mt_started = 0; mt_pending = 0; }  /* the worker is not forked */

void moeinf_gemv_bf16_2t(const uint16_t *x, const uint16_t *W, uint16_t *y, int64_t N, int64_t K) {
    pthread_mutex_lock(&mt_call);
    if (!mt_started) {
        pthread_t t;
        if (!mt_atfork) { pthread_atfork(0, 0, mt_child_after_fork); mt_atfork = 1; }
        if (pthread_create(&t, 0, mt_worker, 0) != 0) {
            pthread_mutex_unlock(&mt_call);
            moeinf_gemv_bf16(x, W, y, 0, N, K);
            return;
        }
        pthread_detach(t);
        mt_started = 1;
    }
    int64_t split = (N / 2) & ~(int64_t)7;
    pthread_mutex_lock(&mt_mu);
    mt_x = x; mt_W = W; mt_y = y; mt_n0 = split; mt_n1 = N; mt_K = K; mt_done = 0; mt_pending = 1;
    pthread_cond_signal(&mt_job_cv);
    pthread_mutex_unlock(&mt_mu);
    moeinf_gemv_bf16(x, W, y, 0, split, K);
    pthread_mutex_lock(&mt_mu);
    while (!mt_done) pthread_cond_wait(&mt_done_cv, &mt_mu);
    pthread_mutex_unlock(&mt_mu);
    pthread_mutex_unlock(&mt_call);
}
"""

_FLAG_SETS = (["-O3", "-march=native", "-pthread"], ["-O3", "-pthread"])
# matrices of at least this many elements are split over two threads when torch may use two
_SPLIT_MIN = 1 << 20
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moeinf" / "kernels"


def _build() -> ctypes.CDLL | None:
    """Compile (or reuse) the shared library; None when that is impossible here."""
    cc = os.environ.get("CC") or "cc"
    for flags in _FLAG_SETS:
        key = hashlib.sha256((_SOURCE + cc + " ".join(flags) + os.uname().machine).encode()).hexdigest()[:16]
        lib_path = _cache_dir() / f"gemv-{key}.so"
        try:
            if not lib_path.exists():
                lib_path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                    src = Path(tmp) / "gemv.c"
                    src.write_text(_SOURCE)
                    out = Path(tmp) / "gemv.so"
                    subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(src)],
                                   check=True, capture_output=True, timeout=120)
                    os.replace(out, lib_path)
            lib = ctypes.CDLL(str(lib_path))
            fn = lib.moeinf_gemv_bf16
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64]
            fn.restype = None
            fn2 = lib.moeinf_gemv_bf16_2t
            fn2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
            fn2.restype = None
            return lib
        except (OSError, subprocess.SubprocessError, AttributeError):
            continue
    return None


def _native() -> tuple:
    if "fn" not in _state:
        with _lock:
            if "fn" not in _state:
                lib = None if os.environ.get("MOEINF_NATIVE_KERNELS", "1") == "0" else _build()
                _state["fn2"] = lib.moeinf_gemv_bf16_2t if lib is not None else None
                _state["fn"] = lib.moeinf_gemv_bf16 if lib is not None else None
    return _state["fn"], _state["fn2"]


def native_gemv():
    """The compiled ``moeinf_gemv_bf16(x, W, y, n0, n1, K)``, or None (disabled, or no compiler)."""
    return _native()[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with the native kernel for one bf16 row on the CPU."""
    if (
        x.dim() == 2
        and x.shape[0] == 1
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.is_contiguous()
    ):
        fn, fn2 = _native()
        if fn is not None:
            x = x.contiguous()
            n, k = weight.shape
            out = torch.empty(1, n, dtype=torch.bfloat16)
            if n * k >= _SPLIT_MIN and torch.get_num_threads() > 1:
                fn2(x.data_ptr(), weight.data_ptr(), out.data_ptr(), n, k)
            else:
                fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), 0, n, k)
            return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose forward goes through ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
