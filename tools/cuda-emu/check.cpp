// Executes priortune's CUDA code in the CPU emulator (include/emu_cuda.h) and checks it against the CPU
// implementation: the op self-tests of kernels/cuda (pt::cuda_selftest), the device model of
// kernels/cuda/model.cu against pt::Model (GPT-2 and Llama; fp32, tf32 and bf16 GEMMs; soft, hidden and
// prefix prompts; forward, loss and gradients; prompt_step with CUDA graphs against eager steps and a CPU
// AdamW loop), the kNN index of kernels/cuda/knn.cu against the float64 brute force, and the device probe.
//
// For tf32 and bf16 the reference rounds GEMM operands where the device does (rounded_sgemm.cpp); its
// summation order is still not the device's, hence the tolerances.
// Passing here means the kernels compute the right values under the emulator's execution model; it cannot
// show that they are race-free on real hardware, fast, or within the device's launch limits.
//
// Usage: check [SECTION,...]   sections: selftest grad step prec extra cache misc knn (default: all), and
//                              smem99 (by name only, with EMU_SMEM_OPTIN_KB=99)
// Environment: SEED=n shifts the fiber schedules, REVERSE=1 runs every grid's blocks last to first (the
// results must not change). Prints one row per check and ends with "checks: N, failed: F".
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "emu_cuda.h"
#include "priortune/cuda_device.h"
#include "priortune/cuda_model.h"
#include "priortune/knn.h"
#include "priortune/model.h"
#include "priortune/ops.h"

using namespace pt;
namespace pt {
extern int g_round_mode;  // rounded_sgemm.cpp
extern bool g_round_attention;
}  // namespace pt

namespace {

int g_checks = 0, g_fail = 0;

// Runs f on the CPU reference with the operand rounding the device applies at precision p: the GEMMs of
// the linear layers and the LM head in bf16 or tf32, and with bf16 GEMMs the attention products in bf16
// where priortune/cuda_ops.h takes the tensor-core attention (head_dim a multiple of 16 up to 128).
template <class F>
auto reference(const Model& m, cuda::GemmPrecision p, F f) {
  const int64_t hd = m.config().head_dim;
  g_round_mode = p == cuda::GemmPrecision::BF16 ? 1 : p == cuda::GemmPrecision::TF32 ? 2 : 0;
  g_round_attention = p == cuda::GemmPrecision::BF16 && hd % 16 == 0 && hd <= 128;
  auto r = f();
  g_round_mode = 0;
  g_round_attention = false;
  return r;
}
const char* arch_name(const Model& m) {
  return m.config().arch == Arch::GPT2 ? "gpt2" : "llama";
}

void check(const std::string& what, bool ok) {
  ++g_checks;
  g_fail += !ok;
  std::printf("  %-4s %s\n", ok ? "ok" : "FAIL", what.c_str());
}
void expect(const std::string& what, double err, double tol) {
  ++g_checks;
  g_fail += !(err <= tol);
  std::printf("  %-4s %-56s %.3e (tol %.0e)\n", err <= tol ? "ok" : "FAIL", what.c_str(), err, tol);
}
// Emulator errors or warnings (races between streams, illegal calls during capture, out-of-bounds writes)
// since the last call.
void check_emu(const std::string& where) {
  static long long seen = 0;
  const long long now = emu::errors + emu::warnings;
  check("no emulator errors or warnings: " + where, now == seen);
  seen = now;
}

// max |a - b| / max |b| (infinite for a NaN or a size mismatch)
double rel(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double w = 0, s = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - b[i]);
    w = std::isnan(d) ? INFINITY : std::max(w, d);
    s = std::max(s, std::fabs(double(b[i])));
  }
  return w / s;
}
double rel1(double a, double b) {
  return std::fabs(a - b) / std::max(std::fabs(b), 1e-30);
}

// A small random model; weights of standard deviation `std` (0.3 gives peaked attention and gradients that
// amplify rounding noise about 20 times, 0.1 a softer model for the bf16/tf32 checks).
std::unique_ptr<Model> make_model(Arch arch, bool tied, bool bias, uint64_t seed, float std = 0.3f,
                                  const std::function<void(ModelConfig&)>& tweak = nullptr) {
  ModelConfig c;
  c.arch = arch;
  c.vocab = 61;
  c.hidden = 64;
  c.layers = 3;
  c.heads = 4;
  c.kv_heads = arch == Arch::Llama ? 2 : 4;
  c.head_dim = 16;
  c.intermediate = 96;
  c.max_positions = 64;
  c.threads = 1;
  c.tied_head = tied;
  c.attn_bias = bias;
  c.mlp_bias = bias;
  if (tweak) tweak(c);
  auto m = std::make_unique<Model>(c);
  m->fill_random(seed, std);
  // Norm weights near 1 and biases near 0, so that a swapped or missing one shows.
  std::mt19937 g(static_cast<uint32_t>(seed));
  std::uniform_real_distribution<float> U(-1, 1);
  for (const std::string& n : m->slot_names()) {
    const bool norm =
        n.size() > 2 && n.compare(n.size() - 2, 2, ".w") == 0 && n.find("ln") != std::string::npos;
    const bool b = n.size() > 2 && n.compare(n.size() - 2, 2, ".b") == 0;
    if (!norm && !b) continue;
    std::vector<float> v = m->slot(n).data;
    for (auto& x : v) x = norm ? 1.0f + 0.2f * U(g) : 0.1f * U(g);
    m->set_slot(n, v.data(), v.size());
  }
  return m;
}

