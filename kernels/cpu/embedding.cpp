// Soft-prompt + token (+ learned position) embedding; see ops.h for the contract.
#include <cstring>

#include "priortune/ops.h"

namespace pt {

void embedding_forward(float* out, const int32_t* ids, const float* prompt, int64_t P, const float* wte,
                       const float* wpe, int64_t pos_offset, int64_t B, int64_t T, int64_t C, int threads) {
  const int64_t S = P + T;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < B * S; ++row) {
    const int64_t b = row / S, s = row % S;
    const float* src = s < P ? prompt + s * C : wte + static_cast<int64_t>(ids[b * T + s - P]) * C;
    float* o = out + row * C;
    if (wpe) {
      const float* p = wpe + (s + pos_offset) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = src[c] + p[c];
    } else {
      std::memcpy(o, src, C * sizeof(float));
    }
  }
}

}  // namespace pt

namespace pt {

void embedding_backward(float* dprompt, const float* dout, int64_t P, int64_t B, int64_t S, int64_t C) {
  std::memset(dprompt, 0, P * C * sizeof(float));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < P; ++s) {
      const float* g = dout + (b * S + s) * C;
      float* d = dprompt + s * C;
      for (int64_t c = 0; c < C; ++c) d[c] += g[c];
    }
}

}  // namespace pt
