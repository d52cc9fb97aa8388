// Single-precision matrix multiply, the workhorse of every CPU op.
//
//   C = alpha * op(A) * op(B) + beta * C        (row-major; op(X) = X or X^T)
//
// op(A) is M x K, op(B) is K x N, C is M x N with leading dimension ldc. When beta == 0, C is
// overwritten without being read (so it may hold garbage or NaN). Work is split over `threads`
// OpenMP threads; called from inside a parallel region it runs on the calling thread only.
// Results are deterministic for a fixed thread count (each C element is summed in one fixed order).
#pragma once
#include <cstdint>

namespace pt {

void sgemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int threads);

// The register-tile micro-kernel in use, for fused ops that pack their own panels (kernels/cpu/knn.cpp).
//   C[m x n] (ldc) = alpha * Ap^T Bp + beta * C   (C not read when beta == 0), m <= mr, n <= nr.
// Ap: kc x mr k-major (element (k, r) at Ap[k*mr + r]); Bp: kc x nr k-major, 64-byte aligned. Panels are
// zero-padded to full mr / nr. `mc`, `nc` are the cache-block sizes sgemm uses with this kernel.
struct SgemmMicroKernel {
  const char* name;
  int mr, nr;
  int64_t kc, mc, nc;
  void (*run)(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m, int n, float alpha,
              float beta);
  // Packs rows [r0, r0 + count) of a row-major M (leading dimension ld), columns [k0, k0 + kc), into panels
  // of w rows (nr for Bp, mr for Ap): panel p, at out + p * w * kc, holds rows r0 + p*w ... as kc x w,
  // k-major, zero-padded. With the kernel's packing (register transposes for AVX2 and AVX-512).
  void (*pack_rows)(const float* M, int64_t ld, int64_t r0, int64_t count, int64_t k0, int64_t kc, int w,
                    float* out);
};
SgemmMicroKernel sgemm_micro_kernel();

// Name of the micro-kernel in use: "avx512", "avx2" or "generic" (chosen from the CPU at load time).
const char* sgemm_kernel_name();

// Whether this CPU runs the micro-kernel `name` ("avx512", "avx2", "generic"; false for any other name).
bool sgemm_kernel_supported(const char* name);

// Force a micro-kernel by name (for tests and benchmarks); returns false if the CPU lacks it.
bool sgemm_select_kernel(const char* name);

// Measured fp32 fused-multiply-add peak of this CPU in GFLOP/s, over `threads` threads: a register-only
// loop of independent FMAs with the widest vectors the CPU has (see gemm.cpp).
double cpu_fma_peak_gflops(int threads);

}  // namespace pt
