// CUDA elementwise, normalisation, loss, reduction and optimiser ops of priortune/cuda_ops.h (everything but
// the GEMM, the bf16 conversion and attention), and their self-test against the CPU references of ops.h.
//
// Design. Every op here is memory-bound, so each kernel makes one coalesced pass over its data (norms and
// softmax re-read a row that is still in cache). float4 loads/stores are used when every base pointer is
// 16-byte aligned and the row length (or, for flat ops, nothing) allows it; otherwise a scalar path of the
// same kernel template runs. The launcher decides at run time.
//  - Flat ops (GELU, residual add, batch sums, AdamW): grid-stride loop over float4 packs, then a scalar
//  tail.
//  - Row ops (embedding, SwiGLU, RoPE, gather/scatter): grid.y strides over rows, grid.x over a row's
//    columns, so there is no per-element division.
//  - Norms: one block per row. The row (forward: x or x + residual; backward: dout * w and x) is held in
//    registers, up to 8 (forward) or 4 (backward) packs per thread with up to 1024 threads; the forward's
//    statistics are float64 sums as on the CPU (fp32 squares overflow past ~1e19), two-pass for LayerNorm
//    (mean, then centred squares); the backward's row sums are of scale-free terms (dn, dn xhat) in fp32.
//    Longer rows take a scalar kernel that re-reads global memory.
//  - softmax_xent: one block per row: max and sum of exp in one read (a running max per thread), then
//    (optionally) the gradient, in place or as bf16
//    into a second buffer. A row whose start is not 16-byte aligned runs as a scalar head, a float4 body
//    and a scalar tail.
//  - sum_f64 / sum_squares_f64: a single 1024-thread block, per-thread float64 accumulators over a fixed
//    stride and a fixed-shape tree, so the result is deterministic. No kernel in this file uses atomics.
// Reductions across threads use xor-butterfly shuffles (then one shared-memory step across warps): every
// lane ends with bitwise the same value, so all threads of a block agree on a row's statistics.
#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common.cuh"
#include "priortune/ops.h"

namespace pt {
namespace cuda {
namespace {

constexpr int kThreads = 256;     // flat and row kernels
constexpr int kNormCacheFwd = 8;  // packs per thread held in registers by norm_forward
constexpr int kNormCacheBwd = 4;  // packs per thread (two arrays) held by norm_backward
constexpr int kMaxBlockThreads = 1024;

// ---------------------------------------------------------------------------------------------------------
// Host helpers

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

inline void require(bool ok, const char* op, const char* what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}

// Threads for a row kernel whose rows have `cols` work items: a multiple of 32, at most kThreads.
inline int row_threads(int64_t cols) {
  const int64_t t = std::min<int64_t>(kThreads, ceil_div(std::max<int64_t>(cols, 1), 32) * 32);
  return static_cast<int>(t);
}
inline dim3 row_grid(int64_t rows, int64_t cols, int threads) {
  const int64_t gx = std::min<int64_t>(ceil_div(std::max<int64_t>(cols, 1), threads), 65535);
  const int64_t gy = std::min<int64_t>(std::max<int64_t>(rows, 1), 65535);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}
// Blocks for a kernel that loops over `rows` with one block per row.
inline unsigned rows_grid(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(rows, 1 << 20));
}

// Norm block size: about 4 packs per thread, a multiple of 32 in [128, 1024].
inline int norm_threads(int64_t packs) {
  const int64_t t = ceil_div(ceil_div(packs, 4), 32) * 32;
  return static_cast<int>(std::min<int64_t>(kMaxBlockThreads, std::max<int64_t>(128, t)));
}

// ---------------------------------------------------------------------------------------------------------
// Device helpers

template <int VEC>
__device__ __forceinline__ void load_vec(float (&d)[VEC], const float* p) {
  if constexpr (VEC == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    d[0] = t.x, d[1] = t.y, d[2] = t.z, d[3] = t.w;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) d[e] = p[e];
  }
}
template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const float (&d)[VEC]) {
  if constexpr (VEC == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(d[0], d[1], d[2], d[3]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = d[e];
  }
}

// bf16 outputs (the activation operands of BF16 products): rounded to nearest even; four at a time as one
// 8-byte store (the caller checks the alignment, as for float4).
template <int VEC>
__device__ __forceinline__ void store_vec(uint16_t* p, const float (&d)[VEC]) {
  if constexpr (VEC == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16x2(d[0], d[1]), pack_bf16x2(d[2], d[3]));
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = __bfloat16_as_ushort(__float2bfloat16_rn(d[e]));
  }
}
__device__ __forceinline__ void put(float* p, float v) {
  *p = v;
}
__device__ __forceinline__ void put(uint16_t* p, float v) {
  *p = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

struct SumOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Butterfly: lanes i and i^o combine the same two values (commutative op), so all lanes end equal.
template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Whole-block reduction; every thread returns the same value. blockDim.x must be a multiple of 32. `sh` is
// 32 elements of shared memory; the leading barrier lets consecutive calls reuse it.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, T identity, T* sh, Op op) {
  v = warp_reduce(v, op);
  __syncthreads();
  const unsigned lane = threadIdx.x & 31u;
  if (lane == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? sh[lane] : identity;
  return warp_reduce(v, op);
}

// ---------------------------------------------------------------------------------------------------------
// Embedding and batch sums

template <int VEC>
__global__ void embedding_kernel(float* out, const int32_t* ids, const float* prompt, int64_t P,
                                 const float* wte, const float* wpe, int64_t pos_offset, int64_t B, int64_t T,
                                 int64_t C) {
  const int64_t S = P + T, rows = B * S, packs = C / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t b = row / S, s = row - b * S;
    const float* src = s < P ? prompt + s * C : wte + static_cast<int64_t>(ids[b * T + s - P]) * C;
    const float* pe = wpe ? wpe + (s + pos_offset) * C : nullptr;
    float* o = out + row * C;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < packs; j += stride) {
      float a[VEC];
      load_vec<VEC>(a, src + j * VEC);
      if (pe) {
        float p[VEC];
        load_vec<VEC>(p, pe + j * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) a[e] += p[e];
      }
      store_vec<VEC>(o + j * VEC, a);
    }
  }
}

// dst[i] = sum_b src[b * stride + i], b in order from 0.0f (the CPU's memset-then-add order).
__global__ void batch_sum_kernel(float* dst, const float* src, int64_t B, int64_t batch_stride, int64_t n,
                                 int64_t n4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = start; i < n4; i += stride) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < B; ++b) {
      float v[4];
      load_vec<4>(v, src + b * batch_stride + 4 * i);
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[e] += v[e];
    }
    store_vec<4>(dst + 4 * i, acc);
  }
  for (int64_t i = 4 * n4 + start; i < n; i += stride) {
    float acc = 0.0f;
    for (int64_t b = 0; b < B; ++b) acc += src[b * batch_stride + i];
    dst[i] = acc;
  }
}

// 1 / sqrt(sum / C + eps) from a float64 sum of squares (as the CPU reference: fp32 squares overflow for
// entries past ~1e19 and lose the row's scale).
__device__ __forceinline__ float norm_rstd(double sum_sq, int64_t C, float eps) {
  return static_cast<float>(1.0 / sqrt(sum_sq / static_cast<double>(C) + eps));
}

// ---------------------------------------------------------------------------------------------------------
// Norms (no __restrict__: x_sum may alias x; each thread reads its own elements before writing them)

template <int VEC, int MAXV, bool LN, class O>
__global__ void __launch_bounds__(kMaxBlockThreads)
    norm_forward_cached(O* out, float* mean, float* rstd, const float* x, const float* residual, float* x_sum,
                        const float* w, const float* b, int64_t N, int C, float eps) {
  __shared__ double sh[32];
  const int packs = C / VEC;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t off = row * C;
    float v[MAXV][VEC];
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (j < packs) {
        load_vec<VEC>(v[k], x + off + j * VEC);
        if (residual) {
          float r[VEC];
          load_vec<VEC>(r, residual + off + j * VEC);
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[k][e] += r[e];
          store_vec<VEC>(x_sum + off + j * VEC, v[k]);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const double d = v[k][e];
          s += LN ? d : d * d;
        }
      }
    }
    s = block_reduce(s, 0.0, sh, SumOp());
    float m = 0.0f, r;
    if constexpr (LN) {
      const double md = s / static_cast<double>(C);
      m = static_cast<float>(md);
      double q = 0.0;
#pragma unroll
      for (int k = 0; k < MAXV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < packs) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const double d = v[k][e] - md;
            q += d * d;
          }
        }
      }
      q = block_reduce(q, 0.0, sh, SumOp());
      r = norm_rstd(q, C, eps);
    } else {
      r = norm_rstd(s, C, eps);
    }
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (j < packs) {
        float wv[VEC], o[VEC];
        load_vec<VEC>(wv, w + j * VEC);
        if constexpr (LN) {
          float bv[VEC] = {};
          if (b) load_vec<VEC>(bv, b + j * VEC);
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[e] = (v[k][e] - m) * r * wv[e] + bv[e];
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[e] = v[k][e] * r * wv[e];
        }
        store_vec<VEC>(out + off + j * VEC, o);
      }
    }
    if (threadIdx.x == 0) {
      if (LN && mean) mean[row] = m;
      if (rstd) rstd[row] = r;
    }
  }
}

// Rows too long for the register cache: scalar, the row re-read from global memory (x_sum after the first
// pass when there is a residual: this thread wrote those elements itself).
template <bool LN, class O>
__global__ void __launch_bounds__(kMaxBlockThreads)
    norm_forward_uncached(O* out, float* mean, float* rstd, const float* x, const float* residual,
                          float* x_sum, const float* w, const float* b, int64_t N, int64_t C, float eps) {
  __shared__ double sh[32];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t off = row * C;
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float v = x[off + c];
      if (residual) {
        v += residual[off + c];
        x_sum[off + c] = v;
      }
      const double d = v;
      s += LN ? d : d * d;
    }
    s = block_reduce(s, 0.0, sh, SumOp());
    const float* in = (residual ? x_sum : x) + off;
    float m = 0.0f, r;
    if constexpr (LN) {
      const double md = s / static_cast<double>(C);
      m = static_cast<float>(md);
      double q = 0.0;
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const double d = in[c] - md;
        q += d * d;
      }
      q = block_reduce(q, 0.0, sh, SumOp());
      r = norm_rstd(q, C, eps);
    } else {
      r = norm_rstd(s, C, eps);
    }
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      if constexpr (LN)
        put(out + off + c, (in[c] - m) * r * w[c] + (b ? b[c] : 0.0f));
      else
        put(out + off + c, in[c] * r * w[c]);
    }
    if (threadIdx.x == 0) {
      if (LN && mean) mean[row] = m;
      if (rstd) rstd[row] = r;
    }
  }
}

