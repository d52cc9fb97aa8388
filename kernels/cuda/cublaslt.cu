// cuBLASLt as a second GEMM engine, for benchmarks only (priortune/cuda_model.h: GemmEngine::CublasLt, and
// whole steps through cuda::gemm with PRIORTUNE_CUDA_GEMM=cublaslt).
// It is loaded at run time with dlopen where present (the GPU machines have it through PyTorch's wheels)
// and never linked: the build machines have the CUDA runtime but no cuBLAS. The few entry points, types and
// constants used are declared here with the values of cublasLt.h, cublas_api.h and library_types.h, which
// are the same in cuBLAS 12 and 13.
#include <dlfcn.h>

#include <cstdlib>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "cublaslt.cuh"

namespace pt {
namespace cuda {
namespace {

using Status = int;  // cublasStatus_t; 0 = CUBLAS_STATUS_SUCCESS
using Handle = void*;
using MatmulDesc = void*;
using Layout = void*;
using Preference = void*;
struct Algo {  // cublasLtMatmulAlgo_t
  uint64_t data[8];
};
struct Heuristic {  // cublasLtMatmulHeuristicResult_t
  Algo algo;
  size_t workspace_size;
  Status state;
  float waves_count;
  int reserved[4];
};
constexpr int kCompute32F = 68, kCompute32FFastTF32 = 77;  // cublasComputeType_t
constexpr int kR32F = 0, kR16BF = 14;                      // cudaDataType
constexpr int kDescTransA = 3, kDescTransB = 4;            // cublasLtMatmulDescAttributes_t
constexpr int kDescEpilogue = 7, kDescBiasPointer = 8;
constexpr uint32_t kEpilogueBias = 4;      // cublasLtEpilogue_t: CUBLASLT_EPILOGUE_BIAS
constexpr int kOpN = 0, kOpT = 1;          // cublasOperation_t
constexpr int kPrefMaxWorkspaceBytes = 1;  // cublasLtMatmulPreferenceAttributes_t
constexpr int kPrefMinAlignA = 5, kPrefMinAlignB = 6, kPrefMinAlignC = 7, kPrefMinAlignD = 8;
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

struct Api {
  std::string library;  // the path or name that loaded
  std::string error;    // why it did not
  Status (*create)(Handle*) = nullptr;
  Status (*destroy)(Handle) = nullptr;
  size_t (*version)() = nullptr;
  const char* (*status_name)(Status) = nullptr;
  Status (*desc_create)(MatmulDesc*, int, int) = nullptr;
  Status (*desc_destroy)(MatmulDesc) = nullptr;
  Status (*desc_set)(MatmulDesc, int, const void*, size_t) = nullptr;
  Status (*layout_create)(Layout*, int, uint64_t, uint64_t, int64_t) = nullptr;
  Status (*layout_destroy)(Layout) = nullptr;
  Status (*pref_create)(Preference*) = nullptr;
  Status (*pref_destroy)(Preference) = nullptr;
  Status (*pref_set)(Preference, int, const void*, size_t) = nullptr;
  Status (*heuristic)(Handle, MatmulDesc, Layout, Layout, Layout, Layout, Preference, int, Heuristic*,
                      int*) = nullptr;
  Status (*matmul)(Handle, MatmulDesc, const void*, const void*, Layout, const void*, Layout, const void*,
                   const void*, Layout, void*, Layout, const Algo*, void*, size_t, cudaStream_t) = nullptr;
};

template <class F>
bool bind(void* lib, F& f, const char* name, std::string& error) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  if (!f && error.empty()) error = std::string("symbol ") + name + " missing";
  return f != nullptr;
}

// Binds every entry point of `lib` into a; false (with the first missing symbol in error) if one is missing.
bool bind_all(void* lib, Api& a, std::string& e) {
  return bind(lib, a.create, "cublasLtCreate", e) & bind(lib, a.destroy, "cublasLtDestroy", e) &
         bind(lib, a.version, "cublasLtGetVersion", e) &
         bind(lib, a.status_name, "cublasLtGetStatusName", e) &
         bind(lib, a.desc_create, "cublasLtMatmulDescCreate", e) &
         bind(lib, a.desc_destroy, "cublasLtMatmulDescDestroy", e) &
         bind(lib, a.desc_set, "cublasLtMatmulDescSetAttribute", e) &
         bind(lib, a.layout_create, "cublasLtMatrixLayoutCreate", e) &
         bind(lib, a.layout_destroy, "cublasLtMatrixLayoutDestroy", e) &
         bind(lib, a.pref_create, "cublasLtMatmulPreferenceCreate", e) &
         bind(lib, a.pref_destroy, "cublasLtMatmulPreferenceDestroy", e) &
         bind(lib, a.pref_set, "cublasLtMatmulPreferenceSetAttribute", e) &
         bind(lib, a.heuristic, "cublasLtMatmulAlgoGetHeuristic", e) &
         bind(lib, a.matmul, "cublasLtMatmul", e);
}

// The library, loaded once: $PRIORTUNE_CUBLASLT, else the loader's search for libcublasLt.so.13/.12/.so. A
// candidate is taken when it has every entry point and can create a handle (a cuBLAS 13 library under a
// driver too old for it loads but fails there; the next name may be a cuBLAS 12 that works).
const Api& api() {
  static Api& a = *new Api;  // never destroyed: plans released at exit still call into it
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> names;
    if (const char* env = std::getenv("PRIORTUNE_CUBLASLT"); env && *env) names.push_back(env);
    for (const char* n : {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"}) names.push_back(n);
    std::string tried;
    for (const std::string& n : names) {
      void* lib = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!lib) {
        const char* why = dlerror();
        tried += (tried.empty() ? "" : "; ") + n + ": " + (why ? why : "not loadable");
        continue;
      }
      Api c;
      std::string e;
      Handle probe = nullptr;
      Status st = 0;
      if (bind_all(lib, c, e) && (st = c.create(&probe)) == 0) {
        c.destroy(probe);
        c.library = n;
        a = c;
        return;
      }
      if (e.empty()) {
        const char* name = c.status_name ? c.status_name(st) : nullptr;
        e = std::string("cublasLtCreate failed: ") + (name ? name : "status " + std::to_string(st));
      }
      tried += (tried.empty() ? "" : "; ") + n + ": " + e;
      dlclose(lib);
    }
    a.error = "no usable cuBLASLt (set PRIORTUNE_CUBLASLT to libcublasLt.so's path); tried " + tried;
  });
  return a;
}

void lt_check(Status s, const char* what) {
  if (s != 0) {
    const char* name = api().status_name ? api().status_name(s) : nullptr;
    throw std::runtime_error(std::string("cuBLASLt ") + what +
                             " failed: " + (name ? name : ("status " + std::to_string(s))));
  }
}

}  // namespace

