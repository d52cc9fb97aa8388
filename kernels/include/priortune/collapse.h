// Float64 linear algebra behind the collapse metrics (lib/collapse.ts): the Gaussian fitted to a reference
// set (vocabulary embeddings or dataset activations), Mahalanobis distances under it, the paper's divergence
// and the spectrum of a prompt matrix. Inputs are row-major fp32 x[n, d]; outputs float64, overwritten (=).
// Results are deterministic for a fixed thread count.
#pragma once
#include <cstdint>
#include <vector>

namespace pt {

// mean[d] (=) and the unbiased covariance cov[d, d] (=, full symmetric) of the rows of x[n, d], n >= 2.
// The mean and the centred cross-products are summed in float64, each in a thread-count-independent
// order: bit-identical for any thread count.
void collapse_covariance(double* mean, double* cov, const float* x, int64_t n, int64_t d, int threads);

// In-place Cholesky factorisation a = L L^T of a symmetric positive-definite a[d, d] (row-major; only the
// lower triangle is read): L is written to the lower triangle, the strict upper triangle is zeroed. Blocked,
// right-looking; returns false (a is then garbage) when a pivot is not positive.
bool collapse_cholesky(double* a, int64_t d, int threads);

// out[n] (=) = (x_i - mean)^T (L L^T)^-1 (x_i - mean): squared Mahalanobis distances by forward substitution.
void collapse_mahalanobis_sq(double* out, const float* x, int64_t n, int64_t d, const double* mean,
                             const double* L, int threads);

// out[nq] (=) = mean over the rows r of rows[nr, d] of |q - r| (Euclidean, float64), for each q of q[nq, d].
void collapse_mean_distances(double* out, const float* q, int64_t nq, const float* rows, int64_t nr,
                             int64_t d, int threads);

// The eigenvalues, descending, of the Gram matrix of x[n, d]: of X X^T when n <= d, else of X^T X (the same
// non-zero spectrum: the squared singular values of X). Householder tridiagonalisation + implicit QL.
std::vector<double> collapse_gram_eigenvalues(const float* x, int64_t n, int64_t d, int threads);

}  // namespace pt
