// Float64 linear algebra for the analyses; see priortune/analysis.h for the contracts.
//
// The eigen-decomposition is the EISPACK tred2/tql2 pair as JAMA writes it, with one change of layout: JAMA
// works on V[k][j] with k innermost, a column walk in row-major storage; here W = V^T is stored instead, so
// every inner loop runs along a contiguous row (W's row j is V's column j, i.e. eigenvector j at the end).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "priortune/analysis.h"
#include "priortune/gemm.h"
#include "priortune/vec64.h"

namespace pt {
namespace {

// Householder reduction of the symmetric matrix held in w (= V^T = V at the start) to tridiagonal form:
// diagonal d[n], sub-diagonal e[n] (e[i] couples i - 1 and i). With `accumulate`, w ends as the transposed
// orthogonal transformation (row j = column j of JAMA's V).
void tred2(double* w, double* d, double* e, int64_t n, bool accumulate) {
  auto W = [w, n](int64_t r, int64_t c) -> double& { return w[r * n + c]; };
  for (int64_t j = 0; j < n; ++j) d[j] = W(j, n - 1);
  for (int64_t i = n - 1; i > 0; --i) {
    double scale = 0.0, h = 0.0;
    for (int64_t k = 0; k < i; ++k) scale += std::fabs(d[k]);
    if (scale == 0.0) {
      e[i] = d[i - 1];
      for (int64_t j = 0; j < i; ++j) {
        d[j] = W(j, i - 1);
        W(j, i) = 0.0;
        W(i, j) = 0.0;
      }
    } else {
      for (int64_t k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      std::fill(e, e + i, 0.0);
      // e = A d over the lower triangle (A's column j is W's row j).
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        W(i, j) = f;
        const double* wj = &W(j, 0);
        g = e[j] + wj[j] * f + dot_d(wj + j + 1, d + j + 1, i - 1 - j);
        axpy_d(e + j + 1, wj + j + 1, f, i - 1 - j);
        e[j] = g;
      }
      f = 0.0;
      for (int64_t j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int64_t j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        double* wj = &W(j, 0);
        axpy_d(wj + j, e + j, -f, i - j);
        axpy_d(wj + j, d + j, -g, i - j);
        d[j] = wj[i - 1];
        wj[i] = 0.0;
      }
    }
    d[i] = h;
  }
  if (!accumulate) {
    for (int64_t j = 0; j < n; ++j) d[j] = W(j, j);
    e[0] = 0.0;
    return;
  }
  for (int64_t i = 0; i < n - 1; ++i) {
    W(i, n - 1) = W(i, i);
    W(i, i) = 1.0;
    const double h = d[i + 1];
    double* wi1 = &W(i + 1, 0);
    if (h != 0.0) {
      for (int64_t k = 0; k <= i; ++k) d[k] = wi1[k] / h;
      for (int64_t j = 0; j <= i; ++j) {
        double* wj = &W(j, 0);
        const double g = dot_d(wi1, wj, i + 1);
        axpy_d(wj, d, -g, i + 1);
      }
    }
    std::fill(wi1, wi1 + i + 1, 0.0);
  }
  for (int64_t j = 0; j < n; ++j) {
    d[j] = W(j, n - 1);
    W(j, n - 1) = 0.0;
  }
  W(n - 1, n - 1) = 1.0;
  e[0] = 0.0;
}

// Implicit QL on the tridiagonal (d, e) from tred2; with w, accumulates the rotations into w's rows. Each
// sweep's rotations are recorded, then applied to column blocks of w in parallel: every element still sees
// the rotations in the same order, so the result does not depend on the thread count.
void tql2(double* w, double* d, double* e, int64_t n, int threads) {
  for (int64_t i = 1; i < n; ++i) e[i - 1] = e[i];
  e[n - 1] = 0.0;
  double f = 0.0, tst1 = 0.0;
  const double eps = std::ldexp(1.0, -52);
  std::vector<double> cs(static_cast<size_t>(n)), sn(static_cast<size_t>(n));
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  for (int64_t l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::fabs(d[l]) + std::fabs(e[l]));
    int64_t m = l;
    while (m < n - 1 && std::fabs(e[m]) > eps * tst1) ++m;
    if (m > l) {
      int iter = 0;
      do {
        if (++iter > 60)
          throw std::runtime_error("symmetric eigen-decomposition: QL did not converge for eigenvalue " +
                                   std::to_string(l));
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = std::hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int64_t i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = c, c3 = c, s = 0.0, s2 = 0.0;
        const double el1 = e[l + 1];
        for (int64_t i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = std::hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          cs[i] = c;
          sn[i] = s;
        }
        if (w) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= 2 * kBlock && threads > 1)
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t k0 = b * kBlock, k1 = std::min(n, k0 + kBlock);
            for (int64_t i = m - 1; i >= l; --i) {
              double* wi = w + i * n;
              double* wi1 = w + (i + 1) * n;
              const double ci = cs[i], si = sn[i];
#pragma omp simd
              for (int64_t k = k0; k < k1; ++k) {
                const double t = wi1[k];
                wi1[k] = si * wi[k] + ci * t;
                wi[k] = ci * wi[k] - si * t;
              }
            }
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (std::fabs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0.0;
  }
}

// C[n, n] (=) = A B, row-major float64.
void matmul_nn(double* C, const double* A, const double* B, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double* ci = C + i * n;
    std::fill(ci, ci + n, 0.0);
    for (int64_t k = 0; k < n; ++k) axpy_d(ci, B + k * n, A[i * n + k], n);
  }
}

// C[n, n] (=) = A B^T, row-major float64.
void matmul_nt(double* C, const double* A, const double* B, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) C[i * n + j] = dot_d(A + i * n, B + j * n, n);
}

}  // namespace

