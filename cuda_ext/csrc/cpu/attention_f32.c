/* One float32 decode token through a grouped-query attention layer whose projections are kept in block
   formats (a GGUF model's attention, engine/model/layers/attention.py), in one pool job.

   moeinf_attn_decode_f32(plan, x, cos, sin, slot, pos, out, nthreads) does what Attention.forward does
   for one float32 token of one sequence, everything in float32:
     q, k, v = Wq x (+ bq), ...       each matrix in its own block format (quant_f32.c's rows: every block
                                      dequantised in registers to the values engine.formats unpacks)
     q and k RMSNorm per head when the plan has their weights (Qwen3's q_norm / k_norm)
     rotary, rotate-half convention: x cos + rotate_half(x) sin
     k, v written at position pos of the KV cache's slot (float32)
     softmax(q k^T * scaling) v over the visible positions (all up to pos, or the last `window` of them)
     out = Wo o (+ bo)
   The phases of the job, each split over the threads, a barrier between them: the q/k/v rows (by 4
   rows), the rotary and cache write of the key/value heads, the query heads' attention, the output rows.
   The projections give dequantise-then-multiply up to the order of the float32 sums (quant_f32.c's
   bound), except those the call's int8 bits name (from cuda_ext.quant's int8_activations:
   the k-quants on decode under "auto"): x, or each head's o, quantised per block of 32 and quant.c's
   int8 rows, the bits of engine.formats.linear's product on that matrix (quant.c's documented bound); the attention differs from PyTorch's float32 kernel only in the order of its sums and in
   expf's last bit. Nothing here depends on the thread count: the same bits on any number of threads. */

#include <stdlib.h>

#include "common.h"

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, max_seq, window; /* window 0: every position */
    int64_t tq, tk, tv, to;                                      /* GGUF block type of each matrix */
    const uint8_t *wq, *wk, *wv, *wo;                            /* rows of blocks: [heads*D, hidden] ... */
    const float *bq, *bk, *bv, *bo;                              /* NULL: no bias */
    float scaling;
    float *k_cache, *v_cache; /* [slots, kv_heads, max_seq, D] float32 */
    const float *q_norm, *k_norm; /* NULL, or [D] float32: an RMSNorm over each head's q and k (Qwen3's) */
    float norm_eps;
} attn_f32_plan;

void moeinf_rms_norm_f32(const float *x, const float *w, int64_t n, float eps, float *out);

typedef struct {
    const attn_f32_plan *p;
    const float *x, *cos, *sin;
    float *q, *k, *v, *o, *out; /* q [heads*D] then k, v [kv_heads*D], o [heads*D]; out [hidden] */
    float *keys, *values;        /* the slot's [kv_heads, max_seq, D] */
    float *scores;               /* [nt, n] */
    int64_t pos, lo, n;          /* visible positions lo..pos, n of them */
    fmrows_fn fq, fk, fv, fo;     /* quant_f32.c's several-rows kernels: four rows a pass */
    int64_t rq, rk, rv, ro;      /* bytes per row of wq, wk, wv, wo */
    row_fn iq, ik, iv, io;       /* quant.c's int8 rows, for the products the call's int8 bits name (else NULL) */
    xq_t xq, oq;                 /* x and o quantised per block of 32 (int8 products only) */
    int8_t *oq8;                 /* oq's codes and scales, written head by head */
    float *od, *os;
} attn_f32_job;


