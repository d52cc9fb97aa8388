// Fused causal attention on tensor cores (AttentionPrecision::BF16 of priortune/cuda_ops.h): the same
// kernels, block split, scratch and semantics as attention.cu's fp32 path, with every matrix product on
// WMMA (bf16 m16n16k16 fragments, fp32 accumulators). Taken for hd a multiple of 16 up to 128.
//
// Numerics: Q, K, V and dO are rounded to bf16 (nearest even) while staged in shared memory; P and dS are
// computed in fp32 and rounded to bf16 as operands. Scores, softmax statistics, lse, delta and all
// accumulations are fp32.
//
// Layout: 128 threads = 4 warps; query tiles and key tiles of 64 rows, 16 per warp. Operand tiles are bf16
// [64][D + 8] (D = 64 or 128 >= hd; the 16-byte pad puts the eight 16-byte rows of a fragment load in
// distinct banks and keeps every fragment pointer 32-byte aligned); only the first hd columns are written
// or read. Each warp owns a 16-row strip: its products go to a per-warp fp32 strip [16][D + 4] through
// store_matrix_sync, and masks and softmax work on that strip with lane (r, h) = (lane / 2, lane % 2)
// taking row r, columns 2t + h (row reductions: one xor shuffle). P and dS go to a per-warp bf16 strip
// [16][64 + 8] that is loaded back as a matrix_a fragment. Fragments are only loaded, stored, filled and
// multiplied (their element-to-thread mapping is never used); __syncwarp orders a warp's strip traffic.
// Dynamic shared memory for D = 128 (64): forward 93 KB (53), dk/dv 111 KB (63), dq 110 KB (62), so two
// blocks fit an H100 SM, as __launch_bounds__(128, 2) asks of the registers.
//   forward   block (b, h, query tile); key tiles from 0 to the causal limit, K and V staged together.
//             O stays in accumulator fragments. Online softmax with a lazy reference max: the row's
//             reference m moves only when a tile's max exceeds it by more than kRescaleNats (P <= e^8, no
//             overflow), so O is rescaled (stored to the strip, scaled by row, reloaded) only then; the
//             result is the same softmax. No visible key: out = 0, lse = -inf.
//   backward  attention.cu runs delta = dout . out and the prefix batch sum; here B: block (b, g, key
//             tile), warp w owns 16 keys: S^T = K Q^T, P^T = exp(scale S^T - lse) (kept in registers),
//             dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q; token rows to dqkv,
//             prefix rows to the per-batch partials. C: block (b, h, query tile): S = Q K^T, dP = dO V^T,
//             dS, dQ += dS K for rows < q_rows, zeros after.
// One writer per output element, fixed summation order, no atomics: bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include "attention.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace pt {
namespace cuda {
namespace attn {
namespace {

using namespace nvcuda;

constexpr int kWarps = 4, kTcThreads = 32 * kWarps;
constexpr int kBQ = 16 * kWarps, kBK = 16 * kWarps;  // query / key tile rows: 16 per warp
constexpr int kLdB = 64 + 8;                         // bf16 strip stride (P, dS: 64 columns)
constexpr float kRescaleNats = 8.0f;
static_assert(kBQ == 64 && kBK == 64, "the softmax lanes cover 64 columns: 32 lanes x 2");

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// dst[r * (D + 8) + c] = bf16(row(r)[c]) for c < hd (0 for a null row); columns >= hd are not written.
// 4-float chunks, loaded in batches of 4 per thread before they are converted and stored.
template <int D, int ROWS, class RowFn>
__device__ __forceinline__ void load_tile_bf16(__nv_bfloat16* dst, int hd, RowFn row) {
  constexpr int kChunks = D / 4, kIters = ROWS * kChunks / kTcThreads, kBatch = 4;
  static_assert(kIters % kBatch == 0, "tile loads come in whole batches");
#pragma unroll 1
  for (int it0 = 0; it0 < kIters; it0 += kBatch) {
    float4 v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = threadIdx.x + (it0 + u) * kTcThreads, r = idx / kChunks, c = (idx % kChunks) * 4;
      const float* src = c < hd ? row(r) : nullptr;
      v[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (src != nullptr) {
        src += c;
        if ((reinterpret_cast<uintptr_t>(src) & 15) == 0)
          v[u] = *reinterpret_cast<const float4*>(src);
        else
          v[u] = make_float4(src[0], src[1], src[2], src[3]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = threadIdx.x + (it0 + u) * kTcThreads, r = idx / kChunks, c = (idx % kChunks) * 4;
      if (c < hd)
        *reinterpret_cast<uint2*>(dst + r * (D + 8) + c) =
            make_uint2(pack_bf16x2(v[u].x, v[u].y), pack_bf16x2(v[u].z, v[u].w));
    }
  }
}

// A tile's rows queued as 16-byte cp.async copies: dst[r * LD + c] = row(r)[c] for c < hd, elements of T
// (fp32 into kStaged's dense stage, LD = D; bf16 into a kDirect tile, LD = D + 8); a null row is zero filled
// from `any` (a valid address, never read). Columns >= hd are not written. The caller commits the group;
// every source row and `any` must be 16-byte aligned (runnable).
template <int D, int ROWS, int LD, class T, class RowFn>
__device__ __forceinline__ void queue_rows_async(T* dst, int hd, const T* any, RowFn row) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T)), kChunks = D / kPer,
                kIters = ROWS * kChunks / kTcThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = threadIdx.x + it * kTcThreads, r = idx / kChunks, c = (idx % kChunks) * kPer;
    if (c >= hd) continue;
    const T* src = row(r);
    if (src != nullptr)
      __pipeline_memcpy_async(dst + r * LD + c, src + c, 16);
    else
      __pipeline_memcpy_async(dst + r * LD + c, any, 16, 16);
  }
}

// The cp.async staging of PRIORTUNE_CUDA_ATTN=async: a tile's fp32 rows queued into a dense stage [ROWS][D]
// while the previous tile is multiplied, then rounded into the bf16 tile (convert_tile) once they have
// landed.
template <int D, int ROWS, class RowFn>
__device__ __forceinline__ void stage_tile_async(float* stage, int hd, const float* any, RowFn row) {
  queue_rows_async<D, ROWS, D>(stage, hd, any, row);
}

// dst[r * (D + 8) + c] = bf16(stage[r * D + c]) for c < hd: the same values load_tile_bf16 writes.
template <int D, int ROWS>
__device__ __forceinline__ void convert_tile(__nv_bfloat16* dst, const float* stage, int hd) {
  constexpr int kChunks = D / 4, kIters = ROWS * kChunks / kTcThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = threadIdx.x + it * kTcThreads, r = idx / kChunks, c = (idx % kChunks) * 4;
    if (c >= hd) continue;
    const float4 v = *reinterpret_cast<const float4*>(stage + r * D + c);
    *reinterpret_cast<uint2*>(dst + r * (D + 8) + c) =
        make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
  }
}

// How the walkers fill their operand tiles (template parameter L): kSync rounds the fp32 rows into the tiles
// while the block waits (load_tile_bf16; the WMMA kernels and AttnKernel::Mma); kStaged (MmaAsync) queues the
// next tiles' fp32 rows by cp.async into an fp32 stage while the current ones are multiplied and rounds them
// into the tiles once landed; kDirect (MmaBf16) queues the next tiles' rows from the caller's bf16 copies by
// cp.async straight into a second pair of tiles, swapped in once landed (half the bytes, no rounding pass).
constexpr int kSync = 0, kStaged = 1, kDirect = 2;

