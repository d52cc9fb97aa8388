// Direct, synchronous access to single CPU ops (forward and backward) for the finite-difference tests in
// test/ops.test.ts, and their weight-gradient halves for test/weights.test.ts. Shapes are checked against the
// arrays' lengths before any op runs.
#include "priortune/ops.h"

#include <cmath>

#include "common.h"
#include "modules.h"

namespace ptn {
namespace {

using F = View<float>;

struct Args {
  const Napi::CallbackInfo& info;
  size_t i = 0;
  F f32(const char* name, size_t n) { return view_of_length<float>(arg(info, i++, name), name, n); }
  F f32_or_null(const char* name, size_t n) {
    Napi::Value v = arg(info, i++, name);
    if (v.IsNull() || v.IsUndefined()) return F{};
    return view_of_length<float>(v, name, n);
  }
  int64_t i64(const char* name) { return int_of(arg(info, i++, name), name, 0); }
  double num(const char* name) { return number_of(arg(info, i++, name), name); }
};

// The element count of a shape of size arguments (count_of: a RangeError past 2^53 elements).
size_t shape(const Napi::CallbackInfo& info, std::initializer_list<int64_t> sizes) {
  return count_of(info.Env(), "shape", sizes);
}

// Prefix keys and values are both given when Pp > 0 (the kernels read them), both absent otherwise.
void check_prefixes(Napi::Env env, int64_t Pp, const View<float>& pk, const View<float>& pv) {
  if ((Pp > 0) != (pk.data != nullptr) || (Pp > 0) != (pv.data != nullptr))
    throw Napi::TypeError::New(env, "prefixK, prefixV: expected both Float32Arrays when Pp > 0 (Pp = " +
                                        std::to_string(Pp) + "), both null when Pp is 0");
}

// Grouped-query attention: each of the KV heads serves H / KV query heads (else columns past a row are read).
void check_heads(Napi::Env env, int64_t H, int64_t KV) {
  if (H % KV != 0)
    throw Napi::RangeError::New(
        env, "H: expected a multiple of KV (" + std::to_string(KV) + "), got " + std::to_string(H));
}

Napi::Float32Array out(Napi::Env env, size_t n) {
  return Napi::Float32Array::New(env, n);
}

// layernorm(x, w, b, N, C) -> [out, mean, rstd]
Napi::Value Layernorm(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    Args a{info};
    const int64_t N = size_of(arg(info, 3, "N"), "N", 1), C = size_of(arg(info, 4, "C"), "C", 1);
    F x = a.f32("x", shape(info, {N, C})), w = a.f32("w", C), b = a.f32("b", C);
    auto o = out(info.Env(), shape(info, {N, C})), m = out(info.Env(), N), r = out(info.Env(), N);
    pt::layernorm_forward(o.Data(), m.Data(), r.Data(), x.data, w.data, b.data, N, C, 1e-5f, 1);
    Napi::Array res = Napi::Array::New(info.Env(), 3);
    res.Set(0u, o), res.Set(1u, m), res.Set(2u, r);
    return res;
  });
}

// layernormBackward(dout, x, w, mean, rstd, N, C) -> dx
Napi::Value LayernormBackward(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    Args a{info};
    const int64_t N = size_of(arg(info, 5, "N"), "N", 1), C = size_of(arg(info, 6, "C"), "C", 1);
    F d = a.f32("dout", shape(info, {N, C})), x = a.f32("x", shape(info, {N, C})), w = a.f32("w", C),
      m = a.f32("mean", N), r = a.f32("rstd", N);
    auto dx = out(info.Env(), shape(info, {N, C}));
    pt::layernorm_backward(dx.Data(), d.data, x.data, w.data, m.data, r.data, N, C, 1);
    return dx;
  });
}

// rmsnorm(x, w, N, C) -> [out, rstd]
Napi::Value Rmsnorm(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    Args a{info};
    const int64_t N = size_of(arg(info, 2, "N"), "N", 1), C = size_of(arg(info, 3, "C"), "C", 1);
    F x = a.f32("x", shape(info, {N, C})), w = a.f32("w", C);
    auto o = out(info.Env(), shape(info, {N, C})), r = out(info.Env(), N);
    pt::rmsnorm_forward(o.Data(), r.Data(), x.data, w.data, N, C, 1e-5f, 1);
    Napi::Array res = Napi::Array::New(info.Env(), 2);
    res.Set(0u, o), res.Set(1u, r);
    return res;
  });
}

