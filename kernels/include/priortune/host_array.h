// Host copies of large arrays. HostArray is a std::vector whose allocator leaves new elements of trivial
// types uninitialised, so that host_copy can fill it in parallel: copying a 154 MB vocabulary into a plain
// vector (the range constructor) spends most of its time in page faults on one thread, 77 ms of a 154 ms
// one-shot kNN search on the JS thread; faulting and copying blocks on the call's threads took about half
// that on two, and huge pages (host_alloc) most of the rest.
#pragma once
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace pt {

// Host memory aligned to 64 bytes; blocks of 8 MiB or more are aligned to 2 MiB and marked for transparent
// huge pages (Linux madvise; where THP is "madvise", the default of many distributions, plain allocations
// get 4 KiB pages): a 154 MB vocabulary then faults 74 times instead of 37,600, and random row reads miss
// the TLB less. Where THP defrag is "madvise" too, a fault may compact memory first (slower builds now and
// then). Never null (std::bad_alloc). Free with host_free.
void* host_alloc(size_t bytes);
void host_free(void* p) noexcept;

// A minimal allocator over host_alloc (not derived from std::allocator, whose allocate_at_least a C++23
// library may call through allocator_traits, pairing ::operator new with host_free).
template <class T>
struct UninitAllocator {
  static_assert(alignof(T) <= 64, "host_alloc aligns to 64 bytes");
  using value_type = T;
  using is_always_equal = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;
  template <class U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() noexcept = default;
  template <class U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_alloc();
    return static_cast<T*>(host_alloc(n * sizeof(T)));
  }
  void deallocate(T* p, size_t) noexcept { host_free(p); }
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
template <class T, class U>
bool operator==(const UninitAllocator<T>&, const UninitAllocator<U>&) noexcept {
  return true;
}
template <class T, class U>
bool operator!=(const UninitAllocator<T>&, const UninitAllocator<U>&) noexcept {
  return false;
}

template <class T>
using HostArray = std::vector<T, UninitAllocator<T>>;
using HostFloats = HostArray<float>;

// A copy of src[0, n): from 8 MiB, in 2 MiB blocks (a huge page) over `threads` OpenMP threads (0: OpenMP's
// default); below, on the calling thread (kernels/cpu/host_array.cpp: compiled with OpenMP, out of line so
// that every caller, nvcc's too, gets the same one). Note: HostArray<T>(n), resize(n) and emplace_back()
// leave trivial elements unset; write them all before reading.
HostArray<float> host_copy(const float* src, size_t n, int threads = 0);
HostArray<double> host_copy(const double* src, size_t n, int threads = 0);

}  // namespace pt
