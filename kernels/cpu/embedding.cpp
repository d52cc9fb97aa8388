// Soft-prompt + token (+ learned position) embedding, its prompt gradient (=) and its table gradients (+=);
// see ops.h for the contract.
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

namespace pt {

// Scatter-add with repeated ids: each thread owns a block of channels and walks every row in order, so no
// two threads touch the same element and the sum order is fixed (independent of the thread count).
void embedding_backward_weights(float* dwte, float* dwpe, const float* dout, const int32_t* ids, int64_t P,
                                int64_t pos_offset, int64_t B, int64_t T, int64_t C, int threads) {
  const int64_t S = P + T, block = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c0 = 0; c0 < C; c0 += block) {
    const int64_t c1 = c0 + block < C ? c0 + block : C;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) {
        const float* g = dout + (b * S + s) * C;
        if (s >= P) {
          float* d = dwte + static_cast<int64_t>(ids[b * T + s - P]) * C;
          for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
        }
        if (dwpe) {
          float* d = dwpe + (s + pos_offset) * C;
          for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
        }
      }
  }
}

}  // namespace pt