// The pair of tiles a walker fills for each step (K and V, or Q and dO) and where the next pair is queued:
// the fp32 stage [2][64][D] (kStaged) or the tiles n0, n1 (kDirect).
struct TilePair {
  __nv_bfloat16* t0;
  __nv_bfloat16* t1;
  __nv_bfloat16* n0 = nullptr;
  __nv_bfloat16* n1 = nullptr;
  float* stage = nullptr;
};

// kDirect: the bf16 tile dst [ROWS][D + 8] queued from bf16 rows: the tile load_tile_bf16 writes from the
// fp32 rows these were rounded from.
template <int D, int ROWS, class RowFn>
__device__ __forceinline__ void copy_tile_async(__nv_bfloat16* dst, int hd, const bf16_t* any, RowFn row) {
  queue_rows_async<D, ROWS, D + 8>(reinterpret_cast<bf16_t*>(dst), hd, any, row);
}

// A kernel's own tile (loaded once, before its walk): rounded from the fp32 rows now, or (kDirect) queued
// from the bf16 rows, committed with the walk's first tiles.
template <int D, int ROWS, int L, class Row32, class Row16>
__device__ __forceinline__ void own_tile(__nv_bfloat16* dst, const AttnArgs& a, Row32 row32, Row16 row16) {
  if (L == kDirect)
    copy_tile_async<D, ROWS>(dst, a.hd, a.qkv16, row16);
  else
    load_tile_bf16<D, ROWS>(dst, a.hd, row32);
}

// Queues a pair's next tiles (kStaged, kDirect) from two row sources (fp32 and bf16 of each) and commits.
template <int D, int L, class A32, class B32, class A16, class B16>
__device__ __forceinline__ void queue_pair(const AttnArgs& a, const TilePair& tp, A32 a32, B32 b32, A16 a16,
                                           B16 b16) {
  static_assert(kBK == 64 && kBQ == 64, "a pair is two 64-row tiles");
  if (L == kStaged) {
    stage_tile_async<D, 64>(tp.stage, a.hd, a.qkv, a32);
    stage_tile_async<D, 64>(tp.stage + 64 * D, a.hd, a.qkv, b32);
  } else {
    copy_tile_async<D, 64>(tp.n0, a.hd, a.qkv16, a16);
    copy_tile_async<D, 64>(tp.n1, a.hd, a.qkv16, b16);
  }
  __pipeline_commit();
}

// The walkers' kStaged / kDirect step: this thread's queued copies land, the barrier (everyone's have, and
// the previous tiles' readers are done), then the stage is rounded into t0, t1 (kStaged) or the landed pair
// is swapped in (kDirect; the old pair is the next one to fill).
template <int D, int L>
__device__ __forceinline__ void land_pair(TilePair& tp, int hd) {
  __pipeline_wait_prior(0);
  __syncthreads();
  if (L == kStaged) {
    convert_tile<D, 64>(tp.t0, tp.stage, hd);
    convert_tile<D, 64>(tp.t1, tp.stage + 64 * D, hd);
  } else {
    __nv_bfloat16* t = tp.t0;
    tp.t0 = tp.n0;
    tp.n0 = t;
    t = tp.t1;
    tp.t1 = tp.n1;
    tp.n1 = t;
  }
}

// The K and V rows of key tile k0 (kv head g, sequence b) queued into the pair's next tiles and committed.
template <int D, int L>
__device__ __forceinline__ void queue_key_tile(const AttnArgs& a, int b, int g, int k0, const TilePair& kv) {
  queue_pair<D, L>(
      a, kv, [&](int rr) { return key_row(a, b, g, k0 + rr, false); },
      [&](int rr) { return key_row(a, b, g, k0 + rr, true); },
      [&](int rr) { return key_row16(a, b, g, k0 + rr, false); },
      [&](int rr) { return key_row16(a, b, g, k0 + rr, true); });
}

// acc[j] = A[16 x hd] . B^T for the four 16-row blocks j of B: A rows of stride LDT from sA, B rows (64 of
// them, stride LDT) from sB. Used for S = Q K^T, S^T = K Q^T, dP = dO V^T and dP^T = V dO^T.
template <int D>
__device__ __forceinline__ void strip_dot(const __nv_bfloat16* sA, const __nv_bfloat16* sB, int hd,
                                          Acc (&acc)[4]) {
  constexpr int LDT = D + 8;
#pragma unroll
  for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.0f);
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd) {
    if (kd * 16 < hd) {
      FragA fa;
      wmma::load_matrix_sync(fa, sA + kd * 16, LDT);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        FragBCol fb;
        wmma::load_matrix_sync(fb, sB + j * 16 * LDT + kd * 16, LDT);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
}

// acc[n] += P[16 x 64] . B[64 x hd] for the column blocks n < hd / 16: P from a bf16 strip (stride kLdB),
// B rows of stride LDT. Used for O += P V, dV += P^T dO, dK += dS^T Q and dQ += dS K.
template <int D>
__device__ __forceinline__ void strip_pv(const __nv_bfloat16* sP, const __nv_bfloat16* sB, int hd,
                                         Acc (&acc)[D / 16]) {
  constexpr int LDT = D + 8;
#pragma unroll
  for (int kb = 0; kb < 4; ++kb) {
    FragA fa;
    wmma::load_matrix_sync(fa, sP + kb * 16, kLdB);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      if (n * 16 < hd) {
        FragBRow fb;
        wmma::load_matrix_sync(fb, sB + kb * 16 * LDT + n * 16, LDT);
        wmma::mma_sync(acc[n], fa, fb, acc[n]);
      }
    }
  }
}

template <int N>
__device__ __forceinline__ void store_strip(float* strip, int ldf, const Acc (&acc)[N], int ncols) {
#pragma unroll
  for (int n = 0; n < N; ++n)
    if (n * 16 < ncols) wmma::store_matrix_sync(strip + n * 16, acc[n], ldf, wmma::mem_row_major);
}

// Row rr of a warp's fp32 strip (hd columns), times s, to dst (global): lanes take 4 columns each.
__device__ __forceinline__ void write_row(float* dst, const float* src, int hd, float s) {
  const int lane = threadIdx.x & 31;
  for (int c = 4 * lane; c < hd; c += 128) {
    const float4 v = *reinterpret_cast<const float4*>(src + c);
    if ((reinterpret_cast<uintptr_t>(dst + c) & 15) == 0) {
      *reinterpret_cast<float4*>(dst + c) = make_float4(s * v.x, s * v.y, s * v.z, s * v.w);
    } else {
      dst[c] = s * v.x;
      dst[c + 1] = s * v.y;
      dst[c + 2] = s * v.z;
      dst[c + 3] = s * v.w;
    }
  }
}

// The forward's and the dq kernels' walk over the key tiles that the query tile's rows below q_lim can see
// (all prefix keys, tokens below q_lim): K and V as bf16 tiles kv.t0, kv.t1 and the keys' validity, then
// step(k0) in each warp (rows from wq0) with a row below q_lim that sees a key of the tile. kStaged, kDirect:
// the caller has queued key tile 0 (queue_key_tile; q_lim > 0, so there is one), and tile k0 + kBK is queued
// while tile k0 is multiplied (kDirect: kv.t0, kv.t1 change from tile to tile).
template <int D, int L, class Step>
__device__ __forceinline__ void for_key_tiles(const AttnArgs& a, int b, int g, int q_lim, int wq0,
                                              TilePair& kv, int* sValid, Step&& step) {
  const int tid = threadIdx.x;
  const int nkeys = a.Pp + q_lim;
  for (int k0 = 0; k0 < nkeys; k0 += kBK) {
    if (L == kSync) {
      __syncthreads();  // the previous tile's readers of the tiles are done (and the kernel's own are loaded)
      load_tile_bf16<D, kBK>(kv.t0, a.hd, [&](int rr) { return key_row(a, b, g, k0 + rr, false); });
      load_tile_bf16<D, kBK>(kv.t1, a.hd, [&](int rr) { return key_row(a, b, g, k0 + rr, true); });
    } else {
      land_pair<D, L>(kv, a.hd);
    }
    if (tid < kBK) sValid[tid] = key_valid(a, b, k0 + tid);
    __syncthreads();
    if (L != kSync && k0 + kBK < nkeys) queue_key_tile<D, L>(a, b, g, k0 + kBK, kv);  // the next pair is free
    if (wq0 >= q_lim || k0 - a.Pp > wq0 + 15) continue;  // no row of this warp needs this tile
    step(k0);
  }
}