// rmsnormBackward(dout, x, w, rstd, N, C) -> dx
Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    Args a{info};
    const int64_t N = size_of(arg(info, 4, "N"), "N", 1), C = size_of(arg(info, 5, "C"), "C", 1);
    F d = a.f32("dout", shape(info, {N, C})), x = a.f32("x", shape(info, {N, C})), w = a.f32("w", C),
      r = a.f32("rstd", N);
    auto dx = out(info.Env(), shape(info, {N, C}));
    pt::rmsnorm_backward(dx.Data(), d.data, x.data, w.data, r.data, N, C, 1);
    return dx;
  });
}

// gelu(x) -> out; geluBackward(x, dout) -> dx
Napi::Value Gelu(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    F x = view_of<float>(arg(info, 0, "x"), "x");
    auto o = out(info.Env(), x.length);
    pt::gelu_forward(o.Data(), x.data, x.length, 1);
    return o;
  });
}
Napi::Value GeluBackward(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    F x = view_of<float>(arg(info, 0, "x"), "x");
    F d = view_of_length<float>(arg(info, 1, "dout"), "dout", x.length);
    auto dx = out(info.Env(), x.length);
    pt::gelu_backward(dx.Data(), x.data, d.data, x.length, 1);
    return dx;
  });
}

// swiglu(gateUp, N, I) -> out; swigluBackward(gateUp, dout, N, I) -> dgateUp
Napi::Value Swiglu(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t N = size_of(arg(info, 1, "N"), "N", 1), I = size_of(arg(info, 2, "I"), "I", 1);
    F g = view_of_length<float>(info[0], "gateUp", shape(info, {N, 2, I}));
    auto o = out(info.Env(), shape(info, {N, I}));
    pt::swiglu_forward(o.Data(), g.data, N, I, 1);
    return o;
  });
}
Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t N = size_of(arg(info, 2, "N"), "N", 1), I = size_of(arg(info, 3, "I"), "I", 1);
    F g = view_of_length<float>(info[0], "gateUp", shape(info, {N, 2, I})),
      d = view_of_length<float>(info[1], "dout", shape(info, {N, I}));
    auto dg = out(info.Env(), shape(info, {N, 2, I}));
    pt::swiglu_backward(dg.Data(), g.data, d.data, N, I, 1);
    return dg;
  });
}

// rope(x, B, S, heads, hd, theta, backward) -> rotated copy (positions 0..S-1)
Napi::Value Rope(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t B = size_of(arg(info, 1, "B"), "B", 1), S = size_of(arg(info, 2, "S"), "S", 1),
                  heads = size_of(arg(info, 3, "heads"), "heads", 1),
                  hd = size_of(arg(info, 4, "hd"), "hd", 2);
    const double theta = number_of(arg(info, 5, "theta"), "theta");
    const bool backward = arg(info, 6, "backward").ToBoolean();
    F x = view_of_length<float>(info[0], "x", shape(info, {B, S, heads, hd}));
    std::vector<float> cos(S * hd / 2), sin(S * hd / 2);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < hd / 2; ++i) {
        const double ang = s * std::pow(theta, -2.0 * i / hd);
        cos[s * hd / 2 + i] = (float)std::cos(ang);
        sin[s * hd / 2 + i] = (float)std::sin(ang);
      }
    auto o = out(info.Env(), x.length);
    std::copy(x.data, x.data + x.length, o.Data());
    if (backward)
      pt::rope_backward(o.Data(), B, S, heads * hd, 0, heads, hd, cos.data(), sin.data(), 1);
    else
      pt::rope_forward(o.Data(), B, S, heads * hd, 0, heads, hd, cos.data(), sin.data(), 1);
    return o;
  });
}

// attention(qkv, keyMask|null, prefixK|null, prefixV|null, Pp, B, S, H, KV, hd, scale) -> [out, probs]
Napi::Value Attention(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t Pp = size_of(arg(info, 4, "Pp"), "Pp", 0), B = size_of(arg(info, 5, "B"), "B", 1),
                  S = size_of(arg(info, 6, "S"), "S", 1), H = size_of(arg(info, 7, "H"), "H", 1),
                  KV = size_of(arg(info, 8, "KV"), "KV", 1), hd = size_of(arg(info, 9, "hd"), "hd", 1);
    const float scale = (float)number_of(arg(info, 10, "scale"), "scale");
    check_heads(info.Env(), H, KV);
    Args a{info};
    F qkv = a.f32("qkv", shape(info, {B, S, (H + 2 * KV), hd}));
    const uint8_t* mask = nullptr;
    if (!info[1].IsNull()) mask = view_of_length<uint8_t>(info[1], "keyMask", shape(info, {B, S})).data;
    a.i = 2;
    F pk = a.f32_or_null("prefixK", shape(info, {Pp, KV, hd})),
      pv = a.f32_or_null("prefixV", shape(info, {Pp, KV, hd}));
    auto o = out(info.Env(), shape(info, {B, S, H, hd})),
         probs = out(info.Env(), shape(info, {B, H, S, (Pp + S)}));
    check_prefixes(info.Env(), Pp, pk, pv);
    pt::attention_forward(o.Data(), probs.Data(), qkv.data, mask, pk.data, pv.data, Pp, B, S, H, KV, hd,
                          scale, 2);
    Napi::Array res = Napi::Array::New(info.Env(), 2);
    res.Set(0u, o), res.Set(1u, probs);
    return res;
  });
}

