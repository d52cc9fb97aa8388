// CPU reference ops, llm.c style: one forward/backward pair per op, row-major fp32, sized integers.
// Shapes: N = rows (tokens), C = channels. `=` means the output is overwritten, `+=` accumulated.
// Every op takes `threads` (OpenMP threads over rows); results are deterministic for a fixed count.
// The `*_backward` passes compute gradients with respect to activations only: prompt-tuning freezes every
// weight, so that path has no weight gradients and no buffers for them. Full-parameter training adds the
// `*_backward_weights` halves at the end of this file, run only when weights are trained.
#pragma once
#include <cstdint>

namespace pt {

// Soft-prompt embedding: each of the B sequences is P prompt rows followed by T token rows (S = P + T).
//   out[b*S + s, :] (=) = prompt[s, :]             for s < P
//                       = wte[ids[b*T + s - P], :]  for s >= P
//   (+ wpe[s + pos_offset, :] for every row when wpe != nullptr, GPT-2's learned positions).
// Ids are range-checked by the caller.
void embedding_forward(float* out, const int32_t* ids, const float* prompt, int64_t P, const float* wte,
                       const float* wpe, int64_t pos_offset, int64_t B, int64_t T, int64_t C, int threads);

// LayerNorm: out (=) = (x - mean) * rstd * w + b; saves mean[N], rstd[N] (=).
void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                       int64_t N, int64_t C, float eps, int threads);

// RMSNorm (Llama): out (=) = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); saves rstd[N] (=).
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps,
                     int threads);

// Linear layer in PyTorch's layout: out[N,OC] (=) = x[N,C] . W[OC,C]^T (+ bias[OC]).
void matmul_forward(float* out, const float* x, const float* W, const float* bias, int64_t N, int64_t C,
                    int64_t OC, int threads);

// GELU, tanh approximation ("gelu_new" in GPT-2): out[i] (=) = 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715
// x^3))).
void gelu_forward(float* out, const float* x, int64_t n, int threads);

// SwiGLU (Llama MLP): gate_up[N, 2I] holds gate in [0, I) and up in [I, 2I) of each row;
// out[N, I] (=) = silu(gate) * up.
void swiglu_forward(float* out, const float* gate_up, int64_t N, int64_t I, int threads);

// residual add: out (=) = a + b (out may alias a).
void residual_forward(float* out, const float* a, const float* b, int64_t n, int threads);

// Rotary position embedding (rotate-half convention of Hugging Face Llama), applied in place to `heads`
// heads of width hd starting at column `col0` of each row of x[B*S, ld]. cos/sin: [S, hd/2] tables
// for the positions of the S rows of one sequence.
void rope_forward(float* x, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
                  const float* cos, const float* sin, int threads);

// Causal multi-head attention with grouped-query heads, a key padding mask and optional key/value prefixes.
//   qkv[B*S, (H + 2*KV)*hd]: q heads, then k heads, then v heads (post-RoPE).
//   key_mask[B*S]: 1 = attend, 0 = padding (nullptr: all 1). Query i sees prefix keys and keys j <= i.
//   prefix_k/prefix_v[Pp, KV, hd] (nullptr when Pp == 0): keys/values every query attends to.
//   out[B*S, H*hd] (=); probs[B, H, S, Pp+S] (=) saved for backward (softmax rows; masked entries 0).
// A query with no visible key (only possible with Pp == 0 and a padded first position) outputs zeros.
void attention_forward(float* out, float* probs, const float* qkv, const uint8_t* key_mask,
                       const float* prefix_k, const float* prefix_v, int64_t Pp, int64_t B, int64_t S,
                       int64_t H, int64_t KV, int64_t hd, float scale, int threads);

// Cross-entropy with ignore index: for each row n with target[n] >= 0, loss[n] (=) = logsumexp(logits[n,:])
// - logits[n, target[n]]; rows with target -100 get 0. Returns the number of counted rows.
int64_t crossentropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                             int threads);

// ---------------------------------------------------------------------------------------------------------
// Backward halves. `dout` is the gradient of the loss with respect to the op's output.

// Soft-prompt embedding backward: dprompt[s, :] (=) = sum_b dout[b*S + s, :] for s < P (summed over the
// batch in order b = 0..B-1). Token rows need no gradient: the embedding table is frozen.
void embedding_backward(float* dprompt, const float* dout, int64_t P, int64_t B, int64_t S, int64_t C);

// LayerNorm backward over rows; dx (+=) (accumulates into the residual stream's gradient).
void layernorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* mean,
                        const float* rstd, int64_t N, int64_t C, int threads);

// RMSNorm backward over rows; dx (+=).
void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* rstd,
                      int64_t N, int64_t C, int threads);

// Linear layer backward with respect to its input: dx[N,C] (=) = dout[N,OC] . W[OC,C] (beta = 1: +=).
void matmul_backward(float* dx, const float* dout, const float* W, int64_t N, int64_t C, int64_t OC,
                     float beta, int threads);

// GELU backward: dx (=) = dout * gelu'(x).
void gelu_backward(float* dx, const float* x, const float* dout, int64_t n, int threads);