/* y += a * x over n values (vectorised by the compiler: no sum across lanes) */
static inline void axpy_f32(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* one head x [D] rotated by cos/sin [D] (rotate-half), in place */
static void rotate_f32(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t h = D / 2;
    float tmp[512];
    for (int64_t i = 0; i < D; i++) {
        float rot = i < h ? -x[i + h] : x[i - h];
        float a = x[i] * cos[i], b = rot * sin[i];
        tmp[i] = a + b;
    }
    memcpy(x, tmp, sizeof(float) * (size_t)D);
}

/* rows n0..n1 of W times x into y (+ bias): x read once for every four rows, each row the one-row kernel's sums */
static void rows_f32(fmrows_fn f, const uint8_t *W, int64_t rb, const float *x, int64_t nb, const float *bias,
                     int64_t n0, int64_t n1, float *y) {
    if (n1 <= n0) return;
    f(W + n0 * rb, rb, n1 - n0, x, nb, y + n0);
    if (bias)
        for (int64_t n = n0; n < n1; n++) y[n] += bias[n];
}

/* rows n0..n1 of W times the quantised x into y (+ bias): quant.c's int8 rows, as cuda_ext.quant's qgemv */
static void rows_i8(row_fn f, const uint8_t *W, int64_t rb, const xq_t *x, int64_t nb, const float *bias,
                    int64_t n0, int64_t n1, float *y) {
    for (int64_t n = n0; n < n1; n++) y[n] = f(W + n * rb, x, nb) + (bias ? bias[n] : 0.0f);
}

/* either kind of rows: int8 where f8 is set */
static inline void rows_any(row_fn f8, fmrows_fn f, const uint8_t *W, int64_t rb, const float *x, const xq_t *xq,
                            int64_t nb, const float *bias, int64_t n0, int64_t n1, float *y) {
    if (f8) rows_i8(f8, W, rb, xq, nb, bias, n0, n1, y);
    else rows_f32(f, W, rb, x, nb, bias, n0, n1, y);
}

/* four phases (pool.c): q/k/v rows, the key/value heads written, the query heads, the output rows */
static void attn_f32_phase(void *arg, int phase, int tid, int nt) {
    attn_f32_job *j = arg;
    const attn_f32_plan *p = j->p;
    const int64_t H = p->hidden, D = p->head_dim, S = p->max_seq;
    const int64_t nq = p->heads * D, nkv = p->kv_heads * D, group = p->heads / p->kv_heads;
    int64_t lo, hi;

    if (phase == 0) { /* the rows of q, k and v, end to end */
        split_rows_by(nq + 2 * nkv, 4, tid, nt, &lo, &hi);
        if (lo < nq) rows_any(j->iq, j->fq, p->wq, j->rq, j->x, &j->xq, H / 32, p->bq, lo, hi < nq ? hi : nq, j->q);
        for (int m = 0; m < 2; m++) { /* k, then v */
            const int64_t base = nq + m * nkv;
            int64_t a = lo > base ? lo - base : 0, b = hi - base < nkv ? hi - base : nkv;
            if (a < b)
                rows_any(m ? j->iv : j->ik, m ? j->fv : j->fk, m ? p->wv : p->wk, m ? j->rv : j->rk, j->x, &j->xq, H / 32,
                         m ? p->bv : p->bk, a, b, m ? j->v : j->k);
        }
        return;
    }
    if (phase == 1) { /* each key/value head rotated and written at pos */
        for (int64_t h = p->kv_heads * tid / nt; h < p->kv_heads * (tid + 1) / nt; h++) {
            if (p->k_norm) moeinf_rms_norm_f32(j->k + h * D, p->k_norm, D, p->norm_eps, j->k + h * D);
            if (j->cos) rotate_f32(j->k + h * D, j->cos, j->sin, D);
            memcpy(j->keys + (h * S + j->pos) * D, j->k + h * D, sizeof(float) * (size_t)D);
            memcpy(j->values + (h * S + j->pos) * D, j->v + h * D, sizeof(float) * (size_t)D);
        }
        return;
    }
    if (phase == 2) { /* the query heads */
        float *s = j->scores + tid * j->n;
        for (int64_t h = p->heads * tid / nt; h < p->heads * (tid + 1) / nt; h++) {
            float *q = j->q + h * D, *o = j->o + h * D;
            if (p->q_norm) moeinf_rms_norm_f32(q, p->q_norm, D, p->norm_eps, q);
            if (j->cos) rotate_f32(q, j->cos, j->sin, D);
            const float *K = j->keys + (h / group) * S * D + j->lo * D, *V = j->values + (h / group) * S * D + j->lo * D;
            float m = -INFINITY;
            for (int64_t t = 0; t < j->n; t++) {
                s[t] = dot_f32(q, K + t * D, D) * p->scaling;
                if (s[t] > m) m = s[t];
            }
            float sum = 0.0f;
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t t = 0; t < j->n; t++) {
                float e = expf(s[t] - m);
                sum += e;
                axpy_f32(o, e, V + t * D, D);
            }
            const float inv = 1.0f / sum;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
            if (j->io) /* the head's blocks of 32 quantised for the output rows (D % 32 == 0) */
                for (int64_t b = h * D / 32; b < (h + 1) * D / 32; b++) {
                    int sq = moeinf_quantize_block(j->o + b * 32, j->oq8 + b * 32, j->od + b);
                    j->os[b] = j->od[b] * (float)sq;
                }
        }
        return;
    }
    /* the output rows */
    split_rows_by(H, 4, tid, nt, &lo, &hi);
    rows_any(j->io, j->fo, p->wo, j->ro, j->o, &j->oq, nq / 32, p->bo, lo, hi, j->out);
}