// --- Forward --------------------------------------------------------------------------------------------
// Shared memory: sQ, sK, sV bf16 [64][D+8]; per warp an fp32 strip [16][D+4] and a bf16 strip [16][64+8];
// valid[64].
template <int D>
constexpr size_t fwd_tc_smem() {
  return 3 * static_cast<size_t>(64) * (D + 8) * 2 + kWarps * static_cast<size_t>(16) * (D + 4) * 4 +
         kWarps * static_cast<size_t>(16) * kLdB * 2 + kBK * 4;
}

template <int D>
__global__ void __launch_bounds__(kTcThreads, 2)
    attn_fwd_tc_kernel(AttnArgs a, float* __restrict__ out, float* __restrict__ lse, int nqt) {
  constexpr int LDT = D + 8, LDF = D + 4, NF = D / 16;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_tc);
  __nv_bfloat16* sK = sQ + kBQ * LDT;
  __nv_bfloat16* sV = sK + kBK * LDT;
  float* sF = reinterpret_cast<float*>(sV + kBK * LDT);
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(sF + kWarps * 16 * LDF);
  int* sValid = reinterpret_cast<int*>(sB + kWarps * 16 * kLdB);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 1, hf = lane & 1;  // softmax: strip row r, columns 2t + hf
  const unsigned nbh = static_cast<unsigned>(a.B * a.H);
  const int bh = static_cast<int>(blockIdx.x % nbh);
  const int qt = nqt - 1 - static_cast<int>(blockIdx.x / nbh);  // the longest (last) query tiles first
  const int b = bh / a.H, h = bh % a.H, g = h / a.group;
  const int q0 = qt * kBQ, q_end = min(q0 + kBQ, a.S);
  const int wq0 = q0 + 16 * warp, qi = wq0 + r;  // the warp's first row; this lane's softmax row
  float* strip = sF + warp * 16 * LDF;
  __nv_bfloat16* bstrip = sB + warp * 16 * kLdB;
  load_tile_bf16<D, kBQ>(sQ, a.hd, [&](int rr) { return q_row(a, b, h, q0 + rr); });

  Acc o[NF];
#pragma unroll
  for (int n = 0; n < NF; ++n) wmma::fill_fragment(o[n], 0.0f);
  float m_ref = -INFINITY;  // the row's exponent reference (-inf until a key is visible)
  float l_part = 0.0f;      // this lane's share of the row sum of exp(s - m_ref)

  // Rows below q_end: a warp whose first row is past it is past S too (q_end is S or the tile's end).
  TilePair kv{sK, sV};
  for_key_tiles<D, kSync>(a, b, g, q_end, wq0, kv, sValid, [&](int k0) {
    {
      Acc s[4];
      strip_dot<D>(sQ + 16 * warp * LDT, sK, a.hd, s);
      store_strip(strip, LDF, s, 64);
    }
    __syncwarp();
    float x[32], mx = -INFINITY;
    const float* srow = strip + r * LDF;
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const int c = 2 * t + hf;
      const bool vis = sValid[c] != 0 && k0 + c - a.Pp <= qi;
      x[t] = vis ? srow[c] * a.scale : -INFINITY;
      mx = fmaxf(mx, x[t]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    // The reference moves only when the tile's max exceeds it by more than kRescaleNats (or it was -inf).
    const float m_new = mx > m_ref + kRescaleNats ? mx : m_ref;
    const float alpha = (m_ref == -INFINITY || m_new == m_ref) ? 1.0f : expf(m_ref - m_new);
    m_ref = m_new;
    float part = 0.0f;
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const float pr = x[t] == -INFINITY ? 0.0f : expf(x[t] - m_new);
      bstrip[r * kLdB + 2 * t + hf] = __float2bfloat16_rn(pr);
      part += pr;
    }
    l_part = l_part * alpha + part;
    const bool rescale = __any_sync(0xffffffffu, alpha != 1.0f);
    __syncwarp();   // P is complete; the scores have been read
    if (rescale) {  // O rows *= alpha through the strip (warp-uniform branch)
      store_strip(strip, LDF, o, a.hd);
      __syncwarp();
      for (int c = hf; c < a.hd; c += 2) strip[r * LDF + c] *= alpha;
      __syncwarp();
#pragma unroll
      for (int n = 0; n < NF; ++n)
        if (n * 16 < a.hd) wmma::load_matrix_sync(o[n], strip + n * 16, LDF, wmma::mem_row_major);
    }
    strip_pv<D>(bstrip, sV, a.hd, o);
  });

  const float total = l_part + __shfl_xor_sync(0xffffffffu, l_part, 1);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // no visible key: zeros
  if (hf == 0 && qi < a.S)
    lse[(static_cast<int64_t>(b) * a.H + h) * a.S + qi] = total > 0.0f ? m_ref + logf(total) : -INFINITY;
  __syncwarp();  // the last tile's strip readers are done
  store_strip(strip, LDF, o, a.hd);
  __syncwarp();
  float* obase = out + static_cast<int64_t>(b) * a.S * a.H * a.hd + static_cast<int64_t>(h) * a.hd;
  for (int rr = 0; rr < 16; ++rr) {
    const float inv_r = __shfl_sync(0xffffffffu, inv, 2 * rr);
    const int i = wq0 + rr;
    if (i < a.S) write_row(obase + static_cast<int64_t>(i) * a.H * a.hd, strip + rr * LDF, a.hd, inv_r);
  }
}

// --- Backward --------------------------------------------------------------------------------------------
// The dk/dv kernels' walk over the query tiles that can see key tile k0 (all when it holds a prefix key, else
// from the first token's tile): for each query head of kv head g and each such tile, Q and dO are staged as
// bf16 tiles and lse, delta as fp32 rows, then step(q0) runs in each warp whose keys (from wk0) are not past
// the end and start at or before the tile's last query. kStaged, kDirect: the caller has queued the first
// tile (queue_query_tile with query_tile(.., 0)), and each next one is queued while the current one is
// multiplied (kDirect: qd.t0, qd.t1 change from tile to tile).
struct QueryTile {
  int h, q0;
};
__device__ __forceinline__ int query_tiles_first(const AttnArgs& a, int k0) {
  return k0 < a.Pp ? 0 : (k0 - a.Pp) / kBQ;
}
// Item `it` of the walk: head g * group + it / n, query tile qt0 + it % n (n tiles a head).
__device__ __forceinline__ QueryTile query_tile(const AttnArgs& a, int g, int k0, int it) {
  const int qt0 = query_tiles_first(a, k0), n = (a.S + kBQ - 1) / kBQ - qt0;
  return {g * a.group + it / n, (qt0 + it % n) * kBQ};
}
// The Q and dO rows of query tile t (sequence b) queued into the pair's next tiles and committed.
template <int D, int L>
__device__ __forceinline__ void queue_query_tile(const AttnArgs& a, const BwdPtrs& p, int b, QueryTile t,
                                                 const TilePair& qd) {
  queue_pair<D, L>(
      a, qd, [&](int rr) { return q_row(a, b, t.h, t.q0 + rr); },
      [&](int rr) { return dout_row(a, p.dout, b, t.h, t.q0 + rr); },
      [&](int rr) { return q_row_in(a, a.qkv16, b, t.h, t.q0 + rr); },
      [&](int rr) { return dout_row(a, p.dout16, b, t.h, t.q0 + rr); });
}

