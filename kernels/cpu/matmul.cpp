// Linear layer forward on the blocked GEMM; see ops.h.
#include "priortune/gemm.h"
#include "priortune/ops.h"

namespace pt {

void matmul_forward(float* out, const float* x, const float* W, const float* bias, int64_t N, int64_t C,
                    int64_t OC, int threads) {
  if (bias) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OC; ++o) out[n * OC + o] = bias[o];
  }
  sgemm(false, true, N, OC, C, 1.0f, x, C, W, C, bias ? 1.0f : 0.0f, out, OC, threads);
}

}  // namespace pt

namespace pt {

void matmul_backward(float* dx, const float* dout, const float* W, int64_t N, int64_t C, int64_t OC,
                     float beta, int threads) {
  sgemm(false, false, N, C, OC, 1.0f, dout, OC, W, C, beta, dx, C, threads);
}

}  // namespace pt
