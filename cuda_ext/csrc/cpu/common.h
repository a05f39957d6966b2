/* Shared by the CPU kernels in this folder: bf16 conversions, the thread pool, row splits.

   Every file here is compiled together into one shared library by cuda_ext/loader.py, with
   -march=native where the compiler takes it (the library is cached under a key naming the CPU
   features it was built for), so each kernel picks its instruction set at build time from the
   compiler's macros: AVX-512 (BF16, VNNI) where defined, AVX2 + FMA next, portable C last. */
#ifndef MOEINF_COMMON_H
#define MOEINF_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static inline float bf16_to_f32(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                               /* round to nearest even */
    return (uint16_t)(u >> 16);
}
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* IEEE half to float (GGUF block scales), exact for every value including subnormals */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp) u = sign | ((exp + 112u) << 23) | (man << 13);
    else if (!man) u = sign;
    else {  /* subnormal: value man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f; memcpy(&f, &u, 4); return f;
}

/* ---- the GGUF block formats the kernels take (GGML type numbers), and their scale fields */
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_MXFP4 39

/* an fp16 block scale at p (unaligned) */
static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    return f16_to_f32(h);
#endif
}

/* E8M0 exponent e -> 2^(e-128): half the block scale, as the doubled E2M1 values need */
static inline float e8m0_half(uint8_t e) {
    uint32_t bits = e < 2 ? (0x00200000u << e) : ((uint32_t)(e - 1) << 23);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* q4_k's (and q5_k's) eight 6-bit scales and mins */
static inline void q4k_scales(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

#if defined(__AVX2__) || defined(__AVX512F__)
/* q4_k's and q5_k's eight 6-bit scales (bytes 0-7) and mins (8-15) of the 12 bytes at s, llama.cpp's way */
static inline __m128i q4k_scales16(const uint8_t *s) {
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4);
    memcpy(&u1, s + 4, 4);
    memcpy(&u2, s + 8, 4);
    const uint32_t k1 = 0x3f3f3f3fu, k2 = 0x0f0f0f0fu, k3 = 0x03030303u;
    /* built in registers: four 4-byte stores read back as one 16-byte load would miss store forwarding */
    return _mm_setr_epi32((int)(u0 & k1), (int)((u2 & k2) | (((u0 >> 6) & k3) << 4)), (int)(u1 & k1),
                          (int)(((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4)));
}
#endif

/* ---- the thread pool (pool.c) */
typedef void (*task_fn)(void *arg, int tid, int nt);
typedef void (*phase_fn)(void *arg, int phase, int part, int parts);
#define MAX_THREADS 16
/* run fn(arg, part, nt) for every part < nt, on the caller and up to nt - 1 persistent workers, each
   part claimed by whoever comes first (a worker the OS has not scheduled yet holds nobody up); a caller
   that finds the pool busy (another Python thread) runs every part alone */
void moeinf_pool_run(task_fn fn, void *arg, int nt);
/* fn(arg, p, part, parts) for every part of phase p = 0..phases-1 (at most 4), phase p + 1 once every
   part of phase p is done; on up to nt threads, parts claimed as in moeinf_pool_run */
void moeinf_pool_run_phases(phase_fn fn, void *arg, int phases, int parts, int nt);

/* [lo, hi) of n rows for participant tid of nt, in multiples of `align` rows */
static inline void split_rows_by(int64_t n, int64_t align, int tid, int nt, int64_t *lo, int64_t *hi) {
    int64_t blocks = (n + align - 1) / align;
    *lo = blocks * tid / nt * align;
    *hi = blocks * (tid + 1) / nt * align;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}
static inline void split_rows(int64_t n, int tid, int nt, int64_t *lo, int64_t *hi) { split_rows_by(n, 16, tid, nt, lo, hi); }

#define CHUNK 256  /* rows per stack buffer of float32 sums */

/* ---- bf16 rows (bf16.c): y[n - n0] = sum_k x[k] W[n, k] in float32 (rows read in memory order) */
void moeinf_dot_rows(const uint16_t *x, const uint16_t *W, float *y, int64_t n0, int64_t n1, int64_t K);

/* ---- one bf16 row's RMSNorm (decode.c): out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))); out may be x */
void moeinf_rms_norm(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *out);

/* ---- block-format rows (quant.c) */
/* one token's activations quantised per block of 32: q[K] int8, d[K/32] scales, s[K/32] = d * sum(q) */
typedef struct {
    const int8_t *q;
    const float *d;
    const float *s;
} xq_t;
typedef float (*row_fn)(const uint8_t *w, const xq_t *x, int64_t nb);
int moeinf_block_geometry(int type, int *values, int *bytes);  /* 0 for a type quant.c does not know */
row_fn moeinf_row_function(int type);                           /* one row of `type` times x, nb = K / 32 */
int moeinf_quantize_block(const float *xb, int8_t *q, float *d);  /* returns sum(q) */
void moeinf_quantize_x(const void *x, int bf16, int64_t K, int8_t *q, float *d, float *s);
/* the calling thread's scratch of one user, grown as needed (one per Python thread and user: a call that
   runs inside another, as the experts inside the decode step, keeps its own) */
enum { SCRATCH_BLOCKS, SCRATCH_STEP, SCRATCH_ATTN, SCRATCH_ATTN_F32, SCRATCH_MLA, SCRATCH_USERS };
void *moeinf_scratch_for(int user, size_t bytes);
static inline void *moeinf_scratch(size_t bytes) { return moeinf_scratch_for(SCRATCH_BLOCKS, bytes); }

/* ---- block-format rows times float32 activations (quant_f32.c): no activation rounding */
typedef float (*frow_fn)(const uint8_t *w, const float *x, int64_t nb);
frow_fn moeinf_frow_function(int type);                         /* one row of `type` times x, nb = K / 32 */
/* y[i] = row i of the n rows at w (rb bytes apart) times x for i < n, nb = K / 32: frow's bits, several
   rows a pass */
typedef void (*fmrows_fn)(const uint8_t *w, int64_t rb, int64_t n, const float *x, int64_t nb, float *y);
fmrows_fn moeinf_fmrows_function(int type);

/* ---- float32 a . b over n values (attention_f32.c's scores, decode.c's float32 router): two
   vector accumulators, added at the end (the same bits on every call of a build) */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    if (n >= 16) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; i + 32 <= n; i += 32) {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
        }
        for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (n >= 8) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        }
        for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        __m256 t = _mm256_add_ps(acc0, acc1);
        __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        u = _mm_add_ps(u, _mm_movehl_ps(u, u));
        u = _mm_add_ss(u, _mm_movehdup_ps(u));
        s = _mm_cvtss_f32(u);
    }
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---- attention's scores (attention.c, mla.c) */
/* a . b over n values (a float32, b bf16) in sixteen partial sums, then added in order: vectorised, where
   one running sum waits on each add (a head's scores were bound by that latency) */
static inline float dot_bf16_lanes(const float *a, const uint16_t *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    if (n >= 16) {
        __m512 acc = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            __m512 bv = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + i))), 16));
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), bv, acc);
        }
        s = _mm512_reduce_add_ps(acc);
    }
#else
    float acc[16] = {0};
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * bf16_to_f32(b[i + l]);
    for (int l = 0; l < 16; l++) s += acc[l];
#endif
    for (; i < n; i++) s += a[i] * bf16_to_f32(b[i]);
    return s;
}

#endif
