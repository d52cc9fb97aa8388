// Float64 vector primitives; see priortune/vec64.h.
#include "priortune/vec64.h"

#include "priortune/vecmath.h"

namespace pt {

PT_MULTIVERSION double dot_d(const double* a, const double* b, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

PT_MULTIVERSION void axpy_d(double* y, const double* x, double alpha, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

PT_MULTIVERSION double dist2_f(const float* a, const float* b, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const double t = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    s += t * t;
  }
  return s;
}

}  // namespace pt
