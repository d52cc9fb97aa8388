// Float64 linear algebra for the collapse metrics; see priortune/collapse.h for the contracts.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>
#include <vector>

#include "priortune/collapse.h"
#include "priortune/parallel.h"
#include "priortune/vec64.h"
#include "priortune/vecmath.h"

namespace pt {

namespace {

// cov[i][j] += sum_r c[r][i] c[r][j] for i in [i0, i0 + 4), j in [j0, j0 + 8): a register tile of the
// rows x d centred chunk c (row-major float64). Each entry's sum runs over the rows in order.
PT_MULTIVERSION void syrk_tile(double* cov, const double* c, int64_t rows, int64_t d, int64_t i0,
                               int64_t j0) {
  double acc[4][8] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = c + r * d;
    double xj[8];
    for (int jj = 0; jj < 8; ++jj) xj[jj] = row[j0 + jj];
    for (int ii = 0; ii < 4; ++ii) {
      const double xi = row[i0 + ii];
#pragma omp simd
      for (int jj = 0; jj < 8; ++jj) acc[ii][jj] += xi * xj[jj];
    }
  }
  for (int ii = 0; ii < 4; ++ii)
    for (int jj = 0; jj < 8; ++jj) cov[(i0 + ii) * d + j0 + jj] += acc[ii][jj];
}

// The same for a partial tile at the edges (ni <= 4 rows, nj <= 8 columns of cov).
void syrk_edge(double* cov, const double* c, int64_t rows, int64_t d, int64_t i0, int64_t ni, int64_t j0,
               int64_t nj) {
  for (int64_t i = i0; i < i0 + ni; ++i)
    for (int64_t j = j0; j < j0 + nj; ++j) {
      double s = 0.0;
      for (int64_t r = 0; r < rows; ++r) s += c[r * d + i] * c[r * d + j];
      cov[i * d + j] += s;
    }
}

}  // namespace

// The mean's summation order does not depend on the thread count (threads own column blocks and add the
// rows in order); the centred cross-products are float64 sums over the rows in order, in register tiles
// that one thread each owns: a fit is bit-identical whatever the number of threads (a prior drawn with a
// given seed must be). Float64 throughout: fp32 GEMM products (as before) carried rounding of about 1e-7
// of the entries' scale, which a fit with little or no ridge on nearly collinear data took for signal.
void collapse_covariance(double* mean, double* cov, const float* x, int64_t n, int64_t d, int threads) {
  if (n < 2) throw std::invalid_argument("covariance: needs at least 2 rows");
  threads = std::max(1, threads);
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
  std::vector<double> centred(static_cast<size_t>(std::min(kChunk, n) * d));
  // Tiles of the lower triangle (diagonal tiles included): 4 rows of cov by 8 columns.
  const int64_t row_tiles = (d + 3) / 4, col_tiles = (d + 7) / 8;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t ti = 0; ti < row_tiles; ++ti)
    for (int64_t tj = 0; tj < col_tiles && tj * 8 <= ti * 4 + 3; ++tj) tiles.emplace_back(ti * 4, tj * 8);
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  for (int64_t r0 = 0; r0 < n; r0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - r0);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < d; ++j)
          centred[r * d + j] = static_cast<double>(x[(r0 + r) * d + j]) - mean[j];
#pragma omp for schedule(dynamic, 16)
      for (int64_t t = 0; t < ntiles; ++t) {
        const auto [i0, j0] = tiles[t];
        const int64_t ni = std::min<int64_t>(4, d - i0), nj = std::min<int64_t>(8, d - j0);
        if (ni == 4 && nj == 8)
          syrk_tile(cov, centred.data(), rows, d, i0, j0);
        else
          syrk_edge(cov, centred.data(), rows, d, i0, ni, j0, nj);
      }
    }
  }
  const double inv = 1.0 / static_cast<double>(n - 1);
  // The lower triangle (i >= j) is complete; mirror it.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const double v = cov[i * d + j] * inv;
      cov[i * d + j] = v;
      cov[j * d + i] = v;
    }
}

