/* The small ops of a decode step that PyTorch runs as several kernels each: one call apiece.

   moeinf_rms_norm(x, w, n, eps, out)
       out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) for one bf16 row: RMSNorm (engine/model/layers/norm.py),
       statistics in float32 (summed in order: PyTorch's vectorised mean may differ in the last bit)

   moeinf_route(x, W, bias, E, H, k, renorm, order, ids, weights, bf16_out, nthreads)
       order 0: the softmax top-k router (engine/model/layers/router.py) for one bf16 token: logits = bf16(W x (+ b))
       (moeinf_gemv_many, the bits of the linear layer), softmax over the E logits in float32, the k largest
       in descending order, renormalised to sum to one when asked, written as float32 or rounded to bf16.
       On a tie the lower expert id comes first: torch.topk orders ties as its selection algorithm happens
       to, and exactly equal bf16 logits are not rare among 64-256 experts, so the two may pick different
       ones of equally weighted experts.
       order 1: gpt-oss's router (engine/model/families/gpt_oss/experts.py): the k largest bf16 logits,
       then their softmax rounded to bf16 as torch.softmax(top, dtype=bf16) does, written as float32.

   moeinf_route_f32(x, W, bias, E, H, k, renorm, ids, weights): order 0 for one float32 token and a float32
       router weight (a float32 model's router): float32 logits, float32 weights.

   moeinf_rms_norm_f32(x, w, n, eps, out): the same for a float32 row and weight (no rounding but float32's).

   moeinf_rms_norm_f32w(x, w, n, eps, out): gpt-oss's RMSNorm, the weight applied in float32 before
       the one rounding to bf16.

   moeinf_route_v3(...): DeepSeek-V3's sigmoid group-limited router (below). */

#include <math.h>
#include <stdlib.h>

#include "common.h"

void moeinf_gemv_many(const uint16_t *x, int64_t K, int count, const uint16_t *const *W,
                      const uint16_t *const *bias, uint16_t *const *y, const int64_t *N, int nthreads);

void moeinf_rms_norm(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = bf16_to_f32(x[i]);
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(x[i]) * r));
}

