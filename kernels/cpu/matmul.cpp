// Linear layer forward, input backward and weight/bias gradients (+=) on the blocked GEMM; see ops.h.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "priortune/gemm.h"
#include "priortune/ops.h"
#include "priortune/vecmath.h"

namespace pt {
namespace {

// A few rows (token-by-token generation): out[n, o] = x[n] . W[o]. Packing W for the GEMM would cost more
// than the product itself, and W's rows are contiguous, so plain dot products stream it once.
PT_MULTIVERSION void matmul_rows_block(float* out, const float* x, const float* W, const float* bias,
                                       int64_t N, int64_t C, int64_t OC, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* w = W + o * C;
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + n * C;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) s += xr[c] * w[c];
      out[n * OC + o] = s + (bias ? bias[o] : 0.0f);
    }
  }
}

// Up to 32 rows with AVX-512 (decoding a batch token by token): out[n, o] for a tile of NR rows of x and OR
// rows of W in 16-lane accumulators (NR x OR of them, the W vectors loaded once for the NR rows), c in order
// with a masked last step, then each accumulator's lanes summed by the same fixed tree. Every out[n, o] is
// the same sum whatever tile it falls in, so a row's result does not depend on the others in the batch.
template <int NR, int OR>
__attribute__((target("avx512f,fma"))) inline void dots_avx512(float* out, int64_t ldo, const float* x,
                                                               const float* W, int64_t C, const float* bias) {
  __m512 acc[NR][OR];
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < OR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m =
        C - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1u);
    __m512 wv[OR];
#pragma GCC unroll 4
    for (int j = 0; j < OR; ++j) wv[j] = _mm512_maskz_loadu_ps(m, W + j * C + c);
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + i * C + c);
#pragma GCC unroll 4
      for (int j = 0; j < OR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < OR; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

// The full 4 x 4 tile with its 16 accumulators named, so that they stay in registers (the compiler keeps the
// arrays above in memory): the same operations, so the same sums, as dots_avx512<4, 4>.
__attribute__((target("avx512f,fma"))) void dots4x4_avx512(float* out, int64_t ldo, const float* x,
                                                           const float* W, int64_t C, const float* bias) {
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
         a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  const float *w0 = W, *w1 = W + C, *w2 = W + 2 * C, *w3 = W + 3 * C;
  const float *x0 = x, *x1 = x + C, *x2 = x + 2 * C, *x3 = x + 3 * C;
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m =
        C - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1u);
    const __m512 v0 = _mm512_maskz_loadu_ps(m, w0 + c), v1 = _mm512_maskz_loadu_ps(m, w1 + c),
                 v2 = _mm512_maskz_loadu_ps(m, w2 + c), v3 = _mm512_maskz_loadu_ps(m, w3 + c);
    __m512 u = _mm512_maskz_loadu_ps(m, x0 + c);
    a00 = _mm512_fmadd_ps(u, v0, a00);
    a01 = _mm512_fmadd_ps(u, v1, a01);
    a02 = _mm512_fmadd_ps(u, v2, a02);
    a03 = _mm512_fmadd_ps(u, v3, a03);
    u = _mm512_maskz_loadu_ps(m, x1 + c);
    a10 = _mm512_fmadd_ps(u, v0, a10);
    a11 = _mm512_fmadd_ps(u, v1, a11);
    a12 = _mm512_fmadd_ps(u, v2, a12);
    a13 = _mm512_fmadd_ps(u, v3, a13);
    u = _mm512_maskz_loadu_ps(m, x2 + c);
    a20 = _mm512_fmadd_ps(u, v0, a20);
    a21 = _mm512_fmadd_ps(u, v1, a21);
    a22 = _mm512_fmadd_ps(u, v2, a22);
    a23 = _mm512_fmadd_ps(u, v3, a23);
    u = _mm512_maskz_loadu_ps(m, x3 + c);
    a30 = _mm512_fmadd_ps(u, v0, a30);
    a31 = _mm512_fmadd_ps(u, v1, a31);
    a32 = _mm512_fmadd_ps(u, v2, a32);
    a33 = _mm512_fmadd_ps(u, v3, a33);
  }
  const __m512 acc[4][4] = {
      {a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

template <int OR>
__attribute__((target("avx512f,fma"))) void rows_tile_avx512(float* out, const float* x, const float* W,
                                                             const float* bias, int64_t N, int64_t C,
                                                             int64_t OC, int64_t o) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4)
    if constexpr (OR == 4)
      dots4x4_avx512(out + n * OC + o, OC, x + n * C, W + o * C, C, bias);
    else
      dots_avx512<4, OR>(out + n * OC + o, OC, x + n * C, W + o * C, C, bias);
  switch (N - n) {
    case 3:
      dots_avx512<3, OR>(out + n * OC + o, OC, x + n * C, W + o * C, C, bias);
      break;
    case 2:
      dots_avx512<2, OR>(out + n * OC + o, OC, x + n * C, W + o * C, C, bias);
      break;
    case 1:
      dots_avx512<1, OR>(out + n * OC + o, OC, x + n * C, W + o * C, C, bias);
      break;
    default:
      break;
  }
}

