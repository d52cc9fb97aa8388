// CPU emulation of the CUDA subset priortune's kernels (kernels/cuda/) use, so that a machine without a GPU
// can execute the real kernel sources. scripts/cuda-emu.mjs rewrites each .cu file (<<<>>> launches become
// emu::launch, __shared__ declarations get poisoned at each block start, vector reinterpret_casts get an
// alignment check) and compiles it with g++ against this header and runtime.cpp.
//
// What it executes and checks:
// - A block runs as blockDim.x fibers (own stacks, guard pages) on one OS thread. A fiber runs until it
//   reaches a barrier: __syncthreads (block), __syncwarp, shuffles, votes and WMMA collectives (warp).
//   Between barriers the fibers run one after another, in an order that changes from phase to phase
//   (forward, reverse, warp by warp), so a missing barrier usually shows up as a wrong value. Divergent
//   __syncthreads, warp collectives some lanes skip, partial warps and partial masks abort.
// - Shared memory is filled with 0xff bytes (NaN) at each block start, device memory at allocation;
//   device allocations carry guard zones checked after each job (out-of-bounds writes), host/device copies
//   check their ranges and kinds, vector accesses and WMMA pointers their alignment. The device has
//   EMU_DEVICE_MIB of memory (default 8192): a larger allocation fails with cudaErrorMemoryAllocation, as
//   does one over EMU_MAX_ALLOC_BYTES (unset: no limit; read at each cudaMalloc); a
//   block EMU_SMEM_OPTIN_KB of dynamic shared memory at most (default 227, an H100's; opting a kernel into
//   more is reported, launching with more than its opt-in aborts).
// - Streams: work is queued and runs at synchronisation points, so it is asynchronous to the host as on a
//   GPU; the legacy stream is unordered against non-blocking streams (reported). Graph capture records
//   jobs, a graph launch replays them; calls that are illegal during a capture are reported.
// - WMMA bf16 m16n16k16 and tf32 m16n16k8: A and B fragments hold the whole tile in every lane, each
//   accumulator element belongs to one lane (the others read NaN after mma_sync), products are summed in
//   double and rounded once; tf32 operands are truncated to 10 mantissa bits as the tensor core reads them.
// - The inline-PTX primitives of kernels/cuda/mma.cuh (ldmatrix .x4 plain and .trans, mma.sync m16n8k16
//   bf16 -> fp32) as warp collectives with the PTX ISA's per-lane fragment layouts (16-byte aligned rows;
//   products summed in double as above).
// - wgmma.mma_async m64nNk16 bf16 -> fp32 with both operands in shared memory (128-byte swizzle, K- or
//   MN-major B): each thread queues its MMAs; commit_group closes a group and wait_group(n) runs all but the
//   n newest groups then, reading shared memory and writing the thread's accumulator registers at that
//   moment, so an accumulator read before the wait that retires it shows up as a wrong value, and a
//   cp.async issued into shared memory that a not yet retired MMA reads is reported. Shared addresses are
//   offsets into dynamic shared memory plus a base that is not 1024-aligned.
// - mbarrier (init, arrive, arrive.expect_tx, try_wait.parity) and TMA 2-D tile loads into shared memory
//   (cp.async.bulk.tensor with a tensor map from cuTensorMapEncodeTiled: bf16, 128-byte swizzle by
//   shared address, zero fill outside the tensor): a load is queued on its barrier and lands, completing
//   its bytes, only when some thread waits on that barrier, so reading a stage without waiting for its
//   barrier sees poison or a stale tile; a waiting thread sleeps until the barrier's phase completes
//   (a wait no arrival or load can complete is reported as a deadlock), and a load into shared memory a
//   not yet retired wgmma reads is reported as for cp.async.
// - cp.async (__pipeline_memcpy_async / _commit / _wait_prior): each thread keeps its own queue of copy
//   groups, and a copy lands as late as the rules allow: when a __pipeline_wait_prior(n) leaves fewer than
//   its group among the n newest. So reading a stage before waiting for it sees the block-start poison (or a
//   stale tile), and refilling a stage other warps may still read is caught by the phase order as above.
//   Sizes 4, 8 and 16 with zero fill; source and destination must be aligned to the size; a thread that
//   exits with a copy still queued is reported.
//
// What it cannot prove: there is no real memory model or concurrency (fibers never interleave inside a
// phase, so races between threads of a phase and missing __threadfence/volatile go unseen, and atomics are
// trivially atomic; shuffles, votes and WMMA calls order memory like __syncwarp, so a __syncwarp missing
// next to one goes unseen); tensor-core rounding and summation order are not the hardware's; nothing about
// performance, occupancy, register or launch limits beyond grid/block sizes and opted-in shared memory;
// no driver, no multi-GPU. Only x86-64 Linux (the fiber switch is written in assembly).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __grid_constant__

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float a, float b) {
  return {a, b};
}
inline float4 make_float4(float a, float b, float c, float d) {
  return {a, b, c, d};
}
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return {a, b, c, d};
}
inline uint2 make_uint2(uint32_t a, uint32_t b) {
  return {a, b};
}

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// CUDA's global device-side min and max overloads.
inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline long min(long a, long b) {
  return a < b ? a : b;
}
inline long max(long a, long b) {
  return a > b ? a : b;
}
inline long long min(long long a, long long b) {
  return a < b ? a : b;
}
inline long long max(long long a, long long b) {
  return a > b ? a : b;
}
inline unsigned min(unsigned a, unsigned b) {
  return a < b ? a : b;
}
inline unsigned max(unsigned a, unsigned b) {
  return a > b ? a : b;
}
inline float min(float a, float b) {
  return fminf(a, b);
}
inline float max(float a, float b) {
  return fmaxf(a, b);
}