// LayerNorm: dx += r (dn - mean(dn) - xhat mean(dn xhat)), dn = dout w, xhat = (x - m) r.
// RMSNorm:   the same with m = 0 and no mean(dn) term (r dn - r^3 x mean(dn x), written so that no power of r
// under- or overflows: rows of any scale keep their precision).
template <int VEC, int MAXV, bool LN>
__global__ void __launch_bounds__(kMaxBlockThreads)
    norm_backward_cached(float* dx, uint16_t* dx16, const float* dout, const float* x, const float* w,
                         const float* mean, const float* rstd, int64_t N, int C) {
  __shared__ float sh[32];
  const int packs = C / VEC;
  const float fc = static_cast<float>(C);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t off = row * C;
    float m = 0.0f;
    if constexpr (LN) m = mean[row];
    const float r = rstd[row];
    float dn[MAXV][VEC], xv[MAXV][VEC];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (j < packs) {
        float g[VEC], wv[VEC];
        load_vec<VEC>(g, dout + off + j * VEC);
        load_vec<VEC>(wv, w + j * VEC);
        load_vec<VEC>(xv[k], x + off + j * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          dn[k][e] = g[e] * wv[e];
          if constexpr (LN) s1 += dn[k][e];
          s2 += dn[k][e] * ((xv[k][e] - m) * r);
        }
      }
    }
    if constexpr (LN) s1 = block_reduce(s1, 0.0f, sh, SumOp());
    s2 = block_reduce(s2, 0.0f, sh, SumOp());
    const float m1 = s1 / fc, m2 = s2 / fc;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (j < packs) {
        float d[VEC];
        load_vec<VEC>(d, dx + off + j * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) d[e] += r * (dn[k][e] - m1 - (xv[k][e] - m) * r * m2);
        store_vec<VEC>(dx + off + j * VEC, d);
        if (dx16) store_vec<VEC>(dx16 + off + j * VEC, d);
      }
    }
  }
}

template <bool LN>
__global__ void __launch_bounds__(kMaxBlockThreads)
    norm_backward_uncached(float* dx, uint16_t* dx16, const float* dout, const float* x, const float* w,
                           const float* mean, const float* rstd, int64_t N, int64_t C) {
  __shared__ float sh[32];
  const float fc = static_cast<float>(C);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t off = row * C;
    float m = 0.0f;
    if constexpr (LN) m = mean[row];
    const float r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float dn = dout[off + c] * w[c], xc = x[off + c];
      if constexpr (LN) s1 += dn;
      s2 += dn * ((xc - m) * r);
    }
    if constexpr (LN) s1 = block_reduce(s1, 0.0f, sh, SumOp());
    s2 = block_reduce(s2, 0.0f, sh, SumOp());
    const float m1 = s1 / fc, m2 = s2 / fc;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float dn = dout[off + c] * w[c], xc = x[off + c];
      const float d = dx[off + c] + r * (dn - m1 - (xc - m) * r * m2);
      dx[off + c] = d;
      if (dx16) put(dx16 + off + c, d);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Flat elementwise maps: out[i] = op(a[i], b[i]) (b unused when NIN == 1). out may alias a or b.

struct GeluForwardOp {
  __device__ __forceinline__ float operator()(float v, float) const { return gelu_tanh(v); }
};
struct GeluBackwardOp {  // (x, dout)
  __device__ __forceinline__ float operator()(float v, float d) const { return gelu_tanh_grad(v, d); }
};
struct AddOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <int NIN, class Op, class O>
__global__ void map_kernel(O* out, const float* a, const float* b, int64_t n, int64_t n4, Op op) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = start; i < n4; i += stride) {
    float va[4], vb[4] = {0.0f, 0.0f, 0.0f, 0.0f}, o[4];
    load_vec<4>(va, a + 4 * i);
    if constexpr (NIN == 2) load_vec<4>(vb, b + 4 * i);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = op(va[e], vb[e]);
    store_vec<4>(out + 4 * i, o);
  }
  for (int64_t i = 4 * n4 + start; i < n; i += stride) {
    float vb = 0.0f;
    if constexpr (NIN == 2) vb = b[i];
    put(out + i, op(a[i], vb));
  }
}

template <int NIN, class Op, class O>
void launch_map(Stream stream, const char* name, O* out, const float* a, const float* b, int64_t n, Op op) {
  const bool vec = aligned16(out) && aligned16(a) && (NIN == 1 || aligned16(b));
  const int64_t n4 = vec ? n / 4 : 0;
  map_kernel<NIN, Op, O><<<grid_for(n4 > 0 ? n4 : n, kThreads), kThreads, 0, stream>>>(out, a, b, n, n4, op);
  check_launch(name);
}

// ---------------------------------------------------------------------------------------------------------
// SwiGLU: gate_up[N, 2I] = [gate | up]

template <int VEC, class O>
__global__ void swiglu_forward_kernel(O* out, const float* gate_up, int64_t N, int64_t I) {
  const int64_t packs = I / VEC, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < N; row += gridDim.y) {
    const float* g = gate_up + row * 2 * I;
    const float* u = g + I;
    O* o = out + row * I;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < packs; j += stride) {
      float gv[VEC], uv[VEC], ov[VEC];
      load_vec<VEC>(gv, g + j * VEC);
      load_vec<VEC>(uv, u + j * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ov[e] = gv[e] / (1.0f + expf(-gv[e])) * uv[e];
      store_vec<VEC>(o + j * VEC, ov);
    }
  }
}

template <int VEC, class O>
__global__ void swiglu_backward_kernel(O* dgate_up, const float* gate_up, const float* dout, int64_t N,
                                       int64_t I) {
  const int64_t packs = I / VEC, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < N; row += gridDim.y) {
    const float* g = gate_up + row * 2 * I;
    const float* u = g + I;
    const float* d = dout + row * I;
    O* dg = dgate_up + row * 2 * I;
    O* du = dg + I;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < packs; j += stride) {
      float gv[VEC], uv[VEC], dv[VEC], dgv[VEC], duv[VEC];
      load_vec<VEC>(gv, g + j * VEC);
      load_vec<VEC>(uv, u + j * VEC);
      load_vec<VEC>(dv, d + j * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float sig = 1.0f / (1.0f + expf(-gv[e]));
        duv[e] = dv[e] * gv[e] * sig;
        dgv[e] = dv[e] * uv[e] * sig * (1.0f + gv[e] * (1.0f - sig));
      }
      store_vec<VEC>(dg + j * VEC, dgv);
      store_vec<VEC>(du + j * VEC, duv);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// RoPE (rotate-half): pair (i, i + half) of each head rotated by the row's angle times `dir`.

template <int VEC>
__global__ void rope_kernel(float* x, int64_t rows, int64_t S, int64_t ld, int64_t col0, int heads, int half,
                            const float* cos, const float* sin, float dir) {
  const int per_head = half / VEC;
  const int cols = heads * per_head;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t s = row % S;
    float* base = x + row * ld + col0;
    const float* cr = cos + s * half;
    const float* sr = sin + s * half;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x) {
      const int h = j / per_head, i = (j - h * per_head) * VEC;
      float* v = base + static_cast<int64_t>(h) * 2 * half + i;
      float x1[VEC], x2[VEC], c[VEC], sn[VEC], y1[VEC], y2[VEC];
      load_vec<VEC>(x1, v);
      load_vec<VEC>(x2, v + half);
      load_vec<VEC>(c, cr + i);
      load_vec<VEC>(sn, sr + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float si = dir * sn[e];
        y1[e] = x1[e] * c[e] - x2[e] * si;
        y2[e] = x2[e] * c[e] + x1[e] * si;
      }
      store_vec<VEC>(v, y1);
      store_vec<VEC>(v + half, y2);
    }
  }
}

void launch_rope(const char* name, Stream stream, float* x, int64_t B, int64_t S, int64_t ld, int64_t col0,
                 int64_t heads, int64_t hd, const float* cos, const float* sin, float dir) {
  require(B >= 0 && S >= 0 && heads >= 0 && hd >= 0 && col0 >= 0 && ld >= 0, name, "negative size");
  if (B == 0 || S == 0 || heads == 0) return;
  require(hd > 0 && hd % 2 == 0, name, "hd must be positive and even");
  require(heads * hd <= INT_MAX, name, "heads * hd too large");
  require(col0 + heads * hd <= ld, name, "heads exceed the row (col0 + heads * hd > ld)");
  require(x && cos && sin, name, "null pointer");
  const int64_t half = hd / 2, rows = B * S;
  const bool vec =
      half % 4 == 0 && ld % 4 == 0 && col0 % 4 == 0 && aligned16(x) && aligned16(cos) && aligned16(sin);
  const int64_t cols = heads * (vec ? half / 4 : half);
  const int threads = row_threads(cols);
  const dim3 grid = row_grid(rows, cols, threads);
  if (vec)
    rope_kernel<4><<<grid, threads, 0, stream>>>(x, rows, S, ld, col0, static_cast<int>(heads),
                                                 static_cast<int>(half), cos, sin, dir);
  else
    rope_kernel<1><<<grid, threads, 0, stream>>>(x, rows, S, ld, col0, static_cast<int>(heads),
                                                 static_cast<int>(half), cos, sin, dir);
  check_launch(name);
}

// ---------------------------------------------------------------------------------------------------------
// Row gather / scatter

template <int VEC, bool GATHER>
__global__ void rows_copy_kernel(float* dst, const float* src, const int32_t* rows, int64_t R, int64_t C,
                                 int64_t src_ld) {
  const int64_t packs = C / VEC, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < R; i += gridDim.y) {
    const int64_t other = rows[i];
    const float* s = src + (GATHER ? other : i) * src_ld;
    float* d = dst + (GATHER ? i : other) * C;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < packs; j += stride) {
      float v[VEC];
      load_vec<VEC>(v, s + j * VEC);
      store_vec<VEC>(d + j * VEC, v);
    }
  }
}

template <bool GATHER>
void launch_rows_copy(const char* name, Stream stream, float* dst, const float* src, const int32_t* rows,
                      int64_t R, int64_t C, int64_t src_ld) {
  require(R >= 0 && C >= 0, name, "negative size");
  if (R == 0 || C == 0) return;
  require(dst && src && rows, name, "null pointer");
  require(src_ld >= C, name, "source row stride below C");
  const bool vec = C % 4 == 0 && src_ld % 4 == 0 && aligned16(dst) && aligned16(src);
  const int64_t cols = vec ? C / 4 : C;
  const int threads = row_threads(cols);
  const dim3 grid = row_grid(R, cols, threads);
  if (vec)
    rows_copy_kernel<4, GATHER><<<grid, threads, 0, stream>>>(dst, src, rows, R, C, src_ld);
  else
    rows_copy_kernel<1, GATHER><<<grid, threads, 0, stream>>>(dst, src, rows, R, C, src_ld);
  check_launch(name);
}

// ---------------------------------------------------------------------------------------------------------
// Softmax cross-entropy

// Calls f(j, value) for every j < V of row p (this thread's share), then stores the value back when WRITE:
// scalar head up to the first 16-byte boundary, float4 body, scalar tail.
template <bool WRITE, class F>
__device__ __forceinline__ void row_visit(float* p, int64_t V, F&& f) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15u) / 4;
  const int64_t head = mis ? (4 - mis < V ? 4 - mis : V) : 0;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) {
    float v = p[j];
    f(j, v);
    if (WRITE) p[j] = v;
  }
  const int64_t n4 = (V - head) / 4;
  float4* q = reinterpret_cast<float4*>(p + head);
  for (int64_t k = threadIdx.x; k < n4; k += blockDim.x) {
    float4 v = q[k];
    const int64_t j = head + 4 * k;
    f(j, v.x);
    f(j + 1, v.y);
    f(j + 2, v.z);
    f(j + 3, v.w);
    if (WRITE) q[k] = v;
  }
  for (int64_t j = head + 4 * n4 + threadIdx.x; j < V; j += blockDim.x) {
    float v = p[j];
    f(j, v);
    if (WRITE) p[j] = v;
  }
}

