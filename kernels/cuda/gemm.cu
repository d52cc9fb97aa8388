// Matrix products on CUDA (priortune/cuda_ops.h: gemm, to_bf16) and their self-test. Four kernels:
// gemm_mma_kernel (ldmatrix + mma.sync, the default for bf16 operands with 16-byte rows; described at its
// definition), gemm_pipe_kernel (cp.async + WMMA, the same operands), gemm_tc_kernel (register-staged WMMA:
// any operands, BF16 and TF32) and gemm_fp32_kernel (FP32 verification path).
//
// gemm_tc_kernel (BF16 and TF32 tensor cores, WMMA): a 256-thread block computes a 128 x 128 tile of C;
// its 8 warps sit 2 (rows) x 4 (columns), each owning 64 x 32 outputs as 4 x 2 fragments of 16 x 16 with
// fp32 accumulators. K advances in BK-wide steps (BF16: BK = 32, m16n16k16; TF32: BK = 16, m16n16k8, so
// both fit two stages in 48 KB of static shared memory) through two shared-memory stages, one
// __syncthreads per step: while the warps multiply one stage, the next step's operands are loaded into
// registers (raw, 16 bytes a chunk), then rounded (bf16: RN-even; tf32: cvt.rna) and stored into the
// other stage. A is staged as [m][k]; B as [n][k] for NT (a col_major matrix_b) and as [k][n] for NN (a
// row_major matrix_b), so both layouts read 16-byte pieces of rows, coalesced, with no transpose. Stage
// rows are padded by 16 bytes (BK + 8 bf16, BK + 4 floats, 128 + 8 bf16, 128 + 4 floats): the eight
// 16-byte rows of a fragment load fall in distinct banks and every fragment pointer stays 32-byte aligned.
// Edges and alignment: tile elements outside the operand ([0, M) x [0, K), B's [0, N) x [0, K)) are
// stored as zeros, so fragments need no masking. Steps whose tiles are entirely inside and whose operand
// allows 16-byte loads (base 16-byte aligned, leading dimension a multiple of the chunk: checked on the
// host) are prefetched with vector loads; any other step is copied after the MMAs with per-chunk bounds
// checks (a vector load for a whole aligned chunk, else element by element). The epilogue goes through a
// per-warp 16 x 20 shared scratch (aliasing the finished stages): store_matrix_sync there, then a
// bounds-checked copy out that adds bias and, when beta == 1, the old C (beta == 0 never reads C).
// N tiles are on blockIdx.x, M tiles on blockIdx.y (a grid-stride loop past 65535 M tiles).
// gemm_fp32_kernel (FP32 verification path): 64 x 64 tiles, BK = 16, 4 x 4 outputs a thread with fp32
// FMA, operands staged k-major in shared memory through scalar bounds-checked loads.
#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's signature (reached through the runtime)
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "cublaslt.cuh"
#include "mma.cuh"
#include "priortune/cuda_ops.h"
#include "priortune/gemm.h"

namespace pt {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;  // 8 warps
constexpr int kBM = 128, kBN = 128;
constexpr int kWarpM = 64, kWarpN = 32;  // warps: 2 x 4
constexpr int kLdScr = 20;               // per-warp epilogue scratch: 16 x 20 floats
constexpr int kMaxGridY = 65535;
constexpr int64_t kMaxDim = INT_MAX - 1024;  // M, N, K: tile arithmetic stays within int

// Per-precision tensor-core configuration. T is the shared-memory operand type.
template <class T>
struct Tc;
template <>
struct Tc<__nv_bfloat16> {
  static constexpr int kBK = 32, kWK = 16, kPad = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  template <class Layout>
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, Layout>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};
template <>
struct Tc<float> {
  static constexpr int kBK = 16, kWK = 8, kPad = 4;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  template <class Layout>
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, Layout>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
};

// Reads one 16-byte chunk (4 floats or 8 bf16) starting at p, of which the first `valid` elements are in
// bounds (valid <= 0: none). The raw bits land in w; elements past `valid` are zero.
template <class G>
__device__ __forceinline__ void load_chunk(uint32_t (&w)[4], const G* p, int valid, bool vec) {
  if constexpr (sizeof(G) == 4) {
    if (vec && valid >= 4) {
      const uint4 t = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = t.x, w[1] = t.y, w[2] = t.z, w[3] = t.w;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) w[e] = e < valid ? __float_as_uint(__ldg(p + e)) : 0u;
    }
  } else {
    static_assert(sizeof(G) == 2, "chunk elements are fp32 or bf16");
    if (vec && valid >= 8) {
      const uint4 t = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = t.x, w[1] = t.y, w[2] = t.z, w[3] = t.w;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t lo = 2 * e < valid ? __ldg(p + 2 * e) : 0u;
        const uint32_t hi = 2 * e + 1 < valid ? __ldg(p + 2 * e + 1) : 0u;
        w[e] = lo | (hi << 16);
      }
    }
  }
}

// Converts a raw chunk of G to T (bf16: round to nearest even; float: round to tf32) and stores it at s.
template <class T, class G>
__device__ __forceinline__ void store_chunk(T* s, const uint32_t (&w)[4]) {
  if constexpr (sizeof(T) == 2 && sizeof(G) == 2) {  // bf16 -> bf16: as is
    *reinterpret_cast<uint4*>(s) = make_uint4(w[0], w[1], w[2], w[3]);
  } else if constexpr (sizeof(T) == 2) {  // fp32 -> bf16
    *reinterpret_cast<uint2*>(s) = make_uint2(pack_bf16x2(__uint_as_float(w[0]), __uint_as_float(w[1])),
                                              pack_bf16x2(__uint_as_float(w[2]), __uint_as_float(w[3])));
  } else {  // fp32 -> tf32 (kept in fp32 storage with the low 13 mantissa bits zero)
    static_assert(sizeof(G) == 4, "TF32 needs fp32 operands");
    *reinterpret_cast<float4*>(s) = make_float4(
        wmma::__float_to_tf32(__uint_as_float(w[0])), wmma::__float_to_tf32(__uint_as_float(w[1])),
        wmma::__float_to_tf32(__uint_as_float(w[2])), wmma::__float_to_tf32(__uint_as_float(w[3])));
  }
}

// One R x CC operand tile (CC contiguous in global memory and in shared memory), split into 16-byte
// chunks over the block's threads.
template <int R, int CC, class G>
struct TileRegs {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(G));
  static constexpr int kPerRow = CC / kVec;
  static constexpr int kPer = R * kPerRow / kThreads;
  static_assert(CC % kVec == 0 && (R * kPerRow) % kThreads == 0, "tile must split evenly into chunks");
  uint32_t w[kPer][4];  // raw chunks between load_fast and store

  __device__ __forceinline__ static int row(int i) {
    return (static_cast<int>(threadIdx.x) + i * kThreads) / kPerRow;
  }
  __device__ __forceinline__ static int col(int i) {
    return (static_cast<int>(threadIdx.x) + i * kThreads) % kPerRow * kVec;
  }
  // The whole tile in bounds and its chunks 16-byte aligned: vector loads into registers.
  __device__ __forceinline__ void load_fast(const G* base, int64_t ld) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const uint4 t = __ldg(reinterpret_cast<const uint4*>(base + row(i) * ld + col(i)));
      w[i][0] = t.x, w[i][1] = t.y, w[i][2] = t.z, w[i][3] = t.w;
    }
  }
  template <class T>
  __device__ __forceinline__ void store(T* s, int lds) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i) store_chunk<T, G>(s + row(i) * lds + col(i), w[i]);
  }
  // Any tile: bounds-checked loads (zero outside rows_valid x cols_valid), converted and stored at once.
  template <class T>
  __device__ __forceinline__ static void copy_checked(const G* base, int64_t ld, int rows_valid,
                                                      int cols_valid, bool vec, T* s, int lds) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int r = row(i), c = col(i);
      uint32_t t[4];
      load_chunk<G>(t, base + r * ld + c, r < rows_valid ? cols_valid - c : 0, vec);
      store_chunk<T, G>(s + r * lds + c, t);
    }
  }
};

// The epilogue of both tensor-core kernels: a warp's FM x FN accumulator fragments (output rows row0 + 16 i,
// columns col0 + 16 j) go through the warp's 16 x kLdScr scratch in shared memory, then to C with bounds
// checks, bias added and, when beta_one, the old C (beta == 0 never reads C).
template <class Acc, int FM, int FN>
__device__ __forceinline__ void store_acc(const Acc (&acc)[FM][FN], float* scr, int lane, int row0, int col0,
                                          float* C, int64_t ldc, const float* __restrict__ bias, int M, int N,
                                          bool beta_one) {
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(scr, acc[i][j], kLdScr, wmma::mem_row_major);
      __syncwarp();
#pragma unroll 1
      for (int t = 0; t < 8; ++t) {
        const int r = 2 * t + lane / 16, c = lane % 16;
        const int gm = row0 + i * 16 + r, gn = col0 + j * 16 + c;
        if (gm < M && gn < N) {
          float v = scr[r * kLdScr + c];
          if (bias) v += __ldg(bias + gn);
          float* dst = C + static_cast<int64_t>(gm) * ldc + gn;
          if (beta_one) v += *dst;
          *dst = v;
        }
      }
      __syncwarp();
    }
  }
}

// C[M, N] (= or +=) A[M, K] . op(B) (+ bias). T: shared-memory operand type (bf16, or float for TF32);
// GA, GB: A's and B's global element types (uint16_t bf16 bits, or float); NT: B is [N, K], else [K, N].
// About 200-230 registers a thread, so one block per SM: the next step's loads overlap a whole step of
// MMAs (limiting to 128 registers for two blocks spilled).
template <class T, bool NT, class GA, class GB>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_tc_kernel(const GA* __restrict__ A, int64_t lda, const GB* __restrict__ B, int64_t ldb, float* C,
                   int64_t ldc, const float* __restrict__ bias, int M, int N, int K, bool beta_one,
                   bool a_vec, bool b_vec) {
  using Cfg = Tc<T>;
  using Layout = typename std::conditional<NT, wmma::col_major, wmma::row_major>::type;
  constexpr int kBK = Cfg::kBK, kWK = Cfg::kWK;
  constexpr int kLdA = kBK + Cfg::kPad;                         // A stage: [kBM][kLdA]
  constexpr int kLdB = NT ? kBK + Cfg::kPad : kBN + Cfg::kPad;  // B stage: NT [kBN][kLdB], NN [kBK][kLdB]
  constexpr int kStageA = kBM * kLdA, kStageB = (NT ? kBN : kBK) * kLdB;
  constexpr int kPipeBytes = 2 * (kStageA + kStageB) * static_cast<int>(sizeof(T));
  constexpr int kScrBytes = (kThreads / 32) * 16 * kLdScr * static_cast<int>(sizeof(float));
  constexpr int kSmemBytes = kPipeBytes > kScrBytes ? kPipeBytes : kScrBytes;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
  static_assert((kStageA * sizeof(T)) % 128 == 0 && (kStageB * sizeof(T)) % 128 == 0, "stage alignment");
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);  // [2][kStageA]
  T* Bs = As + 2 * kStageA;            // [2][kStageB]

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int wm = warp / (kBN / kWarpN), wn = warp % (kBN / kWarpN);
  const int n0 = static_cast<int>(blockIdx.x) * kBN;
  const int tiles_m = (M + kBM - 1) / kBM;
  const int kt_count = (K + kBK - 1) / kBK;
  const bool b_fast_cols = b_vec && n0 + kBN <= N;

  TileRegs<kBM, kBK, GA> ra;                        // A step: [kBM][kBK]
  TileRegs<NT ? kBN : kBK, NT ? kBK : kBN, GB> rb;  // B step: NT [kBN][kBK], NN [kBK][kBN]

  for (int tm = static_cast<int>(blockIdx.y); tm < tiles_m; tm += static_cast<int>(gridDim.y)) {
    const int m0 = tm * kBM;
    const GA* a_tile = A + static_cast<int64_t>(m0) * lda;
    const bool a_fast_rows = a_vec && m0 + kBM <= M;
    const GB* b_tile = NT ? B + static_cast<int64_t>(n0) * ldb : B + n0;
    const int64_t b_kstride = NT ? 1 : ldb;  // elements from one k to the next in B

    // A step that is fully in bounds with aligned chunks (the interior of a large product) is prefetched
    // into registers before the previous step's MMAs and stored after them; any other step is copied with
    // bounds checks after them (no raw registers live across the MMAs on that path).
    auto fast_a = [&](int kt) { return a_fast_rows && (kt + 1) * kBK <= K; };
    auto fast_b = [&](int kt) { return b_fast_cols && (kt + 1) * kBK <= K; };
    auto prefetch = [&](int kt) {
      if (fast_a(kt)) ra.load_fast(a_tile + kt * kBK, lda);
      if (fast_b(kt)) rb.load_fast(b_tile + kt * kBK * b_kstride, ldb);
    };
    auto commit = [&](int stage, int kt) {
      const int k0 = kt * kBK;
      T* sa = As + stage * kStageA;
      T* sb = Bs + stage * kStageB;
      if (fast_a(kt))
        ra.store(sa, kLdA);
      else
        ra.copy_checked(a_tile + k0, lda, M - m0, K - k0, a_vec, sa, kLdA);
      if (fast_b(kt))
        rb.store(sb, kLdB);
      else if (NT)
        rb.copy_checked(b_tile + k0, ldb, N - n0, K - k0, b_vec, sb, kLdB);
      else
        rb.copy_checked(b_tile + k0 * b_kstride, ldb, K - k0, N - n0, b_vec, sb, kLdB);
    };

    typename Cfg::Acc acc[kWarpM / 16][kWarpN / 16];
#pragma unroll
    for (int i = 0; i < kWarpM / 16; ++i)
#pragma unroll
      for (int j = 0; j < kWarpN / 16; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    prefetch(0);
    commit(0, 0);
    __syncthreads();
    // Two shared stages, one barrier per step: stage cur ^ 1 was last read before the previous barrier, so
    // it is refilled (step kt + 1) while stage cur (step kt) is multiplied.
    for (int kt = 0; kt < kt_count; ++kt) {
      const int cur = kt & 1;
      const bool more = kt + 1 < kt_count;
      if (more) prefetch(kt + 1);
      const T* as = As + cur * kStageA + (wm * kWarpM) * kLdA;
      const T* bs = Bs + cur * kStageB + (NT ? (wn * kWarpN) * kLdB : wn * kWarpN);
#pragma unroll
      for (int kk = 0; kk < kBK; kk += kWK) {
        typename Cfg::template FragB<Layout> b[kWarpN / 16];
#pragma unroll
        for (int j = 0; j < kWarpN / 16; ++j)
          wmma::load_matrix_sync(b[j], bs + (NT ? (j * 16) * kLdB + kk : kk * kLdB + j * 16), kLdB);
#pragma unroll
        for (int i = 0; i < kWarpM / 16; ++i) {
          typename Cfg::FragA a;
          wmma::load_matrix_sync(a, as + (i * 16) * kLdA + kk, kLdA);
#pragma unroll
          for (int j = 0; j < kWarpN / 16; ++j) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
        }
      }
      if (more) commit(cur ^ 1, kt + 1);
      __syncthreads();
    }

    // Epilogue: the stages are free (the loop ended on a barrier); each warp uses its own scratch.
    store_acc(acc, reinterpret_cast<float*>(smem) + warp * 16 * kLdScr, lane, m0 + wm * kWarpM,
              n0 + wn * kWarpN, C, ldc, bias, M, N, beta_one);
    __syncthreads();  // the scratch aliases the next M tile's stage 0
  }
}

