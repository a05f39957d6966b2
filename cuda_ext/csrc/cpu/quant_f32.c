/* Products with weights kept in their stored block formats (q8_0, q4_0, q4_1, q4_k, q5_k, q6_k, mxfp4: the
   GGUF layouts of quant.c) and float32 activations, for one-token decode and small batches.

   Each block is dequantised in registers to exactly the float32 values engine/formats' unpack gives
   (and the gguf package's dequantiser): every stored value is an exact product of its scale and code
   (an fp16 scale has 11 significant bits, a 6-bit sub-scale 6, a code at most 8: never more than 24
   bits together), and the affine formats (q4_1, q4_k, q5_k) add their offset with the one rounding of an FMA,
   as unpack's multiply-then-add rounds once. Those values meet the float32 activations in float32
   FMAs; no activation is rounded. The result is dequantise-then-multiply up to the order of the sums.

   The order of the sums, the same on every token count, thread count and vectorised build (AVX-512,
   AVX2 + FMA; portable C rounds each product before adding it, so its bits may differ): the row's
   32-value chunks c (a block, or a sub-block of a 256-value super-block) feed 64 float32 lanes,
   product j of chunk c to lane 32 (c & 1) + j, in chunk order; then the lanes are summed pairwise
   (lane j + lane j + 32, then j + 16, j + 8, j + 4, j + 2, j + 1). Each output is so a sum whose
   longest chain holds ceil(K / 64) fused products and 6 additions: its error against the exact
   sum of the products is at most about (K / 64 + 7) * 2^-24 * sum_j |x_j w_j|.

   moeinf_fgemv           y[m] = W x[m] (+ bias) for m < M tokens, W [N, K] in one format, float32 x,
                          bias and y; rows split over the thread pool, each row's blocks dequantised
                          once for up to four tokens (AVX-512); for more, blocks of rows (about
                          BLOCK_BYTES of weights, kept in L2) go through each tile of tokens in turn,
                          whose x stays in L1.
   moeinf_frow_function   one row times one float32 x.
   moeinf_fmrows_function n rows times one float32 x (moe.c's experts, one-token moeinf_fgemv): on
                          AVX-512 four rows at a time, x read once for the four and each 64 values of it
                          kept in registers while the four rows' blocks are unpacked against them (q5_k
                          row by row); every row the same sums, in the same order, as the one-row kernel. */

#include "common.h"

#if defined(__AVX512F__)
#define F_AVX512 1
#define TILE 4 /* tokens sharing one dequantisation of a block */
#elif defined(__AVX2__) && defined(__FMA__)
#define F_AVX2 1
#define TILE 1
#else
#define TILE 4
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#ifndef PF_AHEAD
#define PF_AHEAD 1024 /* bytes of the weights read ahead of the blocks being multiplied */
#endif

static int block_bytes(int type) {
    switch (type) {
        case T_Q8_0: return 34;
        case T_Q4_0: return 18;
        case T_Q4_1: return 20;
        case T_MXFP4: return 17;
        case T_Q4_K: return 144;
        case T_Q5_K: return 176;
        case T_Q6_K: return 210;
        default: return 0;
    }
}

/* ---------------------------------------------------------------- AVX-512: 32 values = 2 x 16 lanes */
#ifdef F_AVX512
static inline __m512i bytes16(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline __m512 cvt(__m512i v) { return _mm512_cvtepi32_ps(v); }
static inline __m512i low4(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
static inline __m512i high4(__m512i v) { return _mm512_srli_epi32(v, 4); }

static inline __m512 iota16(void) { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

/* the 16 values of a block's 4-bit codes (lut) looked up for the low and the high nibbles of the 16
   bytes at p (vpermps reads the low 4 bits of each lane): one table per block instead of a
   conversion and a scaling per value */
ALWAYS_INLINE void lookup_nibbles(const uint8_t *p, __m512 lut, __m512 *lo, __m512 *hi) {
    const __m512i t = bytes16(p);
    *lo = _mm512_permutexvar_ps(t, lut);
    *hi = _mm512_permutexvar_ps(high4(t), lut);
}

/* one 32-value block of a 32-block format: values 0..15 in *lo, 16..31 in *hi */
ALWAYS_INLINE void deq_block(int type, const uint8_t *b, __m512 *lo, __m512 *hi) {
    if (type == T_Q8_0) {
        const __m512 d = _mm512_set1_ps(half(b));
        *lo = _mm512_mul_ps(cvt(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)))), d);
        *hi = _mm512_mul_ps(cvt(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)))), d);
    } else if (type == T_Q4_0) { /* d * (q - 8) */
        const __m512 lut = _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f)), _mm512_set1_ps(half(b)));
        lookup_nibbles(b + 2, lut, lo, hi);
    } else if (type == T_Q4_1) { /* d * q + m, d and m converted together */
        int32_t dm_bits;
        memcpy(&dm_bits, b, 4);
        const __m512 dm = _mm512_cvtph_ps(_mm256_set1_epi32(dm_bits)); /* d, m, d, m, ... */
        const __m512 lut = _mm512_fmadd_ps(iota16(), _mm512_moveldup_ps(dm), _mm512_movehdup_ps(dm));
        lookup_nibbles(b + 4, lut, lo, hi);
    } else { /* mxfp4: twice the E2M1 value (code 8 is +0) times half the block scale */
        const __m512 doubled = _mm512_setr_ps(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        lookup_nibbles(b + 1, _mm512_mul_ps(doubled, _mm512_set1_ps(e8m0_half(b[0]))), lo, hi);
    }
}