__global__ void __launch_bounds__(kMaxBlockThreads)
    softmax_xent_kernel(float* logits, int64_t ld, float* losses, const int32_t* targets, int64_t R,
                        int64_t V, float grad_scale, bool want_grad, uint16_t* grad16) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    float* p = logits + r * ld;
    uint16_t* g = grad16 ? grad16 + r * ld : nullptr;
    const int64_t t = targets[r];
    if (t < 0 || t >= V) {  // outside the contract: ignored row (t < 0, the CPU's convention) or NaN loss
      if (threadIdx.x == 0) losses[r] = t < 0 ? 0.0f : NAN;
      if (want_grad && g)
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = 0;
      else if (want_grad)
        row_visit<true>(p, V, [](int64_t, float& v) { v = 0.0f; });
      continue;  // uniform across the block: t is the same for every thread
    }
    // The target's logit, read before the gradient pass overwrites it (the reductions' barriers order this).
    const float lt = p[t];
    // One read for the statistics: each thread keeps its running max m and the sum of exp(v - m) over its
    // share (rescaled when m rises; a share that is all -inf so far adds nothing), then the block's max and
    // the shares' sums rescaled to it.
    float m = -INFINITY, part = 0.0f;
    row_visit<false>(p, V, [&](int64_t, float& v) {
      if (v > m) {
        part = part * expf(m - v) + 1.0f;
        m = v;
      } else if (v != -INFINITY) {  // a NaN (v > m false) poisons the sum, as it does the CPU's
        part += expf(v - m);
      }
    });
    const float mx = block_reduce(m, -INFINITY, sh, MaxOp());
    // part == 0: no finite value in the share (its m is -inf); a NaN part stays NaN whatever m is.
    const float sum = block_reduce(part == 0.0f ? 0.0f : part * expf(m - mx), 0.0f, sh, SumOp());
    if (threadIdx.x == 0)
      losses[r] = static_cast<float>(log(static_cast<double>(sum)) + static_cast<double>(mx) - lt);
    if (want_grad) {
      const float k = grad_scale / sum;
      auto grad = [&](int64_t j, float& v) {
        v = expf(v - mx) * k;
        if (j == t) v -= grad_scale;
      };
      if (g)
        row_visit<false>(p, V, [&](int64_t j, float& v) {
          grad(j, v);
          g[j] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
        });
      else
        row_visit<true>(p, V, grad);
    }
  }
}

// Greedy decoding's argmax: each thread keeps the first column of its share's largest value (its columns
// come in increasing order, NaNs never win a comparison), then the block takes the largest value and the
// lowest column holding it.
struct MinOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a < b ? a : b; }
};

__global__ void __launch_bounds__(kMaxBlockThreads)
    argmax_kernel(int32_t* out, const float* logits, int64_t ld, int64_t R, int64_t V) {
  __shared__ float sh[32];
  __shared__ int shi[32];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    float m = -INFINITY;
    int at = INT_MAX;
    row_visit<false>(const_cast<float*>(logits + r * ld), V, [&](int64_t j, float& v) {
      if (v > m || (at == INT_MAX && v == -INFINITY)) {
        m = v;
        at = static_cast<int>(j);
      }
    });
    const float mx = block_reduce(m, -INFINITY, sh, MaxOp());
    const int first = block_reduce(m == mx ? at : INT_MAX, INT_MAX, shi, MinOp());
    // std::max_element keeps a NaN in column 0 (no value compares above it).
    if (threadIdx.x == 0) {
      const float v0 = logits[r * ld];
      out[r] = first == INT_MAX || v0 != v0 ? 0 : first;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic float64 sums (one block)

template <bool SQUARE>
__device__ __forceinline__ double sum_term(float v) {
  const double d = v;
  return SQUARE ? d * d : d;
}

template <bool SQUARE>
__global__ void __launch_bounds__(kMaxBlockThreads)
    sum_f64_kernel(double* out, const float* x, int64_t n, int64_t n4, bool accumulate) {
  __shared__ double sh[32];
  double a0 = 0.0, a1 = 0.0;
  for (int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    a0 += sum_term<SQUARE>(v.x) + sum_term<SQUARE>(v.y);
    a1 += sum_term<SQUARE>(v.z) + sum_term<SQUARE>(v.w);
  }
  for (int64_t i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) a0 += sum_term<SQUARE>(x[i]);
  const double total = block_reduce(a0 + a1, 0.0, sh, SumOp());
  if (threadIdx.x == 0) out[0] = accumulate ? out[0] + total : total;
}

template <bool SQUARE>
void launch_sum_f64(const char* name, Stream stream, double* out, const float* x, int64_t n,
                    bool accumulate) {
  require(n >= 0, name, "negative size");
  if (n == 0 && accumulate) return;  // out += 0
  require(out && (n == 0 || x), name, "null pointer");
  const int64_t n4 = aligned16(x) ? n / 4 : 0;
  sum_f64_kernel<SQUARE><<<1, kMaxBlockThreads, 0, stream>>>(out, x, n, n4, accumulate);
  check_launch(name);
}

// ---------------------------------------------------------------------------------------------------------
// AdamW (the order of adamw.cpp: decay, moments, bias-corrected step)

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n, int64_t n4,
                             const float* hyper, float beta1, float beta2, float eps, float weight_decay,
                             const float* clip, const double* sum_sq) {
  // A non-finite gradient norm leaves the parameters and moments as they are (the host then refuses the step,
  // as the CPU trainers do); read on the device so that a replayed graph checks every step.
  if (sum_sq && !(sum_sq[0] - sum_sq[0] == 0.0)) return;  // NaN or +-inf (x - x is NaN for both)
  const float lr = hyper[0], bc1 = hyper[1], bc2 = hyper[2];
  const float step = lr / bc1;
  const float inv_sqrt_bc2 = 1.0f / sqrtf(bc2);
  const float decay = 1.0f - lr * weight_decay;
  const float cf = clip ? clip[0] : 1.0f;
  auto update = [&](float& p, float g, float& mm, float& vv) {
    g *= cf;
    p *= decay;
    mm = beta1 * mm + (1.0f - beta1) * g;
    vv = beta2 * vv + (1.0f - beta2) * g * g;
    p -= step * mm / (sqrtf(vv) * inv_sqrt_bc2 + eps);
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = start; i < n4; i += stride) {
    float pv[4], gv[4], mv[4], vv[4];
    load_vec<4>(pv, param + 4 * i);
    load_vec<4>(gv, grad + 4 * i);
    load_vec<4>(mv, m + 4 * i);
    load_vec<4>(vv, v + 4 * i);
#pragma unroll
    for (int e = 0; e < 4; ++e) update(pv[e], gv[e], mv[e], vv[e]);
    store_vec<4>(param + 4 * i, pv);
    store_vec<4>(m + 4 * i, mv);
    store_vec<4>(v + 4 * i, vv);
  }
  for (int64_t i = 4 * n4 + start; i < n; i += stride) {
    float p = param[i], mm = m[i], vv = v[i];
    update(p, grad[i], mm, vv);
    param[i] = p, m[i] = mm, v[i] = vv;
  }
}

__global__ void clip_factor_kernel(float* clip, const double* sum_sq, float max_norm) {
  const double c = static_cast<double>(max_norm) / (sqrt(sum_sq[0]) + 1e-6);
  clip[0] = c < 1.0 ? static_cast<float>(c) : 1.0f;
}

}  // namespace

// =========================================================================================================
// Launchers

void embedding_forward(Stream stream, float* out, const int32_t* ids, const float* prompt, int64_t P,
                       const float* wte, const float* wpe, int64_t pos_offset, int64_t B, int64_t T,
                       int64_t C) {
  const char* name = "embedding_forward";
  require(P >= 0 && B >= 0 && T >= 0 && C >= 0 && pos_offset >= 0, name, "negative size");
  const int64_t rows = B * (P + T);
  if (rows == 0 || C == 0) return;
  require(out != nullptr, name, "null output");
  require(P == 0 || prompt, name, "prompt is null with P > 0");
  require(T == 0 || (ids && wte), name, "ids or wte is null with T > 0");
  const bool vec = C % 4 == 0 && aligned16(out) && aligned16(prompt) && aligned16(wte) && aligned16(wpe);
  const int64_t cols = vec ? C / 4 : C;
  const int threads = row_threads(cols);
  const dim3 grid = row_grid(rows, cols, threads);
  if (vec)
    embedding_kernel<4><<<grid, threads, 0, stream>>>(out, ids, prompt, P, wte, wpe, pos_offset, B, T, C);
  else
    embedding_kernel<1><<<grid, threads, 0, stream>>>(out, ids, prompt, P, wte, wpe, pos_offset, B, T, C);
  check_launch(name);
}

void batch_sum_rows(Stream stream, float* dst, const float* src, int64_t B, int64_t rows,
                    int64_t batch_stride, int64_t C) {
  const char* name = "batch_sum_rows";
  require(B >= 0 && rows >= 0 && batch_stride >= 0 && C >= 0, name, "negative size");
  const int64_t n = rows * C;
  if (n == 0) return;
  require(dst && (B == 0 || src), name, "null pointer");
  const bool vec = batch_stride % 4 == 0 && aligned16(dst) && aligned16(src);
  const int64_t n4 = vec ? n / 4 : 0;
  batch_sum_kernel<<<grid_for(n4 > 0 ? n4 : n, kThreads), kThreads, 0, stream>>>(dst, src, B, batch_stride, n,
                                                                                 n4);
  check_launch(name);
}

namespace {
template <class O>
void norm_forward_to(Stream stream, NormKind kind, O* out, float* mean, float* rstd, const float* x,
                     const float* residual, float* x_sum, const float* w, const float* b, int64_t N,
                     int64_t C, float eps) {
  const char* name = "norm_forward";
  require(N >= 0 && C >= 0, name, "negative size");
  if (N == 0) return;
  require(C > 0 && C <= INT_MAX, name, "C must be in [1, 2^31)");
  require(out && x && w, name, "null pointer");
  require(!residual || x_sum, name, "x_sum is required with a residual");
  const bool ln = kind == NormKind::LayerNorm;
  if (!ln) b = nullptr, mean = nullptr;
  // A bf16 out takes 8-byte stores of four: aligned16 is stricter than needed there, and as cheap to ask.
  const bool vec = C % 4 == 0 && aligned16(out) && aligned16(x) && aligned16(residual) && aligned16(x_sum) &&
                   aligned16(w) && aligned16(b);
  const int64_t packs = vec ? C / 4 : C;
  const int threads = norm_threads(packs);
  const unsigned grid = rows_grid(N);
  const int c = static_cast<int>(C);
  if (packs <= static_cast<int64_t>(threads) * kNormCacheFwd) {
    if (vec && ln)
      norm_forward_cached<4, kNormCacheFwd, true, O>
          <<<grid, threads, 0, stream>>>(out, mean, rstd, x, residual, x_sum, w, b, N, c, eps);
    else if (vec)
      norm_forward_cached<4, kNormCacheFwd, false, O>
          <<<grid, threads, 0, stream>>>(out, mean, rstd, x, residual, x_sum, w, b, N, c, eps);
    else if (ln)
      norm_forward_cached<1, kNormCacheFwd, true, O>
          <<<grid, threads, 0, stream>>>(out, mean, rstd, x, residual, x_sum, w, b, N, c, eps);
    else
      norm_forward_cached<1, kNormCacheFwd, false, O>
          <<<grid, threads, 0, stream>>>(out, mean, rstd, x, residual, x_sum, w, b, N, c, eps);
  } else if (ln) {
    norm_forward_uncached<true, O>
        <<<grid, kMaxBlockThreads, 0, stream>>>(out, mean, rstd, x, residual, x_sum, w, b, N, C, eps);
  } else {
    norm_forward_uncached<false, O>
        <<<grid, kMaxBlockThreads, 0, stream>>>(out, mean, rstd, x, residual, x_sum, w, b, N, C, eps);
  }
  check_launch(name);
}
}  // namespace

