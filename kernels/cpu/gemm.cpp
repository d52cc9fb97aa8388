// Blocked single-precision GEMM (BLIS-style loop nest) with runtime-selected micro-kernels.
//
// Loop nest per thread: jc (NC columns of C) > pc (KC of the shared dimension, B block packed into
// KC x NC panels of NR columns) > ic (MC rows, A block packed into MR-row panels) > jr > ir (MR x NR
// register tile). Packing zero-pads partial panels, so the micro-kernels always run full tiles and only
// their stores are masked. Threads split C by columns (or by rows when M > N); each thread packs its own
// panels, so nothing is shared and every C element is summed in a fixed order (deterministic).
//
// Micro-kernels: AVX-512 8x32 (16 zmm accumulators), AVX2 6x16 (12 ymm accumulators), portable 4x16.
// Compiled with target attributes, so one binary runs on any x86-64 and picks the widest at load time.
#include "priortune/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "priortune/parallel.h"

namespace pt {
namespace {

constexpr int64_t KC = 256;

using MicroKernel = void (*)(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m,
                             int n, float alpha, float beta);

struct KernelDesc {
  const char* name;
  int mr, nr;
  int64_t mc, nc;
  MicroKernel kernel;
};

// ---------------------------------------------------------------------------------------------------------
// Micro-kernels. Ap: kc x MR (k-major), Bp: kc x NR (k-major). C tile m x n (m <= MR, n <= NR).

__attribute__((target("avx512f,fma"))) void kernel_avx512(int64_t kc, const float* Ap, const float* Bp,
                                                          float* C, int64_t ldc, int m, int n, float alpha,
                                                          float beta) {
  __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps(), c10 = _mm512_setzero_ps(),
         c11 = _mm512_setzero_ps(), c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps(),
         c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps(), c40 = _mm512_setzero_ps(),
         c41 = _mm512_setzero_ps(), c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps(),
         c60 = _mm512_setzero_ps(), c61 = _mm512_setzero_ps(), c70 = _mm512_setzero_ps(),
         c71 = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(Bp), b1 = _mm512_load_ps(Bp + 16);
    __m512 a;
    a = _mm512_set1_ps(Ap[0]);
    c00 = _mm512_fmadd_ps(a, b0, c00);
    c01 = _mm512_fmadd_ps(a, b1, c01);
    a = _mm512_set1_ps(Ap[1]);
    c10 = _mm512_fmadd_ps(a, b0, c10);
    c11 = _mm512_fmadd_ps(a, b1, c11);
    a = _mm512_set1_ps(Ap[2]);
    c20 = _mm512_fmadd_ps(a, b0, c20);
    c21 = _mm512_fmadd_ps(a, b1, c21);
    a = _mm512_set1_ps(Ap[3]);
    c30 = _mm512_fmadd_ps(a, b0, c30);
    c31 = _mm512_fmadd_ps(a, b1, c31);
    a = _mm512_set1_ps(Ap[4]);
    c40 = _mm512_fmadd_ps(a, b0, c40);
    c41 = _mm512_fmadd_ps(a, b1, c41);
    a = _mm512_set1_ps(Ap[5]);
    c50 = _mm512_fmadd_ps(a, b0, c50);
    c51 = _mm512_fmadd_ps(a, b1, c51);
    a = _mm512_set1_ps(Ap[6]);
    c60 = _mm512_fmadd_ps(a, b0, c60);
    c61 = _mm512_fmadd_ps(a, b1, c61);
    a = _mm512_set1_ps(Ap[7]);
    c70 = _mm512_fmadd_ps(a, b0, c70);
    c71 = _mm512_fmadd_ps(a, b1, c71);
    Ap += 8;
    Bp += 32;
  }
  const __m512 acc[8][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31},
                            {c40, c41}, {c50, c51}, {c60, c61}, {c70, c71}};
  const __mmask16 m0 = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? 0xFFFF : (n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int r = 0; r < m; ++r) {
    float* row = C + r * ldc;
    __m512 v0 = _mm512_mul_ps(va, acc[r][0]), v1 = _mm512_mul_ps(va, acc[r][1]);
    if (beta != 0.0f) {
      v0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, row), v0);
      v1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, row + 16), v1);
    }
    _mm512_mask_storeu_ps(row, m0, v0);
    _mm512_mask_storeu_ps(row + 16, m1, v1);
  }
}