/* int8: bit i (q, k, v, o) set where that product takes int8 activations. Returns 0, or -1 for what it
   cannot do (an unknown type, a size its format cannot hold, a head wider than 512, a position outside
   the cache, no memory); nothing is written then. */
int moeinf_attn_decode_f32(const attn_f32_plan *p, const float *x, const float *cos, const float *sin, int64_t slot,
                           int64_t pos, float *out, int nthreads, int int8) {
    const int64_t D = p->head_dim, nq = p->heads * D, nkv = p->kv_heads * D;
    if (D > 512 || D % 2 || pos < 0 || pos >= p->max_seq || p->kv_heads < 1 || p->heads % p->kv_heads) return -1;
    const int64_t types[4] = {p->tq, p->tk, p->tv, p->to}, ks[4] = {p->hidden, p->hidden, p->hidden, nq};
    int64_t rb[4];
    for (int i = 0; i < 4; i++) {
        int values, bytes;
        if (!moeinf_block_geometry((int)types[i], &values, &bytes) || ks[i] % values || !moeinf_fmrows_function((int)types[i]))
            return -1;
        rb[i] = ks[i] / values * bytes;
    }
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt > p->heads) nt = (int)p->heads;
    const int64_t lo = p->window > 0 && pos - p->window + 1 > 0 ? pos - p->window + 1 : 0, n = pos - lo + 1;
    /* int8 products: x's codes [H] and scales, o's [nq] and scales, after the float32 buffers */
    const int64_t H = p->hidden, nf = 2 * nq + 2 * nkv + 16 + nt * n;
    const int any8 = (int8 & 7) != 0, o8 = (int8 & 8) && D % 32 == 0;
    float *mem = moeinf_scratch_for(SCRATCH_ATTN_F32, sizeof(float) * (size_t)(nf + 2 * (H + nq) / 32 + 32) + (size_t)(H + nq) + 64);
    if (!mem) return -1;
    float *xd = mem + nf, *xs = xd + H / 32, *od = xs + H / 32, *os = od + nq / 32;
    int8_t *xq8 = (int8_t *)(((uintptr_t)(os + nq / 32) + 63) & ~(uintptr_t)63), *oq8 = xq8 + H;
    if (any8) moeinf_quantize_x(x, 0, H, xq8, xd, xs);
    const int64_t S = p->max_seq;
    attn_f32_job j = {
        p, x, cos, sin, mem, mem + nq, mem + nq + nkv, mem + nq + 2 * nkv, out,
        p->k_cache + slot * p->kv_heads * S * D, p->v_cache + slot * p->kv_heads * S * D,
        mem + 2 * nq + 2 * nkv + 16, pos, lo, n,
        moeinf_fmrows_function((int)p->tq), moeinf_fmrows_function((int)p->tk), moeinf_fmrows_function((int)p->tv),
        moeinf_fmrows_function((int)p->to), rb[0], rb[1], rb[2], rb[3],
        (int8 & 1) ? moeinf_row_function((int)p->tq) : 0, (int8 & 2) ? moeinf_row_function((int)p->tk) : 0,
        (int8 & 4) ? moeinf_row_function((int)p->tv) : 0, o8 ? moeinf_row_function((int)p->to) : 0,
        {xq8, xd, xs}, {oq8, od, os}, oq8, od, os,
    };
    moeinf_pool_run_phases(attn_f32_phase, &j, 4, nt, nt);
    return 0;
}
