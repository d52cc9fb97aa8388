// System-level functions: backend probe, CPU facts, and direct access to the GEMM (tests and benchmarks).
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "common.h"
#include "modules.h"
#include "priortune/cuda_device.h"
#include "priortune/cuda_model.h"
#include "priortune/gemm.h"
#include "priortune/ops.h"
#include "priortune/parallel.h"

namespace ptn {
namespace {

Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pt::CudaProbe p = pt::cuda_probe();
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", p.compiled);
  o.Set("usable", p.usable);
  o.Set("deviceCount", p.device_count);
  o.Set("reason", p.reason);
  o.Set("name", p.name);
  o.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
  o.Set("totalMemory", static_cast<double>(p.total_memory));
  o.Set("modelKernels", p.compiled);  // the CUDA build includes the model kernels (kernels/cuda)
  return o;
}

// cudaGemmBench(precision, M, N, K, iters, engine = "priortune", layout = "nt") -> Promise<{ ms, maxRelErr,
// engine }>: the device GEMM's median ms and its error against our fp32 GEMM; engine "cublaslt" times
// cuBLASLt instead, loaded at run time (rejects with the reason where it cannot be loaded); layout "nn" takes
// B as [K, N]. See pt::cuda_gemm_benchmark.
Napi::Value CudaGemmBench(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    const pt::cuda::GemmPrecision prec = precision_of(arg(info, 0, "precision"), "precision");
    const int64_t M = size_of(arg(info, 1, "M"), "M", 1), N = size_of(arg(info, 2, "N"), "N", 1),
                  K = size_of(arg(info, 3, "K"), "K", 1);
    // Each operand at most 2^31 elements (the device buffers and the host reference are that size).
    for (auto [what, a, b] :
         {std::tuple<const char*, int64_t, int64_t>{"M x K", M, K}, {"N x K", N, K}, {"M x N", M, N}})
      if (count_of(env, what, {a, b}) > (size_t{1} << 31))
        throw Napi::RangeError::New(env, std::string(what) + ": expected at most 2^31 elements");
    const int64_t iters64 = int_of(arg(info, 4, "iters"), "iters", 1);
    if (iters64 > 100000) throw Napi::RangeError::New(env, "iters: expected at most 100000");
    const int iters = static_cast<int>(iters64);
    const pt::GemmEngine engine = info.Length() > 5 && !info[5].IsUndefined() &&
                                          choice_of(info[5], "engine", {"priortune", "cublaslt"}) == 1
                                      ? pt::GemmEngine::CublasLt
                                      : pt::GemmEngine::Ours;
    const bool nt =
        !(info.Length() > 6 && !info[6].IsUndefined() && choice_of(info[6], "layout", {"nt", "nn"}) == 1);
    auto result = std::make_shared<pt::GemmBenchResult>();
    auto* worker = new PromiseWorker(
        env, [=]() { *result = pt::cuda_gemm_benchmark(prec, M, N, K, iters, engine, nt); },
        [result](Napi::Env env) -> Napi::Value {
          Napi::Object o = Napi::Object::New(env);
          o.Set("ms", result->ms);
          o.Set("maxRelErr", result->max_rel_err);
          o.Set("engine", result->engine);
          return o;
        });
    return worker->queue();
  });
}