template <int D, int L, class Step>
__device__ __forceinline__ void for_query_tiles(const AttnArgs& a, const BwdPtrs& p, int b, int g, int k0,
                                                int wk0, TilePair& qd, float* sLse, float* sDel,
                                                Step&& step) {
  const int tid = threadIdx.x;
  const int items = a.group * ((a.S + kBQ - 1) / kBQ - query_tiles_first(a, k0));
  for (int it = 0; it < items; ++it) {
    const QueryTile t = query_tile(a, g, k0, it);
    const int64_t row0 = (static_cast<int64_t>(b) * a.H + t.h) * a.S;  // lse / delta of (b, h)
    if (L == kSync) {
      __syncthreads();  // the previous step's readers of the tiles are done
      load_tile_bf16<D, kBQ>(qd.t0, a.hd, [&](int rr) { return q_row(a, b, t.h, t.q0 + rr); });
      load_tile_bf16<D, kBQ>(qd.t1, a.hd, [&](int rr) { return dout_row(a, p.dout, b, t.h, t.q0 + rr); });
    } else {
      land_pair<D, L>(qd, a.hd);
    }
    if (tid < kBQ) {
      const int i = t.q0 + tid;
      sLse[tid] = i < a.S ? p.lse[row0 + i] : 0.0f;
      sDel[tid] = i < a.S ? p.delta[row0 + i] : 0.0f;
    }
    __syncthreads();
    if (L != kSync && it + 1 < items) queue_query_tile<D, L>(a, p, b, query_tile(a, g, k0, it + 1), qd);
    if (wk0 >= a.Pp + a.S || wk0 - a.Pp > min(t.q0 + kBQ, a.S) - 1) continue;
    step(t.q0);
  }
}

// Kernel B. Shared memory: sK, sV, sQ, sdO bf16 [64][D+8]; per warp an fp32 strip [16][D+4] and a bf16
// strip [16][64+8]; lse, delta [64]; valid [64].
template <int D>
constexpr size_t kv_tc_smem() {
  return 4 * static_cast<size_t>(64) * (D + 8) * 2 + kWarps * static_cast<size_t>(16) * (D + 4) * 4 +
         kWarps * static_cast<size_t>(16) * kLdB * 2 + (2 * kBQ + kBK) * 4;
}

template <int D>
__global__ void __launch_bounds__(kTcThreads, 2) attn_bwd_kv_tc_kernel(AttnArgs a, BwdPtrs p) {
  constexpr int LDT = D + 8, LDF = D + 4, NF = D / 16;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem_tc);
  __nv_bfloat16* sV = sK + kBK * LDT;
  __nv_bfloat16* sQ = sV + kBK * LDT;
  __nv_bfloat16* sdO = sQ + kBQ * LDT;
  float* sF = reinterpret_cast<float*>(sdO + kBQ * LDT);
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(sF + kWarps * 16 * LDF);
  float* sLse = reinterpret_cast<float*>(sB + kWarps * 16 * kLdB);
  float* sDel = sLse + kBQ;
  int* sValid = reinterpret_cast<int*>(sDel + kBQ);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 1, hf = lane & 1;  // strip row r (a key), columns 2t + hf (queries)
  const unsigned nbg = static_cast<unsigned>(a.B * a.KV);
  const int bg = static_cast<int>(blockIdx.x % nbg);
  const int kt = static_cast<int>(blockIdx.x / nbg);  // the first key tiles (most queries) first
  const int b = bg / a.KV, g = bg % a.KV;
  const int k0 = kt * kBK, wk0 = k0 + 16 * warp;  // the block's and the warp's first key
  const int jr = wk0 + r - a.Pp;                  // this lane's key as a token index (< 0: prefix)
  float* strip = sF + warp * 16 * LDF;
  __nv_bfloat16* bstrip = sB + warp * 16 * kLdB;

  load_tile_bf16<D, kBK>(sK, a.hd, [&](int rr) { return key_row(a, b, g, k0 + rr, false); });
  load_tile_bf16<D, kBK>(sV, a.hd, [&](int rr) { return key_row(a, b, g, k0 + rr, true); });
  if (tid < kBK) sValid[tid] = key_valid(a, b, k0 + tid);

  Acc dk[NF], dv[NF];
#pragma unroll
  for (int n = 0; n < NF; ++n) {
    wmma::fill_fragment(dk[n], 0.0f);
    wmma::fill_fragment(dv[n], 0.0f);
  }

  TilePair qd{sQ, sdO};
  for_query_tiles<D, kSync>(a, p, b, g, k0, wk0, qd, sLse, sDel, [&](int q0) {
    {
      Acc s[4];
      strip_dot<D>(sK + 16 * warp * LDT, sQ, a.hd, s);  // S^T: rows keys, columns queries
      store_strip(strip, LDF, s, 64);
    }
    __syncwarp();
    const bool valid = sValid[16 * warp + r] != 0;
    const float* srow = strip + r * LDF;
    float pr[32];
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const int q = 2 * t + hf, i = q0 + q;
      const bool vis = valid && i < a.S && jr <= i;
      pr[t] = vis ? expf(srow[q] * a.scale - sLse[q]) : 0.0f;
      bstrip[r * kLdB + q] = __float2bfloat16_rn(pr[t]);
    }
    __syncwarp();
    strip_pv<D>(bstrip, sdO, a.hd, dv);  // dV += P^T dO
    {
      Acc dp[4];
      strip_dot<D>(sV + 16 * warp * LDT, sdO, a.hd, dp);  // dP^T
      store_strip(strip, LDF, dp, 64);
    }
    __syncwarp();  // dP^T is complete; the P^T fragment loads are done
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const int q = 2 * t + hf;
      bstrip[r * kLdB + q] = __float2bfloat16_rn(pr[t] * (srow[q] - sDel[q]));  // dS^T
    }
    __syncwarp();
    strip_pv<D>(bstrip, sQ, a.hd, dk);  // dK += dS^T Q (scale applied on store)
  });

  // Token keys to dqkv, prefix keys to this sequence's partials; keys past the end have no row.
  __syncwarp();
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 0)
      store_strip(strip, LDF, dk, a.hd);
    else
      store_strip(strip, LDF, dv, a.hd);
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int kk = wk0 + rr;
      float* dst;
      if (kk < a.Pp) {
        dst = (pass == 0 ? p.part_k : p.part_v) + ((static_cast<int64_t>(b) * a.Pp + kk) * a.KV + g) * a.hd;
      } else {
        const int j = kk - a.Pp;
        if (j >= a.S) break;
        dst = p.dqkv + (static_cast<int64_t>(b) * a.S + j) * a.ld +
              static_cast<int64_t>(a.H + (pass == 0 ? 0 : a.KV) + g) * a.hd;
      }
      write_row(dst, strip + rr * LDF, a.hd, pass == 0 ? a.scale : 1.0f);
    }
    __syncwarp();
  }
}

// Kernel C. Shared memory: sQ, sdO, sK, sV bf16 [64][D+8]; per warp an fp32 strip [16][D+4] and a bf16
// strip [16][64+8]; valid [64].
template <int D>
constexpr size_t q_tc_smem() {
  return 4 * static_cast<size_t>(64) * (D + 8) * 2 + kWarps * static_cast<size_t>(16) * (D + 4) * 4 +
         kWarps * static_cast<size_t>(16) * kLdB * 2 + kBK * 4;
}

