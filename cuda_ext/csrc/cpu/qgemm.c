/* Prompt-shaped products (many tokens) with weights in their stored block formats and int8 activations:
   llama.cpp's way of multiplying a prompt, for float32 models that ask for it (``activations="int8"``,
   or ``"auto"`` on multi-token forwards: cuda_ext/quant.py).

   moeinf_qgemm   y [M, N] = x [M, K] W^T (+ bias), x, bias and y float32, W [N, K] rows of blocks of
                  q8_0, q4_0, q4_1, mxfp4, q4_k or q6_k (the GGUF layouts of quant.c).

   The activations are quantised once per call, per block, to int8 with one float scale per block
   (d = max|x| / 127, q = round(x / d), ties to even, as quant.c): blocks of 32 values for the 32-value
   formats (llama.cpp's Q8_0), of 256 for q4_k and q6_k (llama.cpp's Q8_K, which lets a super-block's
   integer sub-scales multiply integer sums: one float operation per 256 values instead of eight). The
   result differs from dequantise-then-multiply by the activations' rounding, at most
   sum_j |w_j| d_x(j) / 2 (d_x(j): the scale of the activation block holding j), plus float32 rounding of
   the sums; tests/test_cuda_ext_qgemm.py checks that bound.

   Layout of the work: one pool job of two phases. Phase 0 quantises the tokens (parts of the tokens);
   phase 1 takes blocks of 16 rows: each part unpacks its rows once into the thread's scratch (int8
   values, their block scales spread over the lanes that use them, the offsets' products), then runs
   every tile of 4 rows x T tokens over it, so each weight block is unpacked once per call and a tile's
   quantised activations stay in L1.

   Instruction sets, chosen at build time: AVX-512 VNNI + BW (vpdpbusd: 64 products per instruction for
   the 32-value formats, the activations offset by 128 to be the unsigned operand and the weights'
   sums taken back once per row; vpmaddubsw + vpdpwssd with the integer sub-scales for q4_k and q6_k),
   otherwise plain C on the same unpacked rows (the compiler vectorises it for AVX2). */

#include <stdlib.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define G_AVX512 1
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define PART_ROWS 16 /* rows unpacked together: the 4-row tiles of one part */
#define TR 4         /* rows per register tile */
#define TA 4         /* tokens per tile, 32-value formats */
#define TB 3         /* tokens per tile, q4_k / q6_k */
#define BAND_SIZE 16 /* tokens per band (AVX-512 q4_k / q5_k / q6_k) */

static const int8_t MXFP4_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static int is_k(int type) { return type == T_Q4_K || type == T_Q5_K || type == T_Q6_K; }
static int64_t up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

/* ---------------------------------------------------------------- sizes of the unpacked rows and tokens

   32-value formats (K64 = K rounded up to 64, NB16 = the blocks rounded up to 16):
     row:   int8 w [K64] | int32 corr [K64/4] = -128 * (sum of each 4 weights) | float dw [K64/4] (lane
            scales: chunk c's lanes 0-7 block 2c, 8-15 block 2c + 1) | float m [NB16] (q4_1's minimum)
     token: uint8 q + 128 [K64] | float dx [K64/4] (lane scales) | float s [NB16] = d * sum(q)
   q4_k / q5_k / q6_k (SB = K / 256 super-blocks), every super-block's 256 values in the order P0: byte
   64 c + 4 i + j holds value 16 i + 4 c + j (c: the 64-byte chunk, i: its 32-bit lane, j: the byte), so that
   lane i of every chunk holds values of the one group of 16 values i (one sub-scale: q6_k's sixteen,
   q4_k's and q5_k's eight of 32 values, each two groups): a plain vpdpbusd over the four chunks sums each
   group's products in its own lane, and the sub-scales multiply those sums once per super-block:
     row:   uint8 w [K] (q4_k 0..15, q5_k 0..31, q6_k 0..63) | float dsc [K/16] = d * sub-scale of each
            group of 16 (exact: an fp16 times a 6- or 8-bit integer) | float m [K/16] (each group's
            offset: q4_k and q5_k -dmin * min, q6_k -32 d sc)
     token: int8 q [K] (P0) | float d [SB] | float s [K/16] = d * sum(q) of each group of 16
   and, on AVX-512 from 16 tokens on, bands of 16 tokens (the tokens in the 32-bit lanes, llama.cpp's
   layout for its tiled k-quant kernels): dword p of the 16 tokens' P0 bytes side by side [K/4][16] |
   float d [SB][16] | q4_k, q5_k: float s [K/32][16] = d * sum(q) of each sub-block of 32; q6_k: int32
   [K/16][16] = -32 * sum(q) of each group of 16 (the offset of q6_k's codes, in the integer sums) */
typedef struct {
    int type, kq;
    int64_t K, K64, nb16;
    int64_t row_bytes, tok_bytes;
    int64_t o_corr, o_dw, o_m;   /* row offsets */
    int64_t o_dx, o_s;           /* token offsets */
    int64_t band_bytes, o_bdx, o_bs; /* a band of 16 tokens (q4_k / q5_k / q6_k on AVX-512) */
} geo_t;

