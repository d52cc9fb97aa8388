// The frozen model on the CPU: weight slots, loading with dtype conversion, and the forward pass.
// See priortune/model.h for the layout contract.
#include "priortune/model.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>

#include "priortune/ops.h"

namespace pt {

namespace {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
    case DType::F64:
      return 8;
  }
  return 4;
}

void convert(const uint8_t* src, DType t, size_t n, float* dst) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      break;
    case DType::F16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      break;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        uint32_t bits = static_cast<uint32_t>(h) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
      break;
    case DType::F64:
      for (size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        dst[i] = static_cast<float>(d);
      }
      break;
  }
}

// Reads n values of type t at `offset` of fd into dst (fp32), in chunks of at most 16 MiB.
void read_converted(int fd, const std::string& file, uint64_t offset, DType t, size_t n, float* dst) {
  const size_t es = dtype_size(t);
  const size_t chunk_elems = (16u << 20) / es;
  std::vector<uint8_t> buf(std::min(n, chunk_elems) * es);
  size_t done = 0;
  while (done < n) {
    const size_t m = std::min(chunk_elems, n - done);
    size_t got = 0;
    while (got < m * es) {
      ssize_t r = pread(fd, buf.data() + got, m * es - got, static_cast<off_t>(offset + done * es + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0)
        throw std::runtime_error(
            "cannot read " + file + " at byte " + std::to_string(offset + done * es + got) +
            (r == 0 ? ": file is shorter than its header says" : ": " + std::string(strerror(errno))));
      got += static_cast<size_t>(r);
    }
    convert(buf.data(), t, m, dst + done);
    done += m;
  }
}

struct Fd {
  int fd;
  explicit Fd(const std::string& path) : fd(open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + strerror(errno));
  }
  ~Fd() { close(fd); }
};

}  // namespace

Model::Model(const ModelConfig& c) : cfg_(c) {
  const int64_t C = c.hidden, L = c.layers, hd = c.head_dim, H = c.heads, KV = c.kv_heads, I = c.intermediate;
  if (C <= 0 || L <= 0 || H <= 0 || KV <= 0 || hd <= 0 || I <= 0 || c.vocab <= 0)
    throw std::invalid_argument("model config: sizes must be positive");
  if (H % KV != 0)
    throw std::invalid_argument("model config: num_attention_heads (" + std::to_string(H) +
                                ") must be a multiple of num_key_value_heads (" + std::to_string(KV) + ")");
  if (c.arch == Arch::Llama && hd % 2 != 0)
    throw std::invalid_argument("model config: head_dim must be even for RoPE");
  if (c.threads < 1) throw std::invalid_argument("model config: threads must be >= 1");
  if (!(c.norm_eps >= 0.0)) throw std::invalid_argument("model config: norm_eps must be >= 0");
  if (c.arch == Arch::Llama) {
    // Zero or negative values give infinite or NaN rotary frequencies.
    if (!(c.rope_theta > 0.0) || !(c.rope_factor > 0.0))
      throw std::invalid_argument("model config: rope_theta and the rope scaling factor must be > 0");
    if (c.rope_type == "llama3" &&
        !(c.rope_low_freq_factor > 0.0 && c.rope_high_freq_factor > c.rope_low_freq_factor &&
          c.rope_original_max_positions > 0))
      throw std::invalid_argument(
          "model config: llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and "
          "original_max_position_embeddings > 0");
  }
  const bool gpt2 = c.arch == Arch::GPT2;
  add_slot("tok_emb", c.vocab, C);
  if (gpt2) add_slot("pos_emb", c.max_positions, C);
  add_slot("lnf.w", C, 1);
  if (gpt2) add_slot("lnf.b", C, 1);
  if (!c.tied_head) add_slot("lm_head", c.vocab, C);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "l" + std::to_string(l) + ".";
    add_slot(p + "ln1.w", C, 1);
    add_slot(p + "ln2.w", C, 1);
    add_slot(p + "qkv.w", (H + 2 * KV) * hd, C);
    add_slot(p + "proj.w", C, H * hd);
    add_slot(p + "fc.w", gpt2 ? I : 2 * I, C);
    add_slot(p + "fc2.w", C, I);
    if (gpt2) {
      add_slot(p + "ln1.b", C, 1);
      add_slot(p + "ln2.b", C, 1);
    }
    if (gpt2 || c.attn_bias) {
      add_slot(p + "qkv.b", (H + 2 * KV) * hd, 1);
      add_slot(p + "proj.b", C, 1);
    }
    if (gpt2 || c.mlp_bias) {
      add_slot(p + "fc.b", gpt2 ? I : 2 * I, 1);
      add_slot(p + "fc2.b", C, 1);
    }
  }
  if (!gpt2) {
    // Hugging Face's rotary frequencies, including the llama3 and linear scalings (rope_utils.py).
    const int64_t half = hd / 2;
    inv_freq_.resize(half);
    for (int64_t i = 0; i < half; ++i) inv_freq_[i] = 1.0 / std::pow(c.rope_theta, (2.0 * i) / hd);
    if (c.rope_type == "linear") {
      for (auto& f : inv_freq_) f /= c.rope_factor;
    } else if (c.rope_type == "llama3") {
      const double old_len = static_cast<double>(c.rope_original_max_positions);
      const double low_wavelen = old_len / c.rope_low_freq_factor;
      const double high_wavelen = old_len / c.rope_high_freq_factor;
      for (auto& f : inv_freq_) {
        const double wavelen = 2.0 * M_PI / f;
        if (wavelen > low_wavelen) {
          f = f / c.rope_factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth = (old_len / wavelen - c.rope_low_freq_factor) /
                                (c.rope_high_freq_factor - c.rope_low_freq_factor);
          f = (1.0 - smooth) * f / c.rope_factor + smooth * f;
        }
      }
    } else if (c.rope_type != "default") {
      throw std::invalid_argument("model config: unsupported rope scaling type '" + c.rope_type +
                                  "' (supported: default, linear, llama3)");
    }
  }
}

void Model::add_slot(const std::string& name, int64_t rows, int64_t cols) {
  Slot& s = slots_[name];
  s.rows = rows;
  s.cols = cols;
}

const Slot& Model::slot(const std::string& name) const {
  auto it = slots_.find(name);
  if (it == slots_.end()) throw std::invalid_argument("no weight slot named '" + name + "'");
  return it->second;
}

const float* Model::w(const std::string& name) const {
  return slot(name).data.data();
}

const float* Model::w_or_null(const std::string& name) const {
  auto it = slots_.find(name);
  return it == slots_.end() ? nullptr : it->second.data.data();
}

std::vector<std::string> Model::slot_names() const {
  std::vector<std::string> names;
  for (const auto& kv : slots_) names.push_back(kv.first);
  return names;
}

void Model::recount_host_bytes() {
  size_t n = 0;
  for (const auto& kv : slots_)
    n += (kv.second.data.size() + kv.second.grad.size() + kv.second.adam_m.size() + kv.second.adam_v.size()) *
         sizeof(float);
  host_bytes_.store(n, std::memory_order_relaxed);
}

size_t Model::weight_bytes() const {
  size_t n = 0;
  for (const auto& kv : slots_) n += kv.second.data.size() * sizeof(float);
  return n;
}

