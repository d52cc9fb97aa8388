// SwiGLU forward (Llama MLP); see ops.h.
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {

void swiglu_forward(float* out, const float* gate_up, int64_t N, int64_t I, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* g = gate_up + n * 2 * I;
    const float* u = g + I;
    float* o = out + n * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
  }
}

}  // namespace pt

namespace pt {

// out = silu(g) u: du = dout silu(g); dg = dout u sigma(g) (1 + g (1 - sigma(g))).
void swiglu_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int64_t I,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* g = gate_up + n * 2 * I;
    const float* u = g + I;
    const float* d = dout + n * I;
    float* dg = dgate_up + n * 2 * I;
    float* du = dg + I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
      const float sig = 1.0f / (1.0f + exp_approx(-g[i]));
      du[i] = d[i] * g[i] * sig;
      dg[i] = d[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
    }
  }
}

}  // namespace pt
