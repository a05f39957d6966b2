/* Products with weights kept in their stored block formats (GGUF's q8_0, q4_0, q4_1, q4_k, q5_k, q6_k and
   mxfp4, bit for bit the GGUF layouts: see cuda_ext/csrc/cuda/dequant.cu for the byte maps), for
   one-token decode and small batches, computed on the blocks without dequantising the matrix.

   The activations are quantised first, per block of 32 values, to int8 with one float scale
   (d = max|x| / 127, q = round(x / d)), and every 32 (or 16) weights meet their activations in an
   integer dot product: the weight's block scale times the activation block's scale times that
   integer, summed in float32. Affine formats (q4_1, q4_k, q5_k) add min * d_x * sum(q_x) per block. The
   error against dequantise-then-multiply is the activations' rounding: at most
   sum_j |w_j| * d_x(j) / 2 (tests/test_cuda_ext_quant.py checks that bound).

   Instruction sets, chosen at build time: AVX-512 VNNI + BW (64 weights per step, vpdpbusd), AVX2
   (32 per step, vpmaddubsw + vpmaddwd), portable C otherwise.

   moeinf_qgemv   y[m] = W x[m] (+ bias) for m < M tokens, W [N, K] in one format, rows split over
                  the thread pool, each row's blocks read once for all M tokens. */

#include <stdlib.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q_AVX512 1
#elif defined(__AVX2__)
#define Q_AVX2 1
#endif

static const int8_t MXFP4_DOUBLED[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* ---------------------------------------------------------------- activations */

/* one block of 32 activations: q = round(x / d) (ties to even), d = max|x| / 127; returns sum(q) */
int moeinf_quantize_block(const float *xb, int8_t *q, float *d) {
#ifdef __AVX512F__
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i i0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id))), lo), hi);
    __m512i i1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id))), lo), hi);
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(i1));
    *d = dd;
    return _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#else
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
    float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        int v = (int)nearbyintf(xb[j] * id);
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        q[j] = (int8_t)v;
        sum += v;
    }
    *d = dd;
    return sum;
#endif
}

/* x [K] (float32, or bf16 when bf16) -> q [K], d [K/32], s [K/32] = d * sum(q) per block */
void moeinf_quantize_x(const void *x, int bf16, int64_t K, int8_t *q, float *d, float *s) {
    float tmp[32];
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = (const float *)x + 32 * b;
        if (bf16) {
            const uint16_t *src = (const uint16_t *)x + 32 * b;
#ifdef __AVX512F__
            for (int h = 0; h < 2; h++) {
                __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + 16 * h)));
                _mm512_storeu_ps(tmp + 16 * h, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
            }
#else
            for (int j = 0; j < 32; j++) tmp[j] = bf16_to_f32(src[j]);
#endif
            xb = tmp;
        }
        int sum = moeinf_quantize_block(xb, q + 32 * b, d + b);
        s[b] = d[b] * (float)sum;
    }
}

/* ---------------------------------------------------------------- one block, portable C */

/* int8 times int8 through an int16: GCC 12 with AVX-VNNI turns a plain `sum += (int8_t)a * b` loop
   into vpdpbusd, which reads a as unsigned (wrong for negative weights) */
#define MUL8(a, b) ((int16_t)((int8_t)(a) * (int8_t)(b)))

