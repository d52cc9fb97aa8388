// Causal grouped-query attention forward with key padding mask and key/value prefixes; see ops.h.
// One task per (batch, head): scores = scale * Q K^T on the GEMM (prefix block, then token block), masked
// softmax in place in `probs` (kept for backward), then out = P V. The full S x S token block is scored and
// the upper triangle discarded: simpler than triangular tiling, and the waste is small next to the MLP.
#include <algorithm>
#include <cmath>
#include <vector>

#include "priortune/gemm.h"
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

// Row i of the scores: prefix keys [0, Pp) and token keys Pp + j for j <= i with km[j] set are visible.
// Softmax over the visible entries in place; the rest become 0. No visible key: the row is all zeros.
// A NaN visible score makes the whole row NaN, as in PyTorch (std::max alone would pass over it).
PT_MULTIVERSION void softmax_causal_row(float* row, int64_t Pp, int64_t i, const uint8_t* km, int64_t L) {
  float mx = -INFINITY;
  bool nan = false;
  for (int64_t j = 0; j < Pp; ++j) {
    mx = std::max(mx, row[j]);
    nan |= std::isnan(row[j]);
  }
  for (int64_t j = 0; j <= i; ++j)
    if (!km || km[j]) {
      mx = std::max(mx, row[Pp + j]);
      nan |= std::isnan(row[Pp + j]);
    }
  if (nan) {
    std::fill(row, row + L, NAN);
    return;
  }
  if (mx == -INFINITY) {
    std::fill(row, row + L, 0.0f);
    return;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < Pp + i + 1; ++j) {
    const bool visible = j < Pp || !km || km[j - Pp];
    const float e = visible ? exp_approx(row[j] - mx) : 0.0f;
    row[j] = e;
    sum += e;
  }
  std::fill(row + Pp + i + 1, row + L, 0.0f);
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < Pp + i + 1; ++j) row[j] *= inv;
}

// Softmax backward of one row, times the score scale: d = p * (d - <p, d>) * scale.
PT_MULTIVERSION void softmax_backward_row(const float* p, float* d, int64_t L, float scale) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t k = 0; k < L; ++k) dot += p[k] * d[k];
  for (int64_t k = 0; k < L; ++k) d[k] = p[k] * (d[k] - dot) * scale;
}

}  // namespace

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
    for (int64_t i = 0; i < S; ++i) softmax_causal_row(P + i * L, Pp, i, km, L);
    float* O = out + b * S * ldo + h * hd;
    if (Pp > 0) sgemm(false, false, S, hd, Pp, 1.0f, P, L, prefix_v + g * hd, KV * hd, 0.0f, O, ldo, 1);
    sgemm(false, false, S, hd, S, 1.0f, P + Pp, L, V, ld, Pp > 0 ? 1.0f : 0.0f, O, ldo, 1);
  }
}

}  // namespace pt

namespace pt {

// Per (batch, kv-group) task, so the k/v gradients of a group (shared by its query heads) have one writer.
// For each head: dP = dO [Vp; V]^T, dV += P^T dO, dS = P * (dP - rowsum(P * dP)) * scale, dQ = dS [Kp; K],
// dK += dS^T Q. Masked and causal entries have P = 0, so dS is 0 there without a mask. Prefix gradients go
// to per-task buffers and are summed over the batch in order afterwards (deterministic).
void attention_backward(float* dqkv, float* dprefix_k, float* dprefix_v, const float* dout,
                        const float* probs, const float* qkv, const float* prefix_k, const float* prefix_v,
                        int64_t Pp, int64_t B, int64_t S, int64_t H, int64_t KV, int64_t hd, float scale,
                        int64_t q_rows, int threads) {
  const int64_t ld = (H + 2 * KV) * hd, L = Pp + S, group = H / KV, ldo = H * hd;
  std::vector<float> prefix_buf(Pp > 0 ? 2 * B * KV * Pp * hd : 0, 0.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bg = 0; bg < B * KV; ++bg) {
    const int64_t b = bg / KV, g = bg % KV;
    const float* K = qkv + b * S * ld + (H + g) * hd;
    const float* V = qkv + b * S * ld + (H + KV + g) * hd;
    float* dK = dqkv + b * S * ld + (H + g) * hd;
    float* dV = dqkv + b * S * ld + (H + KV + g) * hd;
    float* dKp = Pp > 0 ? prefix_buf.data() + (bg * 2) * Pp * hd : nullptr;
    float* dVp = Pp > 0 ? dKp + Pp * hd : nullptr;
    std::vector<float> dP(S * L);
    for (int64_t j = 0; j < group; ++j) {
      const int64_t h = g * group + j;
      const float* Q = qkv + b * S * ld + h * hd;
      const float* dO = dout + b * S * ldo + h * hd;
      const float* P = probs + (b * H + h) * S * L;
      const float acc = j == 0 ? 0.0f : 1.0f;
      if (Pp > 0) {
        sgemm(false, true, S, Pp, hd, 1.0f, dO, ldo, prefix_v + g * hd, KV * hd, 0.0f, dP.data(), L, 1);
        sgemm(true, false, Pp, hd, S, 1.0f, P, L, dO, ldo, acc, dVp, hd, 1);
      }
      sgemm(false, true, S, S, hd, 1.0f, dO, ldo, V, ld, 0.0f, dP.data() + Pp, L, 1);
      sgemm(true, false, S, hd, S, 1.0f, P + Pp, L, dO, ldo, acc, dV, ld, 1);
      for (int64_t i = 0; i < S; ++i) softmax_backward_row(P + i * L, dP.data() + i * L, L, scale);
      float* dQ = dqkv + b * S * ld + h * hd;
      if (q_rows > 0) {
        if (Pp > 0)
          sgemm(false, false, q_rows, hd, Pp, 1.0f, dP.data(), L, prefix_k + g * hd, KV * hd, 0.0f, dQ, ld,
                1);
        sgemm(false, false, q_rows, hd, S, 1.0f, dP.data() + Pp, L, K, ld, Pp > 0 ? 1.0f : 0.0f, dQ, ld, 1);
      }
      for (int64_t i = q_rows; i < S; ++i) std::fill(dQ + i * ld, dQ + i * ld + hd, 0.0f);
      sgemm(true, false, S, hd, S, 1.0f, dP.data() + Pp, L, Q, ld, acc, dK, ld, 1);
      if (Pp > 0) sgemm(true, false, Pp, hd, S, 1.0f, dP.data(), L, Q, ld, acc, dKp, hd, 1);
    }
  }
  if (Pp > 0) {
    std::fill(dprefix_k, dprefix_k + Pp * KV * hd, 0.0f);
    std::fill(dprefix_v, dprefix_v + Pp * KV * hd, 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < KV; ++g) {
        const float* bk = prefix_buf.data() + ((b * KV + g) * 2) * Pp * hd;
        const float* bv = bk + Pp * hd;
        for (int64_t p = 0; p < Pp; ++p)
          for (int64_t c = 0; c < hd; ++c) {
            dprefix_k[(p * KV + g) * hd + c] += bk[p * hd + c];
            dprefix_v[(p * KV + g) * hd + c] += bv[p * hd + c];
          }
      }
  }
}

}  // namespace pt
