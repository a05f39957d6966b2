/* A token's routed experts, all of them in one pool job: the grouped decode step of an MoE layer.

   moeinf_experts_acc(...)   for the k experts e of one token (SwiGLU: gate, up [I, H], down [H, I]),
       h_e = bf16(act(gate_e x, up_e x)),  d_e = down_e h_e,  acc += bf16(coef_e * bf16(d_e)), in order e = 0..k-1

   Weights are bf16 (type 0) or one block format (a GGUF type that quant.c takes: the activations x and
   h_e are then quantised per block of 32, as there; where every row is short, F32_ROW_BYTES, as many
   small experts' are, x and h_e, bf16 values and so exact in float32, meet the blocks unrounded in
   quant_f32.c's float32 rows, four rows a pass, which are the faster there: within the int8 bound,
   dequantise-then-multiply up to the float32 sums' order). One pool job of phases (pool.c: parts claimed by
   whichever thread comes first, experts_unit_phase): as many experts as the threads divide run whole,
   one part each (gate/up, h_e, down, with no barrier between an expert's gate/up and its down, and
   whole experts claimed in turn to balance the threads), the others split by rows; each expert's
   rounded, weighted output is kept, then added to acc row by row in expert order, so the sum is the
   same as k single-expert calls in that order, on any thread count and whoever runs which part. One
   job instead of k: no wake-ups between experts, and no Python between them.

   act 0: SiLU(gate + gate_bias) * (up + up_bias), each product and bias rounded to bf16 as torch
   does (the SwiGLU of Mixtral, Qwen, OLMoE, DeepSeek's routed experts). act 1: gpt-oss's clamped
   SwiGLU, (clamp(up, +-limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit), biases added with
   one rounding as F.linear does.

   moeinf_experts_acc_f32(...)   the same for float32 activations on block-format experts (quant_f32.c's
       rows: each block dequantised in registers, no activation rounded), float32 biases, and no bf16
       rounding anywhere: h_e = act(gate_e x + gate_bias, up_e x + up_bias) and acc += (down_e h_e +
       down_bias) * coef_e in float32, as the torch path on the dequantised experts computes them.
       Its `type` may name the down matrices' format apart (llama.cpp's Q4_K_M keeps some layers'
       ffn_down in Q6_K): the gate/up type in the low byte, the down type in the next (0: the same). */

#include "common.h"

#define MAX_EXPERTS 32
#ifndef UNIT_MAX_BYTES
#define UNIT_MAX_BYTES (4 << 20) /* experts of more bytes (about; block formats counted as 1 a weight) go by rows */
#endif
#ifndef ROW_PARTS
#define ROW_PARTS 4 /* parts a thread, by rows */
#endif
#ifndef F32_ROW_BYTES
#define F32_ROW_BYTES 1152 /* bf16 x on block rows up to this long: the float32 rows (faster there than int8) */
#endif
#define DOWN_RUN 32 /* output rows of every expert's down taken together (float32 experts) */

