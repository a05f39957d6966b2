/* Decoder layers of one bf16 token in one call (moeinf_decode_layers; a float32 token of a GGUF model's
   block-format layers: moeinf_decode_layers_f32, at the end): the layer loop of a decode step, for the pre-norm layers
   of engine/model/transformer.py's DecoderLayer (every routed expert resident). Each layer is exactly
   the per-layer native path:
     t = norm(x); a = attn(t); h = bf16(x + a)           (decode.c; attention.c, or mla.c for MLA)
     t = norm(h); ids, w = route(t)                      (decode.c: softmax top-k, gpt-oss's, DeepSeek-V3's)
     acc = sum_e w_e expert_e(t)                          (moe.c: SiLU or gpt-oss's clamped SwiGLU experts)
     s = shared(t)   (a shared expert, or a dense layer's MLP: moe.c with one expert and weight 1)
     x = bf16(h + bf16(acc)), or bf16(h + bf16(bf16(acc) + s)) with a shared expert, or bf16(h + s)
   so the result is bit for bit that of the layers called one by one; what goes is the Python between
   them. The routed ids and weights of every layer (and, when asked, the router's input) are written out
   for the expert source's hooks. */

#include <stdlib.h>
#include <time.h>

#include "common.h"

int moeinf_attn_decode(const void *plan, const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                       int64_t slot, int64_t pos, uint16_t *out, int nthreads);
int moeinf_mla_decode(const void *plan, const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                      int64_t slot, int64_t pos, uint16_t *out, int nthreads);
void moeinf_rms_norm_f32w(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *out);
int moeinf_route(const uint16_t *x, const uint16_t *W, const uint16_t *bias, int64_t E, int64_t H, int k,
                 int renorm, int order, int64_t *ids, void *weights, int bf16_out, int nthreads);
int moeinf_route_v3_mt(const uint16_t *x, const uint16_t *W, const float *corr, int64_t E, int64_t H, int k,
                       int n_group, int topk_group, int renorm, float scale, int64_t *ids, float *weights,
                       int nthreads);
int moeinf_experts_acc(const uint16_t *x, int k, const void *const *gate, const void *const *up,
                       const void *const *down, const uint16_t *const *gate_bias, const uint16_t *const *up_bias,
                       const uint16_t *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                       int act, float alpha, float limit, float *acc, int nthreads);
int moeinf_experts_acc_last(const uint16_t *x, int k, const void *const *gate, const void *const *up,
                            const void *const *down, const uint16_t *const *gate_bias,
                            const uint16_t *const *up_bias, const uint16_t *const *down_bias, const float *coef,
                            int type, int64_t H, int64_t I, int act, float alpha, float limit, float *acc,
                            float *acc_last, int nthreads);

typedef struct {
    const void *attn;                      /* attention.c's plan, or mla.c's (attn_kind 1) */
    const uint16_t *in_norm, *post_norm;   /* [H] */
    float eps;
    int k, renorm, bf16_weights, type;     /* type: the experts' format (0 bf16, else a GGUF block type) */
    int64_t E, I;
    const uint16_t *router, *router_bias;  /* [E, H], [E] or NULL */
    const void *const *table;              /* [6 * E]: gate, up, down, gate/up/down bias of every expert */
    int norm_f32w;                         /* gpt-oss's norms: the weight applied before the one rounding */
    int router_kind;                       /* 0 moeinf_route, 1 moeinf_route_v3, 2 none (a dense layer) */
    int order;                             /* moeinf_route's order (1: gpt-oss's top-k, then softmax) */
    int act;                               /* the experts' activation (moe.c): 0 SiLU, 1 clamped SwiGLU */
    float alpha, limit;
    int attn_kind;                         /* 0 attention.c, 1 mla.c */
    int n_group, topk_group;               /* moeinf_route_v3's */
    float scale;
    const float *corr;                     /* [E] float32 or NULL */
    const void *shared[6];                 /* a shared expert or a dense MLP (bf16: gate, up, down, biases) */
    int64_t shared_I;                      /* 0: none */
} step_layer;

/* as cuda_ext.cpu.threads: smaller products stay on the caller; but the router always takes the
   threads (its 64-256 rows are split in one job; on the caller alone the other core waits) */