bool collapse_cholesky(double* a, int64_t d, int threads) {
  threads = std::max(1, threads);
  constexpr int64_t nb = 64;
  for (int64_t j0 = 0; j0 < d; j0 += nb) {
    const int64_t j1 = std::min(d, j0 + nb);
    // Diagonal block (columns before j0 already applied by the trailing updates).
    for (int64_t j = j0; j < j1; ++j) {
      double* rj = a + j * d;
      const double s = rj[j] - dot_d(rj + j0, rj + j0, j - j0);
      if (!(s > 0.0)) return false;
      rj[j] = std::sqrt(s);
      for (int64_t i = j + 1; i < j1; ++i) {
        double* ri = a + i * d;
        ri[j] = (ri[j] - dot_d(ri + j0, rj + j0, j - j0)) / rj[j];
      }
    }
    if (j1 == d) break;
      // Panel below the diagonal block, then the trailing update A[i][j] -= L[i][j0:j1] . L[j][j0:j1].
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t i = j1; i < d; ++i) {
        double* ri = a + i * d;
        for (int64_t j = j0; j < j1; ++j) {
          const double* rj = a + j * d;
          ri[j] = (ri[j] - dot_d(ri + j0, rj + j0, j - j0)) / rj[j];
        }
      }
#pragma omp for schedule(dynamic, 8)
      for (int64_t i = j1; i < d; ++i) {
        double* ri = a + i * d;
        for (int64_t j = j1; j <= i; ++j) ri[j] -= dot_d(ri + j0, a + j * d + j0, j1 - j0);
      }
    }
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i + 1; j < d; ++j) a[i * d + j] = 0.0;
  return true;
}

void collapse_mahalanobis_sq(double* out, const float* x, int64_t n, int64_t d, const double* mean,
                             const double* L, int threads) {
#pragma omp parallel num_threads(std::max(1, threads))
  {
    std::vector<double> z(d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n; ++r) {
      double s = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        const double v =
            (static_cast<double>(x[r * d + i]) - mean[i] - dot_d(L + i * d, z.data(), i)) / L[i * d + i];
        z[i] = v;
        s += v * v;
      }
      out[r] = s;
    }
  }
}

void collapse_mean_distances(double* out, const float* q, int64_t nq, const float* rows, int64_t nr,
                             int64_t d, int threads) {
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(dynamic, 1)
  for (int64_t i = 0; i < nq; ++i) {
    double s = 0.0;
    for (int64_t r = 0; r < nr; ++r) s += std::sqrt(dist2_f(q + i * d, rows + r * d, d));
    out[i] = nr > 0 ? s / static_cast<double>(nr) : 0.0;
  }
}