/* chunk values lo, hi times the tokens' x (x + t * ldx), into lanes 32 * odd .. 32 * odd + 31 */
ALWAYS_INLINE void acc_chunk(__m512 (*a)[4], int mt, int odd, __m512 lo, __m512 hi, const float *x, int64_t ldx) {
    for (int t = 0; t < mt; t++) {
        a[t][2 * odd] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + t * ldx), a[t][2 * odd]);
        a[t][2 * odd + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + t * ldx + 16), a[t][2 * odd + 1]);
    }
}

/* the 64 lanes summed pairwise: j + 32, j + 16, j + 8, j + 4, j + 2, j + 1 */
static inline float reduce64(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
    __m256 t = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    u = _mm_add_ps(u, _mm_movehl_ps(u, u));
    u = _mm_add_ss(u, _mm_movehdup_ps(u));
    return _mm_cvtss_f32(u);
}

/* q4_k's (and q5_k's) d sc and -(dmin mn) of a super-block, the eight 6-bit scales and mins (q4k_scales) as
   32-bit words, llama.cpp's way: scales in bytes 0..7, mins in 8..15; then d sc and -(dmin mn) as floats, eight
   at a time (the same products as one by one: each is exact) */
ALWAYS_INLINE void q4k_dscales(const uint8_t *blk, float *dsc, float *dmn) {
    const __m128i scm = q4k_scales16(blk + 4);
    _mm256_storeu_ps(dsc, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scm)), _mm256_set1_ps(half(blk))));
    _mm256_storeu_ps(dmn, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scm, 8))),
                                        _mm256_set1_ps(-half(blk + 2))));
}

/* q5_k (176-byte super-blocks: d, dmin, scales[12] as q4_k's, qh[32], qs[128] as q4_k's nibbles) times
   the tokens' x, into the lanes as q4_k's (sub-block j is chunk j): each sub-block's 32 codes (its
   nibble, and bit j of qh as bit 4) are looked up in its 32-entry table (d sc) q - dmin mn, two
   registers of 16 (vpermi2ps reads the low 5 bits of each lane); the table's entries are q4_k's
   FMAs, exactly unpack's values */
ALWAYS_INLINE void ftile_q5_k(__m512 (*a)[4], int mt, const uint8_t *w, const float *x, int64_t ldx, int64_t K) {
    const __m512 iota = iota16(), iota_hi = _mm512_add_ps(iota16(), _mm512_set1_ps(16.0f));
    const __m512i m4 = _mm512_set1_epi32(15);
    for (int64_t sb = 0; sb < K / 256; sb++) {
        const uint8_t *blk = w + 176 * sb, *qh = blk + 16, *qs = blk + 48;
        const float *xs = x + 256 * sb;
        for (int l = 0; l < 176; l += 64) _mm_prefetch((const char *)blk + PF_AHEAD + l, _MM_HINT_T0);
        float dsc[8], dmn[8];
        q4k_dscales(blk, dsc, dmn);
        /* qh << 4: bit j of sub-block j at bit 4 + j, brought down to bit 4 by a shift of j */
        const __m512i h0 = _mm512_slli_epi32(bytes16(qh), 4), h1 = _mm512_slli_epi32(bytes16(qh + 16), 4);
        for (int r = 0; r < 4; r++) { /* run r: sub-block 2r in the low nibbles, 2r + 1 in the high */
            const __m512i t0 = bytes16(qs + 32 * r), t1 = bytes16(qs + 32 * r + 16);
            for (int o = 0; o < 2; o++) {
                const int j = 2 * r + o;
                const __m512 sc = _mm512_set1_ps(dsc[j]), mn = _mm512_set1_ps(dmn[j]);
                const __m512 lut_lo = _mm512_fmadd_ps(iota, sc, mn), lut_hi = _mm512_fmadd_ps(iota_hi, sc, mn);
                /* index bits 0-3: the nibble, bit 4: qh's bit j, higher bits (which vpermi2ps ignores): any;
                   (nibble & 15) | (h >> j & ~15) in one vpternlogd */
                const __m512i i0 = _mm512_ternarylogic_epi32(o ? high4(t0) : t0, _mm512_srli_epi32(h0, j), m4, 0xE4);
                const __m512i i1 = _mm512_ternarylogic_epi32(o ? high4(t1) : t1, _mm512_srli_epi32(h1, j), m4, 0xE4);
                acc_chunk(a, mt, o, _mm512_permutex2var_ps(lut_lo, i0, lut_hi), _mm512_permutex2var_ps(lut_lo, i1, lut_hi),
                          xs + 64 * r + 32 * o, ldx);
            }
        }
    }
}