void Model::load_tensor(const std::string& target, int64_t row_offset, const std::string& file,
                        uint64_t offset, DType dtype, int64_t rows, int64_t cols, bool transpose) {
  std::lock_guard<std::mutex> lock(run_mutex_);  // a run or a second load may be queued on another thread
  auto it = slots_.find(target);
  if (it == slots_.end()) throw std::invalid_argument("load: no weight slot named '" + target + "'");
  Slot& s = it->second;
  if (cols != s.cols || row_offset < 0 || row_offset + rows > s.rows)
    throw std::invalid_argument("load: tensor for '" + target + "' from " + file + " has shape [" +
                                std::to_string(rows) + ", " + std::to_string(cols) + "] at row " +
                                std::to_string(row_offset) + ", which does not fit the slot's [" +
                                std::to_string(s.rows) + ", " + std::to_string(s.cols) + "]");
  if (s.data.empty()) {
    s.data.assign(static_cast<size_t>(s.rows * s.cols), 0.0f);
    recount_host_bytes();
  }
  Fd fd(file);
  float* dst = s.data.data() + row_offset * cols;
  const size_t n = static_cast<size_t>(rows * cols);
  if (!transpose) {
    read_converted(fd.fd, file, offset, dtype, n, dst);
  } else {  // on disk [cols, rows]
    std::vector<float> tmp(n);
    read_converted(fd.fd, file, offset, dtype, n, tmp.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = tmp[c * rows + r];
  }
  // A NaN or infinite weight (a damaged checkpoint) would give NaN or silently wrong outputs far from here.
  // x * 0 is NaN exactly for NaN and infinite x: one vectorised pass, then a search only when one is there.
  float probe = 0.0f;
#pragma omp simd reduction(+ : probe)
  for (size_t i = 0; i < n; ++i) probe += dst[i] * 0.0f;
  for (size_t i = 0; probe != 0.0f && i < n; ++i)
    if (!std::isfinite(dst[i])) {
      const size_t r = i / static_cast<size_t>(cols), c = i % static_cast<size_t>(cols);
      const size_t row = transpose ? c : r, col = transpose ? r : c;  // as stored in the file
      throw NonFiniteWeight("value " + std::string(std::isnan(dst[i]) ? "NaN" : "infinite") + " at [" +
                            std::to_string(row) + ", " + std::to_string(col) +
                            "] (weights must be finite: the file is damaged)");
    }
  s.loaded_rows += rows;
}

void Model::check_complete() const {
  std::string missing;
  for (const auto& kv : slots_)
    if (kv.second.loaded_rows != kv.second.rows) missing += (missing.empty() ? "" : ", ") + kv.first;
  if (!missing.empty()) throw std::runtime_error("model weights incomplete; not loaded: " + missing);
}

void Model::rope_tables(int64_t pos0, int64_t S, std::vector<float>& cos, std::vector<float>& sin) const {
  const int64_t half = cfg_.head_dim / 2;
  cos.resize(S * half);
  sin.resize(S * half);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(pos0 + s) * inv_freq_[i];
      cos[s * half + i] = static_cast<float>(std::cos(a));
      sin[s * half + i] = static_cast<float>(std::sin(a));
    }
}

// What one layer saves for its backward (activation gradients only: no layer inputs to matmuls other
// than those the norms, attention and activations need). Full-parameter training also keeps the matmul
// inputs for the weight gradients (ln1, att, ln2, act; empty otherwise).
struct LayerState {
  int64_t S_l = 0;  // rows per sequence in this layer (deep rows + sequence)
  int64_t P_l = 0;  // hidden deep rows in front
  int64_t Pp = 0;   // prefix keys/values attended in this layer
  const float* prefix_k = nullptr;
  const float* prefix_v = nullptr;
  std::vector<float> x_in, mean1, rstd1, qkv, probs, x_mid, mean2, rstd2, fc_pre;
  std::vector<float> ln1, att, ln2, act;
  std::vector<uint8_t> key_mask;
  std::vector<float> cos, sin;
};

// Buffers reused across layers (not needed by the backward).
struct Scratch {
  std::vector<float> ln, att, tmp, act, out, dln, dact, dfc, datt, dqkv, dmid, dprefix_k, dprefix_v;
};

struct Workspace {
  std::vector<LayerState> states;
  Scratch sc;
  std::vector<float> x, xf, lnf_mean, lnf_rstd, dx, xr, dxr, logits, dxf;
  std::vector<uint8_t> key_mask;
};

Model::~Model() = default;

