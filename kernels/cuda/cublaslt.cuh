// cuBLASLt loaded at run time as a second GEMM engine for benchmarks (see cublaslt.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "priortune/cuda_ops.h"

namespace pt {
namespace cuda {

// The loaded library and its version; throws the reason when cuBLASLt cannot be loaded.
std::string cublaslt_library();

// One planned product C[M, N] = A[M, K] . B[N, K]^T, or . B[K, N] without b_transposed (row-major with
// leading dimensions lda, ldb, ldc, 0 for dense; A and B bf16 for BF16, else fp32; C fp32; TF32 lets
// cuBLASLt round the fp32 operands to tf32), with the heuristic's best algorithm and its workspace; `bias`:
// planned with cuBLASLt's bias epilogue (a bias[N] broadcast over rows, given to run). run() only enqueues
// on the stream: C = A op(B) (+ bias) (+ C when beta is 1).
class CublasLtGemm {
 public:
  // `align`: the byte alignment every operand pointer given to run() will have (a power of two, at most 256,
  // cuBLASLt's default assumption); the heuristic then only offers algorithms that work with it.
  CublasLtGemm(GemmPrecision precision, int64_t M, int64_t N, int64_t K, bool b_transposed = true,
               int64_t lda = 0, int64_t ldb = 0, int64_t ldc = 0, bool bias = false, uint32_t align = 256);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;
  void run(cudaStream_t stream, const void* A, const void* B, float* C, const float* bias = nullptr,
           float beta = 0.0f);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// cuda::gemm's cuBLASLt engine (PRIORTUNE_CUDA_GEMM=cublaslt, for comparing whole steps): the product of
// cuda::gemm's arguments (operands both bf16 for BF16, both fp32 otherwise) through a CublasLtGemm planned
// once per (device, stream, shape, layout, bias, operand alignment) and kept for the process (its workspace
// too, so that captured graphs stay valid). Throws where cuBLASLt cannot be loaded or refuses the product.
void cublaslt_product(Stream stream, GemmPrecision precision, bool b_transposed, int64_t M, int64_t N,
                      int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb, float* C,
                      int64_t ldc, const float* bias, float beta);

// Releases the plans (and their workspaces) cublaslt_product made for `stream`: for its owner to call once
// no queued or captured work on it uses them (before destroying the stream).
void cublaslt_forget(Stream stream) noexcept;

// The end of a stream that cuda::gemm may have used: waits for its work, releases its cuBLASLt plans
// (cublaslt_forget), destroys it. Null: nothing.
void retire_stream(cudaStream_t stream) noexcept;

}  // namespace cuda
}  // namespace pt