/* y[t * ldy] = row w times x + t * ldx for t < mt (mt <= TILE), K values */
ALWAYS_INLINE void ftile(int type, int mt, const uint8_t *w, const float *x, int64_t ldx, int64_t K, float *y, int64_t ldy) {
    __m512 a[TILE][4];
    for (int t = 0; t < mt; t++)
        for (int i = 0; i < 4; i++) a[t][i] = _mm512_setzero_ps();
    __m512 lo, hi;
    if (type == T_Q5_K) {
        ftile_q5_k(a, mt, w, x, ldx, K);
    } else if (type == T_Q4_K) {
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *blk = w + 144 * sb, *qs = blk + 16;
            const float *xs = x + 256 * sb;
            for (int l = 0; l < 144; l += 64) _mm_prefetch((const char *)blk + PF_AHEAD + l, _MM_HINT_T0);
            float dsc[8], dmn[8];
            q4k_dscales(blk, dsc, dmn);
            for (int r = 0; r < 4; r++) { /* run r: sub-block 2r in the low nibbles, 2r + 1 in the high */
                const __m512i t0 = bytes16(qs + 32 * r), t1 = bytes16(qs + 32 * r + 16);
                /* (d sc) q - dmin mn for the 16 codes q: the sub-block's table */
                __m512 lut = _mm512_fmadd_ps(iota16(), _mm512_set1_ps(dsc[2 * r]), _mm512_set1_ps(dmn[2 * r]));
                lo = _mm512_permutexvar_ps(t0, lut);
                hi = _mm512_permutexvar_ps(t1, lut);
                acc_chunk(a, mt, 0, lo, hi, xs + 64 * r, ldx);
                lut = _mm512_fmadd_ps(iota16(), _mm512_set1_ps(dsc[2 * r + 1]), _mm512_set1_ps(dmn[2 * r + 1]));
                lo = _mm512_permutexvar_ps(high4(t0), lut);
                hi = _mm512_permutexvar_ps(high4(t1), lut);
                acc_chunk(a, mt, 1, lo, hi, xs + 64 * r + 32, ldx);
            }
        }
    } else if (type == T_Q6_K) {
        const __m512i three = _mm512_set1_epi32(3), off = _mm512_set1_epi32(32);
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *blk = w + 210 * sb, *ql = blk, *qh = blk + 128;
            const int8_t *sc = (const int8_t *)(blk + 192);
            const float *xs = x + 256 * sb;
            const float d = half(blk + 208);
            for (int l = 0; l < 210; l += 64) _mm_prefetch((const char *)blk + PF_AHEAD + l, _MM_HINT_T0);
            for (int h = 0; h < 2; h++) {
                const __m512i la[2] = {bytes16(ql + 64 * h), bytes16(ql + 64 * h + 32)};
                const __m512i lb[2] = {bytes16(ql + 64 * h + 16), bytes16(ql + 64 * h + 48)};
                const __m512i ha = bytes16(qh + 32 * h), hb = bytes16(qh + 32 * h + 16);
                for (int p = 0; p < 4; p++) { /* sub-block 4h + p: low nibbles for p < 2, two bits of qh at 2p */
                    __m512i na = p < 2 ? low4(la[p & 1]) : high4(la[p & 1]);
                    __m512i nb = p < 2 ? low4(lb[p & 1]) : high4(lb[p & 1]);
                    __m512i qa = _mm512_or_si512(na, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(ha, 2 * p), three), 4));
                    __m512i qb = _mm512_or_si512(nb, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 2 * p), three), 4));
                    const int g = 8 * h + 2 * p;
                    lo = _mm512_mul_ps(cvt(_mm512_sub_epi32(qa, off)), _mm512_set1_ps(d * (float)sc[g]));
                    hi = _mm512_mul_ps(cvt(_mm512_sub_epi32(qb, off)), _mm512_set1_ps(d * (float)sc[g + 1]));
                    acc_chunk(a, mt, p & 1, lo, hi, xs + 128 * h + 32 * p, ldx);
                }
            }
        }
    } else {
        const int bytes = block_bytes(type);
        const int64_t nb = K / 32;
        int64_t c = 0;
        for (; c + 2 <= nb; c += 2) {
            _mm_prefetch((const char *)(w + bytes * c) + PF_AHEAD, _MM_HINT_T0);
            if (type == T_Q8_0) _mm_prefetch((const char *)(w + bytes * c) + PF_AHEAD + 64, _MM_HINT_T0);
            deq_block(type, w + bytes * c, &lo, &hi);
            acc_chunk(a, mt, 0, lo, hi, x + 32 * c, ldx);
            deq_block(type, w + bytes * (c + 1), &lo, &hi);
            acc_chunk(a, mt, 1, lo, hi, x + 32 * c + 32, ldx);
        }
        if (c < nb) {
            deq_block(type, w + bytes * c, &lo, &hi);
            acc_chunk(a, mt, 0, lo, hi, x + 32 * c, ldx);
        }
    }
    for (int t = 0; t < mt; t++) y[t * ldy] = reduce64(a[t][0], a[t][1], a[t][2], a[t][3]);
}

/* ---- several rows against one token: the decode products (moeinf_frows) */
#ifndef MULTI_ROW_BYTES
#define MULTI_ROW_BYTES 1152 /* longer rows one at a time: four long streams read slower from memory than one */
#endif
#ifndef PF_GROUP
#define PF_GROUP 2048 /* bytes read ahead of four rows at least */
#endif

/* reduce64 of rows 0..3 at once, each row's tree the same (j + 32, j + 16, j + 8, j + 4, j + 2, j + 1):
   the same bits as four reduce64 calls, with the shuffles shared */
