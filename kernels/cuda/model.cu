// The model on a CUDA device (see priortune/cuda_model.h): the prompt-tuning paths of kernels/cpu/model.cpp
// with the ops of priortune/cuda_ops.h, step for step, so the CPU model is the reference of every stage.
//
// Differences from the CPU path, all for the device:
//  - attention saves log-sum-exps instead of probabilities (flash style);
//  - the final norm, the LM head and the loss run on the labelled rows only (gathered first), and the final
//    norm's gradient is scattered back into the zeroed residual gradient;
//  - every per-call input (ids, per-layer key masks, labelled rows and targets, host prompts, the optimiser's
//    step numbers) is packed into one pinned host buffer and sent in one copy; the step itself is a fixed
//    sequence of launches on one stream, which is what a CUDA graph captures (the buffers' addresses are part
//    of the graph, so any reallocation bumps `generation_` and retires the graphs);
//  - every copy and memset goes on that stream too: it is non-blocking, so work on the legacy default stream
//    (cudaMemcpy, cudaMemset) would not be ordered with it (a pageable cudaMemcpy may return before its DMA).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.cuh"
#include "cublaslt.cuh"
#include "priortune/cuda_model.h"

namespace pt {
namespace {

using cuda::bf16_t;
using cuda::check;
using cuda::DeviceBuffer;
using cuda::GemmPrecision;
using cuda::Stream;

constexpr size_t kAlign = 256;  // byte alignment of every array in the packed inputs

// A weight matrix on the device: bf16 or fp32 ([rows, cols], PyTorch layout).
struct Mat {
  const void* p = nullptr;
  bool bf16 = false;
};

// What one layer keeps for its backward.
struct LayerState {
  int64_t S_l = 0, P_l = 0, Pp = 0;
  int deep_index = -1;  // index into the deep-prompt lists, or -1
  DeviceBuffer<float> x_in, mean1, rstd1, qkv, att, lse, x_mid, mean2, rstd2, fc_pre;
  DeviceBuffer<bf16_t> qkv16;  // qkv's bf16 copy, where the attention takes one (attention_bf16)
  bool has_qkv16 = false;      // the forward wrote it (the backward passes it only then)
};

// One call's inputs, packed for a single host-to-device copy, and the device addresses of each part.
struct Inputs {
  std::vector<uint8_t> host;
  template <class T>
  size_t put(const T* p, size_t n) {
    const size_t off = (host.size() + kAlign - 1) / kAlign * kAlign;
    host.resize(off + n * sizeof(T));
    if (n) std::memcpy(host.data() + off, p, n * sizeof(T));
    return off;
  }
};

struct GraphEntry {
  cudaGraphExec_t exec = nullptr;
  uint64_t generation = 0;        // generation_ the graph was captured at
  uint64_t eager_generation = 0;  // generation_ after the last eager run of this shape (0: none)
};

// Host-side plan of one call: shapes, per-layer deep-prompt layout, labelled rows, packed inputs.
struct Plan {
  int64_t B = 0, T = 0, P = 0, S = 0, N = 0, R = 0, pos0 = 0, lowest = 0;
  std::vector<int64_t> P_l, Pp;
  std::vector<int> deep_index;
  std::vector<int32_t> rows, targets;
  Inputs in;
  size_t off_ids = 0, off_rows = 0, off_targets = 0, off_prompt = 0, off_hyper = 0;
  std::vector<size_t> off_mask;                // per layer
  std::vector<size_t> off_deep_a, off_deep_b;  // hidden vectors, or prefix keys and values, when uploaded
  std::string key;
};

// One decoding step of generate()'s cached path: B rows, one per sequence, through every layer. Per layer:
// the key/value cache ([B, cap, 2 KV hd] rows: keys after RoPE, then values), where each row's key and value
// go (device rows b cap + slot) and how many cache rows it then attends (device), its RoPE positions (host).
struct Decode {
  std::vector<float*> cache;
  std::vector<int64_t> cap;
  std::vector<const int32_t*> rows, n;
  std::vector<std::vector<int64_t>> rope_pos;
};

class CudaModel final : public DeviceModel {
 public:
  CudaModel(const Model& host, const CudaModelOptions& o) : host_(host), cfg_(host.config()), opt_(o) {
    gpt2_ = cfg_.arch == Arch::GPT2;
    kind_ = gpt2_ ? cuda::NormKind::LayerNorm : cuda::NormKind::RMSNorm;
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    device_name_ = prop.name;
    host.check_complete();
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    try {
      upload(host);
    } catch (...) {  // no destructor runs for an object whose constructor threw (the buffers free themselves)
      cuda::retire_stream(stream_);
      throw;
    }
  }

  ~CudaModel() override {
    for (auto& m : marks_) cudaEventDestroy(m.second);
    for (auto& kv : graphs_)
      if (kv.second.exec) cudaGraphExecDestroy(kv.second.exec);
    if (pinned_) cudaFreeHost(pinned_);
    if (host_out_) cudaFreeHost(host_out_);
    cuda::retire_stream(stream_);  // also the cuBLASLt engine's plans for it (none unless it ran)
  }

  std::string precision() const override { return cuda::precision_name(opt_.precision); }

  std::vector<std::pair<std::string, double>> profile() override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::pair<std::string, double>> out(profile_ms_.begin(), profile_ms_.end());
    profile_ms_.clear();
    return out;
  }

  DeviceMemoryInfo memory() override {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceMemoryInfo m;
    m.weights = weight_bytes_;
    m.workspace = workspace_bytes();
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    check(cudaMemGetInfo(&m.device_free, &m.device_total), "cudaMemGetInfo");
    m.device = device_name_;
    return m;
  }

  ForwardResult forward(const ForwardArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return releasing_on_oom([&] { return forward_locked(a); });
  }
  ForwardResult forward_locked(const ForwardArgs& a) {
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    Plan pl = plan(a, false);
    upload_prompts(pl, a);
    send(pl);
    const Ptrs in = pointers(pl, a, false);
    const int64_t N = pl.N, C = cfg_.hidden, V = cfg_.vocab;
    ForwardResult res;
    std::vector<int> want(cfg_.layers + 1, -1);
    for (size_t i = 0; i < a.hidden_indices.size(); ++i) want[a.hidden_indices[i]] = static_cast<int>(i);
    res.hidden.resize(a.hidden_indices.size());
    auto keep = [&](int64_t index, const float* v) {
      if (want[index] < 0) return;
      std::vector<float>& h = res.hidden[want[index]];
      h.resize(N * C);
      check(cudaMemcpyAsync(h.data(), v, N * C * sizeof(float), cudaMemcpyDeviceToHost, stream_),
            "hidden state copy");
    };
    embed(pl, in);
    keep(0, x_.get());
    // Hidden states alone: the layers above the highest one asked for are not run, as on the CPU.
    const int64_t top = a.layers_to_run(cfg_.layers);
    for (int64_t l = 0; l < top; ++l) {
      layer_forward(l, pl, in, states_[0]);
      if (l + 1 < cfg_.layers) keep(l + 1, x_.get());
    }
    if (top < cfg_.layers) {
      sync("forward");
      return res;
    }
    need(xf_, N * C);
    need(lnf_mean_, N);
    need(lnf_rstd_, N);
    mark("norm forward");
    cuda::norm_forward(stream_, kind_, xf_.get(), lnf_mean_.get(), lnf_rstd_.get(), x_.get(), nullptr,
                       nullptr, f("lnf.w"), f_or_null("lnf.b"), N, C, cfg_.norm_eps);
    keep(cfg_.layers, xf_.get());
    if (a.want_logits) {
      res.logits.resize(N * V);
      const int64_t chunk = head_chunk_rows(N);
      need(logits_, chunk * V);
      for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        const int64_t rc = std::min(chunk, N - r0);
        gemm_nt(rc, V, C, xf_.get() + r0 * C, C, head(), logits_.get(), V, nullptr, 0.0f);
        check(cudaMemcpyAsync(res.logits.data() + r0 * V, logits_.get(), rc * V * sizeof(float),
                              cudaMemcpyDeviceToHost, stream_),
              "logits copy");
      }
    }
    if (a.labels) {
      res.label_count = pl.R;
      if (pl.R > 0) {
        need(xr_, pl.R * C);
        mark("gather, scatter, batch sums");
        cuda::gather_rows(stream_, xr_.get(), xf_.get(), in.rows, pl.R, C);
        head_loss(xr_.get(), in.targets, pl.R, nullptr, 0.0f);
        check(cudaMemcpyAsync(host_out_, loss_sum_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_),
              "loss copy");
      }
    }
    sync("forward");
    if (a.labels && pl.R > 0) res.loss = host_out_[0] / static_cast<double>(pl.R);
    return res;
  }