// attentionBackward(dout, probs, qkv, prefixK|null, prefixV|null, Pp, B, S, H, KV, hd, scale, qRows)
//   -> [dqkv, dprefixK, dprefixV]
Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t Pp = size_of(arg(info, 5, "Pp"), "Pp", 0), B = size_of(arg(info, 6, "B"), "B", 1),
                  S = size_of(arg(info, 7, "S"), "S", 1), H = size_of(arg(info, 8, "H"), "H", 1),
                  KV = size_of(arg(info, 9, "KV"), "KV", 1), hd = size_of(arg(info, 10, "hd"), "hd", 1);
    const float scale = (float)number_of(arg(info, 11, "scale"), "scale");
    check_heads(info.Env(), H, KV);
    const int64_t q_rows = size_of(arg(info, 12, "qRows"), "qRows", 0);
    if (q_rows > S)  // the first q_rows query rows (S: all): more would write past dqkv
      throw Napi::RangeError::New(
          info.Env(), "qRows: expected at most S = " + std::to_string(S) + ", got " + std::to_string(q_rows));
    Args a{info};
    F d = a.f32("dout", shape(info, {B, S, H, hd})), probs = a.f32("probs", shape(info, {B, H, S, (Pp + S)})),
      qkv = a.f32("qkv", shape(info, {B, S, (H + 2 * KV), hd}));
    F pk = a.f32_or_null("prefixK", shape(info, {Pp, KV, hd})),
      pv = a.f32_or_null("prefixV", shape(info, {Pp, KV, hd}));
    auto dqkv = out(info.Env(), qkv.length), dpk = out(info.Env(), shape(info, {Pp, KV, hd})),
         dpv = out(info.Env(), shape(info, {Pp, KV, hd}));
    check_prefixes(info.Env(), Pp, pk, pv);
    pt::attention_backward(dqkv.Data(), Pp ? dpk.Data() : nullptr, Pp ? dpv.Data() : nullptr, d.data,
                           probs.data, qkv.data, pk.data, pv.data, Pp, B, S, H, KV, hd, scale, q_rows, 2);
    Napi::Array res = Napi::Array::New(info.Env(), 3);
    res.Set(0u, dqkv), res.Set(1u, dpk), res.Set(2u, dpv);
    return res;
  });
}

// lmHeadCrossentropy(x, targets, W, R, C, V) -> [lossSum, dx] (dx with grad_scale 1)
Napi::Value LmHeadCrossentropy(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t R = size_of(arg(info, 3, "R"), "R", 1), C = size_of(arg(info, 4, "C"), "C", 1),
                  V = size_of(arg(info, 5, "V"), "V", 1);
    F x = view_of_length<float>(info[0], "x", shape(info, {R, C}));
    auto t = view_of_length<int32_t>(info[1], "targets", R);
    F W = view_of_length<float>(info[2], "W", shape(info, {V, C}));
    for (int64_t r = 0; r < R; ++r)
      if (t.data[r] >= V) throw Napi::RangeError::New(info.Env(), "targets: id outside the vocabulary");
    auto dx = out(info.Env(), shape(info, {R, C}));
    std::vector<float> scratch(pt::lm_head_chunk_rows(R, V) * V);
    const double loss =
        pt::lm_head_crossentropy(dx.Data(), x.data, t.data, W.data, R, C, V, 1.0f, scratch.data(), 2);
    Napi::Array res = Napi::Array::New(info.Env(), 2);
    res.Set(0u, Napi::Number::New(info.Env(), loss)), res.Set(1u, dx);
    return res;
  });
}

// --- weight gradients (full-parameter training); the gradient buffers are accumulated (+=) in place ---