void norm_forward(Stream stream, NormKind kind, float* out, float* mean, float* rstd, const float* x,
                  const float* residual, float* x_sum, const float* w, const float* b, int64_t N, int64_t C,
                  float eps) {
  norm_forward_to(stream, kind, out, mean, rstd, x, residual, x_sum, w, b, N, C, eps);
}
void norm_forward(Stream stream, NormKind kind, bf16_t* out, float* mean, float* rstd, const float* x,
                  const float* residual, float* x_sum, const float* w, const float* b, int64_t N, int64_t C,
                  float eps) {
  norm_forward_to(stream, kind, out, mean, rstd, x, residual, x_sum, w, b, N, C, eps);
}

void norm_backward(Stream stream, NormKind kind, float* dx, const float* dout, const float* x, const float* w,
                   const float* mean, const float* rstd, int64_t N, int64_t C, bf16_t* dx16) {
  const char* name = "norm_backward";
  require(N >= 0 && C >= 0, name, "negative size");
  if (N == 0 || C == 0) return;
  require(C <= INT_MAX, name, "C too large");
  const bool ln = kind == NormKind::LayerNorm;
  require(dx && dout && x && w && rstd && (!ln || mean), name, "null pointer");
  const bool vec =
      C % 4 == 0 && aligned16(dx) && aligned16(dx16) && aligned16(dout) && aligned16(x) && aligned16(w);
  const int64_t packs = vec ? C / 4 : C;
  const int threads = norm_threads(packs);
  const unsigned grid = rows_grid(N);
  const int c = static_cast<int>(C);
  if (packs <= static_cast<int64_t>(threads) * kNormCacheBwd) {
    if (vec && ln)
      norm_backward_cached<4, kNormCacheBwd, true>
          <<<grid, threads, 0, stream>>>(dx, dx16, dout, x, w, mean, rstd, N, c);
    else if (vec)
      norm_backward_cached<4, kNormCacheBwd, false>
          <<<grid, threads, 0, stream>>>(dx, dx16, dout, x, w, mean, rstd, N, c);
    else if (ln)
      norm_backward_cached<1, kNormCacheBwd, true>
          <<<grid, threads, 0, stream>>>(dx, dx16, dout, x, w, mean, rstd, N, c);
    else
      norm_backward_cached<1, kNormCacheBwd, false>
          <<<grid, threads, 0, stream>>>(dx, dx16, dout, x, w, mean, rstd, N, c);
  } else if (ln) {
    norm_backward_uncached<true>
        <<<grid, kMaxBlockThreads, 0, stream>>>(dx, dx16, dout, x, w, mean, rstd, N, C);
  } else {
    norm_backward_uncached<false>
        <<<grid, kMaxBlockThreads, 0, stream>>>(dx, dx16, dout, x, w, mean, rstd, N, C);
  }
  check_launch(name);
}

namespace {
template <class O>
void gelu_forward_to(Stream stream, O* out, const float* x, int64_t n) {
  require(n >= 0, "gelu_forward", "negative size");
  if (n == 0) return;
  require(out && x, "gelu_forward", "null pointer");
  launch_map<1>(stream, "gelu_forward", out, x, nullptr, n, GeluForwardOp());
}
template <class O>
void gelu_backward_to(Stream stream, O* dx, const float* x, const float* dout, int64_t n) {
  require(n >= 0, "gelu_backward", "negative size");
  if (n == 0) return;
  require(dx && x && dout, "gelu_backward", "null pointer");
  launch_map<2>(stream, "gelu_backward", dx, x, dout, n, GeluBackwardOp());
}
template <class O>
void swiglu_forward_to(Stream stream, O* out, const float* gate_up, int64_t N, int64_t I) {
  const char* name = "swiglu_forward";
  require(N >= 0 && I >= 0, name, "negative size");
  if (N == 0 || I == 0) return;
  require(out && gate_up, name, "null pointer");
  const bool vec = I % 4 == 0 && aligned16(out) && aligned16(gate_up);
  const int64_t cols = vec ? I / 4 : I;
  const int threads = row_threads(cols);
  const dim3 grid = row_grid(N, cols, threads);
  if (vec)
    swiglu_forward_kernel<4, O><<<grid, threads, 0, stream>>>(out, gate_up, N, I);
  else
    swiglu_forward_kernel<1, O><<<grid, threads, 0, stream>>>(out, gate_up, N, I);
  check_launch(name);
}
template <class O>
void swiglu_backward_to(Stream stream, O* dgate_up, const float* gate_up, const float* dout, int64_t N,
                        int64_t I) {
  const char* name = "swiglu_backward";
  require(N >= 0 && I >= 0, name, "negative size");
  if (N == 0 || I == 0) return;
  require(dgate_up && gate_up && dout, name, "null pointer");
  const bool vec = I % 4 == 0 && aligned16(dgate_up) && aligned16(gate_up) && aligned16(dout);
  const int64_t cols = vec ? I / 4 : I;
  const int threads = row_threads(cols);
  const dim3 grid = row_grid(N, cols, threads);
  if (vec)
    swiglu_backward_kernel<4, O><<<grid, threads, 0, stream>>>(dgate_up, gate_up, dout, N, I);
  else
    swiglu_backward_kernel<1, O><<<grid, threads, 0, stream>>>(dgate_up, gate_up, dout, N, I);
  check_launch(name);
}
}  // namespace

// The public overloads: fp32 or bf16 output.
void gelu_forward(Stream stream, float* out, const float* x, int64_t n) {
  gelu_forward_to(stream, out, x, n);
}
void gelu_forward(Stream stream, bf16_t* out, const float* x, int64_t n) {
  gelu_forward_to(stream, out, x, n);
}
void gelu_backward(Stream stream, float* dx, const float* x, const float* dout, int64_t n) {
  gelu_backward_to(stream, dx, x, dout, n);
}
void gelu_backward(Stream stream, bf16_t* dx, const float* x, const float* dout, int64_t n) {
  gelu_backward_to(stream, dx, x, dout, n);
}
void swiglu_forward(Stream stream, float* out, const float* gate_up, int64_t N, int64_t I) {
  swiglu_forward_to(stream, out, gate_up, N, I);
}
void swiglu_forward(Stream stream, bf16_t* out, const float* gate_up, int64_t N, int64_t I) {
  swiglu_forward_to(stream, out, gate_up, N, I);
}
void swiglu_backward(Stream stream, float* dgate_up, const float* gate_up, const float* dout, int64_t N,
                     int64_t I) {
  swiglu_backward_to(stream, dgate_up, gate_up, dout, N, I);
}
void swiglu_backward(Stream stream, bf16_t* dgate_up, const float* gate_up, const float* dout, int64_t N,
                     int64_t I) {
  swiglu_backward_to(stream, dgate_up, gate_up, dout, N, I);
}

void residual_forward(Stream stream, float* out, const float* a, const float* b, int64_t n) {
  require(n >= 0, "residual_forward", "negative size");
  if (n == 0) return;
  require(out && a && b, "residual_forward", "null pointer");
  launch_map<2>(stream, "residual_forward", out, a, b, n, AddOp());
}

void rope_forward(Stream stream, float* x, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads,
                  int64_t hd, const float* cos, const float* sin) {
  launch_rope("rope_forward", stream, x, B, S, ld, col0, heads, hd, cos, sin, 1.0f);
}

void rope_backward(Stream stream, float* dx, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads,
                   int64_t hd, const float* cos, const float* sin) {
  launch_rope("rope_backward", stream, dx, B, S, ld, col0, heads, hd, cos, sin, -1.0f);
}

void gather_rows(Stream stream, float* dst, const float* src, const int32_t* rows, int64_t R, int64_t C) {
  launch_rows_copy<true>("gather_rows", stream, dst, src, rows, R, C, C);
}

void scatter_rows(Stream stream, float* dst, const float* src, const int32_t* rows, int64_t R, int64_t C,
                  int64_t src_ld) {
  launch_rows_copy<false>("scatter_rows", stream, dst, src, rows, R, C, src_ld ? src_ld : C);
}

void softmax_xent(Stream stream, float* logits, int64_t ld, float* losses, const int32_t* targets, int64_t R,
                  int64_t V, float grad_scale, bool want_grad, bf16_t* grad_bf16) {
  const char* name = "softmax_xent";
  require(R >= 0 && V >= 0, name, "negative size");
  if (R == 0) return;
  require(V > 0, name, "V must be positive");
  require(ld >= V, name, "row stride ld must be >= V");
  require(logits && losses && targets, name, "null pointer");
  const int threads = V >= 8192 ? kMaxBlockThreads : (V >= 1024 ? 256 : 128);
  softmax_xent_kernel<<<rows_grid(R), threads, 0, stream>>>(logits, ld, losses, targets, R, V, grad_scale,
                                                            want_grad, grad_bf16);
  check_launch(name);
}

void argmax_rows(Stream stream, int32_t* out, const float* logits, int64_t ld, int64_t R, int64_t V) {
  const char* name = "argmax_rows";
  require(R >= 0 && V >= 0, name, "negative size");
  if (R == 0) return;
  require(V > 0 && V <= INT_MAX, name, "V must be in 1..INT_MAX");
  require(ld >= V, name, "row stride ld must be >= V");
  require(out && logits, name, "null pointer");
  const int threads = V >= 8192 ? kMaxBlockThreads : (V >= 1024 ? 256 : 128);
  argmax_kernel<<<rows_grid(R), threads, 0, stream>>>(out, logits, ld, R, V);
  check_launch(name);
}

void sum_f64(Stream stream, double* out, const float* x, int64_t n, bool accumulate) {
  launch_sum_f64<false>("sum_f64", stream, out, x, n, accumulate);
}

void sum_squares_f64(Stream stream, double* out, const float* x, int64_t n, bool accumulate) {
  launch_sum_f64<true>("sum_squares_f64", stream, out, x, n, accumulate);
}

void adamw_step(Stream stream, float* param, const float* grad, float* m, float* v, int64_t n,
                const float* hyper, float beta1, float beta2, float eps, float weight_decay,
                const float* clip, const double* sum_sq) {
  const char* name = "adamw_step";
  require(n >= 0, name, "negative size");
  if (n == 0) return;
  require(param && grad && m && v && hyper, name, "null pointer");
  const bool vec = aligned16(param) && aligned16(grad) && aligned16(m) && aligned16(v);
  const int64_t n4 = vec ? n / 4 : 0;
  adamw_kernel<<<grid_for(n4 > 0 ? n4 : n, kThreads), kThreads, 0, stream>>>(
      param, grad, m, v, n, n4, hyper, beta1, beta2, eps, weight_decay, clip, sum_sq);
  check_launch(name);
}

void clip_factor(Stream stream, float* clip, const double* sum_sq, float max_norm) {
  require(clip && sum_sq, "clip_factor", "null pointer");
  clip_factor_kernel<<<1, 1, 0, stream>>>(clip, sum_sq, max_norm);
  check_launch("clip_factor");
}

// =========================================================================================================
// Self-test