static inline float blk_q8_0(const uint8_t *w, const int8_t *q, float dx, float sx) {
    (void)sx;
    int sum = 0;
    for (int j = 0; j < 32; j++) sum += MUL8(w[2 + j], q[j]);
    return half(w) * dx * (float)sum;
}
static inline float blk_q4_0(const uint8_t *w, const int8_t *q, float dx, float sx) {
    (void)sx;
    int sum = 0;
    for (int j = 0; j < 16; j++) sum += ((w[2 + j] & 0x0F) - 8) * q[j] + ((w[2 + j] >> 4) - 8) * q[j + 16];
    return half(w) * dx * (float)sum;
}
static inline float blk_q4_1(const uint8_t *w, const int8_t *q, float dx, float sx) {
    int sum = 0;
    for (int j = 0; j < 16; j++) sum += (w[4 + j] & 0x0F) * q[j] + (w[4 + j] >> 4) * q[j + 16];
    return half(w) * dx * (float)sum + half(w + 2) * sx;
}
static inline float blk_mxfp4(const uint8_t *w, const int8_t *q, float dx, float sx) {
    (void)sx;
    int sum = 0;
    for (int j = 0; j < 16; j++) sum += MUL8(MXFP4_DOUBLED[w[1 + j] & 0x0F], q[j]) + MUL8(MXFP4_DOUBLED[w[1 + j] >> 4], q[j + 16]);
    return e8m0_half(w[0]) * dx * (float)sum;
}
/* one q4_k super-block (256 values, 8 x-blocks) */
static inline float sblk_q4_k(const uint8_t *w, const int8_t *q, const float *dx, const float *sx) {
    uint8_t sc[8], mn[8];
    q4k_scales(w + 4, sc, mn);
    const uint8_t *qs = w + 16;
    float d = half(w), dmin = half(w + 2), acc = 0.0f, mins = 0.0f;
    for (int c = 0; c < 4; c++) {
        int lo = 0, hi = 0;
        for (int l = 0; l < 32; l++) {
            lo += (qs[32 * c + l] & 0x0F) * q[64 * c + l];
            hi += (qs[32 * c + l] >> 4) * q[64 * c + 32 + l];
        }
        acc += d * (float)sc[2 * c] * dx[2 * c] * (float)lo + d * (float)sc[2 * c + 1] * dx[2 * c + 1] * (float)hi;
        mins += (float)mn[2 * c] * sx[2 * c] + (float)mn[2 * c + 1] * sx[2 * c + 1];
    }
    return acc - dmin * mins;
}
/* one q5_k super-block (q4_k's, with bit c of qh[l] as bit 4 of sub-block c's code l) */
static inline float sblk_q5_k(const uint8_t *w, const int8_t *q, const float *dx, const float *sx) {
    uint8_t sc[8], mn[8];
    q4k_scales(w + 4, sc, mn);
    const uint8_t *qh = w + 16, *qs = w + 48;
    float d = half(w), dmin = half(w + 2), acc = 0.0f, mins = 0.0f;
    for (int c = 0; c < 4; c++) {
        int lo = 0, hi = 0;
        for (int l = 0; l < 32; l++) {
            lo += ((qs[32 * c + l] & 0x0F) | (((qh[l] >> (2 * c)) & 1) << 4)) * q[64 * c + l];
            hi += ((qs[32 * c + l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4)) * q[64 * c + 32 + l];
        }
        acc += d * (float)sc[2 * c] * dx[2 * c] * (float)lo + d * (float)sc[2 * c + 1] * dx[2 * c + 1] * (float)hi;
        mins += (float)mn[2 * c] * sx[2 * c] + (float)mn[2 * c + 1] * sx[2 * c + 1];
    }
    return acc - dmin * mins;
}
/* one q6_k super-block */
static inline float sblk_q6_k(const uint8_t *w, const int8_t *q, const float *dx) {
    const uint8_t *ql = w, *qh = w + 128;
    const int8_t *sc = (const int8_t *)(w + 192);
    float d = half(w + 208), acc = 0.0f;
    for (int h = 0; h < 2; h++)
        for (int part = 0; part < 4; part++) {
            int sum[2] = {0, 0};
            for (int l = 0; l < 32; l++) {
                uint8_t low = ql[64 * h + 32 * (part & 1) + l];
                int v = ((part < 2 ? low & 0x0F : low >> 4) | (((qh[32 * h + l] >> (2 * part)) & 3) << 4)) - 32;
                sum[l >> 4] += v * q[128 * h + 32 * part + l];
            }
            int g = 8 * h + 2 * part;
            acc += d * dx[4 * h + part] * ((float)sc[g] * (float)sum[0] + (float)sc[g + 1] * (float)sum[1]);
        }
    return acc;
}

/* ---------------------------------------------------------------- whole rows */

#ifdef Q_AVX512
static inline __m512 two(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }
/* unsigned w (< 128) times signed x: 16 lanes of 4-product sums */
static inline __m512i udot(__m512i w, __m512i x) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x); }
/* signed w times signed x (|x| <= 127): |w| times x with w's sign */
static inline __m512i sdot(__m512i w, __m512i x) {
    __m512i xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), xs);
}
static inline __m512i two256(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
/* the nibbles of two 16-byte groups as [lo a, hi a, lo b, hi b]: two q4_0-style blocks of 32 values */
static inline __m512i nibbles2(const uint8_t *a, const uint8_t *b) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                        _mm_loadu_si128((const __m128i *)b), 1);
    __m512i t = two256(_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16(v, 4), m));
    return _mm512_shuffle_i64x2(t, t, _MM_SHUFFLE(3, 1, 2, 0));
}
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