// ---- Pipelined BF16 kernel (A and B both bf16 in global memory) ---------------------------------------
// gemm_pipe_kernel<NT, BM, BN>: a 256-thread block computes a BM x BN tile of C (BM 128, or 64 and 32 for
// products of few rows such as P = 20 prompt rows or a handful of kNN queries, where 128-row tiles would be
// mostly padding; BN 128 or 256); its 8 warps sit 2 x 4, each owning BM/2 x BN/4 outputs (BM/32 x BN/64
// fragments, m16n16k16, fp32 accumulators). Operand tiles travel global -> shared memory with cp.async
// (16 bytes a copy, no registers, no conversion: both operands are already bf16) through kPStages stages of
// BK = 32: while step kt is multiplied, the copies of steps kt + 1 .. kt + kPStages - 1 are in flight, so
// the memory latency hides behind the pipeline rather than behind other warps. One barrier per step: after
// it, every warp has finished step kt - 1, whose stage is the one refilled. Chunks past M, N or K are
// zero-filled by the copy itself (src-size below 16), so edge tiles need no second path; it needs 16-byte
// aligned bases and leading dimensions that are multiples of 8 (cp_async_ok). Stage rows are padded by 16
// bytes as in the staged kernel, so fragment loads are free of bank conflicts. The epilogue is the staged
// kernel's (store_acc), through a scratch that aliases the finished stages. A 1-D grid walks the tiles in
// groups of kGroupM M tiles (see the kernel).
constexpr int kPBK = 32, kPStages = 4, kPPad = 8;
constexpr int64_t kGroupM = 8;  // M tiles per group of the tile order

// Shared memory of the pipelined kernel's stages (bytes).
constexpr size_t pipe_smem(bool nt, int bm, int bn) {
  return size_t{kPStages} *
         (size_t(bm) * (kPBK + kPPad) + (nt ? size_t(bn) * (kPBK + kPPad) : size_t(kPBK) * (bn + kPPad))) *
         sizeof(__nv_bfloat16);
}

template <bool NT, int BM, int BN>
struct PipeShape {
  static constexpr int kWM = BM / 2, kWN = BN / 4;             // warp tile kWM x kWN
  static constexpr int kLdA = kPBK + kPPad;                    // A stage: [BM][kLdA]
  static constexpr int kLdB = NT ? kPBK + kPPad : BN + kPPad;  // B stage: NT [BN][kLdB], NN [kPBK][kLdB]
  static constexpr int kStageA = BM * kLdA, kStageB = (NT ? BN : kPBK) * kLdB;  // elements
  static constexpr size_t kSmem = pipe_smem(NT, BM, BN);
  static_assert(kSmem == size_t{kPStages} * (kStageA + kStageB) * sizeof(__nv_bfloat16), "stage sizes");
  static_assert((kStageA * 2) % 128 == 0 && (kStageB * 2) % 128 == 0, "stage alignment");
  static_assert(kSmem >= (kThreads / 32) * 16 * kLdScr * sizeof(float), "epilogue scratch fits the stages");
};

// Element (r, c) of a swizzled stage with rows of L bf16 (L a multiple of 64; c a multiple of 8 here): the
// 16-byte chunk c / 8 of row r sits at chunk (c / 8) ^ (r % 8) of that row's group of 8 chunks.
__device__ __forceinline__ int swz(int r, int c, int L) {
  return r * L + ((((c >> 3) ^ r) & 7) | ((c >> 3) & ~7)) * 8 + (c & 7);
}
// The same swizzle on a stage of R rows stored as panels of 64 columns ([c / 64][R][64]): every row is 128
// bytes, the layout of wgmma's 128-byte swizzle (mma.cuh). For CC = 64 both are one and the same.
__device__ __forceinline__ int swz_panel(int r, int c, int R) {
  return (c >> 6) * (R * 64) + swz(r, c & 63, 64);
}

// Shared-memory layouts of a cp.async tile: rows lds apart; swizzled rows (swz); swizzled 64-column panels
// (swz_panel).
enum TileLayout { kPadded = 0, kSwizzled = 1, kPanels = 2 };

// Issues the cp.async copies of an R x CC bf16 tile (CC contiguous) whose element (r, c) is
// g[(r0 + r) * ld + c0 + c], in bounds for r0 + r < rows and c0 + c < cols, into s[r * lds + c], or with
// kLayout kSwizzled into s[swz(r, c, CC)], kPanels into s[swz_panel(r, c, R)] (lds unused). A chunk with
// fewer than 8 elements in bounds copies those and zero-fills the rest; one with none reads nothing (its
// source is g itself, a valid aligned address).
template <int R, int CC, int kLayout>
__device__ __forceinline__ void cp_tile(__nv_bfloat16* s, int lds, const uint16_t* __restrict__ g, int64_t ld,
                                        int r0, int rows, int c0, int cols) {
  constexpr int kPerRow = CC / 8, kChunks = R * kPerRow;
  static_assert(CC % 8 == 0 && (kChunks % kThreads == 0 || kChunks < kThreads),
                "tile must split evenly into 16-byte chunks");
  static_assert(kLayout == kPadded || CC % 64 == 0, "swizzled rows are whole groups of 8 chunks");
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads, r = e / kPerRow, c = e % kPerRow * 8;
    if (kChunks < kThreads && e >= kChunks) break;  // a 32-row A tile: half the threads copy it
    const int gr = r0 + r, gc = c0 + c;
    const int valid = gr < rows ? min(cols - gc, 8) : 0;
    void* dst = kLayout == kPanels     ? s + swz_panel(r, c, R)
                : kLayout == kSwizzled ? s + swz(r, c, CC)
                                       : s + r * lds + c;
    if (valid >= 8) {
      __pipeline_memcpy_async(dst, g + static_cast<int64_t>(gr) * ld + gc, 16);
    } else {
      const uint16_t* src = valid > 0 ? g + static_cast<int64_t>(gr) * ld + gc : g;
      __pipeline_memcpy_async(dst, src, 16, 16 - 2 * max(valid, 0));
    }
  }
}

// Step kt's copies of both operands of the tile at (m0, n0) into stage kt % Stages, as one commit group: A's
// BM x BK piece at column k0 = kt BK into As + stage * stage_a, B's (NT: rows n0.., columns k0..; NN: rows
// k0.., columns n0..) into Bs + stage * stage_b, laid out as cp_tile does (rows lds_a / lds_b apart, or
// swizzled, kLayout). Past the last step (kt >= kt_count) the group is empty, so that every wait of the
// pipeline leaves the same number of groups in flight.
template <bool NT, int BM, int BN, int BK, int Stages, int kLayout>
__device__ __forceinline__ void cp_step(int kt, int kt_count, __nv_bfloat16* As, int stage_a, int lds_a,
                                        __nv_bfloat16* Bs, int stage_b, int lds_b,
                                        const uint16_t* __restrict__ A, int64_t lda,
                                        const uint16_t* __restrict__ B, int64_t ldb, int m0, int n0, int M,
                                        int N, int K) {
  if (kt < kt_count) {
    const int st = kt % Stages, k0 = kt * BK;
    cp_tile<BM, BK, kLayout>(As + st * stage_a, lds_a, A, lda, m0, M, k0, K);
    cp_tile<NT ? BN : BK, NT ? BK : BN, kLayout>(Bs + st * stage_b, lds_b, B, ldb, NT ? n0 : k0, NT ? N : K,
                                                 NT ? k0 : n0, NT ? K : N);
  }
  __pipeline_commit();
}

// Tile t of a 1-D grid in grouped order: kGroupM consecutive M tiles walk the N tiles together (M fastest),
// so the blocks running at once share their B tiles (and A tiles) through L2 instead of each M tile
// streaming all of B from memory (the LM head's 50257 x 768 weight, a kNN vocabulary). Sets the tile's
// first row m0 and column n0.
__device__ __forceinline__ void grouped_tile(int64_t t, int64_t tiles_m, int64_t tiles_n, int bm, int bn,
                                             int& m0, int& n0) {
  const int64_t per_group = kGroupM * tiles_n, first_m = t / per_group * kGroupM;
  const int64_t in_group = t % per_group, group_m = min(tiles_m - first_m, int64_t{kGroupM});
  m0 = static_cast<int>((first_m + in_group % group_m) * bm);
  n0 = static_cast<int>(in_group / group_m * bn);
}

// BM x BN = 128 x 256: about 235 registers a thread, one block per SM; 128 x 128: capped at 128 registers so
// that two blocks (16 warps) share an SM (ptxas, sm_90a: no spills for NT, about 20 bytes each way for NN);
// the 64- and 32-row tiles hold half or a quarter of the accumulators and run two blocks an SM too.
constexpr int pipe_blocks_per_sm(int bm, int bn) {
  return bm == 128 && bn == 256 ? 1 : 2;
}

template <bool NT, int BM, int BN>
__global__ void __launch_bounds__(kThreads, pipe_blocks_per_sm(BM, BN))
    gemm_pipe_kernel(const uint16_t* __restrict__ A, int64_t lda, const uint16_t* __restrict__ B, int64_t ldb,
                     float* C, int64_t ldc, const float* __restrict__ bias, int M, int N, int K,
                     bool beta_one) {
  using S = PipeShape<NT, BM, BN>;
  using Cfg = Tc<__nv_bfloat16>;
  using Layout = typename std::conditional<NT, wmma::col_major, wmma::row_major>::type;
  constexpr int kFM = S::kWM / 16, kFN = S::kWN / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);  // [kPStages][kStageA]
  __nv_bfloat16* Bs = As + kPStages * S::kStageA;              // [kPStages][kStageB]

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int64_t tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int kt_count = (K + kPBK - 1) / kPBK;

  // Tiles in grouped order (grouped_tile).
  for (int64_t t = blockIdx.x; t < tiles_m * tiles_n; t += gridDim.x) {
    int m0, n0;
    grouped_tile(t, tiles_m, tiles_n, BM, BN, m0, n0);
    // Step kt's copies (cp_step). B's stage rows run along n for NT ([N, K] in memory), along k for NN.
    auto load = [&](int kt) {
      cp_step<NT, BM, BN, kPBK, kPStages, kPadded>(kt, kt_count, As, S::kStageA, S::kLdA, Bs, S::kStageB,
                                                   S::kLdB, A, lda, B, ldb, m0, n0, M, N, K);
    };

    typename Cfg::Acc acc[kFM][kFN];
#pragma unroll
    for (int i = 0; i < kFM; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

#pragma unroll
    for (int st = 0; st < kPStages - 1; ++st) load(st);
    for (int kt = 0; kt < kt_count; ++kt) {
      __pipeline_wait_prior(kPStages - 2);  // this thread's copies of step kt have landed ...
      __syncthreads();                      // ... everyone's have, and step kt - 1's stage is free
      load(kt + kPStages - 1);
      const int st = kt % kPStages;
      const __nv_bfloat16* as = As + st * S::kStageA + (wm * S::kWM) * S::kLdA;
      const __nv_bfloat16* bs = Bs + st * S::kStageB + (NT ? (wn * S::kWN) * S::kLdB : wn * S::kWN);
#pragma unroll
      for (int kk = 0; kk < kPBK; kk += 16) {
        typename Cfg::FragA a[kFM];
#pragma unroll
        for (int i = 0; i < kFM; ++i) wmma::load_matrix_sync(a[i], as + (i * 16) * S::kLdA + kk, S::kLdA);
#pragma unroll
        for (int j = 0; j < kFN; ++j) {
          typename Cfg::template FragB<Layout> b;
          wmma::load_matrix_sync(b, bs + (NT ? (j * 16) * S::kLdB + kk : kk * S::kLdB + j * 16), S::kLdB);
#pragma unroll
          for (int i = 0; i < kFM; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
        }
      }
    }
    __pipeline_wait_prior(0);  // only empty groups are left; nothing lands in the scratch below
    __syncthreads();           // every warp is done with the stages the scratch aliases
    store_acc(acc, reinterpret_cast<float*>(smem) + warp * 16 * kLdScr, lane, m0 + wm * S::kWM,
              n0 + wn * S::kWN, C, ldc, bias, M, N, beta_one);
    __syncthreads();  // the scratch aliases the next M tile's first stages
  }
}

// The bf16 copy a product may also write (gemm's c16, Out16Op and aux): C's layout; p null: none (and always
// with split-K partials). With GeluGrad the kernel does not write C.
struct Out16 {
  uint16_t* p = nullptr;
  Out16Op op = Out16Op::Copy;
  const float* aux = nullptr;
};
__device__ __forceinline__ float out16_value(float v, Out16Op op, float x) {
  return op == Out16Op::Copy ? v : op == Out16Op::Gelu ? gelu_tanh(v) : gelu_tanh_grad(x, v);
}

// Writes the accumulator pair (v0, v1) of C row crow, columns col and col + 1 (those below N), adding bias
// and, when beta_one, the old C, and the pair's bf16 copy (o16) to c16row, reading auxrow for GeluGrad (the
// same row of o16.p and o16.aux; c16row null: none): the register epilogue of the mma.sync and wgmma
// kernels, whose fragments both hold two adjacent columns a thread. c_vec: C, bias and aux (when given)
// 8-byte aligned, c16 4-byte aligned and ldc even, so the pair goes as 8-byte (and 4-byte) accesses.
__device__ __forceinline__ void store_pair(float* crow, int col, float v0, float v1,
                                           const float* __restrict__ bias, int N, bool beta_one, bool c_vec,
                                           uint16_t* c16row = nullptr, Out16Op op = Out16Op::Copy,
                                           const float* auxrow = nullptr) {
  const bool write_c = c16row == nullptr || op != Out16Op::GeluGrad;
  if (c_vec && col + 1 < N) {
    if (bias) {
      const float2 bb = __ldg(reinterpret_cast<const float2*>(bias + col));
      v0 += bb.x, v1 += bb.y;
    }
    float2* dst = reinterpret_cast<float2*>(crow + col);
    if (beta_one) {
      const float2 old = *dst;
      v0 += old.x, v1 += old.y;
    }
    if (write_c) *dst = make_float2(v0, v1);
    if (c16row) {
      const float2 x =
          op == Out16Op::GeluGrad ? *reinterpret_cast<const float2*>(auxrow + col) : make_float2(0.0f, 0.0f);
      *reinterpret_cast<uint32_t*>(c16row + col) =
          pack_bf16x2(out16_value(v0, op, x.x), out16_value(v1, op, x.y));
    }
  } else {
    const float v[2] = {v0, v1};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (col + e >= N) continue;
      float x = v[e];
      if (bias) x += __ldg(bias + col + e);
      if (beta_one) x += crow[col + e];
      if (write_c) crow[col + e] = x;
      if (c16row) {
        const float a = op == Out16Op::GeluGrad ? auxrow[col + e] : 0.0f;
        c16row[col + e] = __bfloat16_as_ushort(__float2bfloat16_rn(out16_value(x, op, a)));
      }
    }
  }
}
// Row `row` of o16's copy and of its aux (null where there is none).
__device__ __forceinline__ uint16_t* out16_row(const Out16& o16, int row, int64_t ldc) {
  return o16.p ? o16.p + static_cast<int64_t>(row) * ldc : nullptr;
}
__device__ __forceinline__ const float* aux_row(const Out16& o16, int row, int64_t ldc) {
  return o16.aux ? o16.aux + static_cast<int64_t>(row) * ldc : nullptr;
}

