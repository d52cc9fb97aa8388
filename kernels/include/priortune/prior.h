// Float64 Gaussian machinery behind the priors and the controllable-posterior regulariser (lib/priors.ts):
// fitting N(mu, Sigma) with full covariance to reference rows (vocabulary embeddings or activations),
// drawing x = mu + s L z from standard normals z, and the negative log-density's value and gradient
// 0.5 (x - mu)^T Sigma^-1 (x - mu), Sigma^-1 (x - mu) by two triangular solves.
//
// Memory contract: row-major throughout; L is the lower Cholesky factor of Sigma (d x d, strict upper
// triangle zero, as collapse_cholesky writes it). Every output is overwritten (=); inputs are only read. The
// normals z are drawn by the caller (the seeded generator lives in lib/rng.ts), so results depend on the seed
// only: every output element is computed by one thread in a fixed order, whatever the thread count.
#pragma once
#include <cstdint>

namespace pt {

struct PriorGaussianFitInfo {
  double ridge = 0;          // the multiple of I added to the diagonal
  double mean_variance = 0;  // trace(S) / d of the unregularised sample covariance S
  double log_det = 0;        // ln det of the regularised covariance
  double covariance_seconds = 0, cholesky_seconds = 0;
};

// mean[d] (=), L[d, d] (=) and, when cov is not null, the regularised covariance cov[d, d] (=) of the rows of
// x[n, d] (n >= 2):
//   Sigma = (1 - shrinkage) S + shrinkage (tr S / d) I + ridge I,  ridge = ridge_absolute + ridge_relative tr
//   S / d
// where S is the unbiased sample covariance (shrinkage towards the scaled identity, as Ledoit-Wolf's target;
// the ridge is the paper's jitter "Sigma + 1e-3 I when N < d", absolute or relative to the mean variance; a
// relative ridge on rows of zero variance counts in units of 1).
// Returns false when Sigma is not positive definite (then L is garbage); throws std::invalid_argument for
// n < 2.
bool prior_gaussian_fit(double* mean, double* L, double* cov, const float* x, int64_t n, int64_t d,
                        double shrinkage, double ridge_absolute, double ridge_relative, int threads,
                        PriorGaussianFitInfo* info);

// In place: a[d, d] holds a symmetric positive-definite matrix (lower triangle read) and receives its lower
// Cholesky factor; *log_det (=) = ln det. Returns false when a pivot is not positive.
bool prior_cholesky(double* a, int64_t d, int threads, double* log_det);

// out[n, d] (=) = mean + scale * L z_i for each row z_i of z[n, d]: draws from N(mean, scale^2 Sigma).
void prior_gaussian_transform(float* out, const double* z, int64_t n, int64_t d, const double* mean,
                              const double* L, double scale, int threads);

// For each row x_i of x[n, d]: w = L^-1 (x_i - mean) (forward substitution), r2[i] (=) = |w|^2, the squared
// Mahalanobis distance, and, when grad is not null, grad[i] (=) = L^-T w = Sigma^-1 (x_i - mean) (backward
// substitution): the gradient of 0.5 r2.
void prior_gaussian_energy(double* r2, float* grad, const float* x, int64_t n, int64_t d, const double* mean,
                           const double* L, int threads);

}  // namespace pt
