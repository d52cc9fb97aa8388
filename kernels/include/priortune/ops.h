// CPU reference ops, llm.c style: one forward/backward pair per op, row-major fp32, sized integers.
// Shapes: N = rows (tokens), C = channels. `=` means the output is overwritten, `+=` accumulated.
// Every op takes `threads` (OpenMP threads over rows); results are deterministic for a fixed count.
// The backward of each op arrives with the prompt-gradient work (issue 3); the forward saves what it needs.
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

}  // namespace pt