#define SPLIT_MIN (1 << 16)
static int pick(int64_t elements, int nthreads) { return elements < SPLIT_MIN ? 1 : nthreads; }

/* Where a step's time goes (benchmarks/decode_step_breakdown.py): NULL, or seconds accumulated by part,
   PROF_ATTN, PROF_ROUTER, PROF_EXPERTS and PROF_REST (norms, residual adds, the layer loop) */
enum { PROF_ATTN, PROF_ROUTER, PROF_EXPERTS, PROF_REST, PROF_PARTS };
static double *step_prof;
void moeinf_step_profile(double *acc) { step_prof = acc; }
static double prof_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
/* the time since *t goes to part `part`; *t moves to now (nothing when no profile is asked for) */
static inline void prof_mark(double *t, int part) {
    if (!step_prof) return;
    double now = prof_now();
    step_prof[part] += now - *t;
    *t = now;
}

/* x [H] bf16 in and out. ids [sum k], weights [sum k]: each layer's routing (k of the layer, none for a
   dense layer); routed_in [n, H] or NULL: each layer's router input. Returns 0, or -(1 + layer) for a
   layer the kernels refused (x then holds that layer's input). */
int moeinf_decode_layers(const step_layer *layers, int n, int64_t H, uint16_t *x, const uint16_t *cos,
                         const uint16_t *sin, int64_t slot, int64_t pos, int64_t *ids, float *weights,
                         uint16_t *routed_in, int nthreads) {
    size_t f = sizeof(float) * (size_t)H + 64;
    char *mem = moeinf_scratch_for(SCRATCH_STEP, sizeof(uint16_t) * (size_t)(3 * H) + 2 * f + 128);
    if (!mem) return -1;
    uint16_t *t = (uint16_t *)mem, *a = t + H, *h = a + H;
    float *acc = (float *)(((uintptr_t)(h + H) + 63) & ~(uintptr_t)63);
    float *acc2 = (float *)(((uintptr_t)(acc + H) + 63) & ~(uintptr_t)63);
    int64_t off = 0;
    double pt = step_prof ? prof_now() : 0.0;
    for (int l = 0; l < n; l++) {
        const step_layer *L = layers + l;
        (L->norm_f32w ? moeinf_rms_norm_f32w : moeinf_rms_norm)(x, L->in_norm, H, L->eps, t);
        prof_mark(&pt, PROF_REST);
        if (L->attn_kind == 1) {
            if (moeinf_mla_decode(L->attn, t, cos, sin, slot, pos, a, nthreads)) return -(1 + l);
        } else {
            const int64_t *ap = (const int64_t *)L->attn;  /* hidden, heads, kv_heads, head_dim: the plan's first fields */
            if (moeinf_attn_decode(L->attn, t, cos, sin, slot, pos, a, pick(ap[1] * ap[3] * H, nthreads)))
                return -(1 + l);
        }
        prof_mark(&pt, PROF_ATTN);
        for (int64_t i = 0; i < H; i++) h[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(a[i]));
        (L->norm_f32w ? moeinf_rms_norm_f32w : moeinf_rms_norm)(h, L->post_norm, H, L->eps, t);
        if (routed_in) memcpy(routed_in + l * H, t, sizeof(uint16_t) * (size_t)H);
        prof_mark(&pt, PROF_REST);
        if (L->router_kind != 2) {
            float *w = weights + off;
            int64_t *id = ids + off;
            int err = L->router_kind == 1
                ? moeinf_route_v3_mt(t, L->router, L->corr, L->E, H, L->k, L->n_group, L->topk_group,
                                     L->renorm, L->scale, id, w, nthreads)
                : moeinf_route(t, L->router, L->router_bias, L->E, H, L->k, L->renorm, L->order, id, w, 0,
                               nthreads);
            if (err) return -(1 + l);
            prof_mark(&pt, PROF_ROUTER);
            const void *g[64], *u[64], *d[64], *gb[64], *ub[64], *db[64];
            float coef[64];
            for (int e = 0; e < L->k; e++) {
                int64_t j = id[e];
                if (L->bf16_weights) w[e] = round_bf16(w[e]);
                coef[e] = w[e];
                g[e] = L->table[j]; u[e] = L->table[L->E + j]; d[e] = L->table[2 * L->E + j];
                gb[e] = L->table[3 * L->E + j]; ub[e] = L->table[4 * L->E + j]; db[e] = L->table[5 * L->E + j];
            }
            memset(acc, 0, sizeof(float) * (size_t)H);
            /* a shared expert of the routed experts' width and format joins their pool job as the last
               expert, its sum kept apart (acc2): the same bits as its own call */
            int joined = L->shared_I == L->I && L->type == 0 && L->act == 0 && L->k < 32;
            int k = L->k;
            if (joined) {
                const void *const *s = L->shared;
                g[k] = s[0]; u[k] = s[1]; d[k] = s[2]; gb[k] = s[3]; ub[k] = s[4]; db[k] = s[5];
                coef[k] = 1.0f;
                memset(acc2, 0, sizeof(float) * (size_t)H);
                k++;
            }
            if (moeinf_experts_acc_last(t, k, g, u, d, (const uint16_t *const *)gb, (const uint16_t *const *)ub,
                                        (const uint16_t *const *)db, coef, L->type, H, L->I, L->act, L->alpha,
                                        L->limit, acc, joined ? acc2 : 0, pick(3 * L->I * H, nthreads)))
                return -(1 + l);
            off += L->k;
            if (joined) goto combine;
        }
        if (L->shared_I) {
            const void *const *s = L->shared;
            float one = 1.0f;
            memset(acc2, 0, sizeof(float) * (size_t)H);
            if (moeinf_experts_acc(t, 1, s, s + 1, s + 2, (const uint16_t *const *)(s + 3),
                                   (const uint16_t *const *)(s + 4), (const uint16_t *const *)(s + 5), &one, 0,
                                   H, L->shared_I, 0, 0.0f, 0.0f, acc2, pick(3 * L->shared_I * H, nthreads)))
                return -(1 + l);
        }
    combine:
        prof_mark(&pt, PROF_EXPERTS);
        for (int64_t i = 0; i < H; i++) {
            float y;
            if (L->router_kind == 2) y = round_bf16(acc2[i]);
            else if (L->shared_I) y = round_bf16(round_bf16(acc[i]) + round_bf16(acc2[i]));
            else y = round_bf16(acc[i]);
            x[i] = f32_to_bf16(bf16_to_f32(h[i]) + y);
        }
    }
    prof_mark(&pt, PROF_REST);
    return 0;
}

