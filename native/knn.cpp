// Node-API glue of the exact nearest-neighbour index (kernels/cpu/knn.cpp, kernels/cuda/knn.cu) and of the
// float64 linear algebra behind the collapse metrics (kernels/cpu/collapse_linalg.cpp).
//
// NativeKnnIndex: build() (async: copies, normalises and packs the rows, or uploads them to the device),
// search() and searchRows() (async), rowsAt(), info(), dispose(). The index is held by shared_ptr, so a
// search still running after dispose() keeps it alive until it finishes; calls after dispose() throw "Index
// is disposed". Every typed-array input is copied before the worker starts (common.h: owned()): a worker
// reading a JS array in place could read freed memory if the caller transferred or resized its buffer
// meanwhile. build()'s copy of the vocabulary is the one the index keeps (no second copy).
#include "knn.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "common.h"
#include "modules.h"
#include "priortune/collapse.h"

namespace ptn {
namespace {

Napi::Object result_object(Napi::Env env, pt::KnnResult&& r) {
  Napi::Object o = Napi::Object::New(env);
  const double recovered = static_cast<double>(r.recovered_queries), device_ms = r.device_ms,
               screen_ms = r.device_screen_ms;
  o.Set("indices", to_int32(env, std::move(r.indices)));
  o.Set("scores", to_float32(env, std::move(r.scores)));
  o.Set("recoveredQueries", recovered);
  o.Set("deviceMs", device_ms);
  o.Set("deviceScreenMs", screen_ms);
  return o;
}

// Marks NativeKnnIndex objects, so that knn_index_of() can tell them from other wrapped objects.
constexpr napi_type_tag kKnnIndexTag = {0x7072696f7274756eULL, 0x6b6e6e696e646578ULL};

class KnnIndexWrap : public Napi::ObjectWrap<KnnIndexWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(
        env, "NativeKnnIndex",
        {InstanceMethod("build", &KnnIndexWrap::Build), InstanceMethod("search", &KnnIndexWrap::Search),
         InstanceMethod("searchRows", &KnnIndexWrap::SearchRows),
         InstanceMethod("rowsAt", &KnnIndexWrap::RowsAt), InstanceMethod("info", &KnnIndexWrap::Info),
         InstanceMethod("dispose", &KnnIndexWrap::Dispose)});
  }

  explicit KnnIndexWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<KnnIndexWrap>(info) {
    Value().TypeTag(&kKnnIndexTag);
  }

  std::shared_ptr<const pt::KnnIndex> live(Napi::Env env) {
    if (disposed_) throw Napi::Error::New(env, "Index is disposed");
    if (!index_) throw Napi::Error::New(env, "Index is not built yet (await build() first)");
    return index_;
  }

