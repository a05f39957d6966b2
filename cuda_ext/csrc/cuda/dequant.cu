// Dequantisation of the stored block formats on the GPU: GGUF's q8_0, q4_0, q4_1, q4_k, q5_k, q6_k and
// mxfp4 blocks (bit for bit the GGUF layouts) to float32, bf16 or fp16, one thread per value.
//
// The arithmetic is the gguf package's reference dequantiser's, in its order and without fused
// multiply-adds (__fmul_rn / __fadd_rn), so a float32 output is bit-identical to it:
//   q8_0   34 B / 32:  f16 d, int8 q[32]                         x = q * d
//   q4_0   18 B / 32:  f16 d, u8 qs[16] (value j: low nibble of qs[j], j + 16: high nibble)
//                                                                x = d * (nibble - 8)
//   q4_1   20 B / 32:  f16 d, f16 m, u8 qs[16]                   x = d * nibble + m
//   q4_k  144 B / 256: f16 d, f16 dmin, u8 scales[12] (eight 6-bit scales and mins), u8 qs[128]
//                      (64 values per 32 bytes: low nibbles, then high)  x = (d * sc) * q - dmin * mn
//   q5_k  176 B / 256: f16 d, f16 dmin, u8 scales[12] (as q4_k), u8 qh[32] (value l of sub-block s:
//                      bit s of qh[l] is bit 4 of its code), u8 qs[128] (as q4_k)
//                                                                x = (d * sc) * q - dmin * mn
//   q6_k  210 B / 256: u8 ql[128] (low 4 bits), u8 qh[64] (high 2 bits), int8 scales[16], f16 d
//                                                                x = (d * scale) * (q - 32)
//   mxfp4  17 B / 32:  u8 e (E8M0 exponent), u8 qs[16] (E2M1 codes, nibbles as q4_0)
//                                                                x = 2^(e-128) * (2 * E2M1 value)
//
// Entry point (C ABI, loaded by cuda_ext/loader.py with ctypes):
//   int moeinf_cuda_dequant(int ggml_type, const void *blocks, void *out, int64_t n_blocks,
//                           int out_dtype, void *stream)
// ggml_type: GGUF's numbering (2 q4_0, 3 q4_1, 8 q8_0, 12 q4_k, 13 q5_k, 14 q6_k,
// 39 mxfp4); out_dtype: 0
// float32, 1 bf16, 2 fp16; stream: a cudaStream_t (0 for the default stream). Returns a cudaError_t
// (0 on success; cudaErrorInvalidValue for an unknown type or dtype).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

namespace {

// one rounding per operation, never fused, on the device and on the host alike (the host side lets
// a test check every format against the gguf reference on a machine without a GPU)
#ifdef __CUDA_ARCH__
#define MUL(a, b) __fmul_rn((a), (b))
#define ADD(a, b) __fadd_rn((a), (b))
#define SUB(a, b) __fsub_rn((a), (b))
#else
#define MUL(a, b) ((float)((a) * (b)))
#define ADD(a, b) ((float)((a) + (b)))
#define SUB(a, b) ((float)((a) - (b)))
#endif
#define HD __host__ __device__ __forceinline__

HD float f16_at(const uint8_t *p) {
    __half_raw raw;
    raw.x = (unsigned short)(p[0] | (p[1] << 8));
    return __half2float(__half(raw));
}

HD float bits_to_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

struct Q8_0 {
    static constexpr int values = 32, bytes = 34;
    HD static float at(const uint8_t *b, int j) {
        return MUL((float)(int8_t)b[2 + j], f16_at(b));
    }
};

struct Q4_0 {
    static constexpr int values = 32, bytes = 18;
    HD static float at(const uint8_t *b, int j) {
        int q = j < 16 ? (b[2 + j] & 0x0F) : (b[2 + j - 16] >> 4);
        return MUL(f16_at(b), (float)(q - 8));
    }
};

struct Q4_1 {
    static constexpr int values = 32, bytes = 20;
    HD static float at(const uint8_t *b, int j) {
        int q = j < 16 ? (b[4 + j] & 0x0F) : (b[4 + j - 16] >> 4);
        return ADD(MUL(f16_at(b), (float)q), f16_at(b + 2));
    }
};

struct Q4_K {
    static constexpr int values = 256, bytes = 144;
    HD static float at(const uint8_t *b, int j) {
        const uint8_t *s = b + 4, *qs = b + 16;
        int chunk = j >> 6, within = j & 63, sub = 2 * chunk + (within >> 5);
        int sc, mn;
        if (sub < 4) {
            sc = s[sub] & 63;
            mn = s[sub + 4] & 63;
        } else {
            sc = (s[sub + 4] & 0x0F) | ((s[sub - 4] >> 6) << 4);
            mn = (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4);
        }
        uint8_t byte = qs[32 * chunk + (within & 31)];
        int q = within < 32 ? (byte & 0x0F) : (byte >> 4);
        float d = MUL(f16_at(b), (float)sc), m = MUL(f16_at(b + 2), (float)mn);
        return SUB(MUL(d, (float)q), m);
    }
};

struct Q5_K {
    static constexpr int values = 256, bytes = 176;
    HD static float at(const uint8_t *b, int j) {
        const uint8_t *s = b + 4, *qh = b + 16, *qs = b + 48;
        int chunk = j >> 6, within = j & 63, sub = 2 * chunk + (within >> 5), l = within & 31;
        int sc, mn;
        if (sub < 4) {
            sc = s[sub] & 63;
            mn = s[sub + 4] & 63;
        } else {
            sc = (s[sub + 4] & 0x0F) | ((s[sub - 4] >> 6) << 4);
            mn = (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4);
        }
        uint8_t byte = qs[32 * chunk + l];
        int q = (within < 32 ? (byte & 0x0F) : (byte >> 4)) | (((qh[l] >> sub) & 1) << 4);
        float d = MUL(f16_at(b), (float)sc), m = MUL(f16_at(b + 2), (float)mn);
        return SUB(MUL(d, (float)q), m);
    }
};

struct Q6_K {
    static constexpr int values = 256, bytes = 210;
    HD static float at(const uint8_t *b, int j) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        int half = j >> 7, quarter = (j >> 5) & 3, l = j & 31;
        uint8_t low = ql[64 * half + 32 * (quarter & 1) + l];
        int q = (quarter < 2 ? (low & 0x0F) : (low >> 4)) | (((qh[32 * half + l] >> (2 * quarter)) & 3) << 4);
        float d = MUL(f16_at(b + 208), (float)scales[j >> 4]);
        return MUL(d, (float)(q - 32));
    }
};