// ---- runtime API (runtime.cpp) ----
typedef int cudaError_t;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;

struct cudaDeviceProp {
  char name[256];
  int major, minor;
  size_t totalGlobalMem;
  int multiProcessorCount;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;
struct CUgraph_st;
typedef CUgraph_st* cudaGraph_t;
struct CUgraphExec_st;
typedef CUgraphExec_st* cudaGraphExec_t;

cudaError_t cudaSetDevice(int);
cudaError_t cudaGetDevice(int*);
cudaError_t cudaGetDeviceCount(int*);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp*, int);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t);
const char* cudaGetErrorString(cudaError_t);
cudaError_t cudaMalloc(void**, size_t);
cudaError_t cudaFree(void*);
cudaError_t cudaMallocHost(void**, size_t);
cudaError_t cudaFreeHost(void*);
cudaError_t cudaMemGetInfo(size_t*, size_t*);
cudaError_t cudaMemcpy(void*, const void*, size_t, cudaMemcpyKind);
cudaError_t cudaMemcpyAsync(void*, const void*, size_t, cudaMemcpyKind, cudaStream_t = nullptr);
cudaError_t cudaMemcpy2DAsync(void*, size_t, const void*, size_t, size_t, size_t, cudaMemcpyKind,
                              cudaStream_t = nullptr);
cudaError_t cudaMemset(void*, int, size_t);
cudaError_t cudaMemsetAsync(void*, int, size_t, cudaStream_t = nullptr);
cudaError_t cudaStreamCreate(cudaStream_t*);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t*, unsigned);
cudaError_t cudaStreamDestroy(cudaStream_t);
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode);
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t*);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t*, cudaGraph_t, unsigned long long = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t, cudaStream_t);
cudaError_t cudaGraphDestroy(cudaGraph_t);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t);
cudaError_t cudaEventCreate(cudaEvent_t*);
cudaError_t cudaEventDestroy(cudaEvent_t);
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t);
cudaError_t cudaEventElapsedTime(float*, cudaEvent_t, cudaEvent_t);
// Driver entry points: only cuTensorMapEncodeTiled (cuda.h) is there.
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2
};
constexpr unsigned long long cudaEnableDefault = 0;
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned version,
                                             unsigned long long flags,
                                             cudaDriverEntryPointQueryResult* status = nullptr);