 private:
  // build(vocab: Float32Array, dim, metric, backend: "cpu" | "cuda", threads) -> Promise<void>
  Napi::Value Build(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      if (index_ || building_ || disposed_)
        throw Napi::Error::New(env, "build: this index was already built");
      View<float> vocab = view_of<float>(arg(info, 0, "vocab"), "vocab");
      const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1);
      const int64_t V = rows_of(vocab, d, "vocab", env);
      if (!arg(info, 2, "metric").IsString())
        throw_type(env, "metric", "\"cosine\", \"l2\" or \"dot\"", info[2]);
      const pt::KnnMetric metric = pt::knn_metric_from_name(info[2].As<Napi::String>().Utf8Value());
      if (!arg(info, 3, "backend").IsString()) throw_type(env, "backend", "\"cpu\" or \"cuda\"", info[3]);
      const std::string backend = info[3].As<Napi::String>().Utf8Value();
      if (backend != "cpu" && backend != "cuda")
        throw Napi::TypeError::New(env, "backend: expected \"cpu\" or \"cuda\", got \"" + backend + "\"");
      const int threads = threads_of(info, 4);
      auto slot = std::make_shared<std::shared_ptr<const pt::KnnIndex>>();
      // Copied for the worker, as owned() does; the index takes the copy over as its rows.
      auto rows = std::make_shared<pt::HostFloats>(pt::host_copy(vocab.data, vocab.length, threads));
      building_ = true;
      auto* worker = new PromiseWorker(
          env,
          [slot, rows, d, metric, backend, threads]() {
            // Both indexes check the rows in their norm passes (naming the first bad row and column).
            if (backend == "cuda")
              *slot = pt::knn_index_cuda(std::move(*rows), d, metric);
            else
              *slot = pt::knn_index_cpu(std::move(*rows), d, metric, threads);
          },
          [this, slot](Napi::Env e) -> Napi::Value {
            building_ = false;
            if (disposed_) return e.Undefined();  // disposed while building: drop the index
            index_ = *slot;
            external_.set(e, index_->host_bytes());
            return e.Undefined();
          });
      worker->on_error([this]() { building_ = false; });  // a failed build leaves the index buildable
      worker->keep(Value());
      return worker->queue();
    });
  }

  // search(queries: Float32Array, k, threads) -> Promise<{ indices, scores, recoveredQueries }>
  Napi::Value Search(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto index = live(env);
      View<float> q = view_of<float>(arg(info, 0, "queries"), "queries");
      const int64_t d = index->dim(), Q = rows_of(q, d, "queries", env);
      const int64_t k = int_of(arg(info, 1, "k"), "k", 1);
      const int threads = threads_of(info, 2);
      const Owned<float> queries = owned(q, threads);
      auto out = std::make_shared<pt::KnnResult>();
      auto* worker = new PromiseWorker(
          env,
          [index, queries, Q, d, k, threads, out]() {
            const std::string bad = pt::knn_check_rows(queries->data(), Q, d, threads);
            if (!bad.empty()) throw std::invalid_argument("queries: " + bad);
            *out = index->search(queries->data(), Q, k, nullptr, threads);
          },
          [out](Napi::Env e) -> Napi::Value { return result_object(e, std::move(*out)); });
      return worker->queue();
    });
  }

  // searchRows(rows: Int32Array, k, threads, excludeSelf: boolean) -> Promise<{ indices, scores, ... }>:
  // the index's own rows as queries; with excludeSelf each row's own index is never returned (self-search).
  Napi::Value SearchRows(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto index = live(env);
      View<int32_t> r = view_of<int32_t>(arg(info, 0, "rows"), "rows");
      const int64_t k = int_of(arg(info, 1, "k"), "k", 1);
      const int threads = threads_of(info, 2);
      const bool exclude_self = info.Length() > 3 && info[3].ToBoolean().Value();
      const int64_t V = index->rows();
      for (size_t i = 0; i < r.length; ++i)
        if (r.data[i] < 0 || r.data[i] >= V)
          throw Napi::RangeError::New(env, "rows: element " + std::to_string(i) + " is " +
                                               std::to_string(r.data[i]) + ", outside the index's rows [0, " +
                                               std::to_string(V) + ")");
      auto ids = std::make_shared<std::vector<int32_t>>(r.data, r.data + r.length);
      auto out = std::make_shared<pt::KnnResult>();
      auto* worker = new PromiseWorker(
          env,
          [index, ids, k, threads, exclude_self, out]() {
            const int64_t d = index->dim(), Q = static_cast<int64_t>(ids->size());
            std::vector<float> queries(static_cast<size_t>(Q * d));
            for (int64_t i = 0; i < Q; ++i) std::copy_n(index->row((*ids)[i]), d, queries.begin() + i * d);
            *out = index->search(queries.data(), Q, k, exclude_self ? ids->data() : nullptr, threads);
          },
          [out](Napi::Env e) -> Napi::Value { return result_object(e, std::move(*out)); });
      return worker->queue();
    });
  }

  // rowsAt(ids: Int32Array) -> Float32Array (knn.h)
  Napi::Value RowsAt(const Napi::CallbackInfo& info) { return knn_rows_at(info, *live(info.Env())); }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto index = live(env);
    Napi::Object o = Napi::Object::New(env);
    o.Set("rows", static_cast<double>(index->rows()));
    o.Set("dim", static_cast<double>(index->dim()));
    o.Set("metric", pt::knn_metric_name(index->metric()));
    o.Set("backend", index->backend());
    o.Set("hostBytes", static_cast<double>(index->host_bytes()));
    o.Set("deviceBytes", static_cast<double>(index->device_bytes()));
    return o;
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    index_.reset();
    external_.clear();
    disposed_ = true;
    return info.Env().Undefined();
  }

  std::shared_ptr<const pt::KnnIndex> index_;
  ExternalMemory external_;
  bool building_ = false, disposed_ = false;
};

