// Exact k-nearest-neighbour search on CUDA (device 0): tensor-core screening that keeps each query's best
// candidates, then float64 re-scoring of the candidates and the same certificate of exactness as the CPU
// index (kernels/cpu/knn.cpp, whose header comment derives the bound). See priortune/knn.h for the contract.
//
// Device memory, resident for the index's lifetime: rows_[V, d] fp32 (the original rows, for re-scoring),
// screen_[V, d] fp32 (rows / |row| for cosine; rows_ itself otherwise), screen16_[V, d] its bf16 copy,
// norms_[V] float64, neg_half_[V] fp32 (-|row|^2 / 2, l2 only: added to q.row, it ranks like -|q - row|^2).
// Per search (scratch, reused across searches under the index's mutex): the queries (original, and their
// screening copy made on the device by knn_prep_kernel), per-(query, slab) candidate lists, the matrix path's
// score block, the outputs.
//
// Two screening paths (PRIORTUNE_CUDA_KNN = auto | fused | matrix; matrix only where its candidate lists fit
// one finalize block; auto takes matrix where the query block's GEMM fills the device, see fills_device):
// - matrix: the scores of a block of queries against up to kScoreBudget bytes of vocabulary columns come
//   from the BF16 GEMM (priortune/cuda_ops.h: bf16 operands, fp32 accumulation, cp.async-pipelined; l2's
//   -|row|^2 / 2 as its bias) into scores_, and knn_select_kernel keeps the c best of each query's 16384-
//   column slab: the slab's keys sit in registers (32 a thread), a bitwise radix select over block sums
//   finds the c-th largest, and everything above it plus enough equal keys are written out
//   (PRIORTUNE_CUDA_KNN_SELECT=filter: the keys at or above the c-th largest of the threads' maxima are
//   gathered first and one warp selects among them, see knn_select_kernel). The
//   vocabulary is read once per query block, and the GEMM is the model's, so it gets faster with it.
// - fused (knn_screen_kernel<BQ, VEC>): block (slab, query tile) walks the BV-row tiles of its slab. For
//   each tile it computes the BQ x BV score tile with WMMA m16n16k8 TF32 fragments (operands rounded to
//   TF32 as they are staged through shared memory in BK-wide k-steps; VEC: 16-byte loads, the next step's
//   issued before this step's MMAs; fp32 accumulation), stores it to shared memory, and each warp appends
//   the scores above its queries' thresholds to per-query candidate buffers of cap = c + m BV entries
//   (ballot + popc). A buffer that might not hold another tile (more than cap - BV entries) is cut back to
//   its c largest by a warp radix select on the order-preserving integer keys of the scores; the threshold
//   becomes the c-th largest value, which is also the bound on everything the block dropped for that query.
// knn_finalize_kernel: one block per query merges the slabs' lists, drops the candidates whose screening
// score is more than 2 err below the k-th best (they cannot rank; a radix select finds the k-th, by one warp
// up to 1024 candidates, and the c-th when more than c remain), re-scores the survivors in float64 (a warp
// per candidate, 16-byte loads issued together), sorts them by (value, index) with a bitonic sort and
// certifies the k-th: s_k > B + err, with
//   err = E x (1 for cosine, |q| vmax for dot and l2) + A vmax^2 for l2 only,
//   A = 1.25 (d + 16) 2^-22, E = 1.25 u + A
// where u bounds the relative error of one product of rounded operands: TF32 keeps 11 significant bits
// (2^-11 per operand, u = 2^-10), bf16 8 (2^-8 per operand, u = 2^-7 + 2^-16, the 2^-16 inside the factor
// 1.25); the tensor cores' fp32 accumulation is taken as truncating, 2^-23 per addition, with a factor 2
// to spare (A). l2's shift -|row|^2 / 2 is rounded to fp32 and added in fp32 (2^-25 vmax^2 and 2^-23 of the
// sum), never through rounded operands, so its vmax^2 term carries A, not u: the CPU's single fp32 error
// covers both terms there, while here a bf16 u on vmax^2 would double the bound on rows of similar norms and
// send half the l2 queries back for a second pass. Uncertified queries are searched again with 4c candidates
// (on the matrix path, while the score block spans the whole vocabulary, by a second selection from it: no
// second GEMM); when c no longer fits they go to the float64 brute force on the host copy (knn_exact_scan).
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"
#include "cublaslt.cuh"
#include "priortune/cuda_ops.h"
#include "priortune/knn.h"

namespace pt {
namespace {

using namespace nvcuda;

constexpr int kBV = 128;       // vocabulary rows per tile
constexpr int kBK = 32;        // k-step staged in shared memory
constexpr int kThreads = 256;  // 8 warps
constexpr int kLdA = kBK + 4;  // padded leading dimensions (multiples of 4 floats keep WMMA pointers aligned)
constexpr int kLdS = kBV + 4;
constexpr int kMaxMerged = 8192;  // candidates one finalize block can merge (slabs x c)
constexpr int kMetricCosine = 0, kMetricL2 = 1, kMetricDot = 2;
constexpr int64_t kScoreBudget = int64_t{512} << 20;  // bytes of the matrix path's score block
constexpr int64_t kQueryChunk = 4096;                 // queries screened per pass
// Relative error bound of one screening product of rounded operands (see the header comment).
const double kUnitErrTf32 = std::ldexp(1.0, -10), kUnitErrBf16 = std::ldexp(1.0, -7);

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) cuda::check(e, (std::string("kNN: ") + what).c_str());
}

__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ uint32_t lanes_below(int lane) {
  return (1u << lane) - 1u;
}

// The largest key K with at least c keys >= K (the c-th largest), by a bitwise radix select: total_ge(trial)
// counts the keys >= trial over whoever holds them (a warp, a block).
template <class F>
__device__ __forceinline__ uint32_t kth_largest(int c, F&& total_ge) {
  uint32_t K = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t trial = K | (1u << bit);
    if (total_ge(trial) >= c) K = trial;
  }
  return K;
}

// The same over n keys key_at(e) that one warp reads (lane, lane + 32, ...; one __reduce_add_sync a bit);
// also how many of them are > K (gt).
template <class KeyAt>
__device__ __forceinline__ uint32_t warp_kth_largest(int n, int c, int lane, KeyAt&& key_at, int& gt) {
  auto count = [&](auto&& pred) {
    int k = 0;
    for (int e = lane; e < n; e += 32) k += pred(key_at(e));
    return __reduce_add_sync(0xffffffffu, k);
  };
  const uint32_t K =
      kth_largest(c, [&](uint32_t trial) { return count([&](uint32_t k) { return k >= trial; }); });
  gt = count([&](uint32_t k) { return k > K; });
  return K;
}

// The position of this lane's entry when a warp appends the entries of its taking lanes to a list whose
// length is *counter (shared memory): one atomic a warp, lanes in order. Every lane of the warp must call it.
__device__ __forceinline__ int warp_append(bool take, int* counter, int lane) {
  const uint32_t m = __ballot_sync(0xffffffffu, take);
  int base = 0;
  if (lane == 0 && m) base = atomicAdd(counter, __popc(m));
  return __shfl_sync(0xffffffffu, base, 0) + __popc(m & lanes_below(lane));
}

// One warp cuts a candidate list qa/qi[0, n) back to its c largest scores (n > c), in place: a radix select
// finds the largest key K with at least c keys >= K (the c-th largest), then everything above K and enough
// entries equal to it are compacted to the front. thr becomes the c-th largest value: the bound on all that
// was dropped.
__device__ __forceinline__ void cut_to_best(float* qa, int* qi, int& n, float& thr, bool& dropped, int c,
                                            int lane) {
  int gt = 0;
  const uint32_t K = warp_kth_largest(
      n, c, lane, [&](int e) { return order_key(qa[e]); }, gt);
  const int need_eq = c - gt;
  int written = 0, eq_seen = 0;
  for (int base = 0; base < n; base += 32) {
    const int e = base + lane;
    const float a = e < n ? qa[e] : 0.0f;
    const int idx = e < n ? qi[e] : 0;
    const uint32_t key = order_key(a);
    const bool is_gt = e < n && key > K, is_eq = e < n && key == K;
    const uint32_t meq = __ballot_sync(0xffffffffu, is_eq);
    const bool keep = is_gt || (is_eq && eq_seen + __popc(meq & lanes_below(lane)) < need_eq);
    const uint32_t mk = __ballot_sync(0xffffffffu, keep);
    const int pos = written + __popc(mk & lanes_below(lane));
    __syncwarp();
    if (keep) {
      qa[pos] = a;
      qi[pos] = idx;
    }
    __syncwarp();
    written += __popc(mk);
    eq_seen += __popc(meq);
  }
  n = c;
  thr = key_value(K);
  dropped = true;
}

