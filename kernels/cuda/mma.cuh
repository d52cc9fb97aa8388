// Tensor-core primitives used through inline PTX: warp-level (sm_80+): ldmatrix (shared memory -> fragment
// registers, plain or transposed) and mma.sync m16n8k16 with bf16 operands and fp32 accumulators; and
// warpgroup-level (sm_90a): wgmma.mma_async. The emulated build (tools/cuda-emu, PRIORTUNE_CUDA_EMU) runs
// emu_cuda.h's versions of the same calls, which follow the PTX ISA's fragment and shared-memory layouts
// element by element.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"; g = lane / 4, t = lane % 4):
// - A, 16 x 16 row-major, four b32 registers of two bf16 each: a[0] = (g, 2t..2t+1), a[1] = (g + 8, 2t..),
//   a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..).
// - B, 16 x 8 (k x n), two registers: b[0] = (k 2t..2t+1, n g), b[1] = (k 2t + 8.., n g).
// - C/D, 16 x 8 fp32: d[0..1] = (g, 2t..2t+1), d[2..3] = (g + 8, 2t..2t+1).
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of 8 x 8 matrix i; register i of
// lane l receives matrix i's row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1; with .trans, its column l / 4,
// rows 2 (l % 4) and 2 (l % 4) + 1 (so a k-major [k][n] tile yields B fragments directly).
//
// wgmma (sm_90a): a warpgroup (4 consecutive warps, 128 threads) computes D (64 x N, fp32, in registers)
// (+)= A (64 x 16) . B (16 x N), bf16, both read from shared memory through 64-bit matrix descriptors (PTX
// ISA, "Matrix Descriptor Format"): bits 0-13 the start address >> 4, 16-29 the leading byte offset (LBO)
// >> 4, 32-45 the stride byte offset (SBO) >> 4, 62-63 the swizzle mode (1: 128-byte). Only the 128-byte
// swizzle is used here, every operand tile starting on a 1024-byte boundary (base offset 0): the 16-byte
// chunk c of the 128-byte row at address a sits at chunk c ^ ((a >> 7) % 8). Canonical layouts (PTX ISA,
// "Canonical Layouts", bf16):
// - K-major (trans 0): 8 rows of 64 k, 128 bytes each, consecutive; the next 8 rows SBO bytes on; the
//   16-wide k-step s of a 64-wide tile starts 32 s bytes in. LBO is unused (encoded 1).
// - MN-major (trans 1; B of an NN product): 8 k-rows of 64 n, 128 bytes each, consecutive; the next 8
//   k-rows SBO bytes on; the next 64 n LBO bytes on.
// D fragment (PTX ISA, "Register Fragments", m64nNk16): warp w of the group holds rows 16 w..16 w + 15;
// d[4 j + e] of lane l is row 16 w + l / 4 + 8 (e / 2), column 8 j + 2 (l % 4) + e % 2 (the mma.sync C
// layout above, repeated over N / 8 column blocks). wgmma is asynchronous: the MMAs issued since the last
// wgmma_commit form a group, and neither D nor the shared memory they read may be touched until a
// wgmma_wait<n> (n: newest groups left in flight) has retired it; wgmma_fence_acc ties the accumulators to
// the asm sequence so the compiler cannot move their reads across the wait. Shared memory written by stores
// or cp.async must be made visible to the async proxy (fence_proxy_async) before the barrier that precedes
// the wgmma reading it. The emulator runs a group's MMAs when a wait retires it, reading shared memory then.
//
// mbarrier and TMA (sm_90a): an mbarrier (8 bytes of shared memory) completes a phase when its count of
// arrivals has arrived and the transaction bytes announced with them (arrive_expect_tx) have landed;
// mbar_wait(bar, parity) returns once the phase of that parity has completed (a fresh barrier is in phase 0,
// so waiting for parity 1 returns at once: how a producer finds its empty stages free). tma_load_2d copies a
// box of a 2-D tensor (a CUtensorMap built on the host, passed as a __grid_constant__ kernel parameter)
// into shared memory in the map's 128-byte swizzle (the layout wgmma reads; the destination 1024-byte
// aligned), zero past the tensor's edges, and completes the box's bytes on the barrier. Its writes are in
// the async proxy, as are wgmma's reads, so the barrier wait is all the ordering a consumer needs.
#pragma once
#include <cstdint>