// knnSearchOnce(queries, vocab, dim, metric, k, threads) -> Promise<{ indices, scores, recoveredQueries }>:
// a one-shot CPU search over a copy of the vocabulary (no packed copy).
Napi::Value KnnSearchOnce(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    View<float> q = view_of<float>(arg(info, 0, "queries"), "queries");
    View<float> vocab = view_of<float>(arg(info, 1, "vocab"), "vocab");
    const int64_t d = int_of(arg(info, 2, "dim"), "dim", 1);
    const int64_t Q = rows_of(q, d, "queries", env), V = rows_of(vocab, d, "vocab", env);
    if (!arg(info, 3, "metric").IsString())
      throw_type(env, "metric", "\"cosine\", \"l2\" or \"dot\"", info[3]);
    const pt::KnnMetric metric = pt::knn_metric_from_name(info[3].As<Napi::String>().Utf8Value());
    const int64_t k = int_of(arg(info, 4, "k"), "k", 1);
    const int threads = threads_of(info, 5);
    const Owned<float> queries = owned(q, threads), rows = owned(vocab, threads);
    auto out = std::make_shared<pt::KnnResult>();
    auto* worker = new PromiseWorker(
        env,
        [queries, rows, Q, V, d, metric, k, threads, out]() {
          auto index = pt::knn_index_cpu_borrowed(rows->data(), V, d, metric, threads);  // (checks the rows)
          const std::string bad = pt::knn_check_rows(queries->data(), Q, d, threads);
          if (!bad.empty()) throw std::invalid_argument("queries: " + bad);
          *out = index->search(queries->data(), Q, k, nullptr, threads);
        },
        [out](Napi::Env e) -> Napi::Value { return result_object(e, std::move(*out)); });
    return worker->queue();
  });
}

// mahalanobisSquared(vectors: Float32Array, dim, mean: Float64Array, cholesky: Float64Array, threads)
//   -> Promise<Float64Array>
Napi::Value MahalanobisSquared(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    View<float> x = view_of<float>(arg(info, 0, "vectors"), "vectors");
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1), n = rows_of(x, d, "vectors", env);
    View<double> mean = view_of_length<double>(arg(info, 2, "mean"), "mean", d);
    View<double> L = square_view<double>(arg(info, 3, "cholesky"), "cholesky", d);
    const int threads = threads_of(info, 4);
    const Owned<float> xc = owned(x, threads);
    const Owned<double> mc = owned(mean, threads), lc = owned(L, threads);
    auto out = std::make_shared<std::vector<double>>(n);
    auto* worker = new PromiseWorker(
        env,
        [xc, n, d, mc, lc, threads, out]() {
          pt::collapse_mahalanobis_sq(out->data(), xc->data(), n, d, mc->data(), lc->data(), threads);
        },
        [out](Napi::Env e) -> Napi::Value { return to_float64(e, std::move(*out)); });
    return worker->queue();
  });
}

// meanDistances(queries: Float32Array, rows: Float32Array, dim, threads) -> Promise<Float64Array>
Napi::Value MeanDistances(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    View<float> q = view_of<float>(arg(info, 0, "queries"), "queries"),
                r = view_of<float>(arg(info, 1, "rows"), "rows");
    const int64_t d = int_of(arg(info, 2, "dim"), "dim", 1);
    const int64_t nq = rows_of(q, d, "queries", env), nr = rows_of(r, d, "rows", env);
    const int threads = threads_of(info, 3);
    const Owned<float> qc = owned(q, threads), rc = owned(r, threads);
    auto out = std::make_shared<std::vector<double>>(nq);
    auto* worker = new PromiseWorker(
        env,
        [qc, rc, nq, nr, d, threads, out]() {
          pt::collapse_mean_distances(out->data(), qc->data(), nq, rc->data(), nr, d, threads);
        },
        [out](Napi::Env e) -> Napi::Value { return to_float64(e, std::move(*out)); });
    return worker->queue();
  });
}

