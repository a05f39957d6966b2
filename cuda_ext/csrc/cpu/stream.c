/* Memory read bandwidth as the kernels see it: every byte of a buffer read once, split over the same
   thread pool, summed so the reads cannot be skipped. The bound that decode benchmarks compare with
   (bytes a step must read / this bandwidth, same thread count, same run). */

#include "common.h"

typedef struct {
    const uint8_t *p;
    int64_t n;
    uint64_t sums[MAX_THREADS];
} read_job;

static void read_task(void *arg, int tid, int nt) {
    read_job *j = arg;
    int64_t lo, hi;
    split_rows_by(j->n, 4096, tid, nt, &lo, &hi);
    uint64_t total = 0;
    int64_t i = lo;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 256 <= hi; i += 256) {
        a0 = _mm512_add_epi64(a0, _mm512_sad_epu8(_mm512_loadu_si512(j->p + i), _mm512_setzero_si512()));
        a1 = _mm512_add_epi64(a1, _mm512_sad_epu8(_mm512_loadu_si512(j->p + i + 64), _mm512_setzero_si512()));
        a2 = _mm512_add_epi64(a2, _mm512_sad_epu8(_mm512_loadu_si512(j->p + i + 128), _mm512_setzero_si512()));
        a3 = _mm512_add_epi64(a3, _mm512_sad_epu8(_mm512_loadu_si512(j->p + i + 192), _mm512_setzero_si512()));
    }
    total = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
#elif defined(__AVX2__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    for (; i + 64 <= hi; i += 64) {
        a0 = _mm256_add_epi64(a0, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(j->p + i)), _mm256_setzero_si256()));
        a1 = _mm256_add_epi64(a1, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(j->p + i + 32)), _mm256_setzero_si256()));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(a0, a1));
    total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#else
    for (; i + 8 <= hi; i += 8) {
        uint64_t v;
        memcpy(&v, j->p + i, 8);
        total += (v & 0x00ff00ff00ff00ffull) + ((v >> 8) & 0x00ff00ff00ff00ffull);
    }
#endif
    for (; i < hi; i++) total += j->p[i];
    j->sums[tid] = total;
}

/* read `n` bytes at p on nthreads threads; returns a checksum of them */
uint64_t moeinf_read_bytes(const uint8_t *p, int64_t n, int nthreads) {
    read_job j = {p, n, {0}};
    int nt = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    moeinf_pool_run(read_task, &j, nt);
    uint64_t total = 0;
    for (int t = 0; t < MAX_THREADS; t++) total += j.sums[t];
    return total;
}
