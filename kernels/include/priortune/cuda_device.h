// Run-time probe of the CUDA backend. The addon links the CUDA runtime statically, so this is safe to
// call on machines with no GPU or no driver: it reports why CUDA is unusable instead of failing.
#pragma once
#include <cstddef>
#include <string>

namespace pt {

struct CudaProbe {
  bool compiled = false;  // this build contains CUDA kernels
  bool usable = false;    // a device is present and the driver accepts this runtime
  int device_count = 0;
  std::string reason;        // why not usable (empty when usable)
  std::string name;          // device 0
  int major = 0, minor = 0;  // compute capability of device 0
  size_t total_memory = 0;   // bytes, device 0
};

CudaProbe cuda_probe();

}  // namespace pt