#ifdef Q_AVX2
static inline __m256i udot(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
static inline __m256i sdot(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
static inline __m256i nibbles(const uint8_t *p) {  /* 16 bytes -> [lo 16, hi 16] */
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, m)), _mm_and_si128(_mm_srli_epi16(v, 4), m), 1);
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef Q_AVX512
/* Sixteen 32-value blocks at a time: their scales gathered at once (one gather and one conversion
   instead of sixteen scalar ones), each pair's lanes scaled by a permutation of them. Returns how
   many blocks it did (a multiple of 16) and adds their sum to *acc. `type` is a constant at every
   call, so each format gets its own straight-line loop. */
static inline __attribute__((always_inline)) int64_t groups16(int type, const uint8_t *w, const xq_t *x, int64_t nb, float *acc) {
    const int bytes = type == T_Q8_0 ? 34 : type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : 17;
    const int qs = type == T_Q8_0 || type == T_Q4_0 ? 2 : type == T_Q4_1 ? 4 : 1;
    const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(bytes));
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)MXFP4_DOUBLED));
    __m512 v0 = _mm512_setzero_ps(), v1 = v0, off = v0;
    int64_t b = 0;
    for (; b + 16 <= nb; b += 16) {
        const uint8_t *wb = w + bytes * b;
        __m512i raw = _mm512_i32gather_epi32(offs, (const void *)wb, 1);
        __m512 dw;
        if (type == T_MXFP4) {  /* 2^(e-128): e < 2 subnormal */
            __m512i e = _mm512_and_si512(raw, _mm512_set1_epi32(0xFF));
            __mmask16 small = _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2));
            __m512i bits = _mm512_mask_sllv_epi32(_mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23), small,
                                                  _mm512_set1_epi32(0x00200000), e);
            dw = _mm512_castsi512_ps(bits);
        } else {
            dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));
        }
        if (type == T_Q4_0) off = _mm512_fmadd_ps(dw, _mm512_loadu_ps(x->s + b), off);
        if (type == T_Q4_1) off = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(raw, 16))), _mm512_loadu_ps(x->s + b), off);
        const __m512 sc = _mm512_mul_ps(dw, _mm512_loadu_ps(x->d + b));
        for (int i = 0; i < 8; i++) {
            const uint8_t *w0 = wb + 2 * i * bytes, *w1 = w0 + bytes;
            __m512i xv = _mm512_loadu_si512(x->q + 32 * (b + 2 * i)), dot;
            if (type == T_Q8_0)
                dot = sdot(two256(_mm256_loadu_si256((const __m256i *)(w0 + qs)), _mm256_loadu_si256((const __m256i *)(w1 + qs))), xv);
            else if (type == T_MXFP4)
                dot = sdot(_mm512_shuffle_epi8(lut, nibbles2(w0 + qs, w1 + qs)), xv);
            else
                dot = udot(nibbles2(w0 + qs, w1 + qs), xv);
            __m512 s2 = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * i)), sc);
            if (i & 1) v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s2, v1);
            else v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s2, v0);
        }
    }
    float o = type == T_Q4_0 ? -8.0f * hsum(off) : type == T_Q4_1 ? hsum(off) : 0.0f;
    *acc += hsum(_mm512_add_ps(v0, v1)) + o;
    return b;
}
#endif