ALWAYS_INLINE void reduce64x4(__m512 (*a)[4], float *y) {
    __m512 s[4];
    for (int r = 0; r < 4; r++) s[r] = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][2]), _mm512_add_ps(a[r][1], a[r][3]));
    /* j + 8: [s0.lo256 + s0.hi256, s1.lo256 + s1.hi256] */
    const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(s[2], s[3], _MM_SHUFFLE(3, 2, 3, 2)));
    /* j + 4: quarter r holds row r's four lanes */
    const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(t01, t23, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(3, 2, 3, 2))); /* j + 2 */
    const __m512 w = _mm512_add_ps(v, _mm512_movehdup_ps(v));                         /* j + 1 */
    const __m512 r = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), w);
    _mm_storeu_ps(y, _mm512_castps512_ps128(r));
}


/* y[r] = row r (at w + r rb) times x for r < 4: each row's products go to its 64 lanes in the order of
   ftile(type, 1, ...), so every y[r] has ftile's bits; x is read once for the four rows (each 64 values
   of it held in registers while the four rows' blocks are unpacked against them) and the four
   reductions share their shuffles */
ALWAYS_INLINE void fmulti(int type, const uint8_t *w, int64_t rb, const float *x, int64_t K, float *y) {
    __m512 a[4][4];
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 4; i++) a[r][i] = _mm512_setzero_ps();
    __m512 lo, hi;
    /* the four rows are 4 rb contiguous bytes, read at the same pace: the lines `ahead` bytes past the
       point that pace has reached are asked for (the hardware prefetcher follows one stream, not four) */
    const int64_t ahead = 4 * rb > PF_GROUP ? 4 * rb : PF_GROUP;
    if (type == T_Q4_K) {
        for (int64_t sb = 0; sb < K / 256; sb++) {
            float dsc[4][8], dmn[4][8];
            const char *pf = (const char *)w + ahead + 4 * 144 * sb;
            for (int l = 0; l < 4 * 144 + 63; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
            for (int r = 0; r < 4; r++) q4k_dscales(w + r * rb + 144 * sb, dsc[r], dmn[r]);
            const float *xs = x + 256 * sb;
            for (int q = 0; q < 4; q++) { /* run q: sub-block 2q in the low nibbles, 2q + 1 in the high */
                const __m512 x0 = _mm512_loadu_ps(xs + 64 * q), x1 = _mm512_loadu_ps(xs + 64 * q + 16);
                const __m512 x2 = _mm512_loadu_ps(xs + 64 * q + 32), x3 = _mm512_loadu_ps(xs + 64 * q + 48);
                for (int r = 0; r < 4; r++) {
                    const uint8_t *qs = w + r * rb + 144 * sb + 16 + 32 * q;
                    const __m512i t0 = bytes16(qs), t1 = bytes16(qs + 16);
                    __m512 lut = _mm512_fmadd_ps(iota16(), _mm512_set1_ps(dsc[r][2 * q]), _mm512_set1_ps(dmn[r][2 * q]));
                    a[r][0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(t0, lut), x0, a[r][0]);
                    a[r][1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(t1, lut), x1, a[r][1]);
                    lut = _mm512_fmadd_ps(iota16(), _mm512_set1_ps(dsc[r][2 * q + 1]), _mm512_set1_ps(dmn[r][2 * q + 1]));
                    a[r][2] = _mm512_fmadd_ps(_mm512_permutexvar_ps(high4(t0), lut), x2, a[r][2]);
                    a[r][3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(high4(t1), lut), x3, a[r][3]);
                }
            }
        }
    } else {
        const int bytes = block_bytes(type);
        const int64_t nb = K / 32;
        int64_t c = 0;
        for (; c + 2 <= nb; c += 2) {
            const __m512 x0 = _mm512_loadu_ps(x + 32 * c), x1 = _mm512_loadu_ps(x + 32 * c + 16);
            const __m512 x2 = _mm512_loadu_ps(x + 32 * c + 32), x3 = _mm512_loadu_ps(x + 32 * c + 48);
            const char *pf = (const char *)w + ahead + 4 * bytes * c;
            for (int l = 0; l < 8 * bytes + 63; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
            for (int r = 0; r < 4; r++) {
                const uint8_t *b = w + r * rb + bytes * c;
                deq_block(type, b, &lo, &hi);
                a[r][0] = _mm512_fmadd_ps(lo, x0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(hi, x1, a[r][1]);
                deq_block(type, b + bytes, &lo, &hi);
                a[r][2] = _mm512_fmadd_ps(lo, x2, a[r][2]);
                a[r][3] = _mm512_fmadd_ps(hi, x3, a[r][3]);
            }
        }
        if (c < nb) {
            const __m512 x0 = _mm512_loadu_ps(x + 32 * c), x1 = _mm512_loadu_ps(x + 32 * c + 16);
            for (int r = 0; r < 4; r++) {
                deq_block(type, w + r * rb + bytes * c, &lo, &hi);
                a[r][0] = _mm512_fmadd_ps(lo, x0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(hi, x1, a[r][1]);
            }
        }
    }
    reduce64x4(a, y);
}
#define HAVE_FMULTI 1

/* ---------------------------------------------------------------- AVX2: 32 values = 4 x 8 lanes */
#elif defined(F_AVX2)
static inline __m256 cvt8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)); } /* low 8 int8 */
/* 16 int8 values v -> floats of values 0..7 and 8..15 */
static inline void widen16(__m128i v, __m256 *a, __m256 *b) {
    *a = cvt8(v);
    *b = cvt8(_mm_srli_si128(v, 8));
}

