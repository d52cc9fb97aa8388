// Cross-entropy forward with ignore index -100 (any negative target is ignored); see ops.h.
#include <cmath>

#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {

int64_t crossentropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                             int threads) {
  int64_t counted = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : counted)
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] < 0) {
      losses[n] = 0.0f;
      continue;
    }
    const float* l = logits + n * V;
    float mx = l[0];
    for (int64_t v = 1; v < V; ++v) mx = l[v] > mx ? l[v] : mx;
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(l[v] - mx));
    losses[n] = static_cast<float>(std::log(sum) + mx - l[targets[n]]);
    counted += 1;
  }
  return counted;
}

}  // namespace pt