static void geometry(int type, int64_t K, geo_t *g) {
    memset(g, 0, sizeof(*g));
    g->type = type;
    g->kq = is_k(type);
    g->K = K;
    if (g->kq) {
        int64_t sb = K / 256;
        g->K64 = K;
        g->o_dw = K;                   /* d x sub-scale of each 16 values */
        g->o_m = K + 4 * (K / 16);     /* each 16 values' offset */
        g->row_bytes = up(g->o_m + 4 * (K / 16), 64);
        g->o_dx = K;
        g->o_s = up(K + 4 * sb, 64);
        g->tok_bytes = up(g->o_s + 4 * (K / 16), 64);
        g->o_bdx = 16 * K;
        g->o_bs = 16 * K + 64 * sb;
        g->band_bytes = g->o_bs + 64 * (type == T_Q6_K ? K / 16 : K / 32);
    } else {
        g->K64 = up(K, 64);
        g->nb16 = up(K / 32, 16);
        g->o_corr = g->K64;
        g->o_dw = 2 * g->K64;
        g->o_m = 3 * g->K64;
        g->row_bytes = up(g->o_m + 4 * g->nb16, 64);
        g->o_dx = g->K64;
        g->o_s = 2 * g->K64;
        g->tok_bytes = up(g->o_s + 4 * g->nb16, 64);
    }
}

/* ---------------------------------------------------------------- unpacking one row */

/* 256 values in order -> P0 (see "sizes" above): byte 64 c + 4 i + j takes value 16 i + 4 c + j */
static void p0_order(const uint8_t *v, uint8_t *out) {
    for (int c = 0; c < 4; c++)
        for (int i = 0; i < 16; i++) memcpy(out + 64 * c + 4 * i, v + 16 * i + 4 * c, 4);
}

#ifdef G_AVX512
/* the sums of four vectors' lanes, out[0..3] = sum a, b, c, d (pairs of lanes added in one tree) */
static inline void reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float *out, int stride) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    float v[4];
    _mm_storeu_ps(v, q);
    for (int i = 0; i < 4; i++) out[i * stride] = v[i];
}

static inline __m512i pair256(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
/* the nibbles of two 16-byte groups as [lo a, hi a, lo b, hi b] (two 32-value blocks) */
static inline __m512i nib2(const uint8_t *a, const uint8_t *b) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                        _mm_loadu_si128((const __m128i *)b), 1);
    __m512i t = pair256(_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16(v, 4), m));
    return _mm512_shuffle_i64x2(t, t, _MM_SHUFFLE(3, 1, 2, 0));
}

/* the 32-value formats, two blocks (64 values) at a time; returns the blocks done */
static int64_t unpack_a_fast(const geo_t *g, const uint8_t *w, uint8_t *out) {
    const int64_t nb = g->K / 32;
    const int bytes = g->type == T_Q8_0 ? 34 : g->type == T_Q4_0 ? 18 : g->type == T_Q4_1 ? 20 : 17;
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)MXFP4_X2));
    const __m512i u128 = _mm512_set1_epi8((char)0x80), eight = _mm512_set1_epi8(8);
    float *m = (float *)(out + g->o_m);
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *b0 = w + bytes * b, *b1 = b0 + bytes;
        __m512i v;
        float d0, d1;
        if (g->type == T_Q8_0) {
            v = pair256(_mm256_loadu_si256((const __m256i *)(b0 + 2)), _mm256_loadu_si256((const __m256i *)(b1 + 2)));
            d0 = half(b0); d1 = half(b1);
        } else if (g->type == T_Q4_0) {
            v = _mm512_sub_epi8(nib2(b0 + 2, b1 + 2), eight);
            d0 = half(b0); d1 = half(b1);
        } else if (g->type == T_Q4_1) {
            v = nib2(b0 + 4, b1 + 4);
            d0 = half(b0); d1 = half(b1);
            m[b] = half(b0 + 2); m[b + 1] = half(b1 + 2);
        } else {
            v = _mm512_shuffle_epi8(lut, nib2(b0 + 1, b1 + 1));
            d0 = e8m0_half(b0[0]); d1 = e8m0_half(b1[0]);
        }
        const int64_t c = b / 2;
        _mm512_store_si512((void *)(out + 64 * c), v);
        __m512i corr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), u128, v));
        _mm512_store_si512((void *)((int32_t *)(out + g->o_corr) + 16 * c), corr);
        _mm512_store_ps((float *)(out + g->o_dw) + 16 * c,
                        _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1));
    }
    return b;
}

/* P0 of one super-block from its 256 values in order, four vectors of 64 (see "sizes" above): chunk c's
   lane i takes dword 4 i + c of the values; a dword transpose within each vector (lane c of 128 bits: its
   four groups' dword c), then a 4 x 4 transpose of 128-bit lanes across the four */
static inline void store_p0(uint8_t *dst, __m512i z0, __m512i z1, __m512i z2, __m512i z3) {
    const __m512i tr = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    z0 = _mm512_permutexvar_epi32(tr, z0);
    z1 = _mm512_permutexvar_epi32(tr, z1);
    z2 = _mm512_permutexvar_epi32(tr, z2);
    z3 = _mm512_permutexvar_epi32(tr, z3);
    const __m512i t0 = _mm512_shuffle_i64x2(z0, z1, 0x44), t1 = _mm512_shuffle_i64x2(z0, z1, 0xEE);
    const __m512i t2 = _mm512_shuffle_i64x2(z2, z3, 0x44), t3 = _mm512_shuffle_i64x2(z2, z3, 0xEE);
    _mm512_store_si512((void *)dst, _mm512_shuffle_i64x2(t0, t2, 0x88));
    _mm512_store_si512((void *)(dst + 64), _mm512_shuffle_i64x2(t0, t2, 0xDD));
    _mm512_store_si512((void *)(dst + 128), _mm512_shuffle_i64x2(t1, t3, 0x88));
    _mm512_store_si512((void *)(dst + 192), _mm512_shuffle_i64x2(t1, t3, 0xDD));
}