__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t kc, const float* Ap, const float* Bp, float* C,
                                                     int64_t ldc, int m, int n, float alpha, float beta) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(Bp), b1 = _mm256_load_ps(Bp + 8);
    __m256 a;
    a = _mm256_broadcast_ss(Ap + 0);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(Ap + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(Ap + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(Ap + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(Ap + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(Ap + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
    Ap += 6;
    Bp += 16;
  }
  alignas(32) float tile[6][16];
  _mm256_store_ps(tile[0], c00);
  _mm256_store_ps(tile[0] + 8, c01);
  _mm256_store_ps(tile[1], c10);
  _mm256_store_ps(tile[1] + 8, c11);
  _mm256_store_ps(tile[2], c20);
  _mm256_store_ps(tile[2] + 8, c21);
  _mm256_store_ps(tile[3], c30);
  _mm256_store_ps(tile[3] + 8, c31);
  _mm256_store_ps(tile[4], c40);
  _mm256_store_ps(tile[4] + 8, c41);
  _mm256_store_ps(tile[5], c50);
  _mm256_store_ps(tile[5] + 8, c51);
  for (int r = 0; r < m; ++r) {
    float* row = C + r * ldc;
    if (beta != 0.0f) {
      for (int j = 0; j < n; ++j) row[j] = alpha * tile[r][j] + beta * row[j];
    } else {
      for (int j = 0; j < n; ++j) row[j] = alpha * tile[r][j];
    }
  }
}

void kernel_generic(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m, int n,
                    float alpha, float beta) {
  float acc[4][16] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int r = 0; r < 4; ++r) {
      const float a = Ap[r];
      for (int j = 0; j < 16; ++j) acc[r][j] += a * Bp[j];
    }
    Ap += 4;
    Bp += 16;
  }
  for (int r = 0; r < m; ++r) {
    float* row = C + r * ldc;
    for (int j = 0; j < n; ++j) row[j] = alpha * acc[r][j] + (beta != 0.0f ? beta * row[j] : 0.0f);
  }
}

const KernelDesc kAvx512{"avx512", 8, 32, 8 * 24, 32 * 64, kernel_avx512};
const KernelDesc kAvx2{"avx2", 6, 16, 6 * 32, 16 * 128, kernel_avx2};
const KernelDesc kGeneric{"generic", 4, 16, 4 * 32, 16 * 128, kernel_generic};

const KernelDesc* detect_kernel() {
  __builtin_cpu_init();
  const char* forced = std::getenv("PRIORTUNE_GEMM_KERNEL");
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (forced) {
    if (!std::strcmp(forced, "generic")) return &kGeneric;
    if (!std::strcmp(forced, "avx2") && has2) return &kAvx2;
  }
  if (has512) return &kAvx512;
  if (has2) return &kAvx2;
  return &kGeneric;
}

const KernelDesc* g_kernel = detect_kernel();

// ---------------------------------------------------------------------------------------------------------
// Packing. Element (i, k) of op(A) and (k, j) of op(B), honouring the transposes.

inline float elemA(bool t, const float* A, int64_t lda, int64_t i, int64_t k) {
  return t ? A[k * lda + i] : A[i * lda + k];
}

void pack_A(const KernelDesc& kd, bool transA, const float* A, int64_t lda, int64_t i0, int64_t mc,
            int64_t k0, int64_t kc, float* Ap) {
  const int mr = kd.mr;
  for (int64_t ip = 0; ip < mc; ip += mr) {
    const int m = (int)std::min<int64_t>(mr, mc - ip);
    float* dst = Ap + ip * kc;
    if (!transA) {
      for (int r = 0; r < m; ++r) {
        const float* src = A + (i0 + ip + r) * lda + k0;
        for (int64_t k = 0; k < kc; ++k) dst[k * mr + r] = src[k];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = A + (k0 + k) * lda + i0 + ip;
        for (int r = 0; r < m; ++r) dst[k * mr + r] = src[r];
      }
    }
    for (int r = m; r < mr; ++r)
      for (int64_t k = 0; k < kc; ++k) dst[k * mr + r] = 0.0f;
  }
}

void pack_B(const KernelDesc& kd, bool transB, const float* B, int64_t ldb, int64_t k0, int64_t kc,
            int64_t j0, int64_t nc, float* Bp) {
  const int nr = kd.nr;
  for (int64_t jp = 0; jp < nc; jp += nr) {
    const int n = (int)std::min<int64_t>(nr, nc - jp);
    float* dst = Bp + jp * kc;
    if (!transB) {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = B + (k0 + k) * ldb + j0 + jp;
        float* d = dst + k * nr;
        int j = 0;
        for (; j < n; ++j) d[j] = src[j];
        for (; j < nr; ++j) d[j] = 0.0f;
      }
    } else {
      for (int j = 0; j < n; ++j) {
        const float* src = B + (j0 + jp + j) * ldb + k0;
        for (int64_t k = 0; k < kc; ++k) dst[k * nr + j] = src[k];
      }
      for (int j = n; j < nr; ++j)
        for (int64_t k = 0; k < kc; ++k) dst[k * nr + j] = 0.0f;
    }
  }
}

