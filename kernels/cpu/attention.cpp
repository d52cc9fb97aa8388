// Causal grouped-query attention forward with key padding mask and key/value prefixes; see ops.h.
// One task per (batch, head): scores = scale * Q K^T on the GEMM (prefix block, then token block), masked
// softmax in place in `probs` (kept for backward), then out = P V. The full S x S token block is scored and
// the upper triangle discarded: simpler than triangular tiling, and the waste is small next to the MLP.
#include <algorithm>
#include <cmath>

#include "priortune/gemm.h"
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {

void attention_forward(float* out, float* probs, const float* qkv, const uint8_t* key_mask,
                       const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t S,
                       int64_t H, int64_t KV, int64_t hd, float scale, int threads) {
  const int64_t ld = (H + 2 * KV) * hd;  // row stride of qkv
  const int64_t L = Pp + S;              // keys per query
  const int64_t group = H / KV;
  const int64_t ldo = H * hd;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H, g = h / group;
    const float* Q = qkv + b * S * ld + h * hd;
    const float* K = qkv + b * S * ld + (H + g) * hd;
    const float* V = qkv + b * S * ld + (H + KV + g) * hd;
    float* P = probs + bh * S * L;
    if (Pp > 0) sgemm(false, true, S, Pp, hd, scale, Q, ld, prefix_k + g * hd, KV * hd, 0.0f, P, L, 1);
    sgemm(false, true, S, S, hd, scale, Q, ld, K, ld, 0.0f, P + Pp, L, 1);
    const uint8_t* km = key_mask ? key_mask + b * S : nullptr;
    for (int64_t i = 0; i < S; ++i) {
      float* row = P + i * L;
      float mx = -INFINITY;
      for (int64_t j = 0; j < Pp; ++j) mx = std::max(mx, row[j]);
      for (int64_t j = 0; j <= i; ++j)
        if (!km || km[j]) mx = std::max(mx, row[Pp + j]);
      if (mx == -INFINITY) {  // no visible key: defined as zero output
        std::fill(row, row + L, 0.0f);
        continue;
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < Pp; ++j) {
        row[j] = exp_approx(row[j] - mx);
        sum += row[j];
      }
      for (int64_t j = 0; j <= i; ++j) {
        const float e = (!km || km[j]) ? exp_approx(row[Pp + j] - mx) : 0.0f;
        row[Pp + j] = e;
        sum += e;
      }
      std::fill(row + Pp + i + 1, row + L, 0.0f);
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < Pp + i + 1; ++j) row[j] *= inv;
    }
    float* O = out + b * S * ldo + h * hd;
    if (Pp > 0) sgemm(false, false, S, hd, Pp, 1.0f, P, L, prefix_v + g * hd, KV * hd, 0.0f, O, ldo, 1);
    sgemm(false, false, S, hd, S, 1.0f, P + Pp, L, V, ld, Pp > 0 ? 1.0f : 0.0f, O, ldo, 1);
  }
}

}  // namespace pt
