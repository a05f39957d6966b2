/* One decode token through DeepSeek's multi-head latent attention in one call
   (engine/model/families/deepseek/mla.py, the absorbed path it takes for one token).

   moeinf_mla_decode(plan, x, cos, sin, slot, pos, out, nthreads) does what MultiHeadLatentAttention
   does for one bf16 token of one sequence, with the torch path's roundings:
     q = bf16(W_qb rms_norm(bf16(W_qa x (+ b))))  (or bf16(W_q x)), [heads, nope + rope]
     [c, k_r] = bf16(W_kva x (+ b));  c = rms_norm(c)                     (moeinf_gemv_many, decode.c)
     rotary on q's rope part and k_r in bf16 (V3): each product, the sum/difference rounded, adjacent
       pairs (rope_interleave) or halves
     c and k_r written at position pos of the slot's latent and key caches
     q_lat[h] = bf16(q_nope[h] W_uk[h])                (moeinf_heads_xtw: the key half of kv_b absorbed)
     score[h, t] = bf16(q_rope[h] . k_r[t] + bf16(q_lat[h] . c[t])), as torch.addmm(q_lat @ c.T, ...)
     p = bf16(softmax(score * scale)) in float32;  mix[h] = bf16(sum_t p[h, t] c[t])
     o[h] = bf16(W_uv[h] mix[h])                       (moeinf_heads_wx: the value half of kv_b)
     out = bf16(W_o o (+ b))
   All of it is one pool job of four phases (mla_phase, below): the products' rows and the heads split over
   the threads, with the bits of the products called one by one. */

#include <stdlib.h>

#include "common.h"

void moeinf_gemv_many(const uint16_t *x, int64_t K, int count, const uint16_t *const *W,
                      const uint16_t *const *bias, uint16_t *const *y, const int64_t *N, int nthreads);
void moeinf_heads_xtw(const uint16_t *x, const uint16_t *W, uint16_t *y, int64_t nh, int64_t head_rows,
                      int64_t row0, int64_t n_rows, int64_t K, int nthreads);
void moeinf_heads_wx(const uint16_t *x, const uint16_t *W, uint16_t *y, int64_t nh, int64_t head_rows,
                     int64_t row0, int64_t n_rows, int64_t K, int nthreads);

typedef struct {
    int64_t hidden, heads, q_rank, kv_rank, nope, rope, v, max_seq, interleave;  /* q_rank 0: q_proj */
    const uint16_t *wq, *wqa, *bqa, *q_norm, *wqb;  /* wq [heads*(nope+rope), hidden] or wqa/q_norm/wqb */
    const uint16_t *wkva, *bkva, *kv_norm, *wkvb;   /* [kv_rank + rope, hidden], [heads*(nope+v), kv_rank] */
    const uint16_t *wo, *bo;                        /* [hidden, heads*v] */
    float q_eps, kv_eps, scale;
    uint16_t *latent, *k_rope;                      /* [slots, max_seq, kv_rank], [slots, max_seq, rope] */
} mla_plan;



/* x [d] rotated in bf16 by cos/sin [d/2] (apply_rope in the model dtype) */
static void rope_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d, int interleave) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        int64_t i1 = interleave ? 2 * i : i, i2 = interleave ? 2 * i + 1 : i + half;
        float x1 = bf16_to_f32(x[i1]), x2 = bf16_to_f32(x[i2]);
        float c = bf16_to_f32(cos[i]), s = bf16_to_f32(sin[i]);
        float o1 = round_bf16(x1 * c) - round_bf16(x2 * s);
        float o2 = round_bf16(x2 * c) + round_bf16(x1 * s);
        x[i1] = f32_to_bf16(o1);
        x[i2] = f32_to_bf16(o2);
    }
}

typedef struct {
    const mla_plan *p;
    const uint16_t *q, *q_lat;      /* [heads, nope + rope], [heads, kv_rank] */
    const uint16_t *c, *kr;         /* the slot's caches */
    int64_t n;                      /* positions 0..n-1 */
    uint16_t *mix;                  /* [heads, kv_rank] */
} mla_job;

static void mla_heads(void *arg, int tid, int nt) {
    mla_job *j = arg;
    const mla_plan *p = j->p;
    const int64_t L = p->kv_rank, R = p->rope, qk = p->nope + p->rope, n = j->n;
    float *s = malloc(sizeof(float) * (size_t)(n + L + L + R));
    if (!s) return;
    float *acc = s + n, *ql = acc + L, *qr = ql + L;
    for (int64_t h = p->heads * tid / nt; h < p->heads * (tid + 1) / nt; h++) {
        for (int64_t l = 0; l < L; l++) ql[l] = bf16_to_f32(j->q_lat[h * L + l]);
        for (int64_t r = 0; r < R; r++) qr[r] = bf16_to_f32(j->q[h * qk + p->nope + r]);
        float m = -INFINITY;
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *c = j->c + t * L, *k = j->kr + t * R;
            float d1 = dot_bf16_lanes(ql, c, L), d2 = dot_bf16_lanes(qr, k, R);
            s[t] = round_bf16(d2 + round_bf16(d1)) * p->scale;
            if (s[t] > m) m = s[t];
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        for (int64_t l = 0; l < L; l++) acc[l] = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            float w = round_bf16(s[t] / sum);
            const uint16_t *c = j->c + t * L;
            for (int64_t l = 0; l < L; l++) acc[l] += w * bf16_to_f32(c[l]);
        }
        for (int64_t l = 0; l < L; l++) j->mix[h * L + l] = f32_to_bf16(acc[l]);
    }
    free(s);
}