typedef struct {
    int k, type, act, rb_gate, rb_down;  /* rb_*: bytes per row of a block-format matrix */
    int type_down;                       /* f32: the down matrices' block type */
    int f32;                             /* float32 x, h and biases (block formats only) */
    int int8;                            /* f32 with x and h rounded to int8 per block of 32 (quant.c's rows) */
    int64_t H, I;
    const void *x;                       /* [H] bf16, or float32 when f32 */
    const void *gate[MAX_EXPERTS], *up[MAX_EXPERTS], *down[MAX_EXPERTS];
    const void *gate_bias[MAX_EXPERTS], *up_bias[MAX_EXPERTS], *down_bias[MAX_EXPERTS];  /* bf16, or float32 */
    float coef[MAX_EXPERTS];
    float alpha, limit;
    uint16_t *h;                         /* [k, I] bf16 */
    float *hf;                           /* [k, I] float32 (f32; bf16 x on short block rows: h's values) */
    const float *xf;                     /* NULL, or bf16 x in float32 (short block rows: float32 rows) */
    xq_t xq;                             /* x quantised (block formats) */
    int8_t *hq;                          /* [k, I] h quantised */
    float *hd, *hs;                      /* [k, I / 32] */
    float *acc;                          /* [H] float32 */
    float *acc_last;                     /* NULL, or [H]: where the last expert's share goes (a shared expert) */
    float *vals;                         /* [k, H]: each expert's rounded, weighted output (by experts) */
    int units;                           /* experts run whole, one part each (by experts) */
} experts_job;

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* h from the float32 sums g, u of gate and up rows n (the torch path's roundings) */
static inline uint16_t activate(const experts_job *j, int e, int64_t n, float g, float u) {
    const uint16_t *gb = (const uint16_t *)j->gate_bias[e], *ub = (const uint16_t *)j->up_bias[e];
    if (j->act == 0) {
        float gv = round_bf16(g), uv = round_bf16(u);
        if (gb) gv = round_bf16(gv + bf16_to_f32(gb[n]));
        if (ub) uv = round_bf16(uv + bf16_to_f32(ub[n]));
        return f32_to_bf16(round_bf16(silu(gv)) * uv);
    }
    float gv = round_bf16(g + (gb ? bf16_to_f32(gb[n]) : 0.0f));
    float uv = round_bf16(u + (ub ? bf16_to_f32(ub[n]) : 0.0f));
    gv = gv > j->limit ? j->limit : gv;  /* NaN stays NaN, as in torch.clamp */
    uv = uv > j->limit ? j->limit : (uv < -j->limit ? -j->limit : uv);
    float sig = round_bf16(1.0f / (1.0f + expf(-round_bf16(gv * j->alpha))));
    return f32_to_bf16(round_bf16(uv + 1.0f) * round_bf16(gv * sig));
}

/* the down product's value for output row n of expert e, as the torch path rounds it */
static inline float down_value(const experts_job *j, int e, int64_t n, float d) {
    const uint16_t *db = (const uint16_t *)j->down_bias[e];
    if (j->act == 0) {
        float v = round_bf16(d);
        return db ? round_bf16(v + bf16_to_f32(db[n])) : v;
    }
    return round_bf16(d + (db ? bf16_to_f32(db[n]) : 0.0f));
}

/* h in float32 (f32): act(gate x + gate_bias, up x + up_bias), as the torch path computes it */
static inline float activate_f32(const experts_job *j, int e, int64_t n, float g, float u) {
    const float *gb = (const float *)j->gate_bias[e], *ub = (const float *)j->up_bias[e];
    if (gb) g += gb[n];
    if (ub) u += ub[n];
    if (j->act == 0) return silu(g) * u;
    g = g > j->limit ? j->limit : g;  /* NaN stays NaN, as in torch.clamp */
    u = u > j->limit ? j->limit : (u < -j->limit ? -j->limit : u);
    return (u + 1.0f) * (g * (1.0f / (1.0f + expf(-(g * j->alpha)))));
}

/* float32 experts (f32): phase 0 writes hf (the k * I gate/up rows split into parts); with int8
   activations phase 1 quantises it per block of 32; the last phase reads it (the H output rows split
   into parts, every expert's share of a row added in expert order) */
static void experts_phase_f32(void *arg, int phase, int part, int parts) {
    experts_job *j = arg;
    const int64_t H = j->H, I = j->I;
    row_fn qrow = moeinf_row_function(j->type), qrow_down = moeinf_row_function(j->type_down);
    const float *x = (const float *)j->x;
    int64_t lo, hi;
    if (phase == 0) {
        split_rows(j->k * I, part, parts, &lo, &hi);
        if (!j->int8) { /* each expert's rows in runs, several rows a pass (quant_f32.c's fmrows) */
            fmrows_fn rows = moeinf_fmrows_function(j->type);
            float g[CHUNK], u[CHUNK];
            for (int64_t r = lo; r < hi;) {
                const int e = (int)(r / I);
                const int64_t n0 = r - e * I, n1 = n0 + (hi - r) < I ? n0 + (hi - r) : I;
                for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
                    const int64_t c1 = c0 + CHUNK < n1 ? c0 + CHUNK : n1;
                    rows((const uint8_t *)j->gate[e] + c0 * j->rb_gate, j->rb_gate, c1 - c0, x, H / 32, g);
                    rows((const uint8_t *)j->up[e] + c0 * j->rb_gate, j->rb_gate, c1 - c0, x, H / 32, u);
                    for (int64_t n = c0; n < c1; n++) j->hf[e * I + n] = activate_f32(j, e, n, g[n - c0], u[n - c0]);
                }
                r += n1 - n0;
            }
            return;
        }
        for (int64_t r = lo; r < hi; r++) {
            int e = (int)(r / I);
            int64_t n = r - e * I;
            const uint8_t *gw = (const uint8_t *)j->gate[e], *uw = (const uint8_t *)j->up[e];
            float g = qrow(gw + n * j->rb_gate, &j->xq, H / 32);
            float u = qrow(uw + n * j->rb_gate, &j->xq, H / 32);
            j->hf[r] = activate_f32(j, e, n, g, u);
        }
        return;
    }
    if (j->int8 && phase == 1) { /* h quantised per block of 32 for the down products */
        int64_t blocks = j->k * I / 32;
        for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; b++) {
            int sum = moeinf_quantize_block(j->hf + 32 * b, j->hq + 32 * b, j->hd + b);
            j->hs[b] = j->hd[b] * (float)sum;
        }
        return;
    }
    split_rows(H, part, parts, &lo, &hi);
    if (!j->int8) { /* DOWN_RUN rows of every expert, then each row's sum over the experts in order */
        fmrows_fn rows = moeinf_fmrows_function(j->type_down);
        float d[MAX_EXPERTS][DOWN_RUN];
        for (int64_t c0 = lo; c0 < hi; c0 += DOWN_RUN) {
            const int64_t c1 = c0 + DOWN_RUN < hi ? c0 + DOWN_RUN : hi;
            for (int e = 0; e < j->k; e++)
                rows((const uint8_t *)j->down[e] + c0 * j->rb_down, j->rb_down, c1 - c0, j->hf + e * I, I / 32, d[e]);
            for (int64_t n = c0; n < c1; n++) {
                float sum = j->acc[n];
                for (int e = 0; e < j->k; e++) {
                    const float *db = (const float *)j->down_bias[e];
                    float v = d[e][n - c0];
                    if (db) v += db[n];
                    sum += v * j->coef[e];
                }
                j->acc[n] = sum;
            }
        }
        return;
    }
    for (int64_t n = lo; n < hi; n++) {
        float sum = j->acc[n];
        for (int e = 0; e < j->k; e++) {
            const float *db = (const float *)j->down_bias[e];
            const uint8_t *dw = (const uint8_t *)j->down[e] + n * j->rb_down;
            xq_t hq = {j->hq + e * I, j->hd + e * (I / 32), j->hs + e * (I / 32)};
            float d = qrow_down(dw, &hq, I / 32);
            if (db) d += db[n];
            sum += d * j->coef[e];
        }
        j->acc[n] = sum;
    }
}

