// Thread helpers shared by the CPU kernels: OpenMP when available, serial otherwise.
#pragma once
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace pt {

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline bool in_parallel() {
#ifdef _OPENMP
  return omp_in_parallel();
#else
  return false;
#endif
}

inline int hardware_threads() {
#ifdef _OPENMP
  return omp_get_num_procs();
#else
  return 1;
#endif
}

// Splits [0, n) into `parts` contiguous chunks aligned to `align`; returns chunk `part` as [begin, end).
inline void split_range(int64_t n, int parts, int part, int64_t align, int64_t* begin, int64_t* end) {
  int64_t units = (n + align - 1) / align;
  int64_t per = units / parts, extra = units % parts;
  int64_t b = part * per + (part < extra ? part : extra);
  int64_t e = b + per + (part < extra ? 1 : 0);
  *begin = b * align < n ? b * align : n;
  *end = e * align < n ? e * align : n;
}

}  // namespace pt