size_t screen_smem_bytes(int bq, int cap) {
  const size_t stage = std::max<size_t>(size_t(bq + kBV) * kLdA, size_t(bq) * kLdS) * sizeof(float);
  const size_t buffers = size_t(bq) * cap * (sizeof(float) + sizeof(int));
  return stage + buffers;
}

// Scratch layout of a candidate buffer: [BQ][cap] scores, then [BQ][cap] indices; cap = c + m BV (m >= 1):
// a query's buffer is cut back to its c best only when another tile might not fit, so with m = 2 that
// happens every few tiles instead of after nearly every one.
template <int BQ, bool VEC>
__global__ void __launch_bounds__(kThreads)
    knn_screen_kernel(const float* __restrict__ qs, const float* __restrict__ vs,
                      const float* __restrict__ shift, const int* __restrict__ exclude, int Q, int V, int d,
                      int c, int cap, int tiles_per_slab, int slabs, float* __restrict__ cand_a,
                      int* __restrict__ cand_i, int* __restrict__ cand_n, float* __restrict__ bound) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* As = reinterpret_cast<float*>(smem);  // [BQ][kLdA]
  float* Bs = As + BQ * kLdA;                  // [kBV][kLdA], column-major B (K x BV)
  float* Ss = As;                              // [BQ][kLdS], aliases the staging buffers after the k-loop
  constexpr int kStageA = (BQ + kBV) * kLdA, kStageS = BQ * kLdS;
  constexpr int stage = kStageA > kStageS ? kStageA : kStageS;
  float* buf_a = reinterpret_cast<float*>(smem) + stage;
  int* buf_i = reinterpret_cast<int*>(buf_a + BQ * cap);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slab = blockIdx.x, q0 = blockIdx.y * BQ;
  const int tiles = (V + kBV - 1) / kBV;
  const int t_begin = slab * tiles_per_slab, t_end = min(tiles, t_begin + tiles_per_slab);
  constexpr int kQueriesPerWarp = BQ / 8;
  constexpr int kFragRows = BQ / 16;

  int cnt[kQueriesPerWarp];
  float thr[kQueriesPerWarp];
  bool dropped[kQueriesPerWarp];
  int excl[kQueriesPerWarp];
#pragma unroll
  for (int r = 0; r < kQueriesPerWarp; ++r) {
    cnt[r] = 0;
    thr[r] = -INFINITY;
    dropped[r] = false;
    const int q = q0 + warp + 8 * r;
    excl[r] = (exclude && q < Q) ? exclude[q] : -1;
  }

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int v0 = tile * kBV;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[kFragRows];
#pragma unroll
    for (int f = 0; f < kFragRows; ++f) wmma::fill_fragment(acc[f], 0.0f);
    // The k-loop: operands are rounded to TF32 once, as they are staged (so the fragments need no
    // conversion). VEC (d % 4 == 0): 16-byte loads, and the next k-step's loads are issued before this
    // step's MMAs so that their latency hides behind them.
    auto mma_step = [&]() {
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 8) {
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
        wmma::load_matrix_sync(b, Bs + warp * 16 * kLdA + kk, kLdA);
#pragma unroll
        for (int f = 0; f < kFragRows; ++f) {
          wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
          wmma::load_matrix_sync(a, As + f * 16 * kLdA + kk, kLdA);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
    };
    if constexpr (VEC) {
      constexpr int kQuads = kBK / 4;  // float4s per staged row
      constexpr int kChunksA = BQ * kQuads, kChunksB = kBV * kQuads;
      constexpr int kPerA = (kChunksA + kThreads - 1) / kThreads, kPerB = kChunksB / kThreads;
      static_assert(kChunksB % kThreads == 0, "B chunks per thread");
      float4 ra[kPerA], rb[kPerB];
      const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      auto load = [&](int k0) {
#pragma unroll
        for (int i = 0; i < kPerA; ++i) {
          const int e = threadIdx.x + i * kThreads, q = q0 + e / kQuads, k = k0 + (e % kQuads) * 4;
          ra[i] = (e < kChunksA && q < Q && k < d)
                      ? __ldg(reinterpret_cast<const float4*>(qs + size_t(q) * d + k))
                      : zero;
        }
#pragma unroll
        for (int i = 0; i < kPerB; ++i) {
          const int e = threadIdx.x + i * kThreads, v = v0 + e / kQuads, k = k0 + (e % kQuads) * 4;
          rb[i] = (v < V && k < d) ? __ldg(reinterpret_cast<const float4*>(vs + size_t(v) * d + k)) : zero;
        }
      };
      auto tf32x4 = [](float4 t) {
        return make_float4(wmma::__float_to_tf32(t.x), wmma::__float_to_tf32(t.y), wmma::__float_to_tf32(t.z),
                           wmma::__float_to_tf32(t.w));
      };
      load(0);
      for (int k0 = 0; k0 < d; k0 += kBK) {
#pragma unroll
        for (int i = 0; i < kPerA; ++i) {
          const int e = threadIdx.x + i * kThreads;
          if (e < kChunksA)
            *reinterpret_cast<float4*>(As + (e / kQuads) * kLdA + (e % kQuads) * 4) = tf32x4(ra[i]);
        }
#pragma unroll
        for (int i = 0; i < kPerB; ++i) {
          const int e = threadIdx.x + i * kThreads;
          *reinterpret_cast<float4*>(Bs + (e / kQuads) * kLdA + (e % kQuads) * 4) = tf32x4(rb[i]);
        }
        __syncthreads();
        if (k0 + kBK < d) load(k0 + kBK);
        mma_step();
        __syncthreads();
      }
    } else {
      for (int k0 = 0; k0 < d; k0 += kBK) {
        for (int e = threadIdx.x; e < BQ * kBK; e += kThreads) {
          const int r = e / kBK, kk = e % kBK, q = q0 + r, k = k0 + kk;
          As[r * kLdA + kk] = (q < Q && k < d) ? wmma::__float_to_tf32(qs[size_t(q) * d + k]) : 0.0f;
        }
        for (int e = threadIdx.x; e < kBV * kBK; e += kThreads) {
          const int j = e / kBK, kk = e % kBK, v = v0 + j, k = k0 + kk;
          Bs[j * kLdA + kk] = (v < V && k < d) ? wmma::__float_to_tf32(vs[size_t(v) * d + k]) : 0.0f;
        }
        __syncthreads();
        mma_step();
        __syncthreads();
      }
    }
#pragma unroll
    for (int f = 0; f < kFragRows; ++f)
      wmma::store_matrix_sync(Ss + f * 16 * kLdS + warp * 16, acc[f], kLdS, wmma::mem_row_major);
    __syncthreads();

#pragma unroll
    for (int r = 0; r < kQueriesPerWarp; ++r) {
      const int qq = warp + 8 * r, q = q0 + qq;
      if (q >= Q) continue;
      float* qa = buf_a + qq * cap;
      int* qi = buf_i + qq * cap;
      for (int t = 0; t < kBV / 32; ++t) {
        const int col = t * 32 + lane, j = v0 + col;
        const bool ok = j < V && j != excl[r];
        float v = -INFINITY;
        if (ok) {
          v = Ss[qq * kLdS + col];
          if (shift) v += shift[j];
        }
        const bool pass = ok && v > thr[r];
        const uint32_t m = __ballot_sync(0xffffffffu, pass);
        if (__ballot_sync(0xffffffffu, ok && !pass)) dropped[r] = true;
        if (pass) {
          const int pos = cnt[r] + __popc(m & lanes_below(lane));
          qa[pos] = v;
          qi[pos] = j;
        }
        cnt[r] += __popc(m);
      }
      __syncwarp();
      // The next tile could overflow the buffer: cut it back to its c best.
      if (cnt[r] > cap - kBV) cut_to_best(qa, qi, cnt[r], thr[r], dropped[r], c, lane);
    }
    __syncthreads();  // Ss aliases the staging buffers of the next tile
  }