  std::vector<int32_t> generate(const ForwardArgs& a, int64_t max_new, int32_t eos) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return releasing_on_oom([&] { return generate_locked(a, max_new, eos); });
  }
  // Greedy decoding as pt::Model::generate. The first token comes from a forward over the sequences (prompts
  // and deep prompts in place, right padding masked): the final norm, the LM head and argmax_rows on each
  // sequence's last row only; the B ids come back to the host. Then, by default (PRIORTUNE_CUDA_GENERATE=
  // cache), each layer's keys (after RoPE) and values of that forward seed a cache of P_l + S + max_new rows
  // per sequence, freed when the call ends, and each new token runs the layers on B rows: its key and value
  // go to its sequence's next cache row (the padding there was never attended) and attention_decode reads the
  // prefix and the rows so far, as the CPU's decoding does. PRIORTUNE_CUDA_GENERATE=reforward instead runs
  // the whole forward again for each new token (no cache: max_new forwards), the path the cached one is
  // checked and timed against.
  std::vector<int32_t> generate_locked(const ForwardArgs& a, int64_t max_new, int32_t eos) {
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    const std::vector<int64_t> len = host_.generation_lengths(a, max_new);
    const char* mode = std::getenv("PRIORTUNE_CUDA_GENERATE");
    const std::string how = mode && *mode ? mode : "cache";
    if (how != "cache" && how != "reforward")
      throw std::invalid_argument("PRIORTUNE_CUDA_GENERATE: expected cache or reforward, got \"" + how +
                                  "\"");
    const bool cached = how == "cache" && max_new > 1;  // one new token: the prompt pass alone
    const ModelConfig& c = cfg_;
    const int64_t B = a.B, P = a.P, C = c.hidden, V = c.vocab, ld = logits_ld(), L = c.layers;
    const int64_t qkv_w = (c.heads + 2 * c.kv_heads) * c.head_dim, kvw = c.kv_heads * c.head_dim;
    const int64_t longest = *std::max_element(len.begin(), len.end());
    const int64_t width = longest + max_new - 1;  // token columns at the last step
    std::vector<int32_t> ids(B * width, 0), step_ids, rows(B), next(B), out(B * max_new, -1);
    std::vector<uint8_t> mask(B * width, 0), step_mask, done(B, 0);
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(a.ids + b * a.T, len[b], ids.begin() + b * width);
      std::fill(mask.begin() + b * width, mask.begin() + b * width + len[b], 1);
    }
    need(tokens_, B);
    // The cache path's state: the prefill's shape and per-layer deep rows, each layer's cache rows
    // ([B, cap, keys | values]), given back when the call ends however it ends (the workspace of the next
    // training step needs the room; not counted as growth: no graph reads it).
    Plan first;
    std::vector<int64_t> cap(L);
    struct CacheRelease {
      std::vector<DeviceBuffer<float>>& cache;
      cudaStream_t stream;
      ~CacheRelease() {
        cudaStreamSynchronize(stream);  // kernels queued before a failure may still use it
        cache.clear();
      }
    } release{kv_cache_, stream_};
    for (int64_t t = 0; t < max_new; ++t) {
      if (t == 0 || !cached) {
        // The prompt batch (no token yet, prompt rows only: one padded column); re-forwarding, every step at
        // the last step's width (the columns after each sequence's tokens masked): one shape, so that the
        // work buffers are sized once.
        const int64_t T = std::max<int64_t>(cached ? longest : width, 1), S = P + T;
        step_ids.assign(B * T, 0);
        step_mask.assign(B * T, 0);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t n = std::min(T, width);
          std::copy_n(ids.begin() + b * width, n, step_ids.begin() + b * T);
          std::copy_n(mask.begin() + b * width, n, step_mask.begin() + b * T);
          rows[b] = static_cast<int32_t>(b * S + P + len[b] + t - 1);  // the last row: prompt or token
        }
        ForwardArgs s = a;
        s.ids = step_ids.data();
        s.mask = step_mask.data();
        s.T = T;
        s.labels = nullptr;
        s.want_logits = false;
        s.hidden_indices.clear();
        Plan pl = plan(s, false, &rows);
        if (cached) {  // RoPE tables up to the last new token's position
          Plan reach = pl;
          reach.S += max_new;
          rope_for(reach);
        }
        upload_prompts(pl, s);
        send(pl);
        const Ptrs in = pointers(pl, s, false);
        embed(pl, in);
        if (cached && kv_cache_.size() < static_cast<size_t>(L)) kv_cache_.resize(L);
        for (int64_t l = 0; l < L; ++l) {
          layer_forward(l, pl, in, states_[0]);
          if (!cached) continue;
          const int64_t S_l = states_[0].S_l, H = c.heads, hd = c.head_dim;
          cap[l] = S_l + max_new;
          if (B * cap[l] > INT32_MAX / 4)  // attention_decode's bound on B x cap (int32 row indices)
            throw std::out_of_range("generation: " + std::to_string(B) + " sequences of " +
                                    std::to_string(cap[l]) + " positions are too many for the CUDA backend");
          kv_cache_[l].resize(static_cast<size_t>(B * cap[l] * 2 * kvw), "key/value cache");  // grows only
          mark("copies, memsets");
          for (int64_t b = 0; b < B; ++b)  // each sequence's S_l rows of keys and values
            check(cudaMemcpy2DAsync(kv_cache_[l].get() + b * cap[l] * 2 * kvw, 2 * kvw * sizeof(float),
                                    states_[0].qkv.get() + b * S_l * qkv_w + H * hd, qkv_w * sizeof(float),
                                    2 * kvw * sizeof(float), S_l, cudaMemcpyDeviceToDevice, stream_),
                  "key/value cache copy");
        }
        need(xr_in_, B * C);
        mark("gather, scatter, batch sums");
        cuda::gather_rows(stream_, xr_in_.get(), x_.get(), in.rows, B, C);
        if (t == 0) first = std::move(pl);
      } else {
        // Token t - 1 of each sequence at sequence row s_b = P + len[b] + t - 1 (GPT-2 position pos0 + s_b;
        // in layer l cache row and RoPE position P_l + s_b, RoPE's after pos0).
        ForwardArgs s = a;
        s.ids = next.data();
        s.mask = nullptr;
        s.T = 1;
        s.P = 0;
        s.prompt = nullptr;
        s.labels = nullptr;
        s.want_logits = false;
        s.hidden_indices.clear();
        if (s.deep.kind == DeepPrompts::Kind::Hidden) s.deep = DeepPrompts{};  // their rows are in the caches
        Plan pl = plan(s, false);
        upload_prompts(pl, s);
        Decode dec;
        dec.cache.resize(L);
        dec.cap = cap;
        dec.rope_pos.resize(L);
        std::vector<size_t> off_rows(L), off_n(L);
        for (int64_t l = 0; l < L; ++l) {
          std::vector<int32_t> r(B), n(B);
          for (int64_t b = 0; b < B; ++b) {
            const int64_t slot = first.P_l[l] + P + len[b] + t - 1;
            r[b] = static_cast<int32_t>(b * cap[l] + slot);
            n[b] = static_cast<int32_t>(slot + 1);
            dec.rope_pos[l].push_back(first.pos0 + slot);
          }
          off_rows[l] = pl.in.put(r.data(), r.size());
          off_n[l] = pl.in.put(n.data(), n.size());
          dec.cache[l] = kv_cache_[l].get();
        }
        send(pl);
        const Ptrs in = pointers(pl, s, false);
        for (int64_t l = 0; l < L; ++l) {
          dec.rows.push_back(reinterpret_cast<const int32_t*>(inputs_.get() + off_rows[l]));
          dec.n.push_back(reinterpret_cast<const int32_t*>(inputs_.get() + off_n[l]));
        }
        need(x_, B * C);
        mark("embedding");
        for (int64_t b = 0; b < B; ++b)
          cuda::embedding_forward(stream_, x_.get() + b * C, in.ids + b, nullptr, 0, f("tok_emb"),
                                  gpt2_ ? f("pos_emb") : nullptr, first.pos0 + P + len[b] + t - 1, 1, 1, C);
        for (int64_t l = 0; l < L; ++l) layer_forward(l, pl, in, states_[0], false, nullptr, &dec);
        need(xr_in_, B * C);
        mark("copies, memsets");
        check(
            cudaMemcpyAsync(xr_in_.get(), x_.get(), B * C * sizeof(float), cudaMemcpyDeviceToDevice, stream_),
            "decode rows copy");
      }
      // The final norm is per row: on the B last rows alone.
      need(xr_, B * C);
      need(lnf_mean_, B);
      need(lnf_rstd_, B);
      need(logits_, B * ld);
      mark("norm forward");
      cuda::norm_forward(stream_, kind_, xr_.get(), lnf_mean_.get(), lnf_rstd_.get(), xr_in_.get(), nullptr,
                         nullptr, f("lnf.w"), f_or_null("lnf.b"), B, C, cfg_.norm_eps);
      gemm_nt(B, V, C, xr_.get(), C, head(), logits_.get(), ld, nullptr, 0.0f);
      mark("argmax");
      cuda::argmax_rows(stream_, tokens_.get(), logits_.get(), ld, B, V);
      check(cudaMemcpyAsync(next.data(), tokens_.get(), B * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_),
            "token copy");
      sync("generate");
      if (take_tokens(next, t, max_new, eos, out, done) || t + 1 == max_new) break;
      // The new tokens go in after each sequence's last one (finished sequences too: their rows are not
      // read).
      for (int64_t b = 0; b < B; ++b)
        if (len[b] + t < width) {
          ids[b * width + len[b] + t] = next[b];
          mask[b * width + len[b] + t] = 1;
        }
    }
    return out;
  }

  GradResult loss_and_grad(const ForwardArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return releasing_on_oom([&] { return loss_and_grad_locked(a); });
  }
  GradResult loss_and_grad_locked(const ForwardArgs& a) {
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    if (!a.labels) throw std::invalid_argument("labels: required for lossAndGrad");
    Plan pl = plan(a, true);
    upload_prompts(pl, a);
    pl.key = "grad|" + pl.key;
    send(pl);
    const Ptrs in = pointers(pl, a, false);
    run_step(pl, [&] { grad_pass(pl, in); });
    check(cudaMemcpyAsync(host_out_, loss_sum_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_),
          "loss copy");
    GradResult g;
    g.label_count = pl.R;
    const int64_t C = cfg_.hidden, kvw = cfg_.kv_heads * cfg_.head_dim;
    auto fetch = [&](std::vector<float>& dst, const float* src, size_t n) {
      dst.resize(n);
      check(cudaMemcpyAsync(dst.data(), src, n * sizeof(float), cudaMemcpyDeviceToHost, stream_),
            "gradient copy");
    };
    if (a.P > 0) fetch(g.prompt_grad, gprompt_.get(), a.P * C);
    const size_t nd = a.deep.layers.size();
    if (a.deep.kind == DeepPrompts::Kind::Hidden) {
      g.deep_grads.resize(nd);
      for (size_t i = 0; i < nd; ++i) fetch(g.deep_grads[i], gdeep_a_[i].get(), a.deep.lengths[i] * C);
    } else if (a.deep.kind == DeepPrompts::Kind::Prefix) {
      g.key_grads.resize(nd);
      g.value_grads.resize(nd);
      for (size_t i = 0; i < nd; ++i) {
        fetch(g.key_grads[i], gdeep_a_[i].get(), a.deep.prefix_len * kvw);
        fetch(g.value_grads[i], gdeep_b_[i].get(), a.deep.prefix_len * kvw);
      }
    }
    sync("lossAndGrad");
    g.loss = host_out_[0] / static_cast<double>(pl.R);
    return g;
  }

  void set_trainables(const ForwardArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    check_trainable_shapes(a);
    const int64_t C = cfg_.hidden, kvw = cfg_.kv_heads * cfg_.head_dim;
    train_ = TrainState{};
    train_.P = a.P;
    train_.deep_kind = a.deep.kind;
    train_.layers = a.deep.layers;
    train_.lengths = a.deep.lengths;
    train_.prefix_len = a.deep.prefix_len;
    auto add = [&](const float* src, size_t n) {
      TrainTensor t;
      t.n = n;
      t.param.resize(n);
      t.m.resize(n);
      t.v.resize(n);
      check(cudaMemcpyAsync(t.param.get(), src, n * sizeof(float), cudaMemcpyHostToDevice, stream_),
            "trainable upload");
      mark("copies, memsets");
      check(cudaMemsetAsync(t.m.get(), 0, n * sizeof(float), stream_), "cudaMemsetAsync");
      mark("copies, memsets");
      check(cudaMemsetAsync(t.v.get(), 0, n * sizeof(float), stream_), "cudaMemsetAsync");
      train_.tensors.push_back(std::move(t));
    };
    if (a.P > 0) add(a.prompt, a.P * C);
    for (size_t i = 0; i < a.deep.layers.size(); ++i) {
      if (a.deep.kind == DeepPrompts::Kind::Hidden) add(a.deep.vectors[i], a.deep.lengths[i] * C);
      if (a.deep.kind == DeepPrompts::Kind::Prefix) {
        add(a.deep.keys[i], a.deep.prefix_len * kvw);
        add(a.deep.values[i], a.deep.prefix_len * kvw);
      }
    }
    if (train_.tensors.empty())
      throw std::invalid_argument("setTrainables: nothing to train (no prompt and no deepPrompts)");
    train_.ready = true;
    ++generation_;  // the trainables' addresses are new
  }

  PromptTensors trainables(Trainable which) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    if (!train_.ready) throw std::logic_error("no trainable prompt on the device: call setTrainables first");
    PromptTensors out;
    out.kind = train_.deep_kind;
    out.layers = train_.layers;
    size_t k = 0;
    auto get = [&](std::vector<float>& dst) {
      const TrainTensor& t = train_.tensors[k++];
      const DeviceBuffer<float>& src = which == Trainable::AdamM   ? t.m
                                       : which == Trainable::AdamV ? t.v
                                                                   : t.param;
      dst.resize(t.n);
      check(cudaMemcpyAsync(dst.data(), src.get(), t.n * sizeof(float), cudaMemcpyDeviceToHost, stream_),
            "trainable download");
    };
    if (train_.P > 0) get(out.prompt);
    const size_t nd = train_.layers.size();
    if (train_.deep_kind == DeepPrompts::Kind::Hidden) {
      out.deep.resize(nd);
      for (auto& d : out.deep) get(d);
    } else if (train_.deep_kind == DeepPrompts::Kind::Prefix) {
      out.keys.resize(nd);
      out.values.resize(nd);
      for (size_t i = 0; i < nd; ++i) {
        get(out.keys[i]);
        get(out.values[i]);
      }
    }
    return out;
  }

  int64_t optimizer_steps() override {
    std::lock_guard<std::mutex> lock(mutex_);
    return train_.ready ? train_.step : 0;
  }

  void set_optimizer_state(const ForwardArgs& m, const ForwardArgs& v, int64_t steps) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    if (!train_.ready) throw std::logic_error("no trainable prompt on the device: call setTrainables first");
    if (steps < 0) throw std::invalid_argument("optimizer state: step must be >= 0");
    for (const ForwardArgs* a : {&m, &v}) {  // both checked before either is uploaded
      check_trainable_shapes(*a);
      bool same = a->P == train_.P && a->deep.kind == train_.deep_kind && a->deep.layers == train_.layers;
      if (same && a->deep.kind == DeepPrompts::Kind::Hidden) same = a->deep.lengths == train_.lengths;
      if (same && a->deep.kind == DeepPrompts::Kind::Prefix) same = a->deep.prefix_len == train_.prefix_len;
      if (!same)
        throw std::invalid_argument(std::string("optimizer state ") + (a == &m ? "m" : "v") +
                                    ": its tensors do not match the trainables");
    }
    for (const ForwardArgs* a : {&m, &v}) {
      size_t k = 0;
      auto put = [&](const float* src) {
        TrainTensor& t = train_.tensors[k++];
        DeviceBuffer<float>& dst = a == &m ? t.m : t.v;
        check(cudaMemcpyAsync(dst.get(), src, t.n * sizeof(float), cudaMemcpyHostToDevice, stream_),
              "optimizer state upload");
      };
      if (a->P > 0) put(a->prompt);
      for (size_t i = 0; i < a->deep.layers.size(); ++i) {
        if (a->deep.kind == DeepPrompts::Kind::Hidden) put(a->deep.vectors[i]);
        if (a->deep.kind == DeepPrompts::Kind::Prefix) {
          put(a->deep.keys[i]);
          put(a->deep.values[i]);
        }
      }
    }
    // The host arrays may be freed when this returns.
    check(cudaStreamSynchronize(stream_), "optimizer state upload");
    train_.step = steps;
  }

  TrainStats prompt_step(const ForwardArgs& batch, const AdamWConfig& o) override {
    check_adamw(o);
    std::lock_guard<std::mutex> lock(mutex_);
    return releasing_on_oom([&] { return prompt_step_locked(batch, o); });
  }
  TrainStats prompt_step_locked(const ForwardArgs& batch, const AdamWConfig& o) {
    check(cudaSetDevice(0), "cudaSetDevice(0)");
    if (!train_.ready) throw std::logic_error("no trainable prompt on the device: call setTrainables first");
    if (!batch.labels) throw std::invalid_argument("labels: required for a training step");
    // The batch's shapes come from the resident trainables.
    ForwardArgs a = batch;
    a.P = train_.P;
    a.prompt = nullptr;
    a.deep = DeepPrompts{};
    a.deep.kind = train_.deep_kind;
    a.deep.layers = train_.layers;
    a.deep.lengths = train_.lengths;
    a.deep.prefix_len = train_.prefix_len;
    a.deep.vectors.assign(a.deep.layers.size(), nullptr);
    a.deep.keys.assign(a.deep.layers.size(), nullptr);
    a.deep.values.assign(a.deep.layers.size(), nullptr);
    Plan pl = plan(a, true);
    const int64_t t = train_.step + 1;
    const float hyper[4] = {o.lr, static_cast<float>(1.0 - std::pow(static_cast<double>(o.beta1), t)),
                            static_cast<float>(1.0 - std::pow(static_cast<double>(o.beta2), t)), 0.0f};
    pl.off_hyper = pl.in.put(hyper, 4);
    char opts[160];
    std::snprintf(opts, sizeof opts, "step|b1=%a b2=%a eps=%a wd=%a clip=%a|", o.beta1, o.beta2, o.eps,
                  o.weight_decay, o.max_grad_norm);
    pl.key = opts + pl.key;
    send(pl);
    const Ptrs in = pointers(pl, a, true);
    need(clip_, 1);
    need(gnorm_sq_, 1);
    run_step(pl, [&] {
      grad_pass(pl, in);
      // Global gradient norm over every trainable tensor (in order), clipping, AdamW.
      mark("optimizer");
      for (size_t i = 0; i < train_.tensors.size(); ++i)
        cuda::sum_squares_f64(stream_, gnorm_sq_.get(), grad_of_trainable(i),
                              static_cast<int64_t>(train_.tensors[i].n), i > 0);
      if (o.max_grad_norm > 0.0)
        cuda::clip_factor(stream_, clip_.get(), gnorm_sq_.get(), static_cast<float>(o.max_grad_norm));
      const float* hyper_dev = reinterpret_cast<const float*>(inputs_.get() + pl.off_hyper);
      for (size_t i = 0; i < train_.tensors.size(); ++i) {
        TrainTensor& tt = train_.tensors[i];
        cuda::adamw_step(stream_, tt.param.get(), grad_of_trainable(i), tt.m.get(), tt.v.get(),
                         static_cast<int64_t>(tt.n), hyper_dev, o.beta1, o.beta2, o.eps, o.weight_decay,
                         o.max_grad_norm > 0.0 ? clip_.get() : nullptr, gnorm_sq_.get());
      }
    });
    check(cudaMemcpyAsync(host_out_, loss_sum_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_),
          "loss copy");
    check(cudaMemcpyAsync(host_out_ + 1, gnorm_sq_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_),
          "gradient norm copy");
    sync("promptStep");
    // adamw_step wrote nothing when the norm is not finite: refuse the step as the CPU trainers do.
    if (!std::isfinite(host_out_[1])) {
      const double loss = host_out_[0] / static_cast<double>(pl.R);
      throw std::runtime_error("prompt step: the gradient is not finite (loss " +
                               (std::isnan(loss) ? std::string("NaN") : std::to_string(loss)) +
                               "); prompt and optimizer state left unchanged");
    }
    train_.step = t;
    TrainStats st;
    st.loss = host_out_[0] / static_cast<double>(pl.R);
    st.label_count = pl.R;
    st.grad_norm = std::sqrt(host_out_[1]);
    st.step = t;
    return st;
  }

 private:
  // The weights on the device (bf16 copies of the matrices at BF16) and the pinned result buffer.
  void upload(const Model& host) {
    const bool bf16 = opt_.precision == GemmPrecision::BF16;
    for (const std::string& name : host.slot_names()) {
      const Slot& s = host.slot(name);
      const bool matrix = name == "lm_head" || name.find(".qkv.w") != std::string::npos ||
                          name.find(".proj.w") != std::string::npos ||
                          name.find(".fc.w") != std::string::npos || name.find(".fc2.w") != std::string::npos;
      DeviceBuffer<float> d(s.data.size());
      check(cudaMemcpyAsync(d.get(), s.data.data(), s.data.size() * sizeof(float), cudaMemcpyHostToDevice,
                            stream_),
            "weight upload");
      weight_bytes_ += d.bytes();
      const bool tied_table = name == "tok_emb" && cfg_.tied_head;
      if (bf16 && (matrix || tied_table)) {
        DeviceBuffer<bf16_t> h(s.data.size());
        cuda::to_bf16(stream_, h.get(), d.get(), static_cast<int64_t>(s.data.size()));
        check(cudaStreamSynchronize(stream_), "weight conversion to bf16");
        weight_bytes_ += h.bytes();
        h16_.emplace(name, std::move(h));
        if (matrix) {  // only the bf16 copy is kept
          weight_bytes_ -= d.bytes();
          continue;
        }
      }
      f32_.emplace(name, std::move(d));
    }
    check(cudaMallocHost(reinterpret_cast<void**>(&host_out_), 4 * sizeof(double)), "cudaMallocHost");
  }

  struct Ptrs {
    const int32_t* ids = nullptr;
    const int32_t* rows = nullptr;
    const int32_t* targets = nullptr;
    const float* prompt = nullptr;
    std::vector<const uint8_t*> mask;          // per layer
    std::vector<const float*> deep_a, deep_b;  // per deep index
  };
  struct TrainTensor {
    size_t n = 0;
    DeviceBuffer<float> param, m, v;
  };
  struct TrainState {
    bool ready = false;
    int64_t P = 0, prefix_len = 0, step = 0;
    DeepPrompts::Kind deep_kind = DeepPrompts::Kind::None;
    std::vector<int> layers;
    std::vector<int64_t> lengths;
    std::vector<TrainTensor> tensors;  // prompt, then per deep layer (hidden: vectors; prefix: keys, values)
  };

  // ---- small helpers ----
  const float* f(const std::string& name) const {
    auto it = f32_.find(name);
    if (it == f32_.end()) throw std::logic_error("CUDA model: no fp32 weight '" + name + "'");
    return it->second.get();
  }
  const float* f_or_null(const std::string& name) const {
    auto it = f32_.find(name);
    return it == f32_.end() ? nullptr : it->second.get();
  }
  Mat mat(const std::string& name) const {
    auto h = h16_.find(name);
    if (h != h16_.end()) return {h->second.get(), true};
    return {f(name), false};
  }
  Mat head() const { return mat(cfg_.tied_head ? "tok_emb" : "lm_head"); }

  template <class T>
  void need(DeviceBuffer<T>& b, int64_t n) {
    if (static_cast<size_t>(n) > b.size()) {
      b.resize(static_cast<size_t>(n));
      ++generation_;
    }
  }
  // Every workspace buffer (activations, scratch, inputs, gradients, rope tables): not the weights, not the
  // trainables.
  template <class F>
  void for_each_workspace(F&& f) {
    for (DeviceBuffer<float>* b :
         {&x_,      &xf_,   &lnf_mean_,     &lnf_rstd_, &xr_in_,    &xr_,      &dxr_,  &dxr_in_, &logits_,
          &losses_, &dx_,   &ln_,           &tmp_,      &act_,      &dmid_,    &dact_, &dfc_,    &dln_,
          &datt_,   &dqkv_, &attn_scratch_, &rope_cos_, &rope_sin_, &gprompt_, &clip_, &gemm_ws_})
      f(*b);
    f(loss_sum_);
    f(gnorm_sq_);
    f(tokens_);
    f(inputs_);
    f(a16_);
    f(prefix16_);
    f(datt16_);
    f(act16_);
    for (LayerState& s : states_) {
      f(s.qkv16);
      for (DeviceBuffer<float>* b :
           {&s.x_in, &s.mean1, &s.rstd1, &s.qkv, &s.att, &s.lse, &s.x_mid, &s.mean2, &s.rstd2, &s.fc_pre})
        f(*b);
    }
    for (auto& b : gdeep_a_) f(b);
    for (auto& b : gdeep_b_) f(b);
    for (auto& b : kv_cache_) f(b);
  }
  size_t workspace_bytes() {
    size_t n = 0;
    for_each_workspace([&](const auto& b) { n += b.bytes(); });
    for (const auto& t : train_.tensors) n += t.param.bytes() + t.m.bytes() + t.v.bytes();
    return n;
  }
  // Runs a call's body (the lock held); out of memory releases the workspace before the error goes up.
  template <class F>
  auto releasing_on_oom(F&& body) -> decltype(body()) {
    try {
      return body();
    } catch (const cuda::OutOfMemory&) {
      release_workspace();
      throw;
    }
  }
  // After an out-of-memory failure: the buffers a call grows stage by stage are given back (the failed call
  // may have grown several before one did not fit), with the graphs that point at them, so that the model's
  // device memory is its weights and trainables again and a smaller batch can follow.
  void release_workspace() {
    cudaStreamSynchronize(stream_);  // kernels queued before the failure may still use the buffers
    cudaGetLastError();
    for_each_workspace([](auto& b) { b.release(); });
    rope_positions_ = 0;
    for (auto& entry : graphs_)
      if (entry.second.exec) cudaGraphExecDestroy(entry.second.exec);
    graphs_.clear();
    ++generation_;
  }
  void sync(const char* what) {
    mark(nullptr);
    cudaError_t e = cudaStreamSynchronize(stream_);
    if (e != cudaSuccess)
      check(e, (std::string(what) + " on the device (a failed kernel leaves the CUDA context unusable; "
                                    "dispose the model and load it again)")
                   .c_str());
    flush_marks();
  }
  // Profiling (CudaModelOptions::profile): an event before each stage; the time to the next event is the
  // stage's. nullptr closes the last stage. Off: nothing is recorded.
  void mark(const char* stage) {
    if (!opt_.profile || (marks_.empty() && !stage)) return;
    cudaEvent_t ev = nullptr;
    check(cudaEventCreate(&ev), "cudaEventCreate");
    marks_.emplace_back(stage, ev);
    check(cudaEventRecord(ev, stream_), "cudaEventRecord");
  }
  void flush_marks() {
    for (size_t i = 0; i + 1 < marks_.size(); ++i) {
      float ms = 0.0f;
      if (marks_[i].first && cudaEventElapsedTime(&ms, marks_[i].second, marks_[i + 1].second) == cudaSuccess)
        profile_ms_[marks_[i].first] += ms;
    }
    for (auto& m : marks_) cudaEventDestroy(m.second);
    marks_.clear();
  }
  // Logits rows are padded to a multiple of 8 floats (32 bytes): the LM head backward reads them as its A
  // operand, and the GEMM's fast path wants 16-byte aligned rows (an odd vocabulary such as GPT-2's 50257
  // would send every k-step of that GEMM down the bounds-checked path).
  int64_t logits_ld() const { return (cfg_.vocab + 7) / 8 * 8; }
  // Rows of logits per chunk: bounded to 1 GiB, and large enough that the LM head backward (M = chunk rows,
  // N = hidden) has a few hundred 128 x 128 tiles to spread over the SMs.
  int64_t head_chunk_rows(int64_t R) const {
    const int64_t budget = (int64_t{1} << 30) / static_cast<int64_t>(sizeof(float));
    return std::max<int64_t>(1, std::min<int64_t>(R, budget / logits_ld()));
  }

  // Under BF16 with bf16 weights the activation operand is converted to bf16 first (one pass at memory
  // speed into a16_, reused by every product: the stream orders them), so that the product takes the
  // cp.async-pipelined kernel instead of converting A again for every column tile of the output.
  bool bf16_operand(Mat W) const { return opt_.precision == GemmPrecision::BF16 && W.bf16; }
  const void* gemm_a(const float* A, int64_t lda, int64_t M, int64_t K, Mat W, bool* a_bf16) {
    *a_bf16 = bf16_operand(W);
    if (!*a_bf16) return A;
    const int64_t n = (M - 1) * lda + K;
    need(a16_, n);
    cuda::to_bf16(stream_, a16_.get(), A, n);
    return a16_.get();
  }
  // Every product goes through here: with the split-K workspace it may use (PRIORTUNE_CUDA_GEMM_SPLITK=1;
  // grown before the product is queued, so never while one that uses it is in flight); c16 (ldc == N): also
  // a bf16 copy of the output, of GELU of it, or of GELU's gradient at aux (cuda::gemm's Out16Op).
  void product(bool nt, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, bool a_bf16, Mat W,
               float* C, int64_t ldc, const float* bias, float beta, bf16_t* c16 = nullptr,
               cuda::Out16Op op = cuda::Out16Op::Copy, const float* aux = nullptr) {
    const int64_t ws = cuda::gemm_workspace_floats(opt_.precision, M, N, K);
    if (ws > 0) need(gemm_ws_, ws);
    cuda::gemm(stream_, opt_.precision, nt, M, N, K, A, lda, a_bf16, W.p, nt ? K : N, W.bf16, C, ldc, bias,
               beta, ws > 0 ? gemm_ws_.get() : nullptr, ws, c16, op, aux);
  }
  void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, Mat W, float* C, int64_t ldc,
               const float* bias, float beta, bf16_t* c16 = nullptr, cuda::Out16Op op = cuda::Out16Op::Copy) {
    mark("gemm x W^T (forward, LM head)");
    bool a_bf16 = false;
    const void* a = gemm_a(A, lda, M, K, W, &a_bf16);
    product(true, M, N, K, a, lda, a_bf16, W, C, ldc, bias, beta, c16, op);
  }
  // The same with A already bf16 (bf16_operand(W) holds).
  void gemm_nt_bf16(int64_t M, int64_t N, int64_t K, const bf16_t* A, int64_t lda, Mat W, float* C,
                    int64_t ldc, const float* bias, bf16_t* c16 = nullptr,
                    cuda::Out16Op op = cuda::Out16Op::Copy) {
    mark("gemm x W^T (forward, LM head)");
    product(true, M, N, K, A, lda, true, W, C, ldc, bias, 0.0f, c16, op);
  }
  // C[M, N] = A[M, K] . W with A already bf16 (bf16_operand(W) holds).
  void gemm_nn_bf16(int64_t M, int64_t N, int64_t K, const bf16_t* A, int64_t lda, Mat W, float* C,
                    int64_t ldc, bf16_t* c16 = nullptr, cuda::Out16Op op = cuda::Out16Op::Copy,
                    const float* aux = nullptr) {
    mark("gemm dY W (input gradients)");
    product(false, M, N, K, A, lda, true, W, C, ldc, nullptr, 0.0f, c16, op, aux);
  }
  // C[M, N] = A[M, K] . W where W is [K, N] (a weight [out = K, in = N]: the input gradient of a linear
  // layer).
  void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, Mat W, float* C, int64_t ldc,
               float beta, bf16_t* c16 = nullptr, cuda::Out16Op op = cuda::Out16Op::Copy,
               const float* aux = nullptr) {
    mark("gemm dY W (input gradients)");
    bool a_bf16 = false;
    const void* a = gemm_a(A, lda, M, K, W, &a_bf16);
    product(false, M, N, K, a, lda, a_bf16, W, C, ldc, nullptr, beta, c16, op, aux);
  }

  // out[N, Nout] = norm(x (+ residual, also written to x_sum)) . W^T (+ bias), norm `name` (its .w, .b), its
  // statistics to mean (LayerNorm) and rstd: under BF16 the norm writes the product's bf16 operand itself
  // (the same RN-even values the conversion pass would give), else its fp32 output goes through gemm_nt.
  // out16 (optional): also out's bf16 copy, of GELU of out with Out16Op::Gelu (product's c16).
  void norm_then_gemm(int64_t N, int64_t Nout, int64_t C, const float* x, const float* residual, float* x_sum,
                      const std::string& name, float* mean, float* rstd, Mat W, float* out, const float* bias,
                      bf16_t* out16 = nullptr, cuda::Out16Op op = cuda::Out16Op::Copy) {
    const float* w = f(name + ".w");
    const float* b = f_or_null(name + ".b");
    if (bf16_operand(W)) {
      need(a16_, N * C);
      mark("norm forward");
      cuda::norm_forward(stream_, kind_, a16_.get(), mean, rstd, x, residual, x_sum, w, b, N, C,
                         cfg_.norm_eps);
      gemm_nt_bf16(N, Nout, C, a16_.get(), C, W, out, Nout, bias, out16, op);
    } else {
      need(ln_, N * C);
      mark("norm forward");
      cuda::norm_forward(stream_, kind_, ln_.get(), mean, rstd, x, residual, x_sum, w, b, N, C,
                         cfg_.norm_eps);
      gemm_nt(N, Nout, C, ln_.get(), C, W, out, Nout, bias, 0.0f, out16, op);
    }
  }

  // The MLP's activation of fc's output fc_pre [N, fc width] (GELU, or SwiGLU of [gate | up]) into out
  // [N, I], and its gradient into dfc [N, fc width]: fp32, or bf16 (O = bf16_t) where a BF16 product is the
  // only reader.
  template <class O>
  void mlp_activation(O* out, const float* fc_pre, int64_t N, int64_t I) {
    mark("activation");
    if (gpt2_)
      cuda::gelu_forward(stream_, out, fc_pre, N * I);
    else
      cuda::swiglu_forward(stream_, out, fc_pre, N, I);
  }
  template <class O>
  void mlp_activation_backward(O* dfc, const float* fc_pre, const float* dact, int64_t N, int64_t I) {
    mark("activation");
    if (gpt2_)
      cuda::gelu_backward(stream_, dfc, fc_pre, dact, N * I);
    else
      cuda::swiglu_backward(stream_, dfc, fc_pre, dact, N, I);
  }

  cuda::AttentionPrecision attention_precision() const {
    return opt_.precision == GemmPrecision::BF16 ? cuda::AttentionPrecision::BF16
                                                 : cuda::AttentionPrecision::FP32;
  }
  // Whether the attention takes bf16 copies of its operands now (PRIORTUNE_CUDA_ATTN=bf16): the forward then
  // keeps qkv's copy in its state, proj's input-gradient product writes dout's, and each attention call
  // converts the prefixes before it (attention_operands).
  bool attention_bf16() const {
    return cuda::attention_takes_bf16_operands(attention_precision(), cfg_.head_dim);
  }
  // The copies of layer state st's attention: its qkv16, the prefix keys and values (pk, pv; converted here
  // into prefix16_) and dout16 (the backward's, or null).
  cuda::AttentionBf16Operands attention_operands(LayerState& st, const float* pk, const float* pv,
                                                 const bf16_t* dout16) {
    cuda::AttentionBf16Operands ops;
    ops.qkv = st.qkv16.get();
    ops.dout = dout16;
    if (st.Pp) {
      const int64_t n = st.Pp * cfg_.kv_heads * cfg_.head_dim,
                    n16 = (n + 7) / 8 * 8;  // 16-byte aligned halves
      need(prefix16_, 2 * n16);
      cuda::to_bf16(stream_, prefix16_.get(), pk, n);
      cuda::to_bf16(stream_, prefix16_.get() + n16, pv, n);
      ops.prefix_k = prefix16_.get();
      ops.prefix_v = prefix16_.get() + n16;
    }
    return ops;
  }

  // ---- planning and inputs ----
  void check_trainable_shapes(const ForwardArgs& a) const {
    host_.check_args(a);
    if (a.P == 0 && a.deep.kind == DeepPrompts::Kind::None)
      throw std::invalid_argument("nothing to train (no prompt and no deepPrompts)");
  }

  // `rows` (generation): the rows whose logits are wanted, in place of labelled rows (no targets).
  Plan plan(const ForwardArgs& a, bool grads, const std::vector<int32_t>* rows = nullptr) {
    host_.check_args(a);
    const ModelConfig& c = cfg_;
    Plan pl;
    pl.B = a.B, pl.T = a.T, pl.P = a.P, pl.S = a.P + a.T, pl.N = pl.B * pl.S;
    pl.pos0 = a.deep.kind == DeepPrompts::Kind::Prefix ? a.deep.prefix_len : 0;
    pl.P_l.assign(c.layers, 0);
    pl.Pp.assign(c.layers, 0);
    pl.deep_index.assign(c.layers, -1);
    for (size_t i = 0; i < a.deep.layers.size(); ++i) {
      const int l = a.deep.layers[i];
      pl.deep_index[l] = static_cast<int>(i);
      if (a.deep.kind == DeepPrompts::Kind::Hidden) pl.P_l[l] = a.deep.lengths[i];
      if (a.deep.kind == DeepPrompts::Kind::Prefix) pl.Pp[l] = a.deep.prefix_len;
    }
    pl.lowest = a.P > 0 ? 0 : c.layers;
    for (int l : a.deep.layers) pl.lowest = std::min<int64_t>(pl.lowest, l);
    if (grads && pl.lowest == c.layers)
      throw std::invalid_argument("lossAndGrad: nothing to train (no prompt and no deepPrompts)");
    // Labelled rows after the causal shift.
    if (a.labels) {
      const std::vector<int32_t> t = shifted_targets(a);
      for (int64_t r = 0; r < pl.N; ++r)
        if (t[r] >= 0) {
          pl.rows.push_back(static_cast<int32_t>(r));
          pl.targets.push_back(t[r]);
        }
      pl.R = static_cast<int64_t>(pl.rows.size());
      if (grads && pl.R == 0)
        throw std::invalid_argument("labels: no labelled position (all -100 after the causal shift)");
    }
    if (rows) {
      pl.rows = *rows;
      pl.R = static_cast<int64_t>(pl.rows.size());
    }
    if (pl.N > INT32_MAX) throw std::out_of_range("batch x sequence is too large for the CUDA backend");
    // Inputs: ids, per-layer key masks (deep rows always attended), labelled rows and their targets.
    pl.off_ids = pl.in.put(a.ids, pl.B * pl.T);
    std::vector<uint8_t> km(pl.N, 1);
    if (a.mask)
      for (int64_t b = 0; b < pl.B; ++b)
        for (int64_t t = 0; t < pl.T; ++t) km[b * pl.S + pl.P + t] = a.mask[b * pl.T + t] ? 1 : 0;
    pl.off_mask.resize(c.layers);
    std::map<int64_t, size_t> by_len;  // one mask per distinct deep length
    for (int64_t l = 0; l < c.layers; ++l) {
      auto it = by_len.find(pl.P_l[l]);
      if (it != by_len.end()) {
        pl.off_mask[l] = it->second;
        continue;
      }
      const int64_t Pl = pl.P_l[l], Sl = pl.S + Pl;
      std::vector<uint8_t> m(pl.B * Sl, 1);
      for (int64_t b = 0; b < pl.B; ++b) std::memcpy(m.data() + b * Sl + Pl, km.data() + b * pl.S, pl.S);
      pl.off_mask[l] = by_len[Pl] = pl.in.put(m.data(), m.size());
    }
    pl.off_rows = pl.in.put(pl.rows.data(), pl.rows.size());
    pl.off_targets = pl.in.put(pl.targets.data(), pl.targets.size());
    // The shape key of a training step's graph.
    std::string key = "B=" + std::to_string(pl.B) + " T=" + std::to_string(pl.T) +
                      " P=" + std::to_string(pl.P) + " R=" + std::to_string(pl.R) +
                      " kind=" + std::to_string(static_cast<int>(a.deep.kind)) +
                      " Pp=" + std::to_string(a.deep.prefix_len) + " layers=";
    for (size_t i = 0; i < a.deep.layers.size(); ++i)
      key += std::to_string(a.deep.layers[i]) + ":" +
             std::to_string(i < a.deep.lengths.size() ? a.deep.lengths[i] : 0) + ",";
    pl.key = key + " switches=" + cuda::kernel_switches();
    return pl;
  }

  // Host prompts (forward, lossAndGrad) travel with the inputs.
  void upload_prompts(Plan& pl, const ForwardArgs& a) {
    const int64_t C = cfg_.hidden, kvw = cfg_.kv_heads * cfg_.head_dim;
    if (a.P > 0) pl.off_prompt = pl.in.put(a.prompt, a.P * C);
    for (size_t i = 0; i < a.deep.layers.size(); ++i) {
      if (a.deep.kind == DeepPrompts::Kind::Hidden) {
        pl.off_deep_a.push_back(pl.in.put(a.deep.vectors[i], a.deep.lengths[i] * C));
        pl.off_deep_b.push_back(0);
      } else {
        pl.off_deep_a.push_back(pl.in.put(a.deep.keys[i], a.deep.prefix_len * kvw));
        pl.off_deep_b.push_back(pl.in.put(a.deep.values[i], a.deep.prefix_len * kvw));
      }
    }
  }

  // One host-to-device copy of the packed inputs (through pinned memory).
  void send(const Plan& pl) {
    // The previous call's upload may still read the staging buffer when that call failed before its final
    // synchronisation: wait for the stream (a no-op after a normal call).
    check(cudaStreamSynchronize(stream_), "stream synchronisation");
    const size_t n = std::max<size_t>(pl.in.host.size(), 1);
    if (n > pinned_size_) {
      if (pinned_) cudaFreeHost(pinned_);
      pinned_ = nullptr;
      pinned_size_ = 0;
      check(cudaMallocHost(reinterpret_cast<void**>(&pinned_), n), "cudaMallocHost (input staging)");
      pinned_size_ = n;
    }
    need(inputs_, static_cast<int64_t>(n));
    std::memcpy(pinned_, pl.in.host.data(), pl.in.host.size());
    check(cudaMemcpyAsync(inputs_.get(), pinned_, pl.in.host.size(), cudaMemcpyHostToDevice, stream_),
          "input copy");
  }

  Ptrs pointers(const Plan& pl, const ForwardArgs& a, bool resident) {
    const uint8_t* base = inputs_.get();
    Ptrs p;
    p.ids = reinterpret_cast<const int32_t*>(base + pl.off_ids);
    p.rows = reinterpret_cast<const int32_t*>(base + pl.off_rows);
    p.targets = reinterpret_cast<const int32_t*>(base + pl.off_targets);
    for (int64_t l = 0; l < cfg_.layers; ++l) p.mask.push_back(base + pl.off_mask[l]);
    const size_t nd = a.deep.layers.size();
    if (resident) {
      size_t k = 0;
      if (a.P > 0) p.prompt = train_.tensors[k++].param.get();
      for (size_t i = 0; i < nd; ++i) {
        p.deep_a.push_back(train_.tensors[k++].param.get());
        p.deep_b.push_back(a.deep.kind == DeepPrompts::Kind::Prefix ? train_.tensors[k++].param.get()
                                                                    : nullptr);
      }
    } else {
      if (a.P > 0) p.prompt = reinterpret_cast<const float*>(base + pl.off_prompt);
      for (size_t i = 0; i < nd; ++i) {
        p.deep_a.push_back(reinterpret_cast<const float*>(base + pl.off_deep_a[i]));
        p.deep_b.push_back(a.deep.kind == DeepPrompts::Kind::Prefix
                               ? reinterpret_cast<const float*>(base + pl.off_deep_b[i])
                               : nullptr);
      }
    }
    // Gradient buffers of the deep prompts.
    if (gdeep_a_.size() < nd) {
      gdeep_a_.resize(nd);
      gdeep_b_.resize(nd);
    }
    const int64_t C = cfg_.hidden, kvw = cfg_.kv_heads * cfg_.head_dim;
    for (size_t i = 0; i < nd; ++i) {
      if (a.deep.kind == DeepPrompts::Kind::Hidden) need(gdeep_a_[i], a.deep.lengths[i] * C);
      if (a.deep.kind == DeepPrompts::Kind::Prefix) {
        need(gdeep_a_[i], a.deep.prefix_len * kvw);
        need(gdeep_b_[i], a.deep.prefix_len * kvw);
      }
    }
    if (a.P > 0) need(gprompt_, a.P * C);
    rope_for(pl);
    return p;
  }

  const float* grad_of_trainable(size_t i) const {
    size_t k = 0;
    if (train_.P > 0) {
      if (i == 0) return gprompt_.get();
      k = 1;
    }
    const size_t j = i - k;
    if (train_.deep_kind == DeepPrompts::Kind::Prefix)
      return (j % 2 == 0 ? gdeep_a_[j / 2] : gdeep_b_[j / 2]).get();
    return gdeep_a_[j].get();
  }

  // RoPE tables by absolute position, [positions, hd/2], from the host model's inverse frequencies in double.
  void rope_for(const Plan& pl) {
    if (gpt2_) return;
    int64_t S_max = pl.S;
    for (int64_t v : pl.P_l) S_max = std::max(S_max, pl.S + v);
    const int64_t need_pos = pl.pos0 + S_max, half = cfg_.head_dim / 2;
    if (need_pos <= rope_positions_) return;
    const int64_t n = std::max<int64_t>(need_pos, 2 * rope_positions_);
    const std::vector<double>& inv = host_.inv_freq();
    std::vector<float> cs(n * half), sn(n * half);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double ang = static_cast<double>(p) * inv[i];
        cs[p * half + i] = static_cast<float>(std::cos(ang));
        sn[p * half + i] = static_cast<float>(std::sin(ang));
      }
    check(cudaStreamSynchronize(stream_), "stream synchronisation");
    rope_cos_ = DeviceBuffer<float>(cs.size());
    rope_sin_ = DeviceBuffer<float>(sn.size());
    check(cudaMemcpyAsync(rope_cos_.get(), cs.data(), cs.size() * sizeof(float), cudaMemcpyHostToDevice,
                          stream_),
          "rope upload");
    check(cudaMemcpyAsync(rope_sin_.get(), sn.data(), sn.size() * sizeof(float), cudaMemcpyHostToDevice,
                          stream_),
          "rope upload");
    rope_positions_ = n;
    ++generation_;
  }

  // ---- the passes ----
  // The embedded rows [B, S, C] into dst (x_ when null).
  void embed(const Plan& pl, const Ptrs& in, float* dst = nullptr) {
    const int64_t C = cfg_.hidden;
    need(x_, pl.N * C);
    if (states_.size() < static_cast<size_t>(cfg_.layers)) states_.resize(cfg_.layers);
    mark("embedding");
    cuda::embedding_forward(stream_, dst ? dst : x_.get(), in.ids, in.prompt, pl.P, f("tok_emb"),
                            gpt2_ ? f("pos_emb") : nullptr, pl.pos0, pl.B, pl.T, C);
  }

  // Layer l on x_ ([B, S, C]) into x_, with its saved state in st. grad_pass chains layers without deep rows
  // through their states instead: input_ready says st.x_in holds the input already (the layer below, or the
  // embedding, wrote it there), and out (when not null) takes the output rows in x_'s layout.
  // With `dec` (generate's cached path) the rows are B single tokens (pl: T = 1, no prompt, no deep rows):
  // each row's RoPE is at its own position, its key and value go into the layer's cache, and
  // attention_decode reads the cache.
  void layer_forward(int64_t l, const Plan& pl, const Ptrs& in, LayerState& st, bool input_ready = false,
                     float* out = nullptr, const Decode* dec = nullptr) {
    const ModelConfig& c = cfg_;
    const int64_t B = pl.B, S = pl.S, C = c.hidden, H = c.heads, KV = c.kv_heads, hd = c.head_dim,
                  I = c.intermediate;
    const int64_t qkv_w = (H + 2 * KV) * hd, fc_w = gpt2_ ? I : 2 * I;
    const std::string p = "l" + std::to_string(l) + ".";
    st.P_l = pl.P_l[l];
    st.Pp = pl.Pp[l];
    st.deep_index = pl.deep_index[l];
    const int64_t P_l = st.P_l, S_l = S + P_l, N_l = B * S_l;
    st.S_l = S_l;
    const float* pk = st.Pp ? in.deep_a[st.deep_index] : nullptr;
    const float* pv = st.Pp ? in.deep_b[st.deep_index] : nullptr;
    if (!out) out = x_.get();
    // Layer input: the deep rows in front of each sequence.
    need(st.x_in, N_l * C);
    if (!input_ready) {
      if (P_l) {
        const float* deep = in.deep_a[st.deep_index];
        for (int64_t b = 0; b < B; ++b)
          check(cudaMemcpyAsync(st.x_in.get() + b * S_l * C, deep, P_l * C * sizeof(float),
                                cudaMemcpyDeviceToDevice, stream_),
                "deep rows copy");
      }
      mark("copies, memsets");
      check(
          cudaMemcpy2DAsync(st.x_in.get() + P_l * C, S_l * C * sizeof(float), x_.get(), S * C * sizeof(float),
                            S * C * sizeof(float), B, cudaMemcpyDeviceToDevice, stream_),
          "layer input copy");
    }
    need(st.mean1, N_l);
    need(st.rstd1, N_l);
    need(st.qkv, N_l * qkv_w);
    // The attention's bf16 copy of qkv (attention_bf16): GPT-2's comes with the product (no RoPE after it).
    st.has_qkv16 = attention_bf16() && !dec;
    if (st.has_qkv16) need(st.qkv16, N_l * qkv_w);
    // The norms' outputs have one reader, the next product: under BF16 they are written as its bf16 operand.
    norm_then_gemm(N_l, qkv_w, C, st.x_in.get(), nullptr, nullptr, p + "ln1",
                   gpt2_ ? st.mean1.get() : nullptr, st.rstd1.get(), mat(p + "qkv.w"), st.qkv.get(),
                   f_or_null(p + "qkv.b"), gpt2_ && st.has_qkv16 ? st.qkv16.get() : nullptr);
    if (!gpt2_) {
      const int64_t half = hd / 2;
      mark("rope");
      if (dec) {
        for (int64_t b = 0; b < B; ++b) {
          const int64_t pos = dec->rope_pos[l][b];
          float* row = st.qkv.get() + b * qkv_w;
          const float *cs = rope_cos_.get() + pos * half, *sn = rope_sin_.get() + pos * half;
          cuda::rope_forward(stream_, row, 1, 1, qkv_w, 0, H, hd, cs, sn);
          cuda::rope_forward(stream_, row, 1, 1, qkv_w, H * hd, KV, hd, cs, sn);
        }
      } else {
        const float* cs = rope_cos_.get() + pl.pos0 * half;
        const float* sn = rope_sin_.get() + pl.pos0 * half;
        cuda::rope_forward(stream_, st.qkv.get(), B, S_l, qkv_w, 0, H, hd, cs, sn);
        cuda::rope_forward(stream_, st.qkv.get(), B, S_l, qkv_w, H * hd, KV, hd, cs, sn);
      }
    }
    need(st.att, N_l * H * hd);
    need(st.lse, B * H * S_l);
    if (dec) {
      const int64_t kvw = KV * hd;
      mark("gather, scatter, batch sums");
      cuda::scatter_rows(stream_, dec->cache[l], st.qkv.get() + H * hd, dec->rows[l], B, 2 * kvw, qkv_w);
      mark("attention forward");
      cuda::attention_decode(stream_, st.att.get(), st.qkv.get(), qkv_w, dec->cache[l], dec->cap[l], 2 * kvw,
                             0, kvw, dec->n[l], pk, pv, st.Pp, B, H, KV, hd, host_.attn_scale(l));
    } else {
      mark("attention forward");
      // Llama's qkv copy (kept for the backward) is made here, after RoPE; GPT-2's came with the product.
      cuda::AttentionBf16Operands ops;
      if (st.has_qkv16) {
        if (!gpt2_) cuda::to_bf16(stream_, st.qkv16.get(), st.qkv.get(), N_l * qkv_w);
        ops = attention_operands(st, pk, pv, nullptr);
      }
      cuda::attention_forward(stream_, st.att.get(), st.lse.get(), st.qkv.get(), in.mask[l], pk, pv, st.Pp, B,
                              S_l, H, KV, hd, host_.attn_scale(l), attention_precision(), &ops);
    }
    need(tmp_, N_l * C);
    gemm_nt(N_l, C, H * hd, st.att.get(), H * hd, mat(p + "proj.w"), tmp_.get(), C, f_or_null(p + "proj.b"),
            0.0f);
    // x_mid = x_in + attention, fused with the second norm.
    need(st.x_mid, N_l * C);
    need(st.mean2, N_l);
    need(st.rstd2, N_l);
    need(st.fc_pre, N_l * fc_w);
    const Mat fc2 = mat(p + "fc2.w");
    // GPT-2 under BF16: fc's product also writes GELU of its output as fc2's bf16 operand (cuda::gemm's c16;
    // the values gelu_forward would give, in its own buffer: a16_ is fc's operand).
    const bool fused_gelu = gpt2_ && bf16_operand(fc2);
    if (fused_gelu) need(act16_, N_l * I);
    norm_then_gemm(N_l, fc_w, C, st.x_in.get(), tmp_.get(), st.x_mid.get(), p + "ln2",
                   gpt2_ ? st.mean2.get() : nullptr, st.rstd2.get(), mat(p + "fc.w"), st.fc_pre.get(),
                   f_or_null(p + "fc.b"), fused_gelu ? act16_.get() : nullptr, cuda::Out16Op::Gelu);
    if (fused_gelu) {
      gemm_nt_bf16(N_l, C, I, act16_.get(), I, fc2, tmp_.get(), C, f_or_null(p + "fc2.b"));
    } else if (bf16_operand(fc2)) {  // the activation's only reader is fc2: written as its bf16 operand
      need(a16_, N_l * I);
      mlp_activation(a16_.get(), st.fc_pre.get(), N_l, I);
      gemm_nt_bf16(N_l, C, I, a16_.get(), I, fc2, tmp_.get(), C, f_or_null(p + "fc2.b"));
    } else {
      need(act_, N_l * I);
      mlp_activation(act_.get(), st.fc_pre.get(), N_l, I);
      gemm_nt(N_l, C, I, act_.get(), I, fc2, tmp_.get(), C, f_or_null(p + "fc2.b"), 0.0f);
    }
    // Output: the sequence rows of x_mid + mlp (the deep rows are cut).
    if (P_l == 0) {
      mark("residual");
      cuda::residual_forward(stream_, out, st.x_mid.get(), tmp_.get(), N_l * C);
    } else {
      mark("residual");
      for (int64_t b = 0; b < B; ++b)
        cuda::residual_forward(stream_, out + b * S * C, st.x_mid.get() + (b * S_l + P_l) * C,
                               tmp_.get() + (b * S_l + P_l) * C, S * C);
    }
  }

  void layer_backward(int64_t l, const Plan& pl, const Ptrs& in, LayerState& st, int64_t rows_needed) {
    const ModelConfig& c = cfg_;
    const int64_t B = pl.B, S = pl.S, C = c.hidden, H = c.heads, KV = c.kv_heads, hd = c.head_dim,
                  I = c.intermediate;
    const int64_t qkv_w = (H + 2 * KV) * hd, fc_w = gpt2_ ? I : 2 * I;
    const int64_t P_l = st.P_l, S_l = st.S_l, N_l = B * S_l;
    const std::string p = "l" + std::to_string(l) + ".";
    // Gradient of the layer output over all S_l rows: the cut deep rows get none. Without deep rows dx_ has
    // dmid's layout, and the layer works in it (no copy in or out). The layer above may have left dmid's bf16
    // copy in a16_ (dmid16_ready_: its norm1 backward wrote it for this fc2 product).
    const bool in_place = P_l == 0;
    const bool dmid16 = dmid16_ready_ && in_place;
    dmid16_ready_ = false;
    float* dmid = in_place ? dx_.get() : dmid_.get();
    if (!in_place) {
      need(dmid_, N_l * C);
      dmid = dmid_.get();
      mark("copies, memsets");
      check(cudaMemsetAsync(dmid, 0, N_l * C * sizeof(float), stream_), "cudaMemsetAsync");
      check(cudaMemcpy2DAsync(dmid + P_l * C, S_l * C * sizeof(float), dx_.get(), S * C * sizeof(float),
                              S * C * sizeof(float), B, cudaMemcpyDeviceToDevice, stream_),
            "layer gradient copy");
    }
    // MLP: out = x_mid + fc2(act(fc(norm2(x_mid)))).
    need(dact_, N_l * I);
    const Mat fc2 = mat(p + "fc2.w");
    const Mat fc = mat(p + "fc.w");
    need(dln_, N_l * C);
    // GPT-2 under BF16: fc2's input gradient product writes GELU's gradient at fc_pre as fc's bf16 operand
    // (cuda::gemm's Out16Op::GeluGrad: gelu_backward's values; dact_ then only a fallback's scratch).
    const bool fused_dgelu = gpt2_ && bf16_operand(fc);
    bf16_t* dfc16 = nullptr;
    if (fused_dgelu) {
      need(act16_, N_l * I);
      dfc16 = act16_.get();
    }
    const cuda::Out16Op dgelu = cuda::Out16Op::GeluGrad;
    if (dmid16 && bf16_operand(fc2))
      gemm_nn_bf16(N_l, I, C, a16_.get(), C, fc2, dact_.get(), I, dfc16, dgelu, st.fc_pre.get());
    else
      gemm_nn(N_l, I, C, dmid, C, fc2, dact_.get(), I, 0.0f, dfc16, dgelu, st.fc_pre.get());
    if (fused_dgelu) {
      gemm_nn_bf16(N_l, C, I, dfc16, I, fc, dln_.get(), C);
    } else if (bf16_operand(fc)) {  // the activation gradient's only reader is fc's input gradient: in bf16
      need(a16_, N_l * fc_w);
      mlp_activation_backward(a16_.get(), st.fc_pre.get(), dact_.get(), N_l, I);
      gemm_nn_bf16(N_l, C, fc_w, a16_.get(), fc_w, fc, dln_.get(), C);
    } else {
      need(dfc_, N_l * fc_w);
      mlp_activation_backward(dfc_.get(), st.fc_pre.get(), dact_.get(), N_l, I);
      gemm_nn(N_l, C, fc_w, dfc_.get(), fc_w, fc, dln_.get(), C, 0.0f);
    }
    // Attention: x_mid = x_in + proj(attn(qkv(norm1(x_in)))). dmid's next reader is proj's input gradient:
    // under BF16 norm2's backward also writes it as that product's bf16 operand.
    need(datt_, N_l * H * hd);
    const Mat proj = mat(p + "proj.w");
    const bool d16 = bf16_operand(proj);
    if (d16) need(a16_, N_l * C);
    mark("norm backward");
    cuda::norm_backward(stream_, kind_, dmid, dln_.get(), st.x_mid.get(), f(p + "ln2.w"),
                        gpt2_ ? st.mean2.get() : nullptr, st.rstd2.get(), N_l, C, d16 ? a16_.get() : nullptr);
    // With the attention on bf16 copies, proj's input gradient also writes dO's copy (cuda::gemm's c16).
    const bool dout16 = st.has_qkv16 && attention_bf16();
    if (dout16) need(datt16_, N_l * H * hd);
    bf16_t* datt16 = dout16 ? datt16_.get() : nullptr;
    if (d16)
      gemm_nn_bf16(N_l, H * hd, C, a16_.get(), C, proj, datt_.get(), H * hd, datt16);
    else
      gemm_nn(N_l, H * hd, C, dmid, C, proj, datt_.get(), H * hd, 0.0f, datt16);
    need(dqkv_, N_l * qkv_w);
    need(attn_scratch_, cuda::attention_backward_scratch_floats(st.Pp, B, S_l, H, KV, hd));
    const float* pk = st.Pp ? in.deep_a[st.deep_index] : nullptr;
    const float* pv = st.Pp ? in.deep_b[st.deep_index] : nullptr;
    float* dpk = st.Pp ? gdeep_a_[st.deep_index].get() : nullptr;
    float* dpv = st.Pp ? gdeep_b_[st.deep_index].get() : nullptr;
    mark("attention backward");
    cuda::AttentionBf16Operands ops;
    if (dout16) ops = attention_operands(st, pk, pv, datt16);
    cuda::attention_backward(stream_, dqkv_.get(), dpk, dpv, datt_.get(), st.att.get(), st.lse.get(),
                             st.qkv.get(), in.mask[l], pk, pv, st.Pp, B, S_l, H, KV, hd, host_.attn_scale(l),
                             rows_needed, attn_scratch_.get(), attention_precision(), &ops);
    if (rows_needed == 0) return;  // nothing below needs this layer's input gradient
    if (!gpt2_) {
      const int64_t half = hd / 2;
      const float* cs = rope_cos_.get() + pl.pos0 * half;
      const float* sn = rope_sin_.get() + pl.pos0 * half;
      mark("rope");
      cuda::rope_backward(stream_, dqkv_.get(), B, S_l, qkv_w, 0, H, hd, cs, sn);
      cuda::rope_backward(stream_, dqkv_.get(), B, S_l, qkv_w, H * hd, KV, hd, cs, sn);
    }
    // Input gradient: the residual (dmid) plus norm1's backward of dqkv . Wqkv, on the first rows_needed rows
    // of each sequence (all rows unless this is the lowest layer with something to train).
    if (rows_needed == S_l) {
      gemm_nn(N_l, C, qkv_w, dqkv_.get(), qkv_w, mat(p + "qkv.w"), dln_.get(), C, 0.0f);
      // The layer below (without deep rows, like this one) first reads this result, in place in dx_,
      // through its fc2 input gradient: under BF16 that operand is written here too (a16_ is grown to what
      // that layer's MLP needs, so nothing is reallocated between).
      const bool hand16 = in_place && l > pl.lowest && pl.P_l[l - 1] == 0 &&
                          bf16_operand(mat("l" + std::to_string(l - 1) + ".fc2.w"));
      if (hand16) need(a16_, N_l * fc_w);
      mark("norm backward");
      cuda::norm_backward(stream_, kind_, dmid, dln_.get(), st.x_in.get(), f(p + "ln1.w"),
                          gpt2_ ? st.mean1.get() : nullptr, st.rstd1.get(), N_l, C,
                          hand16 ? a16_.get() : nullptr);
      dmid16_ready_ = hand16;
    } else {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r0 = b * S_l;
        gemm_nn(rows_needed, C, qkv_w, dqkv_.get() + r0 * qkv_w, qkv_w, mat(p + "qkv.w"), dln_.get() + r0 * C,
                C, 0.0f);
        mark("norm backward");
        cuda::norm_backward(stream_, kind_, dmid + r0 * C, dln_.get() + r0 * C, st.x_in.get() + r0 * C,
                            f(p + "ln1.w"), gpt2_ ? st.mean1.get() + r0 : nullptr, st.rstd1.get() + r0,
                            rows_needed, C);
      }
    }
    // Deep (hidden) vectors' gradient: their rows summed over the batch; the rest flows to the layer below.
    if (in_place) return;  // the input gradient is in dx_ already
    cuda::batch_sum_rows(stream_, gdeep_a_[st.deep_index].get(), dmid, B, P_l, S_l * C, C);
    const int64_t copy_rows = std::min<int64_t>(S, rows_needed - P_l);
    if (copy_rows > 0)
      check(cudaMemcpy2DAsync(dx_.get(), S * C * sizeof(float), dmid + P_l * C, S_l * C * sizeof(float),
                              copy_rows * C * sizeof(float), B, cudaMemcpyDeviceToDevice, stream_),
            "layer gradient copy");
  }

  // LM head + cross-entropy over R gathered rows xr [R, C]: losses summed into loss_sum_ (float64); with dxr,
  // also d loss / d xr (=) scaled by grad_scale. Logits go through a bounded chunk buffer.
  void head_loss(const float* xr, const int32_t* targets, int64_t R, float* dxr, float grad_scale) {
    const int64_t C = cfg_.hidden, V = cfg_.vocab, ld = logits_ld(), chunk = head_chunk_rows(R);
    need(logits_, chunk * ld);
    need(losses_, R);
    need(loss_sum_, 1);
    // Under BF16 with a bf16 head the gradient of the logits is written as bf16 straight into a16_, the
    // backward product's operand (no fp32 gradient, no conversion pass).
    const bool g16 = dxr && bf16_operand(head());
    if (g16) need(a16_, chunk * ld);  // grown before the loop: no buffer is freed under queued work
    for (int64_t r0 = 0; r0 < R; r0 += chunk) {
      const int64_t rc = std::min(chunk, R - r0);
      gemm_nt(rc, V, C, xr + r0 * C, C, head(), logits_.get(), ld, nullptr, 0.0f);
      mark("softmax cross-entropy");
      cuda::softmax_xent(stream_, logits_.get(), ld, losses_.get() + r0, targets + r0, rc, V, grad_scale,
                         dxr != nullptr, g16 ? a16_.get() : nullptr);
      if (g16) {
        gemm_nn_bf16(rc, C, V, a16_.get(), ld, head(), dxr + r0 * C, C);
      } else if (dxr) {
        gemm_nn(rc, C, V, logits_.get(), ld, head(), dxr + r0 * C, C, 0.0f);
      }
    }
    mark("reductions");
    cuda::sum_f64(stream_, loss_sum_.get(), losses_.get(), R, false);
  }

  // Forward with saved states, loss on the labelled rows, backward to the lowest trained layer; prompt and
  // deep-prompt gradients end in gprompt_ / gdeep_a_ / gdeep_b_.
  void grad_pass(const Plan& pl, const Ptrs& in) {
    const ModelConfig& c = cfg_;
    const int64_t C = c.hidden, R = pl.R;
    // Each layer's output goes straight into the next layer's saved input when that layer has no deep rows
    // (the same [B, S, C] layout), so no layer input is copied; the last one's into x_ for the final norm.
    auto direct = [&](int64_t l) -> float* {
      if (l >= c.layers || pl.P_l[l] != 0) return nullptr;
      if (states_.size() < static_cast<size_t>(c.layers)) states_.resize(c.layers);
      need(states_[l].x_in, pl.N * C);
      return states_[l].x_in.get();
    };
    float* in0 = direct(0);
    embed(pl, in, in0);
    bool ready = in0 != nullptr;
    for (int64_t l = 0; l < c.layers; ++l) {
      float* out = direct(l + 1);
      layer_forward(l, pl, in, states_[l], ready, out);
      ready = out != nullptr;
    }
    // Final norm on the labelled rows only, then the head and the loss.
    need(xr_in_, R * C);
    need(xr_, R * C);
    need(dxr_, R * C);
    need(dxr_in_, R * C);
    need(lnf_mean_, R);
    need(lnf_rstd_, R);
    mark("gather, scatter, batch sums");
    cuda::gather_rows(stream_, xr_in_.get(), x_.get(), in.rows, R, C);
    mark("norm forward");
    cuda::norm_forward(stream_, kind_, xr_.get(), gpt2_ ? lnf_mean_.get() : nullptr, lnf_rstd_.get(),
                       xr_in_.get(), nullptr, nullptr, f("lnf.w"), f_or_null("lnf.b"), R, C, c.norm_eps);
    head_loss(xr_.get(), in.targets, R, dxr_.get(), 1.0f / static_cast<float>(R));
    mark("copies, memsets");
    check(cudaMemsetAsync(dxr_in_.get(), 0, R * C * sizeof(float), stream_), "cudaMemsetAsync");
    mark("norm backward");
    cuda::norm_backward(stream_, kind_, dxr_in_.get(), dxr_.get(), xr_in_.get(), f("lnf.w"),
                        gpt2_ ? lnf_mean_.get() : nullptr, lnf_rstd_.get(), R, C);
    need(dx_, pl.N * C);
    mark("copies, memsets");
    check(cudaMemsetAsync(dx_.get(), 0, pl.N * C * sizeof(float), stream_), "cudaMemsetAsync");
    mark("gather, scatter, batch sums");
    cuda::scatter_rows(stream_, dx_.get(), dxr_in_.get(), in.rows, R, C);
    dmid16_ready_ = false;
    for (int64_t l = c.layers - 1; l >= pl.lowest; --l) {
      LayerState& st = states_[l];
      int64_t rows_needed = st.S_l;
      if (l == pl.lowest) rows_needed = st.P_l + (l == 0 ? pl.P : 0);
      layer_backward(l, pl, in, st, rows_needed);
    }
    if (pl.P > 0) cuda::batch_sum_rows(stream_, gprompt_.get(), dx_.get(), pl.B, pl.P, pl.S * C, C);
  }

  // Runs `body` eagerly, or replays / captures its CUDA graph (see the header comment).
  template <class F>
  void run_step(const Plan& pl, F&& body) {
    if (!opt_.graphs || opt_.profile) {  // a profiled step runs eagerly (events between its stages)
      body();
      return;
    }
    GraphEntry& e = graphs_[pl.key];
    if (e.exec && e.generation == generation_) {
      check(cudaGraphLaunch(e.exec, stream_), "cudaGraphLaunch");
      return;
    }
    if (e.eager_generation != generation_) {  // first time at these addresses: run eagerly (allocations)
      body();
      e.eager_generation = generation_;
      return;
    }
    if (e.exec) {
      cudaGraphExecDestroy(e.exec);
      e.exec = nullptr;
    }
    if (graphs_.size() > 32) {  // bound the cache: forget every other shape (they start eagerly again)
      for (auto it = graphs_.begin(); it != graphs_.end();) {
        if (&it->second == &e) {
          ++it;
          continue;
        }
        if (it->second.exec) cudaGraphExecDestroy(it->second.exec);
        it = graphs_.erase(it);
      }
    }
    const uint64_t before = generation_;
    cudaGraph_t graph = nullptr;
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    try {
      body();
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    check(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
    if (generation_ != before) {  // something was reallocated while capturing: not replayable
      cudaGraphDestroy(graph);
      throw std::logic_error("CUDA graph capture reallocated a buffer (internal error)");
    }
    cudaGraphExec_t exec = nullptr;
    cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check(err, "cudaGraphInstantiate");
    e.exec = exec;
    e.generation = generation_;
    check(cudaGraphLaunch(e.exec, stream_), "cudaGraphLaunch");
  }

  const Model& host_;
  ModelConfig cfg_;
  CudaModelOptions opt_;
  bool gpt2_ = false;
  cuda::NormKind kind_ = cuda::NormKind::LayerNorm;
  std::string device_name_;
  cudaStream_t stream_ = nullptr;
  std::mutex mutex_;
  std::map<std::string, DeviceBuffer<float>> f32_;
  std::map<std::string, DeviceBuffer<bf16_t>> h16_;
  size_t weight_bytes_ = 0;
  // Workspace (grown on demand, kept between calls).
  std::vector<LayerState> states_;
  DeviceBuffer<float> x_, xf_, lnf_mean_, lnf_rstd_, xr_in_, xr_, dxr_, dxr_in_, logits_, losses_, dx_;
  DeviceBuffer<int32_t> tokens_;               // generate(): each sequence's next token
  std::vector<DeviceBuffer<float>> kv_cache_;  // generate()'s cached path, during the call: [B, cap, 2 KV hd]
  DeviceBuffer<float> ln_, tmp_, act_, dmid_, dact_, dfc_, dln_, datt_, dqkv_, attn_scratch_;
  DeviceBuffer<float> rope_cos_, rope_sin_, gprompt_, clip_;
  DeviceBuffer<float> gemm_ws_;  // split-K partial products (product)
  DeviceBuffer<bf16_t> a16_;     // the bf16 copy of a product's activation operand (gemm_a)
  // attention_operands: the prefixes' and the backward dout's bf16 copies; GPT-2's GELU output as fc2's
  // operand, written by fc's product.
  DeviceBuffer<bf16_t> prefix16_, datt16_, act16_;
  bool dmid16_ready_ = false;  // layer_backward: a16_ holds the next layer's dmid in bf16 (its fc2 operand)
  DeviceBuffer<double> loss_sum_, gnorm_sq_;
  std::vector<DeviceBuffer<float>> gdeep_a_, gdeep_b_;
  DeviceBuffer<uint8_t> inputs_;
  int64_t rope_positions_ = 0;
  uint8_t* pinned_ = nullptr;
  size_t pinned_size_ = 0;
  double* host_out_ = nullptr;
  TrainState train_;
  uint64_t generation_ = 1;
  std::map<std::string, GraphEntry> graphs_;
  std::vector<std::pair<const char*, cudaEvent_t>> marks_;
  std::map<std::string, double> profile_ms_;
};

}  // namespace

