// Node-API glue of the priors and the controllable-posterior regulariser (kernels/cpu/prior_gaussian.cpp,
// and the exact nearest-row search of kernels/cpu/knn.cpp).
//
// priorGaussianFit and priorCholesky run on the thread pool and return promises (O(n d^2) and O(d^3) work).
// The per-draw and per-step functions are synchronous, because lib/priors.ts's Prior.sample() and
// Regularizer.value()/gradient() are: they are O(n d^2) for n prompt rows (milliseconds at n = 20,
// d = 2048) and use `threads` OpenMP threads inside the call. NativeNearestRows holds a CPU index for the
// nearest-vocabulary-row regulariser; dispose() frees it, later calls throw "NearestRows is disposed".
#include <chrono>
#include <cmath>
#include <iomanip>
#include <memory>
#include <sstream>

#include "common.h"
#include "knn.h"
#include "modules.h"
#include "priortune/prior.h"

namespace ptn {
namespace {

// Shortest round-trip-ish form for messages ("0.001", "1e-08"), unlike std::to_string's fixed 6 decimals.
std::string number_text(double x) {
  std::ostringstream o;
  o << std::setprecision(6) << x;
  return o.str();
}

double option_number(const Napi::Object& o, const char* key, double fallback, double lo, double hi) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return fallback;
  const double x = number_of(v, std::string("options.") + key);
  if (!(x >= lo && x <= hi))
    throw Napi::RangeError::New(o.Env(), std::string("options.") + key + ": expected a number from " +
                                             number_text(lo) + " to " + number_text(hi) + ", got " +
                                             number_text(x));
  return x;
}

// priorGaussianFit(rows: Float32Array | NativeKnnIndex, dim, { shrinkage, ridgeAbsolute, ridgeRelative,
//   keepCovariance }, threads) -> Promise<{ mean, cholesky, covariance | null, ridge, meanVariance, logDet,
//   covarianceSeconds, choleskySeconds }>. An index is fitted to all its rows, read in place: they never
// change and the worker holds the index, so they need no copy (a vocabulary-sized one for the collapse
// metrics), unlike a JS array (common.h: owned()).
Napi::Value PriorGaussianFit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    Napi::Value rows_value = arg(info, 0, "rows");
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1);
    std::shared_ptr<const void> held;  // what the worker reads: the index, or a copy of the array
    const float* rows = nullptr;
    int64_t n = 0;
    if (auto index = knn_index_of(rows_value)) {
      if (index->dim() != d)
        throw Napi::RangeError::New(env, "rows: the index's rows have dim " + std::to_string(index->dim()) +
                                             ", expected " + std::to_string(d));
      rows = index->row(0);
      n = index->rows();
      held = index;
    } else {
      View<float> x = view_of<float>(rows_value, "rows");
      n = rows_of(x, d, "rows", env);
      const Owned<float> xc = owned(x);
      rows = xc->data();
      held = xc;
    }
    if (n < 2) throw Napi::RangeError::New(env, "rows: a Gaussian fit needs at least 2 rows, got 1");
    Napi::Object options = object_of(arg(info, 2, "options"), "options");
    const double shrinkage = option_number(options, "shrinkage", 0.0, 0.0, 1.0);
    const double ridge_absolute = option_number(options, "ridgeAbsolute", 0.0, 0.0, 1e300);
    const double ridge_relative = option_number(options, "ridgeRelative", 0.0, 0.0, 1e300);
    const bool keep_covariance = options.Get("keepCovariance").ToBoolean().Value();
    const int threads = threads_of(info, 3);
    count_of(env, "dim x dim covariance", {d, d});
    struct Out {
      std::vector<double> mean, chol, cov;
      pt::PriorGaussianFitInfo fit;
    };
    auto out = std::make_shared<Out>();
    auto* worker = new PromiseWorker(
        env,
        [held, rows, n, d, shrinkage, ridge_absolute, ridge_relative, keep_covariance, threads, out]() {
          const float* x = rows;
          const std::string bad = pt::knn_check_rows(x, n, d, threads);
          if (!bad.empty()) throw std::invalid_argument("rows: " + bad);
          out->mean.resize(d);
          out->chol.resize(static_cast<size_t>(d * d));
          if (keep_covariance) out->cov.resize(static_cast<size_t>(d * d));
          if (!pt::prior_gaussian_fit(out->mean.data(), out->chol.data(),
                                      keep_covariance ? out->cov.data() : nullptr, x, n, d, shrinkage,
                                      ridge_absolute, ridge_relative, threads, &out->fit))
            throw std::runtime_error(
                "fitted Gaussian: the covariance of " + std::to_string(n) + " rows in " + std::to_string(d) +
                " dimensions is not positive definite with a ridge of " + number_text(out->fit.ridge) +
                (n <= d ? " (fewer rows than dimensions)" : "") + "; raise the jitter or the shrinkage");
        },
        [out, keep_covariance](Napi::Env e) -> Napi::Value {
          Napi::Object o = Napi::Object::New(e);
          o.Set("mean", to_float64(e, std::move(out->mean)));
          o.Set("cholesky", to_float64(e, std::move(out->chol)));
          o.Set("covariance", keep_covariance ? Napi::Value(to_float64(e, std::move(out->cov))) : e.Null());
          o.Set("ridge", out->fit.ridge);
          o.Set("meanVariance", out->fit.mean_variance);
          o.Set("logDet", out->fit.log_det);
          o.Set("covarianceSeconds", out->fit.covariance_seconds);
          o.Set("choleskySeconds", out->fit.cholesky_seconds);
          return o;
        });
    return worker->queue();
  });
}

