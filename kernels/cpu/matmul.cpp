// Linear layer forward, input backward and weight/bias gradients (+=) on the blocked GEMM; see ops.h.
#include <algorithm>

#include "priortune/gemm.h"
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

// A few rows (token-by-token generation): out[n, o] = x[n] . W[o]. Packing W for the GEMM would cost more
// than the product itself, and W's rows are contiguous, so plain dot products stream it once.
PT_MULTIVERSION void matmul_rows_block(float* out, const float* x, const float* W, const float* bias,
                                       int64_t N, int64_t C, int64_t OC, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* w = W + o * C;
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + n * C;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) s += xr[c] * w[c];
      out[n * OC + o] = s + (bias ? bias[o] : 0.0f);
    }
  }
}

}  // namespace

void matmul_forward(float* out, const float* x, const float* W, const float* bias, int64_t N, int64_t C,
                    int64_t OC, int threads) {
  if (N <= 4) {
    const int64_t block = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o0 = 0; o0 < OC; o0 += block)
      matmul_rows_block(out, x, W, bias, N, C, OC, o0, std::min(OC, o0 + block));
    return;
  }
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

namespace pt {

// dW via the GEMM with dout transposed (one pass over the N rows per output tile, deterministic); the bias
// as column sums with each thread owning a range of columns and adding the rows in order (in double: N is
// every token of the batch).
void matmul_backward_weights(float* dW, float* dbias, const float* dout, const float* x, int64_t N, int64_t C,
                             int64_t OC, int threads) {
  sgemm(true, false, OC, C, N, 1.0f, dout, OC, x, C, 1.0f, dW, C, threads);
  if (!dbias) return;
  const int64_t block = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t o0 = 0; o0 < OC; o0 += block) {
    const int64_t o1 = std::min(OC, o0 + block);
    double acc[block] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* d = dout + n * OC;
      for (int64_t o = o0; o < o1; ++o) acc[o - o0] += d[o];
    }
    for (int64_t o = o0; o < o1; ++o) dbias[o] += static_cast<float>(acc[o - o0]);
  }
}

}  // namespace pt