/* chunk c's 32 values (v[0] values 0..7, ..., v[3] 24..31) of a row in format `type` */
ALWAYS_INLINE void deq_chunk(int type, const uint8_t *w, int64_t c, __m256 *v) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    if (type == T_Q8_0) {
        const uint8_t *b = w + 34 * c;
        const __m256 d = _mm256_set1_ps(half(b));
        widen16(_mm_loadu_si128((const __m128i *)(b + 2)), &v[0], &v[1]);
        widen16(_mm_loadu_si128((const __m128i *)(b + 18)), &v[2], &v[3]);
        for (int i = 0; i < 4; i++) v[i] = _mm256_mul_ps(v[i], d);
    } else if (type == T_Q4_0 || type == T_Q4_1 || type == T_MXFP4) {
        const int bytes = block_bytes(type), at = type == T_Q4_1 ? 4 : type == T_MXFP4 ? 1 : 2;
        const uint8_t *b = w + bytes * c;
        const __m128i raw = _mm_loadu_si128((const __m128i *)(b + at));
        __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        if (type == T_Q4_0) {
            lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
            hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
        } else if (type == T_MXFP4) { /* twice the E2M1 value; code 8 is +0 */
            const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
            lo = _mm_shuffle_epi8(lut, lo);
            hi = _mm_shuffle_epi8(lut, hi);
        }
        widen16(lo, &v[0], &v[1]);
        widen16(hi, &v[2], &v[3]);
        if (type == T_Q4_1) {
            const __m256 d = _mm256_set1_ps(half(b)), m = _mm256_set1_ps(half(b + 2));
            for (int i = 0; i < 4; i++) v[i] = _mm256_fmadd_ps(v[i], d, m);
        } else {
            const __m256 d = _mm256_set1_ps(type == T_MXFP4 ? e8m0_half(b[0]) : half(b));
            for (int i = 0; i < 4; i++) v[i] = _mm256_mul_ps(v[i], d);
        }
    } else if (type == T_Q4_K) {
        const uint8_t *blk = w + 144 * (c / 8);
        const int s = (int)(c % 8);
        uint8_t sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        const __m128i r0 = _mm_loadu_si128((const __m128i *)(blk + 16 + 32 * (s / 2)));
        const __m128i r1 = _mm_loadu_si128((const __m128i *)(blk + 16 + 32 * (s / 2) + 16));
        const __m128i q0 = s & 1 ? _mm_and_si128(_mm_srli_epi16(r0, 4), m4) : _mm_and_si128(r0, m4);
        const __m128i q1 = s & 1 ? _mm_and_si128(_mm_srli_epi16(r1, 4), m4) : _mm_and_si128(r1, m4);
        widen16(q0, &v[0], &v[1]);
        widen16(q1, &v[2], &v[3]);
        const __m256 d = _mm256_set1_ps(half(blk) * (float)sc[s]), o = _mm256_set1_ps(-(half(blk + 2) * (float)mn[s]));
        for (int i = 0; i < 4; i++) v[i] = _mm256_fmadd_ps(v[i], d, o);
    } else if (type == T_Q5_K) { /* q4_k's codes with bit s of qh[l] as bit 4 */
        const uint8_t *blk = w + 176 * (c / 8);
        const int s = (int)(c % 8);
        uint8_t sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        const __m128i r0 = _mm_loadu_si128((const __m128i *)(blk + 48 + 32 * (s / 2)));
        const __m128i r1 = _mm_loadu_si128((const __m128i *)(blk + 48 + 32 * (s / 2) + 16));
        const __m128i bit = _mm_set1_epi8((char)(1 << s)), b4 = _mm_set1_epi8(16);
        const __m128i h0 = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(_mm_loadu_si128((const __m128i *)(blk + 16)), bit), bit), b4);
        const __m128i h1 = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(_mm_loadu_si128((const __m128i *)(blk + 32)), bit), bit), b4);
        const __m128i q0 = _mm_or_si128(s & 1 ? _mm_and_si128(_mm_srli_epi16(r0, 4), m4) : _mm_and_si128(r0, m4), h0);
        const __m128i q1 = _mm_or_si128(s & 1 ? _mm_and_si128(_mm_srli_epi16(r1, 4), m4) : _mm_and_si128(r1, m4), h1);
        widen16(q0, &v[0], &v[1]);
        widen16(q1, &v[2], &v[3]);
        const __m256 d = _mm256_set1_ps(half(blk) * (float)sc[s]), o = _mm256_set1_ps(-(half(blk + 2) * (float)mn[s]));
        for (int i = 0; i < 4; i++) v[i] = _mm256_fmadd_ps(v[i], d, o);
    } else { /* q6_k */
        const uint8_t *blk = w + 210 * (c / 8);
        const int s = (int)(c % 8), h = s / 4, p = s % 4;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = half(blk + 208);
        const uint8_t *low = blk + 64 * h + 32 * (p & 1), *qh = blk + 128 + 32 * h;
        for (int half16 = 0; half16 < 2; half16++) {
            __m128i l = _mm_loadu_si128((const __m128i *)(low + 16 * half16));
            __m128i hb = _mm_loadu_si128((const __m128i *)(qh + 16 * half16));
            l = p < 2 ? _mm_and_si128(l, m4) : _mm_and_si128(_mm_srli_epi16(l, 4), m4);
            hb = _mm_and_si128(_mm_srl_epi16(hb, _mm_cvtsi32_si128(2 * p)), _mm_set1_epi8(3));
            __m128i q = _mm_sub_epi8(_mm_or_si128(l, _mm_slli_epi16(hb, 4)), _mm_set1_epi8(32));
            widen16(q, &v[2 * half16], &v[2 * half16 + 1]);
            const __m256 g = _mm256_set1_ps(d * (float)sc[8 * h + 2 * p + half16]);
            v[2 * half16] = _mm256_mul_ps(v[2 * half16], g);
            v[2 * half16 + 1] = _mm256_mul_ps(v[2 * half16 + 1], g);
        }
    }
}

