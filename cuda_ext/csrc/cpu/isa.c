/* What this build of the library was compiled for: the loader checks it against the CPU before the
   first call (a cache shared by two machines must never run AVX-512 code on a CPU without it), and
   `moeinf --version` shows it. Names are /proc/cpuinfo's flag names. */

#include "common.h"

const char *moeinf_isa(void) {
    return ""
#ifdef __AVX512F__
           " avx512f"
#endif
#ifdef __AVX512BW__
           " avx512bw"
#endif
#ifdef __AVX512VL__
           " avx512vl"
#endif
#ifdef __AVX512VNNI__
           " avx512_vnni"
#endif
#ifdef __AVX512BF16__
           " avx512_bf16"
#endif
#ifdef __AVXVNNI__
           " avx_vnni"
#endif
#ifdef __AVX2__
           " avx2"
#endif
#ifdef __FMA__
           " fma"
#endif
#ifdef __F16C__
           " f16c"
#endif
#ifdef __ARM_NEON
           " asimd"
#endif
#ifdef __ARM_FEATURE_DOTPROD
           " asimddp"
#endif
        ;
}