template <int D>
__global__ void __launch_bounds__(kTcThreads, 2) attn_bwd_q_tc_kernel(AttnArgs a, BwdPtrs p, int nqt) {
  constexpr int LDT = D + 8, LDF = D + 4, NF = D / 16;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_tc);
  __nv_bfloat16* sdO = sQ + kBQ * LDT;
  __nv_bfloat16* sK = sdO + kBQ * LDT;
  __nv_bfloat16* sV = sK + kBK * LDT;
  float* sF = reinterpret_cast<float*>(sV + kBK * LDT);
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(sF + kWarps * 16 * LDF);
  int* sValid = reinterpret_cast<int*>(sB + kWarps * 16 * kLdB);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 1, hf = lane & 1;  // strip row r (a query), columns 2t + hf (keys)
  const unsigned nbh = static_cast<unsigned>(a.B * a.H);
  const int bh = static_cast<int>(blockIdx.x % nbh);
  const int qt = nqt - 1 - static_cast<int>(blockIdx.x / nbh);
  const int b = bh / a.H, h = bh % a.H, g = h / a.group;
  const int q0 = qt * kBQ, q_end = min(q0 + kBQ, a.S), q_lim = min(q_end, p.q_rows);
  const int wq0 = q0 + 16 * warp, qi = wq0 + r;
  float* dq_base = p.dqkv + static_cast<int64_t>(b) * a.S * a.ld + static_cast<int64_t>(h) * a.hd;

  if (q0 >= q_lim) {  // no row of this tile needs dq: zeros (uniform across the block, before any barrier)
    for (int i = q0 + warp; i < q_end; i += kWarps)
      for (int d = lane; d < a.hd; d += 32) dq_base[static_cast<int64_t>(i) * a.ld + d] = 0.0f;
    return;
  }

  float* strip = sF + warp * 16 * LDF;
  __nv_bfloat16* bstrip = sB + warp * 16 * kLdB;
  load_tile_bf16<D, kBQ>(sQ, a.hd, [&](int rr) { return q_row(a, b, h, q0 + rr); });
  load_tile_bf16<D, kBQ>(sdO, a.hd, [&](int rr) { return dout_row(a, p.dout, b, h, q0 + rr); });
  const int64_t row0 = (static_cast<int64_t>(b) * a.H + h) * a.S;
  const float lse_r = qi < a.S ? p.lse[row0 + qi] : 0.0f;
  const float del_r = qi < a.S ? p.delta[row0 + qi] : 0.0f;
  Acc dq[NF];
#pragma unroll
  for (int n = 0; n < NF; ++n) wmma::fill_fragment(dq[n], 0.0f);

  TilePair kv{sK, sV};
  for_key_tiles<D, kSync>(a, b, g, q_lim, wq0, kv, sValid, [&](int k0) {
    {
      Acc s[4];
      strip_dot<D>(sQ + 16 * warp * LDT, sK, a.hd, s);
      store_strip(strip, LDF, s, 64);
    }
    __syncwarp();
    const float* srow = strip + r * LDF;
    float pr[32];
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const int c = 2 * t + hf;
      const bool vis = sValid[c] != 0 && qi < q_lim && k0 + c - a.Pp <= qi;
      pr[t] = vis ? expf(srow[c] * a.scale - lse_r) : 0.0f;
    }
    __syncwarp();  // the scores have been read
    {
      Acc dp[4];
      strip_dot<D>(sdO + 16 * warp * LDT, sV, a.hd, dp);
      store_strip(strip, LDF, dp, 64);
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < 32; ++t) {
      const int c = 2 * t + hf;
      bstrip[r * kLdB + c] = __float2bfloat16_rn(pr[t] * (srow[c] - del_r));  // dS
    }
    __syncwarp();
    strip_pv<D>(bstrip, sK, a.hd, dq);  // dQ += dS K (scale applied on store)
  });

  __syncwarp();
  store_strip(strip, LDF, dq, a.hd);
  __syncwarp();
  for (int rr = 0; rr < 16; ++rr) {
    const int i = wq0 + rr;
    if (i >= a.S) break;
    // Rows past q_rows: zeros (their dS is 0; the factor 0 also covers rows this warp skipped).
    write_row(dq_base + static_cast<int64_t>(i) * a.ld, strip + rr * LDF, a.hd,
              i < p.q_rows ? a.scale : 0.0f);
  }
}

// --- Backward on mma.sync (PRIORTUNE_CUDA_ATTN=mma) ------------------------------------------------------
// The same two kernels, block split, tile loads, masks and outputs as above, but every product is an
// ldmatrix + mma.sync m16n8k16 (mma.cuh) whose results stay in registers: S^T (or S) and dP^T (or dP) are
// fp32 accumulator fragments, the probabilities and dS are computed element by element in them (a lane holds
// rows g and g + 8, columns 2t and 2t + 1 of each 8-column block, g = lane / 4, t = lane % 4) and repacked as
// the bf16 A fragments of the next product (the accumulators of two adjacent 8-column blocks are exactly the
// A fragment of one 16-wide k-step), so no per-warp strips and no round trips through shared memory. Tiles
// stay bf16 [64][D + 8] (a 144- or 272-byte row stride: the eight 16-byte rows one ldmatrix phase reads fall
// in distinct bank groups). Products over hd skip the 16-wide steps past hd (the tile loads leave those
// columns unwritten). Each output element still has one writer and a fixed summation order.

// acc[j] (j < 8: columns 8 j..8 j + 7 of the 64 rows of sB) = A (16 rows of sA) . sB^T over hd: both tiles
// [row][hd] with stride LDT (S^T = K Q^T, S = Q K^T, dP^T = V dO^T, dP = dO V^T).
template <int D>
__device__ __forceinline__ void frag_dot(const __nv_bfloat16* sA, const __nv_bfloat16* sB, int hd,
                                         float (&acc)[8][4]) {
  constexpr int LDT = D + 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
#pragma unroll
  for (int kd = 0; kd < D / 16; ++kd) {
    if (kd * 16 >= hd) break;
    uint32_t a[4];
    ldsm_x4(a, sA + (lane & 15) * LDT + 16 * kd + 8 * (lane >> 4));
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      uint32_t b[4];
      ldsm_x4(b, sB + (16 * jp + (lane & 7) + 8 * (lane >> 4)) * LDT + 16 * kd + 8 * ((lane >> 3) & 1));
      mma_bf16_16816(acc[2 * jp], a, b[0], b[1]);
      mma_bf16_16816(acc[2 * jp + 1], a, b[2], b[3]);
    }
  }
}

// acc[n] (n < D / 8: columns 8 n.. of hd) += P (16 x 64, bf16 A fragments of four 16-wide k-steps) . sB
// (64 rows [row][hd], stride LDT): dV += P^T dO, dK += dS^T Q, dQ += dS K.
template <int D>
__device__ __forceinline__ void frag_pv(const uint32_t (&p)[4][4], const __nv_bfloat16* sB, int hd,
                                        float (&acc)[D / 8][4]) {
  constexpr int LDT = D + 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kq = 0; kq < 4; ++kq)
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      if (np * 16 >= hd) break;
      uint32_t b[4];
      ldsm_x4_trans(b, sB + (16 * kq + (lane & 15)) * LDT + 16 * np + 8 * (lane >> 4));
      mma_bf16_16816(acc[2 * np], p[kq], b[0], b[1]);
      mma_bf16_16816(acc[2 * np + 1], p[kq], b[2], b[3]);
    }
}