static void unpack_k_fast(const geo_t *g, const uint8_t *w, uint8_t *out) {
    const int64_t K = g->K;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    /* each group of 16 values' sub-block of 32: i / 2 */
    const __m512i half_idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    float *dsc = (float *)(out + g->o_dw), *m = (float *)(out + g->o_m);
    for (int64_t sb = 0; sb < K / 256; sb++) {
        uint8_t *v = out + 256 * sb;
        __m512i z[4];
        if (g->type == T_Q4_K || g->type == T_Q5_K) {
            const int q5 = g->type == T_Q5_K;
            const uint8_t *blk = w + (q5 ? 176 : 144) * sb, *qs = blk + (q5 ? 48 : 16);
            const __m128i scm = q4k_scales16(blk + 4);
            const __m512i sm32 = _mm512_cvtepu8_epi32(scm); /* lanes 0-7 sc, 8-15 mn */
            const __m256i hb = q5 ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) { /* values 64c..64c+31: low nibbles of qs[32c..], 64c+32..: high */
                __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                if (q5) { /* the fifth bit: bit 2c (2c + 1) of qh[l] */
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
                }
                z[c] = pair256(lo, hi);
            }
            const float d = half(blk), dmin = half(blk + 2);
            _mm512_store_ps(dsc + 16 * sb, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(half_idx, sm32)),
                                                         _mm512_set1_ps(d)));
            const __m512i mn_idx = _mm512_add_epi32(half_idx, _mm512_set1_epi32(8));
            _mm512_store_ps(m + 16 * sb, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(mn_idx, sm32)),
                                                       _mm512_set1_ps(-dmin)));
        } else {
            const uint8_t *blk = w + 210 * sb, *ql = blk, *qh = blk + 128;
            const __m512 scf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192))));
            const float dd = half(blk + 208);
            for (int h = 0; h < 2; h++) {
                __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h));
                __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
                __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
                __m256i p0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
                __m256i p1 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
                __m256i p2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4));
                __m256i p3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
                z[2 * h] = pair256(p0, p1);
                z[2 * h + 1] = pair256(p2, p3);
            }
            _mm512_store_ps(dsc + 16 * sb, _mm512_mul_ps(scf, _mm512_set1_ps(dd)));
            _mm512_store_ps(m + 16 * sb, _mm512_mul_ps(scf, _mm512_set1_ps(-32.0f * dd)));
        }
        store_p0(v, z[0], z[1], z[2], z[3]);
    }
}
#endif