std::string cublaslt_library() {
  const Api& a = api();
  if (a.library.empty()) throw std::runtime_error(a.error);
  return a.library + " (version " + std::to_string(a.version()) + ")";
}

struct CublasLtGemm::Impl {
  Handle handle = nullptr;
  MatmulDesc desc = nullptr;
  Layout la = nullptr, lb = nullptr, lc = nullptr;
  Preference pref = nullptr;
  DeviceBuffer<uint8_t> workspace;
  Heuristic best{};
  ~Impl() {
    const Api& a = api();
    if (pref) a.pref_destroy(pref);
    for (Layout l : {la, lb, lc})
      if (l) a.layout_destroy(l);
    if (desc) a.desc_destroy(desc);
    if (handle) a.destroy(handle);
  }
};

// Row-major C[M, N] = A[M, K] . B[N, K]^T is, column-major, C^T[N, M] = B[N, K] . A^T: cuBLASLt's "TN"
// product with m = N, n = M and both operands K-contiguous (its fastest layout). Without b_transposed, B is
// row-major [K, N], column-major [N, K] with leading dimension ldb: the "NN" product. The bias epilogue adds
// a vector over cuBLASLt's m, our columns.
CublasLtGemm::CublasLtGemm(GemmPrecision precision, int64_t M, int64_t N, int64_t K, bool b_transposed,
                           int64_t lda, int64_t ldb, int64_t ldc, bool bias, uint32_t align)
    : impl_(std::make_unique<Impl>()) {
  if (lda == 0) lda = K;
  if (ldb == 0) ldb = b_transposed ? K : N;
  if (ldc == 0) ldc = N;
  const Api& a = api();
  if (a.library.empty()) throw std::runtime_error(a.error);
  Impl& d = *impl_;
  lt_check(a.create(&d.handle), "cublasLtCreate");
  const int compute = precision == GemmPrecision::TF32 ? kCompute32FFastTF32 : kCompute32F;
  const int in = precision == GemmPrecision::BF16 ? kR16BF : kR32F;
  lt_check(a.desc_create(&d.desc, compute, kR32F), "cublasLtMatmulDescCreate");
  const int32_t t = b_transposed ? kOpT : kOpN, n = kOpN;
  lt_check(a.desc_set(d.desc, kDescTransA, &t, sizeof t), "cublasLtMatmulDescSetAttribute(TRANSA)");
  lt_check(a.desc_set(d.desc, kDescTransB, &n, sizeof n), "cublasLtMatmulDescSetAttribute(TRANSB)");
  if (bias)
    lt_check(a.desc_set(d.desc, kDescEpilogue, &kEpilogueBias, sizeof kEpilogueBias),
             "cublasLtMatmulDescSetAttribute(EPILOGUE)");
  if (b_transposed)
    lt_check(a.layout_create(&d.la, in, K, N, ldb), "cublasLtMatrixLayoutCreate(B)");
  else
    lt_check(a.layout_create(&d.la, in, N, K, ldb), "cublasLtMatrixLayoutCreate(B)");
  lt_check(a.layout_create(&d.lb, in, K, M, lda), "cublasLtMatrixLayoutCreate(A)");
  lt_check(a.layout_create(&d.lc, kR32F, N, M, ldc), "cublasLtMatrixLayoutCreate(C)");
  lt_check(a.pref_create(&d.pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = kWorkspaceBytes;
  lt_check(a.pref_set(d.pref, kPrefMaxWorkspaceBytes, &ws, sizeof ws),
           "cublasLtMatmulPreferenceSetAttribute");
  // Without these the heuristic assumes 256-byte aligned operands and may pick an algorithm that fails (or
  // reads misaligned vectors) on a row view into a larger buffer.
  for (int attr : {kPrefMinAlignA, kPrefMinAlignB, kPrefMinAlignC, kPrefMinAlignD})
    lt_check(a.pref_set(d.pref, attr, &align, sizeof align),
             "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)");
  int found = 0;
  lt_check(a.heuristic(d.handle, d.desc, d.la, d.lb, d.lc, d.lc, d.pref, 1, &d.best, &found),
           "cublasLtMatmulAlgoGetHeuristic");
  if (found < 1 || d.best.state != 0)
    throw std::runtime_error("cuBLASLt has no algorithm for " + std::string(precision_name(precision)) +
                             (b_transposed ? " NT " : " NN ") + std::to_string(M) + "x" + std::to_string(N) +
                             "x" + std::to_string(K));
  d.workspace.resize(std::max<size_t>(d.best.workspace_size, 1));
}

CublasLtGemm::~CublasLtGemm() = default;

void CublasLtGemm::run(cudaStream_t stream, const void* A, const void* B, float* C, const float* bias,
                       float beta) {
  const Impl& d = *impl_;
  const float one = 1.0f;
  if (bias)
    lt_check(api().desc_set(d.desc, kDescBiasPointer, &bias, sizeof bias),
             "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  lt_check(api().matmul(d.handle, d.desc, &one, B, d.la, A, d.lb, &beta, C, d.lc, C, d.lc, &d.best.algo,
                        d.workspace.get(), d.workspace.bytes(), stream),
           "cublasLtMatmul");
}

namespace {
// cublaslt_product's plans, by (device, stream, precision, layout, M, N, K, lda, ldb, ldc, bias, the
// operands' common alignment). Never
// destroyed: at exit cuBLASLt's own globals may already be gone, so the plans are not released then (the
// owners of streams release theirs through cublaslt_forget).
using PlanKey =
    std::tuple<int, Stream, int, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, uint32_t>;
struct Plans {
  std::mutex mu;
  std::map<PlanKey, std::unique_ptr<CublasLtGemm>> map;
};
Plans& plans() {
  static Plans& p = *new Plans;
  return p;
}
}  // namespace

void cublaslt_forget(Stream stream) noexcept {
  Plans& p = plans();
  std::lock_guard<std::mutex> lock(p.mu);
  for (auto it = p.map.begin(); it != p.map.end();)
    it = std::get<1>(it->first) == stream ? p.map.erase(it) : std::next(it);
}

void retire_stream(cudaStream_t stream) noexcept {
  if (!stream) return;
  cudaStreamSynchronize(stream);
  cublaslt_forget(stream);
  cudaStreamDestroy(stream);
}

void cublaslt_product(Stream stream, GemmPrecision precision, bool b_transposed, int64_t M, int64_t N,
                      int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb, float* C,
                      int64_t ldc, const float* bias, float beta) {
  Plans& plans_ = plans();
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  // The largest power of two (at most 256) dividing every operand's address, bias included.
  uintptr_t bits = reinterpret_cast<uintptr_t>(A) | reinterpret_cast<uintptr_t>(B) |
                   reinterpret_cast<uintptr_t>(C) | reinterpret_cast<uintptr_t>(bias) | uintptr_t{256};
  const uint32_t align = static_cast<uint32_t>(bits & (~bits + 1));
  const PlanKey key(dev, stream, static_cast<int>(precision), b_transposed, M, N, K, lda, ldb, ldc,
                    bias != nullptr, align);
  CublasLtGemm* plan = nullptr;
  {
    std::lock_guard<std::mutex> lock(plans_.mu);
    std::unique_ptr<CublasLtGemm>& p = plans_.map[key];
    try {
      if (!p)
        p = std::make_unique<CublasLtGemm>(precision, M, N, K, b_transposed, lda, ldb, ldc, bias != nullptr,
                                           align);
    } catch (const OutOfMemory&) {
      plans_.map.erase(key);
      throw;  // as it is: the model's out-of-memory recovery knows it
    } catch (const std::exception& e) {
      plans_.map.erase(key);
      throw std::runtime_error(std::string("PRIORTUNE_CUDA_GEMM=cublaslt: ") + e.what());
    }
    plan = p.get();
  }
  // Plans are keyed by stream, and a stream's products are queued by one thread at a time (the model's lock):
  // setting a plan's bias pointer and queueing it do not race.
  plan->run(stream, A, B, C, bias, beta);
}

}  // namespace cuda
}  // namespace pt