// The A fragments of a 16 x 64 bf16 operand from fp32 values laid out as accumulator fragments.
__device__ __forceinline__ void pack_a(const float (&v)[8][4], uint32_t (&p)[4][4]) {
#pragma unroll
  for (int kq = 0; kq < 4; ++kq) {
    p[kq][0] = pack_bf16x2(v[2 * kq][0], v[2 * kq][1]);
    p[kq][1] = pack_bf16x2(v[2 * kq][2], v[2 * kq][3]);
    p[kq][2] = pack_bf16x2(v[2 * kq + 1][0], v[2 * kq + 1][1]);
    p[kq][3] = pack_bf16x2(v[2 * kq + 1][2], v[2 * kq + 1][3]);
  }
}

// Rows g and g + 8 (of the warp's 16) of a 16 x hd accumulator, times scale(row), to dst(row) (null: no
// row there).
template <int D, class DstFn, class ScaleFn>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], int hd, DstFn dst, ScaleFn scale) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float* row = dst(g + 8 * h);
    if (row == nullptr) continue;
    const float s = scale(g + 8 * h);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int c = 8 * n + 2 * t;
      if (c >= hd) break;
      row[c] = s * acc[n][2 * h];
      row[c + 1] = s * acc[n][2 * h + 1];
    }
  }
}

// The mma.sync kernels' shared memory: `base` bytes of tiles and rows, then where the next tiles are queued:
// kStaged's fp32 stage of two 64-row tiles, kDirect's second pair of bf16 tiles (16-byte aligned: base is a
// multiple of 16).
template <int D, int L>
constexpr size_t with_next(size_t base) {
  return base + (L == kStaged   ? 2 * static_cast<size_t>(64) * D * sizeof(float)
                 : L == kDirect ? 2 * static_cast<size_t>(64) * (D + 8) * sizeof(__nv_bfloat16)
                                : 0);
}
template <int D, int L>
__device__ __forceinline__ TilePair pair_at(__nv_bfloat16* t0, __nv_bfloat16* t1, unsigned char* smem,
                                            size_t base) {
  TilePair tp{t0, t1};
  if (L == kStaged) tp.stage = reinterpret_cast<float*>(smem + base);
  if (L == kDirect) {
    tp.n0 = reinterpret_cast<__nv_bfloat16*>(smem + base);
    tp.n1 = tp.n0 + 64 * (D + 8);
  }
  return tp;
}

template <int D>
__host__ __device__ constexpr size_t kv_mma_base() {
  return 4 * static_cast<size_t>(64) * (D + 8) * 2 + (2 * kBQ + kBK) * 4;
}
static_assert(kv_mma_base<64>() % 16 == 0 && kv_mma_base<128>() % 16 == 0, "the stage is 16-byte aligned");

template <int D, int L>
__global__ void __launch_bounds__(kTcThreads, 2) attn_bwd_kv_mma_kernel(AttnArgs a, BwdPtrs p) {
  constexpr int LDT = D + 8;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem_tc);
  __nv_bfloat16* sV = sK + kBK * LDT;
  __nv_bfloat16* sQ = sV + kBK * LDT;
  __nv_bfloat16* sdO = sQ + kBQ * LDT;
  float* sLse = reinterpret_cast<float*>(sdO + kBQ * LDT);
  float* sDel = sLse + kBQ;
  int* sValid = reinterpret_cast<int*>(sDel + kBQ);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g4 = lane >> 2, t4 = lane & 3;
  const unsigned nbg = static_cast<unsigned>(a.B * a.KV);
  const int bg = static_cast<int>(blockIdx.x % nbg);
  const int kt = static_cast<int>(blockIdx.x / nbg);  // the first key tiles (most queries) first
  const int b = bg / a.KV, g = bg % a.KV;
  const int k0 = kt * kBK, wk0 = k0 + 16 * warp;  // the block's and the warp's first key
  TilePair qd = pair_at<D, L>(sQ, sdO, smem_tc, kv_mma_base<D>());

  // kStaged: the first query tile's copies fly while this block's own keys are loaded; kDirect: they go with
  // the keys' copies.
  if (L == kStaged) queue_query_tile<D, L>(a, p, b, query_tile(a, g, k0, 0), qd);
  own_tile<D, kBK, L>(
      sK, a, [&](int rr) { return key_row(a, b, g, k0 + rr, false); },
      [&](int rr) { return key_row16(a, b, g, k0 + rr, false); });
  own_tile<D, kBK, L>(
      sV, a, [&](int rr) { return key_row(a, b, g, k0 + rr, true); },
      [&](int rr) { return key_row16(a, b, g, k0 + rr, true); });
  if (L == kDirect) queue_query_tile<D, L>(a, p, b, query_tile(a, g, k0, 0), qd);
  if (tid < kBK) sValid[tid] = key_valid(a, b, k0 + tid);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;

  for_query_tiles<D, L>(a, p, b, g, k0, wk0, qd, sLse, sDel, [&](int q0) {
    const __nv_bfloat16* sQ = qd.t0;
    const __nv_bfloat16* sdO = qd.t1;
    float s[8][4];  // S^T, then P^T: rows keys wk0 + g4 (+ 8), columns queries q0 + 8 j + 2 t4 (+ 1)
    frag_dot<D>(sK + 16 * warp * LDT, sQ, a.hd, s);
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int kr = 16 * warp + g4 + 8 * e2, jr = k0 + kr - a.Pp;
      const bool valid = sValid[kr] != 0;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int q = 8 * j + 2 * t4 + e1, i = q0 + q;
          float& x = s[j][2 * e2 + e1];
          x = valid && i < a.S && jr <= i ? expf(x * a.scale - sLse[q]) : 0.0f;
        }
    }
    uint32_t pa[4][4];
    pack_a(s, pa);
    frag_pv<D>(pa, sdO, a.hd, dv);  // dV += P^T dO
    float dp[8][4];
    frag_dot<D>(sV + 16 * warp * LDT, sdO, a.hd, dp);  // dP^T
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - sDel[8 * j + 2 * t4 + (e & 1)]);  // dS^T
    pack_a(dp, pa);
    frag_pv<D>(pa, sQ, a.hd, dk);  // dK += dS^T Q (scale applied on store)
  });

  // Token keys to dqkv, prefix keys to this sequence's partials; keys past the end have no row.
  auto rows_of = [&](bool is_v) {
    return [&, is_v](int rr) -> float* {
      const int kk = wk0 + rr;
      if (kk < a.Pp)
        return (is_v ? p.part_v : p.part_k) + ((static_cast<int64_t>(b) * a.Pp + kk) * a.KV + g) * a.hd;
      const int j = kk - a.Pp;
      if (j >= a.S) return nullptr;
      return p.dqkv + (static_cast<int64_t>(b) * a.S + j) * a.ld +
             static_cast<int64_t>(a.H + (is_v ? a.KV : 0) + g) * a.hd;
    };
  };
  store_rows<D>(dk, a.hd, rows_of(false), [&](int) { return a.scale; });
  store_rows<D>(dv, a.hd, rows_of(true), [](int) { return 1.0f; });
}

template <int D>
__host__ __device__ constexpr size_t q_mma_base() {
  return 4 * static_cast<size_t>(64) * (D + 8) * 2 + kBK * 4;
}
static_assert(q_mma_base<64>() % 16 == 0 && q_mma_base<128>() % 16 == 0, "the stage is 16-byte aligned");

