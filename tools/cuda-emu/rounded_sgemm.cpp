// For the emulated-CUDA check (check.cpp): a CPU reference that reads its GEMM operands rounded as the
// device stages them, so that bf16/tf32 device results can be held to tolerances that catch real errors.
// scripts/cuda-emu.mjs compiles kernels/cpu/matmul.cpp and kernels/cpu/lm_head.cpp (linear layers, LM head)
// with -Dsgemm=sgemm_rounded and kernels/cpu/attention.cpp with -Dsgemm=sgemm_rounded_attention, which
// routes their GEMMs here; everything else calls pt::sgemm directly. The rounding is off unless check.cpp
// turns it on, and the summation order stays the CPU GEMM's, not the tensor cores'.
#include <cstdint>
#include <cstring>
#include <vector>

#include "priortune/gemm.h"

namespace pt {

int g_round_mode = 0;  // linear layers and LM head: 0 none, 1 bf16 (nearest even), 2 tf32 (nearest away)
bool g_round_attention = false;  // attention products: bf16 (AttentionPrecision::BF16)

void sgemm_rounded(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int threads);
void sgemm_rounded_attention(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                             int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                             int threads);

namespace {
float rounded(float f, int mode) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;
  u = mode == 1 ? (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u : (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}
std::vector<float> rounded_copy(const float* p, int64_t rows, int64_t cols, int64_t ld, int mode) {
  std::vector<float> v((rows - 1) * ld + cols);
  for (size_t i = 0; i < v.size(); ++i) v[i] = rounded(p[i], mode);
  return v;
}
void gemm(int mode, bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int threads) {
  if (!mode || M == 0 || N == 0 || K == 0)
    return sgemm(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, threads);
  const std::vector<float> a = rounded_copy(A, tA ? K : M, tA ? M : K, lda, mode);
  const std::vector<float> b = rounded_copy(B, tB ? N : K, tB ? K : N, ldb, mode);
  sgemm(tA, tB, M, N, K, alpha, a.data(), lda, b.data(), ldb, beta, C, ldc, threads);
}
}  // namespace

void sgemm_rounded(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int threads) {
  gemm(g_round_mode, tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, threads);
}
void sgemm_rounded_attention(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                             int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                             int threads) {
  gemm(g_round_attention ? 1 : 0, tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, threads);
}

}  // namespace pt