// cudaSelfTest(parts?: string[]) -> Promise<[{ op, shape, err, tol, pass, note }]>: every CUDA op against its
// CPU reference on device 0, or those of the parts named ("gemm", "elementwise", "attention"); rejects
// without a usable device.
Napi::Value CudaSelfTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    static const char* const kParts[] = {"gemm", "elementwise", "attention"};
    std::vector<std::string> parts;
    if (info.Length() > 0 && !info[0].IsUndefined()) {
      if (!info[0].IsArray()) throw_type(env, "parts", "an array of part names", info[0]);
      const Napi::Array list = info[0].As<Napi::Array>();
      for (uint32_t i = 0; i < list.Length(); ++i)
        parts.push_back(kParts[choice_of(list.Get(i), "parts[" + std::to_string(i) + "]",
                                         {kParts[0], kParts[1], kParts[2]})]);
    }
    auto result = std::make_shared<std::vector<pt::cuda::OpCheck>>();
    auto* worker = new PromiseWorker(
        env, [result, parts]() { *result = pt::cuda_selftest(parts); },
        [result](Napi::Env env) -> Napi::Value {
          Napi::Array arr = Napi::Array::New(env, result->size());
          for (size_t i = 0; i < result->size(); ++i) {
            const pt::cuda::OpCheck& c = (*result)[i];
            Napi::Object o = Napi::Object::New(env);
            o.Set("op", c.op);
            o.Set("shape", c.shape);
            o.Set("err", c.err);
            o.Set("tol", c.tol);
            o.Set("pass", c.pass);
            o.Set("note", c.note);
            arr.Set(static_cast<uint32_t>(i), o);
          }
          return arr;
        });
    return worker->queue();
  });
}

Napi::Value CpuInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("gemmKernel", pt::sgemm_kernel_name());
  o.Set("hardwareThreads", pt::hardware_threads());
  return o;
}

// gemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, threads): synchronous, for tests and
// benchmarks. Bounds are checked against each array's length before any element is touched.
Napi::Value Gemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    bool ta = arg(info, 0, "transA").ToBoolean(), tb = arg(info, 1, "transB").ToBoolean();
    int64_t M = size_of(arg(info, 2, "M"), "M", 0), N = size_of(arg(info, 3, "N"), "N", 0),
            K = size_of(arg(info, 4, "K"), "K", 0);
    float alpha = (float)number_of(arg(info, 5, "alpha"), "alpha");
    auto A = view_of<float>(arg(info, 6, "A"), "A");
    int64_t lda = size_of(arg(info, 7, "lda"), "lda", 1);
    auto B = view_of<float>(arg(info, 8, "B"), "B");
    int64_t ldb = size_of(arg(info, 9, "ldb"), "ldb", 1);
    float beta = (float)number_of(arg(info, 10, "beta"), "beta");
    auto C = view_of<float>(arg(info, 11, "C"), "C");
    int64_t ldc = size_of(arg(info, 12, "ldc"), "ldc", 1);
    const int threads = threads_value(arg(info, 13, "threads"), "threads");
    auto need = [&](const char* name, size_t have, int64_t rows, int64_t cols, int64_t ld) {
      if (rows == 0 || cols == 0) return;
      if (ld < cols)
        throw Napi::RangeError::New(env, std::string(name) + ": leading dimension smaller than row length");
      if (have < count_of(env, name, {rows - 1, ld}) + static_cast<size_t>(cols))
        throw Napi::RangeError::New(env, std::string(name) + ": array too short for the given shape");
    };
    need("A", A.length, ta ? K : M, ta ? M : K, lda);
    need("B", B.length, tb ? N : K, tb ? K : N, ldb);
    need("C", C.length, M, N, ldc);
    pt::sgemm(ta, tb, M, N, K, alpha, A.data, lda, B.data, ldb, beta, C.data, ldc, threads);
    return env.Undefined();
  });
}

Napi::Value SelectGemmKernel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!arg(info, 0, "name").IsString()) throw_type(env, "name", "a string", info[0]);
  return Napi::Boolean::New(env, pt::sgemm_select_kernel(info[0].As<Napi::String>().Utf8Value().c_str()));
}

Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    return Napi::Number::New(env, pt::cpu_fma_peak_gflops(threads_value(arg(info, 0, "threads"), "threads")));
  });
}