static void unpack_row(const geo_t *g, const uint8_t *w, uint8_t *out) {
    const int64_t K = g->K;
    if (g->kq) {
#ifdef G_AVX512
        unpack_k_fast(g, w, out);
        return;
#endif
        float *dsc = (float *)(out + g->o_dw), *m = (float *)(out + g->o_m);
        uint8_t v[256];
        for (int64_t sb = 0; sb < K / 256; sb++) {
            float *ds = dsc + 16 * sb, *ms = m + 16 * sb;
            if (g->type == T_Q4_K || g->type == T_Q5_K) { /* q5_k: a value's fifth bit in qh (bit 2c, 2c + 1 of byte l) */
                const int q5 = g->type == T_Q5_K;
                const uint8_t *blk = w + (q5 ? 176 : 144) * sb, *qh = blk + 16, *qs = blk + (q5 ? 48 : 16);
                uint8_t sc[8], mn[8];
                q4k_scales(blk + 4, sc, mn);
                const float d = half(blk), dmin = half(blk + 2);
                for (int c = 0; c < 4; c++)
                    for (int l = 0; l < 32; l++) {
                        v[64 * c + l] = (uint8_t)((qs[32 * c + l] & 0x0F) | (q5 ? ((qh[l] >> (2 * c)) & 1) << 4 : 0));
                        v[64 * c + 32 + l] = (uint8_t)((qs[32 * c + l] >> 4) | (q5 ? ((qh[l] >> (2 * c + 1)) & 1) << 4 : 0));
                    }
                for (int i = 0; i < 16; i++) {
                    ds[i] = d * (float)sc[i / 2];
                    ms[i] = -(dmin * (float)mn[i / 2]);
                }
            } else {
                const uint8_t *blk = w + 210 * sb, *ql = blk, *qh = blk + 128;
                const int8_t *sc = (const int8_t *)(blk + 192);
                const float dd = half(blk + 208);
                for (int h = 0; h < 2; h++)
                    for (int p = 0; p < 4; p++)
                        for (int l = 0; l < 32; l++) {
                            uint8_t low = ql[64 * h + 32 * (p & 1) + l];
                            v[128 * h + 32 * p + l] =
                                (uint8_t)((p < 2 ? low & 0x0F : low >> 4) | (((qh[32 * h + l] >> (2 * p)) & 3) << 4));
                        }
                for (int i = 0; i < 16; i++) {
                    ds[i] = dd * (float)sc[i];
                    ms[i] = -32.0f * dd * (float)sc[i];
                }
            }
            p0_order(v, out + 256 * sb);
        }
        return;
    }
    int8_t *wv = (int8_t *)out;
    int32_t *corr = (int32_t *)(out + g->o_corr);
    float *dw = (float *)(out + g->o_dw), *m = (float *)(out + g->o_m);
    const int64_t nb = K / 32;
    int64_t b = 0;
#ifdef G_AVX512
    b = unpack_a_fast(g, w, out);
#endif
    /* the padding: a last odd block's partner, q4_1's minima up to a multiple of 16 blocks */
    memset(out + 32 * nb, 0, (size_t)(g->K64 - 32 * nb));
    if (nb % 2) {
        memset((int32_t *)(out + g->o_corr) + 8 * nb, 0, 32);
        memset((float *)(out + g->o_dw) + 8 * nb, 0, 32);
    }
    memset(m + nb, 0, sizeof(float) * (size_t)(g->nb16 - nb));
    for (; b < nb; b++) {
        int8_t *v = wv + 32 * b;
        float d;
        if (g->type == T_Q8_0) {
            const uint8_t *blk = w + 34 * b;
            d = half(blk);
            memcpy(v, blk + 2, 32);
        } else if (g->type == T_Q4_0) {
            const uint8_t *blk = w + 18 * b;
            d = half(blk);
            for (int j = 0; j < 16; j++) {
                v[j] = (int8_t)((blk[2 + j] & 0x0F) - 8);
                v[j + 16] = (int8_t)((blk[2 + j] >> 4) - 8);
            }
        } else if (g->type == T_Q4_1) {
            const uint8_t *blk = w + 20 * b;
            d = half(blk);
            m[b] = half(blk + 2);
            for (int j = 0; j < 16; j++) {
                v[j] = (int8_t)(blk[4 + j] & 0x0F);
                v[j + 16] = (int8_t)(blk[4 + j] >> 4);
            }
        } else { /* mxfp4 */
            const uint8_t *blk = w + 17 * b;
            d = e8m0_half(blk[0]);
            for (int j = 0; j < 16; j++) {
                v[j] = MXFP4_X2[blk[1 + j] & 0x0F];
                v[j + 16] = MXFP4_X2[blk[1 + j] >> 4];
            }
        }
        float *lanes = dw + 16 * (b / 2) + 8 * (b & 1);
        for (int i = 0; i < 8; i++) {
            lanes[i] = d;
            corr[8 * b + i] = -128 * (v[4 * i] + v[4 * i + 1] + v[4 * i + 2] + v[4 * i + 3]);
        }
    }
}

/* ---------------------------------------------------------------- quantising one token */

static void quant_token(const geo_t *g, const float *x, uint8_t *out) {
    const int64_t K = g->K;
    if (g->kq) {
        int8_t *q = (int8_t *)out;
        float *d = (float *)(out + g->o_dx), *s = (float *)(out + g->o_s);
        int8_t qs[256] __attribute__((aligned(64))); /* the super-block in order, then P0 */
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const float *xs = x + 256 * sb;
            float amax = 0.0f;
#ifdef __AVX512F__
            __m512 mx = _mm512_setzero_ps();
            for (int j = 0; j < 256; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xs + j)));
            amax = _mm512_reduce_max_ps(mx);
#else
            for (int j = 0; j < 256; j++) amax = fmaxf(amax, fabsf(xs[j]));
#endif
            const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
            d[sb] = dd;
#ifdef __AVX512F__
            const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
            for (int gi = 0; gi < 16; gi++) {
                __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xs + 16 * gi), _mm512_set1_ps(id)));
                v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
                _mm_storeu_si128((__m128i *)(qs + 16 * gi), _mm512_cvtepi32_epi8(v));
                s[16 * sb + gi] = dd * (float)_mm512_reduce_add_epi32(v);
            }
#else
            for (int gi = 0; gi < 16; gi++) {
                int sum = 0;
                for (int j = 0; j < 16; j++) {
                    int v = (int)nearbyintf(xs[16 * gi + j] * id);
                    v = v > 127 ? 127 : (v < -127 ? -127 : v);
                    qs[16 * gi + j] = (int8_t)v;
                    sum += v;
                }
                s[16 * sb + gi] = dd * (float)sum;
            }
#endif
#ifdef G_AVX512
            store_p0((uint8_t *)(q + 256 * sb), _mm512_load_si512((const void *)qs), _mm512_load_si512((const void *)(qs + 64)),
                     _mm512_load_si512((const void *)(qs + 128)), _mm512_load_si512((const void *)(qs + 192)));
#else
            p0_order((const uint8_t *)qs, (uint8_t *)(q + 256 * sb));
#endif
        }
        return;
    }
    uint8_t *qu = out;
    float *dx = (float *)(out + g->o_dx), *s = (float *)(out + g->o_s);
    const int64_t nb = K / 32;
    memset(out, 0, (size_t)g->tok_bytes);
    memset(qu + 32 * nb, 128, (size_t)(g->K64 - 32 * nb));
    int8_t q[32];
    for (int64_t b = 0; b < nb; b++) {
        float d;
        int sum = moeinf_quantize_block(x + 32 * b, q, &d);
        for (int j = 0; j < 32; j++) qu[32 * b + j] = (uint8_t)(q[j] + 128);
        float *lanes = dx + 16 * (b / 2) + 8 * (b & 1);
        for (int i = 0; i < 8; i++) lanes[i] = d;
        s[b] = d * (float)sum;
    }
}