// ---- mma.sync BF16 kernel (the default for bf16 operands) ---------------------------------------------
// gemm_mma_kernel<NT, BM, BN>: a 256-thread block computes a BM x BN tile of C; its 8 warps sit 2 x 4, each
// owning (BM/2) x (BN/4) outputs as m16n8k16 products (mma.cuh) held in registers: BM/32 x BN/32 fragments of
// 16 x 8, fp32. Operands travel global -> shared memory with cp.async through mma_stages() stages of
// BK = kMBK = 64, exactly as in the pipelined kernel (zero fill past M, N and K; one barrier per step), and
// shared memory -> registers with ldmatrix (.trans for NN's k-major B tile), one instruction per 16 x 16
// piece, instead of WMMA's per-element loads; the fragments of the next 16-wide k-step are loaded before the
// MMAs of the current one (two fragment buffers). Stage rows are unpadded and swizzled: the 16-byte chunk c
// of row r sits at chunk c ^ (r % 8) within its group of 8 chunks (swz), so the 8 rows one ldmatrix phase
// reads (same logical chunk, 8 consecutive rows) fall in 8 distinct bank groups, and so do the 8 chunks of
// a row the copies write. The epilogue writes the accumulators straight from registers (two adjacent
// columns a thread, 8-byte stores when C allows), adding bias and, when beta_one, the old C; no scratch.
constexpr int kMBK = 64;

__host__ __device__ constexpr int mma_stages(int bm, int bn) {
  return bm == 128 && bn == 128 ? 3 : 4;
}
constexpr size_t mma_smem(int bm, int bn) {
  return size_t(mma_stages(bm, bn)) * size_t(bm + bn) * kMBK * sizeof(__nv_bfloat16);
}
// 256 columns (up to 128 accumulators a thread; 144 to 192 KB of stages): one block an SM; 128 columns
// two (registers capped at 128; stages of 80 to 96 KB).
constexpr int mma_blocks_per_sm(int bn) {
  return bn == 256 ? 1 : 2;
}
static_assert(mma_smem(128, 256) <= 227 * 1024 && mma_smem(128, 128) * 2 + 2048 <= 228 * 1024,
              "stage sizes fit an H100 SM (227 KB a block, 228 KB an SM) at the blocks an SM above");

// c_vec: as in store_pair.
template <bool NT, int BM, int BN>
__global__ void __launch_bounds__(kThreads, mma_blocks_per_sm(BN))
    gemm_mma_kernel(const uint16_t* __restrict__ A, int64_t lda, const uint16_t* __restrict__ B, int64_t ldb,
                    float* C, int64_t ldc, const float* __restrict__ bias, int M, int N, int K, bool beta_one,
                    bool c_vec, Out16 o16) {
  constexpr int kStages = mma_stages(BM, BN);
  constexpr int kWM = BM / 2, kWN = BN / 4, kMT = kWM / 16, kNT = kWN / 8;
  // Stage sizes in elements: A [BM][kMBK]; B NT [BN][kMBK], NN [kMBK][BN].
  constexpr int kStageA = BM * kMBK, kStageB = BN * kMBK;
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tiles are whole 16 x 16 ldmatrix pieces");
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);  // [kStages][kStageA]
  __nv_bfloat16* Bs = As + kStages * kStageA;                  // [kStages][kStageB]

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int64_t tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int kt_count = (K + kMBK - 1) / kMBK;
  // This lane's ldmatrix row and chunk within a 16 x 16 piece: A's rows (lane % 16), k chunk lane / 16; NT
  // B's n rows (lane % 8 + 8 (lane / 16)), k chunk (lane / 8) % 2; NN B's k rows lane % 16, n chunk lane
  // / 16.
  const int a_row = wm * kWM + (lane & 15), a_col = 8 * (lane >> 4);
  const int b_row = NT ? wn * kWN + (lane & 7) + 8 * (lane >> 4) : (lane & 15);
  const int b_col = NT ? 8 * ((lane >> 3) & 1) : wn * kWN + 8 * (lane >> 4);

  for (int64_t t = blockIdx.x; t < tiles_m * tiles_n; t += gridDim.x) {
    int m0, n0;
    grouped_tile(t, tiles_m, tiles_n, BM, BN, m0, n0);
    auto load = [&](int kt) {  // step kt's copies (cp_step), swizzled
      cp_step<NT, BM, BN, kMBK, kStages, kSwizzled>(kt, kt_count, As, kStageA, 0, Bs, kStageB, 0, A, lda, B,
                                                    ldb, m0, n0, M, N, K);
    };

    float acc[kMT][kNT][4];
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) load(st);
    for (int kt = 0; kt < kt_count; ++kt) {
      __pipeline_wait_prior(kStages - 2);  // this thread's copies of step kt have landed ...
      __syncthreads();                     // ... everyone's have, and step kt - 1's stage is free
      load(kt + kStages - 1);
      const __nv_bfloat16* as = As + (kt % kStages) * kStageA;
      const __nv_bfloat16* bs = Bs + (kt % kStages) * kStageB;
      // Fragments double-buffered across the stage's four 16-wide k-steps: the loads of step kk + 1 are
      // issued before the products of step kk, so their latency hides behind those MMAs.
      uint32_t a[2][kMT][4], b[2][kNT][2];
      auto fetch = [&](int buf, int kk) {
#pragma unroll
        for (int i = 0; i < kMT; ++i) ldsm_x4(a[buf][i], as + swz(a_row + 16 * i, kk + a_col, kMBK));
#pragma unroll
        for (int jp = 0; jp < kNT / 2; ++jp) {
          uint32_t q[4];
          if (NT)
            ldsm_x4(q, bs + swz(b_row + 16 * jp, kk + b_col, kMBK));
          else
            ldsm_x4_trans(q, bs + swz(kk + b_row, b_col + 16 * jp, BN));
          b[buf][2 * jp][0] = q[0], b[buf][2 * jp][1] = q[1];
          b[buf][2 * jp + 1][0] = q[2], b[buf][2 * jp + 1][1] = q[3];
        }
      };
      fetch(0, 0);
#pragma unroll
      for (int s = 0; s < kMBK / 16; ++s) {
        if (s + 1 < kMBK / 16) fetch((s + 1) % 2, 16 * (s + 1));
#pragma unroll
        for (int i = 0; i < kMT; ++i)
#pragma unroll
          for (int j = 0; j < kNT; ++j)
            mma_bf16_16816(acc[i][j], a[s % 2][i], b[s % 2][j][0], b[s % 2][j][1]);
      }
    }
    __pipeline_wait_prior(0);  // only empty groups are left
    __syncthreads();           // every warp is done with the stages before the next tile refills them

    // Epilogue: fragment (i, j) holds rows g and g + 8, columns 2 (lane % 4) and the next (mma.cuh).
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * kWM + 16 * i + (lane >> 2) + 8 * h;
        if (row >= M) continue;
        float* crow = C + static_cast<int64_t>(row) * ldc;
        uint16_t* c16row = out16_row(o16, row, ldc);
        const float* auxrow = aux_row(o16, row, ldc);
#pragma unroll
        for (int j = 0; j < kNT; ++j)
          store_pair(crow, n0 + wn * kWN + 8 * j + 2 * (lane & 3), acc[i][j][2 * h], acc[i][j][2 * h + 1],
                     bias, N, beta_one, c_vec, c16row, o16.op, auxrow);
      }
    }
  }
}

// ---- wgmma BF16 kernel (sm_90a, Hopper) -------------------------------------------------------------------
// gemm_wgmma_kernel<NT, BN>: a 256-thread block (two warpgroups) computes a 128 x BN tile of C (BN 128 or
// 256); warpgroup g owns rows 64 g..64 g + 63 and issues wgmma.mma_async m64nBNk16 (mma.cuh), both operands
// read by the tensor cores straight from shared memory through descriptors, fp32 accumulators in registers
// (BN / 2 a thread). Operands travel global -> shared memory with cp.async through kWStages stages of BK =
// 64 (zero fill past M, N and K as in the other cp.async kernels), laid out as wgmma's 128-byte swizzle
// wants: A and NT's B as rows of 64 k (K-major), NN's B as 64-column panels of k rows (MN-major, read
// transposed); the stages start on a 1024-byte boundary (the dynamic shared memory is rounded up to one).
// One barrier per step, and one group of MMAs left in flight across it: at step kt the block waits for its
// copies of step kt (fence.proxy.async makes them visible to the tensor cores), refills the stage of step
// kt - 2 (its MMAs retired by every warpgroup's wait before the barrier), issues step kt's four k16 MMAs,
// commits them and waits until only they are in flight, so the next step's barrier and copies overlap them.
// The epilogue is the mma.sync kernel's (store_pair), from registers.
constexpr int kWBM = 128, kWBK = 64, kWStages = 4;
// The measured bf16 rates the kernel choices weigh (TFLOP/s at 8192^3, H200, 2026-11-26): the wgmma kernel
// at tile width 256 or 128, and the mma.sync kernel at 128 x 128.
constexpr double kMmaTflops = 278.0;
constexpr double wgmma_tflops(int bn) {
  return bn == 256 ? 394.0 : 325.0;
}
constexpr uint32_t kWRow = kWBK * 2, kWAtom = 8 * kWRow;  // bytes: a stage row (the 128-byte swizzle span), 8

// One 64-wide k-step of a warpgroup's MMAs on the stage at shared addresses a0 (its 64 rows of A) and b0 (B),
// committed as one group, then a wait until only that group is in flight (the previous step's have
// retired). A: K-major, k16-step s 32 bytes in. B: NT K-major the same; NN MN-major, k16-step s 16 rows
// down, panels of 64 columns kWBK rows apart. first: D = A . B (no accumulation).
template <bool NT, int BN>
__device__ __forceinline__ void wgmma_step(float (&acc)[BN / 2], uint32_t a0, uint32_t b0, bool first) {
  wgmma_fence_acc(acc);
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < kWBK / 16; ++s) {
    const uint64_t da = wgmma_desc(a0 + 32 * s, 16, kWAtom);
    const uint64_t db =
        NT ? wgmma_desc(b0 + 32 * s, 16, kWAtom) : wgmma_desc(b0 + 16 * kWRow * s, kWBK * kWRow, kWAtom);
    wgmma_bf16<BN, NT ? 0 : 1>(acc, da, db, !first || s > 0);
  }
  wgmma_commit();
  wgmma_wait<1>();
  wgmma_fence_acc(acc);
}

// A warpgroup's 64 x BN accumulators (wgmma's D fragment) -> C from registers: acc[4 j + 2 h + e] is row
// row0 + 8 h, column n0 + 8 j + 2 (lane % 4) + e (mma.cuh); the mma.sync kernel's store_pair.
template <int BN>
__device__ __forceinline__ void wgmma_epilogue(const float (&acc)[BN / 2], float* C, int64_t ldc,
                                               const float* bias, int M, int N, int row0, int n0, int lane,
                                               bool beta_one, bool c_vec, Out16 o16) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    if (row >= M) continue;
    float* crow = C + static_cast<int64_t>(row) * ldc;
    uint16_t* c16row = out16_row(o16, row, ldc);
    const float* auxrow = aux_row(o16, row, ldc);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
      store_pair(crow, n0 + 8 * j + 2 * (lane & 3), acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], bias, N,
                 beta_one, c_vec, c16row, o16.op, auxrow);
  }
}

constexpr size_t wgmma_smem(int bn, int stages = kWStages) {
  return size_t(stages) * size_t(kWBM + bn) * kWBK * sizeof(__nv_bfloat16) + 1024;  // + the round-up
}
static_assert(wgmma_smem(256) <= 227 * 1024, "stages fit an H100 block (227 KB)");
// PRIORTUNE_CUDA_GEMM=wgmma2 (not yet run on a GPU): 128 x 128 tiles through three stages, so that two
// blocks share an SM (2 x 97 KB of shared memory, at most 128 registers a thread: ptxas 124-128, no
// spills) and one's pipeline fill and epilogue overlap the other's MMAs, which one block an SM cannot do;
// the short-K products (GPT-2's K = 768: 12 k-steps a tile) spend much of a tile there.
constexpr int kW2Stages = 3;
static_assert(2 * (wgmma_smem(128, kW2Stages) + 1024) <= 228 * 1024, "two blocks fit an H100 SM");