// SwiGLU backward: dgate_up[N, 2I] (=) from dout[N, I] and the saved gate_up[N, 2I].
void swiglu_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int64_t I,
                     int threads);

// RoPE backward: the inverse rotation, applied in place to the gradient of the rotated heads.
void rope_backward(float* dx, int64_t B, int64_t S, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
                   const float* cos, const float* sin, int threads);

// Attention backward. dout[B*S, H*hd]; probs and qkv as saved by attention_forward.
//   dqkv[B*S, (H+2KV)*hd] (=): gradients of q, k and v (k and v summed over the heads of each group).
//   dprefix_k/dprefix_v[Pp, KV, hd] (=), summed over the batch (nullptr when Pp == 0).
//   q_rows: only the first q_rows rows of each sequence need dq (S for all; fewer when only the prompt
//   rows' input gradient is wanted, e.g. the first prompted layer); dq rows past it are left zero.
void attention_backward(float* dqkv, float* dprefix_k, float* dprefix_v, const float* dout,
                        const float* probs, const float* qkv, const float* prefix_k, const float* prefix_v,
                        int64_t Pp, int64_t B, int64_t S, int64_t H, int64_t KV, int64_t hd, float scale,
                        int64_t q_rows, int threads);

// Fused LM head + softmax cross-entropy on the rows that carry a label, in chunks (never the full
// N x V logits). For each row r of x[R, C] with target t[r] >= 0:
//   loss += logsumexp(x_r . W^T) - (x_r . W^T)[t_r]          (returned, summed)
//   dx[r, :] (=) = grad_scale * (softmax(x_r . W^T) - onehot(t_r)) . W    (when dx != nullptr)
// `logits` is scratch of lm_head_chunk_rows(R, V) * V floats.
int64_t lm_head_chunk_rows(int64_t R, int64_t V);
double lm_head_crossentropy(float* dx, const float* x, const int32_t* targets, const float* W, int64_t R,
                            int64_t C, int64_t V, float grad_scale, float* logits, int threads);

// AdamW (decoupled weight decay, bias-corrected; PyTorch's torch.optim.AdamW update), in place on
// param, m and v for step t >= 1.
void adamw_step(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, int64_t t);

// ---------------------------------------------------------------------------------------------------------
// Weight-gradient halves (full-parameter training). Every weight gradient is accumulated (+=) into a buffer
// the caller zeroes once per step, so a weight used twice (a tied LM head and token embedding) sums both
// contributions. Nothing races: sums over rows run either inside the GEMM (deterministic, see gemm.h) or
// with each thread owning a range of columns and adding the rows in order, so results are deterministic
// for a fixed thread count, like every op here.

// Linear layer backward with respect to its parameters (layout of matmul_forward):
//   dW[OC, C] (+=) = dout[N, OC]^T . x[N, C];  dbias[OC] (+=) = sum_n dout[n, :]   (dbias may be nullptr).
void matmul_backward_weights(float* dW, float* dbias, const float* dout, const float* x, int64_t N, int64_t C,
                             int64_t OC, int threads);

// LayerNorm backward with respect to its parameters, from the statistics saved by layernorm_forward:
//   dw[c] (+=) = sum_n dout[n, c] * (x[n, c] - mean[n]) * rstd[n];  db[c] (+=) = sum_n dout[n, c].
void layernorm_backward_weights(float* dw, float* db, const float* dout, const float* x, const float* mean,
                                const float* rstd, int64_t N, int64_t C, int threads);

// RMSNorm backward with respect to its weight: dw[c] (+=) = sum_n dout[n, c] * x[n, c] * rstd[n].
void rmsnorm_backward_weights(float* dw, const float* dout, const float* x, const float* rstd, int64_t N,
                              int64_t C, int threads);

// Embedding backward with respect to the tables, in embedding_forward's layout (B sequences of P prompt
// rows then T token rows, S = P + T):
//   dwte[ids[b*T + t], :] (+=) = dout[b*S + P + t, :]            (token rows; repeated ids add up)
//   dwpe[s + pos_offset, :] (+=) = sum_b dout[b*S + s, :]        (every row, when dwpe != nullptr: GPT-2)
// Ids are range-checked by the caller.
void embedding_backward_weights(float* dwte, float* dwpe, const float* dout, const int32_t* ids, int64_t P,
                                int64_t pos_offset, int64_t B, int64_t T, int64_t C, int threads);

// lm_head_crossentropy that also accumulates the head's weight gradient over the labelled rows:
//   dW[V, C] (+=) = grad_scale * sum_r (softmax(x_r . W^T) - onehot(t_r))^T x_r
// (unlabelled rows contribute nothing). Same loss, dx and scratch contract as lm_head_crossentropy. With
// every row labelled, as in pretraining, pass all rows: no gather is needed.
double lm_head_crossentropy_with_weight_grad(float* dx, float* dW, const float* x, const int32_t* targets,
                                             const float* W, int64_t R, int64_t C, int64_t V,
                                             float grad_scale, float* logits, int threads);

}  // namespace pt
