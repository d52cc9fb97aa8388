// Fused causal attention (flash style) on CUDA cores, fp32 throughout: the exactness-first version of the
// attention ops of priortune/cuda_ops.h, matching ops.h attention_forward / attention_backward.
//
// Keys form one index space kk in [0, Pp + S): kk < Pp is prefix key kk (shared by every sequence), kk >= Pp
// is token j = kk - Pp. Query i sees every prefix key and the tokens j <= i whose key_mask is set; kv head
// g = h / (H / KV) serves query head h. Tiles are staged in shared memory zero-padded to a width D in
// {64, 128, 256} >= hd, rows of D + 4 floats (conflict-free float4 reads). 256 threads as 16 x 16: thread
// (ty, tx) owns tile rows ty*RM + i, score columns tx + 16c and output columns 64c + 4tx + e; row
// reductions are 16-lane xor shuffles. Tile sizes (Tiles<D>) fit two blocks per H100 SM for D <= 128.
//   forward   block (b, h, query tile): key tiles from 0 to the causal limit (prefix then tokens), K then V
//             through one buffer; online softmax with the running max / sum in registers. A row that has
//             seen no visible key keeps max = -inf and adds exact zeros; it ends with out = 0, lse = -inf.
//   backward  A: D_i = dout_i . out_i (scratch).  B: block (b, g, key tile) loops over the group's query
//             heads and the query tiles that can see the tile (all of them for prefix keys; q_rows does not
//             limit it), recomputes P = exp(scale q.k - lse), dS = P (dP - D), keeps dk, dv in registers;
//             token rows go to dqkv, prefix rows to per-batch partials [B, Pp, KV, hd] in scratch.
//             C: block (b, h, query tile): dq over the visible key tiles for rows < q_rows, zeros for the
//             rest.  D: dprefix = sum of the partials over b = 0..B-1 in order.
// Every output element has one writer and every sum a fixed order: no atomics, bitwise deterministic.
// AttentionPrecision::BF16 (hd a multiple of 16 up to 128) dispatches to attention_tc.cu's tensor-core
// kernels for the forward and for B and C; A and D, the scratch and the argument checks here serve both
// paths.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.cuh"
#include "common.cuh"
#include "priortune/ops.h"

namespace pt {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 16 x 16 threads per block

using attn::AttnArgs;
using attn::BwdPtrs;
using attn::key_row;
using attn::key_valid;

// s[r * (D + 4) + d] = row(r)[d] for d < hd, 0 for hd <= d < D or a null row; one warp per row.
template <int D, int ROWS, class RowFn>
__device__ __forceinline__ void load_tile(float* s, int hd, RowFn row) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < ROWS; r += kThreads / 32) {
    const float* src = row(r);
    float* dst = s + r * (D + 4);
#pragma unroll
    for (int d = lane; d < D; d += 32) dst[d] = (src != nullptr && d < hd) ? src[d] : 0.0f;
  }
}

// acc[i][c] = sum_{d < hd4} A[ty*RM + i][d] * B[tx + 16c][d] (rows of stride LD), d ascending.
template <int RM, int CN, int LD>
__device__ __forceinline__ void dot_tile(const float* sA, const float* sB, int hd4, int ty, int tx,
                                         float (&acc)[RM][CN]) {
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int c = 0; c < CN; ++c) acc[i][c] = 0.0f;
#pragma unroll 1
  for (int d = 0; d < hd4; d += 4) {
    float4 x[RM], y[CN];
#pragma unroll
    for (int i = 0; i < RM; ++i) x[i] = *reinterpret_cast<const float4*>(sA + (ty * RM + i) * LD + d);
#pragma unroll
    for (int c = 0; c < CN; ++c) y[c] = *reinterpret_cast<const float4*>(sB + (tx + 16 * c) * LD + d);
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        float t = acc[i][c];
        t = fmaf(x[i].x, y[c].x, t);
        t = fmaf(x[i].y, y[c].y, t);
        t = fmaf(x[i].z, y[c].z, t);
        t = fmaf(x[i].w, y[c].w, t);
        acc[i][c] = t;
      }
  }
}

// acc[i][c][e] += sum_{k < NK} P[ty*RM + i][k] * V[k][64c + 4tx + e]; P rows of stride LDP, V rows of LDV.
template <int RM, int NK, int LDP, int D, int LDV>
__device__ __forceinline__ void pv_tile(const float* sP, const float* sV, int ty, int tx,
                                        float (&acc)[RM][D / 64][4]) {
  constexpr int NC = D / 64;
#pragma unroll 1
  for (int k = 0; k < NK; k += 4) {
    float4 p[RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) p[i] = *reinterpret_cast<const float4*>(sP + (ty * RM + i) * LDP + k);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float4 v = *reinterpret_cast<const float4*>(sV + (k + kk) * LDV + 64 * c + 4 * tx);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
          const float w = kk == 0 ? p[i].x : kk == 1 ? p[i].y : kk == 2 ? p[i].z : p[i].w;
          acc[i][c][0] = fmaf(w, v.x, acc[i][c][0]);
          acc[i][c][1] = fmaf(w, v.y, acc[i][c][1]);
          acc[i][c][2] = fmaf(w, v.z, acc[i][c][2]);
          acc[i][c][3] = fmaf(w, v.w, acc[i][c][3]);
        }
      }
    }
  }
}

