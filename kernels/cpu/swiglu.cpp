// SwiGLU (Llama MLP) forward and backward; see ops.h.
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

PT_MULTIVERSION void swiglu_row(float* o, const float* g, const float* u, int64_t I) {
  for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
}

// out = silu(g) u: du = dout silu(g); dg = dout u sigma(g) (1 + g (1 - sigma(g))).
PT_MULTIVERSION void swiglu_backward_row(float* dg, float* du, const float* g, const float* u, const float* d,
                                         int64_t I) {
  for (int64_t i = 0; i < I; ++i) {
    const float sig = 1.0f / (1.0f + exp_approx(-g[i]));
    du[i] = d[i] * g[i] * sig;
    dg[i] = d[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
  }
}

}  // namespace

void swiglu_forward(float* out, const float* gate_up, int64_t N, int64_t I, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) swiglu_row(out + n * I, gate_up + n * 2 * I, gate_up + n * 2 * I + I, I);
}

void swiglu_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int64_t I,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    swiglu_backward_row(dgate_up + n * 2 * I, dgate_up + n * 2 * I + I, gate_up + n * 2 * I,
                        gate_up + n * 2 * I + I, dout + n * I, I);
}

}  // namespace pt
