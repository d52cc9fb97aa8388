// A causal language model (GPT-2 or Llama family) on the CPU, fp32: frozen for prompt-tuning, or trained in
// full (every weight slot gets a gradient and AdamW moments; see "Full-parameter training" below).
//
// Weights live in named slots (canonical names below) filled from safetensors files by load_tensor, which
// converts F32/F16/BF16/F64 while reading in bounded chunks, so loading needs one copy of the weights plus
// at most one tensor of scratch. Linear weights are kept in PyTorch's [out, in] layout; GPT-2's Conv1D
// weights ([in, out] on disk) are transposed while loading. Llama's q/k/v and gate/up projections are
// fused into one matrix each (row blocks), so each is one GEMM.
//
// Vectors (norm weights, biases) are [n, 1] slots, so a bias can be filled in row blocks like its matrix.
// Canonical slots (C = hidden, H/KV = heads, hd = head dim, I = intermediate, V = vocab):
//   tok_emb [V, C]; pos_emb [maxPos, C] (GPT-2); lnf.w, lnf.b (b: GPT-2) [C]; lm_head [V, C] (untied only)
//   l{i}.ln1.w/.b [C]; l{i}.qkv.w [(H+2KV) hd, C], l{i}.qkv.b; l{i}.proj.w [C, H hd], l{i}.proj.b;
//   l{i}.ln2.w/.b [C]; l{i}.fc.w [I, C] (GPT-2) or [2I, C] (Llama: gate rows then up rows), l{i}.fc.b;
//   l{i}.fc2.w [C, I], l{i}.fc2.b.   (.b slots exist only where the architecture has biases)
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pt {

enum class Arch { GPT2, Llama };

// A weight file holds a NaN or infinite value (Model::load_tensor).
struct NonFiniteWeight : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType { F32, F16, BF16, F64 };

struct ModelConfig {
  Arch arch = Arch::GPT2;
  int64_t vocab = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
  int64_t max_positions = 0;  // GPT-2: size of the position table; Llama: informational
  float norm_eps = 1e-5f;
  bool tied_head = true;
  bool attn_bias = false, mlp_bias = false;      // Llama options; GPT-2 always has biases
  bool scale_attn_by_inverse_layer_idx = false;  // GPT-2 option
  // RoPE (Llama): inv_freq[i] = theta^(-2i/hd), then scaled by rope_type ("default", "linear", "llama3").
  double rope_theta = 10000.0;
  std::string rope_type = "default";
  double rope_factor = 1.0, rope_low_freq_factor = 1.0, rope_high_freq_factor = 4.0;
  int64_t rope_original_max_positions = 8192;
  int threads = 1;
};

struct Slot {
  std::vector<float> data;
  int64_t rows = 0, cols = 0;
  int64_t loaded_rows = 0;
  // Full-parameter training only (empty otherwise): d loss / d data in the same layout, and AdamW's first
  // and second moments. The slot's own data are the fp32 master weights.
  std::vector<float> grad, adam_m, adam_v;
};

// Deep prompts (see lossAndGrad in README.md):
//  Hidden (the paper's variant): at each listed layer, lengths[i] trainable vectors [lengths[i], C] are
//   prepended to the layer input and as many rows cut from its output. In that layer the deep rows take
//   positions 0..P_l-1 and the sequence is shifted by P_l (RoPE depends only on offsets, so this equals
//   negative positions for the deep rows); deep rows are always attended.
//  Prefix (prefix-tuning / P-Tuning v2, as PEFT feeds past_key_values): keys and values [Pp, KV, hd] per
//   listed layer that every query attends to; keys are used as given (not rotated) and token positions
//   start at Pp, as Transformers does with a cache of Pp entries.
struct DeepPrompts {
  enum class Kind { None, Hidden, Prefix } kind = Kind::None;
  std::vector<int> layers;
  std::vector<const float*> vectors;       // Hidden
  std::vector<int64_t> lengths;            // Hidden
  std::vector<const float*> keys, values;  // Prefix
  int64_t prefix_len = 0;                  // Prefix
};

struct ForwardArgs {
  const int32_t* ids = nullptr;     // [B, T]
  const uint8_t* mask = nullptr;    // [B, T], 1 = token, 0 = padding; nullptr = all tokens
  const int32_t* labels = nullptr;  // [B, T], -100 = ignore; nullptr = no loss
  const float* prompt = nullptr;    // [P, C] soft prompt, prepended to every sequence
  int64_t B = 0, T = 0, P = 0;
  DeepPrompts deep;
  std::vector<int> hidden_indices;  // 0..layers, Transformers' output_hidden_states order
  bool want_logits = true;

  // The layers an inference forward of a `layers`-layer model runs: all (then the final norm) when logits or
  // a loss are asked for; for hidden states alone, those up to the highest index asked for (an activation
  // prior at layer 8 of 16 needs 8 of them, and no final norm).
  int64_t layers_to_run(int64_t layers) const {
    if (want_logits || labels) return layers;
    int64_t top = 0;
    for (int i : hidden_indices) top = std::max<int64_t>(top, i);
    return std::min(top, layers);
  }
};

struct ForwardResult {
  std::vector<float> logits;               // [B, P+T, V] when want_logits
  std::vector<std::vector<float>> hidden;  // one [B, P+T, C] per requested index
  double loss = 0.0;                       // mean over labelled positions (0 when none)
  int64_t label_count = 0;
};

struct GradResult {
  double loss = 0.0;
  int64_t label_count = 0;
  std::vector<float> prompt_grad;               // [P, C] (empty without a soft prompt)
  std::vector<std::vector<float>> deep_grads;   // Hidden: one [P_l, C] per listed layer
  std::vector<std::vector<float>> key_grads;    // Prefix: one [Pp, KV, hd] per listed layer
  std::vector<std::vector<float>> value_grads;  // Prefix
};

// Full-parameter training (see Model::train_grads and Model::train_step).
struct AdamWConfig {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  // Decoupled weight decay, applied only to the slots Model::decays names.
  float weight_decay = 0.0f;
  // Clip the global gradient norm to this value before the update (torch.nn.utils.clip_grad_norm_);
  // 0 = no clipping.
  double max_grad_norm = 0.0;
};

// Throws std::invalid_argument naming the first setting out of range (lr >= 0 finite, betas in [0, 1), eps >
// 0, weight decay >= 0, max_grad_norm >= 0).
void check_adamw(const AdamWConfig& o);

struct TrainStats {
  double loss = 0.0;  // mean cross-entropy over labelled positions
  int64_t label_count = 0;
  double grad_norm = 0.0;  // global L2 norm of all weight gradients before clipping (train_step only)
  int64_t step = 0;        // AdamW steps taken so far (train_step only)
};

struct LayerState;
struct Scratch;
struct Workspace;

// Greedy decoding's bookkeeping, shared by the CPU and CUDA generate(): writes step t's tokens `next` into
// out[b, t] for the sequences not yet stopped, stops those that wrote `eos`; true when every one has stopped.
inline bool take_tokens(const std::vector<int32_t>& next, int64_t t, int64_t max_new, int32_t eos,
                        std::vector<int32_t>& out, std::vector<uint8_t>& done) {
  bool all_done = true;
  for (size_t b = 0; b < next.size(); ++b) {
    if (done[b]) continue;
    out[b * max_new + t] = next[b];
    if (next[b] == eos) done[b] = 1;
    all_done = all_done && done[b];
  }
  return all_done;
}

// Causal shift over the concatenated sequence (prompt rows, then tokens): row (b, s) of [B, P + T] predicts
// token s + 1; prompt rows carry no label (-100).
std::vector<int32_t> shifted_targets(const ForwardArgs& a);

class Model {
 public:
  explicit Model(const ModelConfig& config);
  ~Model();

  const ModelConfig& config() const { return cfg_; }

  // Reads `rows x cols` values of `dtype` at byte `offset` of `file` into slot `target` starting at
  // `row_offset` (transposing an on-disk [cols, rows] tensor when `transpose`). Throws with the slot and
  // file named on any mismatch or I/O error.
  void load_tensor(const std::string& target, int64_t row_offset, const std::string& file, uint64_t offset,
                   DType dtype, int64_t rows, int64_t cols, bool transpose);
  // Throws listing every slot that is not completely loaded.
  void check_complete() const;
  // Holds the run lock: the weights neither change (loads, training steps, set_slot) nor are read by a
  // run while the lock lives. For code that reads every slot from another thread, e.g. the CUDA upload.
  std::unique_lock<std::mutex> lock_weights() const { return std::unique_lock<std::mutex>(run_mutex_); }

  ForwardResult forward(const ForwardArgs& args);
  // Mean cross-entropy over labelled positions and its gradient with respect to the soft prompt and the
  // deep prompts. Needs labels with at least one labelled position.
  GradResult loss_and_grad(const ForwardArgs& args);
  // Greedy decoding with a key/value cache: each sequence (right-padded by args.mask) continues after its
  // last token for up to max_new tokens; a sequence stops after emitting `eos` (>= 0), the rest of its row
  // is filled with -1. Returns [B, max_new].
  std::vector<int32_t> generate(const ForwardArgs& args, int64_t max_new, int32_t eos);
  // generate()'s checks (check_args, max_new >= 1, positions for the new tokens, right padding, no empty
  // sequence without a prompt); returns each sequence's token count. The CUDA model's generation uses it too.
  std::vector<int64_t> generation_lengths(const ForwardArgs& args, int64_t max_new) const;

  const Slot& slot(const std::string& name) const;
  const std::vector<float>& token_embeddings() const { return slot("tok_emb").data; }
  size_t weight_bytes() const;
  // Host memory of the slots: weights, and for full-parameter training their gradients and AdamW moments
  // (kept current under the run lock, read without it: the binding tells the garbage collector).
  size_t host_bytes() const { return host_bytes_.load(std::memory_order_relaxed); }
  std::vector<std::string> slot_names() const;
  // RoPE's inverse frequencies (Llama; empty for GPT-2), scalings applied: the angle of position p in pair i
  // is p * inv_freq()[i].
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  // The attention's score scale of layer l (1/sqrt(hd), GPT-2's optional 1/(l+1) included).
  float attn_scale(int64_t l) const;
  // Throws on sequences longer than the model's positions or deep-prompt layers out of range.
  void check_args(const ForwardArgs& a) const;

  // --- Full-parameter training (pretraining from scratch or fine-tuning every weight) ---
  // Batches are token ids only (no soft or deep prompts), with labels and an optional padding mask; the
  // loss is the mean cross-entropy over labelled positions after the causal shift, as in forward().

  // Copies `n` values into slot `name` (n must be rows x cols) and marks it loaded: random initialisation
  // or weights computed elsewhere. Optimizer moments are kept.
  void set_slot(const std::string& name, const float* values, size_t n);
  // set_slot for several slots at once: every name and length is checked before any slot is written (a call
  // that throws leaves the weights as they were).
  struct SlotValues {
    std::string name;
    const float* values;
    size_t n;
  };
  void set_slots(const std::vector<SlotValues>& list);
  // Fills every slot with synthetic weights for benchmarks (timing needs no trained weights, only realistic
  // magnitudes): uniform values of standard deviation `std` in matrices and embeddings, 1 in norm weights, 0
  // in biases; deterministic for a seed, filled in parallel (a 1B-parameter model in about a second).
  void fill_random(uint64_t seed, float std);
  // Loss and d loss / d every weight slot, written (=) into each slot's `grad` (same layout as `data`);
  // `copy`, when given, receives (name, grad) for every slot, copied under the same lock.
  TrainStats train_grads(const ForwardArgs& args,
                         std::vector<std::pair<std::string, std::vector<float>>>* copy = nullptr);
  // (name, data) of every slot, copied under the run lock (consistent even while other calls queue).
  std::vector<std::pair<std::string, std::vector<float>>> copy_weights();
  // train_grads, then one AdamW step on every slot (moments owned by the model, created at the first step):
  // global-norm clipping when asked, weight decay on the slots `decays` names, lr, betas and eps for all.
  TrainStats train_step(const ForwardArgs& args, const AdamWConfig& adamw);
  int64_t optimizer_steps() const { return adam_step_; }
  // AdamW's state for checkpoints: the step count and each slot's moments, copied under the run lock (none
  // before the first step).
  struct AdamState {
    int64_t step = 0;
    std::map<std::string, std::pair<std::vector<float>, std::vector<float>>> moments;  // slot -> (m, v)
  };
  AdamState copy_adam_state();
  // Restores a state copy_adam_state gave (every slot after the first step, lengths as the slot's); checked
  // whole before anything changes.
  void set_adam_state(const AdamState& state);
  // Weight decay rule: the weight matrices of linear layers (l{i}.qkv.w, proj.w, fc.w, fc2.w and an untied
  // lm_head); no decay for norm weights or biases (as Hugging Face's Trainer and nanoGPT), nor, unlike
  // those two (which decay every matrix, embeddings included), for the embeddings (tok_emb, which a tied
  // head shares, and pos_emb): ours keeps the token table, which prompt priors and collapse metrics read,
  // free of decay's shrinkage.
  static bool decays(const std::string& slot_name);

 private:
  void add_slot(const std::string& name, int64_t rows, int64_t cols);
  const float* w(const std::string& name) const;
  const float* w_or_null(const std::string& name) const;
  void rope_tables(int64_t pos0, int64_t S, std::vector<float>& cos, std::vector<float>& sin) const;
  // The architecture's norm (LayerNorm for GPT-2, RMSNorm for Llama) with the weights of slot `name`
  // ("l3.ln1", "lnf"); mean is unused by RMSNorm.
  void norm_forward(const std::string& name, float* out, float* mean, float* rstd, const float* x,
                    int64_t N) const;
  void norm_backward(const std::string& name, float* dx, const float* dout, const float* x, const float* mean,
                     const float* rstd, int64_t N, int threads) const;
  // Training: also adds the norm's weight (and bias) gradients (+=) into their gradient buffers.
  void norm_backward_with_weights(const std::string& name, float* dx, const float* dout, const float* x,
                                  const float* mean, const float* rstd, int64_t N);
  // Runs the embedding and every layer, saving what the backward needs when `states` holds one entry per
  // layer (else one reused entry). Returns the last layer's output in x and the final-norm output in xf.
  // `train` also keeps each layer's matmul inputs (norm outputs, attention output, MLP activation) for the
  // weight gradients; the prompt-tuning paths never set it. `after_layer` (generation) sees each layer's
  // state (its qkv rows: keys after RoPE) before the next layer reuses it.
  void run_forward(const ForwardArgs& a, Workspace& ws, bool save, ForwardResult* capture, bool train = false,
                   const std::function<void(int64_t, const LayerState&)>* after_layer = nullptr);
  void layer_forward(int64_t l, const ForwardArgs& a, LayerState& st, Scratch& sc, float* x,
                     const uint8_t* key_mask, bool save, bool train = false);
  void layer_backward(int64_t l, const ForwardArgs& a, LayerState& st, Scratch& sc, float* dx,
                      int64_t rows_needed, GradResult& g);
  // Full-parameter backward of one layer (no deep prompts): dx holds d output on entry and d input on exit;
  // adds the layer's weight gradients into the slots' `grad`.
  void layer_backward_weights(int64_t l, const ForwardArgs& a, LayerState& st, Scratch& sc, float* dx);
  TrainStats train_grads_locked(const ForwardArgs& a);
  float* grad_of(const std::string& name);
  float* grad_or_null(const std::string& name);

  ModelConfig cfg_;
  std::map<std::string, Slot> slots_;
  std::vector<double> inv_freq_;
  // One forward/backward at a time per model (shared scratch, bounded memory); loads and weight writes take
  // it too, and lock_weights() lends it to readers outside the class (the CUDA upload).
  mutable std::mutex run_mutex_;
  // Activations and scratch kept between calls, so repeated steps of one shape reuse memory instead of
  // faulting in fresh pages every call; freed with the model.
  std::unique_ptr<Workspace> ws_;
  int64_t adam_step_ = 0;  // AdamW's t, shared by every slot
  std::atomic<size_t> host_bytes_{0};
  void recount_host_bytes();  // under run_mutex_, after a slot's vectors change size
};

}  // namespace pt