// splits > 1 (split-K, see gemm_split): block tile t of split s = t / tiles multiplies the k-range
// [s kc, s kc + kc) (kc a multiple of 64) into C + s split_stride; splits = 1 is the plain product.
template <bool NT, int BN, int STAGES = kWStages>
__global__ void __launch_bounds__(kThreads, STAGES == kW2Stages ? 2 : 1)
    gemm_wgmma_kernel(const uint16_t* __restrict__ A, int64_t lda, const uint16_t* __restrict__ B,
                      int64_t ldb, float* C, int64_t ldc, const float* __restrict__ bias, int M, int N, int K,
                      bool beta_one, bool c_vec, int splits, int kc, int64_t split_stride, Out16 o16) {
  static_assert(STAGES >= 3, "the stage refilled at step kt is that of step kt - 2");
  constexpr int kStageA = kWBM * kWBK, kStageB = BN * kWBK;  // elements: A [128][64]; B NT [BN][64], NN
                                                             // [BN / 64][64][64]
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);  // [STAGES][kStageA]
  __nv_bfloat16* Bs = As + STAGES * kStageA;                   // [STAGES][kStageB]
  const uint32_t a_base = smem_addr(As) + static_cast<uint32_t>(threadIdx.x / 128) * 64 * kWRow;
  const uint32_t b_base = smem_addr(Bs);

  const int warp = static_cast<int>(threadIdx.x) / 32 % 4, lane = static_cast<int>(threadIdx.x) % 32;
  const int row_base = static_cast<int>(threadIdx.x / 128) * 64 + 16 * warp + (lane >> 2);
  const int64_t tiles_m = (M + kWBM - 1) / kWBM, tiles_n = (N + BN - 1) / BN, tiles = tiles_m * tiles_n;

  for (int64_t t = blockIdx.x; t < tiles * splits; t += gridDim.x) {
    int m0, n0;
    grouped_tile(t % tiles, tiles_m, tiles_n, kWBM, BN, m0, n0);
    const int split = static_cast<int>(t / tiles), k0 = split * kc;
    const int Ks = splits == 1 ? K : min(kc, K - k0);
    const uint16_t* Ag = A + k0;
    const uint16_t* Bg = NT ? B + k0 : B + static_cast<int64_t>(k0) * ldb;
    float* Cs = C + split * split_stride;
    const int kt_count = (Ks + kWBK - 1) / kWBK;
    auto load = [&](int kt) {  // step kt's copies (cp_step), in wgmma's layouts
      cp_step<NT, kWBM, BN, kWBK, STAGES, kPanels>(kt, kt_count, As, kStageA, 0, Bs, kStageB, 0, Ag, lda, Bg,
                                                   ldb, m0, n0, M, N, Ks);
    };
    float acc[BN / 2];
#pragma unroll
    for (int st = 0; st < STAGES - 2; ++st) load(st);
    for (int kt = 0; kt < kt_count; ++kt) {
      __pipeline_wait_prior(STAGES - 3);  // this thread's copies of step kt have landed ...
      fence_proxy_async();                // ... where the tensor cores see them ...
      __syncthreads();                    // ... everyone's, and step kt - 2's MMAs have retired
      load(kt + STAGES - 2);
      const int st = kt % STAGES;
      wgmma_step<NT, BN>(acc, a_base + st * kStageA * 2, b_base + st * kStageB * 2, kt == 0);
    }
    wgmma_wait<0>();
    wgmma_fence_acc(acc);
    __pipeline_wait_prior(0);  // only empty groups are left
    __syncthreads();           // every warpgroup is done with the stages before the next tile refills them

    wgmma_epilogue<BN>(acc, Cs, ldc, bias, M, N, m0 + row_base, n0, lane, beta_one, c_vec, o16);
  }
}

// ---- TMA + wgmma BF16 kernel (sm_90a, Hopper) -------------------------------------------------------------
// gemm_tma_kernel<NT, BN>: the wgmma kernel's tiles, stages, shared layouts, descriptors and epilogue, but
// with warp specialisation: a 384-thread block is a producer warpgroup, of which one thread issues the TMA
// tile loads (tma_load_2d: the copies, their zero fill at the edges and the 128-byte swizzle are done by the
// TMA unit, no address arithmetic or cp.async in the MMA warps), and two MMA warpgroups (rows 0..63 and
// 64..127 of the tile). Stages hand over through mbarriers, not __syncthreads: full[s] completes when the
// producer's arrival and the stage's bytes have landed; empty[s] when all 256 MMA threads have retired the
// MMAs that read stage s (wgmma_wait<1> one step later, so one group stays in flight). The producer runs up
// to kWStages steps ahead, across tiles (the grid is persistent, launch_tma). Nsight on the wgmma kernel
// (8192^3, H200) showed the tensor pipe 42% busy and the MMA warps stalled on the address math and copies
// this moves out of them.
constexpr int kTThreads = 384;

constexpr size_t tma_smem(int bn) {
  return wgmma_smem(bn) + 2 * kWStages * sizeof(uint64_t);  // + the full and empty barriers
}
static_assert(tma_smem(256) <= 227 * 1024, "stages and barriers fit an H100 block (227 KB)");

template <bool NT, int BN>
__global__ void __launch_bounds__(kTThreads, 1)
    gemm_tma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                    float* C, int64_t ldc, const float* __restrict__ bias, int M, int N, int K, bool beta_one,
                    bool c_vec, Out16 o16) {
  constexpr int kStageA = kWBM * kWBK, kStageB = BN * kWBK;  // elements, as in gemm_wgmma_kernel
  constexpr uint32_t kStageBytes = (kStageA + kStageB) * 2;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);  // [kWStages][kStageA]
  __nv_bfloat16* Bs = As + kWStages * kStageA;                 // [kWStages][kStageB]
  uint64_t* full = reinterpret_cast<uint64_t*>(Bs + kWStages * kStageB);
  uint64_t* empty = full + kWStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 2 * 128);
    }
    mbar_fence_init();
  }
  __syncthreads();

  const int64_t tiles_m = (M + kWBM - 1) / kWBM, tiles_n = (N + BN - 1) / BN;
  const int kt_count = (K + kWBK - 1) / kWBK;
  int stage = 0;
  unsigned phase = 0;  // the parity of the phase of `stage` this round of the ring waits for
  auto advance = [&] {
    if (++stage == kWStages) {
      stage = 0;
      phase ^= 1u;
    }
  };
  const int wg = static_cast<int>(threadIdx.x) / 128;
  if (wg == 0) {  // the producer: one thread issues every load; the other 127 have nothing to do
    if (threadIdx.x != 0) return;
    for (int64_t t = blockIdx.x; t < tiles_m * tiles_n; t += gridDim.x) {
      int m0, n0;
      grouped_tile(t, tiles_m, tiles_n, kWBM, BN, m0, n0);
      for (int kt = 0; kt < kt_count; ++kt, advance()) {
        mbar_wait(&empty[stage], phase ^ 1u);  // the MMAs of the stage's last round have retired
        mbar_arrive_expect_tx(&full[stage], kStageBytes);
        tma_load_2d(As + stage * kStageA, &map_a, &full[stage], kt * kWBK, m0);  // A: 64 k x 128 rows
        if (NT) {
          tma_load_2d(Bs + stage * kStageB, &map_b, &full[stage], kt * kWBK, n0);  // B [N, K]: 64 k x BN rows
        } else {
#pragma unroll
          for (int p = 0; p < BN / 64; ++p)  // B [K, N]: panels of 64 n x 64 k rows
            tma_load_2d(Bs + stage * kStageB + p * 64 * kWBK, &map_b, &full[stage], n0 + 64 * p, kt * kWBK);
        }
      }
    }
    return;
  }

  const int mw = wg - 1;  // the MMA warpgroup: tile rows 64 mw .. 64 mw + 63
  const uint32_t a_base = smem_addr(As) + static_cast<uint32_t>(mw) * 64 * kWRow, b_base = smem_addr(Bs);
  const int warp = static_cast<int>(threadIdx.x) / 32 % 4, lane = static_cast<int>(threadIdx.x) % 32;
  const int row_base = mw * 64 + 16 * warp + (lane >> 2);
  for (int64_t t = blockIdx.x; t < tiles_m * tiles_n; t += gridDim.x) {
    int m0, n0;
    grouped_tile(t, tiles_m, tiles_n, kWBM, BN, m0, n0);
    float acc[BN / 2];
    int held = -1;  // the stage whose MMAs are still in flight
    for (int kt = 0; kt < kt_count; ++kt, advance()) {
      mbar_wait(&full[stage], phase);
      wgmma_step<NT, BN>(acc, a_base + stage * kStageA * 2, b_base + stage * kStageB * 2, kt == 0);
      // The previous step's MMAs have retired (wgmma_step's wait): their stage goes back to the producer.
      if (held >= 0) mbar_arrive(&empty[held]);
      held = stage;
    }
    wgmma_wait<0>();
    wgmma_fence_acc(acc);
    mbar_arrive(&empty[held]);

    wgmma_epilogue<BN>(acc, C, ldc, bias, M, N, m0 + row_base, n0, lane, beta_one, c_vec, o16);
  }
}

// FP32 verification path: 64 x 64 tile per block, thread (tx, ty) owns rows ty + 16 i, columns tx + 16 j.
constexpr int kFM = 64, kFN = 64, kFK = 16;

template <bool NT>
__global__ void __launch_bounds__(kThreads)
    gemm_fp32_kernel(const float* __restrict__ A, int64_t lda, const float* __restrict__ B, int64_t ldb,
                     float* C, int64_t ldc, const float* __restrict__ bias, int M, int N, int K,
                     bool beta_one) {
  __shared__ float As[kFK][kFM + 1];  // [k][m]
  __shared__ float Bs[kFK][kFN + 1];  // [k][n]
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const int n0 = static_cast<int>(blockIdx.x) * kFN;
  const int tiles_m = (M + kFM - 1) / kFM;
  for (int tm = static_cast<int>(blockIdx.y); tm < tiles_m; tm += static_cast<int>(gridDim.y)) {
    const int m0 = tm * kFM;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += kFK) {
#pragma unroll
      for (int l = 0; l < kFM * kFK / kThreads; ++l) {
        const int idx = tid + l * kThreads, r = idx / kFK, kk = idx % kFK;
        const int m = m0 + r, k = k0 + kk;
        As[kk][r] = (m < M && k < K) ? __ldg(A + static_cast<int64_t>(m) * lda + k) : 0.0f;
      }
#pragma unroll
      for (int l = 0; l < kFN * kFK / kThreads; ++l) {
        const int idx = tid + l * kThreads;
        if (NT) {
          const int c = idx / kFK, kk = idx % kFK, n = n0 + c, k = k0 + kk;
          Bs[kk][c] = (n < N && k < K) ? __ldg(B + static_cast<int64_t>(n) * ldb + k) : 0.0f;
        } else {
          const int kk = idx / kFN, c = idx % kFN, n = n0 + c, k = k0 + kk;
          Bs[kk][c] = (n < N && k < K) ? __ldg(B + static_cast<int64_t>(k) * ldb + n) : 0.0f;
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kFK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + ty + 16 * i;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = n0 + tx + 16 * j;
        if (n >= N) continue;
        float v = acc[i][j];
        if (bias) v += __ldg(bias + n);
        float* dst = C + static_cast<int64_t>(m) * ldc + n;
        if (beta_one) v += *dst;
        *dst = v;
      }
    }
  }
}

// dst[i] = bf16(src[i]). vec (src 16-byte and dst 8-byte aligned): four elements a step, one 16-byte load
// and one 8-byte store (activations are converted before every pipelined product, so this runs at memory
// speed); the n % 4 left over, or everything without vec, one by one.
__global__ void to_bf16_kernel(uint16_t* __restrict__ dst, const float* __restrict__ src, int64_t n,
                               bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t quads = n / 4;
    for (int64_t i = first; i < quads; i += stride) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(src) + i);
      reinterpret_cast<uint2*>(dst)[i] = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
    }
    done = quads * 4;
  }
  for (int64_t i = done + first; i < n; i += stride)
    dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

dim3 grid_2d(int64_t M, int64_t N, int bm, int bn) {
  const int64_t tiles_m = ceil_div(M, bm);
  return dim3(static_cast<unsigned>(ceil_div(N, bn)),
              static_cast<unsigned>(tiles_m < kMaxGridY ? tiles_m : kMaxGridY));
}

template <class T, class GA, class GB>
void launch_tc(Stream stream, bool nt, int M, int N, int K, const GA* A, int64_t lda, const GB* B,
               int64_t ldb, float* C, int64_t ldc, const float* bias, bool beta_one) {
  const bool a_vec = aligned16(A) && lda % (16 / static_cast<int64_t>(sizeof(GA))) == 0;
  const bool b_vec = aligned16(B) && ldb % (16 / static_cast<int64_t>(sizeof(GB))) == 0;
  const dim3 grid = grid_2d(M, N, kBM, kBN);
  if (nt)
    gemm_tc_kernel<T, true, GA, GB>
        <<<grid, kThreads, 0, stream>>>(A, lda, B, ldb, C, ldc, bias, M, N, K, beta_one, a_vec, b_vec);
  else
    gemm_tc_kernel<T, false, GA, GB>
        <<<grid, kThreads, 0, stream>>>(A, lda, B, ldb, C, ldc, bias, M, N, K, beta_one, a_vec, b_vec);
}

// The pipelined kernel's arguments, passed down its dispatch on (NT, BM, BN).
struct PipeArgs {
  Stream stream;
  int M, N, K;
  const uint16_t* A;
  int64_t lda;
  const uint16_t* B;
  int64_t ldb;
  float* C;
  int64_t ldc;
  const float* bias;
  bool beta_one;
  Out16 o16 = {};  // the register-epilogue kernels' bf16 copy (the others leave it to gemm)
};

// A 1-D grid of one block a BM x BN tile (the kernels walk further tiles past 2^30 with a grid-stride loop).
unsigned tile_grid(const PipeArgs& a, int bm, int bn) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(a.M, bm) * ceil_div(a.N, bn), int64_t{1} << 30));
}

// store_pair's c_vec: C and bias (when given) 8-byte aligned, ldc even.
bool c_vec(const PipeArgs& a) {
  return reinterpret_cast<uintptr_t>(a.C) % 8 == 0 && a.ldc % 2 == 0 &&
         (!a.bias || reinterpret_cast<uintptr_t>(a.bias) % 8 == 0) &&
         (!a.o16.p || reinterpret_cast<uintptr_t>(a.o16.p) % 4 == 0) &&
         (!a.o16.aux || reinterpret_cast<uintptr_t>(a.o16.aux) % 8 == 0);
}

template <bool NT, int BM, int BN>
void launch_pipe(const PipeArgs& a) {
  using S = PipeShape<NT, BM, BN>;
  // Above 48 KB of dynamic shared memory needs the opt-in, once per kernel (device 0).
  static const cudaError_t opt_in = cudaFuncSetAttribute(
      gemm_pipe_kernel<NT, BM, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(S::kSmem));
  check(opt_in, "cudaFuncSetAttribute(gemm_pipe_kernel)");
  gemm_pipe_kernel<NT, BM, BN><<<tile_grid(a, BM, BN), kThreads, S::kSmem, a.stream>>>(
      a.A, a.lda, a.B, a.ldb, a.C, a.ldc, a.bias, a.M, a.N, a.K, a.beta_one);
}

