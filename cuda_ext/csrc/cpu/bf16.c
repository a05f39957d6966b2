/* Native bf16 kernels for CPU decode (one token at a time).

   Every product accumulates in float32 and rounds to bf16 the way PyTorch does (round to nearest
   even), so results match the F.linear / torch path within bf16 rounding.

   moeinf_gemv_many    several matrices sharing one input x (q/k/v, an LM head), optional biases,
                       rows split over the thread pool (pool.c).
   (the routed experts, bf16 or quantised, are in moe.c)
   moeinf_heads_xtw / moeinf_heads_wx   per-head products for MLA's absorbed decode. */

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define MOEINF_DPBF16 1
#endif

/* ---------------------------------------------------------------- dot products of rows with x */

#ifdef MOEINF_DPBF16
/* v[r] = sum of the lanes of a[r], r < 16 */
static inline __m512 hsum16(const __m512 *a) {
    __m512 t[8], u[4], v[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d p = _mm512_castps_pd(t[2 * i]), q = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    for (int i = 0; i < 2; i++)
        v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xdd));
}
#endif

#define PF_AHEAD 4096  /* bytes: the line a page ahead of the one read is asked for (below) */

/* y[n - n0] = sum_k x[k] * W[n, k] (float32) for n0 <= n < n1 of a row-major [N, K] bf16 matrix.
   The weights are read in memory order (a block of 16 rows, row by row), which the hardware prefetcher
   streams: 28-30 GB/s on one core of the AMD EPYC here against 31-34 GB/s for a plain read, where
   walking the 16 rows column by column (with software prefetch of the next block) got 21-22 GB/s.
   Each line read also asks for the line 4 KiB further on, up to the end of the rows (likely why it
   helps: the hardware prefetcher does not cross 4 KiB pages, and every page of a step's many short
   streams starts cold; which rows are summed, and how, is unchanged): interleaved on/off in one process, the qwen3 x0.125 step's layers 4.11 -> 3.57 ms and
   3.11 -> 3.07, DeepSeek-V3 x0.0625's 8.97 -> 8.64, its LM head 3.55 -> 3.13; 2 and 8 KiB ahead did
   less. */
void moeinf_dot_rows(const uint16_t *restrict x, const uint16_t *restrict W, float *restrict y,
                     int64_t n0, int64_t n1, int64_t K) {
    int64_t n = n0;
#ifdef MOEINF_DPBF16
    const int64_t K32 = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1);
    const __m512bh xt = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + K32);
    const char *pf_end = (const char *)(W + n1 * K);  /* nothing past the rows asked for is fetched */
    for (; n + 16 <= n1; n += 16) {  /* sixteen rows, one sum each, reduced together */
        const uint16_t *w0 = W + n * K;
        __m512 a[16];
        for (int r = 0; r < 16; r++) {
            const uint16_t *w = w0 + r * K;
            __m512 s = _mm512_setzero_ps();
            for (int64_t k = 0; k < K32; k += 32) {
                const char *ahead = (const char *)(w + k) + PF_AHEAD;
                if (ahead < pf_end) _mm_prefetch(ahead, _MM_HINT_T0);
                s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
            }
            if (tail) s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + K32), xt);
            a[r] = s;
        }
        _mm512_storeu_ps(y + (n - n0), hsum16(a));
    }
    for (; n + 4 <= n1; n += 4) {
        const uint16_t *w0 = W + n * K;
        __m512 a[4];
        for (int r = 0; r < 4; r++) a[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K32; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
            for (int r = 0; r < 4; r++)
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(w0 + r * K + k), xv);
        }
        for (int r = 0; r < 4; r++) {
            if (tail) a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + r * K + K32), xt);
            y[n - n0 + r] = _mm512_reduce_add_ps(a[r]);
        }
    }
    for (; n < n1; n++) {
        const uint16_t *w0 = W + n * K;
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K32; k += 32)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w0 + k), (__m512bh)_mm512_loadu_si512(x + k));
        if (tail) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + K32), xt);
        y[n - n0] = _mm512_reduce_add_ps(a);
    }
#else
    for (; n + 4 <= n1; n += 4) {  /* auto-vectorised: 16 float lanes per row, four rows per load of x */
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
        y[n - n0] = s0; y[n - n0 + 1] = s1; y[n - n0 + 2] = s2; y[n - n0 + 3] = s3;
    }
    for (; n < n1; n++) {
        const uint16_t *w0 = W + n * K;
        float s = 0;
        for (int64_t k = 0; k < K; k++) s += bf16_to_f32(x[k]) * bf16_to_f32(w0[k]);
        y[n - n0] = s;
    }
#endif
}

/* y[n] = bf16(W x)[n] (then bf16(y[n] + bias[n]) when bias) for n0 <= n < n1 */
static void gemv_rows(const uint16_t *x, const uint16_t *W, const uint16_t *bias, uint16_t *y,
                      int64_t n0, int64_t n1, int64_t K) {
    float buf[CHUNK];
    for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
        int64_t c1 = c0 + CHUNK < n1 ? c0 + CHUNK : n1;
        moeinf_dot_rows(x, W, buf, c0, c1, K);
        for (int64_t n = c0; n < c1; n++) {
            uint16_t v = f32_to_bf16(buf[n - c0]);
            y[n] = bias ? f32_to_bf16(bf16_to_f32(v) + bf16_to_f32(bias[n])) : v;
        }
    }
}

/* ---------------------------------------------------------------- several matrices, one x */

#define MAX_MATS 8
typedef struct {
    const uint16_t *x;
    int64_t K;
    int count;
    const uint16_t *W[MAX_MATS];
    const uint16_t *bias[MAX_MATS];
    uint16_t *y[MAX_MATS];
    int64_t N[MAX_MATS];
} many_job;