// One batch with its prompts, owning the storage ForwardArgs points into.
struct Case {
  std::string name;
  int64_t B = 2, T = 9, P = 0;
  DeepPrompts::Kind kind = DeepPrompts::Kind::None;
  std::vector<int> layers;
  std::vector<int64_t> lengths;
  int64_t prefix_len = 0;
  bool mask = true, left = false;
  std::vector<int32_t> ids, labels;
  std::vector<uint8_t> maskv;
  std::vector<float> prompt;
  std::vector<std::vector<float>> deep, keys, values;
  ForwardArgs a;

  void fill(const ModelConfig& c, uint32_t seed) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> U(-1, 1);
    ids.resize(B * T);
    labels.resize(B * T);
    maskv.assign(B * T, 1);
    for (auto& x : ids) x = static_cast<int32_t>(g() % c.vocab);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {  // the same ignored positions for every seed
        const bool ignore = (t % 4 == 1) || (b == 1 && t >= T - 3);
        labels[b * T + t] = ignore ? -100 : static_cast<int32_t>(g() % c.vocab);
      }
    if (mask) {  // one sequence shorter (which one, and by how much, depends on the seed)
      const int64_t shorter = seed % 2, len = T - 3 - (seed % 3 == 0 ? 1 : 0);
      for (int64_t t = len; t < T; ++t) maskv[shorter * T + (left ? t - len : t)] = 0;
    }
    const int64_t C = c.hidden, kvw = c.kv_heads * c.head_dim;
    prompt.resize(P * C);
    for (auto& x : prompt) x = 0.5f * U(g);
    deep.clear();
    keys.clear();
    values.clear();
    for (size_t i = 0; i < layers.size(); ++i) {
      if (kind == DeepPrompts::Kind::Hidden) {
        deep.emplace_back(lengths[i] * C);
        for (auto& x : deep.back()) x = 0.5f * U(g);
      } else if (kind == DeepPrompts::Kind::Prefix) {
        keys.emplace_back(prefix_len * kvw);
        values.emplace_back(prefix_len * kvw);
        for (auto& x : keys.back()) x = U(g);
        for (auto& x : values.back()) x = U(g);
      }
    }
    bind();
  }
  void bind() {
    a = ForwardArgs{};
    a.ids = ids.data();
    a.mask = mask ? maskv.data() : nullptr;
    a.labels = labels.data();
    a.prompt = P ? prompt.data() : nullptr;
    a.B = B, a.T = T, a.P = P;
    a.deep.kind = kind;
    a.deep.layers = layers;
    if (kind == DeepPrompts::Kind::Hidden) {
      a.deep.lengths = lengths;
      for (auto& d : deep) a.deep.vectors.push_back(d.data());
    }
    if (kind == DeepPrompts::Kind::Prefix) {
      a.deep.prefix_len = prefix_len;
      for (size_t i = 0; i < keys.size(); ++i) {
        a.deep.keys.push_back(keys[i].data());
        a.deep.values.push_back(values[i].data());
      }
    }
  }
};

Case soft(const std::string& name, int64_t P) {
  Case c;
  c.name = name;
  c.P = P;
  return c;
}
Case hidden(const std::string& name, int64_t P, std::vector<int> layers, std::vector<int64_t> lengths) {
  Case c = soft(name, P);
  c.kind = DeepPrompts::Kind::Hidden;
  c.layers = std::move(layers);
  c.lengths = std::move(lengths);
  return c;
}
Case prefix(const std::string& name, int64_t P, std::vector<int> layers, int64_t len) {
  Case c = soft(name, P);
  c.kind = DeepPrompts::Kind::Prefix;
  c.layers = std::move(layers);
  c.prefix_len = len;
  return c;
}

std::vector<Case> cases() {
  std::vector<Case> v = {soft("soft P=3, padded", 3),
                         hidden("hidden {1,2} len {2,3} + soft P=3", 3, {1, 2}, {2, 3}),
                         prefix("prefix {0,2} Pp=4, no soft", 0, {0, 2}, 4),
                         prefix("prefix {0,2} Pp=4 + soft P=3", 3, {0, 2}, 4),
                         hidden("hidden {0} len 2, no soft", 0, {0}, {2}),
                         hidden("hidden {2,1} len {3,1}, no soft, no mask", 0, {2, 1}, {3, 1}),
                         prefix("prefix {1} Pp=2, no soft", 0, {1}, 2)};
  v[5].mask = false;
  return v;
}

void compare_grads(const std::string& tag, const GradResult& d, const GradResult& r, double tol,
                   double ltol) {
  expect(tag + " loss", rel1(d.loss, r.loss), ltol);
  check(tag + " label count", d.label_count == r.label_count);
  if (!r.prompt_grad.empty()) expect(tag + " prompt grad", rel(d.prompt_grad, r.prompt_grad), tol);
  for (size_t i = 0; i < r.deep_grads.size(); ++i)
    expect(tag + " deep grad " + std::to_string(i),
           i < d.deep_grads.size() ? rel(d.deep_grads[i], r.deep_grads[i]) : INFINITY, tol);
  for (size_t i = 0; i < r.key_grads.size(); ++i) {
    expect(tag + " key grad " + std::to_string(i),
           i < d.key_grads.size() ? rel(d.key_grads[i], r.key_grads[i]) : INFINITY, tol);
    expect(tag + " value grad " + std::to_string(i),
           i < d.value_grads.size() ? rel(d.value_grads[i], r.value_grads[i]) : INFINITY, tol);
  }
}