/* rows [r0, r1) of the k * I gate/up rows (expert r / I, row r % I): h = act(gate x, up x) */
static void gate_up_rows(experts_job *j, int64_t r0, int64_t r1) {
    const int64_t H = j->H, I = j->I;
    float g[CHUNK], u[CHUNK];
    row_fn row = j->type ? moeinf_row_function(j->type) : 0;
    for (int64_t r = r0; r < r1;) {
        int e = (int)(r / I);
        int64_t n0 = r - e * I, n1 = n0 + (r1 - r);
        if (n1 > I) n1 = I;
        for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
            int64_t c1 = c0 + CHUNK < n1 ? c0 + CHUNK : n1;
            if (j->xf) { /* short block rows: float32, several rows a pass */
                fmrows_fn rows = moeinf_fmrows_function(j->type);
                rows((const uint8_t *)j->gate[e] + c0 * j->rb_gate, j->rb_gate, c1 - c0, j->xf, H / 32, g);
                rows((const uint8_t *)j->up[e] + c0 * j->rb_gate, j->rb_gate, c1 - c0, j->xf, H / 32, u);
            } else if (row) {
                const uint8_t *gw = (const uint8_t *)j->gate[e], *uw = (const uint8_t *)j->up[e];
                for (int64_t n = c0; n < c1; n++) {
                    g[n - c0] = row(gw + n * j->rb_gate, &j->xq, H / 32);
                    u[n - c0] = row(uw + n * j->rb_gate, &j->xq, H / 32);
                }
            } else {
                moeinf_dot_rows((const uint16_t *)j->x, (const uint16_t *)j->gate[e], g, c0, c1, H);
                moeinf_dot_rows((const uint16_t *)j->x, (const uint16_t *)j->up[e], u, c0, c1, H);
            }
            for (int64_t n = c0; n < c1; n++) j->h[e * I + n] = activate(j, e, n, g[n - c0], u[n - c0]);
        }
        r += n1 - n0;
    }
}