/* sum over the row's nb blocks of 32 values (nb = K / 32) */
static float row_q8_0(const uint8_t *w, const xq_t *x, int64_t nb) {
    int64_t b = 0;
    float acc = 0.0f;
#ifdef Q_AVX512
    __m512 v = _mm512_setzero_ps();
    float grouped = 0.0f;
    b = groups16(T_Q8_0, w, x, nb, &grouped);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *w0 = w + 34 * b, *w1 = w0 + 34;
        __m512i wv = two256(_mm256_loadu_si256((const __m256i *)(w0 + 2)), _mm256_loadu_si256((const __m256i *)(w1 + 2)));
        __m512i dot = sdot(wv, _mm512_loadu_si512(x->q + 32 * b));
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), two(half(w0) * x->d[b], half(w1) * x->d[b + 1]), v);
    }
    acc = hsum(v) + grouped;
#elif defined(Q_AVX2)
    __m256 v = _mm256_setzero_ps();
    for (; b < nb; b++) {
        const uint8_t *w0 = w + 34 * b;
        __m256i dot = sdot(_mm256_loadu_si256((const __m256i *)(w0 + 2)), _mm256_loadu_si256((const __m256i *)(x->q + 32 * b)));
        v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(half(w0) * x->d[b]), v);
    }
    acc = hsum(v);
#endif
    for (; b < nb; b++) acc += blk_q8_0(w + 34 * b, x->q + 32 * b, x->d[b], x->s[b]);
    return acc;
}

static float row_q4_0(const uint8_t *w, const xq_t *x, int64_t nb) {
    int64_t b = 0;
    float acc = 0.0f, off = 0.0f;  /* sum (n - 8) q = sum n q - 8 sum q */
#ifdef Q_AVX512
    __m512 v = _mm512_setzero_ps();
    float grouped = 0.0f;
    b = groups16(T_Q4_0, w, x, nb, &grouped);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *w0 = w + 18 * b, *w1 = w0 + 18;
        float d0 = half(w0), d1 = half(w1);
        __m512i dot = udot(nibbles2(w0 + 2, w1 + 2), _mm512_loadu_si512(x->q + 32 * b));
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), two(d0 * x->d[b], d1 * x->d[b + 1]), v);
        off += d0 * x->s[b] + d1 * x->s[b + 1];
    }
    acc = hsum(v) - 8.0f * off + grouped;
#elif defined(Q_AVX2)
    __m256 v = _mm256_setzero_ps();
    for (; b < nb; b++) {
        const uint8_t *w0 = w + 18 * b;
        float d0 = half(w0);
        __m256i dot = udot(nibbles(w0 + 2), _mm256_loadu_si256((const __m256i *)(x->q + 32 * b)));
        v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d0 * x->d[b]), v);
        off += d0 * x->s[b];
    }
    acc = hsum(v) - 8.0f * off;
#endif
    (void)off;
    for (; b < nb; b++) acc += blk_q4_0(w + 18 * b, x->q + 32 * b, x->d[b], x->s[b]);
    return acc;
}