namespace {
template <class T>
T* sized(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
}  // namespace

void Model::check_args(const ForwardArgs& a) const {
  const ModelConfig& c = cfg_;
  const int64_t offset = a.deep.kind == DeepPrompts::Kind::Prefix ? a.deep.prefix_len : 0;
  if (c.arch == Arch::GPT2 && a.P + a.T + offset > c.max_positions)
    throw std::out_of_range("sequence too long: prompt (" + std::to_string(a.P) + ") + seqLen (" +
                            std::to_string(a.T) + ")" +
                            (offset ? " + prefix (" + std::to_string(offset) + ")" : "") +
                            " exceeds the model's " + std::to_string(c.max_positions) + " positions");
  for (int l : a.deep.layers)
    if (l < 0 || l >= c.layers)
      throw std::out_of_range("deepPrompts.layers: layer " + std::to_string(l) + " is out of range");
}

void Model::layer_forward(int64_t l, const ForwardArgs& a, LayerState& st, Scratch& sc, float* x,
                          const uint8_t* key_mask, bool save, bool train) {
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, S = a.P + a.T, C = c.hidden, H = c.heads, KV = c.kv_heads, hd = c.head_dim,
                I = c.intermediate;
  const int64_t qkv_w = (H + 2 * KV) * hd, fc_w = gpt2 ? I : 2 * I;
  const std::string p = "l" + std::to_string(l) + ".";
  // Deep prompts of this layer.
  st.P_l = 0;
  st.Pp = 0;
  st.prefix_k = st.prefix_v = nullptr;
  const float* deep_vectors = nullptr;
  for (size_t i = 0; i < a.deep.layers.size(); ++i) {
    if (a.deep.layers[i] != l) continue;
    if (a.deep.kind == DeepPrompts::Kind::Hidden) {
      st.P_l = a.deep.lengths[i];
      deep_vectors = a.deep.vectors[i];
    } else if (a.deep.kind == DeepPrompts::Kind::Prefix) {
      st.Pp = a.deep.prefix_len;
      st.prefix_k = a.deep.keys[i];
      st.prefix_v = a.deep.values[i];
    }
  }
  const int64_t P_l = st.P_l, S_l = S + P_l, N_l = B * S_l, Lk = st.Pp + S_l;
  st.S_l = S_l;
  // Layer input with the deep rows in front of each sequence.
  float* x_in = sized(st.x_in, N_l * C);
  for (int64_t b = 0; b < B; ++b) {
    if (P_l) std::memcpy(x_in + b * S_l * C, deep_vectors, P_l * C * sizeof(float));
    std::memcpy(x_in + (b * S_l + P_l) * C, x + b * S * C, S * C * sizeof(float));
  }
  uint8_t* km = sized(st.key_mask, N_l);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(km + b * S_l, km + b * S_l + P_l, 1);
    std::memcpy(km + b * S_l + P_l, key_mask + b * S, S);
  }
  // Matmul inputs go to scratch, or to the layer state when training needs them for the weight gradients.
  float* ln = train ? sized(st.ln1, N_l * C) : sized(sc.ln, N_l * C);
  float* mean1 = save && gpt2 ? sized(st.mean1, N_l) : nullptr;
  float* rstd1 = save ? sized(st.rstd1, N_l) : nullptr;
  norm_forward(p + "ln1", ln, mean1, rstd1, x_in, N_l);
  float* qkv = sized(st.qkv, N_l * qkv_w);
  matmul_forward(qkv, ln, w(p + "qkv.w"), w_or_null(p + "qkv.b"), N_l, C, qkv_w, nt);
  if (!gpt2) {
    const int64_t pos0 = a.deep.kind == DeepPrompts::Kind::Prefix ? a.deep.prefix_len : 0;
    rope_tables(pos0, S_l, st.cos, st.sin);
    rope_forward(qkv, B, S_l, qkv_w, 0, H, hd, st.cos.data(), st.sin.data(), nt);
    rope_forward(qkv, B, S_l, qkv_w, H * hd, KV, hd, st.cos.data(), st.sin.data(), nt);
  }
  float* att = train ? sized(st.att, N_l * H * hd) : sized(sc.att, N_l * H * hd);
  float* probs = sized(st.probs, B * H * S_l * Lk);
  attention_forward(att, probs, qkv, km, st.prefix_k, st.prefix_v, st.Pp, B, S_l, H, KV, hd, attn_scale(l),
                    nt);
  float* tmp = sized(sc.tmp, N_l * C);
  matmul_forward(tmp, att, w(p + "proj.w"), w_or_null(p + "proj.b"), N_l, H * hd, C, nt);
  float* x_mid = sized(st.x_mid, N_l * C);
  residual_forward(x_mid, x_in, tmp, N_l * C, nt);
  float* mean2 = save && gpt2 ? sized(st.mean2, N_l) : nullptr;
  float* rstd2 = save ? sized(st.rstd2, N_l) : nullptr;
  if (train) ln = sized(st.ln2, N_l * C);
  norm_forward(p + "ln2", ln, mean2, rstd2, x_mid, N_l);
  float* fc_pre = sized(st.fc_pre, N_l * fc_w);
  matmul_forward(fc_pre, ln, w(p + "fc.w"), w_or_null(p + "fc.b"), N_l, C, fc_w, nt);
  float* act = train ? sized(st.act, N_l * I) : sized(sc.act, N_l * I);
  if (gpt2)
    gelu_forward(act, fc_pre, N_l * I, nt);
  else
    swiglu_forward(act, fc_pre, N_l, I, nt);
  matmul_forward(tmp, act, w(p + "fc2.w"), w_or_null(p + "fc2.b"), N_l, I, C, nt);
  // Output: the sequence rows of x_mid + mlp (the deep rows are cut).
  for (int64_t b = 0; b < B; ++b)
    residual_forward(x + b * S * C, x_mid + (b * S_l + P_l) * C, tmp + (b * S_l + P_l) * C, S * C, nt);
}

void Model::norm_forward(const std::string& name, float* out, float* mean, float* rstd, const float* x,
                         int64_t N) const {
  if (cfg_.arch == Arch::GPT2)
    layernorm_forward(out, mean, rstd, x, w(name + ".w"), w(name + ".b"), N, cfg_.hidden, cfg_.norm_eps,
                      cfg_.threads);
  else
    rmsnorm_forward(out, rstd, x, w(name + ".w"), N, cfg_.hidden, cfg_.norm_eps, cfg_.threads);
}

void Model::norm_backward(const std::string& name, float* dx, const float* dout, const float* x,
                          const float* mean, const float* rstd, int64_t N, int threads) const {
  if (cfg_.arch == Arch::GPT2)
    layernorm_backward(dx, dout, x, w(name + ".w"), mean, rstd, N, cfg_.hidden, threads);
  else
    rmsnorm_backward(dx, dout, x, w(name + ".w"), rstd, N, cfg_.hidden, threads);
}

void Model::norm_backward_with_weights(const std::string& name, float* dx, const float* dout, const float* x,
                                       const float* mean, const float* rstd, int64_t N) {
  const int64_t C = cfg_.hidden;
  if (cfg_.arch == Arch::GPT2)
    layernorm_backward_weights(grad_of(name + ".w"), grad_of(name + ".b"), dout, x, mean, rstd, N, C,
                               cfg_.threads);
  else
    rmsnorm_backward_weights(grad_of(name + ".w"), dout, x, rstd, N, C, cfg_.threads);
  norm_backward(name, dx, dout, x, mean, rstd, N, cfg_.threads);
}

float Model::attn_scale(int64_t l) const {
  float scale = 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));
  if (cfg_.arch == Arch::GPT2 && cfg_.scale_attn_by_inverse_layer_idx) scale /= static_cast<float>(l + 1);
  return scale;
}

void Model::run_forward(const ForwardArgs& a, Workspace& ws, bool save, ForwardResult* capture, bool train,
                        const std::function<void(int64_t, const LayerState&)>* after_layer) {
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, T = a.T, P = a.P, S = P + T, N = B * S, C = c.hidden;
  if (ws.states.size() < static_cast<size_t>(save ? c.layers : 1)) ws.states.resize(save ? c.layers : 1);
  std::vector<float>& x = ws.x;
  // Key mask over the concatenated sequence: prompt rows always attended.
  std::vector<uint8_t>& key_mask = ws.key_mask;
  key_mask.assign(N, 1);
  if (a.mask)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) key_mask[b * S + P + t] = a.mask[b * T + t] ? 1 : 0;
  std::vector<int> want(c.layers + 1, -1);
  if (capture) {
    for (size_t i = 0; i < a.hidden_indices.size(); ++i) want[a.hidden_indices[i]] = static_cast<int>(i);
    capture->hidden.resize(a.hidden_indices.size());
  }
  auto keep = [&](int64_t index, const float* v) {
    if (capture && want[index] >= 0) capture->hidden[want[index]].assign(v, v + N * C);
  };
  x.resize(N * C);
  const int64_t pos0 = a.deep.kind == DeepPrompts::Kind::Prefix ? a.deep.prefix_len : 0;
  embedding_forward(x.data(), a.ids, a.prompt, P, w("tok_emb"), gpt2 ? w("pos_emb") : nullptr, pos0, B, T, C,
                    nt);
  keep(0, x.data());
  // Hidden states alone (nothing saved for a backward): the layers above the highest one asked for are not
  // run.
  const int64_t top = capture && !save && !train ? a.layers_to_run(c.layers) : c.layers;
  for (int64_t l = 0; l < top; ++l) {
    layer_forward(l, a, ws.states[save ? l : 0], ws.sc, x.data(), key_mask.data(), save, train);
    if (after_layer) (*after_layer)(l, ws.states[save ? l : 0]);
    if (l + 1 < c.layers) keep(l + 1, x.data());
  }
  if (top < c.layers) return;
  float* xf = sized(ws.xf, N * C);
  float* lnf_rstd = sized(ws.lnf_rstd, N);
  norm_forward("lnf", xf, sized(ws.lnf_mean, N), lnf_rstd, x.data(), N);
  keep(c.layers, xf);
}

