// CPU-only builds (node-gyp, or cmake-js without nvcc): the CUDA kNN index reports that CUDA is not compiled
// in.
#ifndef PRIORTUNE_WITH_CUDA
#include <stdexcept>

#include "priortune/knn.h"

namespace pt {
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "backend: \"cuda\" is not available: this build of priortune has no CUDA backend (built without nvcc "
      "or "
      "with PRIORTUNE_CUDA=OFF)");
}
}  // namespace
std::unique_ptr<KnnIndex> knn_index_cuda(const float*, int64_t, int64_t, KnnMetric) {
  no_cuda();
}
std::unique_ptr<KnnIndex> knn_index_cuda(HostFloats&&, int64_t, KnnMetric) {
  no_cuda();
}
}  // namespace pt
#endif
