// Blocked single-precision GEMM (BLIS-style loop nest) with runtime-selected micro-kernels.
//
// Loop nest per thread: jc (NC columns of C) > pc (KC of the shared dimension, B block packed into
// KC x NC panels of NR columns: half the core's L2, 1 MiB on a 2 MiB L2) > ic (MC rows, A block
// packed into MR-row panels) > ir > jr (MR x NR register tile). The innermost loop keeps one A panel
// (KC x MR) in L1 and streams the B panels from L2, which the AVX-512 and AVX2 micro-kernels prefetch
// ahead (measured on a 2-core Xeon with 48 KiB L1: 25-30% faster than keeping the larger B panel in L1
// beside streamed A panels, where the two evicted each other).
// Packing zero-pads partial panels, so the micro-kernels always run full tiles and only their stores are
// masked. Threads split C by columns (or by rows when M > N); each thread packs its own panels, so
// nothing is shared and every C element is summed in a fixed order (deterministic): per KC block from
// zero in k order, then added to C. Neither blocking sizes nor loop order change that order.
//
// Micro-kernels: AVX-512 8x32 (16 zmm accumulators), AVX2 6x16 (12 ymm accumulators), portable 4x16.
// Compiled with target attributes, so one binary runs on any x86-64 and picks the widest at load time.
#include "priortune/gemm.h"

#include <immintrin.h>
#include <unistd.h>
#ifdef __APPLE__
#include <sys/sysctl.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "priortune/host_array.h"
#include "priortune/parallel.h"

namespace pt {
namespace {

constexpr int64_t KC = 256;

using MicroKernel = void (*)(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int m,
                             int n, float alpha, float beta);

struct KernelDesc {
  const char* name;
  int mr, nr;
  int64_t mc;
  MicroKernel kernel;
  bool avx2_packing;  // pack with AVX2 register transposes and copies (the portable kernel packs portably)
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
  for (int r = 0; r < m; ++r) {  // C is read and written last: start its lines on their way now
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + 16), _MM_HINT_T0);
  }
  for (int64_t k = 0; k < kc; ++k) {
    // B streams from L2 (the A panel stays in L1): fetch 16 steps ahead. Past the panel's end this
    // prefetches the next panel, or nothing (a prefetch never faults).
    _mm_prefetch(reinterpret_cast<const char*>(Bp + 16 * 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(Bp + 16 * 32 + 16), _MM_HINT_T0);
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
    _mm_prefetch(reinterpret_cast<const char*>(Bp + 16 * 16), _MM_HINT_T0);  // one line a step, 16 ahead
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

const KernelDesc kAvx512{"avx512", 8, 32, 8 * 24, kernel_avx512, true};
const KernelDesc kAvx2{"avx2", 6, 16, 6 * 32, kernel_avx2, true};
const KernelDesc kGeneric{"generic", 4, 16, 4 * 32, kernel_generic, false};

const KernelDesc* detect_kernel() {
  const char* forced = std::getenv("PRIORTUNE_GEMM_KERNEL");
  const bool has512 = sgemm_kernel_supported("avx512");
  const bool has2 = sgemm_kernel_supported("avx2");
  if (forced) {
    if (!std::strcmp(forced, "generic")) return &kGeneric;
    if (!std::strcmp(forced, "avx2") && has2) return &kAvx2;
  }
  if (has512) return &kAvx512;
  if (has2) return &kAvx2;
  return &kGeneric;
}

const KernelDesc* g_kernel = detect_kernel();

// Columns of a B block (KC x NC): half the L2 of a core, so that the streamed B panels stay there beside the
// A block and C tiles (measured on a 2 MiB L2: NC 1024 runs 5-15% faster than 512, 10-25% than 128). The
// L2 size from the C library (cpuid on x86 glibc) or, on macOS, sysctl hw.l2cachesize; 1 MiB where neither
// says.
int64_t block_cols(const KernelDesc& kd) {
  static const int64_t l2 = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return static_cast<int64_t>(v);
#elif defined(__APPLE__)
    uint64_t v = 0;  // a 32- or 64-bit value: either fills its low bytes (little-endian x86)
    size_t len = sizeof(v);
    if (sysctlbyname("hw.l2cachesize", &v, &len, nullptr, 0) == 0 && v > 0) return static_cast<int64_t>(v);
#endif
    return int64_t{1} << 20;
  }();
  const int64_t cols = l2 / 2 / (KC * static_cast<int64_t>(sizeof(float)));
  return std::clamp<int64_t>(cols / kd.nr * kd.nr, 4 * kd.nr, 64 * kd.nr);
}

// ---------------------------------------------------------------------------------------------------------
// Packing. Element (i, k) of op(A) and (k, j) of op(B), honouring the transposes. A row-major operand read
// along k (A untransposed, B transposed: the linear layers' weights) is packed by 8 x 8 register transposes
// with the AVX-512 and AVX2 kernels (every CPU with AVX-512 has AVX2; scalar strided stores cost about a
// fifth of a GEMM's time); the other orientation is already k-major, so its panels are row copies. The
// portable kernel packs with portable loops (so selecting it tests them). Packing moves values only:
// results do not depend on it.

const float kZeroRow[8] = {};

// dst[c * dld + r] = src[r][c] for r, c < 8, only r < w stored (w <= 8).
__attribute__((target("avx2"))) inline void transpose8(const float* const src[8], float* dst, int64_t dld,
                                                       int w) {
  const __m256 t0 = _mm256_unpacklo_ps(_mm256_loadu_ps(src[0]), _mm256_loadu_ps(src[1]));
  const __m256 t1 = _mm256_unpackhi_ps(_mm256_loadu_ps(src[0]), _mm256_loadu_ps(src[1]));
  const __m256 t2 = _mm256_unpacklo_ps(_mm256_loadu_ps(src[2]), _mm256_loadu_ps(src[3]));
  const __m256 t3 = _mm256_unpackhi_ps(_mm256_loadu_ps(src[2]), _mm256_loadu_ps(src[3]));
  const __m256 t4 = _mm256_unpacklo_ps(_mm256_loadu_ps(src[4]), _mm256_loadu_ps(src[5]));
  const __m256 t5 = _mm256_unpackhi_ps(_mm256_loadu_ps(src[4]), _mm256_loadu_ps(src[5]));
  const __m256 t6 = _mm256_unpacklo_ps(_mm256_loadu_ps(src[6]), _mm256_loadu_ps(src[7]));
  const __m256 t7 = _mm256_unpackhi_ps(_mm256_loadu_ps(src[6]), _mm256_loadu_ps(src[7]));
  // s_c holds column c (rows 0-3) in its low half and column c + 4 in its high half; u_c rows 4-7.
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u0 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 col[8] = {_mm256_permute2f128_ps(s0, u0, 0x20), _mm256_permute2f128_ps(s1, u1, 0x20),
                         _mm256_permute2f128_ps(s2, u2, 0x20), _mm256_permute2f128_ps(s3, u3, 0x20),
                         _mm256_permute2f128_ps(s0, u0, 0x31), _mm256_permute2f128_ps(s1, u1, 0x31),
                         _mm256_permute2f128_ps(s2, u2, 0x31), _mm256_permute2f128_ps(s3, u3, 0x31)};
  if (w == 8) {
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + c * dld, col[c]);
  } else {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int c = 0; c < 8; ++c) _mm256_maskstore_ps(dst + c * dld, mask, col[c]);
  }
}