// loss_and_grad four times per case (eager, capture, replay, replay) against the CPU model, then forward
// with logits and hidden states, and without labels.
void test_grads(Model& host, cuda::GemmPrecision prec, double tol, double ltol, bool forward,
                const std::vector<Case>& cs) {
  for (Case c : cs) {
    std::printf("[%s %s] %s\n", arch_name(host), cuda::precision_name(prec), c.name.c_str());
    CudaModelOptions o;
    o.precision = prec;
    o.graphs = true;
    std::unique_ptr<DeviceModel> dev = cuda_model(host, o);
    const char* mode[] = {"eager", "capture", "replay", "replay"};
    for (int v = 0; v < 4; ++v) {
      const std::string tag = "call " + std::to_string(v) + " (" + mode[v] + ")";
      c.fill(host.config(), 100 + v);
      const long long gl = emu::graph_launches;
      GradResult r = reference(host, prec, [&] { return host.loss_and_grad(c.a); });
      GradResult d;
      try {
        d = dev->loss_and_grad(c.a);
      } catch (const std::exception& e) {
        check(tag + " threw: " + e.what(), false);
        continue;
      }
      compare_grads(tag, d, r, tol, ltol);
      check(tag + (v >= 1 ? " launched a graph" : " ran eagerly"), (v >= 1) == (emu::graph_launches > gl));
    }
    if (forward) {
      c.fill(host.config(), 7);
      c.a.hidden_indices = {0, 1, static_cast<int>(host.config().layers)};
      c.a.want_logits = true;
      ForwardResult r = reference(host, prec, [&] { return host.forward(c.a); });
      ForwardResult d = dev->forward(c.a);
      expect("forward logits", rel(d.logits, r.logits), tol);
      for (size_t i = 0; i < r.hidden.size(); ++i)
        expect("forward hidden[" + std::to_string(c.a.hidden_indices[i]) + "]",
               i < d.hidden.size() ? rel(d.hidden[i], r.hidden[i]) : INFINITY, tol);
      expect("forward loss", rel1(d.loss, r.loss), ltol);
      check("forward label count", d.label_count == r.label_count);
      c.a.labels = nullptr;
      c.a.want_logits = false;
      c.a.hidden_indices = {2};
      ForwardResult r2 = reference(host, prec, [&] { return host.forward(c.a); });
      ForwardResult d2 = dev->forward(c.a);
      expect("forward (no labels) hidden[2]", d2.hidden.empty() ? INFINITY : rel(d2.hidden[0], r2.hidden[0]),
             tol);
    }
    check_emu(c.name);
  }
}

