// Internal to attention.cu (fp32, CUDA cores) and attention_tc.cu (bf16, tensor cores): the kernel
// arguments and key addressing both paths share, host helpers, and the tensor-core launchers that
// attention.cu's public functions dispatch to. Not a public header.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.cuh"

namespace pt {
namespace cuda {
namespace attn {

// Everything the kernels read; unused pointers are null. qkv16, pk16, pv16: the caller's bf16 copies of qkv,
// pk, pv (AttentionBf16Operands; read by the kBf16 kernels only).
struct AttnArgs {
  const float* qkv;
  const uint8_t* mask;
  const float* pk;
  const float* pv;
  const bf16_t* qkv16 = nullptr;
  const bf16_t* pk16 = nullptr;
  const bf16_t* pv16 = nullptr;
  int Pp, B, S, H, KV, hd, group;
  float scale;
  int64_t ld;  // row stride of qkv / dqkv: (H + 2 KV) hd
};

struct BwdPtrs {
  float* dqkv;
  float* part_k;  // [B, Pp, KV, hd] per-batch prefix partials
  float* part_v;
  const float* dout;
  const bf16_t* dout16 = nullptr;  // its bf16 copy (the MmaBf16 kernels)
  const float* lse;
  const float* delta;
  int q_rows;
};

// Source row of unified key kk (kv head g, sequence b) in qkv, pk, pv (fp32, or their bf16 copies): K when
// !is_v, else V; nullptr past the keys.
template <class T>
__device__ __forceinline__ const T* key_row_in(const AttnArgs& a, const T* qkv, const T* pk, const T* pv,
                                               int b, int g, int kk, bool is_v) {
  if (kk < a.Pp) return (is_v ? pv : pk) + (static_cast<int64_t>(kk) * a.KV + g) * a.hd;
  const int j = kk - a.Pp;
  if (j >= a.S) return nullptr;
  return qkv + (static_cast<int64_t>(b) * a.S + j) * a.ld +
         static_cast<int64_t>(a.H + (is_v ? a.KV : 0) + g) * a.hd;
}
__device__ __forceinline__ const float* key_row(const AttnArgs& a, int b, int g, int kk, bool is_v) {
  return key_row_in(a, a.qkv, a.pk, a.pv, b, g, kk, is_v);
}
__device__ __forceinline__ const bf16_t* key_row16(const AttnArgs& a, int b, int g, int kk, bool is_v) {
  return key_row_in(a, a.qkv16, a.pk16, a.pv16, b, g, kk, is_v);
}

// Row i of query head h in sequence b: its Q (in qkv, or its bf16 copy) and its dO (in dout, [B, S, H, hd]);
// nullptr past S.
template <class T>
__device__ __forceinline__ const T* q_row_in(const AttnArgs& a, const T* qkv, int b, int h, int i) {
  return i < a.S ? qkv + (static_cast<int64_t>(b) * a.S + i) * a.ld + static_cast<int64_t>(h) * a.hd
                 : nullptr;
}
__device__ __forceinline__ const float* q_row(const AttnArgs& a, int b, int h, int i) {
  return q_row_in(a, a.qkv, b, h, i);
}
template <class T>
__device__ __forceinline__ const T* dout_row(const AttnArgs& a, const T* dout, int b, int h, int i) {
  return i < a.S ? dout + ((static_cast<int64_t>(b) * a.S + i) * a.H + h) * a.hd : nullptr;
}

// Key kk exists and is not padding (the causal test is separate).
__device__ __forceinline__ int key_valid(const AttnArgs& a, int b, int kk) {
  if (kk < a.Pp) return 1;
  const int j = kk - a.Pp;
  if (j >= a.S) return 0;
  return a.mask == nullptr || a.mask[static_cast<int64_t>(b) * a.S + j] != 0;
}

inline unsigned grid_1d(int64_t blocks, const char* op) {
  if (blocks > INT_MAX) throw std::invalid_argument(std::string(op) + ": too many blocks");
  return static_cast<unsigned>(blocks);
}

// Tensor-core path (attention_tc.cu). tc_supported: head dims it takes (a multiple of 16, at most 128).
// forward_tc writes out and lse; backward_tc runs the dk/dv and dq kernels (p.delta must be computed and
// the prefix partials are summed by the caller, as for the fp32 kernels).
inline bool tc_supported(int64_t hd) {
  return hd >= 16 && hd <= 128 && hd % 16 == 0;
}
// Which kernels forward_tc and backward_tc run: ldmatrix + mma.sync with the scores in registers (Mma, the
// default: H200, 2026-11-26, GPT-2 B32 x 512 attention backward 10.5 against 14.6 ms a step), WMMA through
// per-warp shared strips (Wmma), or the mma.sync kernels with each next K/V (Q/dO) tile queued by cp.async
// into an fp32 stage while the current one is multiplied (MmaAsync, not yet run on a GPU; the same bits as
// Mma, which it falls back to where a base pointer is not 16-byte aligned), or the mma.sync kernels with each
// next tile queued by cp.async straight from the caller's bf16 copies of the operands into a second pair of
// tiles (MmaBf16, not yet run on a GPU; the same bits as Mma, which it falls back to where a copy is missing
// or not 16-byte aligned).
enum class AttnKernel { Wmma = 0, Mma = 1, MmaAsync = 2, MmaBf16 = 3 };
void forward_tc(Stream stream, const AttnArgs& a, float* out, float* lse, AttnKernel k);
void backward_tc(Stream stream, const AttnArgs& a, const BwdPtrs& p, AttnKernel k);

// PRIORTUNE_CUDA_ATTN = mma | wmma | async | bf16, read by every attention_forward and attention_backward
// call whichever kernels run (a captured graph keeps what it was captured with), unless a
// ForceAttentionKernel is alive on this thread (the self-test's way of running each).
// PRIORTUNE_CUDA_ATTN_ASYNC=0 keeps MmaAsync and MmaBf16 from running (the variable's async and bf16 then
// mean mma, and the self-test skips their rows): a switch for the rest of a GPU check after one failed there.
AttnKernel attention_kernel();
bool async_attention_off();
class ForceAttentionKernel {
 public:
  explicit ForceAttentionKernel(AttnKernel k);
  ~ForceAttentionKernel();
  ForceAttentionKernel(const ForceAttentionKernel&) = delete;
  ForceAttentionKernel& operator=(const ForceAttentionKernel&) = delete;

 private:
  int saved_;
};

}  // namespace attn
}  // namespace cuda
}  // namespace pt