// Reductions over the 16 lanes of a half warp (the threads of one tile row), in a fixed order.
__device__ __forceinline__ float max16(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float sum16(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// dst[e] = s * v[e] for e < min(n, 4) (n may be <= 0): one float4 store when all four fit and are aligned.
__device__ __forceinline__ void store4(float* dst, const float (&v)[4], float s, int n) {
  if (n >= 4 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    *reinterpret_cast<float4*>(dst) = make_float4(s * v[0], s * v[1], s * v[2], s * v[3]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (e < n) dst[e] = s * v[e];
  }
}

// Tile shapes per padded head width: RM rows per thread (16*RM rows), CN score columns (16*CN columns), for
// the forward, dk/dv and dq kernels.
template <int FwdRM, int FwdCN, int KvRM, int KvCN, int QRM, int QCN>
struct TileShape {
  static constexpr int kFwdRM = FwdRM, kFwdCN = FwdCN, kKvRM = KvRM, kKvCN = KvCN, kQRM = QRM, kQCN = QCN;
};
// Chosen so the main kernels fit two blocks per H100 SM (shared memory and 128 registers) for D = 64 and 128.
template <int D>
using Tiles = std::conditional_t<
    D == 64, TileShape<4, 4, 4, 4, 4, 4>,
    std::conditional_t<D == 128, TileShape<4, 4, 4, 2, 4, 2>, TileShape<2, 4, 2, 2, 2, 2>>>;
// The shapes taken where Tiles' do not fit a block's shared memory: every kernel within 99 KB (Ada GPUs,
// which run the sm_80 code; Tiles<128>'s backward takes 111 KB, Tiles<256>'s up to 138 KB).
template <int D>
using SmallTiles = std::conditional_t<
    D == 64, Tiles<64>,
    std::conditional_t<D == 128, TileShape<4, 4, 2, 2, 2, 2>, TileShape<2, 2, 1, 1, 1, 1>>>;

// --- Forward --------------------------------------------------------------------------------------------
// Shared memory: sQ [BQ][D+4], sKV [BK][D+4] (K, then V of the same tile), sP [BQ][BK+4], valid[BK].
template <int D, int RM, int CN>
constexpr size_t fwd_smem() {
  return (static_cast<size_t>(16 * RM) * (D + 4) + static_cast<size_t>(16 * CN) * (D + 4) +
          static_cast<size_t>(16 * RM) * (16 * CN + 4) + 16 * CN) *
         sizeof(float);
}

template <int D, int RM, int CN>
__global__ void __launch_bounds__(kThreads, 2)
    attn_fwd_kernel(AttnArgs a, float* __restrict__ out, float* __restrict__ lse, int nqt) {
  constexpr int BQ = 16 * RM, BK = 16 * CN, LD = D + 4, LDP = BK + 4, NC = D / 64;
  extern __shared__ float4 smem_f4[];
  float* sQ = reinterpret_cast<float*>(smem_f4);
  float* sKV = sQ + BQ * LD;
  float* sP = sKV + BK * LD;
  int* sValid = reinterpret_cast<int*>(sP + BQ * LDP);

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const unsigned nbh = static_cast<unsigned>(a.B * a.H);
  const int bh = static_cast<int>(blockIdx.x % nbh);
  const int qt = nqt - 1 - static_cast<int>(blockIdx.x / nbh);  // the longest (last) query tiles first
  const int b = bh / a.H, h = bh % a.H, g = h / a.group;
  const int q0 = qt * BQ, q_end = min(q0 + BQ, a.S);
  const int hd4 = (a.hd + 3) & ~3;
  load_tile<D, BQ>(sQ, a.hd, [&](int r) { return q_row(a, b, h, q0 + r); });

  float m[RM], l[RM], o[RM][NC][4];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;  // this thread's share of the row sum (its score columns), rescaled with the row
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][c][e] = 0.0f;
  }

  const int nkeys = a.Pp + q_end;  // keys visible to some row of the tile: all prefix, tokens < q_end
  for (int k0 = 0; k0 < nkeys; k0 += BK) {
    __syncthreads();  // the previous tile's V (and P) readers are done
    load_tile<D, BK>(sKV, a.hd, [&](int r) { return key_row(a, b, g, k0 + r, false); });
    if (tid < BK) sValid[tid] = key_valid(a, b, k0 + tid);
    __syncthreads();

    float s[RM][CN];
    dot_tile<RM, CN, LD>(sQ, sKV, hd4, ty, tx, s);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int qi = q0 + ty * RM + i;
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const int kc = tx + 16 * c;
        const bool vis = sValid[kc] != 0 && k0 + kc - a.Pp <= qi;
        s[i][c] = vis ? s[i][c] * a.scale : -INFINITY;
        mx = fmaxf(mx, s[i][c]);
      }
      mx = max16(mx);
      const float mnew = fmaxf(m[i], mx);
      // mnew == -inf: nothing visible yet (o and l are 0). Otherwise exp(-inf) = 0 drops an empty history.
      const float alpha = mnew == -INFINITY ? 1.0f : expf(m[i] - mnew);
      m[i] = mnew;
      float part = 0.0f;
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const float p = s[i][c] == -INFINITY ? 0.0f : expf(s[i][c] - mnew);
        sP[(ty * RM + i) * LDP + tx + 16 * c] = p;
        part += p;
      }
      l[i] = l[i] * alpha + part;
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][c][e] *= alpha;
    }
    __syncthreads();  // every thread is done with K; P is complete
    load_tile<D, BK>(sKV, a.hd, [&](int r) { return key_row(a, b, g, k0 + r, true); });
    __syncthreads();
    pv_tile<RM, BK, LDP, D, LD>(sP, sKV, ty, tx, o);
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const float total = sum16(l[i]);
    const int qi = q0 + ty * RM + i;
    if (qi >= a.S) continue;
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // no visible key: zeros
    float* dst = out + (static_cast<int64_t>(b) * a.S + qi) * a.H * a.hd + static_cast<int64_t>(h) * a.hd;
#pragma unroll
    for (int c = 0; c < NC; ++c) store4(dst + 64 * c + 4 * tx, o[i][c], inv, a.hd - 64 * c - 4 * tx);
    if (tx == 0)
      lse[(static_cast<int64_t>(b) * a.H + h) * a.S + qi] = total > 0.0f ? m[i] + logf(total) : -INFINITY;
  }
}

// --- Backward --------------------------------------------------------------------------------------------
// delta[(b*H + h)*S + i] = dout_i . out_i over head h's columns; one warp per (row, head).
__global__ void __launch_bounds__(kThreads)
    attn_delta_kernel(float* __restrict__ delta, const float* __restrict__ dout,
                      const float* __restrict__ out, int S, int H, int hd, int64_t total) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (w >= total) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const int64_t n = w / H;  // b*S + i
  const int h = static_cast<int>(w % H);
  const int64_t off = n * H * hd + static_cast<int64_t>(h) * hd;
  float sum = 0.0f;
  for (int c = lane; c < hd; c += 32) sum = fmaf(dout[off + c], out[off + c], sum);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) {
    const int64_t b = n / S, i = n % S;
    delta[(b * H + h) * S + i] = sum;
  }
}

// Kernel B. Shared memory: sK, sV [BK][D+4], sQ, sdO [BQ][D+4], sP [BK][BQ+4] (P, then dS), lse, delta [BQ],
// valid [BK].
template <int D, int RM, int CN>
constexpr size_t kv_smem() {
  return (2 * static_cast<size_t>(16 * RM) * (D + 4) + 2 * static_cast<size_t>(16 * CN) * (D + 4) +
          static_cast<size_t>(16 * RM) * (16 * CN + 4) + 2 * 16 * CN + 16 * RM) *
         sizeof(float);
}

template <int D, int RM, int CN>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_kv_kernel(AttnArgs a, BwdPtrs p) {
  constexpr int BK = 16 * RM, BQ = 16 * CN, LD = D + 4, LDP = BQ + 4, NC = D / 64;
  extern __shared__ float4 smem_f4[];
  float* sK = reinterpret_cast<float*>(smem_f4);
  float* sV = sK + BK * LD;
  float* sQ = sV + BK * LD;
  float* sdO = sQ + BQ * LD;
  float* sP = sdO + BQ * LD;
  float* sLse = sP + BK * LDP;
  float* sDel = sLse + BQ;
  int* sValid = reinterpret_cast<int*>(sDel + BQ);

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const unsigned nbg = static_cast<unsigned>(a.B * a.KV);
  const int bg = static_cast<int>(blockIdx.x % nbg);
  const int kt = static_cast<int>(blockIdx.x / nbg);  // the first key tiles (most queries) first
  const int b = bg / a.KV, g = bg % a.KV;
  const int k0 = kt * BK;
  const int hd4 = (a.hd + 3) & ~3;

  load_tile<D, BK>(sK, a.hd, [&](int r) { return key_row(a, b, g, k0 + r, false); });
  load_tile<D, BK>(sV, a.hd, [&](int r) { return key_row(a, b, g, k0 + r, true); });
  if (tid < BK) sValid[tid] = key_valid(a, b, k0 + tid);

  float dk[RM][NC][4], dv[RM][NC][4];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[i][c][e] = dv[i][c][e] = 0.0f;

  // Query tiles that can see a key of this tile: all when it holds a prefix key, else from the first token.
  const int qt0 = k0 < a.Pp ? 0 : (k0 - a.Pp) / BQ;
  const int nqt = (a.S + BQ - 1) / BQ;
  for (int hh = 0; hh < a.group; ++hh) {
    const int h = g * a.group + hh;
    const int64_t row0 = (static_cast<int64_t>(b) * a.H + h) * a.S;  // lse / delta of (b, h)
    for (int qt = qt0; qt < nqt; ++qt) {
      const int q0 = qt * BQ;
      __syncthreads();  // the previous step's readers of sQ, sdO, sP are done
      load_tile<D, BQ>(sQ, a.hd, [&](int r) { return q_row(a, b, h, q0 + r); });
      load_tile<D, BQ>(sdO, a.hd, [&](int r) { return dout_row(a, p.dout, b, h, q0 + r); });
      if (tid < BQ) {
        const int i = q0 + tid;
        sLse[tid] = i < a.S ? p.lse[row0 + i] : 0.0f;
        sDel[tid] = i < a.S ? p.delta[row0 + i] : 0.0f;
      }
      __syncthreads();

      float s[RM][CN], dp[RM][CN];
      dot_tile<RM, CN, LD>(sK, sQ, hd4, ty, tx, s);    // rows: keys, columns: queries
      dot_tile<RM, CN, LD>(sV, sdO, hd4, ty, tx, dp);  // dP^T
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int r = ty * RM + i;
        const int j = k0 + r - a.Pp;  // token index (negative for a prefix key)
        const bool valid = sValid[r] != 0;
#pragma unroll
        for (int c = 0; c < CN; ++c) {
          const int q = tx + 16 * c, qi = q0 + q;
          const bool vis = valid && qi < a.S && j <= qi;
          const float pr = vis ? expf(s[i][c] * a.scale - sLse[q]) : 0.0f;
          dp[i][c] = pr * (dp[i][c] - sDel[q]);  // dS
          sP[r * LDP + q] = pr;
        }
      }
      __syncthreads();
      pv_tile<RM, BQ, LDP, D, LD>(sP, sdO, ty, tx, dv);  // dV += P^T dO
      __syncthreads();
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int c = 0; c < CN; ++c) sP[(ty * RM + i) * LDP + tx + 16 * c] = dp[i][c];
      __syncthreads();
      pv_tile<RM, BQ, LDP, D, LD>(sP, sQ, ty, tx, dk);  // dK += dS^T Q (scale applied on store)
    }
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int kk = k0 + ty * RM + i;
    float *dkp, *dvp;
    if (kk < a.Pp) {
      const int64_t off = ((static_cast<int64_t>(b) * a.Pp + kk) * a.KV + g) * a.hd;
      dkp = p.part_k + off;
      dvp = p.part_v + off;
    } else {
      const int j = kk - a.Pp;
      if (j >= a.S) continue;
      float* row = p.dqkv + (static_cast<int64_t>(b) * a.S + j) * a.ld;
      dkp = row + static_cast<int64_t>(a.H + g) * a.hd;
      dvp = row + static_cast<int64_t>(a.H + a.KV + g) * a.hd;
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int col = 64 * c + 4 * tx;
      store4(dkp + col, dk[i][c], a.scale, a.hd - col);
      store4(dvp + col, dv[i][c], 1.0f, a.hd - col);
    }
  }
}

