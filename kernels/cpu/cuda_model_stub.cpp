// CPU-only builds (node-gyp, or cmake-js without nvcc): the CUDA model reports that CUDA is not compiled in.
#ifndef PRIORTUNE_WITH_CUDA
#include <stdexcept>

#include "priortune/cuda_model.h"

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
std::vector<cuda::OpCheck> cuda_selftest() {
  no_cuda();
}
}  // namespace pt
#endif