__attribute__((target("avx512f,fma"))) void matmul_rows_avx512(float* out, const float* x, const float* W,
                                                               const float* bias, int64_t N, int64_t C,
                                                               int64_t OC, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) rows_tile_avx512<4>(out, x, W, bias ? bias + o : nullptr, N, C, OC, o);
  for (; o < o1; ++o) rows_tile_avx512<1>(out, x, W, bias ? bias + o : nullptr, N, C, OC, o);
}

}  // namespace

// The emulated CUDA check's reference (tools/cuda-emu) reads its GEMM operands rounded as the device does,
// by standing in for sgemm: built with PRIORTUNE_FEW_ROWS_REFERENCE, linear layers of more than 4 rows go
// through it, and those of at most 4 by plain dot products, as before the tiles below existed.
#ifdef PRIORTUNE_FEW_ROWS_REFERENCE
constexpr int64_t kFewRows = 4;
constexpr bool kFewRowTiles = false;
#else
constexpr int64_t kFewRows = 32;
constexpr bool kFewRowTiles = true;
#endif

void matmul_forward(float* out, const float* x, const float* W, const float* bias, int64_t N, int64_t C,
                    int64_t OC, int threads) {
  // Up to 32 rows stream W once: AVX-512 tiles with the GEMM's AVX-512 kernel, else plain dot products.
  if (N <= kFewRows) {
    const bool avx512 = kFewRowTiles && !std::strcmp(sgemm_kernel_name(), "avx512");
    const int64_t block = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o0 = 0; o0 < OC; o0 += block) {
      const int64_t o1 = std::min(OC, o0 + block);
      if (avx512)
        matmul_rows_avx512(out, x, W, bias, N, C, OC, o0, o1);
      else
        matmul_rows_block(out, x, W, bias, N, C, OC, o0, o1);
    }
    return;
  }
  if (bias) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OC; ++o) out[n * OC + o] = bias[o];
  }
  sgemm(false, true, N, OC, C, 1.0f, x, C, W, C, bias ? 1.0f : 0.0f, out, OC, threads);
}

}  // namespace pt

namespace pt {

void matmul_backward(float* dx, const float* dout, const float* W, int64_t N, int64_t C, int64_t OC,
                     float beta, int threads) {
  sgemm(false, false, N, C, OC, 1.0f, dout, OC, W, C, beta, dx, C, threads);
}

}  // namespace pt

namespace pt {

// dW via the GEMM with dout transposed (one pass over the N rows per output tile, deterministic); the bias
// as column sums with each thread owning a range of columns and adding the rows in order (in double: N is
// every token of the batch).
void matmul_backward_weights(float* dW, float* dbias, const float* dout, const float* x, int64_t N, int64_t C,
                             int64_t OC, int threads) {
  sgemm(true, false, OC, C, N, 1.0f, dout, OC, x, C, 1.0f, dW, C, threads);
  if (!dbias) return;
  const int64_t block = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t o0 = 0; o0 < OC; o0 += block) {
    const int64_t o1 = std::min(OC, o0 + block);
    double acc[block] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* d = dout + n * OC;
      for (int64_t o = o0; o < o1; ++o) acc[o - o0] += d[o];
    }
    for (int64_t o = o0; o < o1; ++o) dbias[o] += static_cast<float>(acc[o - o0]);
  }
}

}  // namespace pt
