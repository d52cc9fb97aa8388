// Node-API glue shared by every native module: argument checks that name the argument, zero-copy views of
// typed arrays, external (zero-copy) outputs, and a promise-returning async worker.
//
// Rules (../README.md, design notes): nothing here aborts the process. Every failure becomes a JS error
// whose message names the argument and what was expected. Heavy work runs in PromiseWorker::Execute, which
// never touches JS values and turns every C++ exception into a rejected promise.
#pragma once
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "priortune/cuda_ops.h"
#include "priortune/host_array.h"

namespace ptn {

inline std::string type_name(const Napi::Value& v) {
  if (v.IsUndefined()) return "undefined";
  if (v.IsNull()) return "null";
  if (v.IsTypedArray()) {
    switch (v.As<Napi::TypedArray>().TypedArrayType()) {
      case napi_float32_array:
        return "Float32Array";
      case napi_float64_array:
        return "Float64Array";
      case napi_int32_array:
        return "Int32Array";
      case napi_uint32_array:
        return "Uint32Array";
      case napi_uint8_array:
        return "Uint8Array";
      default:
        return "another typed array";
    }
  }
  if (v.IsArray()) return "Array";
  if (v.IsNumber()) return "number";
  if (v.IsString()) return "string";
  if (v.IsBoolean()) return "boolean";
  if (v.IsFunction()) return "function";
  return "object";
}

[[noreturn]] inline void throw_type(Napi::Env env, const std::string& name, const std::string& expected,
                                    const Napi::Value& got) {
  throw Napi::TypeError::New(env, name + ": expected " + expected + ", got " + type_name(got));
}

// A non-owning view of a typed array's elements (the JS object must be kept alive while it is used).
template <class T>
struct View {
  T* data = nullptr;
  size_t length = 0;
};

template <class T>
constexpr napi_typedarray_type typed_array_kind();
template <>
constexpr napi_typedarray_type typed_array_kind<float>() {
  return napi_float32_array;
}
template <>
constexpr napi_typedarray_type typed_array_kind<int32_t>() {
  return napi_int32_array;
}
template <>
constexpr napi_typedarray_type typed_array_kind<uint8_t>() {
  return napi_uint8_array;
}
template <>
constexpr napi_typedarray_type typed_array_kind<double>() {
  return napi_float64_array;
}

template <class T>
const char* typed_array_label() {
  switch (typed_array_kind<T>()) {
    case napi_float32_array:
      return "Float32Array";
    case napi_int32_array:
      return "Int32Array";
    case napi_uint8_array:
      return "Uint8Array";
    default:
      return "Float64Array";
  }
}

template <class T>
View<T> view_of(const Napi::Value& v, const std::string& name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != typed_array_kind<T>())
    throw_type(v.Env(), name, typed_array_label<T>(), v);
  // The typed array's own data pointer (offset included): going through its buffer fails on a
  // SharedArrayBuffer, which napi_get_arraybuffer_info refuses.
  auto ta = v.As<Napi::TypedArrayOf<T>>();
  return View<T>{ta.Data(), ta.ElementLength()};
}

template <class T>
View<T> view_of_length(const Napi::Value& v, const std::string& name, size_t expected) {
  View<T> view = view_of<T>(v, name);
  if (view.length != expected)
    throw Napi::RangeError::New(v.Env(), name + ": expected " + std::to_string(expected) + " elements, got " +
                                             std::to_string(view.length));
  return view;
}

inline int64_t int_of(const Napi::Value& v, const std::string& name, int64_t min_value = INT64_MIN) {
  if (!v.IsNumber()) throw_type(v.Env(), name, "an integer", v);
  double d = v.As<Napi::Number>().DoubleValue();
  // NaN, infinities and magnitudes of 2^63 or more fail before the cast (which would be undefined for them).
  if (!(d > -9.2e18 && d < 9.2e18) || d != static_cast<double>(static_cast<int64_t>(d)))
    throw Napi::TypeError::New(v.Env(), name + ": expected an integer, got " + std::to_string(d));
  if (static_cast<int64_t>(d) < min_value)
    throw Napi::RangeError::New(v.Env(), name + ": expected an integer >= " + std::to_string(min_value) +
                                             ", got " + std::to_string(static_cast<int64_t>(d)));
  return static_cast<int64_t>(d);
}

// The element count of a shape (each size >= 0): a RangeError naming `what` where the product passes 2^53,
// the longest a typed array can be. Shapes multiplied unchecked in int64 wrap, and a wrapped count can pass
// a length check and send a kernel far past the arrays.
inline size_t count_of(Napi::Env env, const std::string& what, std::initializer_list<int64_t> sizes) {
  int64_t n = 1;
  for (int64_t x : sizes)
    if (x < 0 || __builtin_mul_overflow(n, x, &n) || n > (int64_t{1} << 53))
      throw Napi::RangeError::New(env, what + ": the sizes multiply to more than 2^53 elements");
  return static_cast<size_t>(n);
}

