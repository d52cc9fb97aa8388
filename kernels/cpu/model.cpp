// The frozen model on the CPU: weight slots, loading with dtype conversion, and the forward pass.
// See priortune/model.h for the layout contract.
#include "priortune/model.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
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

size_t Model::weight_bytes() const {
  size_t n = 0;
  for (const auto& kv : slots_) n += kv.second.data.size() * sizeof(float);
  return n;
}

void Model::load_tensor(const std::string& target, int64_t row_offset, const std::string& file,
                        uint64_t offset, DType dtype, int64_t rows, int64_t cols, bool transpose) {
  auto it = slots_.find(target);
  if (it == slots_.end()) throw std::invalid_argument("load: no weight slot named '" + target + "'");
  Slot& s = it->second;
  if (cols != s.cols || row_offset < 0 || row_offset + rows > s.rows)
    throw std::invalid_argument("load: tensor for '" + target + "' from " + file + " has shape [" +
                                std::to_string(rows) + ", " + std::to_string(cols) + "] at row " +
                                std::to_string(row_offset) + ", which does not fit the slot's [" +
                                std::to_string(s.rows) + ", " + std::to_string(s.cols) + "]");
  if (s.data.empty()) s.data.assign(static_cast<size_t>(s.rows * s.cols), 0.0f);
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

ForwardResult Model::forward(const ForwardArgs& a) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  const ModelConfig& c = cfg_;
  const bool gpt2 = c.arch == Arch::GPT2;
  const int nt = c.threads;
  const int64_t B = a.B, T = a.T, P = a.P, S = P + T, N = B * S, C = c.hidden, V = c.vocab;
  const int64_t H = c.heads, KV = c.kv_heads, hd = c.head_dim, I = c.intermediate;
  const int64_t qkv_w = (H + 2 * KV) * hd, fc_w = gpt2 ? I : 2 * I;
  if (gpt2 && S > c.max_positions)
    throw std::out_of_range("sequence too long: prompt (" + std::to_string(P) + ") + seqLen (" +
                            std::to_string(T) + ") = " + std::to_string(S) + " exceeds the model's " +
                            std::to_string(c.max_positions) + " positions");

  // Key mask over the concatenated sequence: prompt rows always attended.
  std::vector<uint8_t> key_mask(N, 1);
  if (a.mask)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) key_mask[b * S + P + t] = a.mask[b * T + t] ? 1 : 0;

  ForwardResult res;
  std::vector<int> want_hidden(c.layers + 1, -1);
  for (size_t i = 0; i < a.hidden_indices.size(); ++i) want_hidden[a.hidden_indices[i]] = static_cast<int>(i);
  res.hidden.resize(a.hidden_indices.size());
  auto capture = [&](int index, const float* x) {
    if (want_hidden[index] >= 0) res.hidden[want_hidden[index]].assign(x, x + N * C);
  };

  std::vector<float> x(N * C), ln(N * C), qkv(N * qkv_w), probs(B * H * S * S), att(N * H * hd), tmp(N * C),
      fc(N * fc_w), act(gpt2 ? 0 : N * I);
  std::vector<float> rope_cos, rope_sin;
  if (!gpt2) rope_tables(0, S, rope_cos, rope_sin);
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(hd));

  embedding_forward(x.data(), a.ids, a.prompt, P, w("tok_emb"), gpt2 ? w("pos_emb") : nullptr, 0, B, T, C,
                    nt);
  capture(0, x.data());
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "l" + std::to_string(l) + ".";
    if (gpt2)
      layernorm_forward(ln.data(), nullptr, nullptr, x.data(), w(p + "ln1.w"), w(p + "ln1.b"), N, C,
                        c.norm_eps, nt);
    else
      rmsnorm_forward(ln.data(), nullptr, x.data(), w(p + "ln1.w"), N, C, c.norm_eps, nt);
    matmul_forward(qkv.data(), ln.data(), w(p + "qkv.w"), w_or_null(p + "qkv.b"), N, C, qkv_w, nt);
    if (!gpt2) {
      rope_forward(qkv.data(), B, S, qkv_w, 0, H, hd, rope_cos.data(), rope_sin.data(), nt);
      rope_forward(qkv.data(), B, S, qkv_w, H * hd, KV, hd, rope_cos.data(), rope_sin.data(), nt);
    }
    float scale = attn_scale;
    if (gpt2 && c.scale_attn_by_inverse_layer_idx) scale /= static_cast<float>(l + 1);
    attention_forward(att.data(), probs.data(), qkv.data(), key_mask.data(), nullptr, nullptr, 0, B, S, H, KV,
                      hd, scale, nt);
    matmul_forward(tmp.data(), att.data(), w(p + "proj.w"), w_or_null(p + "proj.b"), N, H * hd, C, nt);
    residual_forward(x.data(), x.data(), tmp.data(), N * C, nt);
    if (gpt2)
      layernorm_forward(ln.data(), nullptr, nullptr, x.data(), w(p + "ln2.w"), w(p + "ln2.b"), N, C,
                        c.norm_eps, nt);
    else
      rmsnorm_forward(ln.data(), nullptr, x.data(), w(p + "ln2.w"), N, C, c.norm_eps, nt);
    matmul_forward(fc.data(), ln.data(), w(p + "fc.w"), w_or_null(p + "fc.b"), N, C, fc_w, nt);
    float* hidden_act = fc.data();
    if (gpt2)
      gelu_forward(fc.data(), fc.data(), N * I, nt);
    else {
      swiglu_forward(act.data(), fc.data(), N, I, nt);
      hidden_act = act.data();
    }
    matmul_forward(tmp.data(), hidden_act, w(p + "fc2.w"), w_or_null(p + "fc2.b"), N, I, C, nt);
    residual_forward(x.data(), x.data(), tmp.data(), N * C, nt);
    if (l + 1 < c.layers) capture(static_cast<int>(l + 1), x.data());
  }
  if (gpt2)
    layernorm_forward(ln.data(), nullptr, nullptr, x.data(), w("lnf.w"), w("lnf.b"), N, C, c.norm_eps, nt);
  else
    rmsnorm_forward(ln.data(), nullptr, x.data(), w("lnf.w"), N, C, c.norm_eps, nt);
  capture(static_cast<int>(c.layers), ln.data());

  const float* head = c.tied_head ? w("tok_emb") : w("lm_head");
  if (a.want_logits || a.labels) {
    res.logits.resize(N * V);
    matmul_forward(res.logits.data(), ln.data(), head, nullptr, N, C, V, nt);
  }
  if (a.labels) {
    // Causal shift over the concatenated sequence: row (b, s) predicts token s + 1; prompt rows carry no
    // label.
    std::vector<int32_t> targets(N, -100);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s + 1 < S; ++s)
        if (s + 1 >= P) targets[b * S + s] = a.labels[b * T + s + 1 - P];
    std::vector<float> losses(N);
    res.label_count = crossentropy_forward(losses.data(), res.logits.data(), targets.data(), N, V, nt);
    double sum = 0.0;
    for (float v : losses) sum += v;
    res.loss = res.label_count > 0 ? sum / res.label_count : 0.0;
  }
  if (!a.want_logits) std::vector<float>().swap(res.logits);
  return res;
}

}  // namespace pt