/* blocks [b0, b1) of h (32 values each, never across experts: I is a multiple of 32) quantised, or (float32
   rows) converted to float32 */
static void quantise_h(experts_job *j, int64_t b0, int64_t b1) {
    float tmp[32];
    if (j->xf) {
        for (int64_t i = 32 * b0; i < 32 * b1; i++) j->hf[i] = bf16_to_f32(j->h[i]);
        return;
    }
    for (int64_t b = b0; b < b1; b++) {
        for (int i = 0; i < 32; i++) tmp[i] = bf16_to_f32(j->h[32 * b + i]);
        int sum = moeinf_quantize_block(tmp, j->hq + 32 * b, j->hd + b);
        j->hs[b] = j->hd[b] * (float)sum;
    }
}

/* expert e's output rows [n0, n1): vals[e, n] = bf16(coef_e * bf16(down_e h_e)[n]) */
static void down_rows(experts_job *j, int e, int64_t n0, int64_t n1) {
    const int64_t H = j->H, I = j->I;
    float g[CHUNK];
    row_fn row = j->type ? moeinf_row_function(j->type) : 0;
    float *vals = j->vals + e * H;
    for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
        int64_t c1 = c0 + CHUNK < n1 ? c0 + CHUNK : n1;
        if (j->xf) {
            moeinf_fmrows_function(j->type)((const uint8_t *)j->down[e] + c0 * j->rb_down, j->rb_down, c1 - c0,
                                            j->hf + e * I, I / 32, g);
        } else if (row) {
            const uint8_t *dw = (const uint8_t *)j->down[e];
            xq_t hq = {j->hq + e * I, j->hd + e * (I / 32), j->hs + e * (I / 32)};
            for (int64_t n = c0; n < c1; n++) g[n - c0] = row(dw + n * j->rb_down, &hq, I / 32);
        } else {
            moeinf_dot_rows(j->h + e * I, (const uint16_t *)j->down[e], g, c0, c1, I);
        }
        for (int64_t n = c0; n < c1; n++) vals[n] = round_bf16(down_value(j, e, n, g[n - c0]) * j->coef[e]);
    }
}