/* ---------------------------------------------------------------- bands: 8 rows x 16 tokens

   For q4_k, q5_k and q6_k from 16 tokens on (AVX-512): 16 tokens in the lanes of a vector, each row's four
   weights of a dword broadcast, one vpdpbusd per 4 values x 16 tokens; a sub-block's integer sums (q6_k's
   from -32 * sum(q)) meet the row's d * sub-scale in one FMA for all 16 tokens, and the token's d once per
   super-block: the scales' work is spread over 16 tokens instead of falling on each. */
#ifdef G_AVX512
#define BAND BAND_SIZE
#define BR 8 /* rows per band tile */
#define BAND_MIN_LAST 9 /* fewer tokens left over than this: the tiles of TB tokens, else one padded band (measured: even at 8) */

/* token `lane` of a band from its quantised P0 bytes `tk` (quant_token) */
static void band_put(const geo_t *g, const uint8_t *tk, uint8_t *band, int lane) {
    const int64_t K = g->K;
    const int q6 = g->type == T_Q6_K;
    const float *dx = (const float *)(tk + g->o_dx);
    const __m512i ones = _mm512_set1_epi8(1);
    int32_t *codes = (int32_t *)band;
    float *bdx = (float *)(band + g->o_bdx);
    for (int64_t sb = 0; sb < K / 256; sb++) {
        __m512i gs = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_load_si512((const void *)(tk + 256 * sb + 64 * c));
            gs = _mm512_dpbusd_epi32(gs, ones, v); /* lane i: the sum of group i's codes */
            int32_t w[16];
            _mm512_storeu_si512((void *)w, v);
            for (int i = 0; i < 16; i++) codes[(64 * sb + 16 * c + i) * BAND + lane] = w[i];
        }
        bdx[sb * BAND + lane] = dx[sb];
        int32_t sum[16];
        _mm512_storeu_si512((void *)sum, gs);
        if (q6) {
            int32_t *bs = (int32_t *)(band + g->o_bs);
            for (int i = 0; i < 16; i++) bs[(16 * sb + i) * BAND + lane] = -32 * sum[i];
        } else {
            float *bs = (float *)(band + g->o_bs);
            for (int i = 0; i < 8; i++) bs[(8 * sb + i) * BAND + lane] = dx[sb] * (float)(sum[2 * i] + sum[2 * i + 1]);
        }
    }
}

/* rows [BR] (P0-unpacked, g->row_bytes apart) x the band's 16 tokens: out[r * BAND + t] */
static void band_tile(const geo_t *g, const uint8_t *rows, const uint8_t *band, float *out) {
    const int64_t rb = g->row_bytes, K = g->K;
    const uint8_t *codes = band;
    __m512 facc[BR];
    for (int r = 0; r < BR; r++) facc[r] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; sb++) {
        __m512 fs[BR];
        for (int r = 0; r < BR; r++) fs[r] = _mm512_setzero_ps();
        if (g->type == T_Q6_K) {
            const int32_t *bs = (const int32_t *)(band + g->o_bs) + 16 * sb * BAND;
            for (int i = 0; i < 16; i++) {
                __m512i acc[BR];
                const __m512i init = _mm512_load_si512((const void *)(bs + i * BAND));
                for (int r = 0; r < BR; r++) acc[r] = init;
                for (int c = 0; c < 4; c++) {
                    const int64_t dw = 64 * sb + 16 * c + i;
                    const __m512i xv = _mm512_load_si512((const void *)(codes + 64 * dw));
                    for (int r = 0; r < BR; r++)
                        acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(*(const int32_t *)(rows + r * rb + 4 * dw)), xv);
                }
                for (int r = 0; r < BR; r++) {
                    const float dsc = ((const float *)(rows + r * rb + g->o_dw))[16 * sb + i];
                    fs[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_set1_ps(dsc), fs[r]);
                }
            }
        } else {
            const float *bs = (const float *)(band + g->o_bs) + 8 * sb * BAND;
            for (int s = 0; s < 8; s++) {
                __m512i acc[BR];
                for (int r = 0; r < BR; r++) acc[r] = _mm512_setzero_si512();
                for (int c = 0; c < 4; c++)
                    for (int h = 0; h < 2; h++) {
                        const int64_t dw = 64 * sb + 16 * c + 2 * s + h;
                        const __m512i xv = _mm512_load_si512((const void *)(codes + 64 * dw));
                        for (int r = 0; r < BR; r++)
                            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(*(const int32_t *)(rows + r * rb + 4 * dw)), xv);
                    }
                const __m512 sv = _mm512_load_ps(bs + s * BAND);
                for (int r = 0; r < BR; r++) {
                    const float *rw = (const float *)(rows + r * rb + g->o_dw);
                    const float dsc = rw[16 * sb + 2 * s];
                    const float m = ((const float *)(rows + r * rb + g->o_m))[16 * sb + 2 * s];
                    fs[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_set1_ps(dsc), fs[r]);
                    facc[r] = _mm512_fmadd_ps(_mm512_set1_ps(m), sv, facc[r]);
                }
            }
        }
        const __m512 dxv = _mm512_load_ps((const float *)(band + g->o_bdx) + sb * BAND);
        for (int r = 0; r < BR; r++) facc[r] = _mm512_fmadd_ps(fs[r], dxv, facc[r]);
    }
    for (int r = 0; r < BR; r++) _mm512_storeu_ps(out + r * BAND, facc[r]);
}
#endif