namespace {

constexpr int kRefThreads = 4;
constexpr double kTolExact = 1e-6;
constexpr double kTolMath = 1e-5;
// bf16 outputs: the fp32 result rounded once to nearest even, at most 2^-8 relative per element (8
// significant bits), plus a little for the fp32 math before it.
constexpr double kTolBf16Out = 4e-3;
constexpr const char* kNoteBf16Out = "output rounded to bf16 (2^-8 relative) vs the fp32 CPU reference";
std::vector<float> bf16_to_float(const std::vector<uint16_t>& b) {
  std::vector<float> f(b.size());
  for (size_t i = 0; i < b.size(); ++i) f[i] = host_bf16_value(b[i]);
  return f;
}
const char* const kNoteExact = "copies / fp32 adds in the CPU's order: expected bit-exact (err 0)";

std::string dims(std::initializer_list<std::pair<const char*, int64_t>> ds) {
  std::string s;
  for (const auto& d : ds) {
    if (!s.empty()) s += ' ';
    s += d.first;
    s += '=';
    s += std::to_string(d.second);
  }
  return s;
}

std::vector<int32_t> index_vector(size_t n, int64_t mod, int64_t mul, int64_t add) {
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int32_t>((static_cast<int64_t>(i) * mul + add) % mod);
  return v;
}

void test_embedding(std::vector<OpCheck>& out, uint32_t& seed) {
  struct Cfg {
    int64_t B, T, P, C, pos;
    bool wpe;
  };
  const int64_t vocab = 97;
  for (const Cfg& g : {Cfg{3, 29, 5, 768, 2, true}, Cfg{2, 17, 0, 770, 0, false}, Cfg{2, 0, 4, 768, 0, true},
                       Cfg{1, 7, 3, 770, 5, true}}) {
    const int64_t S = g.P + g.T, n = g.B * S * g.C;
    const auto ids = index_vector(static_cast<size_t>(g.B * g.T), vocab, 7919, 13);
    const auto prompt = random_vector(static_cast<size_t>(g.P * g.C), ++seed);
    const auto wte = random_vector(static_cast<size_t>(vocab * g.C), ++seed);
    const auto wpe = random_vector(static_cast<size_t>((S + g.pos) * g.C), ++seed);
    std::vector<float> want(static_cast<size_t>(n));
    ::pt::embedding_forward(want.data(), ids.data(), g.P ? prompt.data() : nullptr, g.P, wte.data(),
                            g.wpe ? wpe.data() : nullptr, g.pos, g.B, g.T, g.C, kRefThreads);
    auto d_ids = to_device(ids);
    auto d_prompt = to_device(prompt), d_wte = to_device(wte), d_wpe = to_device(wpe);
    DeviceBuffer<float> d_out(static_cast<size_t>(n));
    embedding_forward(nullptr, d_out.get(), d_ids.get(), g.P ? d_prompt.get() : nullptr, g.P, d_wte.get(),
                      g.wpe ? d_wpe.get() : nullptr, g.pos, g.B, g.T, g.C);
    const auto got = to_host(d_out.get(), static_cast<size_t>(n));
    out.push_back(make_check(
        "embedding_forward",
        dims({{"B", g.B}, {"T", g.T}, {"P", g.P}, {"C", g.C}, {"pos_offset", g.pos}}) + (g.wpe ? " wpe" : ""),
        rel_error(got, want), kTolExact, kNoteExact));
  }
}

void test_batch_sum(std::vector<OpCheck>& out, uint32_t& seed) {
  for (int64_t C : {768, 771}) {  // 771: odd batch stride, scalar path
    const int64_t B = 3, P = 5, S = 34;
    const auto dx = random_vector(static_cast<size_t>(B * S * C), ++seed);
    std::vector<float> want(static_cast<size_t>(P * C));
    ::pt::embedding_backward(want.data(), dx.data(), P, B, S, C);
    auto d_dx = to_device(dx);
    DeviceBuffer<float> d_dst(static_cast<size_t>(P * C));
    batch_sum_rows(nullptr, d_dst.get(), d_dx.get(), B, P, S * C, C);
    const auto got = to_host(d_dst.get(), static_cast<size_t>(P * C));
    out.push_back(make_check("batch_sum_rows", dims({{"B", B}, {"rows", P}, {"stride", S * C}, {"C", C}}),
                             rel_error(got, want), kTolExact, kNoteExact));
  }
}

// residual: 0 none, 1 separate x_sum, 2 x_sum aliasing x. The op runs on rows [row0, row0 + N) of buffers of
// `total` rows; whole buffers are compared (rows outside must be untouched). `scale` multiplies x and the
// residual (1e20: squares past FLT_MAX, rstd^3 below FLT_MIN; compare whole buffers only with row0 = 0).
std::string scale_note(float scale) {
  if (scale == 1.0f) return "";
  char buf[32];
  std::snprintf(buf, sizeof buf, " x*%g", static_cast<double>(scale));
  return buf;
}

void test_norm_forward(std::vector<OpCheck>& out, uint32_t& seed, NormKind kind, int64_t total, int64_t row0,
                       int64_t N, int64_t C, int residual, float scale = 1.0f) {
  const bool ln = kind == NormKind::LayerNorm;
  const float eps = 1e-5f;
  const size_t n = static_cast<size_t>(total * C), off = static_cast<size_t>(row0 * C);
  auto x = random_vector(n, ++seed, 2.0f);
  for (auto& v : x) v = (v + 0.5f) * scale;  // a nonzero mean
  auto res = random_vector(n, ++seed);
  for (auto& v : res) v *= scale;
  const auto w = random_vector(static_cast<size_t>(C), ++seed);
  const auto b = random_vector(static_cast<size_t>(C), ++seed);
  const auto out0 = random_vector(n, ++seed);
  const auto stat0 = random_vector(static_cast<size_t>(total), ++seed);
  // Host reference.
  std::vector<float> xin = x;
  if (residual)
    for (size_t i = off; i < off + static_cast<size_t>(N * C); ++i) xin[i] = x[i] + res[i];
  std::vector<float> want_out = out0, want_mean = stat0, want_rstd = stat0;
  if (ln)
    ::pt::layernorm_forward(want_out.data() + off, want_mean.data() + row0, want_rstd.data() + row0,
                            xin.data() + off, w.data(), b.data(), N, C, eps, kRefThreads);
  else
    ::pt::rmsnorm_forward(want_out.data() + off, want_rstd.data() + row0, xin.data() + off, w.data(), N, C,
                          eps, kRefThreads);
  // Device.
  auto d_x = to_device(x), d_res = to_device(res), d_w = to_device(w), d_b = to_device(b);
  auto d_out = to_device(out0), d_mean = to_device(stat0), d_rstd = to_device(stat0);
  auto d_xsum = to_device(out0);
  float* x_sum = residual == 2 ? d_x.get() : d_xsum.get();
  norm_forward(nullptr, kind, d_out.get() + off, ln ? d_mean.get() + row0 : nullptr, d_rstd.get() + row0,
               d_x.get() + off, residual ? d_res.get() + off : nullptr, residual ? x_sum + off : nullptr,
               d_w.get(), ln ? d_b.get() : nullptr, N, C, eps);
  double err = rel_error(to_host(d_out.get(), n), want_out);
  err = std::max(err, rel_error(to_host(d_rstd.get(), static_cast<size_t>(total)), want_rstd));
  if (ln) err = std::max(err, rel_error(to_host(d_mean.get(), static_cast<size_t>(total)), want_mean));
  if (residual == 1) {
    std::vector<float> want_xsum = out0;
    for (size_t i = off; i < off + static_cast<size_t>(N * C); ++i) want_xsum[i] = xin[i];
    err = std::max(err, rel_error(to_host(d_xsum.get(), n), want_xsum));
    err = std::max(err, rel_error(to_host(d_x.get(), n), x));  // x untouched
  } else if (residual == 2) {
    err = std::max(err, rel_error(to_host(d_x.get(), n), xin));
  }
  const char* res_name[] = {"", " residual", " residual in place"};
  const std::string shape = dims({{"N", N}, {"C", C}}) + (row0 ? " row0=" + std::to_string(row0) : "") +
                            res_name[residual] + scale_note(scale);
  out.push_back(make_check(ln ? "norm_forward layernorm" : "norm_forward rmsnorm", shape, err, kTolMath,
                           "float64 block-reduced statistics vs the CPU's float64 ones (order differs); "
                           "out, mean, rstd and x_sum compared"));
  // The bf16 output (a BF16 product's operand): the fp32 one above rounded to nearest even, bit for bit. Run
  // on the original inputs again (the residual-in-place case overwrote x).
  auto d_x2 = to_device(x);
  auto d_out16 = to_device(std::vector<uint16_t>(n, 0x7fc1));
  auto d_xsum2 = to_device(out0);
  float* x_sum2 = residual == 2 ? d_x2.get() : d_xsum2.get();
  norm_forward(nullptr, kind, d_out16.get() + off, nullptr, nullptr, d_x2.get() + off,
               residual ? d_res.get() + off : nullptr, residual ? x_sum2 + off : nullptr, d_w.get(),
               ln ? d_b.get() : nullptr, N, C, eps);
  const std::vector<float> got32 = to_host(d_out.get(), n);
  const std::vector<uint16_t> got16 = to_host(d_out16.get(), n);
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i) {
    const bool inside = i >= off && i < off + static_cast<size_t>(N * C);
    wrong += got16[i] != (inside ? host_bf16_bits(got32[i]) : uint16_t{0x7fc1});
  }
  out.push_back(make_check(ln ? "norm_forward layernorm bf16" : "norm_forward rmsnorm bf16", shape,
                           static_cast<double>(wrong), 0.0,
                           "bf16 out vs the fp32 out rounded to nearest even on the host: same bits, rows "
                           "outside untouched"));
}

void test_norm_backward(std::vector<OpCheck>& out, uint32_t& seed, NormKind kind, int64_t total, int64_t row0,
                        int64_t N, int64_t C, float scale = 1.0f) {
  const bool ln = kind == NormKind::LayerNorm;
  const size_t n = static_cast<size_t>(total * C), off = static_cast<size_t>(row0 * C);
  auto x = random_vector(n, ++seed, 2.0f);
  for (auto& v : x) v = (v + 0.5f) * scale;
  const auto w = random_vector(static_cast<size_t>(C), ++seed);
  const auto b = random_vector(static_cast<size_t>(C), ++seed);
  const auto dout = random_vector(n, ++seed);
  auto dx0 = random_vector(n, ++seed);
  for (auto& v : dx0) v /= scale;  // the size of the update (dx scales as 1 / x)
  std::vector<float> y(n), mean(static_cast<size_t>(total)), rstd(static_cast<size_t>(total));
  if (ln)
    ::pt::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), total, C, 1e-5f,
                            kRefThreads);
  else
    ::pt::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), total, C, 1e-5f, kRefThreads);
  std::vector<float> want = dx0;
  if (ln)
    ::pt::layernorm_backward(want.data() + off, dout.data() + off, x.data() + off, w.data(),
                             mean.data() + row0, rstd.data() + row0, N, C, kRefThreads);
  else
    ::pt::rmsnorm_backward(want.data() + off, dout.data() + off, x.data() + off, w.data(), rstd.data() + row0,
                           N, C, kRefThreads);
  auto d_x = to_device(x), d_w = to_device(w), d_dout = to_device(dout), d_dx = to_device(dx0);
  auto d_mean = to_device(mean), d_rstd = to_device(rstd);
  norm_backward(nullptr, kind, d_dx.get() + off, d_dout.get() + off, d_x.get() + off, d_w.get(),
                ln ? d_mean.get() + row0 : nullptr, d_rstd.get() + row0, N, C);
  const std::vector<float> got = to_host(d_dx.get(), n);
  const double err = rel_error(got, want);
  const std::string shape = dims({{"N", N}, {"C", C}}) + (row0 ? " row0=" + std::to_string(row0) : "") +
                            " dx+=" + scale_note(scale);
  out.push_back(make_check(ln ? "norm_backward layernorm" : "norm_backward rmsnorm", shape, err, kTolMath,
                           "fp32 block-reduced row sums (of scale-free terms) vs the CPU's float64 ones"));
  // With dx16: the same dx, and dx16 its bf16 rounding, bit for bit.
  auto d_dx2 = to_device(dx0);
  auto d_dx16 = to_device(std::vector<uint16_t>(n, 0x7fc1));
  norm_backward(nullptr, kind, d_dx2.get() + off, d_dout.get() + off, d_x.get() + off, d_w.get(),
                ln ? d_mean.get() + row0 : nullptr, d_rstd.get() + row0, N, C, d_dx16.get() + off);
  const std::vector<float> got2 = to_host(d_dx2.get(), n);
  const std::vector<uint16_t> got16 = to_host(d_dx16.get(), n);
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i) {
    const bool inside = i >= off && i < off + static_cast<size_t>(N * C);
    wrong += std::memcmp(&got2[i], &got[i], sizeof(float)) != 0 ||
             got16[i] != (inside ? host_bf16_bits(got[i]) : uint16_t{0x7fc1});
  }
  out.push_back(make_check(ln ? "norm_backward layernorm bf16" : "norm_backward rmsnorm bf16", shape,
                           static_cast<double>(wrong), 0.0,
                           "with dx16: dx the same bits, dx16 dx rounded to nearest even on the host, rows "
                           "outside untouched"));
}