template <int D, int L>
__global__ void __launch_bounds__(kTcThreads, 2) attn_bwd_q_mma_kernel(AttnArgs a, BwdPtrs p, int nqt) {
  constexpr int LDT = D + 8;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_tc);
  __nv_bfloat16* sdO = sQ + kBQ * LDT;
  __nv_bfloat16* sK = sdO + kBQ * LDT;
  __nv_bfloat16* sV = sK + kBK * LDT;
  int* sValid = reinterpret_cast<int*>(sV + kBK * LDT);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g4 = lane >> 2, t4 = lane & 3;
  const unsigned nbh = static_cast<unsigned>(a.B * a.H);
  const int bh = static_cast<int>(blockIdx.x % nbh);
  const int qt = nqt - 1 - static_cast<int>(blockIdx.x / nbh);
  const int b = bh / a.H, h = bh % a.H, g = h / a.group;
  const int q0 = qt * kBQ, q_end = min(q0 + kBQ, a.S), q_lim = min(q_end, p.q_rows);
  const int wq0 = q0 + 16 * warp;
  float* dq_base = p.dqkv + static_cast<int64_t>(b) * a.S * a.ld + static_cast<int64_t>(h) * a.hd;

  if (q0 >= q_lim) {  // no row of this tile needs dq: zeros (uniform across the block, before any barrier)
    for (int i = q0 + warp; i < q_end; i += kWarps)
      for (int d = lane; d < a.hd; d += 32) dq_base[static_cast<int64_t>(i) * a.ld + d] = 0.0f;
    return;
  }
  TilePair kv = pair_at<D, L>(sK, sV, smem_tc, q_mma_base<D>());
  if (L == kStaged) queue_key_tile<D, L>(a, b, g, 0, kv);  // the first key tile's copies fly while Q, dO load
  own_tile<D, kBQ, L>(
      sQ, a, [&](int rr) { return q_row(a, b, h, q0 + rr); },
      [&](int rr) { return q_row_in(a, a.qkv16, b, h, q0 + rr); });
  own_tile<D, kBQ, L>(
      sdO, a, [&](int rr) { return dout_row(a, p.dout, b, h, q0 + rr); },
      [&](int rr) { return dout_row(a, p.dout16, b, h, q0 + rr); });
  if (L == kDirect) queue_key_tile<D, L>(a, b, g, 0, kv);  // with Q's and dO's copies
  // This lane's rows wq0 + g4 and wq0 + g4 + 8: their lse and delta.
  const int64_t row0 = (static_cast<int64_t>(b) * a.H + h) * a.S;
  float lse_r[2], del_r[2];
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int qi = wq0 + g4 + 8 * e2;
    lse_r[e2] = qi < a.S ? p.lse[row0 + qi] : 0.0f;
    del_r[e2] = qi < a.S ? p.delta[row0 + qi] : 0.0f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.0f;

  for_key_tiles<D, L>(a, b, g, q_lim, wq0, kv, sValid, [&](int k0) {
    const __nv_bfloat16* sK = kv.t0;
    const __nv_bfloat16* sV = kv.t1;
    float s[8][4];  // S, then P: rows queries wq0 + g4 (+ 8), columns keys k0 + 8 j + 2 t4 (+ 1)
    frag_dot<D>(sQ + 16 * warp * LDT, sK, a.hd, s);
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int qi = wq0 + g4 + 8 * e2;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int c = 8 * j + 2 * t4 + e1;
          float& x = s[j][2 * e2 + e1];
          x = sValid[c] != 0 && qi < q_lim && k0 + c - a.Pp <= qi ? expf(x * a.scale - lse_r[e2]) : 0.0f;
        }
    }
    float dp[8][4];
    frag_dot<D>(sdO + 16 * warp * LDT, sV, a.hd, dp);  // dP
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - del_r[e >> 1]);  // dS
    uint32_t pa[4][4];
    pack_a(dp, pa);
    frag_pv<D>(pa, sK, a.hd, dq);  // dQ += dS K (scale applied on store)
  });

  // Rows past q_rows: zeros (their dS is 0; the factor 0 also covers rows this warp skipped).
  store_rows<D>(
      dq, a.hd,
      [&](int rr) { return wq0 + rr < a.S ? dq_base + static_cast<int64_t>(wq0 + rr) * a.ld : nullptr; },
      [&](int rr) { return wq0 + rr < p.q_rows ? a.scale : 0.0f; });
}

// The forward on mma.sync (PRIORTUNE_CUDA_ATTN=mma): the same block split, tile walk, masks and outputs as
// attn_fwd_tc_kernel; S = Q K^T and O += P V as ldmatrix + mma.sync with S, P and O in registers. Online
// softmax per row with the running max as reference (rescaling O is a register multiply here, so no lazy
// reference is needed): each lane holds columns 2 t4, 2 t4 + 1 of every 8-column block of rows g4 and g4 + 8,
// and the row's max and sum combine the four lanes of a row (xor 1, 2).
template <int D>
__host__ __device__ constexpr size_t fwd_mma_base() {
  return 3 * static_cast<size_t>(64) * (D + 8) * 2 + kBK * 4;
}
static_assert(fwd_mma_base<64>() % 16 == 0 && fwd_mma_base<128>() % 16 == 0, "the stage is 16-byte aligned");

template <int D, int L>
__global__ void __launch_bounds__(kTcThreads, 2)
    attn_fwd_mma_kernel(AttnArgs a, float* __restrict__ out, float* __restrict__ lse, int nqt) {
  constexpr int LDT = D + 8;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_tc);
  __nv_bfloat16* sK = sQ + kBQ * LDT;
  __nv_bfloat16* sV = sK + kBK * LDT;
  int* sValid = reinterpret_cast<int*>(sV + kBK * LDT);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g4 = lane >> 2, t4 = lane & 3;
  const unsigned nbh = static_cast<unsigned>(a.B * a.H);
  const int bh = static_cast<int>(blockIdx.x % nbh);
  const int qt = nqt - 1 - static_cast<int>(blockIdx.x / nbh);  // the longest (last) query tiles first
  const int b = bh / a.H, h = bh % a.H, g = h / a.group;
  const int q0 = qt * kBQ, q_end = min(q0 + kBQ, a.S);
  const int wq0 = q0 + 16 * warp;
  TilePair kv = pair_at<D, L>(sK, sV, smem_tc, fwd_mma_base<D>());

  if (L == kStaged) queue_key_tile<D, L>(a, b, g, 0, kv);  // the first key tile's copies fly while Q loads
  own_tile<D, kBQ, L>(
      sQ, a, [&](int rr) { return q_row(a, b, h, q0 + rr); },
      [&](int rr) { return q_row_in(a, a.qkv16, b, h, q0 + rr); });
  if (L == kDirect) queue_key_tile<D, L>(a, b, g, 0, kv);  // with Q's copies
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};  // rows g4, g4 + 8: running max (-inf until a key is visible)
  float l_part[2] = {0.0f, 0.0f};           // this lane's share of the row sum of exp(s - m_run)

  for_key_tiles<D, L>(a, b, g, q_end, wq0, kv, sValid, [&](int k0) {
    const __nv_bfloat16* sK = kv.t0;
    const __nv_bfloat16* sV = kv.t1;
    float s[8][4];
    frag_dot<D>(sQ + 16 * warp * LDT, sK, a.hd, s);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * j + 2 * t4 + (e & 1), qi = wq0 + g4 + 8 * (e >> 1);
        float& x = s[j][e];
        x = sValid[c] != 0 && k0 + c - a.Pp <= qi ? x * a.scale : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      alpha[r] = m_run[r] == -INFINITY ? 1.0f : expf(m_run[r] - m_new);
      m_run[r] = m_new;
      l_part[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float& x = s[j][e];
        x = x == -INFINITY ? 0.0f : expf(x - m_run[e >> 1]);
        l_part[e >> 1] += x;
      }
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e >> 1];
    uint32_t pa[4][4];
    pack_a(s, pa);
    frag_pv<D>(pa, sV, a.hd, o);  // O += P V
  });

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = l_part[r] + __shfl_xor_sync(0xffffffffu, l_part[r], 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    inv[r] = total > 0.0f ? 1.0f / total : 0.0f;  // no visible key: zeros
    const int qi = wq0 + g4 + 8 * r;
    if (t4 == 0 && qi < a.S)
      lse[(static_cast<int64_t>(b) * a.H + h) * a.S + qi] = total > 0.0f ? m_run[r] + logf(total) : -INFINITY;
  }
  store_rows<D>(
      o, a.hd,
      [&](int rr) -> float* {
        const int i = wq0 + rr;
        return i < a.S ? out + ((static_cast<int64_t>(b) * a.S + i) * a.H + h) * a.hd : nullptr;
      },
      [&](int rr) { return inv[rr >> 3]; });
}