std::vector<int32_t> shifted_targets(const ForwardArgs& a) {
  const int64_t S = a.P + a.T;
  std::vector<int32_t> targets(a.B * S, -100);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t s = 0; s + 1 < S; ++s)
      if (s + 1 >= a.P) targets[b * S + s] = a.labels[b * a.T + s + 1 - a.P];
  return targets;
}

ForwardResult Model::forward(const ForwardArgs& a) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  check_args(a);
  const ModelConfig& c = cfg_;
  const int64_t N = a.B * (a.P + a.T), C = c.hidden, V = c.vocab;
  ForwardResult res;
  if (!ws_) ws_ = std::make_unique<Workspace>();
  Workspace& ws = *ws_;
  run_forward(a, ws, false, &res);
  const float* xf = ws.xf.data();
  const float* head = c.tied_head ? w("tok_emb") : w("lm_head");
  if (a.want_logits) {
    res.logits.resize(N * V);
    matmul_forward(res.logits.data(), xf, head, nullptr, N, C, V, c.threads);
  }
  if (a.labels) {
    const std::vector<int32_t> targets = shifted_targets(a);
    std::vector<int64_t> rows;
    for (int64_t r = 0; r < N; ++r)
      if (targets[r] >= 0) rows.push_back(r);
    res.label_count = static_cast<int64_t>(rows.size());
    const int64_t R = res.label_count;
    float* xr = sized(ws.xr, R * C);
    std::vector<int32_t> tr(R);
    for (int64_t i = 0; i < R; ++i) {
      std::memcpy(xr + i * C, xf + rows[i] * C, C * sizeof(float));
      tr[i] = targets[rows[i]];
    }
    float* logits = sized(ws.logits, lm_head_chunk_rows(R, V) * V);
    const double sum = lm_head_crossentropy(nullptr, xr, tr.data(), head, R, C, V, 0.0f, logits, c.threads);
    res.loss = rows.empty() ? 0.0 : sum / rows.size();
  }
  return res;
}

void Model::layer_backward(int64_t l, const ForwardArgs& a, LayerState& st, Scratch& sc, float* dx,
                           int64_t rows_needed, GradResult& g) {
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, S = a.P + a.T, C = c.hidden, H = c.heads, KV = c.kv_heads, hd = c.head_dim,
                I = c.intermediate;
  const int64_t qkv_w = (H + 2 * KV) * hd, fc_w = gpt2 ? I : 2 * I;
  const int64_t P_l = st.P_l, S_l = st.S_l, N_l = B * S_l;
  const std::string p = "l" + std::to_string(l) + ".";
  // Gradient of the layer output over all S_l rows: the cut deep rows get none.
  float* dmid = sized(sc.dmid, N_l * C);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(dmid + b * S_l * C, dmid + (b * S_l + P_l) * C, 0.0f);
    std::memcpy(dmid + (b * S_l + P_l) * C, dx + b * S * C, S * C * sizeof(float));
  }
  // MLP: out = x_mid + fc2(act(fc(norm2(x_mid)))).
  float* dact = sized(sc.dact, N_l * I);
  matmul_backward(dact, dmid, w(p + "fc2.w"), N_l, I, C, 0.0f, nt);
  float* dfc = sized(sc.dfc, N_l * fc_w);
  if (gpt2)
    gelu_backward(dfc, st.fc_pre.data(), dact, N_l * I, nt);
  else
    swiglu_backward(dfc, st.fc_pre.data(), dact, N_l, I, nt);
  float* dln = sized(sc.dln, N_l * C);
  matmul_backward(dln, dfc, w(p + "fc.w"), N_l, C, fc_w, 0.0f, nt);
  norm_backward(p + "ln2", dmid, dln, st.x_mid.data(), st.mean2.data(), st.rstd2.data(), N_l, nt);
  // Attention: x_mid = x_in + proj(attn(qkv(norm1(x_in)))).
  float* datt = sized(sc.datt, N_l * H * hd);
  matmul_backward(datt, dmid, w(p + "proj.w"), N_l, H * hd, C, 0.0f, nt);
  float* dqkv = sized(sc.dqkv, N_l * qkv_w);
  float* dpk = st.Pp ? sized(sc.dprefix_k, st.Pp * KV * hd) : nullptr;
  float* dpv = st.Pp ? sized(sc.dprefix_v, st.Pp * KV * hd) : nullptr;
  attention_backward(dqkv, dpk, dpv, datt, st.probs.data(), st.qkv.data(), st.prefix_k, st.prefix_v, st.Pp, B,
                     S_l, H, KV, hd, attn_scale(l), rows_needed, nt);
  if (st.Pp) {
    for (size_t i = 0; i < a.deep.layers.size(); ++i)
      if (a.deep.layers[i] == l) {
        g.key_grads[i].assign(dpk, dpk + st.Pp * KV * hd);
        g.value_grads[i].assign(dpv, dpv + st.Pp * KV * hd);
      }
  }
  if (rows_needed == 0) return;  // nothing below needs this layer's input gradient
  if (!gpt2) {
    rope_backward(dqkv, B, S_l, qkv_w, 0, H, hd, st.cos.data(), st.sin.data(), nt);
    rope_backward(dqkv, B, S_l, qkv_w, H * hd, KV, hd, st.cos.data(), st.sin.data(), nt);
  }
  // Input gradient: the residual (dmid) plus norm1's backward of dqkv . Wqkv, on the first rows_needed rows
  // of each sequence only (all rows unless this is the lowest layer with something to train).
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r0 = b * S_l;
    const int64_t rows = rows_needed;
    matmul_backward(dln + r0 * C, dqkv + r0 * qkv_w, w(p + "qkv.w"), rows, C, qkv_w, 0.0f, nt);
    norm_backward(p + "ln1", dmid + r0 * C, dln + r0 * C, st.x_in.data() + r0 * C,
                  gpt2 ? st.mean1.data() + r0 : nullptr, st.rstd1.data() + r0, rows, nt);
  }
  // Deep (hidden) vectors' gradient: their rows summed over the batch; the rest flows to the layer below.
  for (size_t i = 0; i < a.deep.layers.size(); ++i)
    if (a.deep.layers[i] == l && P_l) {
      std::vector<float>& gd = g.deep_grads[i];
      gd.assign(P_l * C, 0.0f);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < P_l * C; ++r) gd[r] += dmid[b * S_l * C + r];
    }
  const int64_t copy_rows = std::min<int64_t>(S, rows_needed - P_l);
  for (int64_t b = 0; b < B; ++b)
    if (copy_rows > 0) std::memcpy(dx + b * S * C, dmid + (b * S_l + P_l) * C, copy_rows * C * sizeof(float));
}