void analysis_symmetric_eigen(double* values, double* vectors, const double* a, int64_t d, int threads) {
  threads = std::max(1, threads);
  if (d <= 0) return;
  std::vector<double> w(a, a + d * d), e(static_cast<size_t>(d));
  std::vector<double> diag(static_cast<size_t>(d));
  const bool want = vectors != nullptr;
  tred2(w.data(), diag.data(), e.data(), d, want);
  tql2(want ? w.data() : nullptr, diag.data(), e.data(), d, threads);
  std::vector<int64_t> order(static_cast<size_t>(d));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return diag[x] > diag[y]; });
  for (int64_t k = 0; k < d; ++k) values[k] = diag[order[k]];
  if (!want) return;
  for (int64_t k = 0; k < d; ++k) {
    const double* src = &w[order[k] * d];
    int64_t big = 0;
    for (int64_t j = 1; j < d; ++j)
      if (std::fabs(src[j]) > std::fabs(src[big])) big = j;
    const double sign = src[big] < 0 ? -1.0 : 1.0;
    for (int64_t j = 0; j < d; ++j) vectors[k * d + j] = sign * src[j];
  }
}

void analysis_pairwise_sq_distances(double* out, const float* a, int64_t na, const float* b, int64_t nb,
                                    int64_t d, int threads) {
  threads = std::max(1, threads);
  if (na <= 0 || nb <= 0) return;
  const bool self = a == b && na == nb;
  std::vector<double> mean(static_cast<size_t>(d), 0.0);
  for (int64_t r = 0; r < na; ++r)
    for (int64_t j = 0; j < d; ++j) mean[j] += a[r * d + j];
  for (int64_t j = 0; j < d; ++j) mean[j] /= static_cast<double>(na);
  auto centre = [&](const float* x, int64_t n, std::vector<float>& xc, std::vector<double>& norms) {
    xc.resize(static_cast<size_t>(n * d));
    norms.resize(static_cast<size_t>(n));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      double s = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const float v = static_cast<float>(static_cast<double>(x[r * d + j]) - mean[j]);
        xc[r * d + j] = v;
        s += static_cast<double>(v) * v;
      }
      norms[r] = s;
    }
  };
  std::vector<float> ac, bc_own;
  std::vector<double> an, bn_own;
  centre(a, na, ac, an);
  if (!self) centre(b, nb, bc_own, bn_own);
  const std::vector<float>& bc = self ? ac : bc_own;
  const std::vector<double>& bn = self ? an : bn_own;
  constexpr int64_t kRows = 512;
  std::vector<float> dots(static_cast<size_t>(std::min(kRows, na) * nb));
  for (int64_t r0 = 0; r0 < na; r0 += kRows) {
    const int64_t rows = std::min(kRows, na - r0);
    sgemm(false, true, rows, nb, d, 1.0f, ac.data() + r0 * d, d, bc.data(), d, 0.0f, dots.data(), nb,
          threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < nb; ++c) {
        const double v = an[r0 + r] + bn[c] - 2.0 * static_cast<double>(dots[r * nb + c]);
        out[(r0 + r) * nb + c] = v > 0.0 ? v : 0.0;
      }
  }
  if (self)
    for (int64_t i = 0; i < na; ++i) out[i * nb + i] = 0.0;
}