struct MXFP4 {
    static constexpr int values = 32, bytes = 17;
    HD static float at(const uint8_t *b, int j) {
        const int8_t doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
        uint32_t e = b[0];
        uint32_t bits = e < 2 ? (0x00200000u << e) : ((e - 1) << 23);  // 2^(e - 127) / 2
        int q = j < 16 ? (b[1 + j] & 0x0F) : (b[1 + j - 16] >> 4);
        return MUL(bits_to_float(bits), (float)doubled[q]);
    }
};

__device__ __forceinline__ void store(float *out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *out, int64_t i, float v) { out[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half *out, int64_t i, float v) { out[i] = __float2half_rn(v); }

template <typename Format, typename Out>
__global__ void dequant_kernel(const uint8_t *__restrict__ blocks, Out *__restrict__ out, int64_t n_values) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i < n_values; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t block = i / Format::values;
        store(out, i, Format::at(blocks + block * Format::bytes, (int)(i - block * Format::values)));
    }
}

template <typename Format, typename Out>
cudaError_t launch(const void *blocks, void *out, int64_t n_blocks, cudaStream_t stream) {
    int64_t n_values = n_blocks * Format::values;
    if (n_values == 0) return cudaSuccess;
    const int threads = 256;
    int64_t grid = (n_values + threads - 1) / threads;
    if (grid > 65535 * 16) grid = 65535 * 16;  // the grid-stride loop covers the rest
    dequant_kernel<Format, Out><<<(unsigned)grid, threads, 0, stream>>>((const uint8_t *)blocks, (Out *)out, n_values);
    return cudaGetLastError();
}

template <typename Format>
cudaError_t launch_as(int out_dtype, const void *blocks, void *out, int64_t n_blocks, cudaStream_t stream) {
    switch (out_dtype) {
        case 0: return launch<Format, float>(blocks, out, n_blocks, stream);
        case 1: return launch<Format, __nv_bfloat16>(blocks, out, n_blocks, stream);
        case 2: return launch<Format, __half>(blocks, out, n_blocks, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace

extern "C" int moeinf_cuda_dequant(int ggml_type, const void *blocks, void *out, int64_t n_blocks, int out_dtype,
                                   void *stream) {
    cudaStream_t s = (cudaStream_t)stream;
    switch (ggml_type) {
        case 2: return launch_as<Q4_0>(out_dtype, blocks, out, n_blocks, s);
        case 3: return launch_as<Q4_1>(out_dtype, blocks, out, n_blocks, s);
        case 8: return launch_as<Q8_0>(out_dtype, blocks, out, n_blocks, s);
        case 12: return launch_as<Q4_K>(out_dtype, blocks, out, n_blocks, s);
        case 13: return launch_as<Q5_K>(out_dtype, blocks, out, n_blocks, s);
        case 14: return launch_as<Q6_K>(out_dtype, blocks, out, n_blocks, s);
        case 39: return launch_as<MXFP4>(out_dtype, blocks, out, n_blocks, s);
        default: return cudaErrorInvalidValue;
    }
}

// The formats this library dequantises, as GGUF type numbers, for the loader's check.
extern "C" int moeinf_cuda_formats(int *types, int capacity) {
    const int known[] = {2, 3, 8, 12, 13, 14, 39};
    int n = (int)(sizeof(known) / sizeof(known[0]));
    for (int i = 0; i < n && i < capacity; i++) types[i] = known[i];
    return n;
}