GradResult Model::loss_and_grad(const ForwardArgs& a) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  check_args(a);
  if (!a.labels) throw std::invalid_argument("labels: required for lossAndGrad");
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, S = a.P + a.T, N = B * S, C = c.hidden, V = c.vocab;
  GradResult g;
  const size_t nd = a.deep.layers.size();
  if (a.deep.kind == DeepPrompts::Kind::Hidden) g.deep_grads.resize(nd);
  if (a.deep.kind == DeepPrompts::Kind::Prefix) {
    g.key_grads.resize(nd);
    g.value_grads.resize(nd);
  }
  // The lowest layer whose input (or attention) has something trainable: the backward stops there.
  int64_t lowest = a.P > 0 ? 0 : c.layers;
  for (int l : a.deep.layers) lowest = std::min<int64_t>(lowest, l);
  if (lowest == c.layers)
    throw std::invalid_argument("lossAndGrad: nothing to train (no prompt and no deepPrompts)");

  if (!ws_) ws_ = std::make_unique<Workspace>();
  Workspace& ws = *ws_;
  run_forward(a, ws, true, nullptr);
  const std::vector<float>& x = ws.x;

  // Loss and the gradient of the final-norm output on labelled rows only.
  const std::vector<int32_t> targets = shifted_targets(a);
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < N; ++r)
    if (targets[r] >= 0) rows.push_back(r);
  if (rows.empty())
    throw std::invalid_argument("labels: no labelled position (all -100 after the causal shift)");
  g.label_count = static_cast<int64_t>(rows.size());
  const int64_t R = g.label_count;
  float* xr = sized(ws.xr, R * C);
  float* dxr = sized(ws.dxr, R * C);
  std::vector<int32_t> tr(R);
  for (int64_t i = 0; i < R; ++i) {
    std::memcpy(xr + i * C, ws.xf.data() + rows[i] * C, C * sizeof(float));
    tr[i] = targets[rows[i]];
  }
  const float* head = c.tied_head ? w("tok_emb") : w("lm_head");
  float* logits = sized(ws.logits, lm_head_chunk_rows(R, V) * V);
  g.loss = lm_head_crossentropy(dxr, xr, tr.data(), head, R, C, V, 1.0f / R, logits, nt) / R;
  // Final norm backward on the labelled rows (the others have zero gradient).
  std::vector<float>& dx = ws.dx;
  dx.assign(N * C, 0.0f);
  for (int64_t i = 0; i < R; ++i) {
    const int64_t r = rows[i];
    norm_backward("lnf", dx.data() + r * C, dxr + i * C, x.data() + r * C,
                  gpt2 ? ws.lnf_mean.data() + r : nullptr, ws.lnf_rstd.data() + r, 1, 1);
  }
  // Layers, top down, to the lowest one with something to train.
  for (int64_t l = c.layers - 1; l >= lowest; --l) {
    LayerState& st = ws.states[l];
    int64_t rows_needed = st.S_l;
    if (l == lowest) rows_needed = st.P_l + (l == 0 ? a.P : 0);
    layer_backward(l, a, st, ws.sc, dx.data(), rows_needed, g);
  }
  if (a.P > 0) {
    g.prompt_grad.resize(a.P * C);
    embedding_backward(g.prompt_grad.data(), dx.data(), a.P, B, S, C);
  }
  return g;
}

}  // namespace pt

namespace pt {

std::vector<int64_t> Model::generation_lengths(const ForwardArgs& a, int64_t max_new) const {
  check_args(a);
  const int64_t B = a.B, T = a.T, P = a.P;
  const int64_t pos0 = a.deep.kind == DeepPrompts::Kind::Prefix ? a.deep.prefix_len : 0;
  if (max_new < 1) throw std::invalid_argument("maxNewTokens: expected at least 1");
  // The last new token is returned, not fed back: it takes no position.
  if (cfg_.arch == Arch::GPT2 && pos0 + P + T + max_new - 1 > cfg_.max_positions)
    throw std::out_of_range("generation needs " + std::to_string(pos0 + P + T + max_new - 1) +
                            " positions; the model has " + std::to_string(cfg_.max_positions));
  std::vector<int64_t> len(B, T);
  if (a.mask)
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      while (n < T && a.mask[b * T + n]) ++n;
      for (int64_t t = n; t < T; ++t)
        if (a.mask[b * T + t]) throw std::invalid_argument("attentionMask: generation needs right padding");
      if (n == 0 && P == 0)
        throw std::invalid_argument("attentionMask: sequence " + std::to_string(b) + " is empty");
      len[b] = n;
    }
  return len;
}

