#include "priortune/host_array.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "priortune/parallel.h"

namespace pt {

void* host_alloc(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const bool huge = bytes >= 4 * kHuge;
  void* p = nullptr;
  // posix_memalign: no size-multiple rule (aligned_alloc's), so no rounding up to 2 MiB.
  if (posix_memalign(&p, huge ? kHuge : 64, std::max<size_t>(bytes, 1)) != 0 || !p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // A hint, ignored where THP is off; the block's whole 4 KiB pages, all its own.
  if (huge) madvise(p, bytes / 4096 * 4096, MADV_HUGEPAGE);
#endif
  return p;
}

void host_free(void* p) noexcept {
  std::free(p);
}

namespace {

template <class T>
HostArray<T> copy_blocks(const T* src, size_t n, int threads) {
  HostArray<T> out(n);
  // From 8 MiB, in parallel and in 2 MiB blocks over huge pages (host_alloc): two threads faulting one huge
  // page would wait on each other.
  const bool large = n * sizeof(T) >= (size_t{8} << 20);
  const size_t block = ((large ? size_t{2} : size_t{1}) << 20) / sizeof(T);
  const int64_t blocks = static_cast<int64_t>((n + block - 1) / block);
#ifdef _OPENMP
  const int all = omp_get_max_threads();  // OMP_NUM_THREADS, else the cores
#else
  const int all = 1;
#endif
  const int team =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, threads > 0 ? threads : all)));
  T* dst = out.data();
  // Dynamic: a thread the OS deschedules (searches may be running on every core) holds up fewer blocks.
#pragma omp parallel for num_threads(team) schedule(dynamic) if (large && team > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const size_t o = static_cast<size_t>(b) * block;
    std::memcpy(dst + o, src + o, std::min(block, n - o) * sizeof(T));
  }
  return out;
}

}  // namespace

HostArray<float> host_copy(const float* src, size_t n, int threads) {
  return copy_blocks(src, n, threads);
}

HostArray<double> host_copy(const double* src, size_t n, int threads) {
  return copy_blocks(src, n, threads);
}

}  // namespace pt