// Kernel C. Shared memory: sQ, sdO [BQ][D+4], sK, sV [BK][D+4], sS [BQ][BK+4] (dS), valid [BK].
template <int D, int RM, int CN>
constexpr size_t q_smem() {
  return (2 * static_cast<size_t>(16 * RM) * (D + 4) + 2 * static_cast<size_t>(16 * CN) * (D + 4) +
          static_cast<size_t>(16 * RM) * (16 * CN + 4) + 16 * CN) *
         sizeof(float);
}

template <int D, int RM, int CN>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_q_kernel(AttnArgs a, BwdPtrs p, int nqt) {
  constexpr int BQ = 16 * RM, BK = 16 * CN, LD = D + 4, LDP = BK + 4, NC = D / 64;
  extern __shared__ float4 smem_f4[];
  float* sQ = reinterpret_cast<float*>(smem_f4);
  float* sdO = sQ + BQ * LD;
  float* sK = sdO + BQ * LD;
  float* sV = sK + BK * LD;
  float* sS = sV + BK * LD;
  int* sValid = reinterpret_cast<int*>(sS + BQ * LDP);

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const unsigned nbh = static_cast<unsigned>(a.B * a.H);
  const int bh = static_cast<int>(blockIdx.x % nbh);
  const int qt = nqt - 1 - static_cast<int>(blockIdx.x / nbh);
  const int b = bh / a.H, h = bh % a.H, g = h / a.group;
  const int q0 = qt * BQ, q_end = min(q0 + BQ, a.S), q_lim = min(q_end, p.q_rows);
  const int hd4 = (a.hd + 3) & ~3;
  float* dq_base = p.dqkv + static_cast<int64_t>(b) * a.S * a.ld + static_cast<int64_t>(h) * a.hd;

  if (q0 >= q_lim) {  // no row of this tile needs dq: zeros (uniform across the block, before any barrier)
    const int lane = tid & 31, warp = tid >> 5;
    for (int i = q0 + warp; i < q_end; i += kThreads / 32)
      for (int d = lane; d < a.hd; d += 32) dq_base[static_cast<int64_t>(i) * a.ld + d] = 0.0f;
    return;
  }
  load_tile<D, BQ>(sQ, a.hd, [&](int r) { return q_row(a, b, h, q0 + r); });
  load_tile<D, BQ>(sdO, a.hd, [&](int r) { return dout_row(a, p.dout, b, h, q0 + r); });
  const int64_t row0 = (static_cast<int64_t>(b) * a.H + h) * a.S;
  float lse_r[RM], del_r[RM], dq[RM][NC][4];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int qi = q0 + ty * RM + i;
    lse_r[i] = qi < a.S ? p.lse[row0 + qi] : 0.0f;
    del_r[i] = qi < a.S ? p.delta[row0 + qi] : 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[i][c][e] = 0.0f;
  }

  const int nkeys = a.Pp + q_lim;
  for (int k0 = 0; k0 < nkeys; k0 += BK) {
    __syncthreads();  // the previous tile's readers of sK, sV, sS are done (and sQ, sdO are loaded)
    load_tile<D, BK>(sK, a.hd, [&](int r) { return key_row(a, b, g, k0 + r, false); });
    load_tile<D, BK>(sV, a.hd, [&](int r) { return key_row(a, b, g, k0 + r, true); });
    if (tid < BK) sValid[tid] = key_valid(a, b, k0 + tid);
    __syncthreads();

    float s[RM][CN], dp[RM][CN];
    dot_tile<RM, CN, LD>(sQ, sK, hd4, ty, tx, s);
    dot_tile<RM, CN, LD>(sdO, sV, hd4, ty, tx, dp);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int qi = q0 + ty * RM + i;
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const int kc = tx + 16 * c;
        const bool vis = sValid[kc] != 0 && qi < q_lim && k0 + kc - a.Pp <= qi;
        const float pr = vis ? expf(s[i][c] * a.scale - lse_r[i]) : 0.0f;
        sS[(ty * RM + i) * LDP + kc] = pr * (dp[i][c] - del_r[i]);
      }
    }
    __syncthreads();
    pv_tile<RM, BK, LDP, D, LD>(sS, sK, ty, tx, dq);  // dQ += dS K (scale applied on store)
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int qi = q0 + ty * RM + i;
    if (qi >= a.S) continue;
    const float sc = qi < p.q_rows ? a.scale : 0.0f;  // rows past q_rows: zeros
    float* dst = dq_base + static_cast<int64_t>(qi) * a.ld;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int col = 64 * c + 4 * tx;
      if (sc == 0.0f) {
        const float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        store4(dst + col, z, 1.0f, a.hd - col);
      } else {
        store4(dst + col, dq[i][c], sc, a.hd - col);
      }
    }
  }
}

// Kernel D: dprefix[idx] = sum_{b = 0..B-1} part[b * n + idx], b ascending.
__global__ void attn_prefix_sum_kernel(float* __restrict__ dpk, float* __restrict__ dpv,
                                       const float* __restrict__ part_k, const float* __restrict__ part_v,
                                       int B, int64_t n) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sk = 0.0f, sv = 0.0f;
    for (int b = 0; b < B; ++b) {
      sk += part_k[b * n + idx];
      sv += part_v[b * n + idx];
    }
    dpk[idx] = sk;
    dpv[idx] = sv;
  }
}

// --- Host side ---------------------------------------------------------------------------------------------
using attn::grid_1d;