template <bool NT, int BM, int BN>
void launch_mma(const PipeArgs& a) {
  constexpr size_t smem = mma_smem(BM, BN);
  static const cudaError_t opt_in = cudaFuncSetAttribute(
      gemm_mma_kernel<NT, BM, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  check(opt_in, "cudaFuncSetAttribute(gemm_mma_kernel)");
  gemm_mma_kernel<NT, BM, BN><<<tile_grid(a, BM, BN), kThreads, smem, a.stream>>>(
      a.A, a.lda, a.B, a.ldb, a.C, a.ldc, a.bias, a.M, a.N, a.K, a.beta_one, c_vec(a), a.o16);
}

template <bool NT, int BN, int STAGES = kWStages>
void launch_wgmma(const PipeArgs& a, int splits = 1, int kc = 0, int64_t split_stride = 0) {
  constexpr size_t smem = wgmma_smem(BN, STAGES);
  static const cudaError_t opt_in = cudaFuncSetAttribute(
      gemm_wgmma_kernel<NT, BN, STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  check(opt_in, "cudaFuncSetAttribute(gemm_wgmma_kernel)");
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>(int64_t{tile_grid(a, kWBM, BN)} * splits, int64_t{1} << 30));
  gemm_wgmma_kernel<NT, BN, STAGES><<<grid, kThreads, smem, a.stream>>>(
      a.A, a.lda, a.B, a.ldb, a.C, a.ldc, a.bias, a.M, a.N, a.K, a.beta_one, c_vec(a), splits, kc,
      split_stride, splits == 1 ? a.o16 : Out16{});
}

// cuTensorMapEncodeTiled, from the driver through the runtime (no link against libcuda); null where the
// driver lacks it.
using EncodeTiled = decltype(&cuTensorMapEncodeTiled);
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    return e == cudaSuccess && q == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiled>(p) : nullptr;
  }();
  return fn;
}

