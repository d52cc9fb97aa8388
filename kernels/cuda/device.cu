// CUDA device probe (see priortune/cuda_device.h). cudaGetDeviceCount returns an error code, not a crash,
// when no driver is installed (cudaErrorInsufficientDriver / cudaErrorNoDevice), which we report.
#include <cuda_runtime.h>

#include "priortune/cuda_device.h"

namespace pt {
CudaProbe cuda_probe() {
  CudaProbe p;
  p.compiled = true;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    p.reason =
        std::string("CUDA unavailable: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
    cudaGetLastError();  // clear the sticky-free error so later probes start clean
    return p;
  }
  p.device_count = count;
  if (count == 0) {
    p.reason = "CUDA unavailable: no CUDA device found";
    return p;
  }
  cudaDeviceProp prop{};
  err = cudaGetDeviceProperties(&prop, 0);
  if (err != cudaSuccess) {
    p.reason = std::string("CUDA unavailable: cudaGetDeviceProperties failed: ") + cudaGetErrorString(err);
    return p;
  }
  p.name = prop.name;
  p.major = prop.major;
  p.minor = prop.minor;
  p.total_memory = prop.totalGlobalMem;
  if (prop.major < 8) {
    p.reason = "CUDA device " + p.name + " has compute capability " + std::to_string(prop.major) + "." +
               std::to_string(prop.minor) + "; priortune's kernels need 8.0 or newer";
    return p;
  }
  p.usable = true;
  return p;
}
}  // namespace pt