static inline float reduce64(const __m256 *b) { /* b[0..7]: lanes 0..63 */
    __m256 r0 = _mm256_add_ps(b[0], b[4]), r1 = _mm256_add_ps(b[1], b[5]);
    __m256 r2 = _mm256_add_ps(b[2], b[6]), r3 = _mm256_add_ps(b[3], b[7]);
    __m256 t = _mm256_add_ps(_mm256_add_ps(r0, r2), _mm256_add_ps(r1, r3));
    __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    u = _mm_add_ps(u, _mm_movehl_ps(u, u));
    u = _mm_add_ss(u, _mm_movehdup_ps(u));
    return _mm_cvtss_f32(u);
}

ALWAYS_INLINE void ftile(int type, int mt, const uint8_t *w, const float *x, int64_t ldx, int64_t K, float *y, int64_t ldy) {
    (void)mt;
    (void)ldx;
    (void)ldy;
    __m256 b[8], v[4];
    for (int i = 0; i < 8; i++) b[i] = _mm256_setzero_ps();
    const int64_t nb = K / 32;
    const int per_block = block_bytes(type), chunks_per_block = type == T_Q4_K || type == T_Q5_K || type == T_Q6_K ? 8 : 1;
    int64_t c = 0;
    for (; c + 2 <= nb; c += 2) {
        const char *at = (const char *)w + c * per_block / chunks_per_block + PF_AHEAD;
        _mm_prefetch(at, _MM_HINT_T0);
        if (2 * per_block / chunks_per_block > 64) _mm_prefetch(at + 64, _MM_HINT_T0);
        deq_chunk(type, w, c, v);
        for (int i = 0; i < 4; i++) b[i] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + 32 * c + 8 * i), b[i]);
        deq_chunk(type, w, c + 1, v);
        for (int i = 0; i < 4; i++) b[4 + i] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + 32 * c + 32 + 8 * i), b[4 + i]);
    }
    if (c < nb) {
        deq_chunk(type, w, c, v);
        for (int i = 0; i < 4; i++) b[i] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + 32 * c + 8 * i), b[i]);
    }
    *y = reduce64(b);
}

