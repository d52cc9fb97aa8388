// The CUDA model's host-side pieces every build has (precision names), and for CPU-only builds (node-gyp, or
// cmake-js without nvcc) the entry points, which report that CUDA is not compiled in.
#include <stdexcept>

#include "priortune/cuda_model.h"

namespace pt {
const char* cuda::precision_name(cuda::GemmPrecision p) {
  return p == cuda::GemmPrecision::BF16 ? "bf16" : p == cuda::GemmPrecision::TF32 ? "tf32" : "fp32";
}
}  // namespace pt

#ifndef PRIORTUNE_WITH_CUDA
namespace pt {
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "backend \"cuda\" is not available: this build of priortune has no CUDA backend (built without nvcc or "
      "with PRIORTUNE_CUDA=OFF)");
}
}  // namespace
std::unique_ptr<DeviceModel> cuda_model(const Model&, const CudaModelOptions&) {
  no_cuda();
}
std::vector<cuda::OpCheck> cuda_selftest(const std::vector<std::string>&) {
  no_cuda();
}
GemmBenchResult cuda_gemm_benchmark(cuda::GemmPrecision, int64_t, int64_t, int64_t, int, GemmEngine, bool) {
  no_cuda();
}
}  // namespace pt
#endif