void validate(const char* op, int64_t Pp, int64_t B, int64_t S, int64_t H, int64_t KV, int64_t hd,
              const float* prefix_k, const float* prefix_v) {
  const std::string where = std::string(op) + ": ";
  if (B < 0 || S < 0 || Pp < 0) throw std::invalid_argument(where + "B, S and Pp must be >= 0");
  if (H < 1 || KV < 1 || H % KV != 0)
    throw std::invalid_argument(where + "need H >= 1, KV >= 1 and H % KV == 0 (H=" + std::to_string(H) +
                                " KV=" + std::to_string(KV) + ")");
  if (hd < 1 || hd > 256)
    throw std::invalid_argument(where + "head dim must be in [1, 256] (hd=" + std::to_string(hd) + ")");
  if (Pp > 0 && (prefix_k == nullptr || prefix_v == nullptr))
    throw std::invalid_argument(where + "Pp > 0 needs prefix_k and prefix_v");
  const int64_t lim = INT_MAX / 4;
  if (S > lim || Pp > lim || Pp + S > lim || B > lim || H > lim || B * H > lim || B * S > lim ||
      B * S * H > static_cast<int64_t>(INT_MAX) * 4)
    throw std::invalid_argument(where + "shape too large");
}

AttnArgs make_args(const float* qkv, const uint8_t* key_mask, const float* prefix_k, const float* prefix_v,
                   int64_t Pp, int64_t B, int64_t S, int64_t H, int64_t KV, int64_t hd, float scale,
                   const AttentionBf16Operands* bf16 = nullptr) {
  AttnArgs a;
  a.qkv = qkv;
  a.mask = key_mask;
  a.pk = prefix_k;
  a.pv = prefix_v;
  if (bf16) {
    a.qkv16 = bf16->qkv;
    a.pk16 = bf16->prefix_k;
    a.pv16 = bf16->prefix_v;
  }
  a.Pp = static_cast<int>(Pp);
  a.B = static_cast<int>(B);
  a.S = static_cast<int>(S);
  a.H = static_cast<int>(H);
  a.KV = static_cast<int>(KV);
  a.hd = static_cast<int>(hd);
  a.group = static_cast<int>(H / KV);
  a.scale = scale;
  a.ld = (H + 2 * KV) * hd;
  return a;
}

template <int D, class T>
void forward_impl(Stream stream, const AttnArgs& a, float* out, float* lse) {
  constexpr int RM = T::kFwdRM, CN = T::kFwdCN, BQ = 16 * RM;
  constexpr size_t smem = fwd_smem<D, RM, CN>();
  auto* kernel = attn_fwd_kernel<D, RM, CN>;
  allow_smem(kernel, smem, "attention_forward");
  const int nqt = (a.S + BQ - 1) / BQ;
  const unsigned grid = grid_1d(static_cast<int64_t>(nqt) * a.B * a.H, "attention_forward");
  kernel<<<grid, kThreads, smem, stream>>>(a, out, lse, nqt);
  check_launch("attention_forward");
}

template <int D, class T>
void backward_impl(Stream stream, const AttnArgs& a, const BwdPtrs& p) {
  {
    constexpr int RM = T::kKvRM, CN = T::kKvCN, BK = 16 * RM;
    constexpr size_t smem = kv_smem<D, RM, CN>();
    auto* kernel = attn_bwd_kv_kernel<D, RM, CN>;
    allow_smem(kernel, smem, "attention_backward (dk, dv)");
    const int64_t nkt = (static_cast<int64_t>(a.Pp) + a.S + BK - 1) / BK;
    const unsigned grid = grid_1d(nkt * a.B * a.KV, "attention_backward");
    kernel<<<grid, kThreads, smem, stream>>>(a, p);
    check_launch("attention_backward (dk, dv)");
  }
  {
    constexpr int RM = T::kQRM, CN = T::kQCN, BQ = 16 * RM;
    constexpr size_t smem = q_smem<D, RM, CN>();
    auto* kernel = attn_bwd_q_kernel<D, RM, CN>;
    allow_smem(kernel, smem, "attention_backward (dq)");
    const int nqt = (a.S + BQ - 1) / BQ;
    const unsigned grid = grid_1d(static_cast<int64_t>(nqt) * a.B * a.H, "attention_backward");
    kernel<<<grid, kThreads, smem, stream>>>(a, p, nqt);
    check_launch("attention_backward (dq)");
  }
}

// Tiles<D> where its kernels fit a block's shared memory, else SmallTiles<D>.
template <int D>
void forward_fit(Stream stream, const AttnArgs& a, float* out, float* lse) {
  using T = Tiles<D>;
  if (fwd_smem<D, T::kFwdRM, T::kFwdCN>() <= device_info().smem_optin)
    forward_impl<D, T>(stream, a, out, lse);
  else
    forward_impl<D, SmallTiles<D>>(stream, a, out, lse);
}
template <int D>
void backward_fit(Stream stream, const AttnArgs& a, const BwdPtrs& p) {
  using T = Tiles<D>;
  if (std::max(kv_smem<D, T::kKvRM, T::kKvCN>(), q_smem<D, T::kQRM, T::kQCN>()) <= device_info().smem_optin)
    backward_impl<D, T>(stream, a, p);
  else
    backward_impl<D, SmallTiles<D>>(stream, a, p);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Decoding: one query row per sequence against its key/value cache. Block (b, h), 4 warps: warp w takes keys
// w, w + 4, ... (the prefix rows, then the cache rows), a lane holding dims lane + 32 e of q and of its share
// of the output; each key's score is a warp sum, folded into the warp's online softmax (running max, sum,
// output rescaled as the max rises); then the four warps' states are merged through shared memory.

namespace {

constexpr int kDecodeWarps = 4;

template <int D>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    attention_decode_kernel(float* out, const float* q, int64_t q_ld, const float* cache, int64_t cap,
                            int64_t ld, int64_t k_col, int64_t v_col, const int32_t* n, const float* prefix_k,
                            const float* prefix_v, int64_t Pp, int64_t H, int64_t KV, int64_t hd,
                            float scale) {
  constexpr int E = D / 32;
  __shared__ float s_max[kDecodeWarps], s_sum[kDecodeWarps], s_acc[kDecodeWarps][D];
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / KV);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* qr = q + b * q_ld + h * hd;
  float qv[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    qv[e] = d < hd ? qr[d] : 0.0f;
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  const int64_t keys = Pp + n[b];
  for (int64_t j = warp; j < keys; j += kDecodeWarps) {
    const float* row = j < Pp ? nullptr : cache + (b * cap + (j - Pp)) * ld;
    const float* k = row ? row + k_col + g * hd : prefix_k + (j * KV + g) * hd;
    const float* v = row ? row + v_col + g * hd : prefix_v + (j * KV + g) * hd;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      if (d < hd) s += qv[e] * k[d];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= scale;
    const float mn = fmaxf(m, s);
    const float corr = expf(m - mn), p = expf(s - mn);
    l = l * corr + p;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      acc[e] = acc[e] * corr + (d < hd ? p * v[d] : 0.0f);
    }
    m = mn;
  }
  if (lane == 0) {
    s_max[warp] = m;
    s_sum[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) s_acc[warp][lane + 32 * e] = acc[e];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) M = fmaxf(M, s_max[w]);
  float L = 0.0f;
  float f[kDecodeWarps];
  for (int w = 0; w < kDecodeWarps; ++w) {
    f[w] = s_max[w] == -INFINITY ? 0.0f : expf(s_max[w] - M);  // a warp that saw no key adds nothing
    L += s_sum[w] * f[w];
  }
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) o += s_acc[w][d] * f[w];
    out[(b * H + h) * hd + d] = L > 0.0f ? o / L : 0.0f;
  }
}

}  // namespace

