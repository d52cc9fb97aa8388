// RMSNorm forward, backward (dx +=) and weight gradient (dw +=) (Llama); see ops.h. Hugging Face computes the
// statistic in fp32 and multiplies the normalised row by the weight afterwards; we accumulate in double and
// match within fp32 rounding.
#include <algorithm>
#include <cmath>

#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

PT_MULTIVERSION void rmsnorm_row(float* o, float* rstd, const float* x, const float* w, int64_t C,
                                 float eps) {
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(x[c]) * x[c];
  const float r = static_cast<float>(1.0 / std::sqrt(ss / C + eps));
  for (int64_t c = 0; c < C; ++c) o[c] = x[c] * r * w[c];
  if (rstd) *rstd = r;
}

// dx += rstd * dnorm - rstd^3 * x * mean(dnorm * x), dnorm = dout * w, computed as
// rstd * (dnorm - xhat * mean(dnorm * xhat)), xhat = x * rstd: no power of rstd under- or overflows, so rows
// of any scale keep their precision (rstd^3 is below FLT_MIN once entries pass ~1e13).
PT_MULTIVERSION void rmsnorm_backward_row(float* d, const float* g, const float* x, const float* w, float r,
                                          int64_t C) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += static_cast<double>(g[c] * w[c]) * (x[c] * r);
  const float m2 = static_cast<float>(s / C);
  for (int64_t c = 0; c < C; ++c) d[c] += r * (g[c] * w[c] - x[c] * r * m2);
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) rmsnorm_row(out + n * C, rstd ? rstd + n : nullptr, x + n * C, w, C, eps);
}

void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* rstd,
                      int64_t N, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) rmsnorm_backward_row(dx + n * C, dout + n * C, x + n * C, w, rstd[n], C);
}

}  // namespace pt

namespace pt {

// Column sums over rows, as in layernorm_backward_weights: channel blocks per thread, rows in order.
void rmsnorm_backward_weights(float* dw, const float* dout, const float* x, const float* rstd, int64_t N,
                              int64_t C, int threads) {
  const int64_t block = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c0 = 0; c0 < C; c0 += block) {
    const int64_t c1 = std::min(C, c0 + block);
    double sw[block] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* g = dout + n * C;
      const float* xr = x + n * C;
      const float r = rstd[n];
      for (int64_t c = c0; c < c1; ++c) sw[c - c0] += static_cast<double>(g[c]) * (xr[c] * r);
    }
    for (int64_t c = c0; c < c1; ++c) dw[c] += static_cast<float>(sw[c - c0]);
  }
}

}  // namespace pt
