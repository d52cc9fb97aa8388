// Rotary position embedding forward (rotate-half convention, as Hugging Face Llama); see ops.h.
#include "priortune/ops.h"

namespace pt {

void rope_forward(float* x, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
                  const float* cos, const float* sin, int threads) {
  const int64_t half = hd / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < B * S; ++row) {
    const int64_t s = row % S;
    const float* c = cos + s * half;
    const float* sn = sin + s * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + row * ld + col0 + h * hd;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * sn[i];
        v[i + half] = x2 * c[i] + x1 * sn[i];
      }
    }
  }
}

}  // namespace pt

namespace pt {

// The rotation is orthogonal, so its backward is the rotation by the negative angle.
void rope_backward(float* dx, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
                   const float* cos, const float* sin, int threads) {
  const int64_t half = hd / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < B * S; ++row) {
    const int64_t s = row % S;
    const float* c = cos + s * half;
    const float* sn = sin + s * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = dx + row * ld + col0 + h * hd;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float d1 = v[i], d2 = v[i + half];
        v[i] = d1 * c[i] + d2 * sn[i];
        v[i + half] = d2 * c[i] - d1 * sn[i];
      }
    }
  }
}

}  // namespace pt