void attention_decode(Stream stream, float* out, const float* q, int64_t q_ld, const float* cache,
                      int64_t cap, int64_t ld, int64_t k_col, int64_t v_col, const int32_t* n,
                      const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t H,
                      int64_t KV, int64_t hd, float scale) {
  validate("attention_decode", Pp, B, cap, H, KV, hd, prefix_k, prefix_v);
  if (B == 0) return;
  if (!out || !q || !cache || !n) throw std::invalid_argument("attention_decode: null pointer");
  if (q_ld < H * hd || k_col < 0 || v_col < 0 || k_col + KV * hd > ld || v_col + KV * hd > ld)
    throw std::invalid_argument("attention_decode: q_ld, k_col, v_col or ld out of range");
  const dim3 grid(static_cast<unsigned>(B * H));
  const int threads = kDecodeWarps * 32;
  if (hd <= 64)
    attention_decode_kernel<64><<<grid, threads, 0, stream>>>(out, q, q_ld, cache, cap, ld, k_col, v_col, n,
                                                              prefix_k, prefix_v, Pp, H, KV, hd, scale);
  else if (hd <= 128)
    attention_decode_kernel<128><<<grid, threads, 0, stream>>>(out, q, q_ld, cache, cap, ld, k_col, v_col, n,
                                                               prefix_k, prefix_v, Pp, H, KV, hd, scale);
  else
    attention_decode_kernel<256><<<grid, threads, 0, stream>>>(out, q, q_ld, cache, cap, ld, k_col, v_col, n,
                                                               prefix_k, prefix_v, Pp, H, KV, hd, scale);
  check_launch("attention_decode");
}

bool attention_takes_bf16_operands(AttentionPrecision precision, int64_t hd) {
  return precision == AttentionPrecision::BF16 && attn::tc_supported(hd) &&
         attn::attention_kernel() == attn::AttnKernel::MmaBf16;
}

void attention_forward(Stream stream, float* out, float* lse, const float* qkv, const uint8_t* key_mask,
                       const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t S,
                       int64_t H, int64_t KV, int64_t hd, float scale, AttentionPrecision precision,
                       const AttentionBf16Operands* bf16) {
  validate("attention_forward", Pp, B, S, H, KV, hd, prefix_k, prefix_v);
  if (B == 0 || S == 0) return;
  const AttnArgs a = make_args(qkv, key_mask, prefix_k, prefix_v, Pp, B, S, H, KV, hd, scale, bf16);
  const attn::AttnKernel kernel = attn::attention_kernel();  // read (a bad value refused) whatever runs
  if (precision == AttentionPrecision::BF16 && attn::tc_supported(hd))
    attn::forward_tc(stream, a, out, lse, kernel);  // attention_tc.cu
  else if (hd <= 64)
    forward_fit<64>(stream, a, out, lse);
  else if (hd <= 128)
    forward_fit<128>(stream, a, out, lse);
  else
    forward_fit<256>(stream, a, out, lse);
}

int64_t attention_backward_scratch_floats(int64_t Pp, int64_t B, int64_t S, int64_t H, int64_t KV,
                                          int64_t hd) {
  // delta [B, H, S], then the per-batch prefix partials of dk and dv, [B, Pp, KV, hd] each.
  return B * H * S + 2 * B * Pp * KV * hd;
}

void attention_backward(Stream stream, float* dqkv, float* dprefix_k, float* dprefix_v, const float* dout,
                        const float* out, const float* lse, const float* qkv, const uint8_t* key_mask,
                        const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t S,
                        int64_t H, int64_t KV, int64_t hd, float scale, int64_t q_rows, float* scratch,
                        AttentionPrecision precision, const AttentionBf16Operands* bf16) {
  validate("attention_backward", Pp, B, S, H, KV, hd, prefix_k, prefix_v);
  if (q_rows < 0 || q_rows > S)
    throw std::invalid_argument("attention_backward: q_rows must be in [0, S] (q_rows=" +
                                std::to_string(q_rows) + " S=" + std::to_string(S) + ")");
  if (Pp > 0 && (dprefix_k == nullptr || dprefix_v == nullptr))
    throw std::invalid_argument("attention_backward: Pp > 0 needs dprefix_k and dprefix_v");
  const int64_t n_prefix = Pp * KV * hd;
  if (B == 0 || S == 0) {  // no query: the prefix gradients are empty sums
    if (Pp > 0) {
      check(cudaMemsetAsync(dprefix_k, 0, n_prefix * sizeof(float), stream), "attention_backward memset");
      check(cudaMemsetAsync(dprefix_v, 0, n_prefix * sizeof(float), stream), "attention_backward memset");
    }
    return;
  }
  if (scratch == nullptr) throw std::invalid_argument("attention_backward: scratch is null");
  const attn::AttnKernel kernel = attn::attention_kernel();  // read (a bad value refused) whatever runs
  const AttnArgs a = make_args(qkv, key_mask, prefix_k, prefix_v, Pp, B, S, H, KV, hd, scale, bf16);
  BwdPtrs p;
  p.dqkv = dqkv;
  p.dout = dout;
  p.dout16 = bf16 ? bf16->dout : nullptr;
  p.lse = lse;
  p.delta = scratch;
  p.part_k = Pp > 0 ? scratch + B * H * S : nullptr;
  p.part_v = Pp > 0 ? p.part_k + B * n_prefix : nullptr;
  p.q_rows = static_cast<int>(q_rows);

  const int64_t warps = B * S * H;
  attn_delta_kernel<<<grid_1d((warps + kThreads / 32 - 1) / (kThreads / 32), "attention_backward"), kThreads,
                      0, stream>>>(scratch, dout, out, static_cast<int>(S), static_cast<int>(H),
                                   static_cast<int>(hd), warps);
  check_launch("attention_backward (delta)");
  if (precision == AttentionPrecision::BF16 && attn::tc_supported(hd))
    attn::backward_tc(stream, a, p, kernel);  // attention_tc.cu
  else if (hd <= 64)
    backward_fit<64>(stream, a, p);
  else if (hd <= 128)
    backward_fit<128>(stream, a, p);
  else
    backward_fit<256>(stream, a, p);
  if (Pp > 0) {
    attn_prefix_sum_kernel<<<grid_for(n_prefix, kThreads), kThreads, 0, stream>>>(
        dprefix_k, dprefix_v, p.part_k, p.part_v, static_cast<int>(B), n_prefix);
    check_launch("attention_backward (prefix sum)");
  }
}

// --- Self-test -------------------------------------------------------------------------------------------
namespace {

struct AttnCase {
  int64_t B, S, H, KV, hd, Pp, q_rows;
  bool mask;
  int64_t lead_pad;
  // > 0: token j's key is scaled by 1 + key_growth * j, so scores rise along the sequence and the BF16
  // forward's lazy softmax reference moves (O rescaled) many times. BF16 only: scores of magnitude ~40
  // would take the fp32 comparison past its 2e-5.
  float key_growth = 0.0f;
};

struct AttnData {
  std::vector<float> qkv, pk, pv, dout;
  std::vector<uint8_t> mask;
};

struct AttnOutputs {
  std::vector<float> out, lse, dqkv, dpk, dpv;
};

struct AttnRef {
  std::vector<float> out, dqkv, dpk, dpv;
  std::vector<double> lse;
};

// max |got - want| / max |want| over finite entries; an entry that is -inf in one and not the other fails.
double lse_error(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0.0, scale = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    const bool wi = std::isinf(want[i]), gi = std::isinf(got[i]);
    if (wi || gi) {
      if (!(wi && gi && got[i] < 0 && want[i] < 0)) worst = INFINITY;
      continue;
    }
    const double d = std::fabs(got[i] - want[i]);
    worst = std::isnan(d) ? INFINITY : std::max(worst, d);
    scale = std::max(scale, std::fabs(want[i]));
  }
  return worst / scale;
}