/* float32: out = w * (x * rsqrt(mean(x^2) + eps)), every value float32 (RMSNorm of a float32 model) */
void moeinf_rms_norm_f32(const float *x, const float *w, int64_t n, float eps, float *out) {
    float lane[16] = {0};  /* 16 partial sums (vectorised, and closer to torch's than one running sum) */
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += x[i + l] * x[i + l];
    for (; i < n; i++) lane[i % 16] += x[i] * x[i];
    float ss = 0.0f;
    for (int l = 0; l < 16; l++) ss += lane[l];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* gpt-oss's variant: out = bf16(w * (x * rsqrt(mean(x^2) + eps))), the weight applied in float32 */
void moeinf_rms_norm_f32w(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = bf16_to_f32(x[i]);
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(bf16_to_f32(w[i]) * (bf16_to_f32(x[i]) * r));
}

#define MAX_ROUTED 1024
#define MAX_TOPK 64


/* softmax over p [E] (m its largest value) in float32, then the k largest in descending order (the
   lower id first on a tie), renormalised to sum to one when asked, written as float32 or bf16 */
static void softmax_topk(float *p, float m, int64_t E, int k, int renorm, int64_t *ids, void *weights, int bf16_out) {
    float s = 0.0f;
    for (int64_t e = 0; e < E; e++) {
        p[e] = expf(p[e] - m);
        s += p[e];
    }
    for (int64_t e = 0; e < E; e++) p[e] /= s;
    float top[MAX_TOPK];
    unsigned char taken[MAX_ROUTED] = {0};
    float total = 0.0f;
    for (int i = 0; i < k; i++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;  /* a tie: the lower id */
        taken[best] = 1;
        ids[i] = best;
        top[i] = p[best];
        total += p[best];
    }
    for (int i = 0; i < k; i++) {
        float v = renorm ? top[i] / total : top[i];
        if (bf16_out) ((uint16_t *)weights)[i] = f32_to_bf16(v);
        else ((float *)weights)[i] = v;
    }
}

/* The softmax top-k router for one float32 token (a float32 model's, its router weight float32):
   logits = W x (+ b) in float32 (common.h's dot_f32: the order of the sums is this kernel's, not F.linear's),
   then as moeinf_route's order 0; float32 weights. Returns 0, or -1 as moeinf_route. */
int moeinf_route_f32(const float *x, const float *W, const float *bias, int64_t E, int64_t H, int k, int renorm,
                     int64_t *ids, float *weights) {
    if (E < 1 || E > MAX_ROUTED || k < 1 || k > MAX_TOPK || k > E) return -1;
    float p[MAX_ROUTED], m = -INFINITY;
    for (int64_t e = 0; e < E; e++) {
        p[e] = dot_f32(x, W + e * H, H) + (bias ? bias[e] : 0.0f);
        if (p[e] > m) m = p[e];
    }
    softmax_topk(p, m, E, k, renorm, ids, weights, 0);
    return 0;
}

/* Returns 0, or -1 for what it cannot do (more than 1024 experts, k outside 1..min(E, 64)). */
int moeinf_route(const uint16_t *x, const uint16_t *W, const uint16_t *bias, int64_t E, int64_t H, int k,
                 int renorm, int order, int64_t *ids, void *weights, int bf16_out, int nthreads) {
    if (E < 1 || E > MAX_ROUTED || k < 1 || k > MAX_TOPK || k > E) return -1;
    uint16_t logits[MAX_ROUTED];
    float p[MAX_ROUTED];
    const uint16_t *Ws[1] = {W}, *Bs[1] = {bias};
    uint16_t *Ys[1] = {logits};
    int64_t Ns[1] = {E};
    moeinf_gemv_many(x, H, 1, Ws, Bs, Ys, Ns, nthreads);
    float m = -INFINITY;
    for (int64_t e = 0; e < E; e++) {
        p[e] = bf16_to_f32(logits[e]);
        if (p[e] > m) m = p[e];
    }
    if (order == 1) {
        unsigned char used[MAX_ROUTED] = {0};
        float top[MAX_TOPK], sum = 0.0f;
        for (int i = 0; i < k; i++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (!used[e] && (best < 0 || p[e] > p[best])) best = e;
            used[best] = 1;
            ids[i] = best;
            top[i] = expf(p[best] - p[ids[0]]);
            sum += top[i];
        }
        for (int i = 0; i < k; i++) ((float *)weights)[i] = round_bf16(top[i] / sum);
        return 0;
    }
    softmax_topk(p, m, E, k, renorm, ids, weights, bf16_out);
    return 0;
}

/* DeepSeek-V3's router for one bf16 token (engine/model/families/deepseek/router.py, DeepseekV3Router):
   logits = W x in float32 (the bf16 products are exact in float32: only the order of the sums differs
   from F.linear on the float32 copies), scores = sigmoid(logits), choice = scores + correction bias;
   the topk_group groups (of n_group) whose two best choices sum highest are kept, the k best choices
   among their experts taken (descending, the lower id first on a tie), their unbiased scores
   renormalised (sum + 1e-20) when asked and multiplied by `scale`. ids [k] int64, weights [k] float32.
   Returns 0, or -1 for what it cannot do. */
typedef struct {
    const uint16_t *x, *W;
    float *logit;
    int64_t E, H;
} logits_job;

static void logits_task(void *arg, int tid, int nt) {
    logits_job *j = arg;
    int64_t lo, hi;
    split_rows(j->E, tid, nt, &lo, &hi);
    for (int64_t n0 = lo; n0 < hi; n0 += CHUNK) {
        int64_t n1 = n0 + CHUNK < hi ? n0 + CHUNK : hi;
        moeinf_dot_rows(j->x, j->W, j->logit + n0, n0, n1, j->H);
    }
}

/* moeinf_route_v3 with the logits' rows split over nthreads (the same bits on any count) */
int moeinf_route_v3_mt(const uint16_t *x, const uint16_t *W, const float *corr, int64_t E, int64_t H, int k,
                       int n_group, int topk_group, int renorm, float scale, int64_t *ids, float *weights,
                       int nthreads) {
    if (E < 2 || E > MAX_ROUTED || k < 1 || k > MAX_TOPK || n_group < 1 || E % n_group || topk_group < 1 ||
        topk_group > n_group || E / n_group < 2 || k > topk_group * (E / n_group))
        return -1;
    float logit[MAX_ROUTED], score[MAX_ROUTED], choice[MAX_ROUTED];
    logits_job lj = {x, W, logit, E, H};
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((int64_t)nt * 16 > E) nt = (int)((E + 15) / 16);
    if (nt > 1) moeinf_pool_run(logits_task, &lj, nt);
    else logits_task(&lj, 0, 1);
    for (int64_t e = 0; e < E; e++) {
        score[e] = 1.0f / (1.0f + expf(-logit[e]));
        choice[e] = score[e] + (corr ? corr[e] : 0.0f);
    }
    const int64_t per = E / n_group;
    float group[MAX_ROUTED];
    for (int g = 0; g < n_group; g++) {
        float a = -INFINITY, b = -INFINITY;  /* the two best of the group */
        for (int64_t e = g * per; e < (g + 1) * per; e++) {
            if (choice[e] > a) { b = a; a = choice[e]; }
            else if (choice[e] > b) b = choice[e];
        }
        group[g] = a + b;
    }
    unsigned char kept[MAX_ROUTED] = {0}, taken[MAX_ROUTED] = {0};
    for (int i = 0; i < topk_group; i++) {
        int best = -1;
        for (int g = 0; g < n_group; g++)
            if (!kept[g] && (best < 0 || group[g] > group[best])) best = g;
        kept[best] = 1;
    }
    float total = 0.0f;
    for (int i = 0; i < k; i++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (kept[e / per] && !taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
        taken[best] = 1;
        ids[i] = best;
        weights[i] = score[best];
        total += score[best];
    }
    for (int i = 0; i < k; i++) weights[i] = (renorm ? weights[i] / (total + 1e-20f) : weights[i]) * scale;
    return 0;
}

int moeinf_route_v3(const uint16_t *x, const uint16_t *W, const float *corr, int64_t E, int64_t H, int k,
                    int n_group, int topk_group, int renorm, float scale, int64_t *ids, float *weights) {
    return moeinf_route_v3_mt(x, W, corr, E, H, k, n_group, topk_group, renorm, scale, ids, weights, 1);
}