/* ---------------------------------------------------------------- the tiles: 4 rows x T tokens

   rows: the part's unpacked rows (g->row_bytes apart), toks: the tile's quantised tokens (g->tok_bytes
   apart); out[r * T + t] */
#ifdef G_AVX512
ALWAYS_INLINE void tile_a(const geo_t *g, int T, int mins, const uint8_t *rows, const uint8_t *toks, float *out) {
    const int64_t rb = g->row_bytes, tb = g->tok_bytes;
    __m512 acc[TR][TA];
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < g->K64 / 64; c++) {
        __m512i wv[TR], cv[TR];
        __m512 dw[TR];
        for (int r = 0; r < TR; r++) {
            const uint8_t *rw = rows + r * rb;
            wv[r] = _mm512_load_si512((const void *)(rw + 64 * c));
            cv[r] = _mm512_load_si512((const void *)((const int32_t *)(rw + g->o_corr) + 16 * c));
            dw[r] = _mm512_load_ps((const float *)(rw + g->o_dw) + 16 * c);
        }
        for (int t = 0; t < T; t++) {
            const uint8_t *tk = toks + t * tb;
            const __m512i xv = _mm512_load_si512((const void *)(tk + 64 * c));
            const __m512 dx = _mm512_load_ps((const float *)(tk + g->o_dx) + 16 * c);
            for (int r = 0; r < TR; r++) {
                __m512i dot = _mm512_dpbusd_epi32(cv[r], xv, wv[r]);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dx, dw[r]), acc[r][t]);
            }
        }
    }
    if (mins)
        for (int64_t i = 0; i < g->nb16 / 16; i++)
            for (int t = 0; t < T; t++) {
                const __m512 s = _mm512_load_ps((const float *)(toks + t * tb + g->o_s) + 16 * i);
                for (int r = 0; r < TR; r++)
                    acc[r][t] = _mm512_fmadd_ps(_mm512_load_ps((const float *)(rows + r * rb + g->o_m) + 16 * i), s, acc[r][t]);
            }
    for (int t = 0; t < T; t++) reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t], out + t, T);
}

/* q4_k / q5_k / q6_k: per super-block, a plain vpdpbusd per 64 values (weights unsigned, activations
   signed) into lanes that each hold one group of 16 (P0); then per lane the group's d * sub-scale, the
   token's d, and the group's offset times the token's sum */
ALWAYS_INLINE void tile_b(const geo_t *g, int T, const uint8_t *rows, const uint8_t *toks, float *out) {
    const int64_t rb = g->row_bytes, tb = g->tok_bytes;
    __m512 acc[TR][TB];
    for (int r = 0; r < TR; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < g->K / 256; sb++) {
        __m512i ai[TR][TB];
        for (int r = 0; r < TR; r++)
            for (int t = 0; t < T; t++) ai[r][t] = _mm512_setzero_si512();
        for (int ch = 0; ch < 4; ch++) {
            const int64_t off = 256 * sb + 64 * ch;
            __m512i wv[TR];
            for (int r = 0; r < TR; r++) wv[r] = _mm512_load_si512((const void *)(rows + r * rb + off));
            for (int t = 0; t < T; t++) {
                const __m512i xv = _mm512_load_si512((const void *)(toks + t * tb + off));
                for (int r = 0; r < TR; r++) ai[r][t] = _mm512_dpbusd_epi32(ai[r][t], wv[r], xv);
            }
        }
        for (int r = 0; r < TR; r++) {
            const __m512 dsc = _mm512_load_ps((const float *)(rows + r * rb + g->o_dw) + 16 * sb);
            const __m512 m = _mm512_load_ps((const float *)(rows + r * rb + g->o_m) + 16 * sb);
            for (int t = 0; t < T; t++) {
                const __m512 dx = _mm512_set1_ps(((const float *)(toks + t * tb + g->o_dx))[sb]);
                const __m512 s = _mm512_load_ps((const float *)(toks + t * tb + g->o_s) + 16 * sb);
                acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ai[r][t]), dsc), dx, acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(m, s, acc[r][t]);
            }
        }
    }
    for (int t = 0; t < T; t++) reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t], out + t, T);
}
#else
/* plain C on the same unpacked rows: integer sums per block (or super-block), then the float scales */
static void tile_a(const geo_t *g, int T, int mins, const uint8_t *rows, const uint8_t *toks, float *out) {
    for (int r = 0; r < TR; r++) {
        const uint8_t *rw = rows + r * g->row_bytes;
        const int8_t *w = (const int8_t *)rw;
        const float *dw = (const float *)(rw + g->o_dw), *m = (const float *)(rw + g->o_m);
        for (int t = 0; t < T; t++) {
            const uint8_t *tk = toks + t * g->tok_bytes;
            const float *dx = (const float *)(tk + g->o_dx), *s = (const float *)(tk + g->o_s);
            float acc = 0.0f;
            for (int64_t b = 0; b < g->K64 / 32; b++) {
                int32_t sum = 0;
                for (int j = 0; j < 32; j++) sum += (int32_t)w[32 * b + j] * ((int32_t)tk[32 * b + j] - 128);
                const int64_t lane = 16 * (b / 2) + 8 * (b & 1);
                acc += (float)sum * (dw[lane] * dx[lane]);
            }
            if (mins)
                for (int64_t b = 0; b < g->nb16; b++) acc += m[b] * s[b];
            out[r * T + t] = acc;
        }
    }
}