// gramEigenvalues(x: Float32Array, dim, threads) -> Promise<Float64Array> (descending; squared singular
// values)
Napi::Value GramEigenvalues(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    View<float> x = view_of<float>(arg(info, 0, "x"), "x");
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1), n = rows_of(x, d, "x", env);
    const int threads = threads_of(info, 2);
    const Owned<float> xc = owned(x, threads);
    auto out = std::make_shared<std::vector<double>>();
    auto* worker = new PromiseWorker(
        env, [xc, n, d, threads, out]() { *out = pt::collapse_gram_eigenvalues(xc->data(), n, d, threads); },
        [out](Napi::Env e) -> Napi::Value { return to_float64(e, std::move(*out)); });
    return worker->queue();
  });
}

// knnDots4(isa, yDouble, x: Float32Array(n), y: Float32Array(4n)) -> Float64Array(16) | null: a test hook
// (pt::knn_dots4_test); null where this CPU lacks the instruction set.
Napi::Value KnnDots4(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const Napi::Value isa = arg(info, 0, "isa"), wide = arg(info, 1, "yDouble");
    if (!isa.IsString()) throw_type(env, "isa", "a string", isa);
    if (!wide.IsBoolean()) throw_type(env, "yDouble", "a boolean", wide);
    View<float> x = view_of<float>(arg(info, 2, "x"), "x"), y = view_of<float>(arg(info, 3, "y"), "y");
    if (x.length < 1 || y.length != 4 * x.length)
      throw Napi::RangeError::New(env, "y: expected 4 x the length of x (" + std::to_string(4 * x.length) +
                                           "), got " + std::to_string(y.length));
    std::vector<double> out(16);
    if (!pt::knn_dots4_test(isa.As<Napi::String>().Utf8Value(), wide.As<Napi::Boolean>().Value(), x.data,
                            y.data, static_cast<int64_t>(x.length), out.data()))
      return env.Null();
    return to_float64(env, std::move(out));
  });
}

}  // namespace

std::shared_ptr<const pt::KnnIndex> knn_index_of(const Napi::Value& v) {
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kKnnIndexTag)) return nullptr;
  return KnnIndexWrap::Unwrap(v.As<Napi::Object>())->live(v.Env());
}

Napi::Value knn_rows_at(const Napi::CallbackInfo& info, const pt::KnnIndex& index) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    View<int32_t> ids = view_of<int32_t>(arg(info, 0, "ids"), "ids");
    const int64_t V = index.rows(), d = index.dim();
    for (size_t i = 0; i < ids.length; ++i)
      if (ids.data[i] < 0 || ids.data[i] >= V)
        throw Napi::RangeError::New(env, "ids: element " + std::to_string(i) + " is " +
                                             std::to_string(ids.data[i]) + ", outside the index's rows [0, " +
                                             std::to_string(V) + ")");
    std::vector<float> out(ids.length * static_cast<size_t>(d));
    for (size_t i = 0; i < ids.length; ++i) std::copy_n(index.row(ids.data[i]), d, out.begin() + i * d);
    return to_float32(env, std::move(out));
  });
}

void init_knn(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeKnnIndex", KnnIndexWrap::Define(env));
  exports.Set("knnSearchOnce", Napi::Function::New(env, KnnSearchOnce, "knnSearchOnce"));
  exports.Set("knnDots4", Napi::Function::New(env, KnnDots4, "knnDots4"));
  exports.Set("mahalanobisSquared", Napi::Function::New(env, MahalanobisSquared, "mahalanobisSquared"));
  exports.Set("meanDistances", Napi::Function::New(env, MeanDistances, "meanDistances"));
  exports.Set("gramEigenvalues", Napi::Function::New(env, GramEigenvalues, "gramEigenvalues"));
}

}  // namespace ptn
