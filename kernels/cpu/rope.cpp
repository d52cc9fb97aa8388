// Rotary position embedding forward and backward (rotate-half convention, as Hugging Face Llama); see ops.h.
#include "priortune/ops.h"

namespace pt {
namespace {

// Rotates each (i, i + hd/2) pair of every head by the row's angle times `direction` (+1 forward; -1 is the
// backward: the rotation is orthogonal, so its transpose is the rotation by the negative angle).
void rotate(float* x, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
            const float* cos, const float* sin, float direction, int threads) {
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
        const float x1 = v[i], x2 = v[i + half], si = direction * sn[i];
        v[i] = x1 * c[i] - x2 * si;
        v[i + half] = x2 * c[i] + x1 * si;
      }
    }
  }
}

}  // namespace

void rope_forward(float* x, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
                  const float* cos, const float* sin, int threads) {
  rotate(x, B, S, ld, col0, heads, hd, cos, sin, 1.0f, threads);
}

void rope_backward(float* dx, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
                   const float* cos, const float* sin, int threads) {
  rotate(dx, B, S, ld, col0, heads, hd, cos, sin, -1.0f, threads);
}

}  // namespace pt