/* The bf16 and block-format experts by whole experts: the first `units` experts are one part each
   (gate/up, h, down: no barrier inside an expert, and parts claimed in turn balance the threads); the
   other k - units (fewer than the threads) are split by rows as the phases allow. Every expert's
   rounded, weighted output goes to vals [k, H]; the last phase adds them to acc in expert order, row by
   row, the same sums as k single-expert calls in that order.
   phase 0: part < units: expert `part` whole; part >= units: a slice of the rest's gate/up rows
   phase 1: the rest's h quantised (block formats), split over the parts
   phase 2: rows [lo, hi) of the rest's down, then acc[lo..hi) += vals[e][lo..hi) for e = 0..k-1 */
static void experts_unit_phase(void *arg, int phase, int part, int parts) {
    experts_job *j = arg;
    const int64_t H = j->H, I = j->I;
    const int units = j->units, slices = parts - units;
    int64_t lo, hi;
    if (phase == 0) {
        if (part < units) {
            gate_up_rows(j, part * I, (part + 1) * I);
            if (j->type) quantise_h(j, part * I / 32, (part + 1) * I / 32);
            down_rows(j, part, 0, H);
        } else if (units < j->k) {
            split_rows_by((j->k - units) * I, 16, part - units, slices, &lo, &hi);
            gate_up_rows(j, units * I + lo, units * I + hi);
        }
        return;
    }
    if (phase == 1) {
        if (!j->type || units == j->k) return;
        int64_t b0 = units * I / 32, blocks = (j->k - units) * I / 32;
        quantise_h(j, b0 + blocks * part / parts, b0 + blocks * (part + 1) / parts);
        return;
    }
    split_rows(H, part, parts, &lo, &hi);
    for (int e = units; e < j->k; e++) down_rows(j, e, lo, hi);
    for (int e = 0; e < j->k; e++) {
        float *dst = e == j->k - 1 && j->acc_last ? j->acc_last : j->acc;
        const float *v = j->vals + e * H;
        for (int64_t n = lo; n < hi; n++) dst[n] += v[n];
    }
}

/* acc [H] += the k experts' weighted outputs for one token x [H] (bf16). gate, up, down, *_bias:
   k pointers each (biases may be NULL, or the arrays themselves NULL); coef [k]; type 0 for bf16
   weights or a GGUF block type (then H and I multiples of the format's block). Returns 0, or -1 for
   what it cannot do (too many experts, an unknown type or a size the format cannot hold, no memory). */
static void fill_job(experts_job *j, const void *x, int k, const void *const *gate, const void *const *up,
                     const void *const *down, const void *const *gate_bias, const void *const *up_bias,
                     const void *const *down_bias, const float *coef, int type, int64_t H, int64_t I, int act,
                     float alpha, float limit, float *acc) {
    memset(j, 0, sizeof(*j));
    j->k = k; j->type = type; j->act = act; j->H = H; j->I = I; j->x = x; j->alpha = alpha; j->limit = limit; j->acc = acc;
    for (int e = 0; e < k; e++) {
        j->gate[e] = gate[e]; j->up[e] = up[e]; j->down[e] = down[e]; j->coef[e] = coef[e];
        j->gate_bias[e] = gate_bias ? gate_bias[e] : 0;
        j->up_bias[e] = up_bias ? up_bias[e] : 0;
        j->down_bias[e] = down_bias ? down_bias[e] : 0;
    }
}

static void run_experts(experts_job *j, int nthreads) {
    int nt = nthreads;
    int64_t small = j->H < j->k * j->I ? j->H : j->k * j->I;
    if ((int64_t)nt * 16 > small) nt = (int)((small + 15) / 16);
    if (nt < 1) nt = 1;
    if (j->f32) { /* float32 x: gate/up, (int8 activations: h quantised), down */
        moeinf_pool_run_phases(experts_phase_f32, j, j->int8 ? 3 : 2, nt, nt);
        return;
    }
    /* big experts by rows in more parts than threads: a thread the OS takes away mid-expert (other
       programs on the cores) then holds back one part of several, not a whole expert */
    const int64_t expert_bytes = 3 * j->H * j->I * (j->type ? 1 : 2);
    if (expert_bytes > UNIT_MAX_BYTES && nt > 1) {
        j->units = 0;
        moeinf_pool_run_phases(experts_unit_phase, j, 3, ROW_PARTS * nt, nt);
        return;
    }
    j->units = j->k - j->k % nt;
    moeinf_pool_run_phases(experts_unit_phase, j, 3, j->units + nt, nt);
}

