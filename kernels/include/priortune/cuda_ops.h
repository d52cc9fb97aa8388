// CUDA ops: the device counterparts of the CPU reference ops in priortune/ops.h, one launcher per op, llm.c
// style. Every launcher enqueues work on `stream` and returns without synchronising (so a whole training
// step can be captured as one CUDA graph); a launch error is thrown as std::runtime_error naming the op.
// Pointers are device pointers unless a parameter says otherwise. Shapes and layouts are exactly those of
// ops.h (row-major fp32 activations, PyTorch [out, in] weights); only the differences are stated here.
//
// Numerics: activations and every reduction are fp32 (sums of squares, softmax statistics, norms); matrix
// products run in the precision the caller picks (GemmPrecision). The fp32 path exists for verification:
// with it every op agrees with its CPU reference to fp32 rounding (the order of additions differs).
//
// This header has no CUDA includes, so host code (the Node layer, tests) can name the ops.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

struct CUstream_st;

namespace pt {
namespace cuda {

using Stream = CUstream_st*;
using bf16_t = uint16_t;  // bfloat16 bits (device code reinterprets them as __nv_bfloat16)

// --- Matrix products -----------------------------------------------------------------------------------
// BF16: tensor cores, bf16 operands (fp32 ones rounded to nearest even), fp32 accumulation.
// TF32: tensor cores, tf32 operands, fp32 accumulation.  FP32: CUDA cores, fp32 FMA (verification path).
enum class GemmPrecision { BF16, TF32, FP32 };
const char* precision_name(GemmPrecision p);

// Attention matrix products (attention_forward / attention_backward):
// FP32: CUDA cores, fp32 throughout (verification path).
// BF16: tensor cores (ldmatrix + mma.sync; PRIORTUNE_CUDA_ATTN=wmma: WMMA; =async or =bf16: mma.sync with
//   cp.async tile loads, see AttentionBf16Operands). Q, K, V, dO, P and dS are
//   rounded to bf16 (round to nearest even) as operands, with fp32 accumulation; scores, softmax
//   statistics, lse, delta and every sum stay fp32. Taken for hd a multiple of 16 up to 128; any other hd
//   silently runs the FP32 kernels (same outputs as FP32 then).
enum class AttentionPrecision { FP32, BF16 };

// C[M, N] (=, or += when beta == 1) = A[M, K] . op(B) (+ bias[N] broadcast over rows; nullptr: none).
//   b_transposed = true  ("NT"): B is [N, K] row-major, op(B) = B^T   (x . W^T: a linear layer's forward)
//   b_transposed = false ("NN"): B is [K, N] row-major, op(B) = B     (dout . W: a linear layer's backward)
// C is fp32 (ldc). A is bf16 when a_bf16, else fp32 (lda); B is bf16 when b_bf16, else fp32 (ldb); bf16
// operands need the BF16 precision, whose tensor cores round fp32 operands to bf16 (nearest even) as they
// stage them. Any M, N, K >= 1 and any leading dimensions >= the row length work. The fastest path is BF16
// with both operands bf16, 16-byte aligned, lda and ldb multiples of 8 (a cp.async pipeline feeding wgmma on
// Hopper where M > 64 and K >= 512, else ldmatrix + mma.sync; edge tiles included); anything else takes the
// staged kernel (fp32 operands converted
// as they are staged; unaligned rows or edge tiles load element by element).
// PRIORTUNE_CUDA_GEMM=staged|pipe|pipe128|pipe256|mma128|mma256|wgmma|wgmma128|wgmma256|wgmma2|tma|tma128|
// tma256 fixes the kernel for comparisons (default auto; the wgmma and TMA-fed wgmma ones on compute
// capability 9.x only, PRIORTUNE_CUDA_WGMMA=0 keeping them off, PRIORTUNE_CUDA_TMA=0 the TMA-fed ones);
// PRIORTUNE_CUDA_GEMM=cublaslt hands every product whose operands are both bf16 (BF16) or both fp32 to
// cuBLASLt, loaded at run time where the machine has it (an error where not): a second engine for comparing
// whole steps, never the default. PRIORTUNE_CUDA_GEMM_PEEL=1 runs a wgmma product's sparse last wave as a
// second product on short mma.sync tiles. beta is 0 or 1: with 0, C is not read.
void gemm(Stream stream, GemmPrecision precision, bool b_transposed, int64_t M, int64_t N, int64_t K,
          const void* A, int64_t lda, bool a_bf16, const void* B, int64_t ldb, bool b_bf16, float* C,
          int64_t ldc, const float* bias, float beta);
// The same with a device workspace of workspace_floats floats, which PRIORTUNE_CUDA_GEMM_SPLITK=1 lets a
// product of too few tiles to fill the GPU use for split-K (partial products over k-ranges, added in a fixed
// order); gemm_workspace_floats says how many floats this product would use (0: it would not split). The
// workspace must not be in use by other work on other streams.
// c16 (optional, needs ldc == N): also c16[i] (=) bf16 (nearest even) of f(v) for each element v as written
// to C: the next product's operand without a conversion pass. f by op: Copy v; Gelu gelu_forward's GPT-2
// tanh GELU of v; GeluGrad gelu_backward's gradient with x = aux[i] (aux: C's layout) and dout = v, after
// which C's contents are unspecified (the fused kernels do not write it). The register-epilogue kernels
// (wgmma, TMA-fed, mma.sync) write c16 from registers; the other paths (and PRIORTUNE_CUDA_GEMM_OUT16=0)
// run to_bf16 / gelu_forward / gelu_backward on C after the product: the same values.
enum class Out16Op { Copy = 0, Gelu = 1, GeluGrad = 2 };
void gemm(Stream stream, GemmPrecision precision, bool b_transposed, int64_t M, int64_t N, int64_t K,
          const void* A, int64_t lda, bool a_bf16, const void* B, int64_t ldb, bool b_bf16, float* C,
          int64_t ldc, const float* bias, float beta, float* workspace, int64_t workspace_floats,
          bf16_t* c16 = nullptr, Out16Op op = Out16Op::Copy, const float* aux = nullptr);
int64_t gemm_workspace_floats(GemmPrecision precision, int64_t M, int64_t N, int64_t K);

// dst[i] (=) = bf16(src[i]), round to nearest even (weights once, on upload; activations before each BF16
// product, so that it can take the pipelined kernel).
void to_bf16(Stream stream, bf16_t* dst, const float* src, int64_t n);

// --- Embedding, norms, activations (ops.h contracts; `stream` first) ------------------------------------
// ids are device int32 and already range-checked by the caller; prompt may be nullptr when P == 0.
void embedding_forward(Stream stream, float* out, const int32_t* ids, const float* prompt, int64_t P,
                       const float* wte, const float* wpe, int64_t pos_offset, int64_t B, int64_t T,
                       int64_t C);

// dst[r, c] (=) = sum_{b = 0..B-1} src[b * batch_stride + r * C + c] for r < rows: the batch sum of rows
// (the soft prompt's gradient is batch_sum_rows(dprompt, dx, B, P, S * C, C); deep prompts' likewise).
void batch_sum_rows(Stream stream, float* dst, const float* src, int64_t B, int64_t rows,
                    int64_t batch_stride, int64_t C);

enum class NormKind { LayerNorm, RMSNorm };
// out (=) = norm(x) * w (+ b); saves mean[N] (LayerNorm only; may be nullptr) and rstd[N] when non-null.
// Fused residual: when `residual` is non-null, the normalised input is x + residual, which is also written
// to x_sum[N, C] (=) (x_sum may alias x). b may be nullptr (RMSNorm has none). A bf16 out gets the fp32
// result rounded to nearest even (a BF16 product's operand, with no conversion pass).
void norm_forward(Stream stream, NormKind kind, float* out, float* mean, float* rstd, const float* x,
                  const float* residual, float* x_sum, const float* w, const float* b, int64_t N, int64_t C,
                  float eps);
void norm_forward(Stream stream, NormKind kind, bf16_t* out, float* mean, float* rstd, const float* x,
                  const float* residual, float* x_sum, const float* w, const float* b, int64_t N, int64_t C,
                  float eps);
// dx (+=) the gradient with respect to the norm's input (ops.h layernorm_backward / rmsnorm_backward); with
// dx16, also the updated dx rounded to bf16 (nearest even) into dx16[N, C].
void norm_backward(Stream stream, NormKind kind, float* dx, const float* dout, const float* x, const float* w,
                   const float* mean, const float* rstd, int64_t N, int64_t C, bf16_t* dx16 = nullptr);

void gelu_forward(Stream stream, float* out, const float* x, int64_t n);
void gelu_backward(Stream stream, float* dx, const float* x, const float* dout, int64_t n);
void swiglu_forward(Stream stream, float* out, const float* gate_up, int64_t N, int64_t I);
void swiglu_backward(Stream stream, float* dgate_up, const float* gate_up, const float* dout, int64_t N,
                     int64_t I);
// The same, the output rounded to bf16 (nearest even): an activation (or its gradient) whose only reader is
// a BF16 product, written once in the operand type instead of fp32 and converted again.
void gelu_forward(Stream stream, bf16_t* out, const float* x, int64_t n);
void gelu_backward(Stream stream, bf16_t* dx, const float* x, const float* dout, int64_t n);
void swiglu_forward(Stream stream, bf16_t* out, const float* gate_up, int64_t N, int64_t I);
void swiglu_backward(Stream stream, bf16_t* dgate_up, const float* gate_up, const float* dout, int64_t N,
                     int64_t I);
// out (=) = a + b (out may alias a or b).
void residual_forward(Stream stream, float* out, const float* a, const float* b, int64_t n);
// cos/sin: device tables [S, hd/2] as in ops.h.
void rope_forward(Stream stream, float* x, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads,
                  int64_t hd, const float* cos, const float* sin);
void rope_backward(Stream stream, float* dx, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads,
                   int64_t hd, const float* cos, const float* sin);

// --- Attention (fused, flash style: the S x S probabilities are never stored) ----------------------------
// bf16 copies (round to nearest even, the values to_bf16 writes) of the fp32 operands of attention_forward
// and attention_backward below, same layouts: qkv, prefix_k and prefix_v (when Pp > 0), and for
// attention_backward dout. The BF16 kernels round exactly these values as they stage their tiles, so with
// PRIORTUNE_CUDA_ATTN=bf16 they copy the tiles from the copies instead (cp.async, half the bytes, the next
// tile in flight while one is multiplied): the same outputs bit for bit. Where a copy the call needs is null
// or not 16-byte aligned, or another kernel choice runs, they are not read. The fp32 operands are still
// required.
struct AttentionBf16Operands {
  const bf16_t* qkv = nullptr;
  const bf16_t* prefix_k = nullptr;
  const bf16_t* prefix_v = nullptr;
  const bf16_t* dout = nullptr;
};
// Whether attention_forward / attention_backward at this precision and head dim would read such copies now
// (PRIORTUNE_CUDA_ATTN=bf16, tensor-core kernels): a caller makes them only then.
bool attention_takes_bf16_operands(AttentionPrecision precision, int64_t hd);

// Same inputs and masking rules as ops.h attention_forward (causal, GQA, key padding mask, key/value
// prefixes; a query with no visible key outputs zeros). Instead of probs it saves lse[B, H, S] (=), the
// natural-log sum of exp(scaled scores) of each query row (-INFINITY for a row with no visible key).
// `precision` picks the kernels (AttentionPrecision above); both are deterministic.
// `bf16` (optional): bf16 copies of the operands (AttentionBf16Operands above).
void attention_forward(Stream stream, float* out, float* lse, const float* qkv, const uint8_t* key_mask,
                       const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t S,
                       int64_t H, int64_t KV, int64_t hd, float scale,
                       AttentionPrecision precision = AttentionPrecision::FP32,
                       const AttentionBf16Operands* bf16 = nullptr);
// Greedy decoding's attention: one query row per sequence, q[b, h hd .. (h + 1) hd) (rows of q_ld floats),
// against the Pp prefix rows (shared, [Pp, KV, hd]) and the first n[b] rows of sequence b's cache (rows
// b cap .. b cap + n[b] - 1 of ld floats; keys at column k_col + g hd, values at v_col + g hd, kv head
// g = h / (H / KV)); all of them visible. out[b, h hd + i] (=), fp32 (the same softmax as attention_forward's
// last visible row; n: device int32, n[b] >= 1).
void attention_decode(Stream stream, float* out, const float* q, int64_t q_ld, const float* cache,
                      int64_t cap, int64_t ld, int64_t k_col, int64_t v_col, const int32_t* n,
                      const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t H,
                      int64_t KV, int64_t hd, float scale);
// Same outputs as ops.h attention_backward (dqkv (=) with dq rows >= q_rows zero; dprefix_k/v (=) summed
// over the batch, nullptr when Pp == 0), recomputing the probabilities from qkv and lse. `out` is the
// forward's output. `scratch` holds attention_backward_scratch_floats(...) floats (the same for either
// precision). `precision` as for attention_forward (the delta = dout . out row sums are fp32 in both).
int64_t attention_backward_scratch_floats(int64_t Pp, int64_t B, int64_t S, int64_t H, int64_t KV,
                                          int64_t hd);
void attention_backward(Stream stream, float* dqkv, float* dprefix_k, float* dprefix_v, const float* dout,
                        const float* out, const float* lse, const float* qkv, const uint8_t* key_mask,
                        const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t S,
                        int64_t H, int64_t KV, int64_t hd, float scale, int64_t q_rows, float* scratch,
                        AttentionPrecision precision = AttentionPrecision::FP32,
                        const AttentionBf16Operands* bf16 = nullptr);

// --- LM head and loss ----------------------------------------------------------------------------------
// dst[i, :] (=) = src[rows[i], :] for i < R (rows: device int32).
void gather_rows(Stream stream, float* dst, const float* src, const int32_t* rows, int64_t R, int64_t C);
// dst[rows[i], :] (=) = src[i, :]; rows are distinct; other rows of dst are untouched. Row i of src starts at
// src + i src_ld (0: C; a wider matrix's columns from src on).
void scatter_rows(Stream stream, float* dst, const float* src, const int32_t* rows, int64_t R, int64_t C,
                  int64_t src_ld = 0);
// Softmax cross-entropy over rows of logits[R, V] (row stride ld >= V; the columns past V are neither read
// nor written) with targets[R] (all >= 0, < V):
//   losses[r] (=) = logsumexp(logits[r, :]) - logits[r, targets[r]]
//   when want_grad: logits[r, :] (=) = grad_scale * (softmax(logits[r, :]) - onehot(targets[r]))  (in place)
// With grad_bf16 the gradient goes there instead, rounded to bf16 (same ld; logits left as they were): the
// LM head backward's operand, ready for the pipelined GEMM.
void softmax_xent(Stream stream, float* logits, int64_t ld, float* losses, const int32_t* targets, int64_t R,
                  int64_t V, float grad_scale, bool want_grad, bf16_t* grad_bf16 = nullptr);
// out[r] (=) = the column of the largest value of logits[r, 0..V) (row stride ld >= V), the lowest one among
// equal values: std::max_element's column (greedy decoding), so NaNs are passed over but a NaN in column 0
// gives 0.
void argmax_rows(Stream stream, int32_t* out, const float* logits, int64_t ld, int64_t R, int64_t V);
// out[0] (= or += when accumulate) = sum of x[0..n) in float64, in a fixed order (deterministic).
void sum_f64(Stream stream, double* out, const float* x, int64_t n, bool accumulate);

// --- Optimiser -----------------------------------------------------------------------------------------
// AdamW on n values, torch.optim.AdamW's update (ops.h adamw_step). The step-dependent numbers are read
// from device memory so a captured graph can be replayed for every step:
//   hyper[0] = lr, hyper[1] = 1 - beta1^t, hyper[2] = 1 - beta2^t.
// When clip is non-null, the gradient is first multiplied by clip[0] (global-norm clipping factor). When
// sum_sq is non-null and sum_sq[0] (the squared global gradient norm) is not finite, nothing is written.
void adamw_step(Stream stream, float* param, const float* grad, float* m, float* v, int64_t n,
                const float* hyper, float beta1, float beta2, float eps, float weight_decay,
                const float* clip, const double* sum_sq = nullptr);
// out[0] (= or += when accumulate) = sum of squares of x[0..n) in float64 (for the global gradient norm).
void sum_squares_f64(Stream stream, double* out, const float* x, int64_t n, bool accumulate);
// clip[0] (=) = max_norm / (sqrt(sum_sq[0]) + 1e-6) when that is below 1, else 1 (clip_grad_norm_).
void clip_factor(Stream stream, float* clip, const double* sum_sq, float max_norm);

// --- Self-test: every op above against its CPU reference (ops.h) on random inputs -------------------------
// err = max |gpu - cpu| / max(max |cpu|, 1e-30): the error relative to the output's scale; pass = err <= tol.
struct OpCheck {
  std::string op;     // e.g. "gemm NT bf16"
  std::string shape;  // e.g. "M=77 N=50257 K=768"
  double err = 0.0, tol = 0.0;
  bool pass = false;
  std::string note;  // why the tolerance is what it is
};
std::vector<OpCheck> selftest_gemm();         // kernels/cuda/gemm.cu
std::vector<OpCheck> selftest_attention();    // kernels/cuda/attention.cu
std::vector<OpCheck> selftest_elementwise();  // kernels/cuda/elementwise.cu
// The parts named (gemm, elementwise, attention; empty: all of them) on device 0, in that order; an unknown
// name throws std::invalid_argument.
std::vector<OpCheck> selftest_all(const std::vector<std::string>& parts = {});

}  // namespace cuda
}  // namespace pt