namespace pt {
namespace cuda {

#ifdef PRIORTUNE_CUDA_EMU
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  emu::ldmatrix_x4(r, p, false);
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  emu::ldmatrix_x4(r, p, true);
}
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  emu::mma_bf16_m16n8k16(d, a, b0, b1);
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return emu::smem_addr(p);
}
__device__ __forceinline__ void fence_proxy_async() {}
__device__ __forceinline__ void wgmma_fence() {
  emu::wgmma_fence();
}
__device__ __forceinline__ void wgmma_commit() {
  emu::wgmma_commit();
}
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
  emu::wgmma_wait(Pending);
}
template <int N>
__device__ __forceinline__ void wgmma_fence_acc(float (&)[N]) {}
template <int N, int TB>
__device__ __forceinline__ void wgmma_bf16(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  emu::wgmma_bf16(d, N, da, db, scale_d != 0, TB != 0);
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  emu::mbar_init(bar, count);
}
__device__ __forceinline__ void mbar_fence_init() {}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  emu::mbar_arrive(bar, 0);
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  emu::mbar_arrive(bar, bytes);
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  emu::mbar_wait(bar, parity);
}
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, uint64_t* bar, int c0, int c1) {
  emu::tma_load_2d(dst, map, bar, c0, c1);
}
#else
// A shared-memory pointer's address in the shared window (what ldmatrix and the wgmma descriptors take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// d += A . B (one m16n8k16 product, fp32 accumulation). Not volatile: it touches only registers, so the
// compiler may interleave it with the (volatile, so ordered against barriers) ldmatrix loads.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
}
// Ties the accumulators to this point of the (volatile) asm sequence: reads after a wait stay after it.
template <int N>
__device__ __forceinline__ void wgmma_fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PT_WGMMA_D8(i)                                                                        \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
template <int N>
struct Wgmma;
template <>
struct Wgmma<128> {
  template <int TB>
  __device__ __forceinline__ static void run(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, %67;\n}\n"
        : PT_WGMMA_D8(0), PT_WGMMA_D8(8), PT_WGMMA_D8(16), PT_WGMMA_D8(24), PT_WGMMA_D8(32), PT_WGMMA_D8(40),
          PT_WGMMA_D8(48), PT_WGMMA_D8(56)
        : "l"(da), "l"(db), "r"(scale_d), "n"(TB));
  }
};
template <>
struct Wgmma<256> {
  template <int TB>
  __device__ __forceinline__ static void run(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, 0, %131;\n}\n"
        : PT_WGMMA_D8(0), PT_WGMMA_D8(8), PT_WGMMA_D8(16), PT_WGMMA_D8(24), PT_WGMMA_D8(32), PT_WGMMA_D8(40),
          PT_WGMMA_D8(48), PT_WGMMA_D8(56), PT_WGMMA_D8(64), PT_WGMMA_D8(72), PT_WGMMA_D8(80),
          PT_WGMMA_D8(88), PT_WGMMA_D8(96), PT_WGMMA_D8(104), PT_WGMMA_D8(112), PT_WGMMA_D8(120)
        : "l"(da), "l"(db), "r"(scale_d), "n"(TB));
  }
};
#undef PT_WGMMA_D8
#endif
// D (+)= A . B for one 16-wide k-step (scale_d 0: D = A . B). TB: B is MN-major (transposed). The wgmma and
// async-proxy instructions are compiled for sm_90a only; elsewhere these functions do nothing (the host
// launches wgmma kernels on compute capability 9.x only).
template <int N, int TB>
__device__ __forceinline__ void wgmma_bf16(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  Wgmma<N>::template run<TB>(d, da, db, scale_d);
#endif
}
// mbarrier and TMA: sm_90a only, like wgmma (nothing elsewhere; the host launches their kernel on 9.x only).
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
// Makes initialised barriers visible to the async proxy (the TMA unit completes bytes on them).
__device__ __forceinline__ void mbar_fence_init() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// A phase that has not completed after 2^24 polls (seconds; a GEMM's stage waits take microseconds) traps:
// a bug in the barrier protocol becomes a kernel fault, reported as a JS error, instead of a hang.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  for (uint32_t polls = 0;; ++polls) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (polls == (1u << 24)) __trap();
  }
#endif
}
// Box (c0: the inner, contiguous coordinate; c1: the row) of the map's tensor -> dst, completing on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, uint64_t* bar, int c0, int c1) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
#endif
}
#endif

// A 128-byte-swizzled operand's descriptor (see above): shared address, leading and stride byte offsets.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | static_cast<uint64_t>(lbo >> 4) << 16 |
         static_cast<uint64_t>(sbo >> 4) << 32 | uint64_t{1} << 62;
}

}  // namespace cuda
}  // namespace pt