/* part `part` of `parts` of moeinf_gemv_many's rows (the matrices' rows end to end, split by 16): what one
   thread of its job computes, for a caller that runs the product inside a job of its own (mla.c) */
void moeinf_gemv_many_part(const uint16_t *x, int64_t K, int count, const uint16_t *const *W,
                           const uint16_t *const *bias, uint16_t *const *y, const int64_t *N, int part, int parts) {
    int64_t total = 0;
    for (int m = 0; m < count; m++) total += N[m];
    int64_t lo, hi;
    split_rows(total, part, parts, &lo, &hi);
    int64_t base = 0;
    for (int m = 0; m < count; m++) {
        int64_t a = lo > base ? lo - base : 0, b = hi - base < N[m] ? hi - base : N[m];
        if (a < b) gemv_rows(x, W[m], bias ? bias[m] : 0, y[m], a, b, K);
        base += N[m];
    }
}

static void many_task(void *arg, int tid, int nt) {
    many_job *j = arg;
    moeinf_gemv_many_part(j->x, j->K, j->count, j->W, j->bias, j->y, j->N, tid, nt);
}

/* y_m = bf16(W_m x) (+ bias_m, rounded again) for m < count, every W_m [N_m, K]; bias_m may be NULL */
void moeinf_gemv_many(const uint16_t *x, int64_t K, int count, const uint16_t *const *W,
                      const uint16_t *const *bias, uint16_t *const *y, const int64_t *N, int nthreads) {
    many_job j;
    j.x = x; j.K = K;
    int64_t total = 0;
    for (int m0 = 0; m0 < count; m0 += MAX_MATS) {
        j.count = count - m0 < MAX_MATS ? count - m0 : MAX_MATS;
        total = 0;
        for (int m = 0; m < j.count; m++) {
            j.W[m] = W[m0 + m]; j.bias[m] = bias ? bias[m0 + m] : 0; j.y[m] = y[m0 + m]; j.N[m] = N[m0 + m];
            total += j.N[m];
        }
        int nt = nthreads;
        if ((int64_t)nt * 16 > total) nt = (int)((total + 15) / 16);
        moeinf_pool_run(many_task, &j, nt);
    }
}

/* ---------------------------------------------------------------- per-head products (MLA decode) */

/* Heads h < nh each own a block of rows of one [*, K] bf16 matrix W, starting at row h * head_rows.
   moeinf_heads_xtw: y[h, l] = sum_n x[h, n] * W[h * head_rows + row0 + n, l] for n < n_rows, l < K
                     (x^T W: a head's rows weighted by its x, summed; q_nope absorbed into the latent)
   moeinf_heads_wx:  y[h, j] = sum_l W[h * head_rows + row0 + j, l] * x[h, l] for j < n_rows
                     (W x per head: the latent mix expanded to the head's value dims)
   x, y bf16, float32 accumulation, one rounding; heads split over the pool. */
typedef struct {
    const uint16_t *x, *W;
    uint16_t *y;
    int64_t nh, head_rows, row0, n_rows, K;
} heads_job;

static void heads_xtw_task(void *arg, int tid, int nt) {
    heads_job *j = arg;
    float acc[CHUNK];
    for (int64_t h = j->nh * tid / nt; h < j->nh * (tid + 1) / nt; h++) {
        const uint16_t *xh = j->x + h * j->n_rows;
        const uint16_t *Wh = j->W + (h * j->head_rows + j->row0) * j->K;
        for (int64_t c0 = 0; c0 < j->K; c0 += CHUNK) {
            int64_t c1 = c0 + CHUNK < j->K ? c0 + CHUNK : j->K;
            for (int64_t l = c0; l < c1; l++) acc[l - c0] = 0.0f;
            for (int64_t n = 0; n < j->n_rows; n++) {
                float xv = bf16_to_f32(xh[n]);
                const uint16_t *row = Wh + n * j->K;
                for (int64_t l = c0; l < c1; l++) acc[l - c0] += xv * bf16_to_f32(row[l]);
            }
            for (int64_t l = c0; l < c1; l++) j->y[h * j->K + l] = f32_to_bf16(acc[l - c0]);
        }
    }
}

static void heads_wx_task(void *arg, int tid, int nt) {
    heads_job *j = arg;
    float buf[CHUNK];
    for (int64_t h = j->nh * tid / nt; h < j->nh * (tid + 1) / nt; h++) {
        const uint16_t *Wh = j->W + (h * j->head_rows + j->row0) * j->K;
        for (int64_t c0 = 0; c0 < j->n_rows; c0 += CHUNK) {
            int64_t c1 = c0 + CHUNK < j->n_rows ? c0 + CHUNK : j->n_rows;
            moeinf_dot_rows(j->x + h * j->K, Wh, buf, c0, c1, j->K);
            for (int64_t r = c0; r < c1; r++) j->y[h * j->n_rows + r] = f32_to_bf16(buf[r - c0]);
        }
    }
}

void moeinf_heads_xtw(const uint16_t *x, const uint16_t *W, uint16_t *y, int64_t nh, int64_t head_rows,
                      int64_t row0, int64_t n_rows, int64_t K, int nthreads) {
    heads_job j = {x, W, y, nh, head_rows, row0, n_rows, K};
    moeinf_pool_run(heads_xtw_task, &j, nthreads < nh ? nthreads : (int)nh);
}

void moeinf_heads_wx(const uint16_t *x, const uint16_t *W, uint16_t *y, int64_t nh, int64_t head_rows,
                     int64_t row0, int64_t n_rows, int64_t K, int nthreads) {
    heads_job j = {x, W, y, nh, head_rows, row0, n_rows, K};
    moeinf_pool_run(heads_wx_task, &j, nthreads < nh ? nthreads : (int)nh);
}