static void tile_b(const geo_t *g, int T, const uint8_t *rows, const uint8_t *toks, float *out) {
    for (int r = 0; r < TR; r++) {
        const uint8_t *rw = rows + r * g->row_bytes;
        const float *dsc = (const float *)(rw + g->o_dw), *m = (const float *)(rw + g->o_m);
        for (int t = 0; t < T; t++) {
            const uint8_t *tk = toks + t * g->tok_bytes;
            const int8_t *q = (const int8_t *)tk;
            const float *dx = (const float *)(tk + g->o_dx), *s = (const float *)(tk + g->o_s);
            float acc = 0.0f;
            for (int64_t sb = 0; sb < g->K / 256; sb++) {
                int32_t sum[16] = {0};
                for (int c = 0; c < 4; c++)
                    for (int i = 0; i < 16; i++)
                        for (int j = 0; j < 4; j++) {
                            const int64_t p = 256 * sb + 64 * c + 4 * i + j;
                            sum[i] += (int32_t)rw[p] * q[p];
                        }
                for (int i = 0; i < 16; i++)
                    acc += (float)sum[i] * dsc[16 * sb + i] * dx[sb] + m[16 * sb + i] * s[16 * sb + i];
            }
            out[r * T + t] = acc;
        }
    }
}
#endif

/* one tile of up to T tokens (`count`), each tile size its own straight-line code */
static void run_tile(const geo_t *g, int count, const uint8_t *rows, const uint8_t *toks, float *out) {
    if (g->kq) {
        switch (count) {
            case 3: tile_b(g, 3, rows, toks, out); break;
            case 2: tile_b(g, 2, rows, toks, out); break;
            default: tile_b(g, 1, rows, toks, out); break;
        }
        return;
    }
    const int mins = g->type == T_Q4_1;
    if (mins) {
        switch (count) {
            case 4: tile_a(g, 4, 1, rows, toks, out); break;
            case 3: tile_a(g, 3, 1, rows, toks, out); break;
            case 2: tile_a(g, 2, 1, rows, toks, out); break;
            default: tile_a(g, 1, 1, rows, toks, out); break;
        }
    } else {
        switch (count) {
            case 4: tile_a(g, 4, 0, rows, toks, out); break;
            case 3: tile_a(g, 3, 0, rows, toks, out); break;
            case 2: tile_a(g, 2, 0, rows, toks, out); break;
            default: tile_a(g, 1, 0, rows, toks, out); break;
        }
    }
}

/* ---------------------------------------------------------------- the product over the pool */

static __thread uint8_t *row_scratch;
static __thread size_t row_scratch_size;

static uint8_t *rows_buffer(size_t bytes) {
    if (bytes > row_scratch_size) {
        free(row_scratch);
        row_scratch = aligned_alloc(64, up((int64_t)bytes, 64));
        row_scratch_size = row_scratch ? bytes : 0;
    }
    return row_scratch;
}

