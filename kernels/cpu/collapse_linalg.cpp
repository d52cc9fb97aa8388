// Float64 linear algebra for the collapse metrics; see priortune/collapse.h for the contracts.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "priortune/collapse.h"
#include "priortune/gemm.h"
#include "priortune/parallel.h"
#include "priortune/vec64.h"
#include "priortune/vecmath.h"

namespace pt {

namespace {

// The centred chunk is packed in panels of 8 columns: panel p holds columns [8p, 8p + 8) of every row, row
// after row (p[r * 8 + jj]), zero-padded past d, so a register tile reads two contiguous streams. Each
// kernel adds to cov[i][j] the sum over the chunk's rows, in row order, of c[r][i] c[r][j] for its tile: the
// same sum whatever the tile shape, so the result does not depend on which kernel the CPU selects (beyond
// fused or separate multiply-adds) nor on the thread count.
constexpr int64_t kPanel = 8;

// Adds an acc[ti][tj] tile to cov at (i0, j0), clipped to d x d (the padding columns are dropped).
void add_tile(double* cov, int64_t d, int64_t i0, int64_t j0, const double* acc, int ti, int tj) {
  for (int ii = 0; ii < ti && i0 + ii < d; ++ii)
    for (int jj = 0; jj < tj && j0 + jj < d; ++jj) cov[(i0 + ii) * d + j0 + jj] += acc[ii * tj + jj];
}

// AVX-512: 8 rows of cov (one panel) by 16 columns (two panels): 16 zmm accumulators.
__attribute__((target("avx512f,fma"))) void syrk_tile_avx512(double* cov, const double* packed, int64_t rows,
                                                             int64_t d, int64_t i0, int64_t j0) {
  const double* a = packed + (i0 / kPanel) * rows * kPanel;
  const double* b0 = packed + (j0 / kPanel) * rows * kPanel;
  const double* b1 = b0 + rows * kPanel;
  __m512d c0[8], c1[8];
  for (int ii = 0; ii < 8; ++ii) c0[ii] = c1[ii] = _mm512_setzero_pd();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512d x0 = _mm512_loadu_pd(b0 + r * kPanel), x1 = _mm512_loadu_pd(b1 + r * kPanel);
    const double* ar = a + r * kPanel;
    for (int ii = 0; ii < 8; ++ii) {
      const __m512d xi = _mm512_set1_pd(ar[ii]);
      c0[ii] = _mm512_fmadd_pd(xi, x0, c0[ii]);
      c1[ii] = _mm512_fmadd_pd(xi, x1, c1[ii]);
    }
  }
  alignas(64) double acc[8 * 16];
  for (int ii = 0; ii < 8; ++ii) {
    _mm512_store_pd(acc + ii * 16, c0[ii]);
    _mm512_store_pd(acc + ii * 16 + 8, c1[ii]);
  }
  add_tile(cov, d, i0, j0, acc, 8, 16);
}

// AVX2: 4 rows of cov (half a panel) by 8 columns (one panel): 8 ymm accumulators.
__attribute__((target("avx2,fma"))) void syrk_tile_avx2(double* cov, const double* packed, int64_t rows,
                                                        int64_t d, int64_t i0, int64_t j0) {
  const double* a = packed + (i0 / kPanel) * rows * kPanel + i0 % kPanel;
  const double* b = packed + (j0 / kPanel) * rows * kPanel;
  __m256d c0[4], c1[4];
  for (int ii = 0; ii < 4; ++ii) c0[ii] = c1[ii] = _mm256_setzero_pd();
  for (int64_t r = 0; r < rows; ++r) {
    const __m256d x0 = _mm256_loadu_pd(b + r * kPanel), x1 = _mm256_loadu_pd(b + r * kPanel + 4);
    const double* ar = a + r * kPanel;
    for (int ii = 0; ii < 4; ++ii) {
      const __m256d xi = _mm256_broadcast_sd(ar + ii);
      c0[ii] = _mm256_fmadd_pd(xi, x0, c0[ii]);
      c1[ii] = _mm256_fmadd_pd(xi, x1, c1[ii]);
    }
  }
  alignas(32) double acc[4 * 8];
  for (int ii = 0; ii < 4; ++ii) {
    _mm256_store_pd(acc + ii * 8, c0[ii]);
    _mm256_store_pd(acc + ii * 8 + 4, c1[ii]);
  }
  add_tile(cov, d, i0, j0, acc, 4, 8);
}

// Portable: the AVX2 tile's shape in plain C++.
void syrk_tile_generic(double* cov, const double* packed, int64_t rows, int64_t d, int64_t i0, int64_t j0) {
  const double* a = packed + (i0 / kPanel) * rows * kPanel + i0 % kPanel;
  const double* b = packed + (j0 / kPanel) * rows * kPanel;
  double acc[4 * 8] = {};
  for (int64_t r = 0; r < rows; ++r)
    for (int ii = 0; ii < 4; ++ii)
      for (int jj = 0; jj < 8; ++jj) acc[ii * 8 + jj] += a[r * kPanel + ii] * b[r * kPanel + jj];
  add_tile(cov, d, i0, j0, acc, 4, 8);
}

struct SyrkKernel {
  int ti, tj;  // tile rows (a divisor of kPanel) and columns (a multiple of kPanel)
  void (*tile)(double*, const double*, int64_t, int64_t, int64_t, int64_t);
};

// The instruction set the GEMM uses (its selection already checked the CPU; PRIORTUNE_GEMM_KERNEL and
// selectGemmKernel narrow both).
SyrkKernel syrk_kernel() {
  const char* gemm = sgemm_micro_kernel().name;
  if (!std::strcmp(gemm, "avx512")) return {8, 16, syrk_tile_avx512};
  if (!std::strcmp(gemm, "avx2")) return {4, 8, syrk_tile_avx2};
  return {4, 8, syrk_tile_generic};
}

}  // namespace

