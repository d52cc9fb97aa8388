// GELU (tanh approximation) forward; see ops.h.
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {

void gelu_forward(float* out, const float* x, int64_t n, int threads) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    out[i] = 0.5f * v * (1.0f + tanh_approx(k * (v + 0.044715f * v * v * v)));
  }
}

}  // namespace pt

namespace pt {

// d/dx [0.5 x (1 + tanh(u))], u = k (x + 0.044715 x^3): 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) k (1 + 3 *
// 0.044715 x^2).
void gelu_backward(float* dx, const float* x, const float* dout, int64_t n, int threads) {
  const float k = 0.7978845608028654f;
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float t = tanh_approx(k * (v + 0.044715f * v * v * v));
    const float local = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * v * v);
    dx[i] = dout[i] * local;
  }
}

}  // namespace pt
