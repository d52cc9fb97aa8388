// Gaussian priors: fit, sample, negative log-density and its gradient; see priortune/prior.h for the
// contracts. The blocked Cholesky is collapse_linalg.cpp's; this file adds a thread-count-independent
// covariance, the regularised fit, the sampler x = mu + s L z and the two triangular solves of the gradient
// Sigma^-1 (x - mu).
//
// Both per-row kernels work on blocks of rows: each row of L (up to 16 KiB at d = 2048) is loaded once per
// block and applied to every row of the block, so L (32 MiB at d = 2048) streams from memory once per block
// instead of once per row. Threads take whole blocks, so each output is computed in one fixed order.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "priortune/collapse.h"
#include "priortune/gemm.h"
#include "priortune/prior.h"

namespace pt {
namespace {

__attribute__((target_clones("avx512f", "avx2", "default"))) double dot_d(const double* a, const double* b,
                                                                          int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0..n) -= alpha * x[0..n)
__attribute__((target_clones("avx512f", "avx2", "default"))) void axpy_neg_d(double* y, const double* x,
                                                                             double alpha, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] -= alpha * x[i];
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rows per block: enough blocks for every thread, at most 16 rows (16 x d doubles stay in L2 at d = 2048).
int64_t block_rows(int64_t n, int threads) {
  const int64_t per_thread = (n + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(16, per_thread));
}

// mean[d] (=) and the unbiased covariance cov[d, d] (=) of x[n, d], as collapse_covariance but with a mean
// whose summation order does not depend on the thread count (threads own column blocks and add the rows in
// order), so a fit is bit-identical whatever the number of threads: a prior drawn with a given seed must be.
// The centred cross-products are fp32 GEMMs over chunks of 256 rows (sgemm splits C, never K, so each
// entry's sum order is fixed too), accumulated in float64.
void covariance(double* mean, double* cov, const float* x, int64_t n, int64_t d, int threads) {
  constexpr int64_t kColumns = 64;
  const int64_t column_blocks = (d + kColumns - 1) / kColumns;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < column_blocks; ++b) {
    const int64_t j0 = b * kColumns, j1 = std::min(d, j0 + kColumns);
    double acc[kColumns] = {};
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += x[r * d + j];
    for (int64_t j = j0; j < j1; ++j) mean[j] = acc[j - j0] / static_cast<double>(n);
  }
  std::fill(cov, cov + d * d, 0.0);
  constexpr int64_t kChunk = 256;
  std::vector<float> centred(static_cast<size_t>(std::min(kChunk, n) * d)),
      partial(static_cast<size_t>(d * d));
  for (int64_t r0 = 0; r0 < n; r0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - r0);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < d; ++j)
        centred[r * d + j] = static_cast<float>(static_cast<double>(x[(r0 + r) * d + j]) - mean[j]);
    sgemm(true, false, d, d, rows, 1.0f, centred.data(), d, centred.data(), d, 0.0f, partial.data(), d,
          threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < d * d; ++i) cov[i] += partial[i];
  }
  const double inv = 1.0 / static_cast<double>(n - 1);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const double v = 0.5 * (cov[i * d + j] + cov[j * d + i]) * inv;
      cov[i * d + j] = v;
      cov[j * d + i] = v;
    }
}

}  // namespace

bool prior_cholesky(double* a, int64_t d, int threads, double* log_det) {
  if (!collapse_cholesky(a, d, std::max(1, threads))) return false;
  double s = 0.0;
  for (int64_t i = 0; i < d; ++i) s += 2.0 * std::log(a[i * d + i]);
  *log_det = s;
  return true;
}

bool prior_gaussian_fit(double* mean, double* L, double* cov, const float* x, int64_t n, int64_t d,
                        double shrinkage, double ridge_absolute, double ridge_relative, int threads,
                        PriorGaussianFitInfo* info) {
  if (n < 2) throw std::invalid_argument("rows: a Gaussian fit needs at least 2 rows");
  threads = std::max(1, threads);
  auto t0 = std::chrono::steady_clock::now();
  covariance(mean, L, x, n, d, threads);
  double trace = 0.0;
  for (int64_t i = 0; i < d; ++i) trace += L[i * d + i];
  const double mean_variance = trace / static_cast<double>(d);
  const double ridge = ridge_absolute + ridge_relative * mean_variance;
  const double keep = 1.0 - shrinkage, diagonal = shrinkage * mean_variance + ridge;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < d; ++i) {
    double* row = L + i * d;
    if (keep != 1.0)
      for (int64_t j = 0; j < d; ++j) row[j] *= keep;
    row[i] += diagonal;
  }
  if (cov != nullptr) std::copy(L, L + d * d, cov);
  info->covariance_seconds = seconds_since(t0);
  info->ridge = ridge;
  info->mean_variance = mean_variance;
  t0 = std::chrono::steady_clock::now();
  const bool ok = prior_cholesky(L, d, threads, &info->log_det);
  info->cholesky_seconds = seconds_since(t0);
  return ok;
}

void prior_gaussian_transform(float* out, const double* z, int64_t n, int64_t d, const double* mean,
                              const double* L, double scale, int threads) {
  threads = std::max(1, threads);
  const int64_t rows = block_rows(n, threads), blocks = (n + rows - 1) / rows;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * rows, r1 = std::min(n, r0 + rows);
    for (int64_t i = 0; i < d; ++i) {
      const double* Li = L + i * d;
      for (int64_t r = r0; r < r1; ++r)
        out[r * d + i] = static_cast<float>(mean[i] + scale * dot_d(Li, z + r * d, i + 1));
    }
  }
}

void prior_gaussian_energy(double* r2, float* grad, const float* x, int64_t n, int64_t d, const double* mean,
                           const double* L, int threads) {
  threads = std::max(1, threads);
  const int64_t rows = block_rows(n, threads), blocks = (n + rows - 1) / rows;
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> w(static_cast<size_t>(rows * d));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r0 = b * rows, r1 = std::min(n, r0 + rows);
      // Forward substitution L w = x - mean.
      for (int64_t i = 0; i < d; ++i) {
        const double* Li = L + i * d;
        for (int64_t r = r0; r < r1; ++r) {
          double* wr = w.data() + (r - r0) * d;
          wr[i] = (static_cast<double>(x[r * d + i]) - mean[i] - dot_d(Li, wr, i)) / Li[i];
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const double* wr = w.data() + (r - r0) * d;
        r2[r] = dot_d(wr, wr, d);
      }
      if (grad == nullptr) continue;
      // Backward substitution L^T g = w, column-oriented so that L is read by rows: once g_i is known, its
      // contribution L[i, 0..i) g_i leaves the equations of the earlier unknowns. g overwrites w in place.
      for (int64_t i = d - 1; i >= 0; --i) {
        const double* Li = L + i * d;
        for (int64_t r = r0; r < r1; ++r) {
          double* wr = w.data() + (r - r0) * d;
          const double g = wr[i] / Li[i];
          wr[i] = g;
          axpy_neg_d(wr, Li, g, i);
        }
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t i = 0; i < d; ++i) grad[r * d + i] = static_cast<float>(w[(r - r0) * d + i]);
    }
  }
}

}  // namespace pt