// A dim x dim matrix argument (row-major), its element count checked by count_of before the length.
template <class T>
View<T> square_view(const Napi::Value& v, const std::string& name, int64_t d) {
  return view_of_length<T>(v, name, count_of(v.Env(), name, {d, d}));
}

// A size argument: an integer from min_value to 2^32 (so that sums of a few sizes cannot overflow either).
inline int64_t size_of(const Napi::Value& v, const std::string& name, int64_t min_value) {
  const int64_t x = int_of(v, name, min_value);
  if (x > (int64_t{1} << 32))
    throw Napi::RangeError::New(v.Env(), name + ": expected at most 2^32, got " + std::to_string(x));
  return x;
}

inline double number_of(const Napi::Value& v, const std::string& name) {
  if (!v.IsNumber()) throw_type(v.Env(), name, "a number", v);
  return v.As<Napi::Number>().DoubleValue();
}

// A string that must be one of `options`: its index there (else a TypeError listing them: "a", "b" or "c").
inline size_t choice_of(const Napi::Value& v, const std::string& name,
                        std::initializer_list<const char*> options) {
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  std::string expected;
  size_t i = 0;
  for (const char* o : options) {
    if (s == o) return i;
    expected += std::string(i == 0 ? "" : i + 1 == options.size() ? " or " : ", ") + "\"" + o + "\"";
    ++i;
  }
  throw_type(v.Env(), name, expected, v);
}

// "bf16" | "tf32" | "fp32" -> the CUDA matrix-product precision.
inline pt::cuda::GemmPrecision precision_of(const Napi::Value& v, const std::string& name) {
  constexpr pt::cuda::GemmPrecision by_index[] = {
      pt::cuda::GemmPrecision::BF16, pt::cuda::GemmPrecision::TF32, pt::cuda::GemmPrecision::FP32};
  return by_index[choice_of(v, name, {"bf16", "tf32", "fp32"})];
}

inline Napi::Object object_of(const Napi::Value& v, const std::string& name) {
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray()) throw_type(v.Env(), name, "an object", v);
  return v.As<Napi::Object>();
}

inline Napi::Value arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i) throw Napi::TypeError::New(info.Env(), std::string(name) + ": missing argument");
  return info[i];
}

// Moves a vector into an ArrayBuffer that owns it (freed by the JS garbage collector): no copy.
template <class T>
Napi::ArrayBuffer external_buffer(Napi::Env env, std::vector<T>&& data) {
  auto* owned = new std::vector<T>(std::move(data));
  if (owned->empty()) {
    delete owned;
    return Napi::ArrayBuffer::New(env, 0);
  }
  return Napi::ArrayBuffer::New(
      env, owned->data(), owned->size() * sizeof(T), [](Napi::Env, void*, std::vector<T>* p) { delete p; },
      owned);
}

inline Napi::Float32Array to_float32(Napi::Env env, std::vector<float>&& data) {
  size_t n = data.size();
  return Napi::Float32Array::New(env, n, external_buffer(env, std::move(data)), 0);
}

inline Napi::Int32Array to_int32(Napi::Env env, std::vector<int32_t>&& data) {
  size_t n = data.size();
  return Napi::Int32Array::New(env, n, external_buffer(env, std::move(data)), 0);
}

inline Napi::Float64Array to_float64(Napi::Env env, std::vector<double>&& data) {
  size_t n = data.size();
  return Napi::Float64Array::New(env, n, external_buffer(env, std::move(data)), 0);
}

// A thread count: 1 to 1024 (OpenMP ends the process when it cannot create the threads asked for, so a
// mistyped count must be an error here).
inline int threads_value(const Napi::Value& v, const std::string& name) {
  const int64_t t = int_of(v, name, 1);
  if (t > 1024)
    throw Napi::RangeError::New(v.Env(), name + ": expected at most 1024, got " + std::to_string(t));
  return static_cast<int>(t);
}

// The optional `threads` argument at position i (default 1).
inline int threads_of(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || info[i].IsUndefined()) return 1;
  return threads_value(info[i], "threads");
}

// Rows of a row-major matrix of width d held in a typed array; its length must be a non-zero multiple of d.
template <class T>
int64_t rows_of(const View<T>& v, int64_t d, const std::string& name, Napi::Env env) {
  if (v.length == 0 || v.length % static_cast<size_t>(d) != 0)
    throw Napi::RangeError::New(env, name + ": expected a non-empty length that is a multiple of dim (" +
                                         std::to_string(d) + "), got " + std::to_string(v.length));
  return static_cast<int64_t>(v.length / static_cast<size_t>(d));
}

// Throws naming the first non-finite element by row and column.
template <class T>
void require_finite(const View<T>& v, int64_t d, const std::string& name, Napi::Env env) {
  for (size_t i = 0; i < v.length; ++i)
    if (!std::isfinite(static_cast<double>(v.data[i])))
      throw Napi::RangeError::New(env, name + ": row " + std::to_string(i / d) + ", column " +
                                           std::to_string(i % d) + " is not finite");
}

