// Warp-level tensor-core primitives used through inline PTX (sm_80+): ldmatrix (shared memory -> fragment
// registers, plain or transposed) and mma.sync m16n8k16 with bf16 operands and fp32 accumulators. The
// emulated build (tools/cuda-emu, PRIORTUNE_CUDA_EMU) runs emu_cuda.h's versions of the same three calls,
// which follow the PTX ISA's fragment layouts element by element.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"; g = lane / 4, t = lane % 4):
// - A, 16 x 16 row-major, four b32 registers of two bf16 each: a[0] = (g, 2t..2t+1), a[1] = (g + 8, 2t..),
//   a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..).
// - B, 16 x 8 (k x n), two registers: b[0] = (k 2t..2t+1, n g), b[1] = (k 2t + 8.., n g).
// - C/D, 16 x 8 fp32: d[0..1] = (g, 2t..2t+1), d[2..3] = (g + 8, 2t..2t+1).
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of 8 x 8 matrix i; register i of
// lane l receives matrix i's row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1; with .trans, its column l / 4,
// rows 2 (l % 4) and 2 (l % 4) + 1 (so a k-major [k][n] tile yields B fragments directly).
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
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
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
#endif

}  // namespace cuda
}  // namespace pt
