// Fused LM head + softmax cross-entropy (+ its input gradient) over labelled rows, in row chunks so the
// full rows x vocab logits are never held; see ops.h. Prompt-tuning only needs logits where a label is.
#include <cmath>
#include <vector>

#include "priortune/gemm.h"
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {

double lm_head_crossentropy(float* dx, const float* x, const int32_t* targets, const float* W, int64_t R,
                            int64_t C, int64_t V, float grad_scale, int threads) {
  const int64_t chunk = 128;
  std::vector<float> logits(std::min(chunk, R) * V);
  std::vector<double> row_loss(R, 0.0);
  for (int64_t r0 = 0; r0 < R; r0 += chunk) {
    const int64_t rc = std::min(chunk, R - r0);
    sgemm(false, true, rc, V, C, 1.0f, x + r0 * C, C, W, C, 0.0f, logits.data(), V, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rc; ++r) {
      float* l = logits.data() + r * V;
      const int32_t t = targets[r0 + r];
      if (t < 0) {  // unlabelled row: no loss, no gradient
        std::fill(l, l + V, 0.0f);
        continue;
      }
      float mx = l[0];
      for (int64_t v = 1; v < V; ++v) mx = l[v] > mx ? l[v] : mx;
      float sum = 0.0f;
      const float target_logit = l[t];
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < V; ++v) {
        l[v] = exp_approx(l[v] - mx);
        sum += l[v];
      }
      row_loss[r0 + r] = std::log(static_cast<double>(sum)) + mx - target_logit;
      const float k = grad_scale / sum;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) l[v] *= k;
      l[t] -= grad_scale;
    }
    if (dx) sgemm(false, false, rc, C, V, 1.0f, logits.data(), V, W, C, 0.0f, dx + r0 * C, C, threads);
  }
  double total = 0.0;
  for (double v : row_loss) total += v;
  return total;
}

}  // namespace pt