AttnData round_data_bf16(const AttnData& d) {
  AttnData r = d;
  for (std::vector<float>* v : {&r.qkv, &r.pk, &r.pv, &r.dout})
    for (float& x : *v) x = round_bf16(x);
  return r;
}

// Random qkv, prefix keys and values and output gradient of a case's shape; every key unmasked.
AttnData random_attn_data(const AttnCase& t, uint32_t& seed) {
  const int64_t ld = (t.H + 2 * t.KV) * t.hd;
  AttnData d;
  d.qkv = random_vector(t.B * t.S * ld, seed++);
  d.pk = random_vector(t.Pp * t.KV * t.hd, seed++);
  d.pv = random_vector(t.Pp * t.KV * t.hd, seed++);
  d.dout = random_vector(t.B * t.S * t.H * t.hd, seed++);
  d.mask.assign(t.B * t.S, 1);
  return d;
}

// CPU reference (ops.h), plus lse in float64.
AttnRef attention_reference(const AttnCase& t, const AttnData& d, float scale) {
  const int64_t B = t.B, S = t.S, H = t.H, KV = t.KV, hd = t.hd, Pp = t.Pp, L = Pp + S;
  const int64_t ld = (H + 2 * KV) * hd;
  const uint8_t* hmask = t.mask ? d.mask.data() : nullptr;
  AttnRef r;
  std::vector<float> probs(B * H * S * L);
  r.out.resize(B * S * H * hd);
  r.dqkv.resize(B * S * ld);
  r.dpk.resize(Pp * KV * hd);
  r.dpv.resize(Pp * KV * hd);
  pt::attention_forward(r.out.data(), probs.data(), d.qkv.data(), hmask, Pp ? d.pk.data() : nullptr,
                        Pp ? d.pv.data() : nullptr, Pp, B, S, H, KV, hd, scale, 4);
  pt::attention_backward(r.dqkv.data(), Pp ? r.dpk.data() : nullptr, Pp ? r.dpv.data() : nullptr,
                         d.dout.data(), probs.data(), d.qkv.data(), Pp ? d.pk.data() : nullptr,
                         Pp ? d.pv.data() : nullptr, Pp, B, S, H, KV, hd, scale, t.q_rows, 4);
  r.lse.resize(B * H * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t g = h / (H / KV);
        const float* q = d.qkv.data() + (b * S + i) * ld + h * hd;
        std::vector<double> sc;
        for (int64_t kk = 0; kk < Pp + i + 1; ++kk) {
          const float* k;
          if (kk < Pp) {
            k = d.pk.data() + (kk * KV + g) * hd;
          } else {
            const int64_t j = kk - Pp;
            if (hmask && !hmask[b * S + j]) continue;
            k = d.qkv.data() + (b * S + j) * ld + (H + g) * hd;
          }
          double dot = 0.0;
          for (int64_t c = 0; c < hd; ++c) dot += static_cast<double>(q[c]) * k[c];
          sc.push_back(dot * scale);
        }
        double mx = -INFINITY, sum = 0.0;
        for (double v : sc) mx = std::max(mx, v);
        for (double v : sc) sum += std::exp(v - mx);
        r.lse[(b * H + h) * S + i] = sc.empty() ? -INFINITY : mx + std::log(sum);
      }
  return r;
}

// Forward then backward on the device with the given precision. Outputs start as NaN so an unwritten
// element fails the comparison.
// bf16_copies: the calls also get bf16 copies of their operands (AttentionBf16Operands, made on the device by
// to_bf16), which the MmaBf16 kernels read.
AttnOutputs attention_device(const AttnCase& t, const AttnData& d, float scale, AttentionPrecision prec,
                             bool bf16_copies = false) {
  const int64_t B = t.B, S = t.S, H = t.H, KV = t.KV, hd = t.hd, Pp = t.Pp;
  const int64_t ld = (H + 2 * KV) * hd;
  DeviceBuffer<float> d_qkv = to_device(d.qkv), d_pk = to_device(d.pk), d_pv = to_device(d.pv);
  DeviceBuffer<float> d_dout = to_device(d.dout);
  DeviceBuffer<uint8_t> d_mask = to_device(d.mask);
  DeviceBuffer<float> d_out(B * S * H * hd), d_lse(B * H * S), d_dqkv(B * S * ld);
  DeviceBuffer<float> d_dpk(Pp ? Pp * KV * hd : 1), d_dpv(Pp ? Pp * KV * hd : 1);
  DeviceBuffer<float> d_scratch(std::max<int64_t>(1, attention_backward_scratch_floats(Pp, B, S, H, KV, hd)));
  for (DeviceBuffer<float>* buf : {&d_out, &d_lse, &d_dqkv, &d_dpk, &d_dpv, &d_scratch})
    check(cudaMemset(buf->get(), 0xff, buf->bytes()), "cudaMemset");
  const float* dev_pk = Pp ? d_pk.get() : nullptr;
  const float* dev_pv = Pp ? d_pv.get() : nullptr;
  const uint8_t* dev_mask = t.mask ? d_mask.get() : nullptr;
  DeviceBuffer<bf16_t> h_qkv, h_pk, h_pv, h_dout;
  AttentionBf16Operands ops;
  if (bf16_copies) {
    auto copy = [](DeviceBuffer<bf16_t>& dst, const DeviceBuffer<float>& src, int64_t n) {
      dst = DeviceBuffer<bf16_t>(std::max<int64_t>(n, 1));
      to_bf16(nullptr, dst.get(), src.get(), n);
      return dst.get();
    };
    ops.qkv = copy(h_qkv, d_qkv, B * S * ld);
    ops.prefix_k = Pp ? copy(h_pk, d_pk, Pp * KV * hd) : nullptr;
    ops.prefix_v = Pp ? copy(h_pv, d_pv, Pp * KV * hd) : nullptr;
    ops.dout = copy(h_dout, d_dout, B * S * H * hd);
  }
  const AttentionBf16Operands* bf16 = bf16_copies ? &ops : nullptr;
  attention_forward(nullptr, d_out.get(), d_lse.get(), d_qkv.get(), dev_mask, dev_pk, dev_pv, Pp, B, S, H, KV,
                    hd, scale, prec, bf16);
  attention_backward(nullptr, d_dqkv.get(), Pp ? d_dpk.get() : nullptr, Pp ? d_dpv.get() : nullptr,
                     d_dout.get(), d_out.get(), d_lse.get(), d_qkv.get(), dev_mask, dev_pk, dev_pv, Pp, B, S,
                     H, KV, hd, scale, t.q_rows, d_scratch.get(), prec, bf16);
  AttnOutputs o;
  o.out = to_host(d_out.get(), B * S * H * hd);
  o.lse = to_host(d_lse.get(), B * H * S);
  o.dqkv = to_host(d_dqkv.get(), B * S * ld);
  o.dpk = to_host(d_dpk.get(), Pp * KV * hd);
  o.dpv = to_host(d_dpv.get(), Pp * KV * hd);
  return o;
}

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}
bool same_bits(const AttnOutputs& x, const AttnOutputs& y) {
  return same_bits(x.out, y.out) && same_bits(x.lse, y.lse) && same_bits(x.dqkv, y.dqkv) &&
         same_bits(x.dpk, y.dpk) && same_bits(x.dpv, y.dpv);
}

// The accuracy checks of one precision: out, lse, dqkv and (Pp > 0) dprefix against the reference.
void push_accuracy(std::vector<OpCheck>& checks, const std::string& suffix, const std::string& shape,
                   const AttnOutputs& got, const AttnRef& ref, int64_t Pp, double tol, const char* note,
                   const char* lse_note) {
  checks.push_back(
      make_check("attention_forward out" + suffix, shape, rel_error(got.out, ref.out), tol, note));
  checks.push_back(
      make_check("attention_forward lse" + suffix, shape, lse_error(got.lse, ref.lse), 2e-5, lse_note));
  checks.push_back(
      make_check("attention_backward dqkv" + suffix, shape, rel_error(got.dqkv, ref.dqkv), tol, note));
  if (Pp > 0) {
    checks.push_back(
        make_check("attention_backward dprefix_k" + suffix, shape, rel_error(got.dpk, ref.dpk), tol, note));
    checks.push_back(
        make_check("attention_backward dprefix_v" + suffix, shape, rel_error(got.dpv, ref.dpv), tol, note));
  }
}

}  // namespace