template <class T>
cudaError_t cudaMalloc(T** p, size_t n) {  // the typed overloads of cuda_runtime.h
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
template <class T>
cudaError_t cudaMallocHost(T** p, size_t n) {
  return cudaMallocHost(reinterpret_cast<void**>(p), n);
}

namespace emu {
// Counters and schedule options (runtime.cpp).
extern long long errors, warnings, launches, jobs_run, graph_launches, captured_jobs;
extern unsigned order_seed;  // shifts the fiber schedule of every block
extern bool reverse_blocks;  // runs a grid's blocks last to first
void report(bool error, const std::string& msg);
[[noreturn]] void fatal(const std::string& msg);  // reports and aborts

using Job = std::function<void()>;
void enqueue(cudaStream_t s, const char* what, Job job);
void check_func_smem(const void* k, size_t dyn_smem, const char* name);
void set_func_smem(const void* k, int bytes);

void run_grid(dim3 grid, dim3 block, size_t dyn_smem, const char* name, const std::function<void()>& body);
void block_barrier();
void warp_barrier(const char* what, const void* p = nullptr, unsigned ldm = 0);
void* dyn_smem_ptr();
void poison_shared(void* p, size_t n);
extern uint64_t slots[1024];  // one value per thread of the block, for warp exchanges
extern unsigned cur_thread;

// kernel<<<grid, block, smem, stream>>>(args): the arguments are copied now, the grid runs when the stream
// reaches it.
template <class... KA, class... A>
void launch(const char* name, void (*k)(KA...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
            A&&... args) {
  ++launches;
  auto tup = std::make_shared<std::tuple<std::decay_t<KA>...>>(std::forward<A>(args)...);
  check_func_smem(reinterpret_cast<const void*>(k), smem, name);
  enqueue(s, name, [=] { run_grid(grid, block, smem, name, [&] { std::apply(k, *tup); }); });
}

// cp.async (runtime.cpp): the calling thread's queue.
void async_copy(void* dst, const void* src, size_t size, size_t zfill);
void async_commit();
void async_wait_prior(size_t prior);

// wgmma (runtime.cpp; kernels/cuda/mma.cuh): shared addresses, and the per-thread queue of MMA groups.
uint32_t smem_addr(const void* p);
void wgmma_fence();
void wgmma_bf16(float* d, int n, uint64_t da, uint64_t db, bool scale_d, bool tnsp_b);
void wgmma_commit();
void wgmma_wait(int pending);

// mbarrier and TMA (runtime.cpp; kernels/cuda/mma.cuh): a barrier in dynamic shared memory counts arrivals
// and transaction bytes; a TMA tile load queues on its barrier and lands when a thread waits on it.
void mbar_init(uint64_t* bar, unsigned count);
void mbar_arrive(uint64_t* bar, uint32_t expect_tx);
void mbar_wait(uint64_t* bar, unsigned parity);
void tma_load_2d(void* dst, const void* map, uint64_t* bar, int c0, int c1);

template <class T>
inline T* aligned_vec(T* p, size_t a) {
  if (reinterpret_cast<uintptr_t>(p) % a)
    fatal("misaligned vector access " + std::to_string(reinterpret_cast<uintptr_t>(p) % 256) +
          " mod 256 (needs " + std::to_string(a) + ")");
  return p;
}
template <class T>
T* dyn_smem() {
  return static_cast<T*>(dyn_smem_ptr());
}

// A full-warp collective: every lane publishes `mine`, then `read(warp's 32 values, lane)` runs in each.
template <class F>
auto warp_exchange(const char* what, unsigned mask, uint64_t mine, F read) {
  if (mask != 0xffffffffu) fatal(std::string(what) + " with a partial mask");
  const unsigned me = cur_thread;
  slots[me] = mine;
  warp_barrier(what);
  auto r = read(&slots[me & ~31u], me & 31u);
  warp_barrier(what);
  return r;
}
template <class T>
uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Gathers the warp's 32 values of `mine` into all (every lane gets the whole array).
inline void warp_gather(const char* what, uint64_t mine, uint64_t (&all)[32]) {
  warp_exchange(what, 0xffffffffu, mine, [&](const uint64_t* w, unsigned) {
    std::memcpy(all, w, sizeof(all));
    return 0;
  });
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (kernels/cuda/mma.cuh): lanes 8i..8i+7 give the 16-byte
// aligned row addresses of matrix i; r[i] of lane l = matrix i's row l/4, elements 2(l%4) and 2(l%4)+1, or
// with trans its column l/4, rows 2(l%4) and 2(l%4)+1.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fatal("ldmatrix: row address not 16-byte aligned");
  uint64_t rows[32];
  warp_gather("ldmatrix", reinterpret_cast<uintptr_t>(p), rows);
  const unsigned l = cur_thread & 31u;
  auto at = [&](unsigned row, unsigned col) {
    return static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(rows[row])[col]);
  };
  for (unsigned i = 0; i < 4; ++i)
    r[i] = trans ? at(8 * i + 2 * (l % 4), l / 4) | at(8 * i + 2 * (l % 4) + 1, l / 4) << 16
                 : at(8 * i + l / 4, 2 * (l % 4)) | at(8 * i + l / 4, 2 * (l % 4) + 1) << 16;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with d as C and D: the warp's A (16 x 16) and B
// (16 x 8) are gathered from the lanes' fragments (layouts in kernels/cuda/mma.cuh), the products summed in
// double and rounded once, as the WMMA emulation does.
inline void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint64_t a01[32], a23[32], b[32];
  warp_gather("mma.sync", a[0] | static_cast<uint64_t>(a[1]) << 32, a01);
  warp_gather("mma.sync", a[2] | static_cast<uint64_t>(a[3]) << 32, a23);
  warp_gather("mma.sync", b0 | static_cast<uint64_t>(b1) << 32, b);
  auto half = [](uint64_t v, unsigned reg, unsigned k) {  // element k % 2 of 32-bit register reg
    const uint32_t w = static_cast<uint32_t>(v >> (32 * reg));
    const uint32_t bits = ((k % 2) ? w >> 16 : w & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  auto A = [&](unsigned row, unsigned k) {  // a[0]/a[1]: k < 8, rows g / g + 8; a[2]/a[3]: k >= 8
    const uint64_t* src = k < 8 ? a01 : a23;
    return half(src[4 * (row % 8) + (k % 8) / 2], row / 8, k);
  };
  auto B = [&](unsigned k, unsigned n) { return half(b[4 * n + (k % 8) / 2], k / 8, k); };
  const unsigned l = cur_thread & 31u, g = l / 4, t = l % 4;
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
    double s = d[e];
    for (unsigned k = 0; k < 16; ++k) s += static_cast<double>(A(row, k)) * B(k, col);
    d[e] = static_cast<float>(s);
  }
}
}  // namespace emu

#define EMU_VEC(p) emu::aligned_vec((p), alignof(std::remove_cv_t<std::remove_pointer_t<decltype(p)>>))

template <class K>
cudaError_t cudaFuncSetAttribute(K* k, cudaFuncAttribute, int v) {
  emu::set_func_smem(reinterpret_cast<const void*>(k), v);
  return cudaSuccess;
}

// ---- device intrinsics ----
inline void __syncthreads() {
  emu::block_barrier();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fatal("__syncwarp with a partial mask");
  emu::warp_barrier("__syncwarp");
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  if (width != 32) emu::fatal("__shfl_sync with a width below 32");
  return emu::from_bits<T>(emu::warp_exchange(
      "__shfl_sync", mask, emu::bits_of(v),
      [&](const uint64_t* w, unsigned) { return w[static_cast<unsigned>(src_lane) & 31u]; }));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) emu::fatal("__shfl_xor_sync with a width below 32");
  return emu::from_bits<T>(emu::warp_exchange(
      "__shfl_xor_sync", mask, emu::bits_of(v),
      [&](const uint64_t* w, unsigned lane) { return w[lane ^ (static_cast<unsigned>(lane_mask) & 31u)]; }));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) emu::fatal("__shfl_down_sync with a width below 32");
  return emu::from_bits<T>(emu::warp_exchange(
      "__shfl_down_sync", mask, emu::bits_of(v),
      [&](const uint64_t* w, unsigned lane) { return w[lane + delta < 32 ? lane + delta : lane]; }));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return emu::warp_exchange("__ballot_sync", mask, pred != 0, [](const uint64_t* w, unsigned) {
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l) r |= static_cast<unsigned>(w[l]) << l;
    return r;
  });
}
inline int __any_sync(unsigned mask, int pred) {
  return __ballot_sync(mask, pred) != 0;
}
inline int __reduce_add_sync(unsigned mask, int v) {
  return emu::warp_exchange("__reduce_add_sync", mask, emu::bits_of(v), [](const uint64_t* w, unsigned) {
    unsigned s = 0;
    for (unsigned l = 0; l < 32; ++l) s += emu::from_bits<unsigned>(w[l]);
    return static_cast<int>(s);
  });
}
inline int __popc(unsigned x) {
  return __builtin_popcount(x);
}
// Fibers never interleave between barriers, so a read-modify-write is atomic.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <class T>
T __ldg(const T* p) {
  if (alignof(T) > 4) emu::aligned_vec(p, alignof(T));
  return *p;
}
inline uint32_t __float_as_uint(float f) {
  return emu::from_bits<uint32_t>(emu::bits_of(f));
}
inline float __uint_as_float(uint32_t u) {
  return emu::from_bits<float>(u);
}