std::vector<double> collapse_gram_eigenvalues(const float* x, int64_t n, int64_t d, int threads) {
  threads = std::max(1, threads);
  if (n <= 0 || d <= 0) return {};
  const bool rows_gram = n <= d;
  const int64_t m = rows_gram ? n : d;
  std::vector<double> g(static_cast<size_t>(m * m));
  if (rows_gram) {
    std::vector<double> xd(x, x + n * d);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j <= i; ++j) g[i * m + j] = g[j * m + i] = dot_d(&xd[i * d], &xd[j * d], d);
  } else {
    std::vector<double> xt(static_cast<size_t>(d * n));  // columns of X as contiguous rows
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < d; ++j) xt[j * n + r] = x[r * d + j];
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j <= i; ++j) g[i * m + j] = g[j * m + i] = dot_d(&xt[i * n], &xt[j * n], n);
  }
  // Householder tridiagonalisation: for each column k, H = I - 2 v v^T (|v| = 1) zeroes g[k+2:, k]; the
  // trailing block B becomes H B H = B - 2 (v w^T + w v^T), p = B v, w = p - (v^T p) v.
  std::vector<double> diag(m), off(m, 0.0), v(m), p(m);
  for (int64_t k = 0; k + 2 < m; ++k) {
    const int64_t s = k + 1, len = m - s;
    double norm2 = 0.0;
    for (int64_t i = s; i < m; ++i) norm2 += g[i * m + k] * g[i * m + k];
    const double norm = std::sqrt(norm2);
    const double x0 = g[s * m + k];
    const double alpha = x0 >= 0.0 ? -norm : norm;
    diag[k] = g[k * m + k];
    off[k] = alpha;
    for (int64_t i = s; i < m; ++i) v[i] = g[i * m + k];
    v[s] -= alpha;
    double vn2 = 0.0;
    for (int64_t i = s; i < m; ++i) vn2 += v[i] * v[i];
    if (vn2 == 0.0) {
      off[k] = x0;  // column already reduced
      continue;
    }
    const double inv = 1.0 / std::sqrt(vn2);
    for (int64_t i = s; i < m; ++i) v[i] *= inv;
#pragma omp parallel for num_threads(threads) schedule(static) if (len > 128)
    for (int64_t i = s; i < m; ++i) p[i] = dot_d(&g[i * m + s], &v[s], len);
    const double K = dot_d(&v[s], &p[s], len);
    for (int64_t i = s; i < m; ++i) p[i] -= K * v[i];  // p is now w
#pragma omp parallel for num_threads(threads) schedule(static) if (len > 128)
    for (int64_t i = s; i < m; ++i) {
      double* gi = &g[i * m];
      const double vi = v[i], wi = p[i];
      for (int64_t j = s; j < m; ++j) gi[j] -= 2.0 * (vi * p[j] + wi * v[j]);
    }
  }
  if (m >= 2) {
    diag[m - 2] = g[(m - 2) * m + (m - 2)];
    off[m - 2] = g[(m - 1) * m + (m - 2)];
  }
  if (m >= 1) diag[m - 1] = g[(m - 1) * m + (m - 1)];
  off[m - 1] = 0.0;
  // Implicit QL with Wilkinson shifts on the tridiagonal (diag, off), off[i] coupling i and i + 1. A coupling
  // is negligible next to its neighbours or, as in tql2, next to the largest |diag| + |off| seen: without
  // the second test the null space of a rank-deficient Gram (a collapsed prompt) never deflates, its
  // couplings shrinking through 1e-100 and below while their diagonal neighbours shrink with them.
  const double eps = std::ldexp(1.0, -52);
  double scale = 0.0;
  for (int64_t l = 0; l < m; ++l) {
    scale = std::max(scale, std::fabs(diag[l]) + std::fabs(off[l]));
    int iter = 0;
    int64_t mm;
    do {
      for (mm = l; mm < m - 1; ++mm) {
        const double dd = std::fabs(diag[mm]) + std::fabs(diag[mm + 1]);
        if (std::fabs(off[mm]) <= 1e-15 * dd || std::fabs(off[mm]) <= eps * scale) break;
      }
      if (mm != l) {
        if (iter++ == 200) throw std::runtime_error("eigenvalues: QL iteration did not converge");
        double g2 = (diag[l + 1] - diag[l]) / (2.0 * off[l]);
        double r = std::hypot(g2, 1.0);
        g2 = diag[mm] - diag[l] + off[l] / (g2 + std::copysign(r, g2));
        double s = 1.0, c = 1.0, pp = 0.0;
        int64_t i;
        for (i = mm - 1; i >= l; --i) {
          double f = s * off[i], b = c * off[i];
          off[i + 1] = (r = std::hypot(f, g2));
          if (r == 0.0) {
            diag[i + 1] -= pp;
            off[mm] = 0.0;
            break;
          }
          s = f / r;
          c = g2 / r;
          g2 = diag[i + 1] - pp;
          r = (diag[i] - g2) * s + 2.0 * c * b;
          pp = s * r;
          diag[i + 1] = g2 + pp;
          g2 = c * r - b;
        }
        if (r == 0.0 && i >= l) continue;
        diag[l] -= pp;
        off[l] = g2;
        off[mm] = 0.0;
      }
    } while (mm != l);
  }
  std::sort(diag.begin(), diag.end(), [](double a, double b) { return a > b; });
  return diag;
}

}  // namespace pt
