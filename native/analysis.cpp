// Node-API glue of the analysis linear algebra (kernels/cpu/analysis_linalg.cpp, and collapse_covariance of
// kernels/cpu/collapse_linalg.cpp). Every function is O(n^2 d) or O(d^3) and runs on the thread pool,
// returning a promise; the worker reads copies of the inputs (common.h: owned()).
#include "priortune/analysis.h"

#include <cmath>
#include <memory>

#include "common.h"
#include "modules.h"
#include "priortune/collapse.h"

namespace ptn {
namespace {

// A finite d x d Float64Array argument, copied for the worker.
Owned<double> square_matrix(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t d) {
  View<double> m = square_view<double>(arg(info, i, name), name, d);
  require_finite(m, d, name, info.Env());
  return owned(m);
}

// analysisSymmetricEigen(matrix: Float64Array, dim, vectors: boolean, threads)
//   -> Promise<{ values: Float64Array (descending), vectors: Float64Array | null (row k = eigenvector k) }>
Napi::Value SymmetricEigen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1);
    Owned<double> m = square_matrix(info, 0, "matrix", d);
    const bool want = arg(info, 2, "vectors").ToBoolean().Value();
    const int threads = threads_of(info, 3);
    struct Out {
      std::vector<double> values, vectors;
    };
    auto out = std::make_shared<Out>();
    auto* worker = new PromiseWorker(
        env,
        [m, d, want, threads, out]() {
          out->values.resize(static_cast<size_t>(d));
          if (want) out->vectors.resize(static_cast<size_t>(d * d));
          pt::analysis_symmetric_eigen(out->values.data(), want ? out->vectors.data() : nullptr, m->data(), d,
                                       threads);
        },
        [out, want](Napi::Env e) -> Napi::Value {
          Napi::Object o = Napi::Object::New(e);
          o.Set("values", to_float64(e, std::move(out->values)));
          o.Set("vectors", want ? Napi::Value(to_float64(e, std::move(out->vectors))) : e.Null());
          return o;
        });
    return worker->queue();
  });
}

// analysisPairwiseSquaredDistances(a: Float32Array, b: Float32Array | null, dim, threads)
//   -> Promise<Float64Array> (rows(a) x rows(b); b null = a against itself)
Napi::Value PairwiseSquaredDistances(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const int64_t d = int_of(arg(info, 2, "dim"), "dim", 1);
    Napi::Value av = arg(info, 0, "a");
    Napi::Value bv = arg(info, 1, "b");
    View<float> a = view_of<float>(av, "a");
    const int64_t na = rows_of(a, d, "a", env);
    require_finite(a, d, "a", env);
    View<float> b = a;
    int64_t nb = na;
    if (!bv.IsNull() && !bv.IsUndefined()) {
      b = view_of<float>(bv, "b");
      nb = rows_of(b, d, "b", env);
      require_finite(b, d, "b", env);
    }
    if (static_cast<double>(na) * static_cast<double>(nb) > 4e9)
      throw Napi::RangeError::New(env, "a, b: " + std::to_string(na) + " x " + std::to_string(nb) +
                                           " distances are too many for one matrix; split the rows");
    const int threads = threads_of(info, 3);
    const Owned<float> ac = owned(a, threads), bc = bv.IsNull() || bv.IsUndefined() ? ac : owned(b, threads);
    auto out = std::make_shared<std::vector<double>>();
    auto* worker = new PromiseWorker(
        env,
        [ac, bc, na, nb, d, threads, out]() {
          out->resize(static_cast<size_t>(na * nb));
          pt::analysis_pairwise_sq_distances(out->data(), ac->data(), na, bc->data(), nb, d, threads);
        },
        [out](Napi::Env e) -> Napi::Value { return to_float64(e, std::move(*out)); });
    return worker->queue();
  });
}

// analysisTraceSqrtProduct(s1: Float64Array, s2: Float64Array, dim, threads) -> Promise<number>
Napi::Value TraceSqrtProduct(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const int64_t d = int_of(arg(info, 2, "dim"), "dim", 1);
    Owned<double> s1 = square_matrix(info, 0, "s1", d), s2 = square_matrix(info, 1, "s2", d);
    const int threads = threads_of(info, 3);
    auto out = std::make_shared<double>(0.0);
    auto* worker = new PromiseWorker(
        env,
        [s1, s2, d, threads, out]() {
          *out = pt::analysis_trace_sqrt_product(s1->data(), s2->data(), d, threads);
        },
        [out](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *out); });
    return worker->queue();
  });
}

// analysisTraceInverseProduct(l2: Float64Array, l1: Float64Array, dim, threads) -> Promise<number>:
// tr(S2^-1 S1) from the Cholesky factors.
Napi::Value TraceInverseProduct(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const int64_t d = int_of(arg(info, 2, "dim"), "dim", 1);
    Owned<double> l2 = square_matrix(info, 0, "l2", d), l1 = square_matrix(info, 1, "l1", d);
    const int threads = threads_of(info, 3);
    auto out = std::make_shared<double>(0.0);
    auto* worker = new PromiseWorker(
        env,
        [l2, l1, d, threads, out]() {
          *out = pt::analysis_trace_inverse_product(l2->data(), l1->data(), d, threads);
        },
        [out](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *out); });
    return worker->queue();
  });
}

// analysisCovariance(rows: Float32Array, dim, threads) -> Promise<{ mean, covariance }> (unbiased, n >= 2).
Napi::Value Covariance(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1);
    Napi::Value xv = arg(info, 0, "rows");
    View<float> x = view_of<float>(xv, "rows");
    const int64_t n = rows_of(x, d, "rows", env);
    if (n < 2) throw Napi::RangeError::New(env, "rows: a covariance needs at least 2 rows, got 1");
    require_finite(x, d, "rows", env);
    const int threads = threads_of(info, 2);
    count_of(env, "dim x dim covariance", {d, d});
    const Owned<float> xc = owned(x, threads);
    struct Out {
      std::vector<double> mean, cov;
    };
    auto out = std::make_shared<Out>();
    auto* worker = new PromiseWorker(
        env,
        [xc, n, d, threads, out]() {
          out->mean.resize(static_cast<size_t>(d));
          out->cov.resize(static_cast<size_t>(d * d));
          pt::collapse_covariance(out->mean.data(), out->cov.data(), xc->data(), n, d, threads);
        },
        [out](Napi::Env e) -> Napi::Value {
          Napi::Object o = Napi::Object::New(e);
          o.Set("mean", to_float64(e, std::move(out->mean)));
          o.Set("covariance", to_float64(e, std::move(out->cov)));
          return o;
        });
    return worker->queue();
  });
}

}  // namespace

void init_analysis(Napi::Env env, Napi::Object exports) {
  exports.Set("analysisSymmetricEigen", Napi::Function::New(env, SymmetricEigen, "analysisSymmetricEigen"));
  exports.Set("analysisPairwiseSquaredDistances",
              Napi::Function::New(env, PairwiseSquaredDistances, "analysisPairwiseSquaredDistances"));
  exports.Set("analysisTraceSqrtProduct",
              Napi::Function::New(env, TraceSqrtProduct, "analysisTraceSqrtProduct"));
  exports.Set("analysisTraceInverseProduct",
              Napi::Function::New(env, TraceInverseProduct, "analysisTraceInverseProduct"));
  exports.Set("analysisCovariance", Napi::Function::New(env, Covariance, "analysisCovariance"));
}

}  // namespace ptn