// A choice's kernel and its shared memory, at head-dim bound D: the WMMA one (tc_smem bytes) or the mma.sync
// one with the choice's tile loads (base bytes and what they queue into). Where the choice does not fit a
// block's shared memory (hd 128 on a GPU with 99 KB, such as Ada), the mma.sync kernel with synchronous
// loads (the same bits as the queued ones; the WMMA kernel's within the same tolerance).
template <int D, class Kernel>
std::pair<Kernel*, size_t> choose(AttnKernel k, Kernel* tc, size_t tc_smem, Kernel* sync, Kernel* staged,
                                  Kernel* direct, size_t base) {
  const size_t most = device_info().smem_optin;
  if (k == AttnKernel::Wmma && tc_smem <= most) return {tc, tc_smem};
  if (k == AttnKernel::MmaAsync && with_next<D, kStaged>(base) <= most)
    return {staged, with_next<D, kStaged>(base)};
  if (k == AttnKernel::MmaBf16 && with_next<D, kDirect>(base) <= most)
    return {direct, with_next<D, kDirect>(base)};
  return {sync, base};
}

template <int D>
void forward_tc_impl(Stream stream, const AttnArgs& a, float* out, float* lse, AttnKernel k) {
  const auto [kernel, smem] =
      choose<D>(k, attn_fwd_tc_kernel<D>, fwd_tc_smem<D>(), attn_fwd_mma_kernel<D, kSync>,
                attn_fwd_mma_kernel<D, kStaged>, attn_fwd_mma_kernel<D, kDirect>, fwd_mma_base<D>());
  allow_smem(kernel, smem, "attention_forward (bf16)");
  const int nqt = (a.S + kBQ - 1) / kBQ;
  const unsigned grid = grid_1d(static_cast<int64_t>(nqt) * a.B * a.H, "attention_forward");
  kernel<<<grid, kTcThreads, smem, stream>>>(a, out, lse, nqt);
  check_launch("attention_forward (bf16)");
}

template <int D>
void backward_tc_impl(Stream stream, const AttnArgs& a, const BwdPtrs& p, AttnKernel k) {
  {
    const auto [kernel, smem] =
        choose<D>(k, attn_bwd_kv_tc_kernel<D>, kv_tc_smem<D>(), attn_bwd_kv_mma_kernel<D, kSync>,
                  attn_bwd_kv_mma_kernel<D, kStaged>, attn_bwd_kv_mma_kernel<D, kDirect>, kv_mma_base<D>());
    allow_smem(kernel, smem, "attention_backward (bf16 dk, dv)");
    const int64_t nkt = (static_cast<int64_t>(a.Pp) + a.S + kBK - 1) / kBK;
    const unsigned grid = grid_1d(nkt * a.B * a.KV, "attention_backward");
    kernel<<<grid, kTcThreads, smem, stream>>>(a, p);
    check_launch("attention_backward (bf16 dk, dv)");
  }
  {
    const auto [kernel, smem] =
        choose<D>(k, attn_bwd_q_tc_kernel<D>, q_tc_smem<D>(), attn_bwd_q_mma_kernel<D, kSync>,
                  attn_bwd_q_mma_kernel<D, kStaged>, attn_bwd_q_mma_kernel<D, kDirect>, q_mma_base<D>());
    allow_smem(kernel, smem, "attention_backward (bf16 dq)");
    const int nqt = (a.S + kBQ - 1) / kBQ;
    const unsigned grid = grid_1d(static_cast<int64_t>(nqt) * a.B * a.H, "attention_backward");
    kernel<<<grid, kTcThreads, smem, stream>>>(a, p, nqt);
    check_launch("attention_backward (bf16 dq)");
  }
}

// cp.async copies 16 bytes from 16-byte aligned rows: every base pointer must be (the row strides are
// multiples of hd, itself a multiple of 16 here). MmaAsync reads the fp32 operands, MmaBf16 their bf16
// copies (which must be there); otherwise they run as Mma (the same bits). dout: the backward's (else null).
template <class T>
bool operands_ok(const T* qkv, const T* pk, const T* pv, int Pp, bool backward, const T* dout) {
  auto ok = [](const T* q) { return q != nullptr && reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return ok(qkv) && (!backward || ok(dout)) && (Pp == 0 || (ok(pk) && ok(pv)));
}
AttnKernel runnable(AttnKernel k, const AttnArgs& a, const BwdPtrs* p) {
  const bool bwd = p != nullptr;
  if (k == AttnKernel::MmaAsync && !operands_ok(a.qkv, a.pk, a.pv, a.Pp, bwd, bwd ? p->dout : nullptr))
    return AttnKernel::Mma;
  if (k == AttnKernel::MmaBf16 && !operands_ok(a.qkv16, a.pk16, a.pv16, a.Pp, bwd, bwd ? p->dout16 : nullptr))
    return AttnKernel::Mma;
  return k;
}

}  // namespace

void forward_tc(Stream stream, const AttnArgs& a, float* out, float* lse, AttnKernel k) {
  k = runnable(k, a, nullptr);
  if (a.hd <= 64)
    forward_tc_impl<64>(stream, a, out, lse, k);
  else
    forward_tc_impl<128>(stream, a, out, lse, k);
}

namespace {
thread_local int forced_kernel = -1;  // ForceAttentionKernel: -1 none, else an AttnKernel
}

ForceAttentionKernel::ForceAttentionKernel(AttnKernel k) : saved_(forced_kernel) {
  forced_kernel = static_cast<int>(k);
}
ForceAttentionKernel::~ForceAttentionKernel() {
  forced_kernel = saved_;
}

bool async_attention_off() {
  return env_is("PRIORTUNE_CUDA_ATTN_ASYNC", "0");
}

AttnKernel attention_kernel() {
  if (forced_kernel >= 0) return static_cast<AttnKernel>(forced_kernel);
  const char* raw = std::getenv("PRIORTUNE_CUDA_ATTN");
  const std::string v = raw ? raw : "";
  if (v.empty() || v == "mma") return AttnKernel::Mma;
  if (v == "wmma") return AttnKernel::Wmma;
  if (v == "async") return async_attention_off() ? AttnKernel::Mma : AttnKernel::MmaAsync;
  if (v == "bf16") return async_attention_off() ? AttnKernel::Mma : AttnKernel::MmaBf16;
  throw std::invalid_argument("PRIORTUNE_CUDA_ATTN must be mma, wmma, async or bf16, got \"" + v + "\"");
}

void backward_tc(Stream stream, const AttnArgs& a, const BwdPtrs& p, AttnKernel k) {
  k = runnable(k, a, &p);
  if (a.hd <= 64)
    backward_tc_impl<64>(stream, a, p, k);
  else
    backward_tc_impl<128>(stream, a, p, k);
}

}  // namespace attn
}  // namespace cuda
}  // namespace pt