#pragma unroll
  for (int r = 0; r < kQueriesPerWarp; ++r) {
    const int qq = warp + 8 * r, q = q0 + qq;
    if (q >= Q) continue;
    // The slab's list holds at most c entries.
    if (cnt[r] > c) cut_to_best(buf_a + qq * cap, buf_i + qq * cap, cnt[r], thr[r], dropped[r], c, lane);
    const size_t slot = size_t(q) * slabs + slab;
    for (int e = lane; e < cnt[r]; e += 32) {
      cand_a[slot * c + e] = buf_a[qq * cap + e];
      cand_i[slot * c + e] = buf_i[qq * cap + e];
    }
    if (lane == 0) {
      cand_n[slot] = cnt[r];
      bound[slot] = dropped[r] ? thr[r] : -INFINITY;
    }
  }
}

// Screening copies of n queries (rows of d): q / |q| for cosine (0 for a zero query), q itself otherwise;
// fp32 into q32 (the fused path) and/or bf16 into q16 (the matrix path). norms: the host's float64 |q|.
__global__ void knn_prep_kernel(const float* __restrict__ q, const double* __restrict__ norms, int64_t n,
                                int d, bool cosine, float* __restrict__ q32, uint16_t* __restrict__ q16) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * d; i += stride) {
    const double nq = norms[i / d];
    const double inv = cosine ? (nq > 0.0 ? 1.0 / nq : 0.0) : 1.0;
    const float v = static_cast<float>(static_cast<double>(q[i]) * inv);
    if (q32) q32[i] = v;
    if (q16) q16[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

// ---- matrix path: selection from a block of scores ----
constexpr int kSelThreads = 512, kSelPerThread = 32;
constexpr int kSelChunk = kSelThreads * kSelPerThread;  // vocabulary columns one selection block covers

// The sum over the block (blockDim.x a multiple of 32) of one int per thread, returned to every thread.
// part: 2 x 32 ints of shared memory whose halves are used alternately (parity flips), so a call needs one
// barrier: the half it writes was last read before the previous call's barrier.
__device__ __forceinline__ int block_sum(int v, int* part, int& parity) {
  v = __reduce_add_sync(0xffffffffu, v);
  int* p = part + parity * 32;
  if (threadIdx.x % 32 == 0) p[threadIdx.x / 32] = v;
  __syncthreads();
  int t = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t += p[w];
  parity ^= 1;
  return t;
}

// The largest key K with at least c of the block's keys >= K (the c-th largest), by a bitwise radix select:
// one block_sum per bit. count_ge(trial): how many of this thread's keys are >= trial.
template <class F>
__device__ __forceinline__ uint32_t block_kth_largest(int c, F&& count_ge, int* part, int& parity) {
  return kth_largest(c, [&](uint32_t trial) { return block_sum(count_ge(trial), part, parity); });
}

// PRIORTUNE_CUDA_KNN_SELECT=filter (not yet run on a GPU): the filter's candidate room, and the largest c it
// takes (the c-th largest of the 512 threads' maxima must exist and sit near the slab's c-th largest).
constexpr int kFilterCap = 2048, kFilterMaxC = 128;

// Block (b, slab s of this score block), for query i = map ? map[b] : b: columns [s kSelChunk, ...) of scores
// row i (row stride lds, L columns in the block, the first being vocabulary row v0). Writes the slab's
// candidate list (slot b * slabs + slab0 + s, at most c entries: the c largest scores, ties at the cut taken
// in any order) and its bound: the c-th largest score when some valid column was dropped, else -inf. The
// excluded row (a self-search's own row) and columns past L carry key 0, below every real score's key (-inf's
// is 0x7fffff). FILTER (c <= kFilterMaxC): instead of 32 block-wide counting rounds over all 16384 keys, T0 =
// the c-th largest of the threads' maxima (c threads hold a key >= T0, so the slab's c-th largest K >= T0) is
// found by one warp, the keys >= T0 (typically little more than c) are gathered into shared memory, and one
// warp selects K among them; everything above K and enough keys equal to it are written as before. When more
// than kFilterCap keys reach T0 (ties, adversarial layouts) the block takes the full select.
template <bool FILTER>
__global__ void __launch_bounds__(kSelThreads)
    knn_select_kernel(const float* __restrict__ scores, int64_t lds, int L, int v0, int slab0,
                      const int* __restrict__ exclude, int c, int slabs, const int* __restrict__ map,
                      float* __restrict__ cand_a, int* __restrict__ cand_i, int* __restrict__ cand_n,
                      float* __restrict__ bound) {
  __shared__ int part[2 * 32];
  __shared__ int s_out, s_eq, s_n, s_gt;
  __shared__ uint32_t s_K;
  // FILTER: the threads' maxima, then the gathered keys and their columns.
  __shared__ uint32_t s_key[FILTER ? kFilterCap : 1];
  __shared__ int s_col[FILTER ? kFilterCap : 1];
  const int b = static_cast<int>(blockIdx.x), q = map ? map[b] : b;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32;
  const int j0 = static_cast<int>(blockIdx.y) * kSelChunk;
  const int width = min(kSelChunk, L - j0);
  const float* row = scores + static_cast<int64_t>(q) * lds + j0;
  const int ex = exclude ? exclude[q] - (v0 + j0) : -1;
  uint32_t key[kSelPerThread];
  int valid = 0;
#pragma unroll
  for (int i = 0; i < kSelPerThread; ++i) {
    const int j = tid + i * kSelThreads;
    const bool ok = j < width && j != ex;
    key[i] = ok ? order_key(row[j]) : 0u;
    valid += ok;
  }
  int parity = 0;
  valid = block_sum(valid, part, parity);
  const bool cut = valid > c;
  if (tid == 0) {
    s_out = 0;
    s_eq = 0;
    s_n = 0;
  }
  const size_t slot = static_cast<size_t>(b) * slabs + slab0 + blockIdx.y;
  float* oa = cand_a + slot * c;
  int* oi = cand_i + slot * c;
  // Appends (value of key kk, column j) when keep, in any order: one shared atomic a warp.
  auto emit = [&](bool keep, uint32_t kk, int j) {
    const int pos = warp_append(keep, &s_out, lane);
    if (keep) {
      oa[pos] = key_value(kk);
      oi[pos] = v0 + j0 + j;
    }
  };
  if (FILTER && cut && c <= kFilterMaxC) {  // block-uniform
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < kSelPerThread; ++i) mx = max(mx, key[i]);
    s_key[tid] = mx;
    __syncthreads();  // (also publishes s_n = 0)
    if (tid < 32) {
      int unused;
      const uint32_t t0 = warp_kth_largest(
          kSelThreads, c, lane, [&](int e) { return s_key[e]; }, unused);
      if (tid == 0) s_K = t0;
    }
    __syncthreads();                   // T0 is out; the maxima have been read
    const uint32_t t0 = max(s_K, 1u);  // key 0 (no column, or the excluded one) is never a candidate
#pragma unroll
    for (int i = 0; i < kSelPerThread; ++i) {
      const bool take = key[i] >= t0;
      const int pos = warp_append(take, &s_n, lane);
      if (take && pos < kFilterCap) {
        s_key[pos] = key[i];
        s_col[pos] = tid + i * kSelThreads;
      }
    }
    __syncthreads();
    const int n = s_n;
    if (n <= kFilterCap) {  // block-uniform: else the full select below, on the keys still in registers
      if (tid < 32) {
        int gt = 0;
        const uint32_t K = warp_kth_largest(
            n, c, lane, [&](int e) { return s_key[e]; }, gt);
        if (tid == 0) {
          s_K = K;
          s_gt = gt;
        }
      }
      __syncthreads();
      const uint32_t K = s_K;
      const int need_eq = c - s_gt;
      for (int e0 = 0; e0 < n; e0 += kSelThreads) {  // whole rounds: every lane reaches the ballots
        const int e = e0 + tid;
        const uint32_t kk = e < n ? s_key[e] : 0u;
        bool keep = e < n && kk > K;
        if (e < n && kk == K) keep = atomicAdd(&s_eq, 1) < need_eq;
        emit(keep, kk, e < n ? s_col[e] : 0);
      }
      __syncthreads();
      if (tid == 0) {
        cand_n[slot] = s_out;
        bound[slot] = key_value(K);
      }
      return;
    }
  }
  // K: the c-th largest key; 0 when everything valid is kept.
  const uint32_t K = cut ? block_kth_largest(
                               c,
                               [&](uint32_t trial) {
                                 int ge = 0;
#pragma unroll
                                 for (int i = 0; i < kSelPerThread; ++i) ge += key[i] >= trial;
                                 return ge;
                               },
                               part, parity)
                         : 0u;
  int gt = 0;
#pragma unroll
  for (int i = 0; i < kSelPerThread; ++i) gt += key[i] > K;
  const int need_eq = cut ? c - block_sum(gt, part, parity) : 0;
  __syncthreads();  // s_out and s_eq are zero for everyone
#pragma unroll
  for (int i = 0; i < kSelPerThread; ++i) {
    bool keep = key[i] > K;
    if (cut && key[i] == K) keep = atomicAdd(&s_eq, 1) < need_eq;
    emit(keep, key[i], tid + i * kSelThreads);
  }
  __syncthreads();
  if (tid == 0) {
    cand_n[slot] = s_out;
    bound[slot] = cut ? key_value(K) : -INFINITY;
  }
}

__device__ __forceinline__ bool ranks_before(int metric, double ma, int ia, double mb, int ib) {
  if (ma != mb) return metric == kMetricL2 ? ma < mb : ma > mb;
  return ia < ib;
}

size_t finalize_smem_bytes(int merged, int pow2) {
  return size_t(merged) * (sizeof(uint32_t) + sizeof(int)) +
         size_t(pow2) * (2 * sizeof(double) + sizeof(int));
}

// Absolute error bound of one screening score (see the header comment): the certificate's margin, and half
// the pruning margin before the re-scoring.
__device__ __forceinline__ double screen_error(int metric, int d, double qn, double vmax, double unit_err) {
  // The rounding of the operands touches the product alone; l2's shift and its addition are fp32.
  const double acc = 1.25 * (d + 16) * ldexp(1.0, -22), E = 1.25 * unit_err + acc;
  double err = metric == kMetricCosine ? E
               : metric == kMetricDot  ? E * qn * vmax
                                       : E * qn * vmax + acc * vmax * vmax;
  return err + d * ldexp(1.0, -120) * (1.0 + qn + vmax);  // tensor cores may flush subnormal operands
}

constexpr int kFinThreads = 512;    // 16 warps: the re-scoring's loads in flight
constexpr int kRescoreUnroll = 4;   // 16-byte loads of the candidate (and the query) a lane issues at once
constexpr int kWarpSelectMax = 32;  // keys a lane takes when one warp finds the k-th largest of a merge

// Float64 dot product and squared distance of the query qv and the row v (d values), computed by one warp,
// returned to lane 0. The products of two floats are exact in float64. VEC (d % 4 == 0, rows 16-byte
// aligned): each lane issues kRescoreUnroll 16-byte loads of each operand before it uses any, so a row of
// up to 512 values waits on one memory latency (the scalar loop before it issued a 4-byte load a lane per
// 32 values).
template <bool VEC>
__device__ __forceinline__ void rescore_row(const float* __restrict__ qv, const float* __restrict__ v, int d,
                                            int lane, double& dot, double& dist2) {
  dot = 0.0;
  dist2 = 0.0;
  auto add = [&](float x, float y) {
    const double a = x, b = y;
    dot = fma(a, b, dot);
    dist2 = fma(a - b, a - b, dist2);
  };
  if (VEC) {
    const float4* q4 = reinterpret_cast<const float4*>(qv);
    const float4* v4 = reinterpret_cast<const float4*>(v);
    const int n4 = d / 4;
    for (int t0 = 0; t0 < n4; t0 += 32 * kRescoreUnroll) {
      float4 a[kRescoreUnroll], b[kRescoreUnroll];
#pragma unroll
      for (int u = 0; u < kRescoreUnroll; ++u) {
        const int t = t0 + u * 32 + lane;
        a[u] = t < n4 ? __ldg(q4 + t) : make_float4(0.f, 0.f, 0.f, 0.f);
        b[u] = t < n4 ? __ldg(v4 + t) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < kRescoreUnroll; ++u) {
        add(a[u].x, b[u].x);
        add(a[u].y, b[u].y);
        add(a[u].z, b[u].z);
        add(a[u].w, b[u].w);
      }
    }
  } else {
    for (int t0 = 0; t0 < d; t0 += 32 * kRescoreUnroll) {
      float a[kRescoreUnroll], b[kRescoreUnroll];
#pragma unroll
      for (int u = 0; u < kRescoreUnroll; ++u) {
        const int t = t0 + u * 32 + lane;
        a[u] = t < d ? __ldg(qv + t) : 0.0f;
        b[u] = t < d ? __ldg(v + t) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kRescoreUnroll; ++u) add(a[u], b[u]);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    dot += __shfl_down_sync(0xffffffffu, dot, o);
    dist2 += __shfl_down_sync(0xffffffffu, dist2, o);
  }
}

// Block b finalises query q = map ? map[b] : b (map: the matrix path's second selection from a resident
// score block, which lists the queries it retries; their candidate slots are b's): merges the slabs' lists,
// drops the candidates whose screening score is more than 2 err below the k-th largest (their exact score is
// below that of k others, so they cannot rank; their largest score joins the bound anyway), keeps the c best
// of the rest when more than c remain (near-ties; the c-th largest joins the bound), re-scores them in
// float64 (a warp per candidate), sorts them by (value, index) with a bitonic sort of the next power of two,
// and certifies the k-th: s_k > B + err.
template <bool VEC>
__global__ void __launch_bounds__(kFinThreads, 2)
    knn_finalize_kernel(const float* __restrict__ queries, const double* __restrict__ q_norms,
                        const float* __restrict__ rows, const double* __restrict__ norms, int metric, int d,
                        int k, int c, int slabs, int pow2, double vmax, double unit_err,
                        const int* __restrict__ map, const float* __restrict__ cand_a,
                        const int* __restrict__ cand_i, const int* __restrict__ cand_n,
                        const float* __restrict__ bound, int* __restrict__ out_i, float* __restrict__ out_s,
                        int* __restrict__ failed) {
  extern __shared__ __align__(128) unsigned char smem[];  // one alignment for every extern smem here
  const int merged = slabs * c;
  double* sm = reinterpret_cast<double*>(smem);           // [pow2]
  double* ss = sm + pow2;                                 // [pow2]
  uint32_t* gk = reinterpret_cast<uint32_t*>(ss + pow2);  // [merged]
  int* gi = reinterpret_cast<int*>(gk + merged);          // [merged]
  int* si = gi + merged;                                  // [pow2]
  __shared__ int s_total, s_eq, s_kept;
  __shared__ uint32_t s_drop, s_kk;  // the largest key dropped here (0: none); the k-th largest key
  __shared__ float s_bound;
  __shared__ int part[2 * 32];
  int parity = 0;

  const int b = blockIdx.x, q = map ? map[b] : b, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    int total = 0;
    float bd = -INFINITY;
    for (int s = 0; s < slabs; ++s) {
      total += cand_n[size_t(b) * slabs + s];
      bd = fmaxf(bd, bound[size_t(b) * slabs + s]);
    }
    s_total = total;
    s_bound = bd;
  }
  __syncthreads();
  // Gather the slabs' lists (slab s's entries are contiguous in [0, cand_n)).
  {
    int offset = 0;
    for (int s = 0; s < slabs; ++s) {
      const size_t slot = size_t(b) * slabs + s;
      const int n = cand_n[slot];
      for (int e = tid; e < n; e += kFinThreads) {
        gk[offset + e] = order_key(cand_a[slot * c + e]);
        gi[offset + e] = cand_i[slot * c + e];
      }
      offset += n;
    }
  }
  __syncthreads();
  const int total = s_total;
  const float* qv = queries + size_t(q) * d;
  const double qn = q_norms[q];
  const double err = screen_error(metric, d, qn, vmax, unit_err);
  // Pruning: a candidate whose screening score is below the k-th largest minus 2 err has an exact score below
  // those of k others, so it cannot rank; only the rest are re-scored. The largest dropped score still
  // raises the bound (the certificate does not lean on this argument).
  // How many merged keys this thread holds >= trial (the block radix selects' count).
  auto merged_ge = [&](uint32_t trial) {
    int ge = 0;
    for (int e = tid; e < total; e += kFinThreads) ge += gk[e] >= trial;
    return ge;
  };
  // The k-th largest key: one warp when the merged lists are short (no block barrier a bit), else the block.
  uint32_t Kk = 0;
  if (total > k) {  // block-uniform
    if (total <= 32 * kWarpSelectMax) {
      if (warp == 0) {
        int unused;
        const uint32_t K = warp_kth_largest(
            total, k, lane, [&](int e) { return gk[e]; }, unused);
        if (lane == 0) s_kk = K;
      }
      __syncthreads();
      Kk = s_kk;
    } else {
      Kk = block_kth_largest(k, merged_ge, part, parity);
    }
  }
  const double floor_s = total > k ? double(key_value(Kk)) - 2.0 * err : -INFINITY;
  if (tid == 0) {
    s_kept = 0;
    s_eq = 0;
    s_drop = 0u;
  }
  int keep_n = 0;
  for (int e = tid; e < total; e += kFinThreads) keep_n += double(key_value(gk[e])) >= floor_s;
  const int kept = block_sum(keep_n, part, parity);  // its barrier also publishes s_kept, s_eq and s_drop
  int nc;
  if (kept <= c) {
    for (int e = tid; e < total; e += kFinThreads) {
      const float v = key_value(gk[e]);
      if (double(v) >= floor_s) {
        const int pos = atomicAdd(&s_kept, 1);
        si[pos] = gi[e];
        ss[pos] = v;
      } else {
        atomicMax(&s_drop, gk[e]);
      }
    }
    nc = kept;
  } else {
    // More than c within reach of the k-th (near-ties): the c best, everything above the c-th largest key
    // and enough equal keys; the c-th largest joins the bound.
    const uint32_t K = block_kth_largest(c, merged_ge, part, parity);
    int gt = 0;
    for (int e = tid; e < total; e += kFinThreads) gt += gk[e] > K;
    const int need_eq = c - block_sum(gt, part, parity);
    for (int e = tid; e < total; e += kFinThreads) {
      bool keep = gk[e] > K;
      if (!keep && gk[e] == K) keep = atomicAdd(&s_eq, 1) < need_eq;
      if (keep) {
        const int pos = atomicAdd(&s_kept, 1);
        si[pos] = gi[e];
        ss[pos] = key_value(gk[e]);
      }
    }
    if (tid == 0) s_drop = K;
    nc = c;
  }
  __syncthreads();
  if (tid == 0 && s_drop != 0u) s_bound = fmaxf(s_bound, key_value(s_drop));  // key 0: nothing dropped

  // Float64 re-scoring, a warp per candidate.
  for (int e = warp; e < nc; e += kFinThreads / 32) {
    const int r = si[e];
    double dot, dist2;
    rescore_row<VEC>(qv, rows + size_t(r) * d, d, lane, dot, dist2);
    if (lane == 0) {
      const double vn = norms[r];
      double m, s;
      if (metric == kMetricL2) {
        m = dist2;
        s = dot - 0.5 * vn * vn;
      } else if (metric == kMetricDot) {
        m = s = dot;
      } else {
        m = s = (qn == 0.0 || vn == 0.0) ? 0.0 : dot / (qn * vn);
      }
      sm[e] = m;
      ss[e] = s;
    }
  }
  // Sort the next power of two covering the survivors and the k outputs (<= pow2: nc <= c and k <= c).
  int sort_n = 1;
  while (sort_n < max(nc, k)) sort_n <<= 1;
  const double worst = metric == kMetricL2 ? INFINITY : -INFINITY;
  for (int e = nc + tid; e < sort_n; e += kFinThreads) {
    sm[e] = worst;
    ss[e] = worst;
    si[e] = INT_MAX;
  }
  __syncthreads();
  // Bitonic sort, best first.
  for (int size = 2; size <= sort_n; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = tid; i < sort_n; i += kFinThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const bool up = (i & size) == 0;
          const bool swap = up ? ranks_before(metric, sm[j], si[j], sm[i], si[i])
                               : ranks_before(metric, sm[i], si[i], sm[j], si[j]);
          if (swap) {
            const double tm = sm[i], ts = ss[i];
            const int ti = si[i];
            sm[i] = sm[j];
            ss[i] = ss[j];
            si[i] = si[j];
            sm[j] = tm;
            ss[j] = ts;
            si[j] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
  if (tid == 0) {
    double s_k = INFINITY;
    for (int t = 0; t < k; ++t) s_k = fmin(s_k, ss[t]);
    const bool ok = nc >= k && (s_bound == -INFINITY || s_k > double(s_bound) + err);
    failed[q] = ok ? 0 : 1;
  }
  for (int t = tid; t < k; t += kFinThreads) {
    out_i[size_t(q) * k + t] = si[t];
    out_s[size_t(q) * k + t] = float(metric == kMetricL2 ? sqrt(sm[t]) : sm[t]);
  }
}

template <class T>
using DeviceBuffer = cuda::DeviceBuffer<T>;

int metric_code(KnnMetric m) {
  return m == KnnMetric::Cosine ? kMetricCosine : (m == KnnMetric::L2 ? kMetricL2 : kMetricDot);
}

int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

class CudaIndex final : public KnnIndex {
 public:
  // Takes over `vocab` (V x d) as the host rows.
  CudaIndex(HostFloats&& vocab, int64_t d, KnnMetric metric)
      : V_(d > 0 ? static_cast<int64_t>(vocab.size()) / d : 0),
        d_(d),
        metric_(metric),
        host_rows_(std::move(vocab)) {
    if (V_ <= 0 || d <= 0 || static_cast<int64_t>(host_rows_.size()) != V_ * d)
      throw std::invalid_argument("vocab: expected at least one row of dimension >= 1");
    if (V_ > std::numeric_limits<int32_t>::max() - 1 || d > std::numeric_limits<int32_t>::max() / 2)
      throw std::out_of_range("vocab: too large for the CUDA index");
    cuda_check(cudaSetDevice(0), "cudaSetDevice");
    try {
      build();
    } catch (...) {
      release();  // no destructor runs for an object whose constructor threw
      throw;
    }
  }

  ~CudaIndex() override { release(); }

  int64_t rows() const override { return V_; }
  int64_t dim() const override { return d_; }
  KnnMetric metric() const override { return metric_; }
  const char* backend() const override { return "cuda"; }
  int64_t host_bytes() const override { return V_ * d_ * 4 + V_ * 8; }
  int64_t device_bytes() const override {
    return V_ * d_ * (4 * (metric_ == KnnMetric::Cosine ? 2 : 1) + 2) + V_ * 8 +
           (metric_ == KnnMetric::L2 ? V_ * 4 : 0);
  }
  const float* row(int64_t r) const override { return host_rows_.data() + r * d_; }

  KnnResult search(const float* queries, int64_t Q, int64_t k, const int32_t* exclude,
                   int threads) const override {
    const int64_t available = V_ - (exclude ? 1 : 0);
    KnnResult res;
    std::vector<double> q_norms;
    std::vector<int64_t> pending =
        knn_search_begin(res, q_norms, queries, Q, V_, d_, k, metric_, exclude, threads);
    std::lock_guard<std::mutex> lock(mu_);
    cuda_check(cudaSetDevice(0), "cudaSetDevice");
    int64_t c = k + std::max<int64_t>(64, k / 8);
    bool first = true;
    const Path want = env_path();
    const bool filter = env_select_filter();
    while (!pending.empty()) {
      const int ci = static_cast<int>(std::min<int64_t>(c, INT_MAX / 2));
      // The matrix path also needs its score block; where the device cannot hold even one slab of it, the
      // round takes the fused kernel (or the host), which needs no score block.
      const bool matrix =
          (want == Path::Matrix || (want == Path::Auto && fills_device(int64_t(pending.size())))) &&
          matrix_fits(ci) && reserve_scores(std::min<int64_t>(int64_t(pending.size()), kQueryChunk));
      const ScreenShape shape = matrix ? ScreenShape{} : pick_screen(ci);
      if (c >= available || (!matrix && shape.bq == 0) ||
          finalize_smem_bytes(ci, next_pow2(ci)) > cuda::device_info().smem_optin) {
        host_exact(pending, queries, k, exclude, threads, &res);
        break;
      }
      std::vector<int64_t> failed;
      int64_t c_next = 4 * c;
      for (size_t b = 0; b < pending.size(); b += kQueryChunk) {
        const size_t e = std::min(pending.size(), b + size_t(kQueryChunk));
        std::vector<int64_t> part(pending.begin() + b, pending.begin() + e);
        c_next = std::max<int64_t>(c_next, int64_t{4} * run(part, queries, q_norms, k, ci, matrix, filter,
                                                            shape, exclude, first, &res, &failed));
      }
      pending.swap(failed);
      c = c_next;
      first = false;
    }
    return res;
  }

 private:
  // The stream, events and device copies of the vocabulary (the constructor's work).
  void build() {
    const int64_t V = V_, d = d_;
    const KnnMetric metric = metric_;
    const float* vocab = host_rows_.data();
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaEventCreate(&start_), "cudaEventCreate");
    cuda_check(cudaEventCreate(&mid_), "cudaEventCreate");
    cuda_check(cudaEventCreate(&stop_), "cudaEventCreate");

    host_norms_.resize(V);
    knn_row_norms(host_norms_.data(), vocab, V, d, 1);
    vmax_ = 0.0;
    for (int64_t r = 0; r < V; ++r) {  // (the CPU index's check: a non-finite value makes a norm NaN or inf)
      if (!(host_norms_[r] < kKnnMaxNorm))
        throw std::invalid_argument("vocab: " + knn_row_problem(vocab, r, d));
      vmax_ = std::max(vmax_, host_norms_[r]);
    }
    const size_t elems = size_t(V) * d;
    rows_.resize(elems, "rows");
    cuda_check(cudaMemcpyAsync(rows_.get(), vocab, elems * sizeof(float), cudaMemcpyHostToDevice, stream_),
               "upload rows");
    norms_.resize(V, "norms");
    cuda_check(cudaMemcpyAsync(norms_.get(), host_norms_.data(), V * sizeof(double), cudaMemcpyHostToDevice,
                               stream_),
               "upload norms");
    if (metric == KnnMetric::Cosine) {
      std::vector<float> normalised(elems);
      for (int64_t r = 0; r < V; ++r) {
        const double inv = host_norms_[r] > 0.0 ? 1.0 / host_norms_[r] : 0.0;
        for (int64_t k = 0; k < d; ++k) normalised[r * d + k] = static_cast<float>(vocab[r * d + k] * inv);
      }
      screen_.resize(elems, "normalised rows");
      cuda_check(cudaMemcpyAsync(screen_.get(), normalised.data(), elems * sizeof(float),
                                 cudaMemcpyHostToDevice, stream_),
                 "upload normalised rows");
    }
    // The matrix path's bf16 copy of the screening rows, converted on the device.
    screen16_.resize(elems, "bf16 rows");
    cuda::to_bf16(stream_, screen16_.get(), metric == KnnMetric::Cosine ? screen_.get() : rows_.get(),
                  static_cast<int64_t>(elems));
    if (metric == KnnMetric::L2) {
      std::vector<float> neg(V);
      for (int64_t r = 0; r < V; ++r) neg[r] = -static_cast<float>(0.5 * host_norms_[r] * host_norms_[r]);
      neg_half_.resize(V, "half squared norms");
      cuda_check(
          cudaMemcpyAsync(neg_half_.get(), neg.data(), V * sizeof(float), cudaMemcpyHostToDevice, stream_),
          "upload half squared norms");
    }
    // The uploads go on stream_: it is non-blocking, so a legacy-stream cudaMemcpy (which may return before
    // its DMA from pageable memory is done) would not be ordered with the searches.
    cuda_check(cudaStreamSynchronize(stream_), "upload");
  }

  // Frees what build() created (the device buffers free themselves); also the destructor's work.
  void release() noexcept {
    cuda::retire_stream(stream_);  // also the plans the model GEMM's cuBLASLt engine made for it
    if (start_) cudaEventDestroy(start_);
    if (mid_) cudaEventDestroy(mid_);
    if (stop_) cudaEventDestroy(stop_);
    start_ = mid_ = stop_ = nullptr;
    stream_ = nullptr;
  }

  // Query-tile height and candidate-buffer capacity of the screening kernel: the tallest tile (fewer passes
  // over the vocabulary) whose buffers fit in shared memory, with room for two tiles of candidates if
  // possible (bq 0: nothing fits).
  struct ScreenShape {
    int bq = 0, cap = 0;
  };
  // PRIORTUNE_CUDA_KNN = auto (default) | fused | matrix, read at every search.
  enum class Path { Auto, Matrix, Fused };
  static Path env_path() {
    const char* raw = std::getenv("PRIORTUNE_CUDA_KNN");
    const std::string v = raw ? raw : "";
    if (v.empty() || v == "auto") return Path::Auto;
    if (v == "matrix") return Path::Matrix;
    if (v == "fused") return Path::Fused;
    throw std::invalid_argument("PRIORTUNE_CUDA_KNN must be auto, matrix or fused, got \"" + v + "\"");
  }
  // PRIORTUNE_CUDA_KNN_SELECT = radix (default) | filter: the matrix path's selection kernel
  // (knn_select_kernel; filter not yet run on a GPU), read at every search.
  static bool env_select_filter() {
    const char* raw = std::getenv("PRIORTUNE_CUDA_KNN_SELECT");
    const std::string v = raw ? raw : "";
    if (v.empty() || v == "radix") return false;
    if (v == "filter") return true;
    throw std::invalid_argument("PRIORTUNE_CUDA_KNN_SELECT must be radix or filter, got \"" + v + "\"");
  }
  // Auto's choice: the matrix path when the GEMM of n queries (one chunk at most) against the vocabulary has
  // at least two 128 x 128 tiles per SM. Measured on an H100 (scripts/gpu-check.sh): there it screened 2.5 to
  // 3 times faster than the fused kernel (160 or 4096 x 50257 x 768, 160 x 262144 x 256, the 50257-row
  // self-search) and tied at 20 x 128256 x 2048; with few tiles (16 x 8192 x 8192: 64) the GEMM leaves SMs
  // idle and the fused kernel, which splits the vocabulary into slabs, was 3 times faster.
  bool fills_device(int64_t n) const {
    const int64_t q = std::min<int64_t>(n, kQueryChunk);
    return cuda::ceil_div(q, 128) * cuda::ceil_div(V_, 128) >= 2 * int64_t{cuda::device_info().sms};
  }
  // The matrix path keeps c candidates per 16384-column slab: its merge must fit one finalize block.
  int matrix_slabs() const { return static_cast<int>(cuda::ceil_div(V_, kSelChunk)); }
  bool matrix_fits(int c) const {
    const int64_t slabs = matrix_slabs();
    return slabs * c <= kMaxMerged &&
           finalize_smem_bytes(static_cast<int>(slabs * c), next_pow2(c)) <= cuda::device_info().smem_optin;
  }
  ScreenShape pick_screen(int c) const {
    for (int bq : {64, 32, 16})
      for (int m : {2, 1})
        if (screen_smem_bytes(bq, c + m * kBV) <= cuda::device_info().smem_optin) return {bq, c + m * kBV};
    return {};
  }

  template <int BQ, bool VEC>
  void launch_screen(int slabs, int tiles_per_slab, int n, int c, int cap, const int* excl) const {
    const size_t smem = screen_smem_bytes(BQ, cap);
    cuda::allow_smem(knn_screen_kernel<BQ, VEC>, smem, "kNN: knn_screen_kernel shared memory");
    const dim3 grid(slabs, (n + BQ - 1) / BQ);
    knn_screen_kernel<BQ, VEC><<<grid, kThreads, smem, stream_>>>(
        q_screen_.get(), metric_ == KnnMetric::Cosine ? screen_.get() : rows_.get(),
        metric_ == KnnMetric::L2 ? neg_half_.get() : nullptr, excl, n, static_cast<int>(V_),
        static_cast<int>(d_), c, cap, tiles_per_slab, slabs, cand_a_.get(), cand_i_.get(), cand_n_.get(),
        bound_.get());
    cuda_check(cudaGetLastError(), "knn_screen_kernel launch");
  }

  // 16-byte loads need every row to start 16-byte aligned (the buffers are cudaMalloc'd): d % 4 == 0.
  template <int BQ>
  void launch_screen(int slabs, int tiles_per_slab, int n, int c, int cap, const int* excl) const {
    if (d_ % 4 == 0)
      launch_screen<BQ, true>(slabs, tiles_per_slab, n, c, cap, excl);
    else
      launch_screen<BQ, false>(slabs, tiles_per_slab, n, c, cap, excl);
  }

  // Screens and finalises the queries `part` with c candidates a slab (matrix path or fused kernel; filter:
  // PRIORTUNE_CUDA_KNN_SELECT=filter's selection on the matrix path); uncertified ones go to *failed. Returns
  // the number of candidates a slab of the last round (more than c where the resident score block served a
  // second selection).
  int run(const std::vector<int64_t>& part, const float* queries, const std::vector<double>& q_norms,
          int64_t k, int c, bool matrix, bool filter, ScreenShape shape, const int32_t* exclude,
          bool first_round, KnnResult* res, std::vector<int64_t>* failed) const {
    const int n = static_cast<int>(part.size()), d = static_cast<int>(d_);
    const int tiles = static_cast<int>((V_ + kBV - 1) / kBV);
    int slabs;
    if (matrix) {
      slabs = matrix_slabs();
    } else {
      const int qtiles = (n + shape.bq - 1) / shape.bq;
      slabs = std::max(1, std::min(tiles, (2 * cuda::device_info().sms + qtiles - 1) / qtiles));
      slabs = std::max(1, std::min(slabs, kMaxMerged / c));
      const int tiles_per_slab = (tiles + slabs - 1) / slabs;
      slabs = (tiles + tiles_per_slab - 1) / tiles_per_slab;
    }
    const int pow2 = next_pow2(c);
    const int merged = slabs * c;
    if (finalize_smem_bytes(merged, pow2) > cuda::device_info().smem_optin)
      throw std::runtime_error("CUDA kNN: candidate set too large");

    // The queries go up as they are (straight from the caller's array when this part is a run of consecutive
    // rows); their screening copy is made on the device.
    bool consecutive = true;
    for (int i = 1; i < n && consecutive; ++i) consecutive = part[i] == part[0] + i;
    std::vector<float> hq;
    const float* src = queries + part[0] * d_;
    if (!consecutive) {
      hq.resize(size_t(n) * d);
      for (int i = 0; i < n; ++i) std::memcpy(&hq[size_t(i) * d], queries + part[i] * d_, sizeof(float) * d);
      src = hq.data();
    }
    std::vector<double> hn(n);
    std::vector<int> hx(n, -1);
    for (int i = 0; i < n; ++i) {
      hn[i] = q_norms[part[i]];
      if (exclude) hx[i] = exclude[part[i]];
    }
    q_orig_.resize(size_t(n) * d, "queries");
    if (matrix)
      q16_.resize(size_t(n) * d, "screening queries");
    else
      q_screen_.resize(size_t(n) * d, "screening queries");
    q_norm_.resize(n, "query norms");
    excl_.resize(n, "exclude");
    cand_a_.resize(size_t(n) * merged, "candidates");
    cand_i_.resize(size_t(n) * merged, "candidates");
    cand_n_.resize(size_t(n) * slabs, "candidate counts");
    bound_.resize(size_t(n) * slabs, "bounds");
    out_i_.resize(size_t(n) * k, "indices");
    out_s_.resize(size_t(n) * k, "scores");
    failed_.resize(n, "flags");
    const int64_t slab_cols = kSelChunk;
    const int64_t W = score_cols_;  // the matrix path's score block, reserved by search()
    cuda_check(cudaMemcpyAsync(q_orig_.get(), src, size_t(n) * d * 4, cudaMemcpyHostToDevice, stream_),
               "upload queries");
    cuda_check(cudaMemcpyAsync(q_norm_.get(), hn.data(), hn.size() * 8, cudaMemcpyHostToDevice, stream_),
               "upload query norms");
    if (exclude)
      cuda_check(cudaMemcpyAsync(excl_.get(), hx.data(), hx.size() * 4, cudaMemcpyHostToDevice, stream_),
                 "upload exclude");
    // Device time from the query preparation (the cosine queries' normalisation and the screening copy) to
    // the finalize kernel's end, so that it covers what a PyTorch peer timing normalise + matmul + topk does;
    // the transfers above are excluded (the peer's queries are on the device already), and so is the host's
    // float64 query norms (knn_search_begin, before this: host time, in the wall clock only).
    cuda_check(cudaEventRecord(start_, stream_), "cudaEventRecord");
    const int64_t nd = int64_t{n} * d;
    knn_prep_kernel<<<cuda::grid_for(nd, 256), 256, 0, stream_>>>(
        q_orig_.get(), q_norm_.get(), n, d, metric_ == KnnMetric::Cosine, matrix ? nullptr : q_screen_.get(),
        matrix ? q16_.get() : nullptr);
    cuda_check(cudaGetLastError(), "knn_prep_kernel launch");
    const int* excl = exclude ? excl_.get() : nullptr;
    if (matrix) {
      for (int64_t v0 = 0; v0 < V_; v0 += W) {
        const int64_t L = std::min(W, V_ - v0);
        cuda::gemm(stream_, cuda::GemmPrecision::BF16, true, n, L, d_, q16_.get(), d_, true,
                   screen16_.get() + v0 * d_, d_, true, scores_.get(), score_cols_,
                   metric_ == KnnMetric::L2 ? neg_half_.get() + v0 : nullptr, 0.0f);
        launch_select(filter, n, static_cast<int>((L + slab_cols - 1) / slab_cols), static_cast<int>(L),
                      static_cast<int>(v0), excl, c, slabs, nullptr);
      }
    } else {
      const int tiles_per_slab = (tiles + slabs - 1) / slabs;
      if (shape.bq == 64)
        launch_screen<64>(slabs, tiles_per_slab, n, c, shape.cap, excl);
      else if (shape.bq == 32)
        launch_screen<32>(slabs, tiles_per_slab, n, c, shape.cap, excl);
      else
        launch_screen<16>(slabs, tiles_per_slab, n, c, shape.cap, excl);
    }
    cuda_check(cudaEventRecord(mid_, stream_), "cudaEventRecord");
    launch_finalize(n, k, c, slabs, matrix, nullptr);
    std::vector<int> oi(size_t(n) * k), fl(n);
    std::vector<float> os(size_t(n) * k);
    collect(n, k, &oi, &os, &fl, res);
    // A score block that spans the whole vocabulary is still resident: the uncertified queries take their
    // candidates from it again, 4c a slab, without another GEMM over the vocabulary (at 20 x 128256 x 2048
    // that second GEMM alone reads the 525 MB bf16 copy).
    std::vector<int> retry;
    for (int i = 0; i < n; ++i)
      if (fl[i]) retry.push_back(i);
    // recovered_queries: the queries whose first screening was not certified, each once, however many
    // selections and rounds it takes (as on the CPU).
    if (first_round) res->recovered_queries += static_cast<int64_t>(retry.size());
    const int64_t available = V_ - (exclude ? 1 : 0);
    while (matrix && W >= V_ && !retry.empty() && int64_t{4} * c < available && matrix_fits(4 * c)) {
      c *= 4;
      const int nf = static_cast<int>(retry.size());
      map_.resize(nf, "retried queries");
      cand_a_.resize(size_t(nf) * slabs * c, "candidates");
      cand_i_.resize(size_t(nf) * slabs * c, "candidates");
      cand_n_.resize(size_t(nf) * slabs, "candidate counts");
      bound_.resize(size_t(nf) * slabs, "bounds");
      cuda_check(cudaMemcpyAsync(map_.get(), retry.data(), size_t(nf) * 4, cudaMemcpyHostToDevice, stream_),
                 "upload retried queries");
      cuda_check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      launch_select(filter, nf, slabs, static_cast<int>(V_), 0, excl, c, slabs, map_.get());
      cuda_check(cudaEventRecord(mid_, stream_), "cudaEventRecord");
      launch_finalize(nf, k, c, slabs, true, map_.get());
      collect(n, k, &oi, &os, &fl, res);
      std::vector<int> still;
      for (int i : retry)
        if (fl[i]) still.push_back(i);
      retry.swap(still);
    }
    for (int i = 0; i < n; ++i) {
      if (fl[i]) {
        failed->push_back(part[i]);
        continue;
      }
      std::copy_n(&oi[size_t(i) * k], k, res->indices.begin() + part[i] * k);
      std::copy_n(&os[size_t(i) * k], k, res->scores.begin() + part[i] * k);
    }
    return c;
  }

  // Allocates the matrix path's score block for chunks of up to n queries: n x W floats, W a multiple of the
  // selection slab, the whole vocabulary if it fits kScoreBudget. Where the device refuses that much, W is
  // halved (more GEMM passes, and no resident retry once W < V) down to one slab; false when even that
  // fails (the block is then freed). Sets score_cols_ = W.
  bool reserve_scores(int64_t n) const {
    const int64_t slab_cols = kSelChunk;
    int64_t W = std::max<int64_t>(1, kScoreBudget / (int64_t{4} * n * slab_cols)) * slab_cols;
    W = std::min(W, (V_ + slab_cols - 1) / slab_cols * slab_cols);
    for (;;) {
      try {
        scores_.resize(size_t(n) * W, "score block");
        score_cols_ = W;
        return true;
      } catch (const cuda::OutOfMemory&) {
        if (W == slab_cols) {
          scores_.release();
          return false;
        }
        W = std::max(slab_cols, W / 2 / slab_cols * slab_cols);
      }
    }
  }

  // The selection kernel over the score block's columns [v0, v0 + L) for `blocks` queries (map: their score
  // rows, nullptr for 0..blocks-1; candidate slots are the block's), c candidates a slab.
  void launch_select(bool filter, int blocks, int slabs_here, int L, int v0, const int* excl, int c,
                     int slabs, const int* map) const {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(slabs_here));
    auto* select = filter ? knn_select_kernel<true> : knn_select_kernel<false>;
    select<<<grid, kSelThreads, 0, stream_>>>(scores_.get(), score_cols_, L, v0,
                                              static_cast<int>(v0 / kSelChunk), excl, c, slabs, map,
                                              cand_a_.get(), cand_i_.get(), cand_n_.get(), bound_.get());
    cuda_check(cudaGetLastError(), "knn_select_kernel launch");
  }

  // The finalize kernel for `blocks` queries (map as in launch_select), c candidates a slab; the stop event
  // follows it.
  void launch_finalize(int blocks, int64_t k, int c, int slabs, bool matrix, const int* map) const {
    const int pow2 = next_pow2(c);
    const size_t fsmem = finalize_smem_bytes(slabs * c, pow2);
    auto* finalize = d_ % 4 == 0 ? knn_finalize_kernel<true> : knn_finalize_kernel<false>;
    cuda::allow_smem(finalize, fsmem, "kNN: knn_finalize_kernel shared memory");
    finalize<<<blocks, kFinThreads, fsmem, stream_>>>(
        q_orig_.get(), q_norm_.get(), rows_.get(), norms_.get(), metric_code(metric_), static_cast<int>(d_),
        static_cast<int>(k), c, slabs, pow2, vmax_, matrix ? kUnitErrBf16 : kUnitErrTf32, map, cand_a_.get(),
        cand_i_.get(), cand_n_.get(), bound_.get(), out_i_.get(), out_s_.get(), failed_.get());
    cuda_check(cudaGetLastError(), "knn_finalize_kernel launch");
    cuda_check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
  }

  // Downloads the n queries' results and flags, waits, and adds the start..stop (start..mid: the query
  // preparation and screening, or a second selection) device time to res.
  void collect(int n, int64_t k, std::vector<int>* oi, std::vector<float>* os, std::vector<int>* fl,
               KnnResult* res) const {
    cuda_check(cudaMemcpyAsync(oi->data(), out_i_.get(), size_t(n) * k * 4, cudaMemcpyDeviceToHost, stream_),
               "download");
    cuda_check(cudaMemcpyAsync(os->data(), out_s_.get(), size_t(n) * k * 4, cudaMemcpyDeviceToHost, stream_),
               "download");
    cuda_check(cudaMemcpyAsync(fl->data(), failed_.get(), size_t(n) * 4, cudaMemcpyDeviceToHost, stream_),
               "download");
    cuda_check(cudaStreamSynchronize(stream_), "kNN search");
    float ms = 0.0f, screen_ms = 0.0f;
    cuda_check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    cuda_check(cudaEventElapsedTime(&screen_ms, start_, mid_), "cudaEventElapsedTime");
    res->device_ms += ms;
    res->device_screen_ms += screen_ms;
  }

  void host_exact(const std::vector<int64_t>& part, const float* queries, int64_t k, const int32_t* exclude,
                  int threads, KnnResult* res) const {
    std::vector<int32_t> idx(k);
    std::vector<float> sc(k);
    for (int64_t q : part) {
      int32_t ex = exclude ? exclude[q] : -1;
      knn_exact_scan(idx.data(), sc.data(), queries + q * d_, 1, host_rows_.data(), host_norms_.data(), V_,
                     d_, k, metric_, exclude ? &ex : nullptr, threads);
      std::copy(idx.begin(), idx.end(), res->indices.begin() + q * k);
      std::copy(sc.begin(), sc.end(), res->scores.begin() + q * k);
    }
  }

  int64_t V_, d_;
  KnnMetric metric_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, mid_ = nullptr, stop_ = nullptr;
  double vmax_ = 0.0;
  HostFloats host_rows_;
  std::vector<double> host_norms_;
  DeviceBuffer<float> rows_, screen_, neg_half_;
  DeviceBuffer<uint16_t> screen16_;
  DeviceBuffer<double> norms_;
  mutable std::mutex mu_;
  mutable DeviceBuffer<float> q_orig_, q_screen_, cand_a_, bound_, out_s_, scores_;
  mutable DeviceBuffer<uint16_t> q16_;
  mutable DeviceBuffer<double> q_norm_;
  mutable DeviceBuffer<int> excl_, cand_i_, cand_n_, out_i_, failed_, map_;
  mutable int64_t score_cols_ = 0;  // row stride of scores_
};

}  // namespace

std::unique_ptr<KnnIndex> knn_index_cuda(const float* vocab, int64_t V, int64_t d, KnnMetric metric) {
  if (V <= 0 || d <= 0) throw std::invalid_argument("vocab: expected at least one row of dimension >= 1");
  return knn_index_cuda(host_copy(vocab, static_cast<size_t>(V * d)), d, metric);
}

std::unique_ptr<KnnIndex> knn_index_cuda(HostFloats&& vocab, int64_t d, KnnMetric metric) {
  return std::make_unique<CudaIndex>(std::move(vocab), d, metric);
}

}  // namespace pt