void test_gelu(std::vector<OpCheck>& out, uint32_t& seed) {
  const int64_t total = 37 * 3072 + 3;
  for (int64_t shift : {0, 1}) {  // shift 1: misaligned pointers, scalar path
    const int64_t n = total - shift;
    const auto x = random_vector(static_cast<size_t>(total), ++seed, 4.0f);
    const auto dout = random_vector(static_cast<size_t>(total), ++seed);
    std::vector<float> want(static_cast<size_t>(total), 0.0f), want_dx(static_cast<size_t>(total), 0.0f);
    ::pt::gelu_forward(want.data() + shift, x.data() + shift, n, kRefThreads);
    ::pt::gelu_backward(want_dx.data() + shift, x.data() + shift, dout.data() + shift, n, kRefThreads);
    auto d_x = to_device(x), d_dout = to_device(dout);
    auto d_out = to_device(std::vector<float>(static_cast<size_t>(total), 0.0f));
    auto d_dx = to_device(std::vector<float>(static_cast<size_t>(total), 0.0f));
    gelu_forward(nullptr, d_out.get() + shift, d_x.get() + shift, n);
    gelu_backward(nullptr, d_dx.get() + shift, d_x.get() + shift, d_dout.get() + shift, n);
    const std::string shape = dims({{"n", n}}) + (shift ? " misaligned" : "");
    const char* note = "tanhf vs the CPU's tanh_approx (abs err < 1e-7), FMA contraction";
    out.push_back(make_check("gelu_forward", shape,
                             rel_error(to_host(d_out.get(), static_cast<size_t>(total)), want), kTolMath,
                             note));
    out.push_back(make_check("gelu_backward", shape,
                             rel_error(to_host(d_dx.get(), static_cast<size_t>(total)), want_dx), kTolMath,
                             note));
    auto d_out16 = to_device(std::vector<uint16_t>(static_cast<size_t>(total), 0));
    auto d_dx16 = to_device(std::vector<uint16_t>(static_cast<size_t>(total), 0));
    gelu_forward(nullptr, d_out16.get() + shift, d_x.get() + shift, n);
    gelu_backward(nullptr, d_dx16.get() + shift, d_x.get() + shift, d_dout.get() + shift, n);
    out.push_back(
        make_check("gelu_forward bf16", shape,
                   rel_error(bf16_to_float(to_host(d_out16.get(), static_cast<size_t>(total))), want),
                   kTolBf16Out, kNoteBf16Out));
    out.push_back(
        make_check("gelu_backward bf16", shape,
                   rel_error(bf16_to_float(to_host(d_dx16.get(), static_cast<size_t>(total))), want_dx),
                   kTolBf16Out, kNoteBf16Out));
  }
}

void test_swiglu(std::vector<OpCheck>& out, uint32_t& seed) {
  for (int64_t I : {2048, 1001}) {
    const int64_t N = 37;
    const auto gu = random_vector(static_cast<size_t>(N * 2 * I), ++seed, 4.0f);
    const auto dout = random_vector(static_cast<size_t>(N * I), ++seed);
    std::vector<float> want(static_cast<size_t>(N * I)), want_d(static_cast<size_t>(N * 2 * I));
    ::pt::swiglu_forward(want.data(), gu.data(), N, I, kRefThreads);
    ::pt::swiglu_backward(want_d.data(), gu.data(), dout.data(), N, I, kRefThreads);
    auto d_gu = to_device(gu), d_dout = to_device(dout);
    DeviceBuffer<float> d_out(static_cast<size_t>(N * I)), d_dgu(static_cast<size_t>(N * 2 * I));
    swiglu_forward(nullptr, d_out.get(), d_gu.get(), N, I);
    swiglu_backward(nullptr, d_dgu.get(), d_gu.get(), d_dout.get(), N, I);
    const char* note = "expf vs the CPU's exp_approx (~2 ulp)";
    out.push_back(make_check("swiglu_forward", dims({{"N", N}, {"I", I}}),
                             rel_error(to_host(d_out.get(), static_cast<size_t>(N * I)), want), kTolMath,
                             note));
    out.push_back(make_check("swiglu_backward", dims({{"N", N}, {"I", I}}),
                             rel_error(to_host(d_dgu.get(), static_cast<size_t>(N * 2 * I)), want_d),
                             kTolMath, note));
    DeviceBuffer<uint16_t> d_out16(static_cast<size_t>(N * I)), d_dgu16(static_cast<size_t>(N * 2 * I));
    swiglu_forward(nullptr, d_out16.get(), d_gu.get(), N, I);
    swiglu_backward(nullptr, d_dgu16.get(), d_gu.get(), d_dout.get(), N, I);
    out.push_back(
        make_check("swiglu_forward bf16", dims({{"N", N}, {"I", I}}),
                   rel_error(bf16_to_float(to_host(d_out16.get(), static_cast<size_t>(N * I))), want),
                   kTolBf16Out, kNoteBf16Out));
    out.push_back(
        make_check("swiglu_backward bf16", dims({{"N", N}, {"I", I}}),
                   rel_error(bf16_to_float(to_host(d_dgu16.get(), static_cast<size_t>(N * 2 * I))), want_d),
                   kTolBf16Out, kNoteBf16Out));
  }
}

void test_residual(std::vector<OpCheck>& out, uint32_t& seed) {
  const int64_t n = 100003;
  for (int mode : {0, 1, 2}) {  // 0: separate out, 1: out aliases a, 2: misaligned (scalar path)
    const int64_t shift = mode == 2 ? 1 : 0, m = n - shift;
    const auto a = random_vector(static_cast<size_t>(n), ++seed);
    const auto b = random_vector(static_cast<size_t>(n), ++seed);
    std::vector<float> want(static_cast<size_t>(n), 0.0f);
    ::pt::residual_forward(want.data() + shift, a.data() + shift, b.data() + shift, m, kRefThreads);
    auto d_a = to_device(a), d_b = to_device(b);
    auto d_out = to_device(std::vector<float>(static_cast<size_t>(n), 0.0f));
    float* o = mode == 1 ? d_a.get() : d_out.get();
    residual_forward(nullptr, o + shift, d_a.get() + shift, d_b.get() + shift, m);
    const char* what[] = {"", " in place", " misaligned"};
    out.push_back(make_check("residual_forward", dims({{"n", m}}) + what[mode],
                             rel_error(to_host(o, static_cast<size_t>(n)), want), kTolExact, kNoteExact));
  }
}

void test_rope(std::vector<OpCheck>& out, uint32_t& seed) {
  struct Cfg {
    int64_t B, S, ld, col0, heads, hd;
  };
  // q heads of a GQA qkv row (vector path), k heads at an offset, and an awkward scalar layout.
  for (const Cfg& g : {Cfg{2, 37, 512, 0, 4, 64}, Cfg{2, 37, 512, 256, 2, 64}, Cfg{3, 11, 29, 3, 3, 6}}) {
    const int64_t half = g.hd / 2, n = g.B * g.S * g.ld;
    const auto x = random_vector(static_cast<size_t>(n), ++seed);
    const auto ang = random_vector(static_cast<size_t>(g.S * half), ++seed, 3.14159f);
    std::vector<float> c(ang.size()), s(ang.size());
    for (size_t i = 0; i < ang.size(); ++i) c[i] = std::cos(ang[i]), s[i] = std::sin(ang[i]);
    auto d_c = to_device(c), d_s = to_device(s);
    for (bool fwd : {true, false}) {
      std::vector<float> want = x;
      if (fwd)
        ::pt::rope_forward(want.data(), g.B, g.S, g.ld, g.col0, g.heads, g.hd, c.data(), s.data(),
                           kRefThreads);
      else
        ::pt::rope_backward(want.data(), g.B, g.S, g.ld, g.col0, g.heads, g.hd, c.data(), s.data(),
                            kRefThreads);
      auto d_x = to_device(x);
      if (fwd)
        rope_forward(nullptr, d_x.get(), g.B, g.S, g.ld, g.col0, g.heads, g.hd, d_c.get(), d_s.get());
      else
        rope_backward(nullptr, d_x.get(), g.B, g.S, g.ld, g.col0, g.heads, g.hd, d_c.get(), d_s.get());
      out.push_back(make_check(
          fwd ? "rope_forward" : "rope_backward",
          dims({{"B", g.B}, {"S", g.S}, {"ld", g.ld}, {"col0", g.col0}, {"heads", g.heads}, {"hd", g.hd}}),
          rel_error(to_host(d_x.get(), static_cast<size_t>(n)), want), kTolExact,
          "two products and an add per element; FMA contraction may differ from the CPU by an ulp"));
    }
  }
}

void test_rows(std::vector<OpCheck>& out, uint32_t& seed) {
  const int64_t Rsrc = 50, R = 13;
  const auto rows = index_vector(static_cast<size_t>(R), Rsrc, 17, 3);  // distinct: gcd(17, 50) = 1
  auto d_rows = to_device(rows);
  for (int64_t C : {768, 770}) {
    const auto big = random_vector(static_cast<size_t>(Rsrc * C), ++seed);
    const auto small = random_vector(static_cast<size_t>(R * C), ++seed);
    std::vector<float> want_g(static_cast<size_t>(R * C)), want_s = big;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t c = 0; c < C; ++c) {
        want_g[static_cast<size_t>(i * C + c)] =
            big[static_cast<size_t>(rows[static_cast<size_t>(i)] * C + c)];
        want_s[static_cast<size_t>(rows[static_cast<size_t>(i)] * C + c)] =
            small[static_cast<size_t>(i * C + c)];
      }
    auto d_big = to_device(big), d_small = to_device(small);
    DeviceBuffer<float> d_g(static_cast<size_t>(R * C));
    gather_rows(nullptr, d_g.get(), d_big.get(), d_rows.get(), R, C);
    out.push_back(make_check("gather_rows", dims({{"R", R}, {"C", C}}),
                             rel_error(to_host(d_g.get(), static_cast<size_t>(R * C)), want_g), kTolExact,
                             kNoteExact));
    scatter_rows(nullptr, d_big.get(), d_small.get(), d_rows.get(), R, C);
    out.push_back(make_check("scatter_rows", dims({{"R", R}, {"C", C}}),
                             rel_error(to_host(d_big.get(), static_cast<size_t>(Rsrc * C)), want_s),
                             kTolExact, kNoteExact));
    // Source rows of a wider matrix (src_ld = C + 12, the columns from 8): the decoding's keys and values.
    const int64_t wide = C + 12;
    auto strided = random_vector(static_cast<size_t>(R * wide), ++seed);
    auto want_w = want_s;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t c = 0; c < C; ++c)
        want_w[static_cast<size_t>(rows[static_cast<size_t>(i)] * C + c)] =
            strided[static_cast<size_t>(i * wide + 8 + c)];
    auto d_strided = to_device(strided);
    scatter_rows(nullptr, d_big.get(), d_strided.get() + 8, d_rows.get(), R, C, wide);
    out.push_back(make_check("scatter_rows strided", dims({{"R", R}, {"C", C}, {"src_ld", wide}}),
                             rel_error(to_host(d_big.get(), static_cast<size_t>(Rsrc * C)), want_w),
                             kTolExact, kNoteExact));
    // The same rows from one float further on: the source rows misaligned (the scalar path, also at C = 768).
    for (int64_t i = 0; i < R; ++i)
      for (int64_t c = 0; c < C; ++c)
        want_w[static_cast<size_t>(rows[static_cast<size_t>(i)] * C + c)] =
            strided[static_cast<size_t>(i * wide + 9 + c)];
    scatter_rows(nullptr, d_big.get(), d_strided.get() + 9, d_rows.get(), R, C, wide);
    out.push_back(make_check(
        "scatter_rows strided, misaligned source", dims({{"R", R}, {"C", C}, {"src_ld", wide}}),
        rel_error(to_host(d_big.get(), static_cast<size_t>(Rsrc * C)), want_w), kTolExact, kNoteExact));
  }
}

