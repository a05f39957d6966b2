/* One decode token through a grouped-query attention layer in one call (engine/model/layers/attention.py).

   moeinf_attn_decode(plan, x, cos, sin, slot, pos, out, nthreads) does what Attention.forward does for
   one bf16 token of one sequence, with the torch path's roundings:
     q, k, v = bf16(Wq x (+ bq)), ...         (moeinf_gemv_many: the three products in one pool job)
     q/k RMSNorm over the whole projection ("proj", OLMoE) or per head ("head", Qwen3): statistics in
       float32, x * rsqrt(mean(x^2) + eps) rounded to bf16, times the bf16 weight, rounded again
     clip_qkv (clamp q, k, v)
     rotary, rotate-half convention: bf16(bf16(x cos) + bf16(rotate_half(x) sin))
     k, v written at position pos of the KV cache's slot
     softmax(q k^T * scaling) v over the visible positions (all up to pos, or the last `window` of them),
       with gpt-oss's sinks (engine/model/families/gpt_oss/attention.py) one more score per head first,
       bf16(sink_h) * key row 0's component head_dim (1/scaling there), whose value is zero,
       as PyTorch's CPU flash attention does it for bf16: scores and their exponentials in float32,
       the exponentials rounded to bf16 before they weight the values, the sum in float32 divided by
       the float32 sum of the exponentials, the result rounded to bf16
     out = bf16(Wo o (+ bo))
   The per-head part is split by query heads over the call's threads (with the caller alone, the second
   core would wait through it: a few microseconds a layer on the small shapes, every layer). */

#include <stdlib.h>

#include "common.h"

void moeinf_gemv_many(const uint16_t *x, int64_t K, int count, const uint16_t *const *W,
                      const uint16_t *const *bias, uint16_t *const *y, const int64_t *N, int nthreads);

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, max_seq, window;  /* window 0: every position */
    const uint16_t *wq, *wk, *wv, *wo;                           /* [heads*D, hidden] ... [hidden, heads*D] */
    const uint16_t *bq, *bk, *bv, *bo;                           /* NULL: no bias */
    int64_t qk_norm;                                             /* 0 none, 1 per head, 2 whole projection */
    const uint16_t *q_norm, *k_norm;
    float norm_eps, clip, scaling;                               /* clip <= 0: none */
    uint16_t *k_cache, *v_cache;                                 /* [slots, kv_heads, row0 + max_seq, k_row / v_row] */
    int64_t k_row, v_row, row0;  /* a cache row's length (0: head_dim), the rows before position 0 (the sink's) */
    const uint16_t *sinks;       /* [heads] or NULL: gpt-oss's sink logit of each head */
} attn_plan;


static void clamp_all(uint16_t *x, int64_t n, float c) {
    for (int64_t i = 0; i < n; i++) {
        float v = bf16_to_f32(x[i]);
        if (v > c) x[i] = f32_to_bf16(c);
        else if (v < -c) x[i] = f32_to_bf16(-c);
    }
}

/* one head x [D] rotated by cos/sin [D] (rotate-half) */
static void rotate(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t D) {
    const int64_t h = D / 2;
    float tmp[512];
    for (int64_t i = 0; i < D; i++) {
        float rot = i < h ? -bf16_to_f32(x[i + h]) : bf16_to_f32(x[i - h]);
        float a = round_bf16(bf16_to_f32(x[i]) * bf16_to_f32(cos[i]));
        float b = round_bf16(rot * bf16_to_f32(sin[i]));
        tmp[i] = a + b;
    }
    for (int64_t i = 0; i < D; i++) x[i] = f32_to_bf16(tmp[i]);
}

typedef struct {
    const attn_plan *p;
    const uint16_t *q;
    const uint16_t *keys, *values;  /* the slot's [kv_heads, rows, kd / vd] */
    int64_t rows, kd, vd;
    int64_t lo, hi;                 /* visible positions [lo, hi] */
    uint16_t *o;                    /* [heads, D] */
} heads_job;