std::unique_ptr<DeviceModel> cuda_model(const Model& host, const CudaModelOptions& options) {
  return std::make_unique<CudaModel>(host, options);
}

GemmBenchResult cuda_gemm_benchmark(GemmPrecision precision, int64_t M, int64_t N, int64_t K, int iters,
                                    GemmEngine engine, bool b_transposed) {
  if (M < 1 || N < 1 || K < 1 || iters < 1)
    throw std::invalid_argument("gemm benchmark: sizes and iters must be >= 1");
  check(cudaSetDevice(0), "cudaSetDevice(0)");
  const bool bf16 = precision == GemmPrecision::BF16;
  // cuBLASLt first: a machine without it fails here, before any allocation.
  std::unique_ptr<cuda::CublasLtGemm> lt;
  GemmBenchResult out;
  out.engine = "priortune";
  if (engine == GemmEngine::CublasLt) {
    out.engine = cuda::cublaslt_library();
    lt = std::make_unique<cuda::CublasLtGemm>(precision, M, N, K, b_transposed);
  }
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaEvent_t start = nullptr, stop = nullptr;
  std::vector<float> times;
  try {
    DeviceBuffer<float> A(M * K), Bf(N * K), C(M * N), R(M * N);
    const int64_t ldb = b_transposed ? K : N;  // B: [N, K] or [K, N], the same N K values either way
    DeviceBuffer<bf16_t> Ah(bf16 ? M * K : 0), Bh(bf16 ? N * K : 0);
    // Random operands: a 1 MiB random block repeated (timing depends on the values only through power),
    // rounded to bf16 values for BF16 so that the conversions below are exact.
    std::vector<float> block = cuda::random_vector(1 << 18, 99);
    if (bf16)
      for (float& v : block) v = cuda::round_bf16(v);
    auto fill = [&](float* d, int64_t n) {
      for (int64_t o = 0; o < n; o += static_cast<int64_t>(block.size()))
        check(cudaMemcpyAsync(d + o, block.data(), std::min<int64_t>(block.size(), n - o) * sizeof(float),
                              cudaMemcpyHostToDevice, s),
              "benchmark fill");
    };
    fill(A.get(), M * K);
    fill(Bf.get(), N * K);
    // Both operands go to bf16 once, before the timed calls, for both engines: the timed window holds the
    // product alone, the same work for ours and cuBLASLt's. (In the model an activation operand reaches the
    // product in bf16 where its producer writes it so, e.g. the MLP activation; elsewhere a separate
    // conversion pass runs first, which the step timings include and this table does not.)
    if (bf16) {
      cuda::to_bf16(s, Bh.get(), Bf.get(), N * K);
      cuda::to_bf16(s, Ah.get(), A.get(), M * K);
    }
    auto run = [&] {
      if (lt) {
        lt->run(s, bf16 ? static_cast<const void*>(Ah.get()) : A.get(),
                bf16 ? static_cast<const void*>(Bh.get()) : Bf.get(), C.get());
      } else {
        cuda::gemm(s, precision, b_transposed, M, N, K, bf16 ? static_cast<const void*>(Ah.get()) : A.get(),
                   K, bf16, bf16 ? static_cast<const void*>(Bh.get()) : Bf.get(), ldb, bf16, C.get(), N,
                   nullptr, 0.0f);
      }
    };
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    for (int i = 0; i < 3; ++i) run();
    for (int i = 0; i < iters; ++i) {
      check(cudaEventRecord(start, s), "cudaEventRecord");
      run();
      check(cudaEventRecord(stop, s), "cudaEventRecord");
      check(cudaEventSynchronize(stop), "gemm benchmark");
      float ms = 0.0f;
      check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      times.push_back(ms);
    }
    // The reference: our fp32 GEMM (CUDA cores) on the same operand values.
    cuda::gemm(s, GemmPrecision::FP32, b_transposed, M, N, K, A.get(), K, false, Bf.get(), ldb, false,
               R.get(), N, nullptr, 0.0f);
    std::vector<float> c(M * N), r(M * N);
    check(cudaMemcpyAsync(c.data(), C.get(), c.size() * sizeof(float), cudaMemcpyDeviceToHost, s), "copy");
    check(cudaMemcpyAsync(r.data(), R.get(), r.size() * sizeof(float), cudaMemcpyDeviceToHost, s), "copy");
    check(cudaStreamSynchronize(s), "gemm benchmark");
    out.max_rel_err = cuda::rel_error(c, r);
  } catch (...) {
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    cudaStreamDestroy(s);
    throw;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(s);
  std::sort(times.begin(), times.end());
  out.ms = times[times.size() / 2];
  return out;
}

std::vector<cuda::OpCheck> cuda_selftest(const std::vector<std::string>& parts) {
  check(cudaSetDevice(0), "cudaSetDevice(0)");
  return cuda::selftest_all(parts);
}

namespace cuda {
std::vector<OpCheck> selftest_all(const std::vector<std::string>& parts) {
  using Part = std::vector<OpCheck> (*)();
  const std::pair<const char*, Part> known[] = {
      {"gemm", &selftest_gemm}, {"elementwise", &selftest_elementwise}, {"attention", &selftest_attention}};
  for (const std::string& p : parts)
    if (std::none_of(std::begin(known), std::end(known), [&](const auto& k) { return p == k.first; }))
      throw std::invalid_argument("CUDA self-test: unknown part \"" + p +
                                  "\" (the parts are gemm, elementwise, attention)");
  std::vector<OpCheck> all;
  for (const auto& [name, run] : known) {
    if (!parts.empty() && std::find(parts.begin(), parts.end(), name) == parts.end()) continue;
    std::vector<OpCheck> r = run();
    all.insert(all.end(), r.begin(), r.end());
  }
  return all;
}
}  // namespace cuda

}  // namespace pt
