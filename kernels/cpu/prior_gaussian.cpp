// Gaussian priors: fit, sample, negative log-density and its gradient; see priortune/prior.h for the
// contracts. The covariance and the blocked Cholesky are collapse_linalg.cpp's; this file adds the
// regularised fit, the sampler x = mu + s L z and the two triangular solves of the gradient Sigma^-1 (x -
// mu).
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
#include "priortune/vec64.h"

namespace pt {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rows per block: enough blocks for every thread, at most 16 rows (16 x d doubles stay in L2 at d = 2048).
int64_t block_rows(int64_t n, int threads) {
  const int64_t per_thread = (n + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(16, per_thread));
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
  collapse_covariance(mean, L, x, n, d, threads);
  double trace = 0.0;
  for (int64_t i = 0; i < d; ++i) trace += L[i * d + i];
  const double mean_variance = trace / static_cast<double>(d);
  // A relative ridge on an all-constant set (zero variance) falls back to units of 1, so it still factors.
  const double ridge = ridge_absolute + ridge_relative * (mean_variance > 0.0 ? mean_variance : 1.0);
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
          axpy_d(wr, Li, -g, i);
        }
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t i = 0; i < d; ++i) grad[r * d + i] = static_cast<float>(w[(r - r0) * d + i]);
    }
  }
}

}  // namespace pt