static float row_q4_1(const uint8_t *w, const xq_t *x, int64_t nb) {
    int64_t b = 0;
    float acc = 0.0f, off = 0.0f;
#ifdef Q_AVX512
    __m512 v = _mm512_setzero_ps();
    float grouped = 0.0f;
    b = groups16(T_Q4_1, w, x, nb, &grouped);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *w0 = w + 20 * b, *w1 = w0 + 20;
        __m512i dot = udot(nibbles2(w0 + 4, w1 + 4), _mm512_loadu_si512(x->q + 32 * b));
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), two(half(w0) * x->d[b], half(w1) * x->d[b + 1]), v);
        off += half(w0 + 2) * x->s[b] + half(w1 + 2) * x->s[b + 1];
    }
    acc = hsum(v) + off + grouped;
#elif defined(Q_AVX2)
    __m256 v = _mm256_setzero_ps();
    for (; b < nb; b++) {
        const uint8_t *w0 = w + 20 * b;
        __m256i dot = udot(nibbles(w0 + 4), _mm256_loadu_si256((const __m256i *)(x->q + 32 * b)));
        v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(half(w0) * x->d[b]), v);
        off += half(w0 + 2) * x->s[b];
    }
    acc = hsum(v) + off;
#endif
    (void)off;
    for (; b < nb; b++) acc += blk_q4_1(w + 20 * b, x->q + 32 * b, x->d[b], x->s[b]);
    return acc;
}

static float row_mxfp4(const uint8_t *w, const xq_t *x, int64_t nb) {
    int64_t b = 0;
    float acc = 0.0f;
#ifdef Q_AVX512
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)MXFP4_DOUBLED));
    __m512 v = _mm512_setzero_ps();
    float grouped = 0.0f;
    b = groups16(T_MXFP4, w, x, nb, &grouped);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *w0 = w + 17 * b, *w1 = w0 + 17;
        __m512i vals = _mm512_shuffle_epi8(lut, nibbles2(w0 + 1, w1 + 1));
        __m512i dot = sdot(vals, _mm512_loadu_si512(x->q + 32 * b));
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), two(e8m0_half(w0[0]) * x->d[b], e8m0_half(w1[0]) * x->d[b + 1]), v);
    }
    acc = hsum(v) + grouped;
#elif defined(Q_AVX2)
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)MXFP4_DOUBLED));
    __m256 v = _mm256_setzero_ps();
    for (; b < nb; b++) {
        const uint8_t *w0 = w + 17 * b;
        __m256i dot = sdot(_mm256_shuffle_epi8(lut, nibbles(w0 + 1)), _mm256_loadu_si256((const __m256i *)(x->q + 32 * b)));
        v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(e8m0_half(w0[0]) * x->d[b]), v);
    }
    acc = hsum(v);
#endif
    for (; b < nb; b++) acc += blk_mxfp4(w + 17 * b, x->q + 32 * b, x->d[b], x->s[b]);
    return acc;
}

#ifdef Q_AVX512
static float row_q4_k_avx512(const uint8_t *w, const xq_t *x, int64_t nb) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 v0 = _mm512_setzero_ps(), v1 = v0;
    __m256 mins = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + 144 * sb, *qs = blk + 16;
        const int8_t *q = x->q + 256 * sb;
        __m128i scm = q4k_scales16(blk + 4);
        __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scm));
        __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(scm, scm)));
        mins = _mm256_fmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(half(blk + 2))), _mm256_loadu_ps(x->s + 8 * sb), mins);
        __m512 s8 = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_mul_ps(sc, _mm256_set1_ps(half(blk))), _mm256_loadu_ps(x->d + 8 * sb)));
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m512i wv = two256(_mm256_and_si256(raw, m), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m));
            __m512i dot = udot(wv, _mm512_loadu_si512(q + 64 * c));
            __m512 s2 = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * c)), s8);
            if (c & 1) v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s2, v1);
            else v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s2, v0);
        }
    }
    __m128 ms = _mm_add_ps(_mm256_castps256_ps128(mins), _mm256_extractf128_ps(mins, 1));
    ms = _mm_add_ps(ms, _mm_movehl_ps(ms, ms));
    ms = _mm_add_ss(ms, _mm_movehdup_ps(ms));
    return hsum(_mm512_add_ps(v0, v1)) - _mm_cvtss_f32(ms);
}