double analysis_trace_sqrt_product(const double* s1, const double* s2, int64_t d, int threads) {
  threads = std::max(1, threads);
  std::vector<double> lambda(static_cast<size_t>(d)), V(static_cast<size_t>(d * d));
  analysis_symmetric_eigen(lambda.data(), V.data(), s1, d, threads);
  std::vector<double> T(static_cast<size_t>(d * d)), C(static_cast<size_t>(d * d));
  matmul_nn(T.data(), V.data(), s2, d, threads);
  matmul_nt(C.data(), T.data(), V.data(), d, threads);
  std::vector<double> root(static_cast<size_t>(d));
  for (int64_t i = 0; i < d; ++i) root[i] = std::sqrt(std::max(0.0, lambda[i]));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const double v = 0.5 * (C[i * d + j] + C[j * d + i]) * root[i] * root[j];
      T[i * d + j] = v;
      T[j * d + i] = v;
    }
  analysis_symmetric_eigen(lambda.data(), nullptr, T.data(), d, threads);
  double trace = 0.0;
  for (int64_t i = d - 1; i >= 0; --i) trace += std::sqrt(std::max(0.0, lambda[i]));
  return trace;
}

double analysis_trace_inverse_product(const double* l2, const double* l1, int64_t d, int threads) {
  threads = std::max(1, threads);
  for (int64_t i = 0; i < d; ++i)
    if (!(l2[i * d + i] > 0.0))
      throw std::invalid_argument("cholesky: diagonal entry " + std::to_string(i) + " is not positive");
  std::vector<double> X(static_cast<size_t>(d * d), 0.0);
  constexpr int64_t kColumns = 64;
  const int64_t blocks = (d + kColumns - 1) / kColumns;
  // X = L2^-1 L1 row by row: x_i = (l1_i - sum_{k < i} L2[i, k] x_k) / L2[i, i]; x_k is zero beyond column k.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kColumns, j1 = std::min(d, j0 + kColumns);
    for (int64_t i = j0; i < d; ++i) {
      double* xi = &X[i * d];
      const int64_t hi = std::min(j1, i + 1);
      for (int64_t j = j0; j < hi; ++j) xi[j] = l1[i * d + j];
      for (int64_t k = j0; k < i; ++k) {
        const int64_t kh = std::min(hi, k + 1);
        const double lik = l2[i * d + k];
        if (lik != 0.0) axpy_d(xi + j0, &X[k * d + j0], -lik, kh - j0);
      }
      const double inv = 1.0 / l2[i * d + i];
      for (int64_t j = j0; j < hi; ++j) xi[j] *= inv;
    }
  }
  double trace = 0.0;
  for (int64_t i = 0; i < d; ++i) trace += dot_d(&X[i * d], &X[i * d], i + 1);
  return trace;
}

}  // namespace pt