// The mean's summation order does not depend on the thread count (threads own column blocks and add the
// rows in order); the centred cross-products are float64 sums over the rows in order, in register tiles
// that one thread each owns: a fit is bit-identical whatever the number of threads (a prior drawn with a
// given seed must be), and the AVX-512 and AVX2 kernels give the same bits (both fuse each multiply-add).
// Float64 throughout: fp32 GEMM products (as before) carried rounding of about 1e-7 of the entries' scale,
// which a fit with little or no ridge on nearly collinear data took for signal.
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
  const SyrkKernel kernel = syrk_kernel();
  // Panels rounded up to whole column tiles (the extra ones stay zero).
  const int64_t col_tiles = (d + kernel.tj - 1) / kernel.tj, panels = col_tiles * (kernel.tj / kPanel);
  const int64_t chunk_rows = std::min(kChunk, n);
  std::vector<double> packed(static_cast<size_t>(panels * chunk_rows * kPanel));
  // Tiles of the lower triangle (diagonal tiles included).
  const int64_t row_tiles = (d + kernel.ti - 1) / kernel.ti;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t ti = 0; ti < row_tiles; ++ti)
    for (int64_t tj = 0; tj < col_tiles && tj * kernel.tj < (ti + 1) * kernel.ti; ++tj)
      tiles.emplace_back(ti * kernel.ti, tj * kernel.tj);
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  for (int64_t r0 = 0; r0 < n; r0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - r0);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t j0 = p * kPanel, nj = std::clamp<int64_t>(d - j0, 0, kPanel);
        double* panel = packed.data() + p * rows * kPanel;
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = x + (r0 + r) * d;
          for (int64_t jj = 0; jj < nj; ++jj)
            panel[r * kPanel + jj] = static_cast<double>(xr[j0 + jj]) - mean[j0 + jj];
          for (int64_t jj = nj; jj < kPanel; ++jj) panel[r * kPanel + jj] = 0.0;
        }
      }
#pragma omp for schedule(dynamic, 16)
      for (int64_t t = 0; t < ntiles; ++t)
        kernel.tile(cov, packed.data(), rows, d, tiles[t].first, tiles[t].second);
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