/* ---------------------------------------------------------------- one float32 token (a GGUF model's)

   The same layer loop for a float32 model whose attention and experts are kept in block formats:
     t = rms_norm_f32(x); a = attn_f32(t); h = x + a              (decode.c; attention_f32.c)
     t = rms_norm_f32(h); ids, w = route_f32(t)                    (decode.c: softmax top-k, float32 router)
     acc = sum_e w_e expert_e(t)                                    (moe.c's float32 experts, int8 when asked)
     x = h + acc   (a dense layer: acc = its MLP, moe.c with one expert and weight 1)
   each piece the native call the layers make one by one (engine/model/layers), so the same bits. The
   int8 bits (each layer's `int8` and `attn_int8`) are set for the int8_activations mode in force. */

int moeinf_attn_decode_f32(const void *plan, const float *x, const float *cos, const float *sin, int64_t slot,
                           int64_t pos, float *out, int nthreads, int int8);
void moeinf_rms_norm_f32(const float *x, const float *w, int64_t n, float eps, float *out);
int moeinf_route_f32(const float *x, const float *W, const float *bias, int64_t E, int64_t H, int k, int renorm,
                     int64_t *ids, float *weights);
typedef int (*experts_f32_fn)(const float *x, int k, const void *const *gate, const void *const *up,
                              const void *const *down, const float *const *gate_bias, const float *const *up_bias,
                              const float *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                              int act, float alpha, float limit, float *acc, int nthreads);
int moeinf_experts_acc_f32(const float *x, int k, const void *const *gate, const void *const *up,
                           const void *const *down, const float *const *gate_bias, const float *const *up_bias,
                           const float *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                           int act, float alpha, float limit, float *acc, int nthreads);
