// Node-API wrapper of pt::Model: construction from a plain config object, asynchronous weight loading,
// asynchronous forward, full-parameter training (gradients of every weight, AdamW), and dispose(). The
// wrapped model is held by shared_ptr so a worker still running after dispose() keeps it alive until it
// finishes; calls after dispose() throw "Model is disposed".
#include "priortune/model.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "common.h"
#include "modules.h"
#include "priortune/cuda_model.h"

namespace ptn {
namespace {

int64_t get_int(const Napi::Object& o, const char* key, int64_t fallback, int64_t min_value = INT64_MIN) {
  Napi::Value v = o.Get(key);
  // A fallback the field's minimum refuses means the field is required (numHeads 0 would divide by zero).
  if (v.IsUndefined() && fallback < min_value)
    throw Napi::TypeError::New(o.Env(), std::string("config.") + key +
                                            ": required (an integer >= " + std::to_string(min_value) + ")");
  if (v.IsUndefined()) return fallback;
  return int_of(v, std::string("config.") + key, min_value);
}

double get_number(const Napi::Object& o, const char* key, double fallback) {
  Napi::Value v = o.Get(key);
  return v.IsUndefined() ? fallback : number_of(v, std::string("config.") + key);
}

bool get_bool(const Napi::Object& o, const char* key, bool fallback) {
  Napi::Value v = o.Get(key);
  return v.IsUndefined() ? fallback : v.ToBoolean().Value();
}

pt::DType dtype_of(const Napi::Value& v, const std::string& name) {
  if (!v.IsString()) throw_type(v.Env(), name, "a dtype string", v);
  std::string s = v.As<Napi::String>().Utf8Value();
  if (s == "F32") return pt::DType::F32;
  if (s == "F16") return pt::DType::F16;
  if (s == "BF16") return pt::DType::BF16;
  if (s == "F64") return pt::DType::F64;
  throw Napi::TypeError::New(v.Env(),
                             name + ": unsupported dtype '" + s + "' (supported: F32, F16, BF16, F64)");
}

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {InstanceMethod("loadTensors", &ModelWrap::LoadTensors),
                        InstanceMethod("checkComplete", &ModelWrap::CheckComplete),
                        InstanceMethod("forward", &ModelWrap::Forward),
                        InstanceMethod("lossAndGrad", &ModelWrap::LossAndGrad),
                        InstanceMethod("generate", &ModelWrap::Generate),
                        InstanceMethod("tokenEmbeddings", &ModelWrap::TokenEmbeddings),
                        InstanceMethod("weightBytes", &ModelWrap::WeightBytes),
                        InstanceMethod("dispose", &ModelWrap::Dispose),
                        // full-parameter training
                        InstanceMethod("slots", &ModelWrap::Slots),
                        InstanceMethod("exportTensors", &ModelWrap::ExportTensors),
                        InstanceMethod("importTensors", &ModelWrap::ImportTensors),
                        InstanceMethod("exportAdamState", &ModelWrap::ExportAdamState),
                        InstanceMethod("importAdamState", &ModelWrap::ImportAdamState),
                        InstanceMethod("trainGrads", &ModelWrap::TrainGrads),
                        InstanceMethod("trainStep", &ModelWrap::TrainStep),
                        InstanceMethod("fillRandom", &ModelWrap::FillRandom),
                        // CUDA backend
                        InstanceMethod("attachCuda", &ModelWrap::AttachCuda),
                        InstanceMethod("deviceMemory", &ModelWrap::DeviceMemory),
                        InstanceMethod("deviceProfile", &ModelWrap::DeviceProfile),
                        InstanceMethod("setTrainables", &ModelWrap::SetTrainables),
                        InstanceMethod("trainables", &ModelWrap::Trainables),
                        InstanceMethod("setOptimizerState", &ModelWrap::SetOptimizerState),
                        InstanceMethod("promptStep", &ModelWrap::PromptStep)});
  }

  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    Napi::Env env = info.Env();
    guarded(env, [&]() -> Napi::Value {
      Napi::Object o = object_of(arg(info, 0, "config"), "config");
      pt::ModelConfig c;
      c.arch = choice_of(o.Get("architecture"), "config.architecture", {"gpt2", "llama"}) == 0
                   ? pt::Arch::GPT2
                   : pt::Arch::Llama;
      c.vocab = get_int(o, "vocabSize", 0, 1);
      c.hidden = get_int(o, "hiddenSize", 0, 1);
      c.layers = get_int(o, "numLayers", 0, 1);
      c.heads = get_int(o, "numHeads", 0, 1);
      c.kv_heads = get_int(o, "numKvHeads", c.heads, 1);
      c.head_dim = get_int(o, "headDim", c.hidden / c.heads, 1);
      c.intermediate = get_int(o, "intermediateSize", 0, 1);
      c.max_positions = get_int(o, "maxPositions", 0, 0);
      c.norm_eps = static_cast<float>(get_number(o, "normEps", 1e-5));
      c.tied_head = get_bool(o, "tiedHead", true);
      c.attn_bias = get_bool(o, "attentionBias", false);
      c.mlp_bias = get_bool(o, "mlpBias", false);
      c.scale_attn_by_inverse_layer_idx = get_bool(o, "scaleAttnByInverseLayerIdx", false);
      c.rope_theta = get_number(o, "ropeTheta", 10000.0);
      Napi::Value rt = o.Get("ropeType");
      if (!rt.IsUndefined()) c.rope_type = rt.ToString().Utf8Value();
      c.rope_factor = get_number(o, "ropeFactor", 1.0);
      c.rope_low_freq_factor = get_number(o, "ropeLowFreqFactor", 1.0);
      c.rope_high_freq_factor = get_number(o, "ropeHighFreqFactor", 4.0);
      c.rope_original_max_positions = get_int(o, "ropeOriginalMaxPositions", 8192, 1);
      c.threads = o.Get("threads").IsUndefined() ? 1 : threads_value(o.Get("threads"), "config.threads");
      model_ = std::make_shared<pt::Model>(c);
      external_->set(env, static_cast<int64_t>(model_->host_bytes()));
      return env.Undefined();
    });
  }

 private:
  std::shared_ptr<pt::Model> live(Napi::Env env) {
    if (!model_) throw Napi::Error::New(env, "Model is disposed");
    return model_;
  }

  // loadTensors([{ target, rowOffset, file, offset, dtype, rows, cols, transpose }]) -> Promise<void>
  Napi::Value LoadTensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      Napi::Value list = arg(info, 0, "tensors");
      if (!list.IsArray()) throw_type(env, "tensors", "an array of load entries", list);
      struct Entry {
        std::string name, target, file;
        int64_t row_offset, rows, cols;
        uint64_t offset;
        pt::DType dtype;
        bool transpose;
      };
      auto entries = std::make_shared<std::vector<Entry>>();
      Napi::Array arr = list.As<Napi::Array>();
      for (uint32_t i = 0; i < arr.Length(); ++i) {
        const std::string n = "tensors[" + std::to_string(i) + "]";
        Napi::Object e = object_of(arr.Get(i), n);
        Entry en;
        en.target = e.Get("target").ToString().Utf8Value();
        en.name = e.Get("name").IsString() ? e.Get("name").As<Napi::String>().Utf8Value() : en.target;
        en.file = e.Get("file").ToString().Utf8Value();
        en.row_offset = int_of(e.Get("rowOffset"), n + ".rowOffset", 0);
        en.rows = int_of(e.Get("rows"), n + ".rows", 1);
        en.cols = int_of(e.Get("cols"), n + ".cols", 1);
        en.offset = static_cast<uint64_t>(int_of(e.Get("offset"), n + ".offset", 0));
        en.dtype = dtype_of(e.Get("dtype"), n + ".dtype");
        en.transpose = e.Get("transpose").ToBoolean().Value();
        entries->push_back(en);
      }
      auto* worker = new PromiseWorker(
          env,
          [model, entries]() {
            for (const Entry& e : *entries) {
              try {
                model->load_tensor(e.target, e.row_offset, e.file, e.offset, e.dtype, e.rows, e.cols,
                                   e.transpose);
              } catch (const pt::NonFiniteWeight& x) {
                throw std::runtime_error("tensor '" + e.name + "' in " + e.file + ": " + x.what());
              }
            }
          },
          tracked(model));
      return worker->queue();
    });
  }

  Napi::Value CheckComplete(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      live(env)->check_complete();  // not under the run lock: a queued step must not block the JS thread
      return env.Undefined();
    });
  }

  // ForwardArgs with its own copies of every array it points at (token ids, labels, mask, prompts): the
  // worker that holds it reads the values that were checked, whatever the caller does to its arrays while
  // the call runs (refilling a batch buffer, transferring or resizing it; common.h: owned()).
  struct OwnedArgs : pt::ForwardArgs {
    std::vector<int32_t> ids_copy, labels_copy;
    std::vector<uint8_t> mask_copy;
    Copies floats;  // the prompt tensors
  };

  // Parses the shared arguments of forward and lossAndGrad.
  static std::shared_ptr<OwnedArgs> parse_args(Napi::Env env, const pt::ModelConfig& c,
                                               const Napi::Object& o) {
    auto args = std::make_shared<OwnedArgs>();
    args->B = int_of(o.Get("batch"), "batch", 1);
    args->T = int_of(o.Get("seqLen"), "seqLen", 1);
    if (args->B > INT32_MAX || args->T > INT32_MAX / args->B)
      throw Napi::RangeError::New(env, "batch x seqLen = " + std::to_string(args->B) + " x " +
                                           std::to_string(args->T) + " is more than 2^31 - 1 tokens");
    const size_t BT = static_cast<size_t>(args->B * args->T);
    auto ids = view_of_length<int32_t>(o.Get("inputIds"), "inputIds", BT);
    args->ids_copy.assign(ids.data, ids.data + BT);
    for (size_t i = 0; i < BT; ++i)
      if (args->ids_copy[i] < 0 || args->ids_copy[i] >= c.vocab)
        throw Napi::RangeError::New(
            env, "inputIds[" + std::to_string(i) + "] = " + std::to_string(args->ids_copy[i]) +
                     " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");
    args->ids = args->ids_copy.data();
    Napi::Value mask_v = o.Get("attentionMask");
    if (!mask_v.IsUndefined() && !mask_v.IsNull()) {
      const uint8_t* m = view_of_length<uint8_t>(mask_v, "attentionMask", BT).data;
      args->mask_copy.assign(m, m + BT);
      args->mask = args->mask_copy.data();
    }
    Napi::Value labels_v = o.Get("labels");
    if (!labels_v.IsUndefined() && !labels_v.IsNull()) {
      auto labels = view_of_length<int32_t>(labels_v, "labels", BT);
      args->labels_copy.assign(labels.data, labels.data + BT);
      for (size_t i = 0; i < BT; ++i)
        if (args->labels_copy[i] != -100 && (args->labels_copy[i] < 0 || args->labels_copy[i] >= c.vocab))
          throw Napi::RangeError::New(env, "labels[" + std::to_string(i) +
                                               "] = " + std::to_string(args->labels_copy[i]) +
                                               " is neither -100 nor inside the vocabulary");
      args->labels = args->labels_copy.data();
    }
    parse_prompts(env, c, o, *args);
    Napi::Value hs = o.Get("hiddenStates");
    if (!hs.IsUndefined() && !hs.IsNull()) {
      if (!hs.IsArray()) throw_type(env, "hiddenStates", "an array of layer indices", hs);
      Napi::Array arr = hs.As<Napi::Array>();
      for (uint32_t i = 0; i < arr.Length(); ++i) {
        int64_t idx = int_of(arr.Get(i), "hiddenStates[" + std::to_string(i) + "]", 0);
        if (idx > c.layers)
          throw Napi::RangeError::New(env, "hiddenStates[" + std::to_string(i) +
                                               "] = " + std::to_string(idx) + " is outside 0.." +
                                               std::to_string(c.layers));
        if (std::find(args->hidden_indices.begin(), args->hidden_indices.end(), (int)idx) !=
            args->hidden_indices.end())
          throw Napi::RangeError::New(env, "hiddenStates: index " + std::to_string(idx) + " is repeated");
        args->hidden_indices.push_back(static_cast<int>(idx));
      }
    }
    Napi::Value want = o.Get("logits");
    args->want_logits = want.IsUndefined() ? true : want.ToBoolean().Value();
    return args;
  }

  // The optional prompt and deepPrompts of an argument object.
  static void parse_prompts(Napi::Env env, const pt::ModelConfig& c, const Napi::Object& o, OwnedArgs& args) {
    Napi::Value prompt_v = o.Get("prompt");
    if (!prompt_v.IsUndefined() && !prompt_v.IsNull()) {
      auto prompt = finite_view(env, prompt_v, "prompt", 0);
      if (prompt.length == 0 || prompt.length % c.hidden != 0)
        throw Napi::RangeError::New(env, "prompt: expected a non-empty multiple of hiddenSize (" +
                                             std::to_string(c.hidden) + ") elements, got " +
                                             std::to_string(prompt.length));
      args.floats.push_back(owned(prompt));
      args.prompt = args.floats.back()->data();
      args.P = static_cast<int64_t>(prompt.length) / c.hidden;
    }
    Napi::Value deep_v = o.Get("deepPrompts");
    if (!deep_v.IsUndefined() && !deep_v.IsNull()) parse_deep(env, c, object_of(deep_v, "deepPrompts"), args);
  }

  // A Float32Array whose values are all finite; `expected` > 0 also checks its length.
  static View<float> finite_view(Napi::Env env, const Napi::Value& v, const std::string& name,
                                 size_t expected) {
    auto view = expected ? view_of_length<float>(v, name, expected) : view_of<float>(v, name);
    for (size_t i = 0; i < view.length; ++i)
      if (!std::isfinite(view.data[i]))
        throw Napi::RangeError::New(env, name + "[" + std::to_string(i) + "] is not finite");
    return view;
  }

  // deepPrompts: { kind: "hidden", layers, vectors: Float32Array[] (P_l x hidden each) }
  //            | { kind: "prefix", layers, keys: Float32Array[], values: Float32Array[] (Pp x kvHeads x
  //            headDim) }
  static void parse_deep(Napi::Env env, const pt::ModelConfig& c, const Napi::Object& d, OwnedArgs& args) {
    const bool hidden = choice_of(d.Get("kind"), "deepPrompts.kind", {"hidden", "prefix"}) == 0;
    Napi::Value layers_v = d.Get("layers");
    if (!layers_v.IsArray()) throw_type(env, "deepPrompts.layers", "an array of layer indices", layers_v);
    Napi::Array layers = layers_v.As<Napi::Array>();
    auto tensors = [&](const char* key) {
      Napi::Value v = d.Get(key);
      const std::string name = std::string("deepPrompts.") + key;
      if (!v.IsArray()) throw_type(env, name, "an array of Float32Array (one per layer)", v);
      Napi::Array arr = v.As<Napi::Array>();
      if (arr.Length() != layers.Length())
        throw Napi::RangeError::New(env, name + ": expected " + std::to_string(layers.Length()) +
                                             " arrays (one per layer), got " + std::to_string(arr.Length()));
      return arr;
    };
    for (uint32_t i = 0; i < layers.Length(); ++i) {
      const int64_t l = int_of(layers.Get(i), "deepPrompts.layers[" + std::to_string(i) + "]", 0);
      if (l >= c.layers)
        throw Napi::RangeError::New(env, "deepPrompts.layers[" + std::to_string(i) +
                                             "] = " + std::to_string(l) + " is outside 0.." +
                                             std::to_string(c.layers - 1));
      if (std::find(args.deep.layers.begin(), args.deep.layers.end(), (int)l) != args.deep.layers.end())
        throw Napi::RangeError::New(env, "deepPrompts.layers: layer " + std::to_string(l) + " is repeated");
      args.deep.layers.push_back(static_cast<int>(l));
    }
    if (hidden) {
      args.deep.kind = pt::DeepPrompts::Kind::Hidden;
      Napi::Array vectors = tensors("vectors");
      for (uint32_t i = 0; i < vectors.Length(); ++i) {
        const std::string name = "deepPrompts.vectors[" + std::to_string(i) + "]";
        auto view = finite_view(env, vectors.Get(i), name, 0);
        if (view.length == 0 || view.length % c.hidden != 0)
          throw Napi::RangeError::New(env, name + ": expected P_l x hiddenSize (" + std::to_string(c.hidden) +
                                               ") elements, got " + std::to_string(view.length));
        args.floats.push_back(owned(view));
        args.deep.vectors.push_back(args.floats.back()->data());
        args.deep.lengths.push_back(static_cast<int64_t>(view.length) / c.hidden);
      }
    } else {
      args.deep.kind = pt::DeepPrompts::Kind::Prefix;
      Napi::Array keys = tensors("keys"), values = tensors("values");
      const size_t per = static_cast<size_t>(c.kv_heads * c.head_dim);
      for (uint32_t i = 0; i < keys.Length(); ++i) {
        const std::string kn = "deepPrompts.keys[" + std::to_string(i) + "]";
        auto k = finite_view(env, keys.Get(i), kn, 0);
        if (k.length == 0 || k.length % per != 0)
          throw Napi::RangeError::New(env, kn + ": expected Pp x numKvHeads x headDim (" +
                                               std::to_string(per) + " per position) elements, got " +
                                               std::to_string(k.length));
        const int64_t Pp = static_cast<int64_t>(k.length / per);
        if (i > 0 && Pp != args.deep.prefix_len)
          throw Napi::RangeError::New(env, kn + ": every prefixed layer needs the same prefix length (" +
                                               std::to_string(args.deep.prefix_len) + "), got " +
                                               std::to_string(Pp));
        args.deep.prefix_len = Pp;
        auto v = finite_view(env, values.Get(i), "deepPrompts.values[" + std::to_string(i) + "]", k.length);
        args.floats.push_back(owned(k));
        args.deep.keys.push_back(args.floats.back()->data());
        args.floats.push_back(owned(v));
        args.deep.values.push_back(args.floats.back()->data());
      }
    }
  }

  // forward({ inputIds, batch, seqLen, attentionMask?, prompt?, deepPrompts?, labels?, hiddenStates?, logits?
  // })
  //   -> Promise<{ logits?, hiddenStates[], loss?, labelCount? }>
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      auto args = parse_args(env, model->config(), object_of(arg(info, 0, "args"), "args"));
      auto result = std::make_shared<pt::ForwardResult>();
      auto* worker = new PromiseWorker(
          env,
          [model, device = device_, args, result]() {
            *result = device ? device->forward(*args) : model->forward(*args);
          },
          [result, args](Napi::Env env) -> Napi::Value {
            Napi::Object out = Napi::Object::New(env);
            if (args->want_logits) out.Set("logits", to_float32(env, std::move(result->logits)));
            Napi::Array hidden = Napi::Array::New(env, result->hidden.size());
            for (size_t i = 0; i < result->hidden.size(); ++i)
              hidden.Set(static_cast<uint32_t>(i), to_float32(env, std::move(result->hidden[i])));
            out.Set("hiddenStates", hidden);
            if (args->labels) {
              out.Set("loss", result->loss);
              out.Set("labelCount", static_cast<double>(result->label_count));
            }
            return out;
          });
      return worker->queue();
    });
  }

  // { kind, layers, vectors } or { kind, layers, keys, values } from per-layer tensors (moved out).
  static Napi::Object deep_object(Napi::Env env, pt::DeepPrompts::Kind kind, const std::vector<int>& layers,
                                  std::vector<std::vector<float>>& vectors,
                                  std::vector<std::vector<float>>& keys,
                                  std::vector<std::vector<float>>& values) {
    auto list = [&](std::vector<std::vector<float>>& v) {
      Napi::Array arr = Napi::Array::New(env, v.size());
      for (size_t i = 0; i < v.size(); ++i)
        arr.Set(static_cast<uint32_t>(i), to_float32(env, std::move(v[i])));
      return arr;
    };
    Napi::Object d = Napi::Object::New(env);
    Napi::Array ls = Napi::Array::New(env, layers.size());
    for (size_t i = 0; i < layers.size(); ++i) ls.Set(static_cast<uint32_t>(i), layers[i]);
    d.Set("layers", ls);
    if (kind == pt::DeepPrompts::Kind::Hidden) {
      d.Set("kind", "hidden");
      d.Set("vectors", list(vectors));
    } else {
      d.Set("kind", "prefix");
      d.Set("keys", list(keys));
      d.Set("values", list(values));
    }
    return d;
  }

  // lossAndGrad(args) -> Promise<{ loss, labelCount, promptGrad?, deepPromptGrads? }>
  Napi::Value LossAndGrad(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      auto args = parse_args(env, model->config(), object_of(arg(info, 0, "args"), "args"));
      if (!args->labels)
        throw Napi::TypeError::New(env, "labels: expected an Int32Array (required by lossAndGrad)");
      auto result = std::make_shared<pt::GradResult>();
      auto* worker = new PromiseWorker(
          env,
          [model, device = device_, args, result]() {
            *result = device ? device->loss_and_grad(*args) : model->loss_and_grad(*args);
          },
          [result, args](Napi::Env env) -> Napi::Value {
            Napi::Object out = Napi::Object::New(env);
            out.Set("loss", result->loss);
            out.Set("labelCount", static_cast<double>(result->label_count));
            if (args->P > 0) out.Set("promptGrad", to_float32(env, std::move(result->prompt_grad)));
            if (args->deep.kind != pt::DeepPrompts::Kind::None)
              out.Set("deepPromptGrads",
                      deep_object(env, args->deep.kind, args->deep.layers, result->deep_grads,
                                  result->key_grads, result->value_grads));
            return out;
          });
      return worker->queue();
    });
  }

  // generate(args, maxNewTokens, eosId) -> Promise<Int32Array batch x maxNewTokens> (-1 after a stop)
  Napi::Value Generate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      auto args = parse_args(env, model->config(), object_of(arg(info, 0, "args"), "args"));
      const int64_t max_new = size_of(arg(info, 1, "maxNewTokens"), "maxNewTokens", 1);
      const int32_t eos = static_cast<int32_t>(int_of(arg(info, 2, "eosId"), "eosId", -1));
      auto result = std::make_shared<std::vector<int32_t>>();
      auto* worker = new PromiseWorker(
          env,
          [model, device = device_, args, result, max_new, eos]() {
            *result = device ? device->generate(*args, max_new, eos) : model->generate(*args, max_new, eos);
          },
          [result](Napi::Env env) -> Napi::Value { return to_int32(env, std::move(*result)); });
      return worker->queue();
    });
  }

  Napi::Value TokenEmbeddings(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {  // the V x C copy can throw std::bad_alloc
      auto model = live(env);
      // Under the run lock: a training step on a worker writes the embeddings (a copy taken meanwhile was
      // half before, half after it). This waits for a call in flight to finish.
      std::vector<float> copy;
      {
        auto lock = model->lock_weights();
        copy = model->token_embeddings();
      }
      return to_float32(env, std::move(copy));
    });
  }

  Napi::Value WeightBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(live(info.Env())->weight_bytes()));
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    device_.reset();  // device memory is freed here unless a running worker still holds the model
    model_.reset();
    external_->clear();
    return info.Env().Undefined();
  }

  // --- Full-parameter training (pt::Model::train_grads / train_step) ---

  // slots() -> [{ name, rows, cols }] in canonical-name order (kernels/include/priortune/model.h)
  Napi::Value Slots(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      const std::vector<std::string> names = model->slot_names();
      Napi::Array arr = Napi::Array::New(env, names.size());
      for (size_t i = 0; i < names.size(); ++i) {
        const pt::Slot& s = model->slot(names[i]);
        Napi::Object o = Napi::Object::New(env);
        o.Set("name", names[i]);
        o.Set("rows", static_cast<double>(s.rows));
        o.Set("cols", static_cast<double>(s.cols));
        arr.Set(static_cast<uint32_t>(i), o);
      }
      return arr;
    });
  }

  // exportTensors() -> { [slot]: Float32Array } (copies of the fp32 weights; throws if any slot is unset)
  Napi::Value ExportTensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      Napi::Object out = Napi::Object::New(env);
      for (auto& [name, data] : model->copy_weights()) out.Set(name, to_float32(env, std::move(data)));
      return out;
    });
  }

  // exportAdamState() -> { step, m: { [slot]: Float32Array }, v: { [slot]: Float32Array } } (copies; empty
  // before the first trainStep)
  Napi::Value ExportAdamState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      pt::Model::AdamState st = live(env)->copy_adam_state();
      Napi::Object out = Napi::Object::New(env), m = Napi::Object::New(env), v = Napi::Object::New(env);
      for (auto& [name, mv] : st.moments) {
        m.Set(name, to_float32(env, std::move(mv.first)));
        v.Set(name, to_float32(env, std::move(mv.second)));
      }
      out.Set("step", static_cast<double>(st.step));
      out.Set("m", m);
      out.Set("v", v);
      return out;
    });
  }

  // importAdamState({ step, m, v }) -> undefined: AdamW's step count and moments of every slot (copies).
  Napi::Value ImportAdamState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      Napi::Object o = object_of(arg(info, 0, "state"), "state");
      pt::Model::AdamState st;
      st.step = int_of(o.Get("step"), "state.step", 0);
      Napi::Object m = object_of(o.Get("m"), "state.m"), v = object_of(o.Get("v"), "state.v");
      Napi::Array keys = m.GetPropertyNames();
      if (keys.Length() != v.GetPropertyNames().Length())
        throw Napi::RangeError::New(env, "state.m, state.v: expected the same slots");
      for (uint32_t i = 0; i < keys.Length(); ++i) {
        const std::string name = keys.Get(i).ToString().Utf8Value();
        auto mv = finite_view(env, m.Get(name), "state.m." + name, 0);
        auto vv = finite_view(env, v.Get(name), "state.v." + name, 0);
        st.moments.emplace(name, std::make_pair(std::vector<float>(mv.data, mv.data + mv.length),
                                                std::vector<float>(vv.data, vv.data + vv.length)));
      }
      model->set_adam_state(st);
      external_->set(env, static_cast<int64_t>(model->host_bytes()));
      return env.Undefined();
    });
  }

  // importTensors({ [slot]: Float32Array }) -> undefined (copies; each must hold rows x cols finite values)
  Napi::Value ImportTensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      Napi::Object o = object_of(arg(info, 0, "tensors"), "tensors");
      Napi::Array keys = o.GetPropertyNames();
      // Every tensor checked (finite values, then names and lengths) before any is written.
      std::vector<pt::Model::SlotValues> list;
      for (uint32_t i = 0; i < keys.Length(); ++i) {
        const std::string name = keys.Get(i).ToString().Utf8Value();
        auto view = finite_view(env, o.Get(name), "tensors." + name, 0);
        list.push_back({name, view.data, view.length});
      }
      model->set_slots(list);
      external_->set(env, static_cast<int64_t>(model->host_bytes()));
      return env.Undefined();
    });
  }

  static Napi::Object train_result(Napi::Env env, const pt::TrainStats& st) {
    Napi::Object out = Napi::Object::New(env);
    out.Set("loss", st.loss);
    out.Set("labelCount", static_cast<double>(st.label_count));
    return out;
  }

  // A training step's result: train_result plus the gradient norm before clipping and the step count.
  static Napi::Value step_result(Napi::Env env, const pt::TrainStats& st) {
    Napi::Object out = train_result(env, st);
    out.Set("gradNorm", st.grad_norm);
    out.Set("step", static_cast<double>(st.step));
    return out;
  }

  // Token-id batches only: the C++ side rejects prompts; labels are required.
  std::shared_ptr<OwnedArgs> parse_train_args(Napi::Env env, const pt::ModelConfig& c,
                                              const Napi::CallbackInfo& info) {
    Napi::Object o = object_of(arg(info, 0, "args"), "args");
    auto args = parse_args(env, c, o);
    if (!args->labels)
      throw Napi::TypeError::New(env, "labels: expected an Int32Array (required for training)");
    if (args->P > 0 || args->deep.kind != pt::DeepPrompts::Kind::None)
      throw Napi::TypeError::New(
          env, "full-parameter training takes token ids only: leave out prompt and deepPrompts");
    return args;
  }

  // trainGrads(args) -> Promise<{ loss, labelCount, gradients: { [slot]: Float32Array } }>
  Napi::Value TrainGrads(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      auto args = parse_train_args(env, model->config(), info);
      struct Result {
        pt::TrainStats stats;
        std::vector<std::pair<std::string, std::vector<float>>> grads;
      };
      auto result = std::make_shared<Result>();
      auto* worker = new PromiseWorker(
          env, [model, args, result]() { result->stats = model->train_grads(*args, &result->grads); },
          tracked(model, [result](Napi::Env env) -> Napi::Value {
            Napi::Object out = train_result(env, result->stats);
            Napi::Object grads = Napi::Object::New(env);
            for (auto& [name, g] : result->grads) grads.Set(name, to_float32(env, std::move(g)));
            out.Set("gradients", grads);
            return out;
          }));
      return worker->queue();
    });
  }

  // trainStep(args, { lr, beta1, beta2, eps, weightDecay, maxGradNorm })
  //   -> Promise<{ loss, labelCount, gradNorm, step }>
  Napi::Value TrainStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      auto args = parse_train_args(env, model->config(), info);
      const pt::AdamWConfig cfg = parse_adamw(info);
      auto result = std::make_shared<pt::TrainStats>();
      auto* worker = new PromiseWorker(
          env, [model, args, result, cfg]() { *result = model->train_step(*args, cfg); },
          tracked(model, [result](Napi::Env env) -> Napi::Value { return step_result(env, *result); }));
      return worker->queue();
    });
  }

  // { lr, beta1, beta2, eps, weightDecay, maxGradNorm } as the second argument.
  static pt::AdamWConfig parse_adamw(const Napi::CallbackInfo& info) {
    Napi::Object o = object_of(arg(info, 1, "adamw"), "adamw");
    pt::AdamWConfig cfg;
    auto num = [&](const char* key) { return number_of(o.Get(key), std::string("adamw.") + key); };
    cfg.lr = static_cast<float>(num("lr"));
    cfg.beta1 = static_cast<float>(num("beta1"));
    cfg.beta2 = static_cast<float>(num("beta2"));
    cfg.eps = static_cast<float>(num("eps"));
    cfg.weight_decay = static_cast<float>(num("weightDecay"));
    cfg.max_grad_norm = num("maxGradNorm");
    return cfg;
  }

  // fillRandom(seed, std) -> Promise<void>: synthetic weights for benchmarks (pt::Model::fill_random).
  Napi::Value FillRandom(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      const uint64_t seed = static_cast<uint64_t>(int_of(arg(info, 0, "seed"), "seed", 0));
      const double std_dev = number_of(arg(info, 1, "std"), "std");
      if (!(std_dev > 0.0) || !std::isfinite(std_dev))
        throw Napi::RangeError::New(env, "std: expected a finite value > 0");
      auto* worker = new PromiseWorker(
          env, [model, seed, std_dev]() { model->fill_random(seed, static_cast<float>(std_dev)); },
          tracked(model));
      return worker->queue();
    });
  }

  // --- CUDA backend (pt::DeviceModel) ---

  std::shared_ptr<pt::DeviceModel> device(Napi::Env env) {
    live(env);
    if (!device_)
      throw Napi::Error::New(env, "this model is not on a CUDA device (load it with backend \"cuda\")");
    return device_;
  }

  static Napi::Object memory_object(Napi::Env env, const pt::DeviceMemoryInfo& m,
                                    const std::string& precision) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("device", m.device);
    o.Set("precision", precision);
    o.Set("weightBytes", static_cast<double>(m.weights));
    o.Set("workspaceBytes", static_cast<double>(m.workspace));
    o.Set("deviceFreeBytes", static_cast<double>(m.device_free));
    o.Set("deviceTotalBytes", static_cast<double>(m.device_total));
    return o;
  }

  // attachCuda({ precision: "bf16" | "tf32" | "fp32", graphs: boolean }) -> Promise<memory info>: uploads the
  // weights; forward and lossAndGrad then run on the device.
  Napi::Value AttachCuda(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      Napi::Object o = object_of(arg(info, 0, "options"), "options");
      pt::CudaModelOptions opt;
      Napi::Value p = o.Get("precision");
      if (!p.IsUndefined()) opt.precision = precision_of(p, "precision");
      const std::string prec = pt::cuda::precision_name(opt.precision);
      Napi::Value g = o.Get("graphs");
      opt.graphs = g.IsUndefined() ? true : g.ToBoolean().Value();
      opt.profile = o.Get("profile").ToBoolean().Value();
      device_.reset();  // a model re-attached (other precision or graph setting) frees the old copy first
      auto holder = std::make_shared<std::shared_ptr<pt::DeviceModel>>();
      auto* self = this;
      auto* worker = new PromiseWorker(
          env,
          [model, holder, opt]() {
            auto weights = model->lock_weights();  // no load or training step rewrites a slot mid-upload
            *holder = std::shared_ptr<pt::DeviceModel>(pt::cuda_model(*model, opt));
          },
          [self, holder, prec](Napi::Env env) -> Napi::Value {
            if (!self->model_) return env.Undefined();  // disposed meanwhile: the upload is dropped
            self->device_ = *holder;
            return memory_object(env, self->device_->memory(), prec);
          });
      worker->keep(info.This());
      return worker->queue();
    });
  }

  // deviceMemory() -> { device, precision, weightBytes, workspaceBytes, deviceFreeBytes, deviceTotalBytes }
  Napi::Value DeviceMemory(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto d = device(env);
      return memory_object(env, d->memory(), d->precision());
    });
  }

  // deviceProfile() -> { [stage]: ms } summed since the last call (attachCuda({ profile: true }) only).
  Napi::Value DeviceProfile(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      Napi::Object out = Napi::Object::New(env);
      for (const auto& [stage, ms] : device(env)->profile()) out.Set(stage, ms);
      return out;
    });
  }

  // setTrainables({ prompt?, deepPrompts? }) -> Promise<void>: the device-resident tensors promptStep trains.
  Napi::Value SetTrainables(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto d = device(env);
      auto model = live(env);  // the device model reads the host model (config, RoPE tables) as it works
      auto args = std::make_shared<OwnedArgs>();
      parse_prompts(env, model->config(), object_of(arg(info, 0, "trainables"), "trainables"), *args);
      auto* worker = new PromiseWorker(
          env, [d, model, args]() { d->set_trainables(*args); }, nullptr);
      return worker->queue();
    });
  }

  // trainables(slot = "param") -> Promise<{ prompt?, deepPrompts?, step }>: copies of the device-resident
  // tensors ("param") or of AdamW's moments ("m", "v"), and the AdamW steps taken.
  Napi::Value Trainables(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto d = device(env);
      auto model = live(env);  // kept alive while the worker runs (see SetTrainables)
      using Trainable = pt::DeviceModel::Trainable;
      constexpr Trainable by_index[] = {Trainable::Param, Trainable::AdamM, Trainable::AdamV};
      const Trainable which = info.Length() > 0 && !info[0].IsUndefined()
                                  ? by_index[choice_of(info[0], "slot", {"param", "m", "v"})]
                                  : Trainable::Param;
      auto result = std::make_shared<pt::PromptTensors>();
      auto steps = std::make_shared<int64_t>(0);
      auto* worker = new PromiseWorker(
          env,
          [d, model, result, steps, which]() {
            *result = d->trainables(which);
            *steps = d->optimizer_steps();
          },
          [result, steps](Napi::Env env) -> Napi::Value {
            Napi::Object out = Napi::Object::New(env);
            if (!result->prompt.empty()) out.Set("prompt", to_float32(env, std::move(result->prompt)));
            if (result->kind != pt::DeepPrompts::Kind::None)
              out.Set("deepPrompts", deep_object(env, result->kind, result->layers, result->deep,
                                                 result->keys, result->values));
            out.Set("step", static_cast<double>(*steps));
            return out;
          });
      return worker->queue();
    });
  }

  // setOptimizerState(m, v, step) -> Promise<void>: AdamW's moments ({ prompt?, deepPrompts? } shaped as the
  // trainables) and step count, for a resumed run.
  Napi::Value SetOptimizerState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto d = device(env);
      auto model = live(env);  // kept alive while the worker runs (see SetTrainables)
      auto m = std::make_shared<OwnedArgs>();
      auto v = std::make_shared<OwnedArgs>();
      parse_prompts(env, model->config(), object_of(arg(info, 0, "m"), "m"), *m);
      parse_prompts(env, model->config(), object_of(arg(info, 1, "v"), "v"), *v);
      const int64_t step = int_of(arg(info, 2, "step"), "step", 0);
      auto* worker = new PromiseWorker(
          env, [d, model, m, v, step]() { d->set_optimizer_state(*m, *v, step); }, nullptr);
      return worker->queue();
    });
  }

  // promptStep({ inputIds, batch, seqLen, attentionMask?, labels }, adamw) -> Promise<{ loss, labelCount,
  // gradNorm, step }>: loss, gradients and one AdamW step of the device-resident trainables.
  Napi::Value PromptStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto d = device(env);
      auto model = live(env);  // kept alive while the worker runs (see SetTrainables)
      auto args = parse_args(env, model->config(), object_of(arg(info, 0, "args"), "args"));
      if (!args->labels)
        throw Napi::TypeError::New(env, "labels: expected an Int32Array (required for a step)");
      if (args->P > 0 || args->deep.kind != pt::DeepPrompts::Kind::None)
        throw Napi::TypeError::New(env,
                                   "promptStep trains the tensors given to setTrainables: leave out prompt "
                                   "and deepPrompts");
      const pt::AdamWConfig cfg = parse_adamw(info);
      auto result = std::make_shared<pt::TrainStats>();
      auto* worker = new PromiseWorker(
          env, [d, model, args, result, cfg]() { *result = d->prompt_step(*args, cfg); },
          [result](Napi::Env env) -> Napi::Value { return step_result(env, *result); });
      return worker->queue();
    });
  }

  std::shared_ptr<pt::Model> model_;
  // The host slots (weights; gradients and moments once trained), told to the garbage collector: set at
  // construction and again when a call that allocates them completes. Shared with those calls'
  // completions (on the JS thread), which may run after this wrapper is collected.
  std::shared_ptr<ExternalMemory> external_ = std::make_shared<ExternalMemory>();
  // A completion that reports the model's host memory anew, then returns `then(env)` (undefined if null).
  PromiseWorker::Complete tracked(std::shared_ptr<pt::Model> model, PromiseWorker::Complete then = nullptr) {
    return [external = external_, model, then](Napi::Env env) -> Napi::Value {
      external->set(env, static_cast<int64_t>(model->host_bytes()));
      return then ? then(env) : env.Undefined();
    };
  }
  std::shared_ptr<pt::DeviceModel> device_;
};

}  // namespace

void init_model(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeModel", ModelWrap::Define(env));
}

}  // namespace ptn