// priorCholesky(matrix: Float64Array, dim, threads) -> Promise<{ cholesky, logDet, seconds }>; the matrix is
// copied (only its lower triangle is read).
Napi::Value PriorCholesky(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1);
    View<double> m = square_view<double>(arg(info, 0, "matrix"), "matrix", d);
    require_finite(m, d, "matrix", env);
    const int threads = threads_of(info, 2);
    struct Out {
      std::vector<double> a;
      double log_det = 0, seconds = 0;
    };
    auto out = std::make_shared<Out>();
    out->a.assign(m.data, m.data + m.length);
    auto* worker = new PromiseWorker(
        env,
        [out, d, threads]() {
          auto t0 = std::chrono::steady_clock::now();
          if (!pt::prior_cholesky(out->a.data(), d, threads, &out->log_det))
            throw std::runtime_error("matrix: not positive definite (a Cholesky pivot is not positive)");
          out->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        },
        [out](Napi::Env e) -> Napi::Value {
          Napi::Object o = Napi::Object::New(e);
          o.Set("cholesky", to_float64(e, std::move(out->a)));
          o.Set("logDet", out->log_det);
          o.Set("seconds", out->seconds);
          return o;
        });
    return worker->queue();
  });
}

// priorGaussianTransform(z: Float64Array, dim, mean: Float64Array, cholesky: Float64Array, scale, threads)
//   -> Float32Array: mean + scale * L z per row (synchronous).
Napi::Value PriorGaussianTransform(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    View<double> z = view_of<double>(arg(info, 0, "z"), "z");
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1), n = rows_of(z, d, "z", env);
    View<double> mean = view_of_length<double>(arg(info, 2, "mean"), "mean", d);
    View<double> L = square_view<double>(arg(info, 3, "cholesky"), "cholesky", d);
    const double scale = number_of(arg(info, 4, "scale"), "scale");
    if (!std::isfinite(scale)) throw Napi::RangeError::New(env, "scale: expected a finite number");
    const int threads = threads_of(info, 5);
    std::vector<float> out(static_cast<size_t>(n * d));
    pt::prior_gaussian_transform(out.data(), z.data, n, d, mean.data, L.data, scale, threads);
    return to_float32(env, std::move(out));
  });
}