int moeinf_experts_acc_f32_int8(const float *x, int k, const void *const *gate, const void *const *up,
                                const void *const *down, const float *const *gate_bias, const float *const *up_bias,
                                const float *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                                int act, float alpha, float limit, float *acc, int nthreads);

typedef struct {
    const void *attn;                      /* attention_f32.c's plan */
    const float *in_norm, *post_norm;      /* [H] float32 */
    float eps;
    int k, renorm, type, int8;             /* type: the experts' (moe.c's float32 type); int8: x and h rounded */
    int attn_int8;                         /* the attention's int8 bits (attention_f32.c) */
    int64_t E, I;                          /* E 0: a dense layer (its MLP in `table`, one expert) */
    const float *router, *router_bias;     /* [E, H], [E] or NULL, float32 */
    const void *const *table;              /* [6 * max(E, 1)]: gate, up, down, gate/up/down bias of every expert */
} step_f32_layer;

/* x [H] float32 in and out; ids, weights [sum k]; routed_in [n, H] or NULL. Returns as moeinf_decode_layers. */
int moeinf_decode_layers_f32(const step_f32_layer *layers, int n, int64_t H, float *x, const float *cos,
                             const float *sin, int64_t slot, int64_t pos, int64_t *ids, float *weights,
                             float *routed_in, int nthreads) {
    char *mem = moeinf_scratch_for(SCRATCH_STEP, sizeof(float) * (size_t)(4 * H) + 256);
    if (!mem) return -1;
    float *t = (float *)(((uintptr_t)mem + 63) & ~(uintptr_t)63), *a = t + H, *h = a + H, *acc = h + H;
    int64_t off = 0;
    double pt = step_prof ? prof_now() : 0.0;
    for (int l = 0; l < n; l++) {
        const step_f32_layer *L = layers + l;
        moeinf_rms_norm_f32(x, L->in_norm, H, L->eps, t);
        prof_mark(&pt, PROF_REST);
        if (moeinf_attn_decode_f32(L->attn, t, cos, sin, slot, pos, a, nthreads, L->attn_int8)) return -(1 + l);
        prof_mark(&pt, PROF_ATTN);
        for (int64_t i = 0; i < H; i++) h[i] = x[i] + a[i];
        moeinf_rms_norm_f32(h, L->post_norm, H, L->eps, t);
        prof_mark(&pt, PROF_REST);
        const void *g[64], *u[64], *d[64], *gb[64], *ub[64], *db[64];
        float coef[64];
        int k = 1;
        if (L->E) {
            if (routed_in) memcpy(routed_in + l * H, t, sizeof(float) * (size_t)H);
            float *w = weights + off;
            int64_t *id = ids + off;
            if (L->k > 64 || moeinf_route_f32(t, L->router, L->router_bias, L->E, H, L->k, L->renorm, id, w))
                return -(1 + l);
            prof_mark(&pt, PROF_ROUTER);
            k = L->k;
            for (int e = 0; e < k; e++) {
                int64_t j = id[e];
                coef[e] = w[e];
                g[e] = L->table[j]; u[e] = L->table[L->E + j]; d[e] = L->table[2 * L->E + j];
                gb[e] = L->table[3 * L->E + j]; ub[e] = L->table[4 * L->E + j]; db[e] = L->table[5 * L->E + j];
            }
            off += k;
        } else {
            coef[0] = 1.0f;
            g[0] = L->table[0]; u[0] = L->table[1]; d[0] = L->table[2];
            gb[0] = L->table[3]; ub[0] = L->table[4]; db[0] = L->table[5];
        }
        memset(acc, 0, sizeof(float) * (size_t)H);
        experts_f32_fn run = L->int8 ? moeinf_experts_acc_f32_int8 : moeinf_experts_acc_f32;
        if (run(t, k, g, u, d, (const float *const *)gb, (const float *const *)ub, (const float *const *)db, coef,
                L->type, H, L->I, 0, 0.0f, 0.0f, acc, pick(3 * L->I * H, nthreads)))
            return -(1 + l);
        prof_mark(&pt, PROF_EXPERTS);
        for (int64_t i = 0; i < H; i++) x[i] = h[i] + acc[i];
    }
    prof_mark(&pt, PROF_REST);
    return 0;
}
