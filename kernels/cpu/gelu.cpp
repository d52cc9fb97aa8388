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
