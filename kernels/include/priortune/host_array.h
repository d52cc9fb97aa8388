// Host copies of large arrays. HostArray is a std::vector whose allocator leaves new elements of trivial
// types uninitialised, so that host_copy can fill it in parallel: copying a 154 MB vocabulary into a plain
// vector (the range constructor) spends most of its time in page faults on one thread, 77 ms of a 154 ms
// one-shot kNN search on the JS thread; faulting and copying 1 MiB blocks on all cores takes about half that
// on two.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace pt {

template <class T>
struct UninitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() noexcept = default;
  template <class U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  // Default-initialisation: no zeroing of floats.
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible<U>::value) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

template <class T>
using HostArray = std::vector<T, UninitAllocator<T>>;
using HostFloats = HostArray<float>;

// A copy of src[0, n): in 1 MiB blocks over OpenMP's threads where there are at least 8 blocks.
template <class T>
HostArray<T> host_copy(const T* src, size_t n) {
  static_assert(std::is_trivially_copyable<T>::value, "host_copy copies bytes");
  HostArray<T> out(n);
  const size_t block = (size_t{1} << 20) / sizeof(T);
  const int64_t blocks = static_cast<int64_t>((n + block - 1) / block);
  T* dst = out.data();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (blocks >= 8)
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const size_t o = static_cast<size_t>(b) * block;
    std::memcpy(dst + o, src + o, std::min(block, n - o) * sizeof(T));
  }
  return out;
}

}  // namespace pt