// priorGaussianEnergy(x: Float32Array, dim, mean: Float64Array, cholesky: Float64Array, gradient: boolean,
//   threads) -> { mahalanobisSquared: Float64Array, gradient: Float32Array | null } (synchronous).
Napi::Value PriorGaussianEnergy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    View<float> x = view_of<float>(arg(info, 0, "x"), "x");
    const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1), n = rows_of(x, d, "x", env);
    require_finite(x, d, "x", env);
    View<double> mean = view_of_length<double>(arg(info, 2, "mean"), "mean", d);
    View<double> L = square_view<double>(arg(info, 3, "cholesky"), "cholesky", d);
    const bool want_gradient = arg(info, 4, "gradient").ToBoolean().Value();
    const int threads = threads_of(info, 5);
    std::vector<double> r2(n);
    std::vector<float> grad(want_gradient ? static_cast<size_t>(n * d) : 0);
    pt::prior_gaussian_energy(r2.data(), want_gradient ? grad.data() : nullptr, x.data, n, d, mean.data,
                              L.data, threads);
    Napi::Object o = Napi::Object::New(env);
    o.Set("mahalanobisSquared", to_float64(env, std::move(r2)));
    o.Set("gradient", want_gradient ? Napi::Value(to_float32(env, std::move(grad))) : env.Null());
    return o;
  });
}

// new NativeNearestRows(vocab: Float32Array, dim, threads): an exact L2 index over a copy of the rows, built
// synchronously; nearest(queries: Float32Array, threads) -> Int32Array, each query's nearest row (ties to the
// lower index, as knn.h defines exact); rowsAt(ids: Int32Array) -> Float32Array, those rows (knn.h), so that
// the caller need not keep its own copy of the vocabulary; rows(); dispose().
class NearestRowsWrap : public Napi::ObjectWrap<NearestRowsWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(
        env, "NativeNearestRows",
        {InstanceMethod("nearest", &NearestRowsWrap::Nearest),
         InstanceMethod("rowsAt", &NearestRowsWrap::RowsAt), InstanceMethod("rows", &NearestRowsWrap::Rows),
         InstanceMethod("dispose", &NearestRowsWrap::Dispose)});
  }

  explicit NearestRowsWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NearestRowsWrap>(info) {
    Napi::Env env = info.Env();
    guarded(env, [&]() -> Napi::Value {
      View<float> vocab = view_of<float>(arg(info, 0, "vocab"), "vocab");
      const int64_t d = int_of(arg(info, 1, "dim"), "dim", 1), V = rows_of(vocab, d, "vocab", env);
      const int threads = threads_of(info, 2);
      const std::string bad = pt::knn_check_rows(vocab.data, V, d, threads);
      if (!bad.empty()) throw Napi::RangeError::New(env, "vocab: " + bad);
      index_ = pt::knn_index_cpu(vocab.data, V, d, pt::KnnMetric::L2, threads);
      external_.set(env, index_->host_bytes());
      return env.Undefined();
    });
  }

 private:
  const pt::KnnIndex& live(Napi::Env env) {
    if (!index_) throw Napi::Error::New(env, "NearestRows is disposed");
    return *index_;
  }

  Napi::Value Nearest(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      const pt::KnnIndex& index = live(env);
      View<float> q = view_of<float>(arg(info, 0, "queries"), "queries");
      const int64_t d = index.dim(), Q = rows_of(q, d, "queries", env);
      const int threads = threads_of(info, 1);
      const std::string bad = pt::knn_check_rows(q.data, Q, d, threads);
      if (!bad.empty()) throw Napi::RangeError::New(env, "queries: " + bad);
      pt::KnnResult r = index.search(q.data, Q, 1, nullptr, threads);
      return to_int32(env, std::move(r.indices));
    });
  }

  Napi::Value RowsAt(const Napi::CallbackInfo& info) { return knn_rows_at(info, live(info.Env())); }

  Napi::Value Rows(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(live(info.Env()).rows()));
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    index_.reset();
    external_.clear();
    return info.Env().Undefined();
  }

  std::unique_ptr<pt::KnnIndex> index_;
  ExternalMemory external_;
};

}  // namespace

void init_priors(Napi::Env env, Napi::Object exports) {
  exports.Set("priorGaussianFit", Napi::Function::New(env, PriorGaussianFit, "priorGaussianFit"));
  exports.Set("priorCholesky", Napi::Function::New(env, PriorCholesky, "priorCholesky"));
  exports.Set("priorGaussianTransform",
              Napi::Function::New(env, PriorGaussianTransform, "priorGaussianTransform"));
  exports.Set("priorGaussianEnergy", Napi::Function::New(env, PriorGaussianEnergy, "priorGaussianEnergy"));
  exports.Set("NativeNearestRows", NearestRowsWrap::Define(env));
}

}  // namespace ptn
