// Fused LM head + softmax cross-entropy (+ its input gradient, and for full-parameter training the head's
// weight gradient, +=) over labelled rows, in row chunks so the full rows x vocab logits are never held;
// see ops.h. Prompt-tuning only needs logits where a label is.
#include <algorithm>
#include <cmath>
#include <vector>

#include "priortune/gemm.h"
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

// One row of logits: returns logsumexp - logit[t] and overwrites the row with
// grad_scale * (softmax - onehot(t)), the gradient of the loss with respect to the logits.
PT_MULTIVERSION double softmax_xent_row(float* l, int32_t t, int64_t V, float grad_scale) {
  float mx = l[0];
#pragma omp simd reduction(max : mx)
  for (int64_t v = 1; v < V; ++v) mx = l[v] > mx ? l[v] : mx;
  const float target_logit = l[t];
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) {
    l[v] = exp_approx(l[v] - mx);
    sum += l[v];
  }
  const float k = grad_scale / sum;
  for (int64_t v = 0; v < V; ++v) l[v] *= k;
  l[t] -= grad_scale;
  return std::log(static_cast<double>(sum)) + mx - target_logit;
}

}  // namespace

// Rows per chunk: the whole batch when its logits fit in 256 MiB (so the head's weights are packed for the
// GEMM once, not once per small chunk), fewer for very large vocabularies.
int64_t lm_head_chunk_rows(int64_t R, int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(R, std::max<int64_t>(64, (int64_t{256} << 20) / (V * 4))));
}

namespace {

// Both entry points: dW == nullptr is the prompt-tuning path (no weight gradient, no extra GEMM).
double lm_head_chunks(float* dx, float* dW, const float* x, const int32_t* targets, const float* W, int64_t R,
                      int64_t C, int64_t V, float grad_scale, float* logits_scratch, int threads) {
  const int64_t chunk = lm_head_chunk_rows(R, V);
  float* logits = logits_scratch;
  std::vector<double> row_loss(R, 0.0);
  for (int64_t r0 = 0; r0 < R; r0 += chunk) {
    const int64_t rc = std::min(chunk, R - r0);
    sgemm(false, true, rc, V, C, 1.0f, x + r0 * C, C, W, C, 0.0f, logits, V, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rc; ++r) {
      float* l = logits + r * V;
      const int32_t t = targets[r0 + r];
      if (t < 0) {  // unlabelled row: no loss, no gradient
        std::fill(l, l + V, 0.0f);
        continue;
      }
      row_loss[r0 + r] = softmax_xent_row(l, t, V, grad_scale);
    }
    if (dx) sgemm(false, false, rc, C, V, 1.0f, logits, V, W, C, 0.0f, dx + r0 * C, C, threads);
    // dW += dlogits^T . x over this chunk's rows (unlabelled rows hold zeros).
    if (dW) sgemm(true, false, V, C, rc, 1.0f, logits, V, x + r0 * C, C, 1.0f, dW, C, threads);
  }
  double total = 0.0;
  for (double v : row_loss) total += v;
  return total;
}

}  // namespace

double lm_head_crossentropy(float* dx, const float* x, const int32_t* targets, const float* W, int64_t R,
                            int64_t C, int64_t V, float grad_scale, float* logits_scratch, int threads) {
  return lm_head_chunks(dx, nullptr, x, targets, W, R, C, V, grad_scale, logits_scratch, threads);
}

double lm_head_crossentropy_with_weight_grad(float* dx, float* dW, const float* x, const int32_t* targets,
                                             const float* W, int64_t R, int64_t C, int64_t V,
                                             float grad_scale, float* logits_scratch, int threads) {
  return lm_head_chunks(dx, dW, x, targets, W, R, C, V, grad_scale, logits_scratch, threads);
}

}  // namespace pt