// prompt_step with graphs against prompt_step without (bitwise), and against a CPU loop of loss_and_grad,
// clipping and adamw_step, over `steps` steps with a changing learning rate.
Case step_case() {
  return prefix("prompt_step: soft P=3 + prefix {0,2} Pp=4", 3, {0, 2}, 4);
}
void test_steps(Model& host, cuda::GemmPrecision prec, double tol, int steps, Case c = step_case(),
                double clip = 0.5) {
  std::printf("[%s %s] %s, %d steps\n", arch_name(host), cuda::precision_name(prec), c.name.c_str(), steps);
  c.fill(host.config(), 55);
  AdamWConfig o;
  o.lr = 1e-2f;
  o.beta1 = 0.9f;
  o.beta2 = 0.999f;
  o.eps = 1e-8f;
  o.weight_decay = 0.01f;
  o.max_grad_norm = static_cast<float>(clip);
  CudaModelOptions og, oe;
  og.precision = oe.precision = prec;
  og.graphs = true;
  oe.graphs = false;
  auto dg = cuda_model(host, og), de = cuda_model(host, oe);
  dg->set_trainables(c.a);
  de->set_trainables(c.a);
  // The CPU reference's parameters and AdamW moments.
  std::vector<float> p = c.prompt, mp(p.size()), vp(p.size());
  std::vector<std::vector<float>> K = c.keys, Vv = c.values, Dp = c.deep, md, vd, mk, vk, mv, vv;
  for (auto& x : Dp) md.emplace_back(x.size()), vd.emplace_back(x.size());
  for (auto& x : K) mk.emplace_back(x.size()), vk.emplace_back(x.size());
  for (auto& x : Vv) mv.emplace_back(x.size()), vv.emplace_back(x.size());
  // AdamW's first steps move an entry by about lr * sign(g): an entry whose CPU gradient is rounding noise
  // (below 1e-4 of its tensor's largest, about 100x fp32 accumulation noise) may move by up to lr either way
  // on either backend, so it is held to Adam's bound (2 lr a step so far) and the rest to `tol` (a GPT-2
  // prefix key with gradient 9e-7 of max 0.36 moved 1.5e-4 of the keys' scale apart after one step).
  std::vector<uint8_t> noisyP(p.size());
  std::vector<std::vector<uint8_t>> noisyD, noisyK, noisyV;
  for (auto& x : Dp) noisyD.emplace_back(x.size());
  for (auto& x : K) noisyK.emplace_back(x.size()), noisyV.emplace_back(x.size());
  auto mark = [](std::vector<uint8_t>& noisy, const std::vector<float>& g) {
    double top = 0;
    for (float x : g) top = std::max(top, std::fabs(double(x)));
    for (size_t j = 0; j < g.size(); ++j) noisy[j] |= std::fabs(double(g[j])) < 1e-4 * top;
  };
  double lr_sum = 0;
  auto steady = [&](const std::vector<float>& got, const std::vector<float>& want,
                    const std::vector<uint8_t>& noisy) {
    if (got.size() != want.size()) return double(INFINITY);
    double w = 0, sc = 1e-30, worst_noisy = 0;
    for (size_t j = 0; j < want.size(); ++j) {
      const double d = std::fabs(double(got[j]) - want[j]);
      if (std::isnan(d)) return double(INFINITY);
      sc = std::max(sc, std::fabs(double(want[j])));
      if (noisy[j])
        worst_noisy = std::max(worst_noisy, d);
      else
        w = std::max(w, d);
    }
    return worst_noisy > std::max(2.0 * lr_sum, tol * sc) ? double(INFINITY) : w / sc;
  };
  Case ref = c;
  for (int s = 1; s <= steps; ++s) {
    Case batch = c;
    batch.fill(host.config(), 200 + s);  // new tokens, same shapes (prompt_step ignores its prompt values)
    o.lr =
        1e-2f * (1.0f - 0.15f * static_cast<float>(s - 1));  // a schedule: a replay must read each step's lr
    const long long gl = emu::graph_launches;
    TrainStats tg = dg->prompt_step(batch.a, o);
    const bool launched = emu::graph_launches > gl;
    TrainStats te = de->prompt_step(batch.a, o);

    ref.ids = batch.ids;
    ref.labels = batch.labels;
    ref.maskv = batch.maskv;
    ref.prompt = p;
    ref.keys = K;
    ref.values = Vv;
    ref.deep = Dp;
    ref.bind();
    GradResult g = reference(host, prec, [&] { return host.loss_and_grad(ref.a); });
    double sq = 0;
    auto acc = [&](const std::vector<float>& x) {
      for (float f : x) sq += double(f) * f;
    };
    acc(g.prompt_grad);
    for (size_t i = 0; i < K.size(); ++i) acc(g.key_grads[i]), acc(g.value_grads[i]);
    for (size_t i = 0; i < Dp.size(); ++i) acc(g.deep_grads[i]);
    const double norm = std::sqrt(sq);
    const double coef = o.max_grad_norm > 0 ? o.max_grad_norm / (norm + 1e-6) : 1.0;
    auto upd = [&](std::vector<float>& prm, std::vector<float> gr, std::vector<float>& m,
                   std::vector<float>& v) {
      if (coef < 1.0)
        for (auto& x : gr) x = static_cast<float>(x * coef);
      adamw_step(prm.data(), gr.data(), m.data(), v.data(), prm.size(), o.lr, o.beta1, o.beta2, o.eps,
                 o.weight_decay, s);
    };
    if (!p.empty()) upd(p, g.prompt_grad, mp, vp), mark(noisyP, g.prompt_grad);
    for (size_t i = 0; i < Dp.size(); ++i)
      upd(Dp[i], g.deep_grads[i], md[i], vd[i]), mark(noisyD[i], g.deep_grads[i]);
    for (size_t i = 0; i < K.size(); ++i) {
      upd(K[i], g.key_grads[i], mk[i], vk[i]);
      upd(Vv[i], g.value_grads[i], mv[i], vv[i]);
      mark(noisyK[i], g.key_grads[i]);
      mark(noisyV[i], g.value_grads[i]);
    }
    lr_sum += o.lr;

    const std::string tag = "step " + std::to_string(s) +
                            (s == 1   ? " (eager)"
                             : s == 2 ? " (capture)"
                                      : " (replay)");
    check(tag + (s >= 2 ? " launched a graph" : " ran eagerly"), (s >= 2) == launched);
    check(tag + " step counters", tg.step == s && te.step == s);
    expect(tag + " loss vs cpu", rel1(tg.loss, g.loss), tol);
    expect(tag + " grad norm vs cpu", rel1(tg.grad_norm, norm), tol);
    check(tag + " loss and grad norm: graphs = eager, bitwise",
          tg.loss == te.loss && tg.grad_norm == te.grad_norm);
    PromptTensors tgp = dg->trainables(), tep = de->trainables();
    check(tag + " trainables: graphs = eager, bitwise", tgp.prompt == tep.prompt && tgp.keys == tep.keys &&
                                                            tgp.values == tep.values && tgp.deep == tep.deep);
    if (!p.empty()) expect(tag + " prompt vs cpu", steady(tgp.prompt, p, noisyP), tol);
    for (size_t i = 0; i < Dp.size(); ++i)
      expect(tag + " deep[" + std::to_string(i) + "] vs cpu",
             i < tgp.deep.size() ? steady(tgp.deep[i], Dp[i], noisyD[i]) : INFINITY, tol);
    for (size_t i = 0; i < K.size(); ++i) {
      expect(tag + " keys[" + std::to_string(i) + "] vs cpu",
             i < tgp.keys.size() ? steady(tgp.keys[i], K[i], noisyK[i]) : INFINITY, tol);
      expect(tag + " values[" + std::to_string(i) + "] vs cpu",
             i < tgp.values.size() ? steady(tgp.values[i], Vv[i], noisyV[i]) : INFINITY, tol);
    }
  }
  if (!p.empty() && prec == cuda::GemmPrecision::FP32) {
    // The accumulated update against its own scale (the parameters dwarf it). Not for bf16/tf32: AdamW's
    // first steps are nearly sign(grad), so rounding noise flips the update of near-zero gradient entries.
    const std::vector<float> now = dg->trainables().prompt;
    std::vector<float> dd(p.size()), dc(p.size());
    for (size_t i = 0; i < p.size(); ++i) {
      dd[i] = (i < now.size() ? now[i] : NAN) - c.prompt[i];
      dc[i] = p[i] - c.prompt[i];
    }
    expect("total prompt update vs cpu (relative to the update)", rel(dd, dc), tol * 100);
  }
  check_emu(c.name);
}

