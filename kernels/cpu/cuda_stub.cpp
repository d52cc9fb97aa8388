// CPU-only builds (node-gyp, or cmake-js without nvcc): the CUDA probe reports that CUDA is not compiled in.
#ifndef PRIORTUNE_WITH_CUDA
#include "priortune/cuda_device.h"

namespace pt {
CudaProbe cuda_probe() {
  CudaProbe p;
  p.reason = "this build of priortune has no CUDA backend (built without nvcc or with PRIORTUNE_CUDA=OFF)";
  return p;
}
}  // namespace pt
#endif