// ---- cp.async (cuda_pipeline_primitives.h) ----
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
  emu::async_copy(dst, src, size_and_align, zfill);
}
inline void __pipeline_commit() {
  emu::async_commit();
}
inline void __pipeline_wait_prior(size_t prior) {
  emu::async_wait_prior(prior);
}

// ---- bf16 ----
struct __nv_bfloat16 {
  uint16_t b;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) {
  return h.b;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  return __uint_as_float(static_cast<uint32_t>(h.b) << 16);
}

// ---- WMMA (see the header comment) ----
// Loads and stores are warp collectives: every lane must take part with the same pointer and ldm; the
// pointer must be 32-byte aligned and ldm a multiple of 16 bytes.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

inline float __float_to_tf32(float f) {  // cvt.rna.tf32.f32
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;
  return __uint_as_float((u + 0x1000u) & 0xffffe000u);
}

template <class Use, int m, int n, int k, class T, class Layout = void>
struct fragment {
  static constexpr int R = std::is_same<Use, matrix_b>::value ? k : m;
  static constexpr int C = std::is_same<Use, matrix_a>::value ? k : n;
  static constexpr int num_elements = R * C;  // element (r, c) is x[r * C + c]
  using element_type = std::conditional_t<std::is_same<T, precision::tf32>::value, float, T>;
  element_type x[R * C];
};