// Interleaved shapes through one model: graphs retire when buffers grow, smaller shapes replay, and every
// call stays right.
void test_cache(Model& host) {
  std::printf("[%s fp32] interleaved shapes (graph cache)\n", arch_name(host));
  std::vector<Case> cs = cases();
  Case small = cs[0], bigger = cs[1], pre = cs[2];
  bigger.T = 12;
  CudaModelOptions o;
  o.precision = cuda::GemmPrecision::FP32;
  auto dev = cuda_model(host, o);
  const Case* order[] = {&small,  &small, &bigger, &small, &small, &small,  &bigger, &bigger,
                         &bigger, &pre,   &small,  &pre,   &pre,   &bigger, &pre,    &small};
  int i = 0;
  for (const Case* cp : order) {
    Case c = *cp;
    c.fill(host.config(), 300 + i);
    GradResult r = host.loss_and_grad(c.a);
    const long long gl = emu::graph_launches;
    GradResult d = dev->loss_and_grad(c.a);
    compare_grads(
        "call " + std::to_string(i) + " " + c.name + (emu::graph_launches > gl ? " [graph]" : " [eager]"), d,
        r, 2e-5, 1e-5);
    if (i % 5 == 2) {  // a forward in between (uses, and may grow, the shared buffers)
      c.a.hidden_indices = {1};
      c.a.want_logits = true;
      ForwardResult fr = host.forward(c.a), fd = dev->forward(c.a);
      expect("forward logits", rel(fd.logits, fr.logits), 2e-5);
    }
    ++i;
  }
  // A kernel switch changed between a shape's eager run and its capture (PRIORTUNE_CUDA_ATTN=bf16: the
  // attention's bf16 operand copies are allocated on first use): a graph's key holds the switches, so the
  // call after the change runs eagerly (allocating), the next captures, none throws, and each equals an
  // eager model's under the same switches.
  {
    std::printf("[%s bf16] a kernel switch changed between a shape's eager run and its capture\n",
                arch_name(host));
    CudaModelOptions og, oe;
    og.precision = oe.precision = cuda::GemmPrecision::BF16;
    oe.graphs = false;
    auto g = cuda_model(host, og), e = cuda_model(host, oe);
    for (int call = 0; call < 5; ++call) {
      if (call == 1) setenv("PRIORTUNE_CUDA_ATTN", "bf16", 1);
      Case c = small;
      c.fill(host.config(), 400 + call);
      const GradResult want = e->loss_and_grad(c.a);
      const long long gl = emu::graph_launches;
      try {
        const GradResult got = g->loss_and_grad(c.a);
        compare_grads(
            "switch, call " + std::to_string(call) + (emu::graph_launches > gl ? " [graph]" : " [eager]"),
            got, want, 0.0, 0.0);
      } catch (const std::exception& ex) {
        check("switch, call " + std::to_string(call) + ": " + ex.what(), false);
      }
    }
    unsetenv("PRIORTUNE_CUDA_ATTN");
  }
  check_emu("graph cache");
}

void test_misc(Model& llama) {
  std::printf("[misc]\n");
  const CudaProbe probe = cuda_probe();
  check("cuda_probe: compiled, usable, one device",
        probe.compiled && probe.usable && probe.device_count == 1);
  Case c = step_case();
  c.fill(llama.config(), 9);
  auto dev = cuda_model(llama, CudaModelOptions{});
  dev->set_trainables(c.a);
  PromptTensors t = dev->trainables();
  check("set_trainables -> trainables round trip (bf16 model)",
        t.prompt == c.prompt && t.keys == c.keys && t.values == c.values && t.layers == c.layers);
  const DeviceMemoryInfo m = dev->memory();
  check("memory(): weights and workspace counted, device named",
        m.weights > 0 && m.workspace > 0 && !m.device.empty());
  // Profiling: the stages are timed, and the results are those of an unprofiled model, bit for bit.
  CudaModelOptions po;
  po.profile = true;
  auto prof = cuda_model(llama, po);
  const GradResult gp = prof->loss_and_grad(c.a), gd = dev->loss_and_grad(c.a);
  const auto stages = prof->profile();
  bool has_gemm = false, has_attention = false;
  for (const auto& [stage, ms] : stages) {
    has_gemm |= stage.rfind("gemm", 0) == 0 && ms >= 0;
    has_attention |= stage == "attention backward" && ms >= 0;
  }
  check("profile(): gemm and attention stages timed", has_gemm && has_attention);
  check("profile(): emptied by the call", prof->profile().empty());
  check("profiled results equal unprofiled ones", gp.loss == gd.loss && gp.prompt_grad == gd.prompt_grad &&
                                                      gp.key_grads == gd.key_grads &&
                                                      gp.value_grads == gd.value_grads);
  // The benchmark's own error check: against our fp32 GEMM on the same (for bf16, bf16-exact) operands, so
  // fp32 is the same kernel, bf16 differs by summation order, tf32 by operand rounding.
  for (auto p : {cuda::GemmPrecision::FP32, cuda::GemmPrecision::TF32, cuda::GemmPrecision::BF16}) {
    const GemmBenchResult r = cuda_gemm_benchmark(p, 70, 130, 40, 2);
    const std::string what = std::string("cuda_gemm_benchmark ") + cuda::precision_name(p);
    check(what + " ran", r.ms >= 0 && r.engine == "priortune");
    expect(what + " vs fp32", r.max_rel_err,
           p == cuda::GemmPrecision::FP32   ? 1e-6
           : p == cuda::GemmPrecision::TF32 ? 3e-3
                                            : 1e-5);
  }
  // cuBLASLt is not on the machines the emulator runs on (and could not drive an emulated device): the
  // benchmark must say so as an exception naming it.
  std::string lt_error;
  try {
    cuda_gemm_benchmark(cuda::GemmPrecision::BF16, 70, 130, 40, 2, GemmEngine::CublasLt);
  } catch (const std::exception& e) {
    lt_error = e.what();
  }
  check("cuBLASLt engine without the library: an error naming cuBLASLt (" + lt_error.substr(0, 60) + ")",
        lt_error.find("cuBLASLt") != std::string::npos);
  check_emu("misc");
}