// dst[k * ld + r] = src[r * lds + k] for k < kc, r < w (w <= 8); rows r >= n read as zeros.
__attribute__((target("avx2"))) void pack_rows_transposed(const float* src, int64_t lds, int n, int64_t kc,
                                                          float* dst, int64_t ld, int w) {
  const float* rows[8];
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int r = 0; r < 8; ++r) rows[r] = r < n ? src + r * lds + k : kZeroRow;
    transpose8(rows, dst + k * ld, ld, w);
  }
  for (; k < kc; ++k)
    for (int r = 0; r < w; ++r) dst[k * ld + r] = r < n ? src[r * lds + k] : 0.0f;
}

// dst[k * ld + c] = src[k * lds + c] for k < kc, c < n, zeros for n <= c < ld (ld a multiple of 8, n <= ld).
__attribute__((target("avx2"))) void pack_rows_copied(const float* src, int64_t lds, int n, int64_t kc,
                                                      float* dst, int64_t ld) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t k = 0; k < kc; ++k, src += lds, dst += ld) {
    for (int c = 0; c < ld; c += 8) {
      const int left = n - c;
      const __m256 v = left >= 8 ? _mm256_loadu_ps(src + c)
                       : left > 0
                           ? _mm256_maskload_ps(src + c, _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane))
                           : _mm256_setzero_ps();
      _mm256_storeu_ps(dst + c, v);
    }
  }
}

