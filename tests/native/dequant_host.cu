// The CUDA dequantisers' per-value arithmetic, run on the host: a test (tests/test_cuda_ext_cuda.py)
// builds this with nvcc and compares every format with the gguf package's reference, on machines
// with nvcc but no GPU too. It includes the library's source, so it checks that very code.
#include "../../cuda_ext/csrc/cuda/dequant.cu"

template <typename Format>
static int run(const uint8_t *blocks, float *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++)
        for (int j = 0; j < Format::values; j++) out[b * Format::values + j] = Format::at(blocks + b * Format::bytes, j);
    return 0;
}

extern "C" int moeinf_host_dequant(int ggml_type, const uint8_t *blocks, float *out, int64_t n_blocks) {
    switch (ggml_type) {
        case 2: return run<Q4_0>(blocks, out, n_blocks);
        case 3: return run<Q4_1>(blocks, out, n_blocks);
        case 8: return run<Q8_0>(blocks, out, n_blocks);
        case 12: return run<Q4_K>(blocks, out, n_blocks);
        case 13: return run<Q5_K>(blocks, out, n_blocks);
        case 14: return run<Q6_K>(blocks, out, n_blocks);
        case 39: return run<MXFP4>(blocks, out, n_blocks);
        default: return -1;
    }
}