/* q5_k: q4_k's loop with the fifth bits of qh (bit 2c and 2c + 1 for run c) at bit 4 of the codes */
static float row_q5_k_avx512(const uint8_t *w, const xq_t *x, int64_t nb) {
    const __m256i m = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 v0 = _mm512_setzero_ps(), v1 = v0;
    __m256 mins = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + 176 * sb, *qs = blk + 48;
        const int8_t *q = x->q + 256 * sb;
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        __m128i scm = q4k_scales16(blk + 4);
        __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scm));
        __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(scm, scm)));
        mins = _mm256_fmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(half(blk + 2))), _mm256_loadu_ps(x->s + 8 * sb), mins);
        __m512 s8 = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_mul_ps(sc, _mm256_set1_ps(half(blk))), _mm256_loadu_ps(x->d + 8 * sb)));
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4);
            __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4);
            __m512i wv = two256(_mm256_or_si256(_mm256_and_si256(raw, m), h0),
                                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m), h1));
            __m512i dot = udot(wv, _mm512_loadu_si512(q + 64 * c));
            __m512 s2 = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * c)), s8);
            if (c & 1) v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s2, v1);
            else v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s2, v0);
        }
    }
    __m128 ms = _mm_add_ps(_mm256_castps256_ps128(mins), _mm256_extractf128_ps(mins, 1));
    ms = _mm_add_ps(ms, _mm_movehl_ps(ms, ms));
    ms = _mm_add_ss(ms, _mm_movehdup_ps(ms));
    return hsum(_mm512_add_ps(v0, v1)) - _mm_cvtss_f32(ms);
}

static float row_q6_k_avx512(const uint8_t *w, const xq_t *x, int64_t nb) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    const __m512i quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 v0 = _mm512_setzero_ps(), v1 = v0;
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + 210 * sb, *ql = blk, *qh = blk + 128;
        const int8_t *q = x->q + 256 * sb;
        const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(half(blk + 208)),
                                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)))));
        const __m512 dx = _mm512_castps256_ps512(_mm256_loadu_ps(x->d + 8 * sb));
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            __m512i lo = two256(_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4));
            __m512i hi = two256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4));
            __m512i h01 = two256(_mm256_slli_epi16(_mm256_and_si256(hb, m2), 4),
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
            __m512i h23 = two256(_mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4),
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
            __m512i wv[2] = {_mm512_sub_epi8(_mm512_or_si512(lo, h01), _mm512_set1_epi8(32)),
                             _mm512_sub_epi8(_mm512_or_si512(hi, h23), _mm512_set1_epi8(32))};
            for (int t = 0; t < 2; t++) {  /* 64 values: groups g0 .. g0 + 3 of 16, x blocks 4h + 2t, + 1 */
                __m512i dot = sdot(wv[t], _mm512_loadu_si512(q + 128 * h + 64 * t));
                __m512 sg = _mm512_permutexvar_ps(_mm512_add_epi32(quad, _mm512_set1_epi32(8 * h + 4 * t)), scales);
                __m512 sx = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(4 * h + 2 * t)), dx);
                if (t) v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sg, sx), v1);
                else v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sg, sx), v0);
            }
        }
    }
    return hsum(_mm512_add_ps(v0, v1));
}
#endif