// Greedy decoding. The prefill is the plain forward pass; as each layer finishes, its qkv rows (keys after
// RoPE) seed a cache of P_l + S + max_new slots per sequence for that layer. Each new token then runs the
// layers for one row per sequence: its key/value go to slot P_l + P + len_b + t of its sequence (overwriting
// the padding there, which no query ever saw), and it attends to the prefix, the slots before it and itself.
std::vector<int32_t> Model::generate(const ForwardArgs& a, int64_t max_new, int32_t eos) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, T = a.T, P = a.P, S = P + T, C = c.hidden, V = c.vocab, L = c.layers;
  const int64_t H = c.heads, KV = c.kv_heads, hd = c.head_dim, I = c.intermediate, half = hd / 2;
  const int64_t qkv_w = (H + 2 * KV) * hd, kv_w = KV * hd, fc_w = gpt2 ? I : 2 * I, group = H / KV;
  const int64_t pos0 = a.deep.kind == DeepPrompts::Kind::Prefix ? a.deep.prefix_len : 0;
  const std::vector<int64_t> len = generation_lengths(a, max_new);

  if (!ws_) ws_ = std::make_unique<Workspace>();
  Workspace& ws = *ws_;
  // Caches, seeded from the prefill's keys and values layer by layer (the prefill keeps one layer's
  // activations at a time: its memory does not grow with the layers).
  std::vector<int64_t> cap(L), P_l(L), Pp(L);
  std::vector<const float*> prefix_k(L), prefix_v(L);
  std::vector<std::vector<float>> kc(L), vc(L);
  const std::function<void(int64_t, const LayerState&)> seed = [&](int64_t l, const LayerState& st) {
    P_l[l] = st.P_l;
    Pp[l] = st.Pp;
    prefix_k[l] = st.prefix_k;
    prefix_v[l] = st.prefix_v;
    cap[l] = st.S_l + max_new;
    int64_t cache = 0;  // B x cap x kv_w floats, and B x max_new outputs: refused before they wrap
    if (__builtin_mul_overflow(B, cap[l], &cache) || __builtin_mul_overflow(cache, kv_w, &cache) ||
        __builtin_mul_overflow(B, max_new, &cache))
      throw std::out_of_range("maxNewTokens: " + std::to_string(max_new) + " new tokens for " +
                              std::to_string(B) + " sequences need more memory than can be addressed");
    kc[l].assign(B * cap[l] * kv_w, 0.0f);
    vc[l].assign(B * cap[l] * kv_w, 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < st.S_l; ++s) {
        const float* row = st.qkv.data() + (b * st.S_l + s) * qkv_w;
        std::memcpy(kc[l].data() + (b * cap[l] + s) * kv_w, row + H * hd, kv_w * sizeof(float));
        std::memcpy(vc[l].data() + (b * cap[l] + s) * kv_w, row + (H + KV) * hd, kv_w * sizeof(float));
      }
  };
  run_forward(a, ws, false, nullptr, false, &seed);
  const float* head = c.tied_head ? w("tok_emb") : w("lm_head");
  std::vector<float> x(B * C), ln(B * C), qkv(B * qkv_w), att(B * H * hd), tmp(B * C), fc(B * fc_w),
      act(B * I), logits(B * V), cosr(B * half), sinr(B * half);
  auto argmax_rows = [&](std::vector<int32_t>& next) {
    for (int64_t b = 0; b < B; ++b) {
      const float* l = logits.data() + b * V;
      next[b] = static_cast<int32_t>(std::max_element(l, l + V) - l);
    }
  };
  // First token: the logits at each sequence's last position.
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(x.data() + b * C, ws.xf.data() + (b * S + P + len[b] - 1) * C, C * sizeof(float));
  matmul_forward(logits.data(), x.data(), head, nullptr, B, C, V, nt);
  std::vector<int32_t> next(B), out(B * max_new, -1);
  std::vector<uint8_t> done(B, 0);
  argmax_rows(next);

  for (int64_t t = 0; t < max_new; ++t) {
    if (take_tokens(next, t, max_new, eos, out, done) || t + 1 == max_new) break;
    // Embed the new tokens at their positions.
    for (int64_t b = 0; b < B; ++b) {
      const int64_t pos = pos0 + P + len[b] + t;
      const float* e = w("tok_emb") + static_cast<int64_t>(next[b]) * C;
      for (int64_t ch = 0; ch < C; ++ch) x[b * C + ch] = e[ch] + (gpt2 ? w("pos_emb")[pos * C + ch] : 0.0f);
    }
    for (int64_t l = 0; l < L; ++l) {
      const std::string p = "l" + std::to_string(l) + ".";
      norm_forward(p + "ln1", ln.data(), nullptr, nullptr, x.data(), B);
      matmul_forward(qkv.data(), ln.data(), w(p + "qkv.w"), w_or_null(p + "qkv.b"), B, C, qkv_w, nt);
      if (!gpt2) {
        for (int64_t b = 0; b < B; ++b) {
          const double pos = static_cast<double>(pos0 + P_l[l] + P + len[b] + t);
          for (int64_t i = 0; i < half; ++i) {
            cosr[b * half + i] = static_cast<float>(std::cos(pos * inv_freq_[i]));
            sinr[b * half + i] = static_cast<float>(std::sin(pos * inv_freq_[i]));
          }
          rope_forward(qkv.data() + b * qkv_w, 1, 1, qkv_w, 0, H, hd, cosr.data() + b * half,
                       sinr.data() + b * half, 1);
          rope_forward(qkv.data() + b * qkv_w, 1, 1, qkv_w, H * hd, KV, hd, cosr.data() + b * half,
                       sinr.data() + b * half, 1);
        }
      }
      const float scale = attn_scale(l);
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H, g = h / group;
        const int64_t slot = P_l[l] + P + len[b] + t;
        float* K = kc[l].data() + b * cap[l] * kv_w;
        float* Vc = vc[l].data() + b * cap[l] * kv_w;
        if (h % group == 0) {  // one writer per kv head
          std::memcpy(K + slot * kv_w + g * hd, qkv.data() + b * qkv_w + (H + g) * hd, hd * sizeof(float));
          std::memcpy(Vc + slot * kv_w + g * hd, qkv.data() + b * qkv_w + (H + KV + g) * hd,
                      hd * sizeof(float));
        }
      }
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H, g = h / group;
        const int64_t slot = P_l[l] + P + len[b] + t, pp = Pp[l], n = pp + slot + 1;
        const float* q = qkv.data() + b * qkv_w + h * hd;
        const float* K = kc[l].data() + b * cap[l] * kv_w;
        const float* Vc = vc[l].data() + b * cap[l] * kv_w;
        // Right padding: every slot before this one holds a real token (the padding after a sequence is
        // overwritten by its generated tokens), so no mask is needed.
        std::vector<float> sc(n);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const float* k = j < pp ? prefix_k[l] + (j * KV + g) * hd : K + (j - pp) * kv_w + g * hd;
          float d = 0.0f;
          for (int64_t i = 0; i < hd; ++i) d += q[i] * k[i];
          sc[j] = d * scale;
          mx = std::max(mx, sc[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = std::exp(sc[j] - mx);
          sum += sc[j];
        }
        float* o = att.data() + b * H * hd + h * hd;
        std::fill(o, o + hd, 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float pj = sc[j] / sum;
          const float* v = j < pp ? prefix_v[l] + (j * KV + g) * hd : Vc + (j - pp) * kv_w + g * hd;
          for (int64_t i = 0; i < hd; ++i) o[i] += pj * v[i];
        }
      }
      matmul_forward(tmp.data(), att.data(), w(p + "proj.w"), w_or_null(p + "proj.b"), B, H * hd, C, nt);
      residual_forward(x.data(), x.data(), tmp.data(), B * C, nt);
      norm_forward(p + "ln2", ln.data(), nullptr, nullptr, x.data(), B);
      matmul_forward(fc.data(), ln.data(), w(p + "fc.w"), w_or_null(p + "fc.b"), B, C, fc_w, nt);
      if (gpt2)
        gelu_forward(act.data(), fc.data(), B * I, nt);
      else
        swiglu_forward(act.data(), fc.data(), B, I, nt);
      matmul_forward(tmp.data(), act.data(), w(p + "fc2.w"), w_or_null(p + "fc2.b"), B, I, C, nt);
      residual_forward(x.data(), x.data(), tmp.data(), B * C, nt);
    }
    norm_forward("lnf", ln.data(), nullptr, nullptr, x.data(), B);
    matmul_forward(logits.data(), ln.data(), head, nullptr, B, C, V, nt);
    argmax_rows(next);
  }
  return out;
}

}  // namespace pt

// ---------------------------------------------------------------------------------------------------------
// Full-parameter training: the forward keeps every matmul input, the backward runs every layer over all rows
// and adds each op's weight gradient (ops.h, "Weight-gradient halves") into the slots' `grad`; AdamW then
// updates the slots in place. The prompt-tuning paths above never reach this code.

namespace pt {

namespace {

constexpr int64_t kChunk = int64_t{1} << 16;  // elementwise chunk of the optimizer and the norm reduction

// Sum of squares of v in fixed chunks reduced in order: the same value for any thread count.
double sum_squares(const std::vector<float>& v, int threads) {
  const int64_t n = static_cast<int64_t>(v.size()), chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(chunks, 0.0);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t e = std::min(n, (k + 1) * kChunk);
    double s = 0.0;
    for (int64_t i = k * kChunk; i < e; ++i) s += static_cast<double>(v[i]) * v[i];
    part[k] = s;
  }
  double total = 0.0;
  for (double s : part) total += s;
  return total;
}

}  // namespace

bool Model::decays(const std::string& name) {
  if (name == "lm_head") return true;
  auto ends_with = [&](const char* suffix) {
    const size_t k = std::strlen(suffix);
    return name.size() >= k && name.compare(name.size() - k, k, suffix) == 0;
  };
  return name[0] == 'l' &&
         (ends_with(".qkv.w") || ends_with(".proj.w") || ends_with(".fc.w") || ends_with(".fc2.w"));
}

float* Model::grad_of(const std::string& name) {
  auto it = slots_.find(name);
  if (it == slots_.end()) throw std::invalid_argument("no weight slot named '" + name + "'");
  return it->second.grad.data();
}