std::vector<OpCheck> selftest_attention() {
  check(cudaSetDevice(0), "cudaSetDevice(0)");
  // mask: sequence 0 starts with lead_pad padded positions (Pp == 0: those queries see no key), sequence 1
  // ends with 5. The BF16 path runs every case with hd a multiple of 16 up to 128 (16, 64, 96, 128 here);
  // for the others it must fall back to the fp32 kernels.
  const AttnCase cases[] = {
      {2, 37, 4, 4, 64, 0, 37, false, 0},     // MHA, one tile
      {2, 37, 8, 2, 64, 0, 37, true, 1},      // GQA + padding; query 0 of sequence 0 sees no key
      {2, 37, 8, 2, 64, 5, 37, true, 1},      // + prefix
      {2, 130, 4, 2, 128, 70, 130, true, 1},  // hd 128, several tiles, prefix straddling a key tile
      {2, 130, 4, 4, 128, 0, 130, false, 0},  // hd 128 without mask or prefix
      {2, 37, 6, 3, 24, 5, 37, true, 1},      // odd hd (padded to 64)
      {2, 37, 8, 2, 64, 5, 7, true, 1},       // dq only for the first q_rows rows
      {2, 130, 4, 2, 64, 3, 70, true, 1},     // q_rows inside the second query tile
      {2, 150, 2, 1, 64, 0, 150, true, 70},   // a whole key tile padded: rows that see nothing, then see keys
      {2, 70, 2, 1, 200, 3, 70, true, 1},     // hd 200 (padded to 256)
      {1, 40, 2, 2, 1, 2, 40, true, 1},       // hd 1
      {1, 20, 2, 1, 256, 4, 0, true, 1},      // hd 256; q_rows 0 (dq all zero, dk/dv/dprefix still full)
      {2, 37, 4, 2, 16, 5, 37, true, 1},      // hd 16 (BF16: one k step)
      {1, 90, 2, 1, 96, 1, 50, true, 1},      // hd 96 (BF16: 6 of 8 column blocks); Pp 1: token 63 = key 64
      {1, 80, 2, 1, 128, 1, 80, true, 60},    // Pp 1: key tile 1 starts at token 63, seen by few rows
      {2, 5, 2, 1, 64, 0, 5, true, 1},        // S < 16 (BF16: three idle warps); sequence 1 all padding
      {1, 20, 2, 1, 64, 4, 0, true, 1},       // q_rows 0 with BF16
      {2, 200, 4, 2, 64, 3, 200, true, 1, 0.25f},  // rising scores: the BF16 forward rescales O
  };
  const char* note =
      "fp32 on CUDA cores vs the CPU fp32 reference: different summation order and exp (device expf, CPU "
      "exp_approx); the device backward takes the softmax row term as dout.out instead of sum P dP";
  const char* note_bf16 =
      "bf16 tensor cores vs the CPU fp32 reference run on the same bf16-rounded Q, K, V, dO (their products "
      "are exact, the sums fp32 in both), so what differs is P and dS, rounded to bf16 in the kernel: unit "
      "roundoff u = 2^-8 ~ 4e-3 per term of out = sum P v / l (P <= e^8 before normalising), dV = sum P dO, "
      "dK = sum dS Q, dQ = sum dS K. Over Pp + S <= 203 terms with independent rounding the error relative "
      "to "
      "the output scale is u times the ratio sum |term| / max |sum| (dS rows sum to zero), about u (up to "
      "3.6e-3 measured); tol 1e-2 ~ 2.5u";
  const double tol = 2e-5, tol_bf16 = 1e-2;
  std::vector<OpCheck> checks;
  uint32_t seed = 1000;
  for (const AttnCase& t : cases) {
    const int64_t B = t.B, S = t.S, H = t.H, KV = t.KV, hd = t.hd, Pp = t.Pp;
    const int64_t ld = (H + 2 * KV) * hd;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    AttnData d = random_attn_data(t, seed);
    if (t.mask) {
      for (int64_t j = 0; j < t.lead_pad; ++j) d.mask[j] = 0;
      if (B > 1)
        for (int64_t j = S - 5; j < S; ++j) d.mask[S + j] = 0;  // sequence 1 ends with padding
    }
    if (t.key_growth > 0.0f)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < S; ++j)
          for (int64_t c = H * hd; c < (H + KV) * hd; ++c)
            d.qkv[(b * S + j) * ld + c] *= 1.0f + t.key_growth * j;

    const std::string shape = "B=" + std::to_string(B) + " S=" + std::to_string(S) +
                              " H=" + std::to_string(H) + " KV=" + std::to_string(KV) +
                              " hd=" + std::to_string(hd) + " Pp=" + std::to_string(Pp) +
                              " q_rows=" + std::to_string(t.q_rows) + (t.mask ? " mask" : "") +
                              (t.lead_pad > 1 ? " lead_pad=" + std::to_string(t.lead_pad) : "") +
                              (t.key_growth > 0.0f ? " rising" : "");
    const bool tc = attn::tc_supported(hd);
    if (t.key_growth == 0.0f || !tc) {
      const AttnRef ref = attention_reference(t, d, scale);
      const AttnOutputs got = attention_device(t, d, scale, AttentionPrecision::FP32);
      push_accuracy(checks, "", shape, got, ref, Pp, tol, note,
                    "fp32 on CUDA cores vs a float64 host log-sum-exp");
      // Run-to-run determinism: a second run into fresh (NaN) buffers must match bit for bit.
      const AttnOutputs again = attention_device(t, d, scale, AttentionPrecision::FP32);
      checks.push_back(make_check("attention determinism", shape, same_bits(got, again) ? 0.0 : 1.0, 0.0,
                                  "two runs must agree bit for bit (no atomics)"));
      if (!tc) {  // BF16 is not available for this hd: the request runs the fp32 kernels
        const AttnOutputs fb = attention_device(t, d, scale, AttentionPrecision::BF16);
        checks.push_back(
            make_check("attention bf16 fallback", shape, same_bits(got, fb) ? 0.0 : 1.0, 0.0,
                       "hd not a multiple of 16 or above 128: BF16 runs the fp32 kernels, same bits"));
      }
    }
    if (tc) {
      const attn::ForceAttentionKernel mma(attn::AttnKernel::Mma);  // the default, whatever the variable says
      const AttnData db = round_data_bf16(d);
      const AttnRef ref = attention_reference(t, db, scale);
      const AttnOutputs got = attention_device(t, db, scale, AttentionPrecision::BF16);
      push_accuracy(
          checks, " bf16", shape, got, ref, Pp, tol_bf16, note_bf16,
          "bf16 mma.sync kernels on bf16-rounded inputs vs a float64 host log-sum-exp of the same: the "
          "scores are exact products with fp32 sums and the statistics fp32, as in the fp32 path");
      const AttnOutputs again = attention_device(t, db, scale, AttentionPrecision::BF16);
      checks.push_back(
          make_check("attention bf16 determinism", shape, same_bits(got, again) ? 0.0 : 1.0, 0.0,
                     "two BF16 runs (forward and backward) must agree bit for bit (no atomics)"));
      // The WMMA kernels (PRIORTUNE_CUDA_ATTN=wmma; the default above runs the mma.sync ones): the same
      // accuracy, deterministic, and the same forward on raw and on host-rounded inputs.
      {
        const attn::ForceAttentionKernel force(attn::AttnKernel::Wmma);
        const AttnOutputs wmma = attention_device(t, db, scale, AttentionPrecision::BF16);
        push_accuracy(
            checks, " bf16 wmma", shape, wmma, ref, Pp, tol_bf16, note_bf16,
            "bf16 WMMA kernels (scores through shared strips) vs the same float64 host log-sum-exp");
        const AttnOutputs wmma2 = attention_device(t, db, scale, AttentionPrecision::BF16);
        checks.push_back(make_check("attention bf16 wmma determinism", shape,
                                    same_bits(wmma, wmma2) ? 0.0 : 1.0, 0.0,
                                    "two WMMA runs (forward and backward) must agree bit for bit"));
        const AttnOutputs raw = attention_device(t, d, scale, AttentionPrecision::BF16);
        checks.push_back(
            make_check("attention_forward bf16 wmma rounding", shape,
                       same_bits(raw.out, wmma.out) && same_bits(raw.lse, wmma.lse) ? 0.0 : 1.0, 0.0,
                       "WMMA forward on raw fp32 inputs vs on host-rounded (RN-even) inputs: same bits"));
      }
      // The cp.async mma.sync kernels, fp32-staged (PRIORTUNE_CUDA_ATTN=async) and copying their tiles from
      // bf16 copies of the operands (=bf16, `copies`): the same tiles, products and order as the default
      // ones, so the same bits, on rounded inputs and on raw ones (rounded in the kernels' staging, or by
      // to_bf16 into the copies).
      auto same_as_default = [&](attn::AttnKernel k, const std::string& name, bool copies, const char* what) {
        const attn::ForceAttentionKernel force(k);
        const AttnOutputs rounded = attention_device(t, db, scale, AttentionPrecision::BF16, copies);
        checks.push_back(make_check("attention bf16 " + name, shape, same_bits(rounded, got) ? 0.0 : 1.0, 0.0,
                                    std::string(what) +
                                        " vs the default mma.sync kernels (forward and "
                                        "backward): the same bf16 tiles and products, same bits"));
        const AttnOutputs raw = attention_device(t, d, scale, AttentionPrecision::BF16, copies);
        const AttnOutputs raw_mma = [&] {
          const attn::ForceAttentionKernel m(attn::AttnKernel::Mma);
          return attention_device(t, d, scale, AttentionPrecision::BF16);
        }();
        checks.push_back(make_check("attention bf16 " + name + " raw inputs", shape,
                                    same_bits(raw, raw_mma) ? 0.0 : 1.0, 0.0,
                                    "on raw fp32 inputs: the same bits as the default kernels"));
      };
      if (!attn::async_attention_off()) {
        same_as_default(attn::AttnKernel::MmaAsync, "async", false, "cp.async-staged mma.sync kernels");
        same_as_default(attn::AttnKernel::MmaBf16, "copies", true,
                        "mma.sync kernels queuing their tiles from bf16 copies by cp.async");
        const attn::ForceAttentionKernel force(attn::AttnKernel::MmaBf16);
        const AttnOutputs none = attention_device(t, db, scale, AttentionPrecision::BF16, false);
        checks.push_back(make_check("attention bf16 copies missing", shape, same_bits(none, got) ? 0.0 : 1.0,
                                    0.0, "PRIORTUNE_CUDA_ATTN=bf16 without copies runs the default kernels"));
      }
      // The kernels round Q, K, V to nearest even as the host did: on the raw inputs the forward is the same.
      const AttnOutputs raw = attention_device(t, d, scale, AttentionPrecision::BF16);
      const bool same_fwd = same_bits(raw.out, got.out) && same_bits(raw.lse, got.lse);
      checks.push_back(
          make_check("attention_forward bf16 rounding", shape, same_fwd ? 0.0 : 1.0, 0.0,
                     "BF16 forward on raw fp32 inputs vs on host-rounded (RN-even) inputs: same bits"));
    }
  }
  // Decoding: the last visible row of each sequence (n_b tokens, no mask: causal alone) against the
  // reference forward's row n_b - 1, the sequence's qkv rows serving as its cache (q, keys, values in place).
  for (const AttnCase& t :
       {AttnCase{2, 37, 8, 2, 64, 5, 37, false, 0}, AttnCase{2, 130, 4, 2, 128, 70, 130, false, 0},
        AttnCase{1, 40, 2, 2, 1, 2, 40, false, 0}, AttnCase{2, 70, 2, 1, 200, 3, 70, false, 0},
        AttnCase{2, 20, 4, 4, 24, 0, 20, false, 0}}) {
    const int64_t B = t.B, S = t.S, H = t.H, KV = t.KV, hd = t.hd, Pp = t.Pp;
    const int64_t ld = (H + 2 * KV) * hd;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const AttnData d = random_attn_data(t, seed);
    const AttnRef ref = attention_reference(t, d, scale);
    std::vector<int32_t> n(B);
    std::vector<float> q(B * H * hd), want(B * H * hd);
    for (int64_t b = 0; b < B; ++b) {
      n[b] = static_cast<int32_t>(S - 7 * b);  // sequence 1 stops 7 tokens short
      const int64_t row = b * S + n[b] - 1;
      std::copy_n(d.qkv.begin() + row * ld, H * hd, q.begin() + b * H * hd);
      std::copy_n(ref.out.begin() + row * H * hd, H * hd, want.begin() + b * H * hd);
    }
    auto d_qkv = to_device(d.qkv), d_pk = to_device(d.pk), d_pv = to_device(d.pv), d_q = to_device(q);
    auto d_n = to_device(n);
    DeviceBuffer<float> d_out(B * H * hd);
    attention_decode(nullptr, d_out.get(), d_q.get(), H * hd, d_qkv.get(), S, ld, H * hd, (H + KV) * hd,
                     d_n.get(), Pp ? d_pk.get() : nullptr, Pp ? d_pv.get() : nullptr, Pp, B, H, KV, hd,
                     scale);
    const std::string shape = "B=" + std::to_string(B) + " cap=" + std::to_string(S) +
                              " H=" + std::to_string(H) + " KV=" + std::to_string(KV) +
                              " hd=" + std::to_string(hd) + " Pp=" + std::to_string(Pp) + " n=S, S-7";
    checks.push_back(
        make_check("attention_decode", shape, rel_error(to_host(d_out.get(), want.size()), want), tol,
                   "one query row per sequence, fp32 on CUDA cores (online softmax per warp, four "
                   "warps merged) vs the forward reference's row: summation order and expf"));
    // The decoder's cache layout, keys then values ([B, S, 2 KV hd]): the same values, bit for bit.
    const int64_t kvw = KV * hd;
    std::vector<float> kv(B * S * 2 * kvw);
    for (int64_t r = 0; r < B * S; ++r)
      std::copy_n(d.qkv.begin() + r * ld + H * hd, 2 * kvw, kv.begin() + r * 2 * kvw);
    auto d_kv = to_device(kv);
    DeviceBuffer<float> d_out2(B * H * hd);
    attention_decode(nullptr, d_out2.get(), d_q.get(), H * hd, d_kv.get(), S, 2 * kvw, 0, kvw, d_n.get(),
                     Pp ? d_pk.get() : nullptr, Pp ? d_pv.get() : nullptr, Pp, B, H, KV, hd, scale);
    const auto a = to_host(d_out.get(), want.size()), b = to_host(d_out2.get(), want.size());
    checks.push_back(make_check("attention_decode, keys | values cache", shape,
                                std::equal(a.begin(), a.end(), b.begin()) ? 0.0 : 1.0, 0.0,
                                "the same rows read from the decoder's [B, cap, 2 KV hd] layout: same bits"));
  }
  return checks;
}

}  // namespace cuda
}  // namespace pt