static void heads_task(void *arg, int tid, int nt) {
    heads_job *j = arg;
    const attn_plan *p = j->p;
    const int64_t D = p->head_dim, R = j->rows, KD = j->kd, VD = j->vd, group = p->heads / p->kv_heads;
    const int64_t n = j->hi - j->lo + 1, r0 = p->row0 + j->lo;
    float *s = malloc(sizeof(float) * (size_t)n + sizeof(float) * (size_t)D);
    if (!s) return;
    float *acc = s + n;
    for (int64_t h = p->heads * tid / nt; h < p->heads * (tid + 1) / nt; h++) {
        const uint16_t *q = j->q + h * D;
        const uint16_t *K = j->keys + (h / group) * R * KD, *V = j->values + (h / group) * R * VD;
        float qf[512], m = -INFINITY, sink = 0.0f;
        for (int64_t d = 0; d < D; d++) qf[d] = bf16_to_f32(q[d]);
        if (p->sinks) {  /* the sink key (row 0): the query's extra component times the key's */
            sink = bf16_to_f32(p->sinks[h]) * bf16_to_f32(K[D]) * p->scaling;
            m = sink;
        }
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *k = K + (r0 + t) * KD;
            s[t] = dot_bf16_lanes(qf, k, D) * p->scaling;
            if (s[t] > m) m = s[t];
        }
        float sum = p->sinks ? expf(sink - m) : 0.0f;  /* its value is zero: the sum only */
        for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            float e = expf(s[t] - m);
            sum += e;
            float eb = round_bf16(e);
            const uint16_t *v = V + (r0 + t) * VD;
            for (int64_t d = 0; d < D; d++) acc[d] += eb * bf16_to_f32(v[d]);
        }
        for (int64_t d = 0; d < D; d++) j->o[h * D + d] = f32_to_bf16(acc[d] / sum);
    }
    free(s);
}

/* Returns 0, or -1 for what it cannot do (a head wider than 512, a position outside the cache, no memory). */
int moeinf_attn_decode(const attn_plan *p, const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                       int64_t slot, int64_t pos, uint16_t *out, int nthreads) {
    const int64_t D = p->head_dim, nq = p->heads * D, nkv = p->kv_heads * D;
    if (D > 512 || D % 2 || pos < 0 || pos >= p->max_seq || p->kv_heads < 1 || p->heads % p->kv_heads) return -1;
    const int64_t KD = p->k_row ? p->k_row : D, VD = p->v_row ? p->v_row : D, R = p->row0 + p->max_seq;
    if (KD < D || VD < D || (p->sinks && KD <= D) || p->row0 < 0) return -1;
    uint16_t *mem = moeinf_scratch_for(SCRATCH_ATTN, sizeof(uint16_t) * (size_t)(2 * nq + 2 * nkv));
    if (!mem) return -1;
    uint16_t *q = mem, *k = q + nq, *v = k + nkv, *o = v + nkv;
    const uint16_t *W[3] = {p->wq, p->wk, p->wv}, *B[3] = {p->bq, p->bk, p->bv};
    uint16_t *Y[3] = {q, k, v};
    int64_t N[3] = {nq, nkv, nkv};
    moeinf_gemv_many(x, p->hidden, 3, W, B, Y, N, nthreads);
    if (p->qk_norm == 2) {
        moeinf_rms_norm(q, p->q_norm, nq, p->norm_eps, q);
        moeinf_rms_norm(k, p->k_norm, nkv, p->norm_eps, k);
    }
    if (p->clip > 0) {
        clamp_all(q, nq, p->clip);
        clamp_all(k, nkv, p->clip);
        clamp_all(v, nkv, p->clip);
    }
    for (int64_t h = 0; h < p->heads; h++) {
        if (p->qk_norm == 1) moeinf_rms_norm(q + h * D, p->q_norm, D, p->norm_eps, q + h * D);
        if (cos) rotate(q + h * D, cos, sin, D);
    }
    uint16_t *keys = p->k_cache + slot * p->kv_heads * R * KD, *values = p->v_cache + slot * p->kv_heads * R * VD;
    for (int64_t h = 0; h < p->kv_heads; h++) {
        if (p->qk_norm == 1) moeinf_rms_norm(k + h * D, p->k_norm, D, p->norm_eps, k + h * D);
        if (cos) rotate(k + h * D, cos, sin, D);
        memcpy(keys + (h * R + p->row0 + pos) * KD, k + h * D, sizeof(uint16_t) * (size_t)D);
        memcpy(values + (h * R + p->row0 + pos) * VD, v + h * D, sizeof(uint16_t) * (size_t)D);
    }
    int64_t lo = p->window > 0 && pos - p->window + 1 > 0 ? pos - p->window + 1 : 0;
    heads_job j = {p, q, keys, values, R, KD, VD, lo, pos, o};
    int nt = nthreads;
    if (nt > p->heads) nt = (int)p->heads;
    if (nt > 1) moeinf_pool_run(heads_task, &j, nt);
    else heads_task(&j, 0, 1);
    const uint16_t *Wo[1] = {p->wo}, *Bo[1] = {p->bo};
    uint16_t *Yo[1] = {out};
    int64_t No[1] = {p->hidden};
    moeinf_gemv_many(o, nq, 1, Wo, Bo, Yo, No, nthreads);
    return 0;
}