// Panels of w lines (A's rows or B's columns: lines [l0, l0 + count) of the operand), each kc x w k-major,
// the lines past `count` zero. An operand stored with lines along k (row-major, element (line, k) at
// M[line * ld + k]: A untransposed, B transposed) is transposed; one stored k-major (M[k * ld + line])
// is copied row by row. avx2_packing: by AVX2 register transposes and copies (the kernel descriptor's flag).
void pack_panels(bool avx2_packing, bool lines_along_k, const float* M, int64_t ld, int64_t l0, int64_t count,
                 int64_t k0, int64_t kc, int w, float* out) {
  for (int64_t p = 0; p < count; p += w) {
    const int n = (int)std::min<int64_t>(w, count - p);
    float* dst = out + p * kc;
    if (lines_along_k) {
      const float* src = M + (l0 + p) * ld + k0;
      if (avx2_packing) {
        for (int g = 0; g < w; g += 8) {
          const int rn = std::clamp(n - g, 0, 8);
          pack_rows_transposed(rn ? src + g * ld : src, ld, rn, kc, dst + g, w, std::min(8, w - g));
        }
      } else {
        for (int r = 0; r < w; ++r)
          for (int64_t k = 0; k < kc; ++k) dst[k * w + r] = r < n ? src[r * ld + k] : 0.0f;
      }
    } else {
      const float* src = M + k0 * ld + l0 + p;
      if (avx2_packing && w % 8 == 0) {
        pack_rows_copied(src, ld, n, kc, dst, w);
      } else {
        for (int64_t k = 0; k < kc; ++k) {
          std::memcpy(dst + k * w, src + k * ld, n * sizeof(float));
          std::fill(dst + k * w + n, dst + (k + 1) * w, 0.0f);
        }
      }
    }
  }
}

// SgemmMicroKernel::pack_rows, with and without the AVX2 packing.
void pack_rows_fast(const float* M, int64_t ld, int64_t r0, int64_t count, int64_t k0, int64_t kc, int w,
                    float* out) {
  pack_panels(true, true, M, ld, r0, count, k0, kc, w, out);
}

void pack_rows_portable(const float* M, int64_t ld, int64_t r0, int64_t count, int64_t k0, int64_t kc, int w,
                        float* out) {
  pack_panels(false, true, M, ld, r0, count, k0, kc, w, out);
}

void pack_A(const KernelDesc& kd, bool transA, const float* A, int64_t lda, int64_t i0, int64_t mc,
            int64_t k0, int64_t kc, float* Ap) {
  pack_panels(kd.avx2_packing, !transA, A, lda, i0, mc, k0, kc, kd.mr, Ap);
}

void pack_B(const KernelDesc& kd, bool transB, const float* B, int64_t ldb, int64_t k0, int64_t kc,
            int64_t j0, int64_t nc, float* Bp) {
  pack_panels(kd.avx2_packing, transB, B, ldb, j0, nc, k0, kc, kd.nr, Bp);
}

// A thread's packing buffer, grown as needed (host_alloc: 64-byte aligned; std::bad_alloc, not a null
// pointer, when memory runs out).
struct AlignedBuffer {
  float* ptr = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      host_free(ptr);
      ptr = nullptr;
      cap = 0;
      ptr = static_cast<float*>(host_alloc(n * sizeof(float)));
      cap = n;
    }
    return ptr;
  }
  ~AlignedBuffer() { host_free(ptr); }
};

// One thread's share: the sub-problem rows [i_begin, i_end) x columns [j_begin, j_end).
void sgemm_serial(const KernelDesc& kd, bool transA, bool transB, int64_t i_begin, int64_t i_end,
                  int64_t j_begin, int64_t j_end, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  thread_local AlignedBuffer bufA, bufB;
  const int64_t MC = kd.mc, NC = block_cols(kd);
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
        for (int64_t ir = 0; ir < mc; ir += kd.mr) {
          const int m = (int)std::min<int64_t>(kd.mr, mc - ir);
          for (int64_t jr = 0; jr < nc; jr += kd.nr) {
            const int n = (int)std::min<int64_t>(kd.nr, nc - jr);
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
  return SgemmMicroKernel{
      kd.name, kd.mr,          kd.nr,     KC,
      kd.mc,   block_cols(kd), kd.kernel, kd.avx2_packing ? pack_rows_fast : pack_rows_portable};
}

bool sgemm_kernel_supported(const char* name) {
  __builtin_cpu_init();
  if (!std::strcmp(name, "avx512")) return __builtin_cpu_supports("avx512f");
  if (!std::strcmp(name, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return !std::strcmp(name, "generic");
}

bool sgemm_select_kernel(const char* name) {
  if (!sgemm_kernel_supported(name)) return false;
  g_kernel = !std::strcmp(name, "avx512") ? &kAvx512 : !std::strcmp(name, "avx2") ? &kAvx2 : &kGeneric;
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
