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

// One planned product C[M, N] = A[M, K] . B[N, K]^T (row-major; A and B bf16 for BF16, else fp32; C fp32;
// TF32 lets cuBLASLt round the fp32 operands to tf32), with the heuristic's best algorithm and its
// workspace. run() only enqueues on the stream.
class CublasLtGemm {
 public:
  CublasLtGemm(GemmPrecision precision, int64_t M, int64_t N, int64_t K, bool b_transposed = true);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;
  void run(cudaStream_t stream, const void* A, const void* B, float* C);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace pt
