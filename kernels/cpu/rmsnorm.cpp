// RMSNorm forward (Llama); see ops.h. Hugging Face computes the statistic in fp32 and multiplies the
// normalised row by the weight afterwards; we accumulate in double and match within fp32 rounding.
#include <cmath>

#include "priortune/ops.h"

namespace pt {

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / C + eps));
    float* o = out + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = xr[c] * r * w[c];
    if (rstd) rstd[n] = r;
  }
}

}  // namespace pt

namespace pt {

// dx += rstd * dnorm - rstd^3 * x * mean(dnorm * x), dnorm = dout * w.
void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* rstd,
                      int64_t N, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* g = dout + n * C;
    const float* xr = x + n * C;
    const float r = rstd[n];
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += static_cast<double>(g[c]) * w[c] * xr[c];
    const float k = static_cast<float>(s / C) * r * r * r;
    float* d = dx + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) d[c] += r * g[c] * w[c] - k * xr[c];
  }
}

}  // namespace pt