void test_softmax_xent(std::vector<OpCheck>& out, uint32_t& seed) {
  struct Cfg {
    int64_t R, V, ld;
    bool ignored_row;
  };
  // ld > V: the LM head's padded rows (50257 -> 50264); the padding columns must come back untouched.
  for (const Cfg& g : {Cfg{7, 50257, 50257, false}, Cfg{6, 50257, 50264, false}, Cfg{5, 4096, 4096, true}}) {
    const size_t n = static_cast<size_t>(g.R * g.ld);
    auto logits = random_vector(n, ++seed, 8.0f);
    auto targets = index_vector(static_cast<size_t>(g.R), g.V, 7177, 11);
    if (g.ignored_row) {
      targets[2] = -100;
      // Row 0 rising (every thread's running max moves at each element) and row 1 with -inf logits (masked
      // columns), the target's excepted.
      for (int64_t v = 0; v < g.V; ++v) logits[static_cast<size_t>(v)] = -20.0f + 40.0f * v / g.V;
      for (int64_t v = 3; v < g.V; v += 7)
        if (v != targets[1]) logits[static_cast<size_t>(g.ld + v)] = -INFINITY;
    }
    const float grad_scale = 1.0f / static_cast<float>(g.R);
    std::vector<float> want_loss(static_cast<size_t>(g.R)), want_grad(n, 0.0f);
    std::vector<float> packed(static_cast<size_t>(g.R * g.V));  // the CPU reference wants rows of V
    for (int64_t r = 0; r < g.R; ++r) std::copy_n(logits.begin() + r * g.ld, g.V, packed.begin() + r * g.V);
    ::pt::crossentropy_forward(want_loss.data(), packed.data(), targets.data(), g.R, g.V, kRefThreads);
    want_grad = logits;  // padding columns unchanged
    for (int64_t r = 0; r < g.R; ++r) {
      const int32_t t = targets[static_cast<size_t>(r)];
      const float* l = logits.data() + r * g.ld;
      if (t < 0) {
        std::fill_n(want_grad.begin() + r * g.ld, g.V, 0.0f);
        continue;
      }
      double mx = l[0], sum = 0.0;
      for (int64_t v = 1; v < g.V; ++v) mx = std::max(mx, static_cast<double>(l[v]));
      for (int64_t v = 0; v < g.V; ++v) sum += std::exp(l[v] - mx);
      for (int64_t v = 0; v < g.V; ++v)
        want_grad[static_cast<size_t>(r * g.ld + v)] =
            static_cast<float>(grad_scale * (std::exp(l[v] - mx) / sum - (v == t ? 1.0 : 0.0)));
    }
    auto d_targets = to_device(targets);
    for (bool grad : {true, false}) {
      auto d_logits = to_device(logits);
      DeviceBuffer<float> d_loss(static_cast<size_t>(g.R));
      softmax_xent(nullptr, d_logits.get(), g.ld, d_loss.get(), d_targets.get(), g.R, g.V, grad_scale, grad);
      double err = rel_error(to_host(d_loss.get(), static_cast<size_t>(g.R)), want_loss);
      err = std::max(err, rel_error(to_host(d_logits.get(), n), grad ? want_grad : logits));
      out.push_back(
          make_check("softmax_xent",
                     dims({{"R", g.R}, {"V", g.V}, {"ld", g.ld}}) + (grad ? " grad" : " loss only") +
                         (g.ignored_row ? " target -100, rising row, -inf logits" : ""),
                     err, kTolMath,
                     "fp32 expf sums per block vs the CPU's float64 sum; gradient vs a float64 host "
                     "softmax"));
    }
    // The gradient as bf16 into a second buffer (the LM head backward's operand): logits untouched, each
    // gradient element within bf16's rounding of the reference, the padding columns not written.
    {
      auto d_logits = to_device(logits);
      DeviceBuffer<float> d_loss(static_cast<size_t>(g.R));
      const std::vector<uint16_t> marker(n, 0x7fc1);  // a NaN pattern: any unwritten element shows
      auto d_g16 = to_device(marker);
      softmax_xent(nullptr, d_logits.get(), g.ld, d_loss.get(), d_targets.get(), g.R, g.V, grad_scale, true,
                   d_g16.get());
      const std::vector<uint16_t> g16 = to_host(d_g16.get(), n);
      std::vector<float> got(n), want(n);
      bool padding_ok = true;
      for (size_t i = 0; i < n; ++i) {
        const bool inside = static_cast<int64_t>(i % static_cast<size_t>(g.ld)) < g.V;
        got[i] = inside ? host_bf16_value(g16[i]) : 0.0f;
        want[i] = inside ? want_grad[i] : 0.0f;
        padding_ok = padding_ok && (inside || g16[i] == 0x7fc1);
      }
      double err = rel_error(to_host(d_loss.get(), static_cast<size_t>(g.R)), want_loss);
      err = std::max(err, rel_error(to_host(d_logits.get(), n), logits));
      err = std::max(err, rel_error(got, want));
      out.push_back(make_check(
          "softmax_xent bf16 grad",
          dims({{"R", g.R}, {"V", g.V}, {"ld", g.ld}}) + (g.ignored_row ? " target -100" : ""),
          padding_ok ? err : INFINITY, 4e-3,
          "gradient rounded to bf16 (2^-8 relative per element) vs a float64 host softmax; logits and the "
          "padding columns untouched"));
    }
  }
  // NaN logits make the loss NaN, as on the CPU, wherever they sit: a row all NaN but its target, a row with
  // one NaN at the start of a thread's first 16 bytes (before any finite value of that thread's share).
  {
    const int64_t R = 3, V = 4096;
    auto logits = random_vector(static_cast<size_t>(R * V), ++seed, 8.0f);
    const std::vector<int32_t> targets = {5, 9, 11};
    for (int64_t v = 0; v < V; ++v)
      if (v != targets[0]) logits[static_cast<size_t>(v)] = NAN;
    logits[static_cast<size_t>(V + 4 * 37)] = NAN;
    std::vector<float> want(static_cast<size_t>(R));
    ::pt::crossentropy_forward(want.data(), logits.data(), targets.data(), R, V, kRefThreads);
    auto d_targets = to_device(targets);
    for (bool grad : {false, true}) {
      auto d_logits = to_device(logits);
      DeviceBuffer<float> d_loss(static_cast<size_t>(R));
      softmax_xent(nullptr, d_logits.get(), V, d_loss.get(), d_targets.get(), R, V, 1.0f / R, grad);
      const std::vector<float> got = to_host(d_loss.get(), static_cast<size_t>(R));
      const bool nan_rows =
          std::isnan(got[0]) && std::isnan(got[1]) && std::isnan(want[0]) && std::isnan(want[1]);
      out.push_back(make_check(
          "softmax_xent", dims({{"R", R}, {"V", V}}) + (grad ? " grad" : " loss only") + " NaN logits",
          nan_rows ? std::fabs(got[2] - want[2]) / std::fabs(want[2]) : INFINITY, kTolMath,
          "rows with a NaN logit: NaN loss (as the CPU's); the clean row vs the CPU"));
    }
  }
}

void test_sums(std::vector<OpCheck>& out, uint32_t& seed) {
  const int64_t total = 1000003;
  const auto x = random_vector(static_cast<size_t>(total), ++seed);
  for (bool square : {false, true}) {
    for (int64_t shift : {0, 1}) {  // shift 1: misaligned (scalar loop) and accumulate into 1.5
      const int64_t n = total - shift;
      const bool acc = shift == 1;
      double want = acc ? 1.5 : 0.0, scale = acc ? 1.5 : 0.0;
      for (int64_t i = shift; i < total; ++i) {
        const double v = x[static_cast<size_t>(i)];
        want += square ? v * v : v;
        scale += square ? v * v : std::fabs(v);
      }
      auto d_x = to_device(x);
      auto d_out = to_device(std::vector<double>{acc ? 1.5 : 12345.0});
      if (square)
        sum_squares_f64(nullptr, d_out.get(), d_x.get() + shift, n, acc);
      else
        sum_f64(nullptr, d_out.get(), d_x.get() + shift, n, acc);
      const double got = to_host(d_out.get(), 1)[0];
      const double err = std::isnan(got) ? INFINITY : std::fabs(got - want) / std::max(scale, 1e-30);
      out.push_back(make_check(
          square ? "sum_squares_f64" : "sum_f64", dims({{"n", n}}) + (acc ? " misaligned accumulate" : ""),
          err, 1e-9, "float64 sums in another order; error relative to sum |terms| (bound n 2^-53)"));
    }
  }
}

void test_adamw(std::vector<OpCheck>& out, uint32_t& seed) {
  const float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, wd = 0.01f, lr = 1e-3f;
  struct Cfg {
    int64_t n, shift;
    float clip;  // < 0: no clip pointer
  };
  for (const Cfg& g :
       {Cfg{100003, 0, -1.0f}, Cfg{100003, 0, 1.0f}, Cfg{100003, 0, 0.5f}, Cfg{1001, 1, 0.5f}}) {
    const size_t total = static_cast<size_t>(g.n + g.shift), off = static_cast<size_t>(g.shift);
    std::vector<float> p = random_vector(total, ++seed), m(total, 0.0f), v(total, 0.0f);
    auto d_p = to_device(p), d_m = to_device(m), d_v = to_device(v);
    auto d_clip = to_device(std::vector<float>{g.clip});
    DeviceBuffer<float> d_hyper(3);
    for (int64_t t = 1; t <= 3; ++t) {
      const auto grad = random_vector(total, ++seed);
      std::vector<float> grad_ref = grad;
      if (g.clip >= 0.0f)
        for (auto& x : grad_ref) x *= g.clip;
      ::pt::adamw_step(p.data() + off, grad_ref.data() + off, m.data() + off, v.data() + off, g.n, lr, beta1,
                       beta2, eps, wd, t);
      const std::vector<float> hyper = {
          lr, static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(t))),
          static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(t)))};
      check(cudaMemcpy(d_hyper.get(), hyper.data(), 3 * sizeof(float), cudaMemcpyHostToDevice), "copy hyper");
      auto d_grad = to_device(grad);
      adamw_step(nullptr, d_p.get() + off, d_grad.get() + off, d_m.get() + off, d_v.get() + off, g.n,
                 d_hyper.get(), beta1, beta2, eps, wd, g.clip >= 0.0f ? d_clip.get() : nullptr);
      check(cudaDeviceSynchronize(), "adamw_step");
    }
    double err = rel_error(to_host(d_p.get(), total), p);
    err = std::max(err, rel_error(to_host(d_m.get(), total), m));
    err = std::max(err, rel_error(to_host(d_v.get(), total), v));
    std::string shape = dims({{"n", g.n}, {"steps", 3}});
    shape += g.clip < 0.0f ? " no clip" : " clip=" + std::to_string(g.clip).substr(0, 3);
    if (g.shift) shape += " misaligned";
    out.push_back(make_check("adamw_step", shape, err, kTolMath,
                             "sqrt/div correctly rounded on both sides, but the step size comes from fp32 "
                             "hyper values and FMA contraction differs: ulp-level differences"));
  }
  // A non-finite squared gradient norm (NaN, +inf) leaves the parameters and both moments untouched; a finite
  // one steps as without it.
  {
    const int64_t n = 1001;
    const std::vector<float> p = random_vector(n, ++seed), g = random_vector(n, ++seed);
    const std::vector<float> hyper = {lr, 1.0f - beta1, 1.0f - beta2};
    auto d_hyper = to_device(hyper), d_g = to_device(g);
    double err = 0.0;
    for (double sq : {static_cast<double>(NAN), static_cast<double>(INFINITY), 4.0}) {
      std::vector<float> m(n, 0.0f), v(n, 0.0f), want = p, wm = m, wv = v;
      if (std::isfinite(sq))
        ::pt::adamw_step(want.data(), g.data(), wm.data(), wv.data(), n, lr, beta1, beta2, eps, wd, 1);
      auto d_p = to_device(p), d_m = to_device(m), d_v = to_device(v);
      auto d_sq = to_device(std::vector<double>{sq});
      adamw_step(nullptr, d_p.get(), d_g.get(), d_m.get(), d_v.get(), n, d_hyper.get(), beta1, beta2, eps, wd,
                 nullptr, d_sq.get());
      check(cudaDeviceSynchronize(), "adamw_step");
      err = std::max({err, rel_error(to_host(d_p.get(), n), want), rel_error(to_host(d_m.get(), n), wm),
                      rel_error(to_host(d_v.get(), n), wv)});
    }
    out.push_back(make_check("adamw_step", "n=1001, squared norm NaN, inf (no write) and 4", err, kTolMath,
                             "non-finite: bit-identical to the untouched input; finite: as the steps above"));
  }
}