float* Model::grad_or_null(const std::string& name) {
  auto it = slots_.find(name);
  return it == slots_.end() ? nullptr : it->second.grad.data();
}

void Model::set_slot(const std::string& name, const float* values, size_t n) {
  set_slots({{name, values, n}});
}

void Model::set_slots(const std::vector<SlotValues>& list) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  std::vector<Slot*> targets;
  for (const SlotValues& v : list) {
    auto it = slots_.find(v.name);
    if (it == slots_.end()) throw std::invalid_argument("no weight slot named '" + v.name + "'");
    const Slot& s = it->second;
    if (v.n != static_cast<size_t>(s.rows * s.cols))
      throw std::invalid_argument("weights for '" + v.name + "': expected " + std::to_string(s.rows) + " x " +
                                  std::to_string(s.cols) + " = " + std::to_string(s.rows * s.cols) +
                                  " values, got " + std::to_string(v.n));
    targets.push_back(&it->second);
  }
  for (size_t i = 0; i < list.size(); ++i) {
    targets[i]->data.assign(list[i].values, list[i].values + list[i].n);
    targets[i]->loaded_rows = targets[i]->rows;
  }
  recount_host_bytes();
}

void Model::fill_random(uint64_t seed, float std) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  const float half_width = std * std::sqrt(3.0f);  // uniform on [-a, a] has standard deviation a / sqrt(3)
  uint64_t slot_index = 0;
  for (auto& kv : slots_) {
    Slot& s = kv.second;
    const std::string& name = kv.first;
    const int64_t n = s.rows * s.cols;
    s.data.resize(n);
    s.loaded_rows = s.rows;
    const bool is_norm = name.size() > 2 && name.compare(name.size() - 2, 2, ".w") == 0 &&
                         (name.find("ln") != std::string::npos);
    const bool is_bias = name.size() > 2 && name.compare(name.size() - 2, 2, ".b") == 0;
    ++slot_index;
    if (is_norm || is_bias) {
      std::fill(s.data.begin(), s.data.end(), is_norm ? 1.0f : 0.0f);
      continue;
    }
    float* d = s.data.data();
#pragma omp parallel for num_threads(cfg_.threads) schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      // splitmix64 seeds one xorshift stream per chunk: the values do not depend on the thread count.
      uint64_t z =
          seed + 0x9e3779b97f4a7c15ull * (slot_index * 0x100000001b3ull + static_cast<uint64_t>(i0) + 1);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      uint64_t x = (z ^ (z >> 31)) | 1;
      const int64_t e = std::min(n, i0 + kChunk);
      for (int64_t i = i0; i < e; ++i) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d[i] = half_width * (static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f);
      }
    }
  }
  recount_host_bytes();
}

void Model::layer_backward_weights(int64_t l, const ForwardArgs& a, LayerState& st, Scratch& sc, float* dx) {
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, S = a.T, N = B * S, C = c.hidden, H = c.heads, KV = c.kv_heads, hd = c.head_dim,
                I = c.intermediate;
  const int64_t qkv_w = (H + 2 * KV) * hd, fc_w = gpt2 ? I : 2 * I;
  const std::string p = "l" + std::to_string(l) + ".";
  // MLP: out = x_mid + fc2(act(fc(norm2(x_mid)))); dx is d out, and d x_mid once norm2's backward is added.
  float* dact = sized(sc.dact, N * I);
  matmul_backward(dact, dx, w(p + "fc2.w"), N, I, C, 0.0f, nt);
  matmul_backward_weights(grad_of(p + "fc2.w"), grad_or_null(p + "fc2.b"), dx, st.act.data(), N, I, C, nt);
  float* dfc = sized(sc.dfc, N * fc_w);
  if (gpt2)
    gelu_backward(dfc, st.fc_pre.data(), dact, N * I, nt);
  else
    swiglu_backward(dfc, st.fc_pre.data(), dact, N, I, nt);
  matmul_backward_weights(grad_of(p + "fc.w"), grad_or_null(p + "fc.b"), dfc, st.ln2.data(), N, C, fc_w, nt);
  float* dln = sized(sc.dln, N * C);
  matmul_backward(dln, dfc, w(p + "fc.w"), N, C, fc_w, 0.0f, nt);
  norm_backward_with_weights(p + "ln2", dx, dln, st.x_mid.data(), gpt2 ? st.mean2.data() : nullptr,
                             st.rstd2.data(), N);
  // Attention: x_mid = x_in + proj(attn(rope(qkv(norm1(x_in))))); dx becomes d x_in.
  float* datt = sized(sc.datt, N * H * hd);
  matmul_backward(datt, dx, w(p + "proj.w"), N, H * hd, C, 0.0f, nt);
  matmul_backward_weights(grad_of(p + "proj.w"), grad_or_null(p + "proj.b"), dx, st.att.data(), N, H * hd, C,
                          nt);
  float* dqkv = sized(sc.dqkv, N * qkv_w);
  attention_backward(dqkv, nullptr, nullptr, datt, st.probs.data(), st.qkv.data(), nullptr, nullptr, 0, B, S,
                     H, KV, hd, attn_scale(l), S, nt);
  if (!gpt2) {
    rope_backward(dqkv, B, S, qkv_w, 0, H, hd, st.cos.data(), st.sin.data(), nt);
    rope_backward(dqkv, B, S, qkv_w, H * hd, KV, hd, st.cos.data(), st.sin.data(), nt);
  }
  matmul_backward_weights(grad_of(p + "qkv.w"), grad_or_null(p + "qkv.b"), dqkv, st.ln1.data(), N, C, qkv_w,
                          nt);
  matmul_backward(dln, dqkv, w(p + "qkv.w"), N, C, qkv_w, 0.0f, nt);
  norm_backward_with_weights(p + "ln1", dx, dln, st.x_in.data(), gpt2 ? st.mean1.data() : nullptr,
                             st.rstd1.data(), N);
}