// The CUDA kNN index against the float64 brute force: indices equal, scores to fp32 rounding. 200 copies of
// one row tie at the top for a query on it, more than the first round keeps as candidates, so that query
// cannot be certified and goes through a recovery round (on the matrix path a second selection from the
// resident score block, with 4c candidates, for k 1 and 4; k 100's 4c exceeds V 600). Shapes: V 600,
// d 40 (16-byte staging loads, a tile or so per slab) and V 20000, d 37 (scalar loads; several tiles per
// slab, so candidate buffers are cut back between tiles as well as at the end); V 600 with d 580 and 290:
// the finalize's re-scoring loop takes more than one step a row, with 16-byte loads (d % 4 == 0) and scalar
// ones.
void test_knn_shape(int64_t V, int64_t d);

// The matrix path on a device that refuses its score block (EMU_MAX_ALLOC_BYTES, set after the index is
// built): V 40000 spans three 16384-column slabs, so 37 queries want a 37 x 49152 block (7.3 MB). Under a
// 5 MB cap the block shrinks to one slab a pass (2.4 MB, three GEMM passes); under 2 MB no slab fits and
// the fused kernel takes the round. Either way the neighbours are the float64 brute force's; before the
// fallback both searches threw "CUDA out of memory ... score block".
void test_knn_score_block_oom() {
  const int64_t V = 40000, d = 24, Q = 37, k = 10;
  std::mt19937 g(11);
  std::normal_distribution<float> N(0.0f, 1.0f);
  std::vector<float> vocab(V * d), queries(Q * d);
  for (auto& x : vocab) x = N(g);
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t t = 0; t < d; ++t) queries[q * d + t] = vocab[(q * 1009 % V) * d + t] + 0.3f * N(g);
  std::vector<double> norms(V);
  knn_row_norms(norms.data(), vocab.data(), V, d, 1);
  std::vector<int32_t> ei(Q * k);
  std::vector<float> es(Q * k);
  knn_exact_scan(ei.data(), es.data(), queries.data(), Q, vocab.data(), norms.data(), V, d, k,
                 KnnMetric::Cosine, nullptr, 1);
  std::printf("[knn matrix, score block refused] V=%lld d=%lld Q=%lld\n", (long long)V, (long long)d,
              (long long)Q);
  setenv("PRIORTUNE_CUDA_KNN", "matrix", 1);
  for (const char* cap : {"5000000", "2000000"}) {
    auto index = knn_index_cuda(vocab.data(), V, d, KnnMetric::Cosine);
    setenv("EMU_MAX_ALLOC_BYTES", cap, 1);
    const std::string tag = std::string("allocations capped at ") + cap + " bytes";
    try {
      const KnnResult r = index->search(queries.data(), Q, k, nullptr, 1);
      check(tag + ": indices = float64 brute force", r.indices == ei);
      expect(tag + ": scores", rel(r.scores, es), 1e-6);
    } catch (const std::exception& e) {
      check(tag + ": search threw " + e.what(), false);
    }
    unsetenv("EMU_MAX_ALLOC_BYTES");
  }
  check_emu("knn score block refused");
}

void test_knn() {
  // Both screening paths (PRIORTUNE_CUDA_KNN): the matrix path (bf16 GEMM + slab selection; d 40 takes the
  // pipelined GEMM, d 37 the staged one; V 20000 spans two selection slabs) with either selection kernel
  // (PRIORTUNE_CUDA_KNN_SELECT; the filter one gathers the 200 tied rows for the query on them, sends the
  // zero query's all-equal slab to its full select, and leaves k = 100's c = 164 to the full select), and
  // the fused TF32 kernel.
  for (const char* path : {"matrix", "matrix+filter", "fused"}) {
    const std::string p = path;
    setenv("PRIORTUNE_CUDA_KNN", p == "fused" ? "fused" : "matrix", 1);
    setenv("PRIORTUNE_CUDA_KNN_SELECT", p == "matrix+filter" ? "filter" : "radix", 1);
    for (auto [V, d] : {std::pair<int64_t, int64_t>{600, 40}, std::pair<int64_t, int64_t>{20000, 37},
                        std::pair<int64_t, int64_t>{600, 580}, std::pair<int64_t, int64_t>{600, 290}})
      test_knn_shape(V, d);
  }
  unsetenv("PRIORTUNE_CUDA_KNN_SELECT");
  test_knn_score_block_oom();
  unsetenv("PRIORTUNE_CUDA_KNN");
}

