// Float64 vector primitives shared by the float64 linear algebra (collapse metrics, priors, analyses),
// multiversioned for AVX-512 / AVX2 / baseline like the fp32 elementwise kernels (see vecmath.h).
#pragma once
#include <cstdint>

namespace pt {

// sum_i a[i] * b[i]
double dot_d(const double* a, const double* b, int64_t n);
// y[i] += alpha * x[i]
void axpy_d(double* y, const double* x, double alpha, int64_t n);
// sum_i (a[i] - b[i])^2 of fp32 vectors, accumulated in float64
double dist2_f(const float* a, const float* b, int64_t n);

}  // namespace pt