// A bf16 row-major matrix [rows, cols] with row stride ld (elements) as TMA boxes of box_cols x box_rows,
// 128-byte swizzled, zero past the edges.
CUtensorMap tensor_map(const uint16_t* base, int64_t rows, int64_t cols, int64_t ld, int box_cols,
                       int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (!encode) throw std::runtime_error("gemm (TMA kernel): the CUDA driver has no cuTensorMapEncodeTiled");
  CUtensorMap map;
  const cuuint64_t dim[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t stride[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<uint16_t*>(base), dim,
                            stride, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("gemm (TMA kernel): cuTensorMapEncodeTiled failed (CUresult " +
                             std::to_string(r) + ") for a " + std::to_string(rows) + " x " +
                             std::to_string(cols) + " operand, ld " + std::to_string(ld));
  return map;
}

template <bool NT, int BN>
void launch_tma(const PipeArgs& a) {
  constexpr size_t smem = tma_smem(BN);
  static const cudaError_t opt_in = cudaFuncSetAttribute(
      gemm_tma_kernel<NT, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  check(opt_in, "cudaFuncSetAttribute(gemm_tma_kernel)");
  const CUtensorMap map_a = tensor_map(a.A, a.M, a.K, a.lda, kWBK, kWBM);
  const CUtensorMap map_b =
      NT ? tensor_map(a.B, a.N, a.K, a.ldb, kWBK, BN) : tensor_map(a.B, a.K, a.N, a.ldb, 64, kWBK);
  // Persistent: one block an SM (the stages take most of its shared memory) walks tiles t, t + grid, ..., so
  // the producer loads the next tile's first stages while the MMA warpgroups store this one's C.
  const unsigned grid = std::min<unsigned>(tile_grid(a, kWBM, BN), static_cast<unsigned>(device_info().sms));
  gemm_tma_kernel<NT, BN><<<grid, kTThreads, smem, a.stream>>>(map_a, map_b, a.C, a.ldc, a.bias, a.M, a.N,
                                                               a.K, a.beta_one, c_vec(a), a.o16);
}

// Calls f(NT, BM, BN) (as std::integral_constant) for B transposed or not, a tile height of 32, 64 or 128 and
// a width of 128 or 256: the one dispatch of the cp.async kernels' instantiations (wgmma's: BM fixed).
template <class F>
void with_shape(bool nt, int bm, int bn, F f) {
  auto width = [&](auto t, auto rows) {
    if (bn == 256)
      f(t, rows, std::integral_constant<int, 256>{});
    else
      f(t, rows, std::integral_constant<int, 128>{});
  };
  auto height = [&](auto t) {
    if (bm == 32)
      width(t, std::integral_constant<int, 32>{});
    else if (bm == 64)
      width(t, std::integral_constant<int, 64>{});
    else
      width(t, std::integral_constant<int, 128>{});
  };
  if (nt)
    height(std::true_type{});
  else
    height(std::false_type{});
}

// Which tensor-core kernel runs a BF16 product. Auto: the mma.sync kernel whenever the operands allow it,
// else the pipelined WMMA kernel where they allow that, else the staged kernel. The tile height is the
// smallest of 32, 64, 128 that holds M, up to 128 (pick_rows); the width 128 for the mma kernel, for the
// pipelined one the width with the smaller wave-quantisation cost: waves of blocks over the SMs (the blocks
// an SM holds) times the columns a wave covers an SM; ties go to 256. On Hopper, auto runs the wgmma kernel
// instead where it was measured faster (wgmma_width).
enum class TcKernel {
  Auto,
  Staged,
  Pipe,
  Pipe128,
  Pipe256,
  Mma128,
  Mma256,
  Wgmma,
  Wgmma128,
  Wgmma256,
  Tma,
  Tma128,
  Tma256,
  Wgmma2,
  CublasLt
};

bool is_tma(TcKernel k) {
  return k == TcKernel::Tma || k == TcKernel::Tma128 || k == TcKernel::Tma256;
}

// A kill switch set to "0" (PRIORTUNE_CUDA_WGMMA, PRIORTUNE_CUDA_TMA).
bool env_off(const char* name) {
  return env_is(name, "0");
}

// PRIORTUNE_CUDA_GEMM = auto (default) | staged | pipe | pipe128 | pipe256 | mma128 | mma256 | wgmma |
// wgmma128 | wgmma256 | wgmma2 | tma | tma128 | tma256: a fixed choice for comparing the kernels on one
// machine (pipe: the pipelined WMMA kernel at auto's width; wgmma2: the wgmma kernel at 128 x 128, three
// stages, two blocks an SM, not yet run on a GPU; wgmma and tma (the TMA-fed wgmma kernel, not yet run on a
// GPU): width 256, or 128 when N <= 128; the cp.async and TMA ones still only where the operands allow them,
// wgmma and tma only on compute capability 9.x, else auto's choice; a fixed width of 256 the device cannot
// hold falls back to 128). Read at every call (a captured graph keeps the kernels it was captured with), so
// one process can compare them. cublaslt: cuBLASLt loaded at run time (cublaslt.cuh; an error where it cannot
// be) for every product whose operands are both bf16 (BF16) or both fp32, a second engine for comparing whole
// steps, not ours.
TcKernel env_kernel() {
  const char* const raw = std::getenv("PRIORTUNE_CUDA_GEMM");
  const std::string v = raw ? raw : "";
  if (v.empty() || v == "auto") return TcKernel::Auto;
  if (v == "staged") return TcKernel::Staged;
  if (v == "pipe") return TcKernel::Pipe;
  if (v == "pipe128") return TcKernel::Pipe128;
  if (v == "pipe256") return TcKernel::Pipe256;
  if (v == "mma128") return TcKernel::Mma128;
  if (v == "mma256") return TcKernel::Mma256;
  if (v == "wgmma") return TcKernel::Wgmma;
  if (v == "wgmma128") return TcKernel::Wgmma128;
  if (v == "wgmma256") return TcKernel::Wgmma256;
  if (v == "tma") return TcKernel::Tma;
  if (v == "tma128") return TcKernel::Tma128;
  if (v == "tma256") return TcKernel::Tma256;
  if (v == "wgmma2") return TcKernel::Wgmma2;
  if (v == "cublaslt") return TcKernel::CublasLt;
  throw std::invalid_argument(
      "PRIORTUNE_CUDA_GEMM must be auto, staged, pipe, pipe128, pipe256, mma128, mma256, wgmma, wgmma128, "
      "wgmma256, wgmma2, tma, tma128, tma256 or cublaslt, got \"" +
      v + "\"");
}

// bf16 operands with 16-byte aligned bases and rows: what both cp.async kernels need of the operands.
bool cp_async_ok(const void* A, int64_t lda, bool a_bf16, const void* B, int64_t ldb, bool b_bf16) {
  return a_bf16 && b_bf16 && aligned16(A) && aligned16(B) && lda % 8 == 0 && ldb % 8 == 0 &&
         device_info().major >= 8;
}

// The wgmma kernel's width, 0 where it does not run: not a wgmma choice or auto, not a Hopper device (the
// sm_90a code; the emulator reports 9.0 too), no room for its stages, or PRIORTUNE_CUDA_WGMMA=0 (a switch
// that keeps it off whatever is asked, e.g. for the rest of a GPU check after it failed there;
// PRIORTUNE_CUDA_TMA=0 does the same for the TMA-fed kernel alone: gemm_with then takes its fixed choices
// as auto). Auto takes it where it was measured faster than the mma.sync kernel (H200, 2026-11-26: 1.1-1.4x
// on every product of the model shapes with M >= 512 and K >= 768, 394 against 276 TFLOP/s at 8192^3; equal
// on the GPT-2 qkv product, K = 768): M > 64 (its tiles are 128 rows; the mma kernel's 32- and 64-row tiles
// serve fewer rows: 20 rows x 128256 x 2048 ran 0.28 against 0.15 ms) and K >= 512 (a short K spends its time
// filling the four stages: 160 x 262144 x 256 screened in 0.64 against 0.57 ms). Its width is the one with
// the smaller wave cost, full waves of one block an SM times the tile's time (a 128 x 256 tile takes 256/394
// against 128/325 for 128 x 128, the two widths' 8192^3 rates), so few-tile products keep the SMs busy.
int wgmma_width(TcKernel kernel, int64_t M, int64_t N, int64_t K) {
  const bool fixed = kernel == TcKernel::Wgmma || kernel == TcKernel::Wgmma128 ||
                     kernel == TcKernel::Wgmma256 || kernel == TcKernel::Wgmma2 || is_tma(kernel);
  if (!fixed && kernel != TcKernel::Auto) return 0;
  if (device_info().major != 9) return 0;
  if (env_off("PRIORTUNE_CUDA_WGMMA")) return 0;
  auto smem = [&](int bn) { return is_tma(kernel) ? tma_smem(bn) : wgmma_smem(bn); };
  if (kernel == TcKernel::Wgmma2) return device_info().smem_optin >= wgmma_smem(128, kW2Stages) ? 128 : 0;
  if (device_info().smem_optin < smem(128)) return 0;
  const bool fits256 = device_info().smem_optin >= smem(256);
  if (kernel == TcKernel::Auto) {
    if (M <= 64 || K < 512) return 0;
    const int64_t tiles_m = ceil_div(M, kWBM), sms = device_info().sms;
    auto cost = [&](int bn) {
      return static_cast<double>(ceil_div(tiles_m * ceil_div(N, bn), sms)) * bn / wgmma_tflops(bn);
    };
    return fits256 && cost(256) <= cost(128) ? 256 : 128;
  }
  const bool wide = kernel == TcKernel::Wgmma256 || kernel == TcKernel::Tma256 ||
                    ((kernel == TcKernel::Wgmma || kernel == TcKernel::Tma) && N > 128);
  return wide && fits256 ? 256 : 128;
}

// Whether the device holds a block of the pipelined (mma = false) or mma kernel of this shape.
bool shape_fits(bool mma, bool nt, int bm, int bn) {
  return device_info().smem_optin >= (mma ? mma_smem(bm, bn) : pipe_smem(nt, bm, bn));
}

// Blocks of a pipelined-kernel shape resident on one SM: the launch bound, or fewer where shared memory
// holds fewer.
int64_t pipe_resident(bool nt, int bm, int bn) {
  const int64_t smem = static_cast<int64_t>(pipe_smem(nt, bm, bn)) + 1024;
  return std::max<int64_t>(1, std::min<int64_t>(pipe_blocks_per_sm(bm, bn),
                                                static_cast<int64_t>(device_info().smem_per_sm) / smem));
}

int pick_rows(int64_t M) {
  return M <= 32 ? 32 : M <= 64 ? 64 : 128;
}

// The mma kernel's auto width is always 128: its 128 x 256 tile holds one block (8 warps) an SM, too few to
// hide the ldmatrix -> mma latency (H100: 235 against 277 TFLOP/s at 8192^3, 0.454 against 0.288 ms for
// the GPT-2 qkv product), so it is only there to be chosen for comparisons.
int pick_width(TcKernel kernel, bool mma, bool nt, int bm, int64_t M, int64_t N) {
  if (kernel == TcKernel::Pipe128 || kernel == TcKernel::Mma128) return 128;
  if ((kernel == TcKernel::Pipe256 || kernel == TcKernel::Mma256) && shape_fits(mma, nt, bm, 256)) return 256;
  if (mma || !shape_fits(mma, nt, bm, 256)) return 128;
  const int64_t tiles_m = ceil_div(M, bm), sms = device_info().sms;
  auto cost = [&](int bn) {
    const int64_t per_sm = pipe_resident(nt, bm, bn);
    return ceil_div(tiles_m * ceil_div(N, bn), per_sm * sms) * bn * per_sm;
  };
  return cost(256) <= cost(128) ? 256 : 128;
}

// Split-K (PRIORTUNE_CUDA_GEMM_SPLITK=1 and a workspace from the caller; not yet run on a GPU). A product of
// fewer wgmma tiles than half the SMs leaves most of them idle for its whole K loop: Llama B2 x 276 has 592
// rows, so its N = 2048 products are 40 tiles of 128 x 256 for 132 SMs. Split into s k-ranges, the tiles
// times s fill the SMs; each range's partial product goes to its own slice of the workspace and
// splitk_reduce_kernel adds the slices in order (then the bias, then C when beta is 1): deterministic.
struct SplitPlan {
  int splits = 1, kc = 0, bn = 0;
};
// About `want` k-ranges of K at width bn: kc rounded up to whole 64-wide k-steps, so the ranges may be fewer.
SplitPlan split_ranges(int64_t K, int64_t want, int bn) {
  SplitPlan p;
  p.kc = static_cast<int>(ceil_div(ceil_div(K, want), kWBK) * kWBK);
  p.splits = static_cast<int>(ceil_div(K, p.kc));
  p.bn = bn;
  return p;
}
// The plan: width bn (128, or 256 where wide fits) and s k-ranges of kc (a multiple of 64, at least 4
// k-steps, s at most 8, the partials at most 2^25 floats), the one with the smallest estimated time in
// microseconds: waves x k-steps a range x a tile's step time (2 x 128 x bn x 64 flops at the width's 8192^3
// rate on an H200, 394 or 325 TFLOP/s, over 132 SMs), plus the partials' traffic (written, read, C written:
// (2 s + 1) M N floats at 3 TB/s); none unless it beats the unsplit product at width `plain` (auto's) by a
// fifth: a product whose tiles leave SMs idle through a long K.
SplitPlan split_plan_for(int64_t M, int64_t N, int64_t K, int plain, bool wide, int64_t sms) {
  auto time = [&](int bn, int64_t splits, int64_t kc) {
    const int64_t waves = ceil_div(ceil_div(M, kWBM) * ceil_div(N, bn) * splits, sms);
    const double step_us = 2.0 * kWBM * bn * kWBK * 132 / (wgmma_tflops(bn) * 1e6);
    const double reduce_us = splits > 1 ? (2.0 * splits + 1) * M * N * 4 / 3e6 : 0.0;
    return static_cast<double>(waves * ceil_div(kc, kWBK)) * step_us + reduce_us;
  };
  const double plain_time = time(plain, 1, K);
  SplitPlan best;
  double best_time = 0.8 * plain_time;
  for (const int bn : {128, 256}) {
    if (bn == 256 && !wide) continue;
    for (int64_t want = 2; want <= std::min<int64_t>(8, K / (4 * kWBK)); ++want) {
      const SplitPlan p = split_ranges(K, want, bn);
      if (p.splits < 2 || p.splits * M * N > (int64_t{1} << 25)) continue;
      const double t = time(bn, p.splits, p.kc);
      if (t < best_time) best_time = t, best = p;
    }
  }
  return best;
}

__global__ void splitk_reduce_kernel(float* C, int64_t ldc, const float* __restrict__ ws, int splits, int M,
                                     int N, const float* __restrict__ bias, bool beta_one) {
  const int64_t total = static_cast<int64_t>(M) * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += ws[s * total + e];
    const int64_t i = e / N, j = e % N;
    if (bias) v += bias[j];
    float* c = C + i * ldc + j;
    *c = beta_one ? *c + v : v;
  }
}

// The split product: the wgmma kernel at width p.bn into ws (p.splits x M x N), then the reduction into C.
void gemm_split(Stream stream, bool b_transposed, int M, int N, int K, const uint16_t* A, int64_t lda,
                const uint16_t* B, int64_t ldb, float* C, int64_t ldc, const float* bias, bool beta_one,
                const SplitPlan& p, float* ws) {
  const PipeArgs args{stream, M, N, K, A, lda, B, ldb, ws, N, nullptr, false};
  const int64_t slice = static_cast<int64_t>(M) * N;
  with_shape(b_transposed, kWBM, p.bn, [&](auto t, auto, auto c) {
    launch_wgmma<decltype(t)::value, decltype(c)::value>(args, p.splits, p.kc, slice);
  });
  check_launch("gemm (split-K)");
  splitk_reduce_kernel<<<grid_for(slice, kThreads), kThreads, 0, stream>>>(C, ldc, ws, p.splits, M, N, bias,
                                                                           beta_one);
  check_launch("gemm (split-K reduction)");
}

// Tail peeling (PRIORTUNE_CUDA_GEMM_PEEL=1, not yet run on a GPU). One wgmma block an SM runs a product in
// waves of SM-count tiles, and the model's shapes often spill a few tiles into a last wave that costs a whole
// wave's time: GPT-2 B32 x 512 has 17024 = 133 x 128 rows, so its N = 768 products are 399 tiles of 128 x 256
// (3 waves and 3 tiles on 132 SMs); Llama B8 x 512 has 4256 = 33 x 128 + 32 rows, so its N = 2048 products
// are 272 tiles (2 waves and 8 tiles whose 128 rows hold 32). Peeling runs the rows of those full waves as
// before and the rest as a second product on the mma.sync kernel with tiles short enough (32, 64 or 128
// rows) to spread over the SMs: a tail of 32 x 128 tiles takes about a quarter to an eighth of a wave of
// 128 x 256 ones. peel_rows_for: the rows of the full waves (a multiple of 128), or 0 when there is no tail
// to peel: fewer than two waves, or a last wave more than half full.
int64_t peel_rows_for(int64_t M, int64_t N, int bn, int64_t sms) {
  const int64_t tiles_n = ceil_div(N, bn), tiles_m = ceil_div(M, kWBM), tiles = tiles_m * tiles_n;
  const int64_t waves = ceil_div(tiles, sms), tail = tiles - (waves - 1) * sms;
  if (waves < 2 || 2 * tail > sms) return 0;
  const int64_t rows_tiles = (waves - 1) * sms / tiles_n;
  return rows_tiles > 0 && rows_tiles < tiles_m ? rows_tiles * kWBM : 0;
}
// The mma.sync tile height for the peeled rows (bm x 128 tiles, two blocks an SM), or 0 when peeling does not
// pay: the tail's estimated time, in units of the wave it replaces (a 128 x bn wgmma tile an SM), must stay
// under 0.6. A wave of mma tiles does 2 bm x 128 an SM against the wgmma wave's 128 x bn, at 278 against 394
// TFLOP/s (H200, 8192^3), so it costs (2 bm / bn) (394 / 278) of it; a tall remainder (a 4096-query kNN
// block's 128 rows x 32768) needs so many short tiles that it would cost more than the wave.
int peel_height(int64_t rows, int64_t N, int bn, int64_t sms) {
  int best = 0;
  double best_cost = 0.6;
  for (int bm : {32, 64, 128}) {
    const double waves = static_cast<double>(ceil_div(ceil_div(rows, bm) * ceil_div(N, 128), 2 * sms));
    const double cost = waves * (2.0 * bm / bn) * (wgmma_tflops(256) / kMmaTflops);
    if (cost < best_cost) best = bm, best_cost = cost;
  }
  return best;
}

// Returns whether the kernel also wrote o16 (the register-epilogue ones: wgmma, TMA, mma.sync); the others
// leave it to the caller.
bool gemm_with(TcKernel kernel, Stream stream, GemmPrecision precision, bool b_transposed, int64_t M,
               int64_t N, int64_t K, const void* A, int64_t lda, bool a_bf16, const void* B, int64_t ldb,
               bool b_bf16, float* C, int64_t ldc, const float* bias, float beta, int force_bm = 0,
               Out16 o16 = {}) {
  if (is_tma(kernel) && env_off("PRIORTUNE_CUDA_TMA")) kernel = TcKernel::Auto;
  auto bad = [&](const std::string& msg) {
    return std::invalid_argument(std::string("gemm (") + precision_name(precision) +
                                 (b_transposed ? ", NT): " : ", NN): ") + msg);
  };
  if (M < 1 || N < 1 || K < 1 || M > kMaxDim || N > kMaxDim || K > kMaxDim)
    throw bad("M, N, K must be in [1, " + std::to_string(kMaxDim) + "], got M=" + std::to_string(M) +
              " N=" + std::to_string(N) + " K=" + std::to_string(K));
  if (!A || !B || !C) throw bad("A, B and C must be non-null");
  const int64_t b_row = b_transposed ? K : N;
  if (lda < K || ldb < b_row || ldc < N)
    throw bad("leading dimension too small: lda=" + std::to_string(lda) + " (K=" + std::to_string(K) +
              "), ldb=" + std::to_string(ldb) + " (" + std::to_string(b_row) +
              "), ldc=" + std::to_string(ldc) + " (N=" + std::to_string(N) + ")");
  if (beta != 0.0f && beta != 1.0f) throw bad("beta must be 0 or 1, got " + std::to_string(beta));
  if (precision != GemmPrecision::BF16 && precision != GemmPrecision::TF32 &&
      precision != GemmPrecision::FP32)
    throw bad("unknown precision");
  if ((a_bf16 || b_bf16) && precision != GemmPrecision::BF16)
    throw bad("bf16 operands need the BF16 precision");
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const bool beta_one = beta == 1.0f;
  const float* af = static_cast<const float*>(A);
  const uint16_t* ah = static_cast<const uint16_t*>(A);
  bool wrote16 = false;
  if (precision == GemmPrecision::BF16) {
    const int bm = force_bm ? force_bm : pick_rows(M);
    const bool pipe = kernel == TcKernel::Pipe || kernel == TcKernel::Pipe128 || kernel == TcKernel::Pipe256;
    const bool cp_async = kernel != TcKernel::Staged && cp_async_ok(A, lda, a_bf16, B, ldb, b_bf16);
    const PipeArgs args{stream, m, n,   k,    ah,       lda, static_cast<const uint16_t*>(B),
                        ldb,    C, ldc, bias, beta_one, o16};
    const int wg_width = cp_async ? wgmma_width(kernel, M, N, K) : 0;
    const bool mma = cp_async && !pipe && shape_fits(true, b_transposed, bm, 128);
    wrote16 = o16.p && (wg_width || mma);
    if (wg_width && is_tma(kernel)) {
      with_shape(b_transposed, kWBM, wg_width,
                 [&](auto t, auto, auto c) { launch_tma<decltype(t)::value, decltype(c)::value>(args); });
    } else if (wg_width && kernel == TcKernel::Wgmma2) {
      if (b_transposed)
        launch_wgmma<true, 128, kW2Stages>(args);
      else
        launch_wgmma<false, 128, kW2Stages>(args);
    } else if (wg_width) {
      with_shape(b_transposed, kWBM, wg_width,
                 [&](auto t, auto, auto c) { launch_wgmma<decltype(t)::value, decltype(c)::value>(args); });
    } else if (mma) {
      with_shape(b_transposed, bm, pick_width(kernel, true, b_transposed, bm, M, N),
                 [&](auto t, auto r, auto c) {
                   launch_mma<decltype(t)::value, decltype(r)::value, decltype(c)::value>(args);
                 });
    } else if (cp_async && shape_fits(false, b_transposed, bm, 128)) {
      with_shape(b_transposed, bm, pick_width(kernel, false, b_transposed, bm, M, N),
                 [&](auto t, auto r, auto c) {
                   launch_pipe<decltype(t)::value, decltype(r)::value, decltype(c)::value>(args);
                 });
    } else if (a_bf16 && b_bf16) {
      launch_tc<__nv_bfloat16, uint16_t, uint16_t>(stream, b_transposed, m, n, k, ah, lda,
                                                   static_cast<const uint16_t*>(B), ldb, C, ldc, bias,
                                                   beta_one);
    } else if (a_bf16) {
      launch_tc<__nv_bfloat16, uint16_t, float>(stream, b_transposed, m, n, k, ah, lda,
                                                static_cast<const float*>(B), ldb, C, ldc, bias, beta_one);
    } else if (b_bf16) {
      launch_tc<__nv_bfloat16, float, uint16_t>(stream, b_transposed, m, n, k, af, lda,
                                                static_cast<const uint16_t*>(B), ldb, C, ldc, bias, beta_one);
    } else {
      launch_tc<__nv_bfloat16, float, float>(stream, b_transposed, m, n, k, af, lda,
                                             static_cast<const float*>(B), ldb, C, ldc, bias, beta_one);
    }
  } else if (precision == GemmPrecision::TF32) {
    launch_tc<float, float, float>(stream, b_transposed, m, n, k, af, lda, static_cast<const float*>(B), ldb,
                                   C, ldc, bias, beta_one);
  } else {
    const dim3 grid = grid_2d(M, N, kFM, kFN);
    const float* b = static_cast<const float*>(B);
    if (b_transposed)
      gemm_fp32_kernel<true><<<grid, kThreads, 0, stream>>>(af, lda, b, ldb, C, ldc, bias, m, n, k, beta_one);
    else
      gemm_fp32_kernel<false>
          <<<grid, kThreads, 0, stream>>>(af, lda, b, ldb, C, ldc, bias, m, n, k, beta_one);
  }
  check_launch("gemm");
  return wrote16;
}

}  // namespace

// Rows [0, M1) as `kernel` chooses, rows [M1, M) on the mma.sync kernel at tile height bm (the peeled tail).
bool gemm_peeled(TcKernel kernel, Stream stream, bool b_transposed, int64_t M, int64_t N, int64_t K,
                 const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                 const float* bias, float beta, int64_t M1, int bm, Out16 o16) {
  const bool first = gemm_with(kernel, stream, GemmPrecision::BF16, b_transposed, M1, N, K, A, lda, true, B,
                               ldb, true, C, ldc, bias, beta, 0, o16);
  Out16 rest = o16;  // the tail's rows of the copy, and of GELU's input for its gradient
  if (rest.p) rest.p += M1 * ldc;
  if (rest.aux) rest.aux += M1 * ldc;
  const bool second =
      gemm_with(TcKernel::Mma128, stream, GemmPrecision::BF16, b_transposed, M - M1, N, K, A + M1 * lda, lda,
                true, B, ldb, true, C + M1 * ldc, ldc, bias, beta, bm, rest);
  return first && second;
}

// The split plan of a BF16 product with bf16 operands (none unless PRIORTUNE_CUDA_GEMM_SPLITK=1, the kernel
// choice is auto and auto picks a wgmma width).
SplitPlan split_plan(TcKernel kernel, int64_t M, int64_t N, int64_t K) {
  if (!env_is("PRIORTUNE_CUDA_GEMM_SPLITK", "1") || kernel != TcKernel::Auto) return {};
  const int bn = wgmma_width(kernel, M, N, K);
  return bn ? split_plan_for(M, N, K, bn, device_info().smem_optin >= wgmma_smem(256), device_info().sms)
            : SplitPlan{};
}

int64_t gemm_workspace_floats(GemmPrecision precision, int64_t M, int64_t N, int64_t K) {
  if (precision != GemmPrecision::BF16 || M < 1 || N < 1 || K < 1 || M > kMaxDim || N > kMaxDim ||
      K > kMaxDim)
    return 0;
  const SplitPlan p = split_plan(env_kernel(), M, N, K);
  return p.splits > 1 ? p.splits * M * N : 0;
}

// gemm's product on `kernel` (PRIORTUNE_CUDA_GEMM's choice); returns whether it also wrote o16.
bool product_on(TcKernel kernel, Stream stream, GemmPrecision precision, bool b_transposed, int64_t M,
                int64_t N, int64_t K, const void* A, int64_t lda, bool a_bf16, const void* B, int64_t ldb,
                bool b_bf16, float* C, int64_t ldc, const float* bias, float beta, float* workspace,
                int64_t workspace_floats, Out16 o16) {
  if (kernel == TcKernel::CublasLt) {
    const bool bf16 = precision == GemmPrecision::BF16;
    if (A && B && C && M > 0 && N > 0 && K > 0 && a_bf16 == bf16 && b_bf16 == bf16) {
      cublaslt_product(stream, precision, b_transposed, M, N, K, A, lda, B, ldb, C, ldc, bias, beta);
      return false;
    }
    kernel = TcKernel::Auto;  // mixed operands (or nothing to multiply): ours
  }
  const bool fast = precision == GemmPrecision::BF16 && A && B && C && M > 0 && N > 0 && K > 0 &&
                    M <= kMaxDim && N <= kMaxDim && K <= kMaxDim && lda >= K && ldc >= N &&
                    ldb >= (b_transposed ? K : N) && (beta == 0.0f || beta == 1.0f) &&
                    cp_async_ok(A, lda, a_bf16, B, ldb, b_bf16);
  if (fast && workspace) {
    const SplitPlan p = split_plan(kernel, M, N, K);
    if (p.splits > 1 && workspace_floats >= p.splits * M * N) {
      gemm_split(stream, b_transposed, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                 static_cast<const uint16_t*>(A), lda, static_cast<const uint16_t*>(B), ldb, C, ldc, bias,
                 beta == 1.0f, p, workspace);
      return false;
    }
  }
  if (fast && env_is("PRIORTUNE_CUDA_GEMM_PEEL", "1") && !is_tma(kernel) && kernel != TcKernel::Wgmma2) {
    const int bn = wgmma_width(kernel, M, N, K);
    const int64_t sms = device_info().sms;
    const int64_t M1 = bn ? peel_rows_for(M, N, bn, sms) : 0;
    const int bm = M1 ? peel_height(M - M1, N, bn, sms) : 0;
    if (bm > 0) {
      return gemm_peeled(kernel, stream, b_transposed, M, N, K, static_cast<const uint16_t*>(A), lda,
                         static_cast<const uint16_t*>(B), ldb, C, ldc, bias, beta, M1, bm, o16);
    }
  }
  return gemm_with(kernel, stream, precision, b_transposed, M, N, K, A, lda, a_bf16, B, ldb, b_bf16, C, ldc,
                   bias, beta, 0, o16);
}

void gemm(Stream stream, GemmPrecision precision, bool b_transposed, int64_t M, int64_t N, int64_t K,
          const void* A, int64_t lda, bool a_bf16, const void* B, int64_t ldb, bool b_bf16, float* C,
          int64_t ldc, const float* bias, float beta, float* workspace, int64_t workspace_floats, bf16_t* c16,
          Out16Op op, const float* aux) {
  if (c16 && ldc != N)
    throw std::invalid_argument("gemm: a bf16 copy (c16) needs ldc == N, got ldc=" + std::to_string(ldc) +
                                " N=" + std::to_string(N));
  if (c16 && op == Out16Op::GeluGrad && !aux)
    throw std::invalid_argument("gemm: Out16Op::GeluGrad needs aux (GELU's input)");
  const bool fused16 = !env_off("PRIORTUNE_CUDA_GEMM_OUT16");
  const Out16 o16{fused16 ? c16 : nullptr, op, op == Out16Op::GeluGrad ? aux : nullptr};
  const bool wrote16 = product_on(env_kernel(), stream, precision, b_transposed, M, N, K, A, lda, a_bf16, B,
                                  ldb, b_bf16, C, ldc, bias, beta, workspace, workspace_floats, o16);
  // The paths without the register epilogue (and PRIORTUNE_CUDA_GEMM_OUT16=0): the same values from C.
  if (c16 && !wrote16 && M > 0 && N > 0) {
    if (op == Out16Op::Gelu)
      gelu_forward(stream, c16, C, M * N);
    else if (op == Out16Op::GeluGrad)
      gelu_backward(stream, c16, aux, C, M * N);
    else
      to_bf16(stream, c16, C, M * N);
  }
}

void gemm(Stream stream, GemmPrecision precision, bool b_transposed, int64_t M, int64_t N, int64_t K,
          const void* A, int64_t lda, bool a_bf16, const void* B, int64_t ldb, bool b_bf16, float* C,
          int64_t ldc, const float* bias, float beta) {
  gemm(stream, precision, b_transposed, M, N, K, A, lda, a_bf16, B, ldb, b_bf16, C, ldc, bias, beta, nullptr,
       0);
}

void to_bf16(Stream stream, bf16_t* dst, const float* src, int64_t n) {
  if (n < 0) throw std::invalid_argument("to_bf16: n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  if (!dst || !src) throw std::invalid_argument("to_bf16: dst and src must be non-null");
  const bool vec = aligned16(src) && reinterpret_cast<uintptr_t>(dst) % 8 == 0;
  to_bf16_kernel<<<grid_for(vec ? std::max<int64_t>(n / 4, 1) : n, kThreads), kThreads, 0, stream>>>(dst, src,
                                                                                                     n, vec);
  check_launch("to_bf16");
}

// --- Self-test -------------------------------------------------------------------------------------------
namespace {

struct GemmCase {
  int64_t M, N, K;
  int64_t pad, align;  // ld = round_up(row length + pad, align)
  int64_t offset;      // elements by which A, B, C and bias start past their allocations
  bool beta_one, bias;
};

int64_t round_up(int64_t x, int64_t a) {
  return ceil_div(x, a) * a;
}

// rel_error over the M x N region at `offset` with leading dimension ldc; every element outside it must be
// bit-identical (the kernel must not write there): otherwise the error is infinite.
double region_error(const std::vector<float>& got, const std::vector<float>& want, int64_t M, int64_t N,
                    int64_t ldc, int64_t offset) {
  std::vector<float> g, w;
  g.reserve(static_cast<size_t>(M * N));
  w.reserve(static_cast<size_t>(M * N));
  bool outside_ok = true;
  for (size_t i = 0; i < want.size(); ++i) {
    const int64_t rel = static_cast<int64_t>(i) - offset;
    if (rel >= 0 && rel % ldc < N) {
      g.push_back(got[i]);
      w.push_back(want[i]);
    } else if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      outside_ok = false;
    }
  }
  return outside_ok ? rel_error(g, w) : INFINITY;
}

}  // namespace

std::vector<OpCheck> selftest_gemm() {
  check(cudaSetDevice(0), "cudaSetDevice");
  std::vector<OpCheck> out;
  const GemmCase cases[] = {
      {1, 1, 1, 0, 1, 0, false, false},      {77, 50257, 64, 0, 1, 0, false, false},
      {128, 768, 768, 0, 1, 0, false, true}, {65, 203, 100, 1, 8, 0, false, true},
      {33, 130, 70, 3, 1, 1, true, true},    {300, 64, 2304, 0, 1, 0, false, false},
      {257, 520, 136, 0, 8, 0, true, true},  {1100, 300, 40, 0, 8, 0, false, true},
      {20, 1000, 264, 0, 8, 0, false, true}, {50, 300, 72, 0, 8, 8, true, true},
      {3, 130, 40, 0, 8, 0, false, false},
  };
  uint32_t seed = 1000;
  for (const GemmCase& cs : cases) {
    for (const bool nt : {true, false}) {
      const int64_t M = cs.M, N = cs.N, K = cs.K, off = cs.offset;
      const int64_t lda = round_up(K + cs.pad, cs.align), ldc = round_up(N + cs.pad, cs.align);
      const int64_t ldb = round_up((nt ? K : N) + cs.pad, cs.align);
      const int64_t b_rows = nt ? N : K, b_cols = nt ? K : N;
      const size_t size_a = static_cast<size_t>(off + (M - 1) * lda + K);
      const size_t size_b = static_cast<size_t>(off + (b_rows - 1) * ldb + b_cols);
      const size_t size_c = static_cast<size_t>(off + (M - 1) * ldc + N);
      const std::vector<float> a = random_vector(size_a, ++seed), b = random_vector(size_b, ++seed);
      const std::vector<float> bias = random_vector(static_cast<size_t>(off + N), ++seed);
      std::vector<float> c0;
      if (cs.beta_one) {
        c0 = random_vector(size_c, ++seed);
      } else {  // C is not read with beta == 0: NaN inside the product's region, a marker outside it
        c0.assign(size_c, 0.5f);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) c0[static_cast<size_t>(off + i * ldc + j)] = NAN;
      }
      std::vector<float> a_r(size_a), b_r(size_b);
      std::vector<uint16_t> a_bits(size_a), b_bits(size_b);
      for (size_t i = 0; i < size_a; ++i) {
        a_bits[i] = host_bf16_bits(a[i]);
        a_r[i] = host_bf16_value(a_bits[i]);
      }
      for (size_t i = 0; i < size_b; ++i) {
        b_bits[i] = host_bf16_bits(b[i]);
        b_r[i] = host_bf16_value(b_bits[i]);
      }
      const float beta = cs.beta_one ? 1.0f : 0.0f;
      auto reference = [&](const std::vector<float>& ha, const std::vector<float>& hb) {
        std::vector<float> r = c0;
        pt::sgemm(false, nt, M, N, K, 1.0f, ha.data() + off, lda, hb.data() + off, ldb, beta, r.data() + off,
                  ldc, 4);
        if (cs.bias)
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) r[static_cast<size_t>(off + i * ldc + j)] += bias[off + j];
        return r;
      };
      const std::vector<float> ref_f = reference(a, b), ref_b = reference(a_r, b_r);

      DeviceBuffer<float> d_a = to_device(a), d_b = to_device(b), d_bias = to_device(bias),
                          d_c = to_device(c0);
      DeviceBuffer<uint16_t> d_bits = to_device(b_bits), d_abits = to_device(a_bits);
      auto run = [&](GemmPrecision p, bool b_bf16, bool a_bf16 = false, TcKernel kernel = TcKernel::Auto) {
        check(cudaMemcpy(d_c.get(), c0.data(), size_c * sizeof(float), cudaMemcpyHostToDevice),
              "copy to device");
        const void* dA = a_bf16 ? static_cast<const void*>(d_abits.get() + off)
                                : static_cast<const void*>(d_a.get() + off);
        const void* dB =
            b_bf16 ? static_cast<const void*>(d_bits.get() + off) : static_cast<const void*>(d_b.get() + off);
        gemm_with(kernel, nullptr, p, nt, M, N, K, dA, lda, a_bf16, dB, ldb, b_bf16, d_c.get() + off, ldc,
                  cs.bias ? d_bias.get() + off : nullptr, beta);
        return to_host(d_c.get(), size_c);
      };

      std::string shape = std::string(nt ? "NT" : "NN") + " M=" + std::to_string(M) +
                          " N=" + std::to_string(N) + " K=" + std::to_string(K);
      if (lda != K || ldb != b_cols || ldc != N)
        shape +=
            " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc);
      if (off) shape += " offset=" + std::to_string(off);
      if (cs.beta_one) shape += " beta=1";
      if (cs.bias) shape += " bias";

      const double kd = static_cast<double>(K);
      const double tol_fp32 = 1e-5 * std::max(1.0, std::sqrt(kd / 768.0));
      const double tol_bf16 = 1e-5 + kd * std::ldexp(1.0, -26);
      const std::string note_fp32 =
          "fp32 FMA vs the CPU sgemm: only the order of additions differs (rounding walk grows like sqrt(K))";
      const std::string note_tf32 =
          "tf32 operands keep 10 mantissa bits (2^-11 relative each), fp32 accumulation, K up to 2304; "
          "reference in full fp32";
      const std::string note_bf16 =
          "reference on the same RN-even bf16-rounded A and B: bf16 products are exact in fp32, so only the "
          "accumulation differs (tensor cores may round toward zero once per k-block: K/8 ulps allowed)";
      out.push_back(make_check("gemm fp32", shape,
                               region_error(run(GemmPrecision::FP32, false), ref_f, M, N, ldc, off), tol_fp32,
                               note_fp32));
      out.push_back(make_check("gemm tf32", shape,
                               region_error(run(GemmPrecision::TF32, false), ref_f, M, N, ldc, off), 5e-3,
                               note_tf32));
      out.push_back(make_check("gemm bf16", shape,
                               region_error(run(GemmPrecision::BF16, true), ref_b, M, N, ldc, off), tol_bf16,
                               note_bf16 + "; B uploaded as bf16"));
      out.push_back(make_check("gemm bf16 (fp32 B)", shape,
                               region_error(run(GemmPrecision::BF16, false), ref_b, M, N, ldc, off), tol_bf16,
                               note_bf16 + "; B converted on the fly"));
      // Both operands bf16 in memory (as the model passes them): the staged kernel, and the pipelined WMMA
      // and mma.sync ones at both tile widths wherever their alignment rules let them take the product.
      out.push_back(make_check(
          "gemm bf16 (bf16 A, staged)", shape,
          region_error(run(GemmPrecision::BF16, true, true, TcKernel::Staged), ref_b, M, N, ldc, off),
          tol_bf16, note_bf16 + "; A and B uploaded as bf16"));
      if (!cp_async_ok(d_abits.get() + off, lda, true, d_bits.get() + off, ldb, true)) continue;
      for (const TcKernel fixed :
           {TcKernel::Pipe128, TcKernel::Pipe256, TcKernel::Mma128, TcKernel::Mma256}) {
        const bool mma = fixed == TcKernel::Mma128 || fixed == TcKernel::Mma256;
        const int bn = fixed == TcKernel::Pipe128 || fixed == TcKernel::Mma128 ? 128 : 256;
        if (!shape_fits(mma, nt, pick_rows(M), bn)) continue;
        out.push_back(make_check(
            std::string("gemm bf16 (bf16 A, ") + (mma ? "mma.sync " : "pipelined ") + std::to_string(bn) +
                ")",
            shape, region_error(run(GemmPrecision::BF16, true, true, fixed), ref_b, M, N, ldc, off), tol_bf16,
            note_bf16 + (mma ? "; A and B uploaded as bf16, cp.async stages, ldmatrix + mma.sync m16n8k16"
                             : "; A and B uploaded as bf16, cp.async stages, WMMA")));
      }
      for (const TcKernel fixed :
           {TcKernel::Wgmma128, TcKernel::Wgmma256, TcKernel::Wgmma2, TcKernel::Tma128, TcKernel::Tma256}) {
        const int bn = wgmma_width(fixed, M, N, K);
        const bool tma = is_tma(fixed), two = fixed == TcKernel::Wgmma2;
        if (bn != (fixed == TcKernel::Wgmma128 || two || fixed == TcKernel::Tma128 ? 128 : 256) ||
            (tma && env_off("PRIORTUNE_CUDA_TMA")))
          continue;  // not Hopper, no room for it, or switched off
        out.push_back(make_check(
            std::string("gemm bf16 (bf16 A, ") +
                (tma   ? "tma "
                 : two ? "wgmma2 "
                       : "wgmma ") +
                std::to_string(bn) + ")",
            shape, region_error(run(GemmPrecision::BF16, true, true, fixed), ref_b, M, N, ldc, off), tol_bf16,
            note_bf16 +
                (tma ? "; A and B uploaded as bf16, TMA loads in the 128-byte swizzle from a producer warp, "
                       "mbarrier stages, wgmma m64nNk16 from shared memory"
                     : "; A and B uploaded as bf16, cp.async stages in the 128-byte swizzle, wgmma "
                       "m64nNk16 from shared memory")));
      }
      // Split-K (PRIORTUNE_CUDA_GEMM_SPLITK): the wgmma kernel (width 128) over 2 and 3 k-ranges into a
      // workspace, reduced into C in order (with the bias, and C when beta is 1).
      if (wgmma_width(TcKernel::Wgmma128, M, N, K) == 128) {
        int last = 1;
        for (const int64_t want : {2, 3}) {
          const SplitPlan sp = split_ranges(K, want, 128);
          if (sp.splits == last) continue;  // 1, or the same ranges as the previous row
          last = sp.splits;
          DeviceBuffer<float> ws(static_cast<size_t>(sp.splits * M * N));
          check(cudaMemcpy(d_c.get(), c0.data(), size_c * sizeof(float), cudaMemcpyHostToDevice),
                "copy to device");
          gemm_split(nullptr, nt, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                     d_abits.get() + off, lda, d_bits.get() + off, ldb, d_c.get() + off, ldc,
                     cs.bias ? d_bias.get() + off : nullptr, cs.beta_one, sp, ws.get());
          out.push_back(make_check("gemm bf16 (bf16 A, split-K " + std::to_string(sp.splits) + ")", shape,
                                   region_error(to_host(d_c.get(), size_c), ref_b, M, N, ldc, off), tol_bf16,
                                   note_bf16 + "; wgmma partial products over k-ranges, added in order"));
        }
      }
      // Tail peeling (PRIORTUNE_CUDA_GEMM_PEEL): the first 128-row block as auto chooses, the rest on the
      // mma.sync kernel at each tile height, written where the one product would have written.
      if (M > 128) {
        for (const int bm : {32, 64, 128}) {
          check(cudaMemcpy(d_c.get(), c0.data(), size_c * sizeof(float), cudaMemcpyHostToDevice),
                "copy to device");
          gemm_peeled(TcKernel::Auto, nullptr, nt, M, N, K, d_abits.get() + off, lda, d_bits.get() + off, ldb,
                      d_c.get() + off, ldc, cs.bias ? d_bias.get() + off : nullptr, beta, 128, bm, Out16{});
          out.push_back(make_check("gemm bf16 (bf16 A, peeled at 128, tail " + std::to_string(bm) + " rows)",
                                   shape, region_error(to_host(d_c.get(), size_c), ref_b, M, N, ldc, off),
                                   tol_bf16, note_bf16 + "; rows past 128 on the mma.sync kernel"));
        }
      }
    }
  }

  // Tail peeling's arithmetic on issue #5's shapes at 132 SMs: the rows of the full waves, 0 when nothing is
  // peeled; the tail's tile height.
  {
    struct PeelCase {
      int64_t M, N;
      int bn;
      int64_t want_rows;
      int want_bm;
    };
    const PeelCase peel_cases[] = {
        {17024, 768, 256, 16896, 32},   // GPT-2 B32 x 512, N = 768: 399 tiles, 3 tiles past 3 waves
        {17024, 2304, 256, 16896, 32},  // its qkv: 1197 tiles, 9 past 9 waves
        {4256, 2048, 256, 4224, 32},    // Llama B8 x 512, N = 2048: 272 tiles, 8 past 2 waves
        {5336, 50257, 256, 0, 0},       // an LM-head chunk: its last wave 90 of 132 tiles, more than half
        {4096, 32768, 256, 3968, 0},    // a kNN score block: 4 tiles past 31 waves, but 128 x 32768 to redo
        {2208, 768, 128, 0, 0},         // GPT-2 B8 x 256: one wave
    };
    for (const PeelCase& pc : peel_cases) {
      const int64_t rows = peel_rows_for(pc.M, pc.N, pc.bn, 132);
      const int bm = rows ? peel_height(pc.M - rows, pc.N, pc.bn, 132) : 0;
      out.push_back(make_check("gemm peel_rows_for",
                               "M=" + std::to_string(pc.M) + " N=" + std::to_string(pc.N),
                               rows == pc.want_rows && bm == pc.want_bm ? 0.0 : 1.0, 0.0,
                               "the rows of the full waves and the tail's tile height, exact"));
    }
  }

  // Split-K's plan on issue #5's shapes at 132 SMs (auto's unsplit width given): the width, the number of
  // k-ranges and their length, or none.
  {
    const SplitPlan o = split_plan_for(552, 2048, 2048, 128, true, 132);      // Llama B2 x 276 o_proj
    const SplitPlan d = split_plan_for(552, 2048, 8192, 128, true, 132);      // its down projection
    const SplitPlan gi = split_plan_for(552, 2048, 16384, 128, true, 132);    // its gate/up input gradient
    const SplitPlan h = split_plan_for(512, 2048, 128256, 128, true, 132);    // its LM-head input gradient
    const SplitPlan g = split_plan_for(552, 16384, 2048, 256, true, 132);     // its gate/up: 5 x 64 tiles
    const SplitPlan b8 = split_plan_for(2208, 768, 768, 128, true, 132);      // GPT-2 B8 x 256 qkv-sized
    const SplitPlan big = split_plan_for(17024, 768, 3072, 256, true, 132);   // GPT-2 B32: many waves
    const SplitPlan shortk = split_plan_for(552, 2048, 384, 128, true, 132);  // K too short
    auto row = [&](const char* what, const SplitPlan& p, int bn, int splits, int kc) {
      out.push_back(make_check("gemm split_plan_for", what,
                               p.bn == bn && p.splits == splits && p.kc == kc ? 0.0 : 1.0, 0.0,
                               "width, k-ranges and their length, exact (bn 0: no split)"));
    };
    row("M=552 N=2048 K=2048", o, 0, 1, 0);  // 27 us unsplit: the partials' traffic eats the gain
    row("M=552 N=2048 K=8192", d, 256, 3, 2752);
    row("M=552 N=2048 K=16384", gi, 256, 3, 5504);
    row("M=512 N=2048 K=128256", h, 256, 4, 32064);
    row("M=552 N=16384 K=2048", g, 0, 1, 0);
    row("M=2208 N=768 K=768", b8, 0, 1, 0);
    row("M=17024 N=768 K=3072", big, 0, 1, 0);
    row("M=552 N=2048 K=384", shortk, 0, 1, 0);
  }

  // The bf16 copy beside C (c16): each register-epilogue kernel writes bf16 of C, of GELU of C, or of GELU's
  // gradient at aux with C as dout, with the bits to_bf16 / gelu_forward / gelu_backward give from the C the
  // same kernel writes without a copy; the other kernels leave it alone, and gemm always delivers those bits;
  // a c16 with ldc != N is refused.
  {
    struct Case16 {
      int64_t M, N, K;
      bool beta_one;
    };
    const std::pair<const char*, Out16Op> ops[] = {
        {"", Out16Op::Copy}, {", gelu", Out16Op::Gelu}, {", gelu grad", Out16Op::GeluGrad}};
    for (const Case16& c : {Case16{130, 200, 96, false}, Case16{70, 131, 64, true}}) {
      for (const bool nt : {true, false}) {
        const int64_t M = c.M, N = c.N, K = c.K;
        std::vector<uint16_t> a_bits(M * K), b_bits(N * K);
        const std::vector<float> a = random_vector(M * K, ++seed), b = random_vector(N * K, ++seed);
        for (int64_t i = 0; i < M * K; ++i) a_bits[i] = host_bf16_bits(a[i]);
        for (int64_t i = 0; i < N * K; ++i) b_bits[i] = host_bf16_bits(b[i]);
        const std::vector<float> bias = random_vector(N, ++seed), c0 = random_vector(M * N, ++seed, 2.0f);
        const std::vector<float> aux = random_vector(M * N, ++seed, 3.0f);
        DeviceBuffer<uint16_t> d_a = to_device(a_bits), d_b = to_device(b_bits), d_16(M * N), d_ref(M * N);
        DeviceBuffer<float> d_bias = to_device(bias), d_aux = to_device(aux), d_c(M * N);
        const float beta = c.beta_one ? 1.0f : 0.0f;
        const std::string shape = std::string(nt ? "NT" : "NN") + " M=" + std::to_string(M) +
                                  " N=" + std::to_string(N) + " K=" + std::to_string(K) + " bias" +
                                  (c.beta_one ? " beta=1" : "");
        auto reset = [&] {
          check(cudaMemcpy(d_c.get(), c0.data(), M * N * sizeof(float), cudaMemcpyHostToDevice), "copy");
          check(cudaMemset(d_16.get(), 0xff, M * N * sizeof(uint16_t)), "memset");
        };
        // The copy's bits as the separate pass makes them from the C in d_c.
        auto expected = [&](Out16Op op) {
          if (op == Out16Op::Gelu)
            gelu_forward(nullptr, d_ref.get(), d_c.get(), M * N);
          else if (op == Out16Op::GeluGrad)
            gelu_backward(nullptr, d_ref.get(), d_aux.get(), d_c.get(), M * N);
          else
            to_bf16(nullptr, d_ref.get(), d_c.get(), M * N);
          return to_host(d_ref.get(), M * N);
        };
        auto mismatches = [&](const std::vector<uint16_t>& got, const std::vector<uint16_t>& want) {
          double n = 0;
          for (int64_t i = 0; i < M * N; ++i) n += got[i] != want[i];
          return n;
        };
        const std::pair<const char*, TcKernel> kernels[] = {
            {"auto", TcKernel::Auto},     {"mma128", TcKernel::Mma128}, {"wgmma", TcKernel::Wgmma},
            {"wgmma2", TcKernel::Wgmma2}, {"tma", TcKernel::Tma},       {"pipe", TcKernel::Pipe},
            {"staged", TcKernel::Staged}};
        for (const auto& kp : kernels)
          for (const auto& [oname, op] : ops) {
            const TcKernel kernel = kp.second;
            const char* kname = kp.first;
            auto run = [&](Out16 o16) {
              reset();
              return gemm_with(kernel, nullptr, GemmPrecision::BF16, nt, M, N, K, d_a.get(), K, true,
                               d_b.get(), nt ? K : N, true, d_c.get(), N, d_bias.get(), beta, 0, o16);
            };
            run(Out16{});
            const std::vector<uint16_t> want = expected(op);
            const bool wrote = run(Out16{d_16.get(), op, d_aux.get()});
            const std::vector<uint16_t> got = to_host(d_16.get(), M * N);
            out.push_back(make_check(
                std::string("gemm bf16 copy (") + kname + oname + ")", shape,
                mismatches(got, wrote ? want : std::vector<uint16_t>(static_cast<size_t>(M * N), 0xffff)),
                0.0,
                wrote ? "written by the epilogue: the bits the separate pass gives from this kernel's C (err "
                        "counts mismatching elements)"
                      : "this kernel leaves the copy to gemm: untouched"));
          }
        // Tail peeling (PRIORTUNE_CUDA_GEMM_PEEL): rows past 128 on the mma.sync kernel, their copy and GELU
        // gradient input (aux) rows offset like C's.
        if (M > 128)
          for (const auto& [oname, op] : ops) {
            auto run = [&](Out16 o16) {
              reset();
              return gemm_peeled(TcKernel::Auto, nullptr, nt, M, N, K, d_a.get(), K, d_b.get(), nt ? K : N,
                                 d_c.get(), N, d_bias.get(), beta, 128, 32, o16);
            };
            run(Out16{});
            const std::vector<uint16_t> want = expected(op);
            const bool wrote = run(Out16{d_16.get(), op, d_aux.get()});
            out.push_back(make_check(std::string("gemm bf16 copy (peeled at 128") + oname + ")", shape,
                                     mismatches(to_host(d_16.get(), M * N), want) + (wrote ? 0 : 1), 0.0,
                                     "both parts' epilogues write it: the separate pass's bits"));
          }
        for (const auto& [oname, op] : ops) {
          reset();
          gemm(nullptr, GemmPrecision::BF16, nt, M, N, K, d_a.get(), K, true, d_b.get(), nt ? K : N, true,
               d_c.get(), N, d_bias.get(), beta, nullptr, 0);
          const std::vector<uint16_t> want = expected(op);
          reset();
          gemm(nullptr, GemmPrecision::BF16, nt, M, N, K, d_a.get(), K, true, d_b.get(), nt ? K : N, true,
               d_c.get(), N, d_bias.get(), beta, nullptr, 0, d_16.get(), op, d_aux.get());
          out.push_back(make_check(std::string("gemm bf16 copy (public") + oname + ")", shape,
                                   mismatches(to_host(d_16.get(), M * N), want), 0.0,
                                   "gemm's copy: the separate pass's bits"));
        }
      }
    }
    bool refused = false;
    try {
      gemm(nullptr, GemmPrecision::BF16, true, 2, 2, 2, reinterpret_cast<const void*>(16), 2, true,
           reinterpret_cast<const void*>(16), 2, true, reinterpret_cast<float*>(16), 4, nullptr, 0.0f,
           nullptr, 0, reinterpret_cast<bf16_t*>(16));
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    out.push_back(make_check("gemm bf16 copy (ldc != N)", "M=2 N=2 ldc=4", refused ? 0.0 : 1.0, 0.0,
                             "refused before anything runs"));
  }

  // to_bf16: bit-exact against the host RN-even conversion, ties and signed zero included.
  {
    std::vector<float> src = random_vector(4093, ++seed, 3.0f);
    for (uint32_t bits : {0x3f808000u, 0x3f818000u, 0x3f808001u, 0xbf808000u, 0xbf818000u, 0x80000000u,
                          0x7f7fffffu, 0x00000000u, 0x4b7fff80u}) {
      float f;
      std::memcpy(&f, &bits, 4);
      src.push_back(f);
    }
    DeviceBuffer<float> d_src = to_device(src);
    DeviceBuffer<uint16_t> d_dst(src.size());
    to_bf16(nullptr, d_dst.get(), d_src.get(), static_cast<int64_t>(src.size()));
    const std::vector<uint16_t> got = to_host(d_dst.get(), src.size());
    double mismatches = 0;
    for (size_t i = 0; i < src.size(); ++i) mismatches += got[i] != host_bf16_bits(src[i]);
    out.push_back(make_check("to_bf16", "n=" + std::to_string(src.size()), mismatches, 0.0,
                             "bit-exact round to nearest even (err counts mismatching elements)"));
  }
  return out;
}

}  // namespace cuda
}  // namespace pt