struct AlignedBuffer {
  float* ptr = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      std::free(ptr);
      ptr = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
      cap = n;
    }
    return ptr;
  }
  ~AlignedBuffer() { std::free(ptr); }
};

// One thread's share: the sub-problem rows [i_begin, i_end) x columns [j_begin, j_end).
void sgemm_serial(const KernelDesc& kd, bool transA, bool transB, int64_t i_begin, int64_t i_end,
                  int64_t j_begin, int64_t j_end, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  thread_local AlignedBuffer bufA, bufB;
  const int64_t MC = kd.mc, NC = kd.nc;
  float* Ap = bufA.get(MC * KC);
  float* Bp = bufB.get(NC * KC);
  for (int64_t jc = j_begin; jc < j_end; jc += NC) {
    const int64_t nc = std::min(NC, j_end - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      const float beta_eff = pc == 0 ? beta : 1.0f;
      pack_B(kd, transB, B, ldb, pc, kc, jc, nc, Bp);
      for (int64_t ic = i_begin; ic < i_end; ic += MC) {
        const int64_t mc = std::min(MC, i_end - ic);
        pack_A(kd, transA, A, lda, ic, mc, pc, kc, Ap);
        for (int64_t jr = 0; jr < nc; jr += kd.nr) {
          const int n = (int)std::min<int64_t>(kd.nr, nc - jr);
          for (int64_t ir = 0; ir < mc; ir += kd.mr) {
            const int m = (int)std::min<int64_t>(kd.mr, mc - ir);
            kd.kernel(kc, Ap + ir * kc, Bp + jr * kc, C + (ic + ir) * ldc + jc + jr, ldc, m, n, alpha,
                      beta_eff);
          }
        }
      }
    }
  }
}

}  // namespace

void sgemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int threads) {
  if (M <= 0 || N <= 0) return;
  const KernelDesc& kd = *g_kernel;
  if (K <= 0) {  // C = beta * C
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta != 0.0f ? beta * C[i * ldc + j] : 0.0f;
    return;
  }
  // Small problems and calls from inside a parallel region stay on the calling thread.
  const double flops = 2.0 * M * N * K;
  if (threads <= 1 || in_parallel() || flops < 4e6) {
    sgemm_serial(kd, transA, transB, 0, M, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const bool split_rows = M > N;
#pragma omp parallel num_threads(threads)
  {
    const int parts = team_size(), part = thread_id();
    int64_t b, e;
    if (split_rows) {
      split_range(M, parts, part, kd.mr, &b, &e);
      if (b < e) sgemm_serial(kd, transA, transB, b, e, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    } else {
      split_range(N, parts, part, kd.nr, &b, &e);
      if (b < e) sgemm_serial(kd, transA, transB, 0, M, b, e, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
  }
}

const char* sgemm_kernel_name() {
  return g_kernel->name;
}

SgemmMicroKernel sgemm_micro_kernel() {
  const KernelDesc& kd = *g_kernel;
  return SgemmMicroKernel{kd.name, kd.mr, kd.nr, KC, kd.mc, kd.nc, kd.kernel};
}

bool sgemm_select_kernel(const char* name) {
  __builtin_cpu_init();
  if (!std::strcmp(name, "avx512") && __builtin_cpu_supports("avx512f"))
    g_kernel = &kAvx512;
  else if (!std::strcmp(name, "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    g_kernel = &kAvx2;
  else if (!std::strcmp(name, "generic"))
    g_kernel = &kGeneric;
  else
    return false;
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// Peak: each thread runs 24 independent FMA chains (enough to cover latency x pipes on current cores) over
// registers only, for a fixed number of iterations; peak = 2 * lanes * chains * iters * threads / time.

namespace {
__attribute__((target("avx512f,fma"))) double fma_loop_512(int64_t iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) double fma_loop_256(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  float out[8];
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  _mm256_storeu_ps(out, s);
  return out[0];
}
}  // namespace

double cpu_fma_peak_gflops(int threads) {
  __builtin_cpu_init();
  const bool w512 = __builtin_cpu_supports("avx512f");
  const bool w256 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!w512 && !w256) return 0.0;
  const int64_t iters = 20'000'000;
  const double flops_per_thread = w512 ? 2.0 * 16 * 24 * iters : 2.0 * 8 * 12 * iters;
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    volatile double sink = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
    {
      const double r = w512 ? fma_loop_512(iters) : fma_loop_256(iters);
#pragma omp critical
      sink = sink + r;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flops_per_thread * threads / s / 1e9);
  }
  return best;
}

}  // namespace pt