// Rows of random logits with the largest value repeated at a later column (the first wins), NaNs (passed
// over, but a NaN in column 0 wins), a row of -inf, the largest in the last column; odd row strides misalign
// every other row (50264 aligns them all); the want is std::max_element's column.
void test_argmax(std::vector<OpCheck>& out, uint32_t& seed) {
  for (const auto& [R, V, ld] :
       {std::array<int64_t, 3>{5, 50257, 50257}, std::array<int64_t, 3>{4, 50257, 50264},
        std::array<int64_t, 3>{3, 1000, 1003}}) {
    auto logits = random_vector(static_cast<size_t>(R * ld), ++seed, 8.0f);
    auto at = [&](int64_t r, int64_t j) -> float& { return logits[static_cast<size_t>(r * ld + j)]; };
    at(0, 7) = 100.0f;
    at(0, V - 1) = 100.0f;  // a tie: column 7 wins
    at(1, 3) = NAN;
    at(1, V / 2) = NAN;    // passed over
    at(1, V - 1) = 60.0f;  // the last column
    for (int64_t j = 0; j < V; ++j) at(2, j) = -INFINITY;
    if (R > 3) at(3, 0) = NAN;  // column 0, as std::max_element
    std::vector<float> want(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      const float* row = logits.data() + r * ld;
      want[static_cast<size_t>(r)] = static_cast<float>(std::max_element(row, row + V) - row);
    }
    auto d_logits = to_device(logits);
    DeviceBuffer<int32_t> d_out(static_cast<size_t>(R));
    argmax_rows(nullptr, d_out.get(), d_logits.get(), ld, R, V);
    const auto got_i = to_host(d_out.get(), static_cast<size_t>(R));
    double mismatches = 0;
    for (int64_t r = 0; r < R; ++r)
      if (static_cast<float>(got_i[static_cast<size_t>(r)]) != want[static_cast<size_t>(r)]) ++mismatches;
    out.push_back(make_check("argmax_rows", dims({{"R", R}, {"V", V}, {"ld", ld}}), mismatches, 0.0,
                             "rows whose column differs from std::max_element's (ties, NaNs, -inf): 0"));
  }
}

void test_clip(std::vector<OpCheck>& out) {
  const std::vector<double> sums = {1e4, 0.25};
  const float max_norm = 1.0f;
  std::vector<float> want;
  for (double s : sums) {
    const double c = max_norm / (std::sqrt(s) + 1e-6);
    want.push_back(c < 1.0 ? static_cast<float>(c) : 1.0f);
  }
  auto d_sums = to_device(sums);
  DeviceBuffer<float> d_clip(2);
  for (size_t i = 0; i < sums.size(); ++i) clip_factor(nullptr, d_clip.get() + i, d_sums.get() + i, max_norm);
  out.push_back(make_check("clip_factor", "sum_sq=1e4 and 0.25, max_norm=1",
                           rel_error(to_host(d_clip.get(), 2), want), kTolExact, "float64 on both sides"));
}

// Zero sizes return without launching (null pointers allowed); impossible arguments throw invalid_argument.
void test_arguments(std::vector<OpCheck>& out) {
  std::string note = "zero sizes are no-ops; sum_f64 of nothing writes 0; bad arguments throw";
  double err = 0.0;
  try {
    embedding_forward(nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr, 0, 0, 5, 8);
    batch_sum_rows(nullptr, nullptr, nullptr, 3, 0, 8, 8);
    norm_forward(nullptr, NormKind::LayerNorm, static_cast<float*>(nullptr), nullptr, nullptr, nullptr,
                 nullptr, nullptr, nullptr, nullptr, 0, 768, 1e-5f);
    norm_backward(nullptr, NormKind::RMSNorm, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 768);
    gelu_forward(nullptr, static_cast<float*>(nullptr), nullptr, 0);
    gelu_backward(nullptr, static_cast<float*>(nullptr), nullptr, nullptr, 0);
    swiglu_forward(nullptr, static_cast<float*>(nullptr), nullptr, 0, 16);
    swiglu_backward(nullptr, static_cast<float*>(nullptr), nullptr, nullptr, 0, 16);
    residual_forward(nullptr, nullptr, nullptr, nullptr, 0);
    rope_forward(nullptr, nullptr, 0, 4, 64, 0, 1, 64, nullptr, nullptr);
    rope_backward(nullptr, nullptr, 2, 4, 64, 0, 0, 64, nullptr, nullptr);
    gather_rows(nullptr, nullptr, nullptr, nullptr, 0, 8);
    scatter_rows(nullptr, nullptr, nullptr, nullptr, 0, 8);
    softmax_xent(nullptr, nullptr, 50257, nullptr, nullptr, 0, 50257, 1.0f, true);
    argmax_rows(nullptr, nullptr, nullptr, 50257, 0, 50257);
    sum_f64(nullptr, nullptr, nullptr, 0, true);
    sum_squares_f64(nullptr, nullptr, nullptr, 0, true);
    adamw_step(nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr, 0.9f, 0.999f, 1e-8f, 0.0f, nullptr);
    auto d_out = to_device(std::vector<double>{7.0, 7.0});
    sum_f64(nullptr, d_out.get(), nullptr, 0, false);
    sum_squares_f64(nullptr, d_out.get() + 1, nullptr, 0, false);
    const auto got = to_host(d_out.get(), 2);
    if (got[0] != 0.0 || got[1] != 0.0) err = INFINITY, note = "sum of nothing did not write 0";
  } catch (const std::exception& e) {
    err = INFINITY;
    note = std::string("zero-size call threw: ") + e.what();
  }
  int missed = 0;
  auto expect_throw = [&](auto&& f) {
    try {
      f();
      ++missed;
    } catch (const std::invalid_argument&) {
    }
  };
  DeviceBuffer<float> buf(64);
  expect_throw([&] { rope_forward(nullptr, buf.get(), 1, 1, 8, 0, 1, 7, buf.get(), buf.get()); });  // odd hd
  expect_throw([&] { rope_forward(nullptr, buf.get(), 1, 1, 8, 4, 1, 8, buf.get(), buf.get()); });  // past ld
  expect_throw([&] {  // residual without x_sum
    norm_forward(nullptr, NormKind::RMSNorm, buf.get(), nullptr, nullptr, buf.get(), buf.get(), nullptr,
                 buf.get(), nullptr, 1, 8, 1e-5f);
  });
  expect_throw([&] { gelu_forward(nullptr, buf.get(), buf.get(), -1); });
  expect_throw([&] { softmax_xent(nullptr, buf.get(), 8, buf.get(), nullptr, 1, 8, 1.0f, false); });
  expect_throw([&] {  // row stride below V
    softmax_xent(nullptr, buf.get(), 7, buf.get(), reinterpret_cast<const int32_t*>(buf.get()), 1, 8, 1.0f,
                 false);
  });
  expect_throw([&] {  // argmax row stride below V
    argmax_rows(nullptr, reinterpret_cast<int32_t*>(buf.get()), buf.get(), 7, 1, 8);
  });
  if (missed) {
    err = INFINITY;
    note = std::to_string(missed) + " invalid call(s) did not throw std::invalid_argument";
  }
  out.push_back(make_check("argument handling", "n=0 / N=0 / R=0 and invalid shapes", err, 0.0, note));
}

}  // namespace

std::vector<OpCheck> selftest_elementwise() {
  check(cudaSetDevice(0), "cudaSetDevice");
  std::vector<OpCheck> out;
  uint32_t seed = 7000;
  test_embedding(out, seed);
  test_batch_sum(out, seed);
  for (NormKind kind : {NormKind::LayerNorm, NormKind::RMSNorm}) {
    test_norm_forward(out, seed, kind, 37, 0, 37, 768, 0);
    test_norm_forward(out, seed, kind, 37, 0, 37, 770, 1);
    test_norm_forward(out, seed, kind, 37, 0, 37, 768, 2);
    test_norm_forward(out, seed, kind, 37, 5, 1, 2048, 2);
    test_norm_forward(out, seed, kind, 3, 0, 3, 9001, 2);          // beyond the register cache
    test_norm_forward(out, seed, kind, 2, 0, 2, 16388, 1);         // 1024 threads, 5 float4 packs each
    test_norm_forward(out, seed, kind, 37, 0, 37, 768, 1, 1e20f);  // squares past FLT_MAX (cached)
    test_norm_forward(out, seed, kind, 3, 0, 3, 9001, 0, 1e20f);   // the same, uncached
    test_norm_backward(out, seed, kind, 37, 0, 37, 768);
    test_norm_backward(out, seed, kind, 37, 0, 37, 770);
    test_norm_backward(out, seed, kind, 37, 5, 1, 2048);
    test_norm_backward(out, seed, kind, 3, 0, 3, 9001);          // beyond the register cache
    test_norm_backward(out, seed, kind, 2, 0, 2, 16384);         // 1024 threads, 4 float4 packs each (cached)
    test_norm_backward(out, seed, kind, 2, 0, 2, 16388);         // just beyond the cache
    test_norm_backward(out, seed, kind, 37, 0, 37, 768, 1e20f);  // rstd^3 below FLT_MIN (cached)
    test_norm_backward(out, seed, kind, 3, 0, 3, 9001, 1e20f);   // the same, uncached
  }
  test_gelu(out, seed);
  test_swiglu(out, seed);
  test_residual(out, seed);
  test_rope(out, seed);
  test_rows(out, seed);
  test_softmax_xent(out, seed);
  test_argmax(out, seed);
  test_sums(out, seed);
  test_adamw(out, seed);
  test_clip(out);
  test_arguments(out);
  return out;
}

}  // namespace cuda
}  // namespace pt
