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
