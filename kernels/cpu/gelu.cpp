// GELU (tanh approximation, "gelu_new" in GPT-2) forward and backward; see ops.h.
#include <algorithm>

#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr int64_t kBlock = 4096;

PT_MULTIVERSION void gelu_block(float* out, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    out[i] = 0.5f * v * (1.0f + tanh_approx(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
  }
}

// d/dx [0.5 x (1 + tanh u)], u = k (x + 0.044715 x^3): 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) k (1 + 3 *
// 0.044715 x^2).
PT_MULTIVERSION void gelu_backward_block(float* dx, const float* x, const float* dout, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float t = tanh_approx(kSqrt2OverPi * (v + 0.044715f * v * v * v));
    const float local =
        0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * v * v);
    dx[i] = dout[i] * local;
  }
}

}  // namespace

void gelu_forward(float* out, const float* x, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < n; b += kBlock) gelu_block(out + b, x + b, std::min(kBlock, n - b));
}

void gelu_backward(float* dx, const float* x, const float* dout, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < n; b += kBlock)
    gelu_backward_block(dx + b, x + b, dout + b, std::min(kBlock, n - b));
}

}  // namespace pt