/* moeinf_experts_acc with the last of the k experts added to acc_last instead of acc (when not NULL): a
   shared expert in the same pool job as the routed ones, its sum kept apart for its own rounding
   (engine/model/native_step.py's DeepSeek layers). */
int moeinf_experts_acc_last(const uint16_t *x, int k, const void *const *gate, const void *const *up,
                            const void *const *down, const uint16_t *const *gate_bias,
                            const uint16_t *const *up_bias, const uint16_t *const *down_bias, const float *coef,
                            int type, int64_t H, int64_t I, int act, float alpha, float limit, float *acc,
                            float *acc_last, int nthreads) {
    if (k < 1 || k > MAX_EXPERTS) return -1;
    experts_job j;
    fill_job(&j, x, k, gate, up, down, (const void *const *)gate_bias, (const void *const *)up_bias,
             (const void *const *)down_bias, coef, type, H, I, act, alpha, limit, acc);
    j.acc_last = acc_last;
    size_t need = sizeof(uint16_t) * (size_t)(k * I) + 64 + sizeof(float) * (size_t)(k * H) + 64;
    int values = 1, bytes = 0;
    if (type) {
        if (!moeinf_block_geometry(type, &values, &bytes) || H % values || I % values) return -1;
        j.rb_gate = (int)(H / values * bytes);
        j.rb_down = (int)(I / values * bytes);
        need += (size_t)H + 2 * sizeof(float) * (size_t)(H / 32) + (size_t)(k * I) + 2 * sizeof(float) * (size_t)(k * I / 32) + 256;
        need += sizeof(float) * (size_t)(H + k * I) + 128;
    }
    char *mem = moeinf_scratch(need);
    if (!mem) return -1;
    j.h = (uint16_t *)mem;
    char *p = mem + ((sizeof(uint16_t) * (size_t)(k * I) + 63) & ~(size_t)63);
    j.vals = (float *)p;
    p += (sizeof(float) * (size_t)(k * H) + 63) & ~(size_t)63;
    if (type && j.rb_gate <= F32_ROW_BYTES && j.rb_down <= F32_ROW_BYTES) {
        /* short rows (many small experts): x, bf16 values and so exact in float32, and h_e's bf16 values
           meet the blocks in quant_f32.c's float32 rows, several rows a pass, no activation rounded */
        float *xf = (float *)p;
        for (int64_t i = 0; i < H; i++) xf[i] = bf16_to_f32(x[i]);
        j.xf = xf;
        j.hf = (float *)(p + ((sizeof(float) * (size_t)H + 63) & ~(size_t)63));
    } else if (type) {
        int8_t *xq = (int8_t *)p;
        float *xd = (float *)(p + ((H + 63) & ~(int64_t)63)), *xs = xd + H / 32;
        moeinf_quantize_x(x, 1, H, xq, xd, xs);
        j.xq = (xq_t){xq, xd, xs};
        j.hq = (int8_t *)(xs + H / 32);
        j.hd = (float *)(j.hq + ((k * I + 63) & ~(int64_t)63));
        j.hs = j.hd + k * I / 32;
    }
    run_experts(&j, nthreads);
    return 0;
}

int moeinf_experts_acc(const uint16_t *x, int k, const void *const *gate, const void *const *up,
                       const void *const *down, const uint16_t *const *gate_bias, const uint16_t *const *up_bias,
                       const uint16_t *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                       int act, float alpha, float limit, float *acc, int nthreads) {
    return moeinf_experts_acc_last(x, k, gate, up, down, gate_bias, up_bias, down_bias, coef, type, H, I, act,
                                   alpha, limit, acc, 0, nthreads);
}