// matmul(x, W, bias|null, N, C, OC) -> out
Napi::Value Matmul(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t N = size_of(arg(info, 3, "N"), "N", 1), C = size_of(arg(info, 4, "C"), "C", 1),
                  OC = size_of(arg(info, 5, "OC"), "OC", 1);
    Args a{info};
    F x = a.f32("x", shape(info, {N, C})), W = a.f32("W", shape(info, {OC, C})),
      b = a.f32_or_null("bias", OC);
    auto o = out(info.Env(), shape(info, {N, OC}));
    pt::matmul_forward(o.Data(), x.data, W.data, b.data, N, C, OC, 2);
    return o;
  });
}

// matmulBackwardWeights(dW, dbias|null, dout, x, N, C, OC): dW (+=), dbias (+=)
Napi::Value MatmulBackwardWeights(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t N = size_of(arg(info, 4, "N"), "N", 1), C = size_of(arg(info, 5, "C"), "C", 1),
                  OC = size_of(arg(info, 6, "OC"), "OC", 1);
    Args a{info};
    F dW = a.f32("dW", shape(info, {OC, C})), db = a.f32_or_null("dbias", OC),
      d = a.f32("dout", shape(info, {N, OC})), x = a.f32("x", shape(info, {N, C}));
    pt::matmul_backward_weights(dW.data, db.data, d.data, x.data, N, C, OC, 2);
    return info.Env().Undefined();
  });
}

// layernormBackwardWeights(dw, db, dout, x, mean, rstd, N, C): dw (+=), db (+=)
Napi::Value LayernormBackwardWeights(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t N = size_of(arg(info, 6, "N"), "N", 1), C = size_of(arg(info, 7, "C"), "C", 1);
    Args a{info};
    F dw = a.f32("dw", C), db = a.f32("db", C), d = a.f32("dout", shape(info, {N, C})),
      x = a.f32("x", shape(info, {N, C})), m = a.f32("mean", N), r = a.f32("rstd", N);
    pt::layernorm_backward_weights(dw.data, db.data, d.data, x.data, m.data, r.data, N, C, 2);
    return info.Env().Undefined();
  });
}

// rmsnormBackwardWeights(dw, dout, x, rstd, N, C): dw (+=)
Napi::Value RmsnormBackwardWeights(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t N = size_of(arg(info, 4, "N"), "N", 1), C = size_of(arg(info, 5, "C"), "C", 1);
    Args a{info};
    F dw = a.f32("dw", C), d = a.f32("dout", shape(info, {N, C})), x = a.f32("x", shape(info, {N, C})),
      r = a.f32("rstd", N);
    pt::rmsnorm_backward_weights(dw.data, d.data, x.data, r.data, N, C, 2);
    return info.Env().Undefined();
  });
}

// Token ids checked against the table's rows, and the position table's rows against the positions used.
static void check_embedding(Napi::Env env, const View<int32_t>& ids, size_t wte_len, size_t wpe_len,
                            bool has_wpe, int64_t S, int64_t pos_offset, int64_t C) {
  const int64_t V = static_cast<int64_t>(wte_len) / C;
  if (V * C != static_cast<int64_t>(wte_len))
    throw Napi::RangeError::New(env, "wte: expected V x C elements");
  for (size_t i = 0; i < ids.length; ++i)
    if (ids.data[i] < 0 || ids.data[i] >= V) throw Napi::RangeError::New(env, "ids: id outside the table");
  if (has_wpe && static_cast<int64_t>(wpe_len) / C < S + pos_offset)  // rows, not rows x C: no overflow
    throw Napi::RangeError::New(env, "wpe: fewer rows than positions used");
}

// embedding(ids, prompt|null, P, wte, wpe|null, posOffset, B, T, C) -> out [B*(P+T), C]
Napi::Value Embedding(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t P = size_of(arg(info, 2, "P"), "P", 0),
                  pos_offset = size_of(arg(info, 5, "posOffset"), "posOffset", 0),
                  B = size_of(arg(info, 6, "B"), "B", 1), T = size_of(arg(info, 7, "T"), "T", 1),
                  C = size_of(arg(info, 8, "C"), "C", 1);
    auto ids = view_of_length<int32_t>(arg(info, 0, "ids"), "ids", shape(info, {B, T}));
    F prompt = P ? view_of_length<float>(info[1], "prompt", shape(info, {P, C})) : F{};
    F wte = view_of<float>(arg(info, 3, "wte"), "wte");
    F wpe = info[4].IsNull() ? F{} : view_of<float>(info[4], "wpe");
    check_embedding(info.Env(), ids, wte.length, wpe.length, wpe.data != nullptr, P + T, pos_offset, C);
    auto o = out(info.Env(), shape(info, {B, (P + T), C}));
    pt::embedding_forward(o.Data(), ids.data, prompt.data, P, wte.data, wpe.data, pos_offset, B, T, C, 2);
    return o;
  });
}