static float row_q4_k(const uint8_t *w, const xq_t *x, int64_t nb) {
#ifdef Q_AVX512
    return row_q4_k_avx512(w, x, nb);
#else
    float acc = 0.0f;
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + 144 * sb;
        const int8_t *q = x->q + 256 * sb;
        const float *dx = x->d + 8 * sb, *sx = x->s + 8 * sb;
#if defined(Q_AVX2)
        uint8_t sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        const uint8_t *qs = blk + 16;
        float d = half(blk), dmin = half(blk + 2), mins = 0.0f;
        for (int s = 0; s < 8; s++) mins += (float)mn[s] * sx[s];
        __m256 v = _mm256_setzero_ps();
        const __m256i m = _mm256_set1_epi8(0x0F);
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = udot(_mm256_and_si256(raw, m), _mm256_loadu_si256((const __m256i *)(q + 64 * c)));
            __m256i hi = udot(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m), _mm256_loadu_si256((const __m256i *)(q + 64 * c + 32)));
            v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(d * (float)sc[2 * c] * dx[2 * c]), v);
            v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(d * (float)sc[2 * c + 1] * dx[2 * c + 1]), v);
        }
        acc += hsum(v) - dmin * mins;
#else
        acc += sblk_q4_k(blk, q, dx, sx);
#endif
    }
    return acc;
#endif
}

static float row_q5_k(const uint8_t *w, const xq_t *x, int64_t nb) {
#ifdef Q_AVX512
    return row_q5_k_avx512(w, x, nb);
#else
    float acc = 0.0f;
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + 176 * sb;
        const int8_t *q = x->q + 256 * sb;
        const float *dx = x->d + 8 * sb, *sx = x->s + 8 * sb;
#if defined(Q_AVX2)
        uint8_t sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        const uint8_t *qs = blk + 48;
        float d = half(blk), dmin = half(blk + 2), mins = 0.0f;
        for (int s = 0; s < 8; s++) mins += (float)mn[s] * sx[s];
        __m256 v = _mm256_setzero_ps();
        const __m256i m = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4);
            __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4);
            __m256i lo = udot(_mm256_or_si256(_mm256_and_si256(raw, m), h0), _mm256_loadu_si256((const __m256i *)(q + 64 * c)));
            __m256i hi = udot(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m), h1),
                              _mm256_loadu_si256((const __m256i *)(q + 64 * c + 32)));
            v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(d * (float)sc[2 * c] * dx[2 * c]), v);
            v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(d * (float)sc[2 * c + 1] * dx[2 * c + 1]), v);
        }
        acc += hsum(v) - dmin * mins;
#else
        acc += sblk_q5_k(blk, q, dx, sx);
#endif
    }
    return acc;
#endif
}

static float row_q6_k(const uint8_t *w, const xq_t *x, int64_t nb) {
#ifdef Q_AVX512
    return row_q6_k_avx512(w, x, nb);
#else
    float acc = 0.0f;
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + 210 * sb;
        const int8_t *q = x->q + 256 * sb;
        const float *dx = x->d + 8 * sb;
#if defined(Q_AVX2)
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = half(blk + 208);
        const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
        __m256 v = _mm256_setzero_ps();
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            __m256i part[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4)),
            };
            for (int p = 0; p < 4; p++) {
                int g = 8 * h + 2 * p;
                __m256i dot = sdot(_mm256_sub_epi8(part[p], off), _mm256_loadu_si256((const __m256i *)(q + 128 * h + 32 * p)));
                float f = d * dx[4 * h + p];
                __m256 s = _mm256_set_m128(_mm_set1_ps(f * (float)sc[g + 1]), _mm_set1_ps(f * (float)sc[g]));
                v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, v);
            }
        }
        (void)off;
        acc += hsum(v);
#else
        acc += sblk_q6_k(blk, q, dx);
#endif
    }
    return acc;
#endif
}


/* values and bytes per block of each format; 0 for a type this file does not know */
int moeinf_block_geometry(int type, int *values, int *bytes) {
    switch (type) {
        case T_Q8_0: *values = 32; *bytes = 34; return 1;
        case T_Q4_0: *values = 32; *bytes = 18; return 1;
        case T_Q4_1: *values = 32; *bytes = 20; return 1;
        case T_MXFP4: *values = 32; *bytes = 17; return 1;
        case T_Q4_K: *values = 256; *bytes = 144; return 1;
        case T_Q5_K: *values = 256; *bytes = 176; return 1;
        case T_Q6_K: *values = 256; *bytes = 210; return 1;
        default: return 0;
    }
}