void test_knn_shape(int64_t V, int64_t d) {
  const int64_t Q = 37;
  std::mt19937 g(5);
  std::normal_distribution<float> N(0.0f, 1.0f);
  std::vector<float> vocab(V * d), queries(Q * d);
  for (auto& x : vocab) x = N(g);
  for (int64_t r = 400; r < 600; ++r) std::copy_n(&vocab[3 * d], d, &vocab[r * d]);
  std::fill_n(&vocab[20 * d], d, 0.0f);  // a zero row
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t t = 0; t < d; ++t) queries[q * d + t] = vocab[q * 7 * d + t] + 0.3f * N(g);  // near row 7q
  std::copy_n(&vocab[3 * d], d, &queries[5 * d]);  // the query on the copied row
  std::fill_n(&queries[6 * d], d, 0.0f);           // a zero query
  std::vector<int32_t> exclude(Q, -1);
  for (int64_t q = 0; q < Q; q += 3) exclude[q] = static_cast<int32_t>(q * 7);
  std::vector<double> norms(V);
  knn_row_norms(norms.data(), vocab.data(), V, d, 1);
  for (KnnMetric metric : {KnnMetric::Cosine, KnnMetric::L2, KnnMetric::Dot}) {
    std::printf("[knn %s, %s select, %s] V=%lld d=%lld Q=%lld\n", std::getenv("PRIORTUNE_CUDA_KNN"),
                std::getenv("PRIORTUNE_CUDA_KNN_SELECT"), knn_metric_name(metric), (long long)V, (long long)d,
                (long long)Q);
    auto index = knn_index_cuda(vocab.data(), V, d, metric);
    for (int64_t k : {1, 4, 100})
      for (const int32_t* ex :
           {static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(exclude.data())}) {
        const KnnResult r = index->search(queries.data(), Q, k, ex, 1);
        std::vector<int32_t> ei(Q * k);
        std::vector<float> es(Q * k);
        knn_exact_scan(ei.data(), es.data(), queries.data(), Q, vocab.data(), norms.data(), V, d, k, metric,
                       ex, 1);
        const std::string tag = "k=" + std::to_string(k) + (ex ? ", exclude" : "");
        check(tag + ": indices = float64 brute force (" + std::to_string(r.recovered_queries) + " recovered)",
              r.indices == ei);
        expect(tag + ": scores", rel(r.scores, es), 1e-6);
        check(tag + ": the tied query needed recovery", r.recovered_queries > 0);
        check(tag + ": each recovered query counted once", r.recovered_queries <= Q);
        if (!ex)  // the tied query alone: one query recovered, however many selections or rounds it took
          check(tag + ": the tied query alone counts 1",
                index->search(&queries[5 * d], 1, k, nullptr, 1).recovered_queries == 1);
      }
    check_emu(std::string("knn ") + knn_metric_name(metric));
  }
}

void test_selftest(const char* section, const std::vector<std::string>& parts = {}) {
  std::printf("[%s]\n", section);
  for (const cuda::OpCheck& r : cuda_selftest(parts)) {
    ++g_checks;
    g_fail += !r.pass;
    std::printf("  %-4s %-30s %-56s err=%.3e tol=%.0e\n", r.pass ? "ok" : "FAIL", r.op.c_str(),
                r.shape.c_str(), r.err, r.tol);
  }
  check_emu(section);
}