// adamwStep(param, grad, m, v, lr, beta1, beta2, eps, weightDecay, step): in place on param, m and v.
// Synchronous: prompt tensors are small (P x hidden), the update takes microseconds.
Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    auto param = view_of<float>(arg(info, 0, "param"), "param");
    auto grad = view_of_length<float>(arg(info, 1, "grad"), "grad", param.length);
    auto m = view_of_length<float>(arg(info, 2, "m"), "m", param.length);
    auto v = view_of_length<float>(arg(info, 3, "v"), "v", param.length);
    const float lr = (float)number_of(arg(info, 4, "lr"), "lr");
    const float b1 = (float)number_of(arg(info, 5, "beta1"), "beta1");
    const float b2 = (float)number_of(arg(info, 6, "beta2"), "beta2");
    const float eps = (float)number_of(arg(info, 7, "eps"), "eps");
    const float wd = (float)number_of(arg(info, 8, "weightDecay"), "weightDecay");
    const int64_t t = int_of(arg(info, 9, "step"), "step", 1);
    pt::adamw_step(param.data, grad.data, m.data, v.data, (int64_t)param.length, lr, b1, b2, eps, wd, t);
    return env.Undefined();
  });
}

// heldLock(op, path) -> boolean: the directory locks this process holds (lib/files.ts lockDirectory), in one
// registry for the whole process: each worker thread has its own JS modules, so a JS set would let two
// threads of one process take the same lock. op "add" (false if already held), "delete", "has". Each entry
// belongs to the thread (napi_env) that added it and goes when that thread ends (a terminated worker runs no
// JS release).
struct LockRegistry {
  std::mutex mu;
  std::map<std::string, napi_env> held;
  std::set<napi_env> hooked;  // threads whose cleanup hook is registered
};
LockRegistry& lock_registry() {
  static LockRegistry& r = *new LockRegistry;  // never destroyed: threads may outlive exit
  return r;
}
void drop_thread_locks(void* arg) {
  const napi_env env = static_cast<napi_env>(arg);
  LockRegistry& r = lock_registry();
  std::lock_guard<std::mutex> lock(r.mu);
  for (auto it = r.held.begin(); it != r.held.end();)
    it = it->second == env ? r.held.erase(it) : std::next(it);
  r.hooked.erase(env);
}

Napi::Value HeldLock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    auto text = [&](size_t i, const char* name) {
      Napi::Value v = arg(info, i, name);
      if (!v.IsString()) throw_type(env, name, "a string", v);
      return v.As<Napi::String>().Utf8Value();
    };
    const std::string op = text(0, "op"), path = text(1, "path");
    LockRegistry& r = lock_registry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (op == "add") {
      if (!r.held.emplace(path, static_cast<napi_env>(env)).second) return Napi::Boolean::New(env, false);
      if (r.hooked.insert(env).second)
        napi_add_env_cleanup_hook(env, drop_thread_locks, static_cast<napi_env>(env));
      return Napi::Boolean::New(env, true);
    }
    if (op == "delete") return Napi::Boolean::New(env, r.held.erase(path) > 0);
    if (op == "has") return Napi::Boolean::New(env, r.held.count(path) > 0);
    throw Napi::TypeError::New(env, "op: expected \"add\", \"delete\" or \"has\", got " + op);
  });
}

}  // namespace

void init_system(Napi::Env env, Napi::Object exports) {
  exports.Set("heldLock", Napi::Function::New(env, HeldLock, "heldLock"));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo, "cudaInfo"));
  exports.Set("cudaGemmBench", Napi::Function::New(env, CudaGemmBench, "cudaGemmBench"));
  exports.Set("cudaSelfTest", Napi::Function::New(env, CudaSelfTest, "cudaSelfTest"));
  exports.Set("cpuInfo", Napi::Function::New(env, CpuInfo, "cpuInfo"));
  exports.Set("gemm", Napi::Function::New(env, Gemm, "gemm"));
  exports.Set("selectGemmKernel", Napi::Function::New(env, SelectGemmKernel, "selectGemmKernel"));
  exports.Set("adamwStep", Napi::Function::New(env, AdamwStep, "adamwStep"));
  exports.Set("fmaPeakGflops", Napi::Function::New(env, FmaPeak, "fmaPeakGflops"));
}

}  // namespace ptn
