/* The small ops of a decode step that PyTorch runs as several kernels each: one call apiece.

   moeinf_rms_norm(x, w, n, eps, out)
       out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) for one bf16 row: RMSNorm (engine/model/layers/norm.py),
       statistics in float32 (summed in order: PyTorch's vectorised mean may differ in the last bit)

   moeinf_route_topk(x, W, bias, E, H, k, renorm, ids, weights, bf16_out, nthreads)
       the softmax top-k router (engine/model/layers/router.py) for one bf16 token: logits = bf16(W x (+ b))
       (moeinf_gemv_many, the bits of the linear layer), softmax over the E logits in float32, the k largest
       in descending order, renormalised to sum to one when asked, written as float32 or rounded to bf16.
       On a tie the lower expert id comes first: torch.topk orders ties as its selection algorithm happens
       to, and exactly equal bf16 logits are not rare among 64-256 experts, so the two may pick different
       ones of equally weighted experts. */

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

#define MAX_ROUTED 1024
#define MAX_TOPK 64

/* Returns 0, or -1 for what it cannot do (more than 1024 experts, k outside 1..min(E, 64)). */
int moeinf_route_topk(const uint16_t *x, const uint16_t *W, const uint16_t *bias, int64_t E, int64_t H, int k,
                      int renorm, int64_t *ids, void *weights, int bf16_out, int nthreads) {
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
    return 0;
}
