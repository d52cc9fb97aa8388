// LayerNorm forward (GPT-2); see ops.h. Statistics are accumulated in double for a stable reference.
#include <cmath>

#include "priortune/ops.h"

namespace pt {

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                       int64_t N, int64_t C, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += xr[c];
    const double m = s / C;
    double v = 0.0;
    for (int64_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
    const float r = static_cast<float>(1.0 / std::sqrt(v / C + eps));
    const float mf = static_cast<float>(m);
    float* o = out + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = (xr[c] - mf) * r * w[c] + b[c];
    if (mean) mean[n] = mf;
    if (rstd) rstd[n] = r;
  }
}

}  // namespace pt

namespace pt {

// dx += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = dout * w, xhat = (x - mean) * rstd.
void layernorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* mean,
                        const float* rstd, int64_t N, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* g = dout + n * C;
    const float* xr = x + n * C;
    const float m = mean[n], r = rstd[n];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const float dn = g[c] * w[c];
      s1 += dn;
      s2 += static_cast<double>(dn) * (xr[c] - m) * r;
    }
    const float m1 = static_cast<float>(s1 / C), m2 = static_cast<float>(s2 / C);
    float* d = dx + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) d[c] += r * (g[c] * w[c] - m1 - (xr[c] - m) * r * m2);
  }
}

}  // namespace pt