row_fn moeinf_row_function(int type) {
    switch (type) {
        case T_Q8_0: return row_q8_0;
        case T_Q4_0: return row_q4_0;
        case T_Q4_1: return row_q4_1;
        case T_MXFP4: return row_mxfp4;
        case T_Q4_K: return row_q4_k;
        case T_Q5_K: return row_q5_k;
        case T_Q6_K: return row_q6_k;
        default: return 0;
    }
}

/* ---------------------------------------------------------------- the product over the pool */

typedef struct {
    row_fn row;
    const uint8_t *W;
    int64_t N, K, row_bytes, M;
    const xq_t *x;           /* [M] */
    const uint16_t *bias;    /* bf16 [N] or NULL */
    void *y;                 /* [M, N] float32 or bf16 */
    int y_bf16;
} qgemv_job;

static void qgemv_task(void *arg, int tid, int nt) {
    qgemv_job *j = arg;
    int64_t lo, hi;
    split_rows_by(j->N, 4, tid, nt, &lo, &hi);
    for (int64_t n = lo; n < hi; n++) {
        const uint8_t *w = j->W + n * j->row_bytes;
        float bias = j->bias ? bf16_to_f32(j->bias[n]) : 0.0f;
        for (int64_t m = 0; m < j->M; m++) {
            float v = j->row(w, &j->x[m], j->K / 32) + bias;
            if (j->y_bf16) ((uint16_t *)j->y)[m * j->N + n] = f32_to_bf16(v);
            else ((float *)j->y)[m * j->N + n] = v;
        }
    }
}

static __thread void *scratch[SCRATCH_USERS];
static __thread size_t scratch_size[SCRATCH_USERS];

void *moeinf_scratch_for(int user, size_t bytes) {
    if (bytes > scratch_size[user]) {
        free(scratch[user]);
        scratch[user] = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        scratch_size[user] = scratch[user] ? bytes : 0;
    }
    return scratch[user];
}

/* y [M, N] (float32, or bf16 when y_bf16) = x [M, K] (float32, or bf16 when x_bf16) times W^T, W [N, K]
   stored as rows of blocks of format `type` (K a multiple of the block's values), bias bf16 [N] or
   NULL. Returns 0, or -1 for an unknown type, a K the format cannot hold, or no memory. */
int moeinf_qgemv(int type, const uint8_t *W, int64_t N, int64_t K, const void *x, int x_bf16, int64_t M,
                 const uint16_t *bias, void *y, int y_bf16, int nthreads) {
    int values, bytes;
    if (!moeinf_block_geometry(type, &values, &bytes) || K % values || M < 1) return -1;
    int64_t nb = K / 32;
    size_t need = (size_t)M * (size_t)K + 2 * sizeof(float) * (size_t)(M * nb) + sizeof(xq_t) * (size_t)M + 16;
    int8_t *mem = moeinf_scratch(need);
    if (!mem) return -1;
    float *d = (float *)(mem + ((size_t)M * (size_t)K + 15) / 16 * 16);
    float *s = d + M * nb;
    xq_t *xs = (xq_t *)(s + M * nb);
    for (int64_t m = 0; m < M; m++) {
        const void *xm = x_bf16 ? (const void *)((const uint16_t *)x + m * K) : (const void *)((const float *)x + m * K);
        moeinf_quantize_x(xm, x_bf16, K, mem + m * K, d + m * nb, s + m * nb);
        xs[m] = (xq_t){mem + m * K, d + m * nb, s + m * nb};
    }
    qgemv_job j = {moeinf_row_function(type), W, N, K, (int64_t)(K / values) * bytes, M, xs, bias, y, y_bf16};
    int nt = nthreads;
    if ((int64_t)nt * 4 > N) nt = (int)((N + 3) / 4);
    moeinf_pool_run(qgemv_task, &j, nt < 1 ? 1 : nt);
    return 0;
}