TrainStats Model::train_grads_locked(const ForwardArgs& a) {
  check_args(a);
  if (!a.labels) throw std::invalid_argument("labels: required for training");
  if (a.P > 0 || a.deep.kind != DeepPrompts::Kind::None)
    throw std::invalid_argument(
        "full-parameter training takes token ids only: leave out prompt and deepPrompts");
  check_complete();
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, T = a.T, N = B * T, C = c.hidden, V = c.vocab;
  const std::vector<int32_t> targets = shifted_targets(a);
  int64_t R = 0;
  for (int32_t t : targets) R += t >= 0;
  if (R == 0) throw std::invalid_argument("labels: no labelled position (all -100 after the causal shift)");
  for (auto& kv : slots_) kv.second.grad.assign(kv.second.data.size(), 0.0f);
  recount_host_bytes();

  if (!ws_) ws_ = std::make_unique<Workspace>();
  Workspace& ws = *ws_;
  run_forward(a, ws, true, nullptr, true);

  // LM head + cross-entropy: d xf (=) and the head's weight gradient (+=; the token embedding when tied).
  const float* head = c.tied_head ? w("tok_emb") : w("lm_head");
  float* dhead = c.tied_head ? grad_of("tok_emb") : grad_of("lm_head");
  float* dxf = sized(ws.dxf, N * C);
  const float scale = 1.0f / static_cast<float>(R);
  double loss_sum;
  if (4 * R >= 3 * N) {
    // (Nearly) every position labelled, as in pretraining: all rows in place, unlabelled ones give zeros.
    float* logits = sized(ws.logits, lm_head_chunk_rows(N, V) * V);
    loss_sum = lm_head_crossentropy_with_weight_grad(dxf, dhead, ws.xf.data(), targets.data(), head, N, C, V,
                                                     scale, logits, nt);
  } else {
    // Sparse labels (e.g. padded batches, prompt-masked fine-tuning data): gather the labelled rows.
    std::vector<int64_t> rows;
    rows.reserve(R);
    for (int64_t r = 0; r < N; ++r)
      if (targets[r] >= 0) rows.push_back(r);
    float* xr = sized(ws.xr, R * C);
    float* dxr = sized(ws.dxr, R * C);
    std::vector<int32_t> tr(R);
    for (int64_t i = 0; i < R; ++i) {
      std::memcpy(xr + i * C, ws.xf.data() + rows[i] * C, C * sizeof(float));
      tr[i] = targets[rows[i]];
    }
    float* logits = sized(ws.logits, lm_head_chunk_rows(R, V) * V);
    loss_sum =
        lm_head_crossentropy_with_weight_grad(dxr, dhead, xr, tr.data(), head, R, C, V, scale, logits, nt);
    std::fill(dxf, dxf + N * C, 0.0f);
    for (int64_t i = 0; i < R; ++i) std::memcpy(dxf + rows[i] * C, dxr + i * C, C * sizeof(float));
  }

  // Final norm, every layer top down, then the embedding tables.
  std::vector<float>& dx = ws.dx;
  dx.assign(N * C, 0.0f);
  norm_backward_with_weights("lnf", dx.data(), dxf, ws.x.data(), gpt2 ? ws.lnf_mean.data() : nullptr,
                             ws.lnf_rstd.data(), N);
  for (int64_t l = c.layers - 1; l >= 0; --l) layer_backward_weights(l, a, ws.states[l], ws.sc, dx.data());
  embedding_backward_weights(grad_of("tok_emb"), gpt2 ? grad_of("pos_emb") : nullptr, dx.data(), a.ids, 0, 0,
                             B, T, C, nt);
  TrainStats st;
  st.loss = loss_sum / static_cast<double>(R);
  st.label_count = R;
  st.step = adam_step_;
  return st;
}

TrainStats Model::train_grads(const ForwardArgs& a,
                              std::vector<std::pair<std::string, std::vector<float>>>* copy) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  TrainStats st = train_grads_locked(a);
  if (copy)
    for (const auto& kv : slots_) copy->emplace_back(kv.first, kv.second.grad);
  return st;
}

std::vector<std::pair<std::string, std::vector<float>>> Model::copy_weights() {
  std::lock_guard<std::mutex> lock(run_mutex_);
  check_complete();
  std::vector<std::pair<std::string, std::vector<float>>> out;
  for (const auto& kv : slots_) out.emplace_back(kv.first, kv.second.data);
  return out;
}

Model::AdamState Model::copy_adam_state() {
  std::lock_guard<std::mutex> lock(run_mutex_);
  AdamState st;
  st.step = adam_step_;
  for (const auto& [name, s] : slots_)
    if (!s.adam_m.empty()) st.moments.emplace(name, std::make_pair(s.adam_m, s.adam_v));
  return st;
}

void Model::set_adam_state(const AdamState& state) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  if (state.step < 0) throw std::invalid_argument("optimizer state: step must be >= 0");
  for (const auto& [name, mv] : state.moments) {
    auto it = slots_.find(name);
    if (it == slots_.end())
      throw std::invalid_argument("optimizer state: no weight slot named '" + name + "'");
    const size_t n = it->second.data.size();
    if (mv.first.size() != n || mv.second.size() != n)
      throw std::invalid_argument("optimizer state: moments of '" + name + "' have " +
                                  std::to_string(mv.first.size()) + " / " + std::to_string(mv.second.size()) +
                                  " values, the slot " + std::to_string(n));
  }
  if (state.step > 0 && state.moments.size() != slots_.size())
    throw std::invalid_argument("optimizer state: " + std::to_string(state.moments.size()) + " of " +
                                std::to_string(slots_.size()) + " slots given for step " +
                                std::to_string(state.step));
  for (auto& [name, s] : slots_) {
    auto it = state.moments.find(name);
    if (it == state.moments.end()) {
      s.adam_m.clear();
      s.adam_v.clear();
    } else {
      s.adam_m = it->second.first;
      s.adam_v = it->second.second;
    }
  }
  adam_step_ = state.step;
  recount_host_bytes();
}

void check_adamw(const AdamWConfig& o) {
  if (!(o.lr >= 0.0f) || !std::isfinite(o.lr))
    throw std::invalid_argument("adamw.lr: expected a finite value >= 0");
  if (!(o.beta1 >= 0.0f && o.beta1 < 1.0f) || !(o.beta2 >= 0.0f && o.beta2 < 1.0f))
    throw std::invalid_argument("adamw.beta1, adamw.beta2: expected values in [0, 1)");
  if (!(o.eps > 0.0f)) throw std::invalid_argument("adamw.eps: expected a value > 0");
  if (!(o.weight_decay >= 0.0f)) throw std::invalid_argument("adamw.weightDecay: expected a value >= 0");
  if (!(o.max_grad_norm >= 0.0)) throw std::invalid_argument("adamw.maxGradNorm: expected a value >= 0");
}

TrainStats Model::train_step(const ForwardArgs& a, const AdamWConfig& o) {
  check_adamw(o);
  std::lock_guard<std::mutex> lock(run_mutex_);
  TrainStats st = train_grads_locked(a);
  const int nt = cfg_.threads;
  // Global gradient norm over every slot, in slot-name order (deterministic).
  double sq = 0.0;
  for (const auto& kv : slots_) sq += sum_squares(kv.second.grad, nt);
  st.grad_norm = std::sqrt(sq);
  if (!std::isfinite(st.grad_norm))
    throw std::runtime_error("training step: the gradient is not finite (loss " + std::to_string(st.loss) +
                             "); weights left unchanged");
  // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
  const double coef = o.max_grad_norm > 0.0 ? o.max_grad_norm / (st.grad_norm + 1e-6) : 1.0;
  ++adam_step_;
  for (auto& kv : slots_) {
    Slot& s = kv.second;
    const int64_t n = static_cast<int64_t>(s.data.size());
    if (s.adam_m.size() != s.data.size()) {
      s.adam_m.assign(n, 0.0f);
      s.adam_v.assign(n, 0.0f);
      recount_host_bytes();
    }
    const float wd = decays(kv.first) ? o.weight_decay : 0.0f;
    float* g = s.grad.data();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t len = std::min(kChunk, n - i0);
      if (coef < 1.0)
        for (int64_t i = i0; i < i0 + len; ++i) g[i] = static_cast<float>(g[i] * coef);
      adamw_step(s.data.data() + i0, g + i0, s.adam_m.data() + i0, s.adam_v.data() + i0, len, o.lr, o.beta1,
                 o.beta2, o.eps, wd, adam_step_);
    }
  }
  st.step = adam_step_;
  return st;
}

}  // namespace pt