// An owned copy of a typed array's elements, for a worker thread to read. A worker must not read a JS array
// in place: keeping the array referenced stops its collection, not a transfer of its buffer
// (structuredClone, postMessage), a detach or a resize, after which the memory can be freed or unmapped
// while the worker reads it. The copy is one pass over memory on the JS thread (in parallel for large arrays:
// pt::host_copy), small beside the work of the calls that take it.
template <class T>
using Owned = std::shared_ptr<const pt::HostArray<T>>;
// threads: the call's thread count where it has one (0: OpenMP's default).
template <class T>
Owned<T> owned(const View<T>& v, int threads = 0) {
  return std::make_shared<const pt::HostArray<T>>(pt::host_copy(v.data, v.length, threads));
}
using Copies = std::vector<Owned<float>>;  // a call's copied float inputs (kept with its arguments)

// Runs `execute` on the libuv thread pool and resolves with `complete(env)` on the JS thread.
// Objects passed to keep() stay referenced (not collected) until the worker finishes: the receiver of a
// method, say. Typed-array inputs are not read through such a reference but copied first (owned()).
class PromiseWorker : public Napi::AsyncWorker {
 public:
  using Execute_ = std::function<void()>;
  using Complete = std::function<Napi::Value(Napi::Env)>;

  PromiseWorker(Napi::Env env, Execute_ execute, Complete complete)
      : Napi::AsyncWorker(env, "priortune"),
        deferred_(Napi::Promise::Deferred::New(env)),
        execute_(std::move(execute)),
        complete_(std::move(complete)) {}

  void keep(const Napi::Value& v) {
    if (v.IsObject()) refs_.push_back(Napi::Persistent(v.As<Napi::Object>()));
  }
  // Runs on the main thread when the work fails, before the promise rejects (undoing what the call began).
  void on_error(std::function<void()> f) { on_error_ = std::move(f); }

  Napi::Promise queue() {
    Napi::Promise p = deferred_.Promise();
    Queue();
    return p;
  }

 protected:
  void Execute() override {
    try {
      execute_();
    } catch (const std::exception& e) {
      SetError(e.what());
    } catch (...) {
      SetError("priortune: unknown native error");
    }
  }
  // Both settle the promise; when that itself fails, the environment is being torn down (a worker thread
  // ended while the call ran) and no JS can run: nothing is left to tell, and an exception escaping here
  // would end the whole process (std::terminate), so it is dropped.
  void OnOK() override {
    Napi::Env env = Env();
    try {
      try {
        deferred_.Resolve(complete_ ? complete_(env) : env.Undefined());
      } catch (const Napi::Error& e) {
        deferred_.Reject(e.Value());
      } catch (const std::exception& e) {
        deferred_.Reject(Napi::Error::New(env, e.what()).Value());
      }
    } catch (...) {
    }
  }
  void OnError(const Napi::Error& e) override {
    try {
      if (on_error_) on_error_();
      deferred_.Reject(e.Value());
    } catch (...) {
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  Execute_ execute_;
  Complete complete_;
  std::function<void()> on_error_;
  std::vector<Napi::ObjectReference> refs_;
};

// Host memory a wrapped object holds, told to V8 (napi_adjust_external_memory) so that garbage collection
// weighs it: an undisposed vocabulary index of 150 MB is otherwise a few bytes to the collector, and
// forgotten ones pile up until the machine runs out. set() reports the current size (again as it changes),
// clear() (dispose, the destructor) takes it back for good: a set() after it (a call that finishes after
// dispose) reports nothing. The C call, not node-addon-api's: it must not throw from a destructor. JS
// thread only.
class ExternalMemory {
 public:
  void set(napi_env env, int64_t bytes) {
    if (!closed_) adjust(env, bytes - bytes_);
  }
  void clear() noexcept {
    if (env_ && bytes_) adjust(env_, -bytes_);
    closed_ = true;
  }
  ~ExternalMemory() { clear(); }

 private:
  void adjust(napi_env env, int64_t delta) noexcept {
    env_ = env;
    int64_t total = 0;
    if (delta != 0 && napi_adjust_external_memory(env, delta, &total) == napi_ok) bytes_ += delta;
  }
  napi_env env_ = nullptr;
  int64_t bytes_ = 0;
  bool closed_ = false;
};

// Runs `body`, converting C++ exceptions thrown synchronously into JS errors.
template <class F>
Napi::Value guarded(Napi::Env env, F&& body) {
  try {
    return body();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::invalid_argument& e) {
    throw Napi::TypeError::New(env, e.what());
  } catch (const std::out_of_range& e) {
    throw Napi::RangeError::New(env, e.what());
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  } catch (...) {
    throw Napi::Error::New(env, "unknown native exception");
  }
}

}  // namespace ptn
