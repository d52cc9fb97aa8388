// Node-API wrapper of pt::Model: construction from a plain config object, asynchronous weight loading,
// asynchronous forward, and dispose(). The wrapped model is held by shared_ptr so a worker still running
// after dispose() keeps it alive until it finishes; calls after dispose() throw "Model is disposed".
#include "priortune/model.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "common.h"
#include "modules.h"

namespace ptn {
namespace {

int64_t get_int(const Napi::Object& o, const char* key, int64_t fallback, int64_t min_value = INT64_MIN) {
  Napi::Value v = o.Get(key);
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
                        InstanceMethod("tokenEmbeddings", &ModelWrap::TokenEmbeddings),
                        InstanceMethod("weightBytes", &ModelWrap::WeightBytes),
                        InstanceMethod("dispose", &ModelWrap::Dispose)});
  }

  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    Napi::Env env = info.Env();
    guarded(env, [&]() -> Napi::Value {
      Napi::Object o = object_of(arg(info, 0, "config"), "config");
      pt::ModelConfig c;
      Napi::Value arch = o.Get("architecture");
      std::string a = arch.IsString() ? arch.As<Napi::String>().Utf8Value() : "";
      if (a == "gpt2")
        c.arch = pt::Arch::GPT2;
      else if (a == "llama")
        c.arch = pt::Arch::Llama;
      else
        throw_type(env, "config.architecture", "\"gpt2\" or \"llama\"", arch);
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
      c.threads = static_cast<int>(get_int(o, "threads", 1, 1));
      model_ = std::make_shared<pt::Model>(c);
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
        std::string target, file;
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
            for (const Entry& e : *entries)
              model->load_tensor(e.target, e.row_offset, e.file, e.offset, e.dtype, e.rows, e.cols,
                                 e.transpose);
          },
          nullptr);
      return worker->queue();
    });
  }

  Napi::Value CheckComplete(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      live(env)->check_complete();
      return env.Undefined();
    });
  }

  // forward({ inputIds, batch, seqLen, attentionMask?, prompt?, promptLength?, labels?, hiddenStates?,
  //           logits? }) -> Promise<{ logits?, hiddenStates[], loss?, labelCount }>
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto model = live(env);
      const pt::ModelConfig& c = model->config();
      Napi::Object o = object_of(arg(info, 0, "args"), "args");
      auto args = std::make_shared<pt::ForwardArgs>();
      args->B = int_of(o.Get("batch"), "batch", 1);
      args->T = int_of(o.Get("seqLen"), "seqLen", 1);
      const size_t BT = static_cast<size_t>(args->B * args->T);
      Napi::Value ids_v = o.Get("inputIds");
      auto ids = view_of_length<int32_t>(ids_v, "inputIds", BT);
      for (size_t i = 0; i < BT; ++i)
        if (ids.data[i] < 0 || ids.data[i] >= c.vocab)
          throw Napi::RangeError::New(env,
                                      "inputIds[" + std::to_string(i) + "] = " + std::to_string(ids.data[i]) +
                                          " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");
      args->ids = ids.data;
      std::vector<Napi::Value> keep{ids_v};  // inputs the worker reads: referenced until it finishes
      Napi::Value mask_v = o.Get("attentionMask");
      if (!mask_v.IsUndefined() && !mask_v.IsNull()) {
        args->mask = view_of_length<uint8_t>(mask_v, "attentionMask", BT).data;
        keep.push_back(mask_v);
      }
      Napi::Value labels_v = o.Get("labels");
      if (!labels_v.IsUndefined() && !labels_v.IsNull()) {
        auto labels = view_of_length<int32_t>(labels_v, "labels", BT);
        for (size_t i = 0; i < BT; ++i)
          if (labels.data[i] != -100 && (labels.data[i] < 0 || labels.data[i] >= c.vocab))
            throw Napi::RangeError::New(env, "labels[" + std::to_string(i) +
                                                 "] = " + std::to_string(labels.data[i]) +
                                                 " is neither -100 nor inside the vocabulary");
        args->labels = labels.data;
        keep.push_back(labels_v);
      }
      Napi::Value prompt_v = o.Get("prompt");
      if (!prompt_v.IsUndefined() && !prompt_v.IsNull()) {
        auto prompt = view_of<float>(prompt_v, "prompt");
        if (prompt.length == 0 || prompt.length % c.hidden != 0)
          throw Napi::RangeError::New(env, "prompt: expected a non-empty multiple of hiddenSize (" +
                                               std::to_string(c.hidden) + ") elements, got " +
                                               std::to_string(prompt.length));
        for (size_t i = 0; i < prompt.length; ++i)
          if (!std::isfinite(prompt.data[i]))
            throw Napi::RangeError::New(env, "prompt[" + std::to_string(i) + "] is not finite");
        args->prompt = prompt.data;
        args->P = static_cast<int64_t>(prompt.length) / c.hidden;
        keep.push_back(prompt_v);
      }
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

      auto result = std::make_shared<pt::ForwardResult>();
      auto* worker = new PromiseWorker(
          env, [model, args, result]() { *result = model->forward(*args); },
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
      for (const auto& v : keep) worker->keep(v);
      return worker->queue();
    });
  }

  Napi::Value TokenEmbeddings(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto model = live(env);
    const std::vector<float>& e = model->token_embeddings();
    return to_float32(env, std::vector<float>(e));
  }

  Napi::Value WeightBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(live(info.Env())->weight_bytes()));
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    model_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<pt::Model> model_;
};

}  // namespace

void init_model(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeModel", ModelWrap::Define(env));
}

}  // namespace ptn
