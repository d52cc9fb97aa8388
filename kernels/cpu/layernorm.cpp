// LayerNorm forward, backward (dx +=) and weight gradients (dw, db +=) (GPT-2); see ops.h. Row statistics
// and the weight gradients' sums over rows are accumulated in double.
#include <algorithm>
#include <cmath>

#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

PT_MULTIVERSION void layernorm_row(float* o, float* mean, float* rstd, const float* x, const float* w,
                                   const float* b, int64_t C, float eps) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += x[c];
  const double m = s / C;
  double v = 0.0;
#pragma omp simd reduction(+ : v)
  for (int64_t c = 0; c < C; ++c) v += (x[c] - m) * (x[c] - m);
  const float r = static_cast<float>(1.0 / std::sqrt(v / C + eps));
  const float mf = static_cast<float>(m);
  for (int64_t c = 0; c < C; ++c) o[c] = (x[c] - mf) * r * w[c] + b[c];
  if (mean) *mean = mf;
  if (rstd) *rstd = r;
}

// dx += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = dout * w, xhat = (x - mean) * rstd.
PT_MULTIVERSION void layernorm_backward_row(float* d, const float* g, const float* x, const float* w, float m,
                                            float r, int64_t C) {
  double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t c = 0; c < C; ++c) {
    const float dn = g[c] * w[c];
    s1 += dn;
    s2 += static_cast<double>(dn) * (x[c] - m) * r;
  }
  const float m1 = static_cast<float>(s1 / C), m2 = static_cast<float>(s2 / C);
  for (int64_t c = 0; c < C; ++c) d[c] += r * (g[c] * w[c] - m1 - (x[c] - m) * r * m2);
}

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                       int64_t N, int64_t C, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    layernorm_row(out + n * C, mean ? mean + n : nullptr, rstd ? rstd + n : nullptr, x + n * C, w, b, C, eps);
}

void layernorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* mean,
                        const float* rstd, int64_t N, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    layernorm_backward_row(dx + n * C, dout + n * C, x + n * C, w, mean[n], rstd[n], C);
}

}  // namespace pt

namespace pt {

// Column sums over rows: each thread owns a block of channels and adds the rows in order (double
// accumulators), so the result does not depend on the thread count.
void layernorm_backward_weights(float* dw, float* db, const float* dout, const float* x, const float* mean,
                                const float* rstd, int64_t N, int64_t C, int threads) {
  const int64_t block = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c0 = 0; c0 < C; c0 += block) {
    const int64_t c1 = std::min(C, c0 + block);
    double sw[block] = {}, sb[block] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* g = dout + n * C;
      const float* xr = x + n * C;
      const float m = mean[n], r = rstd[n];
      for (int64_t c = c0; c < c1; ++c) {
        sw[c - c0] += static_cast<double>(g[c]) * ((xr[c] - m) * r);
        sb[c - c0] += g[c];
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dw[c] += static_cast<float>(sw[c - c0]);
      db[c] += static_cast<float>(sb[c - c0]);
    }
  }
}

}  // namespace pt
