// Thread count of one kernel call, shared by the CPU kernels of frmap.
#pragma once

#include <omp.h>

#include <cstdint>

// `threads` if set, else OpenMP's default; one thread for small work (a single 224x224 image
// takes under a millisecond, less than waking an idle core costs on some virtual machines).
inline int resolve_threads(int threads, int64_t elements) {
    constexpr int64_t kParallelElements = int64_t(1) << 18;
    if (threads > 0) return threads;
    return elements < kParallelElements ? 1 : omp_get_max_threads();
}