inline float value(float x) {
  return x;
}
inline float value(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <class T>
float operand(float x) {  // what the tensor core reads of an operand element
  return std::is_same<T, precision::tf32>::value ? __uint_as_float(__float_as_uint(x) & 0xffffe000u) : x;
}
template <class E>
void check_tile(const E* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    emu::fatal(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(E)) % 16 != 0) emu::fatal(std::string(what) + ": ldm not a multiple of 16 bytes");
  emu::warp_barrier(what, p, ldm);
}

template <class Use, int m, int n, int k, class T, class Layout, class E>
void load_matrix_sync(fragment<Use, m, n, k, T, Layout>& f, const E* p, unsigned ldm) {
  static_assert(!std::is_same<Layout, void>::value, "an accumulator load needs a layout argument");
  using F = fragment<Use, m, n, k, T, Layout>;
  check_tile(p, ldm, "load_matrix_sync");
  for (int r = 0; r < F::R; ++r)
    for (int c = 0; c < F::C; ++c)
      f.x[r * F::C + c] = std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
}
template <int m, int n, int k>
void load_matrix_sync(fragment<accumulator, m, n, k, float>& f, const float* p, unsigned ldm, layout_t l) {
  check_tile(p, ldm, "load_matrix_sync (accumulator)");
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) f.x[i * n + j] = l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}
template <int m, int n, int k, class T>
void fill_fragment(fragment<accumulator, m, n, k, T>& f, float v) {
  for (auto& e : f.x) e = v;
}
template <int m, int n, int k, class T, class LA, class LB>
void mma_sync(fragment<accumulator, m, n, k, float>& d, const fragment<matrix_a, m, n, k, T, LA>& a,
              const fragment<matrix_b, m, n, k, T, LB>& b, const fragment<accumulator, m, n, k, float>& c) {
  const unsigned lane = emu::cur_thread & 31u;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      if (static_cast<unsigned>(i * n + j) % 32u != lane) {
        d.x[i * n + j] = NAN;
        continue;
      }
      double s = c.x[i * n + j];
      for (int q = 0; q < k; ++q)
        s += static_cast<double>(operand<T>(value(a.x[i * k + q]))) * operand<T>(value(b.x[q * n + j]));
      d.x[i * n + j] = static_cast<float>(s);
    }
}
template <int m, int n, int k>
void store_matrix_sync(float* p, const fragment<accumulator, m, n, k, float>& f, unsigned ldm, layout_t l) {
  check_tile(p, ldm, "store_matrix_sync");
  const unsigned lane = emu::cur_thread & 31u;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j)
      if (static_cast<unsigned>(i * n + j) % 32u == lane)
        (l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * n + j];
}
}  // namespace wmma
}  // namespace nvcuda