typedef struct {
    geo_t g;
    const uint8_t *W, *U; /* U: the up matrix of a SwiGLU (moeinf_qgemm_swiglu), else NULL */
    int64_t N, M, wrow_bytes;
    const float *x, *bias;
    float *y;
    uint8_t *xq; /* [M] tokens of g.tok_bytes */
    uint8_t *bands; /* [nbands] of g.band_bytes: tokens 0 .. BAND * nbands - 1 (the last band may be padded) */
    int64_t nbands;
    int failed;
} qgemm_job;

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static void qgemm_phase(void *arg, int phase, int part, int parts) {
    qgemm_job *j = arg;
    const geo_t *g = &j->g;
    if (phase == 0) {
        for (int64_t m = j->M * part / parts; m < j->M * (part + 1) / parts; m++)
        {
            quant_token(g, j->x + m * g->K, j->xq + m * g->tok_bytes);
#ifdef G_AVX512
            if (m < BAND * j->nbands)
                band_put(g, j->xq + m * g->tok_bytes, j->bands + (m / BAND) * g->band_bytes, (int)(m % BAND));
#endif
        }
        return;
    }
    const int64_t n0 = (int64_t)PART_ROWS * part, n1 = n0 + PART_ROWS < j->N ? n0 + PART_ROWS : j->N;
    if (n0 >= n1) return;
    const int mats = j->U ? 2 : 1;
    uint8_t *rows = rows_buffer((size_t)(mats * PART_ROWS * g->row_bytes));
    if (!rows) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    const int64_t live = n1 - n0, padded = up(live, 8);
    for (int mat = 0; mat < mats; mat++) {
        const uint8_t *W = mat ? j->U : j->W;
        uint8_t *dst = rows + mat * PART_ROWS * g->row_bytes;
        for (int64_t r = 0; r < live; r++) {
#if defined(__AVX2__) || defined(__AVX512F__)
            /* the row after next, from memory while this one unpacks (the rows go by once per call) */
            if (n0 + r + 2 < j->N) {
                const char *next = (const char *)(W + (n0 + r + 2) * j->wrow_bytes);
                for (int64_t l = 0; l < j->wrow_bytes; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
            }
#endif
            unpack_row(g, W + (n0 + r) * j->wrow_bytes, dst + r * g->row_bytes);
        }
        if (padded > live) memset(dst + live * g->row_bytes, 0, (size_t)((padded - live) * g->row_bytes));
    }
    int64_t tstart = 0;
#ifdef G_AVX512
    float bout[BR * BAND], bout_up[BR * BAND];
    for (int64_t bi = 0; bi < j->nbands; bi++) {
        const uint8_t *band = j->bands + bi * g->band_bytes;
        const int64_t t0 = BAND * bi;
        const int count = (int)(j->M - t0 < BAND ? j->M - t0 : BAND);
        for (int64_t r0 = 0; r0 < live; r0 += BR) {
            band_tile(g, rows + r0 * g->row_bytes, band, bout);
            if (j->U) {
                band_tile(g, rows + (PART_ROWS + r0) * g->row_bytes, band, bout_up);
                for (int i = 0; i < BR * BAND; i++) bout[i] = silu(bout[i]) * bout_up[i];
            }
            for (int r = 0; r < BR && r0 + r < live; r++) {
                const int64_t n = n0 + r0 + r;
                const float b = j->bias ? j->bias[n] : 0.0f;
                for (int t = 0; t < count; t++) j->y[(t0 + t) * j->N + n] = bout[r * BAND + t] + b;
            }
        }
    }
    tstart = j->nbands * BAND;
#endif
    const int T = g->kq ? TB : TA;
    float out[TR * TA], out_up[TR * TA];
    for (int64_t t0 = tstart; t0 < j->M; t0 += T) {
        const int count = (int)(j->M - t0 < T ? j->M - t0 : T);
        for (int64_t r0 = 0; r0 < live; r0 += TR) {
            run_tile(g, count, rows + r0 * g->row_bytes, j->xq + t0 * g->tok_bytes, out);
            if (j->U) {
                run_tile(g, count, rows + (PART_ROWS + r0) * g->row_bytes, j->xq + t0 * g->tok_bytes, out_up);
                for (int i = 0; i < TR * count; i++) out[i] = silu(out[i]) * out_up[i];
            }
            for (int r = 0; r < TR && r0 + r < live; r++) {
                const int64_t n = n0 + r0 + r;
                const float b = j->bias ? j->bias[n] : 0.0f;
                for (int t = 0; t < count; t++) j->y[(t0 + t) * j->N + n] = out[r * count + t] + b;
            }
        }
    }
}

/* y [M, N] = x [M, K] W^T (+ bias [N], or NULL), all float32, W [N, K] stored as rows of blocks of format
   `type` (K a multiple of the block's values). Returns 0, or -1 for an unknown type, a K the format cannot
   hold, or no memory. */
static int qgemm_run(int type, const uint8_t *W, const uint8_t *U, int64_t N, int64_t K, const float *x, int64_t M,
                     const float *bias, float *y, int nthreads) {
    int values, bytes;
    if (!moeinf_block_geometry(type, &values, &bytes) || K % values || M < 1 || N < 1 || K < 1) return -1;
    qgemm_job j;
    memset(&j, 0, sizeof(j));
    geometry(type, K, &j.g);
    j.W = W; j.U = U; j.N = N; j.M = M; j.wrow_bytes = K / values * bytes; j.x = x; j.bias = bias; j.y = y;
#ifdef G_AVX512
    /* the bands: every whole 16 tokens, and a last part of at least BAND_MIN_LAST (padded with zeros); the
       tokens after them go through the tiles of 4 rows x TB */
    if (j.g.kq) j.nbands = M / BAND + (M % BAND >= BAND_MIN_LAST);
#endif
    j.xq = moeinf_scratch((size_t)(M * j.g.tok_bytes + j.nbands * j.g.band_bytes));
    if (!j.xq) return -1;
    j.bands = j.xq + M * j.g.tok_bytes;
    if (j.nbands * BAND_SIZE > M) memset(j.bands + (j.nbands - 1) * j.g.band_bytes, 0, (size_t)j.g.band_bytes);
    int parts = (int)((N + PART_ROWS - 1) / PART_ROWS);
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > parts) nt = parts;
    moeinf_pool_run_phases(qgemm_phase, &j, 2, parts, nt);
    return j.failed ? -1 : 0;
}

int moeinf_qgemm(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M, const float *bias,
                 float *y, int nthreads) {
    return qgemm_run(type, W, 0, N, K, x, M, bias, y, nthreads);
}

/* h [M, N] = silu(x Wg^T) * (x Wu^T): a SwiGLU expert's gate and up products in one job (x quantised once,
   each part's gate and up rows unpacked together), Wg and Wu [N, K] of one format. Returns as moeinf_qgemm. */
int moeinf_qgemm_swiglu(int type, const uint8_t *Wg, const uint8_t *Wu, int64_t N, int64_t K, const float *x,
                        int64_t M, float *h, int nthreads) {
    return qgemm_run(type, Wg, Wu, N, K, x, M, 0, h, nthreads);
}