// The attention self-test on a device with 99 KB of shared memory a block (an Ada GPU's, which runs the
// sm_80 code; cuda-emu.mjs sets EMU_SMEM_OPTIN_KB=99 for this section): kernels whose tiles do not fit take
// smaller ones, or the synchronous loads, and must still pass, with no launch above the opt-in.
void test_small_smem() {
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, 0);
  check("smem99: the emulated device has 99 KB a block (EMU_SMEM_OPTIN_KB=99)",
        p.sharedMemPerBlockOptin == 99 * 1024);
  test_selftest("smem99", {"attention"});
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "all";
  if (const char* s = std::getenv("SEED")) emu::order_seed = static_cast<unsigned>(std::atoi(s));
  if (const char* r = std::getenv("REVERSE")) emu::reverse_blocks = std::strcmp(r, "0") != 0;
  auto run = [&](const char* k) { return what == "all" || what.find(k) != std::string::npos; };
  const auto fp32 = cuda::GemmPrecision::FP32, tf32 = cuda::GemmPrecision::TF32,
             bf16 = cuda::GemmPrecision::BF16;
  std::vector<Case> cs = cases();
  auto gpt2 = make_model(Arch::GPT2, true, true, 11);
  auto llama = make_model(Arch::Llama, false, false, 12);
  auto llama_b = make_model(Arch::Llama, true, true, 13);
  if (run("selftest")) test_selftest("selftest");
  if (what == "smem99") test_small_smem();  // only by name: it needs EMU_SMEM_OPTIN_KB=99
  if (run("grad")) {
    test_grads(*gpt2, fp32, 2e-5, 1e-5, true, cs);
    test_grads(*llama, fp32, 2e-5, 1e-5, true, cs);
    test_grads(*llama_b, fp32, 2e-5, 1e-5, true, {cs[1], cs[3]});
  }
  if (run("step")) {
    test_steps(*gpt2, fp32, 5e-5, 4);
    test_steps(*llama, fp32, 5e-5, 4);
  }
  if (run("prec")) {
    // With bf16 GEMMs the attention runs on bf16 tensor cores too (head_dim 16). It rounds P and dS where the
    // CPU reference cannot follow, so the model is the softer one: there that noise stays near 2e-2 (on the
    // default model it reaches 0.3 of a gradient's scale). The selftest holds the attention ops to 1e-2.
    auto gpt2_soft = make_model(Arch::GPT2, true, true, 14, 0.1f);
    auto llama_soft = make_model(Arch::Llama, false, false, 15, 0.1f);
    for (auto p : {tf32, bf16}) {
      const double tol = p == bf16 ? 5e-2 : 5e-3;
      test_grads(*gpt2_soft, p, tol, tol, true, {cs[3]});
      test_grads(*llama_soft, p, tol, tol, true, {cs[1], cs[3]});
      test_steps(*llama_soft, p, 4 * tol, 4);
    }
  }
  if (run("extra")) {
    Case left = prefix("prefix {0,2} Pp=4, left padded (rows with no visible key)", 0, {0, 2}, 4);
    left.left = true;
    Case left3 = hidden("hidden {1} len 2, left padded, B=3", 0, {1}, {2});
    left3.left = true;
    left3.B = 3;
    Case tiny = soft("soft P=1, B=1, T=2", 1);
    tiny.B = 1;
    tiny.T = 2;
    tiny.mask = false;
    test_grads(*gpt2, fp32, 2e-5, 1e-5, true, {left, left3, tiny});
    test_grads(*llama, fp32, 2e-5, 1e-5, true, {left, left3, tiny});
    // Several attention and GEMM tiles.
    Case big1 = hidden("big: soft P=3 + hidden {1} len 5, T=70", 3, {1}, {5});
    big1.T = 70;
    Case big2 = prefix("big: prefix {0,1} Pp=70, T=66", 0, {0, 1}, 70);
    big2.T = 66;
    auto gbig = make_model(Arch::GPT2, true, true, 21, 0.3f, [](ModelConfig& m) { m.max_positions = 160; });
    test_grads(*gbig, fp32, 3e-5, 1e-5, true, {big1, big2});
    test_grads(*llama, fp32, 3e-5, 1e-5, true, {big1, big2});
    // Odd sizes: unaligned (scalar) paths, head_dim not a multiple of 4, head_dim above 64. Tolerance 1e-4:
    // the prefix key gradients cancel, so summation order alone moves them by up to 5e-5.
    auto odd = [](ModelConfig& m) {
      m.hidden = 66;
      m.heads = 3;
      m.kv_heads = m.arch == Arch::Llama ? 1 : 3;
      m.head_dim = 22;
      m.intermediate = 50;
      m.vocab = 37;
    };
    auto godd = make_model(Arch::GPT2, true, true, 31, 0.3f, odd);
    auto lodd = make_model(Arch::Llama, false, true, 32, 0.3f, odd);
    test_grads(*godd, fp32, 1e-4, 1e-5, true, {cs[1], cs[3], cs[6]});
    test_grads(*lodd, fp32, 1e-4, 1e-5, true, {cs[1], cs[3], cs[6]});
    auto hd80 = [](ModelConfig& m) {
      m.head_dim = 80;
      m.heads = 2;
      m.kv_heads = 1;
    };
    auto lhd = make_model(Arch::Llama, false, false, 33, 0.3f, hd80);
    test_grads(*lhd, fp32, 1e-4, 1e-5, true, {cs[1], cs[3]});
    test_grads(*godd, bf16, 3e-2, 3e-2, false, {cs[3]});  // head_dim 22: fp32 attention, bf16 GEMMs
    test_grads(*make_model(Arch::Llama, false, false, 34, 0.1f, hd80), bf16, 5e-2, 5e-2, false, {cs[3]});
    test_grads(*lodd, tf32, 2e-2, 5e-3, false, {cs[3]});
    test_steps(*gpt2, fp32, 5e-5, 4,
               hidden("prompt_step: hidden {1,2} len {2,3}, no soft", 0, {1, 2}, {2, 3}));
    test_steps(*llama, fp32, 5e-5, 4, hidden("prompt_step: soft P=2 + hidden {0} len 2", 2, {0}, {2}));
    test_steps(*llama, fp32, 5e-5, 4, prefix("prompt_step: prefix {1} Pp=3, no soft", 0, {1}, 3));
    test_steps(*gpt2, fp32, 5e-5, 4, prefix("prompt_step: prefix {1} Pp=3, no soft, no clipping", 0, {1}, 3),
               0.0);
  }
  if (run("cache")) test_cache(*llama);
  if (run("misc")) test_misc(*llama);
  if (run("knn")) test_knn();
  std::printf(
      "\nemulator: %lld launches, %lld jobs run, %lld graph launches, %lld captured jobs, %lld errors, %lld "
      "warnings\n",
      emu::launches, emu::jobs_run, emu::graph_launches, emu::captured_jobs, emu::errors, emu::warnings);
  std::printf("checks: %d, failed: %d\n", g_checks, g_fail);
  return g_fail != 0;
}