// embeddingBackwardWeights(dwte, dwpe|null, dout, ids, P, posOffset, B, T, C): dwte (+=), dwpe (+=)
Napi::Value EmbeddingBackwardWeights(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t P = size_of(arg(info, 4, "P"), "P", 0),
                  pos_offset = size_of(arg(info, 5, "posOffset"), "posOffset", 0),
                  B = size_of(arg(info, 6, "B"), "B", 1), T = size_of(arg(info, 7, "T"), "T", 1),
                  C = size_of(arg(info, 8, "C"), "C", 1);
    F dwte = view_of<float>(arg(info, 0, "dwte"), "dwte");
    F dwpe = info[1].IsNull() ? F{} : view_of<float>(info[1], "dwpe");
    F d = view_of_length<float>(arg(info, 2, "dout"), "dout", shape(info, {B, (P + T), C}));
    auto ids = view_of_length<int32_t>(arg(info, 3, "ids"), "ids", shape(info, {B, T}));
    check_embedding(info.Env(), ids, dwte.length, dwpe.length, dwpe.data != nullptr, P + T, pos_offset, C);
    pt::embedding_backward_weights(dwte.data, dwpe.data, d.data, ids.data, P, pos_offset, B, T, C, 2);
    return info.Env().Undefined();
  });
}

// lmHeadCrossentropyWeights(dW, x, targets, W, R, C, V) -> [lossSum, dx] (grad_scale 1), dW (+=)
Napi::Value LmHeadCrossentropyWeights(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const int64_t R = size_of(arg(info, 4, "R"), "R", 1), C = size_of(arg(info, 5, "C"), "C", 1),
                  V = size_of(arg(info, 6, "V"), "V", 1);
    F dW = view_of_length<float>(info[0], "dW", shape(info, {V, C}));
    F x = view_of_length<float>(info[1], "x", shape(info, {R, C}));
    auto t = view_of_length<int32_t>(info[2], "targets", R);
    F W = view_of_length<float>(info[3], "W", shape(info, {V, C}));
    for (int64_t r = 0; r < R; ++r)
      if (t.data[r] >= V) throw Napi::RangeError::New(info.Env(), "targets: id outside the vocabulary");
    auto dx = out(info.Env(), shape(info, {R, C}));
    std::vector<float> scratch(pt::lm_head_chunk_rows(R, V) * V);
    const double loss = pt::lm_head_crossentropy_with_weight_grad(dx.Data(), dW.data, x.data, t.data, W.data,
                                                                  R, C, V, 1.0f, scratch.data(), 2);
    Napi::Array res = Napi::Array::New(info.Env(), 2);
    res.Set(0u, Napi::Number::New(info.Env(), loss)), res.Set(1u, dx);
    return res;
  });
}

}  // namespace

void init_ops(Napi::Env env, Napi::Object exports) {
  Napi::Object ops = Napi::Object::New(env);
  ops.Set("layernorm", Napi::Function::New(env, Layernorm));
  ops.Set("layernormBackward", Napi::Function::New(env, LayernormBackward));
  ops.Set("rmsnorm", Napi::Function::New(env, Rmsnorm));
  ops.Set("rmsnormBackward", Napi::Function::New(env, RmsnormBackward));
  ops.Set("gelu", Napi::Function::New(env, Gelu));
  ops.Set("geluBackward", Napi::Function::New(env, GeluBackward));
  ops.Set("swiglu", Napi::Function::New(env, Swiglu));
  ops.Set("swigluBackward", Napi::Function::New(env, SwigluBackward));
  ops.Set("rope", Napi::Function::New(env, Rope));
  ops.Set("attention", Napi::Function::New(env, Attention));
  ops.Set("attentionBackward", Napi::Function::New(env, AttentionBackward));
  ops.Set("lmHeadCrossentropy", Napi::Function::New(env, LmHeadCrossentropy));
  ops.Set("matmul", Napi::Function::New(env, Matmul));
  ops.Set("matmulBackwardWeights", Napi::Function::New(env, MatmulBackwardWeights));
  ops.Set("layernormBackwardWeights", Napi::Function::New(env, LayernormBackwardWeights));
  ops.Set("rmsnormBackwardWeights", Napi::Function::New(env, RmsnormBackwardWeights));
  ops.Set("embedding", Napi::Function::New(env, Embedding));
  ops.Set("embeddingBackwardWeights", Napi::Function::New(env, EmbeddingBackwardWeights));
  ops.Set("lmHeadCrossentropyWeights", Napi::Function::New(env, LmHeadCrossentropyWeights));
  exports.Set("ops", ops);
}

}  // namespace ptn