void moeinf_gemv_many_part(const uint16_t *x, int64_t K, int count, const uint16_t *const *W,
                           const uint16_t *const *bias, uint16_t *const *y, const int64_t *N, int part, int parts);

/* the whole token as one pool job of four phases: (0) the rows of q_a (or q) and kv_a; (1) the rows of
   q_b, each part normalising q_a itself (the same bits in every part), and part 0 the latent and key
   written at pos; (2) the heads, split over the parts: q's rope, q_nope absorbed, the scores, softmax
   and mix over the cache, the value half of kv_b; (3) the rows of o_proj. Each product is the same
   rows in the same blocks of 16 as its own moeinf_gemv_many call, so the bits do not change. */
typedef struct {
    const mla_plan *p;
    const uint16_t *x, *cos, *sin;
    int64_t slot, pos;
    uint16_t *qa, *qn, *q, *kv, *q_lat, *mix, *o, *qnope, *out;  /* qn: one [q_rank] per part */
} mla_fused;

static void mla_phase(void *arg, int phase, int part, int parts) {
    mla_fused *f = arg;
    const mla_plan *p = f->p;
    const int64_t H = p->hidden, nh = p->heads, L = p->kv_rank, R = p->rope, qk = p->nope + p->rope, QR = p->q_rank;
    const int64_t nq = nh * qk, nkv = L + R, hr = p->nope + p->v;
    if (phase == 0) {
        const uint16_t *W[2] = {QR ? p->wqa : p->wq, p->wkva}, *B[2] = {QR ? p->bqa : 0, p->bkva};
        uint16_t *Y[2] = {QR ? f->qa : f->q, f->kv};
        int64_t N[2] = {QR ? QR : nq, nkv};
        moeinf_gemv_many_part(f->x, H, 2, W, B, Y, N, part, parts);
    } else if (phase == 1) {
        if (QR) {
            uint16_t *qn = f->qn + part * QR;
            moeinf_rms_norm(f->qa, p->q_norm, QR, p->q_eps, qn);
            const uint16_t *W[1] = {p->wqb}, *B[1] = {0};
            uint16_t *Y[1] = {f->q};
            int64_t N[1] = {nq};
            moeinf_gemv_many_part(qn, QR, 1, W, B, Y, N, part, parts);
        }
        if (part == 0) {
            uint16_t *c_row = p->latent + (f->slot * p->max_seq + f->pos) * L;
            uint16_t *k_row = p->k_rope + (f->slot * p->max_seq + f->pos) * R;
            moeinf_rms_norm(f->kv, p->kv_norm, L, p->kv_eps, c_row);
            memcpy(k_row, f->kv + L, sizeof(uint16_t) * (size_t)R);
            rope_bf16(k_row, f->cos, f->sin, R, (int)p->interleave);
        }
    } else if (phase == 2) {
        mla_job j = {p, f->q, f->q_lat, p->latent + f->slot * p->max_seq * L, p->k_rope + f->slot * p->max_seq * R,
                     f->pos + 1, f->mix};
        const int64_t h0 = nh * part / parts, h1 = nh * (part + 1) / parts;  /* mla_heads' share of `part` */
        for (int64_t h = h0; h < h1; h++) {
            rope_bf16(f->q + h * qk + p->nope, f->cos, f->sin, R, (int)p->interleave);
            memcpy(f->qnope + h * p->nope, f->q + h * qk, sizeof(uint16_t) * (size_t)p->nope);
            moeinf_heads_xtw(f->qnope + h * p->nope, p->wkvb + h * hr * L, f->q_lat + h * L, 1, hr, 0, p->nope, L, 1);
        }
        mla_heads(&j, part, parts);
        for (int64_t h = h0; h < h1; h++)
            moeinf_heads_wx(f->mix + h * L, p->wkvb + h * hr * L, f->o + h * p->v, 1, hr, p->nope, p->v, L, 1);
    } else {
        const uint16_t *W[1] = {p->wo}, *B[1] = {p->bo};
        uint16_t *Y[1] = {f->out};
        int64_t N[1] = {H};
        moeinf_gemv_many_part(f->o, nh * p->v, 1, W, B, Y, N, part, parts);
    }
}

/* Returns 0, or -1 for what it cannot do (a position outside the cache, an odd rope width, no memory). */
int moeinf_mla_decode(const mla_plan *p, const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                      int64_t slot, int64_t pos, uint16_t *out, int nthreads) {
    const int64_t H = p->hidden, nh = p->heads, L = p->kv_rank, R = p->rope, qk = p->nope + p->rope;
    if (pos < 0 || pos >= p->max_seq || R % 2 || !cos || !sin) return -1;
    const int64_t nq = nh * qk, nkv = L + R, QR = p->q_rank;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt > nh) nt = (int)nh;
    uint16_t *mem = moeinf_scratch_for(SCRATCH_MLA, sizeof(uint16_t) * (size_t)((1 + nt) * QR + nq + nkv + 2 * nh * L + nh * p->v + nh * p->nope + 64));
    if (!mem) return -1;
    uint16_t *qa = mem, *q = qa + QR, *kv = q + nq, *q_lat = kv + nkv, *mix = q_lat + nh * L;
    uint16_t *o = mix + nh * L, *qnope = o + nh * p->v, *qn = qnope + nh * p->nope;
    mla_fused f = {p, x, cos, sin, slot, pos, qa, qn, q, kv, q_lat, mix, o, qnope, out};
    moeinf_pool_run_phases(mla_phase, &f, 4, nt, nt);
    return 0;
}