/* moeinf_experts_acc for float32 x [H] on block-format experts (type a GGUF block type, H and I multiples
   of its block), float32 biases (or NULL). Returns 0, or -1 for what it cannot do. */
static int experts_f32(const float *x, int k, const void *const *gate, const void *const *up,
                       const void *const *down, const float *const *gate_bias, const float *const *up_bias,
                       const float *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                       int act, float alpha, float limit, float *acc, int nthreads, int int8);

int moeinf_experts_acc_f32(const float *x, int k, const void *const *gate, const void *const *up,
                           const void *const *down, const float *const *gate_bias, const float *const *up_bias,
                           const float *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                           int act, float alpha, float limit, float *acc, int nthreads) {
    return experts_f32(x, k, gate, up, down, gate_bias, up_bias, down_bias, coef, type, H, I, act, alpha, limit, acc,
                       nthreads, 0);
}

static int experts_f32(const float *x, int k, const void *const *gate, const void *const *up,
                       const void *const *down, const float *const *gate_bias, const float *const *up_bias,
                       const float *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                       int act, float alpha, float limit, float *acc, int nthreads, int int8) {
    int values, bytes, dvalues, dbytes;
    const int type_down = (type >> 8) & 0xff ? (type >> 8) & 0xff : type & 0xff;
    type &= 0xff;
    if (k < 1 || k > MAX_EXPERTS || !type || !moeinf_block_geometry(type, &values, &bytes) || H % values ||
        !moeinf_block_geometry(type_down, &dvalues, &dbytes) || I % dvalues)
        return -1;
    experts_job j;
    fill_job(&j, x, k, gate, up, down, (const void *const *)gate_bias, (const void *const *)up_bias,
             (const void *const *)down_bias, coef, type, H, I, act, alpha, limit, acc);
    j.f32 = 1;
    j.type_down = type_down;
    j.rb_gate = (int)(H / values * bytes);
    j.rb_down = (int)(I / dvalues * dbytes);
    if (int8) {
        size_t kI = (size_t)(k * I), need = sizeof(float) * kI + kI + 2 * sizeof(float) * (kI / 32) +
                                          (size_t)H + 2 * sizeof(float) * (size_t)(H / 32) + 256;
        char *mem = moeinf_scratch(need);
        if (!mem) return -1;
        j.hf = (float *)mem;
        j.hq = (int8_t *)(mem + ((sizeof(float) * kI + 63) & ~(size_t)63));
        j.hd = (float *)(j.hq + ((kI + 63) & ~(size_t)63));
        j.hs = j.hd + kI / 32;
        int8_t *xq = (int8_t *)(j.hs + kI / 32);
        float *xd = (float *)(xq + ((H + 63) & ~(int64_t)63)), *xs = xd + H / 32;
        moeinf_quantize_x(x, 0, H, xq, xd, xs);
        j.xq = (xq_t){xq, xd, xs};
        j.int8 = 1;
    } else {
        j.hf = moeinf_scratch(sizeof(float) * (size_t)(k * I) + 64);
        if (!j.hf) return -1;
    }
    run_experts(&j, nthreads);
    return 0;
}

/* moeinf_experts_acc_f32 with x and h rounded to int8 per block of 32 (quant.c's row kernels, as llama.cpp
   multiplies a decode token): activations="int8" on one-token decode. */
int moeinf_experts_acc_f32_int8(const float *x, int k, const void *const *gate, const void *const *up,
                                const void *const *down, const float *const *gate_bias, const float *const *up_bias,
                                const float *const *down_bias, const float *coef, int type, int64_t H, int64_t I,
                                int act, float alpha, float limit, float *acc, int nthreads) {
    return experts_f32(x, k, gate, up, down, gate_bias, up_bias, down_bias, coef, type, H, I, act, alpha, limit, acc,
                       nthreads, 1);
}