/* ---------------------------------------------------------------- portable C */
#else
/* chunk c's 32 values of a row in format `type` */
static void deq_chunk(int type, const uint8_t *w, int64_t c, float *v) {
    static const float lut[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    if (type == T_Q8_0) {
        const uint8_t *b = w + 34 * c;
        float d = half(b);
        for (int j = 0; j < 32; j++) v[j] = (float)(int8_t)b[2 + j] * d;
    } else if (type == T_Q4_0 || type == T_Q4_1 || type == T_MXFP4) {
        const int bytes = block_bytes(type), at = type == T_Q4_1 ? 4 : type == T_MXFP4 ? 1 : 2;
        const uint8_t *b = w + bytes * c, *qs = b + at;
        if (type == T_Q4_0) {
            float d = half(b);
            for (int j = 0; j < 16; j++) {
                v[j] = (float)((qs[j] & 15) - 8) * d;
                v[j + 16] = (float)((qs[j] >> 4) - 8) * d;
            }
        } else if (type == T_Q4_1) {
            float d = half(b), m = half(b + 2);
            for (int j = 0; j < 16; j++) { /* d * q is exact: one rounding, with or without a fused add */
                v[j] = (float)(qs[j] & 15) * d + m;
                v[j + 16] = (float)(qs[j] >> 4) * d + m;
            }
        } else {
            float s = e8m0_half(b[0]);
            for (int j = 0; j < 16; j++) {
                v[j] = lut[qs[j] & 15] * s;
                v[j + 16] = lut[qs[j] >> 4] * s;
            }
        }
    } else if (type == T_Q4_K) {
        const uint8_t *blk = w + 144 * (c / 8);
        const int s = (int)(c % 8);
        uint8_t sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        const float d = half(blk) * (float)sc[s], o = half(blk + 2) * (float)mn[s];
        const uint8_t *qs = blk + 16 + 32 * (s / 2);
        for (int j = 0; j < 32; j++) v[j] = (float)(s & 1 ? qs[j] >> 4 : qs[j] & 15) * d - o;
    } else if (type == T_Q5_K) {
        const uint8_t *blk = w + 176 * (c / 8);
        const int s = (int)(c % 8);
        uint8_t sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        const float d = half(blk) * (float)sc[s], o = half(blk + 2) * (float)mn[s];
        const uint8_t *qh = blk + 16, *qs = blk + 48 + 32 * (s / 2);
        for (int j = 0; j < 32; j++)
            v[j] = (float)((s & 1 ? qs[j] >> 4 : qs[j] & 15) | (((qh[j] >> s) & 1) << 4)) * d - o;
    } else {
        const uint8_t *blk = w + 210 * (c / 8);
        const int s = (int)(c % 8), h = s / 4, p = s % 4;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = half(blk + 208);
        const uint8_t *low = blk + 64 * h + 32 * (p & 1), *qh = blk + 128 + 32 * h;
        for (int j = 0; j < 32; j++) {
            int q = ((p < 2 ? low[j] & 15 : low[j] >> 4) | (((qh[j] >> (2 * p)) & 3) << 4)) - 32;
            v[j] = (float)q * (d * (float)sc[8 * h + 2 * p + j / 16]);
        }
    }
}

static float reduce64(const float *v) {
    float r[32], s[16], t[8], u[4];
    for (int j = 0; j < 32; j++) r[j] = v[j] + v[j + 32];
    for (int j = 0; j < 16; j++) s[j] = r[j] + r[j + 16];
    for (int j = 0; j < 8; j++) t[j] = s[j] + s[j + 8];
    for (int j = 0; j < 4; j++) u[j] = t[j] + t[j + 4];
    return (u[0] + u[2]) + (u[1] + u[3]);
}

static inline void ftile(int type, int mt, const uint8_t *w, const float *x, int64_t ldx, int64_t K, float *y, int64_t ldy) {
    float a[TILE][64], v[32];
    memset(a, 0, sizeof(a));
    for (int64_t c = 0; c < K / 32; c++) {
        deq_chunk(type, w, c, v);
        float *lanes = &a[0][0] + 32 * (c & 1);
        for (int t = 0; t < mt; t++)
            for (int j = 0; j < 32; j++) lanes[64 * t + j] += v[j] * x[t * ldx + 32 * c + j];
    }
    for (int t = 0; t < mt; t++) y[t * ldy] = reduce64(a[t]);
}
#endif

/* ---------------------------------------------------------------- per format: rows, and one row */

typedef void (*frows_fn)(const uint8_t *w, const float *x, int64_t K, int64_t M, float *y, int64_t ldy);
/* rows n0..n1 of W (rb bytes each) times every x[m], token tiles outside the rows: a tile's x stays in
   L1 while the block of rows (in L2) goes through it; each (row, tile) is the same ftile as frows' */
typedef void (*fblock_fn)(const uint8_t *W, int64_t rb, int64_t n0, int64_t n1, const float *x, int64_t K,
                          int64_t M, float *y, int64_t ldy);

#ifdef HAVE_FMULTI
#define MULTI_TAKES(T) ((T) != T_Q5_K && (T) != T_Q6_K) /* q5_k, q6_k: one row at a time */
#define FMULTI(T, w, rb, x, K, y) fmulti(T, w, rb, x, K, y)
#else
#define MULTI_TAKES(T) 0
#define MULTI_ROW_BYTES 0
#define FMULTI(T, w, rb, x, K, y) ((void)0)
#endif

/* y[m * ldy] = row w times x[m] (x [M, K]) for every m < M, TILE tokens per dequantisation */
#define FORMAT_ROWS(name, T)                                                                                   \
    static void frows_##name(const uint8_t *w, const float *x, int64_t K, int64_t M, float *y, int64_t ldy) {   \
        int64_t m = 0;                                                                                         \
        for (; m + TILE <= M; m += TILE) ftile(T, TILE, w, x + m * K, K, K, y + m * ldy, ldy);               \
        switch (M - m) {                                                                                       \
            case 3: ftile(T, 3 < TILE ? 3 : TILE, w, x + m * K, K, K, y + m * ldy, ldy); break;              \
            case 2: ftile(T, 2 < TILE ? 2 : TILE, w, x + m * K, K, K, y + m * ldy, ldy); break;              \
            case 1: ftile(T, 1, w, x + m * K, K, K, y + m * ldy, ldy); break;                                \
            default: break;                                                                                    \
        }                                                                                                      \
    }                                                                                                          \
    static void fblock_##name(const uint8_t *W, int64_t rb, int64_t n0, int64_t n1, const float *x, int64_t K, \
                              int64_t M, float *y, int64_t ldy) {                                              \
        int64_t m = 0;                                                                                         \
        for (; m + TILE <= M; m += TILE)                                                                       \
            for (int64_t n = n0; n < n1; n++) ftile(T, TILE, W + n * rb, x + m * K, K, K, y + m * ldy + n, ldy); \
        for (int64_t n = n0; n < n1; n++) {                                                                    \
            float *yn = y + m * ldy + n;                                                                       \
            const float *xm = x + m * K;                                                                       \
            switch (M - m) {                                                                                   \
                case 3: ftile(T, 3 < TILE ? 3 : TILE, W + n * rb, xm, K, K, yn, ldy); break;                  \
                case 2: ftile(T, 2 < TILE ? 2 : TILE, W + n * rb, xm, K, K, yn, ldy); break;                  \
                case 1: ftile(T, 1, W + n * rb, xm, K, K, yn, ldy); break;                                    \
                default: break;                                                                                \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    static float frow_##name(const uint8_t *w, const float *x, int64_t nb) {                                   \
        float y;                                                                                               \
        ftile(T, 1, w, x, 0, 32 * nb, &y, 0);                                                                  \
        return y;                                                                                              \
    }                                                                                                          \
    static void fmrows_##name(const uint8_t *w, int64_t rb, int64_t n, const float *x, int64_t nb, float *y) { \
        int64_t i = 0;                                                                                         \
        if (MULTI_TAKES(T) && rb <= MULTI_ROW_BYTES)                                                           \
            for (; i + 4 <= n; i += 4) FMULTI(T, w + i * rb, rb, x, 32 * nb, y + i);                          \
        for (; i < n; i++) ftile(T, 1, w + i * rb, x, 0, 32 * nb, y + i, 0);                                  \
    }

FORMAT_ROWS(q8_0, T_Q8_0)
FORMAT_ROWS(q4_0, T_Q4_0)
FORMAT_ROWS(q4_1, T_Q4_1)
FORMAT_ROWS(mxfp4, T_MXFP4)
FORMAT_ROWS(q4_k, T_Q4_K)
FORMAT_ROWS(q5_k, T_Q5_K)
FORMAT_ROWS(q6_k, T_Q6_K)

static frows_fn rows_function(int type) {
    switch (type) {
        case T_Q8_0: return frows_q8_0;
        case T_Q4_0: return frows_q4_0;
        case T_Q4_1: return frows_q4_1;
        case T_MXFP4: return frows_mxfp4;
        case T_Q4_K: return frows_q4_k;
        case T_Q5_K: return frows_q5_k;
        case T_Q6_K: return frows_q6_k;
        default: return 0;
    }
}

static fblock_fn block_function(int type) {
    switch (type) {
        case T_Q8_0: return fblock_q8_0;
        case T_Q4_0: return fblock_q4_0;
        case T_Q4_1: return fblock_q4_1;
        case T_MXFP4: return fblock_mxfp4;
        case T_Q4_K: return fblock_q4_k;
        case T_Q5_K: return fblock_q5_k;
        case T_Q6_K: return fblock_q6_k;
        default: return 0;
    }
}

frow_fn moeinf_frow_function(int type) {
    switch (type) {
        case T_Q8_0: return frow_q8_0;
        case T_Q4_0: return frow_q4_0;
        case T_Q4_1: return frow_q4_1;
        case T_MXFP4: return frow_mxfp4;
        case T_Q4_K: return frow_q4_k;
        case T_Q5_K: return frow_q5_k;
        case T_Q6_K: return frow_q6_k;
        default: return 0;
    }
}

fmrows_fn moeinf_fmrows_function(int type) {
    switch (type) {
        case T_Q8_0: return fmrows_q8_0;
        case T_Q4_0: return fmrows_q4_0;
        case T_Q4_1: return fmrows_q4_1;
        case T_MXFP4: return fmrows_mxfp4;
        case T_Q4_K: return fmrows_q4_k;
        case T_Q5_K: return fmrows_q5_k;
        case T_Q6_K: return fmrows_q6_k;
        default: return 0;
    }
}

/* ---------------------------------------------------------------- the product over the pool */

#ifndef BLOCK_BYTES
#define BLOCK_BYTES (96 * 1024) /* weights per block of rows that the token tiles go through (in L2) */
#endif

typedef struct {
    frows_fn rows;
    fblock_fn block;
    fmrows_fn mrows;
    const uint8_t *W;
    int64_t N, K, row_bytes, M;
    const float *x, *bias; /* x [M, K]; bias [N] or NULL */
    float *y;              /* [M, N] */
} fgemv_job;

static void fgemv_task(void *arg, int tid, int nt) {
    fgemv_job *j = arg;
    int64_t lo, hi;
    split_rows_by(j->N, 4, tid, nt, &lo, &hi);
    if (j->M > TILE) { /* several tiles of tokens: blocks of rows, the tiles inside */
        int64_t rows = BLOCK_BYTES / j->row_bytes / 4 * 4;
        if (rows < 4) rows = 4;
        for (int64_t n0 = lo; n0 < hi; n0 += rows)
            j->block(j->W, j->row_bytes, n0, n0 + rows < hi ? n0 + rows : hi, j->x, j->K, j->M, j->y, j->N);
    } else if (j->M == 1) {
        j->mrows(j->W + lo * j->row_bytes, j->row_bytes, hi - lo, j->x, j->K / 32, j->y + lo);
    } else {
        for (int64_t n = lo; n < hi; n++) j->rows(j->W + n * j->row_bytes, j->x, j->K, j->M, j->y + n, j->N);
    }
    if (j->bias)
        for (int64_t m = 0; m < j->M; m++)
            for (int64_t n = lo; n < hi; n++) j->y[m * j->N + n] += j->bias[n];
}

/* y [M, N] = x [M, K] times W^T (+ bias [N] or NULL), all float32, W [N, K] stored as rows of blocks of
   format `type` (K a multiple of the block's values). Returns 0, or -1 for an unknown type or a K the
   format cannot hold. */
int moeinf_fgemv(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M, const float *bias,
                 float *y, int nthreads) {
    int values, bytes;
    if (!moeinf_block_geometry(type, &values, &bytes) || K % values || M < 1 || N < 1) return -1;
    fgemv_job j = {rows_function(type), block_function(type), moeinf_fmrows_function(type), W, N, K, K / values * bytes, M, x, bias, y};
    int nt = nthreads;
    if ((int64_t)nt * 4 > N) nt = (int)((N + 3) / 4);
    moeinf_pool_run(fgemv_task, &j, nt < 1 ? 1 : nt);
    return 0;
}
