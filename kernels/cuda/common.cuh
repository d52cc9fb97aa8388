// Shared helpers of the CUDA sources (not part of the public headers): error checks that throw, an RAII
// device buffer, and what the op self-tests need (seeded random inputs, host/device copies, the error
// measure of priortune/cuda_ops.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "priortune/cuda_ops.h"

namespace pt {
namespace cuda {

// A failed device allocation (the message names the size and CUDA's error).
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws std::runtime_error("<what>: <error name> (<error string>)"), OutOfMemory for
// cudaErrorMemoryAllocation (pinned host memory, graph instantiation: the model's out-of-memory recovery
// knows it), and clears the (non-sticky) error.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    const std::string msg =
        std::string("CUDA ") + what + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
    if (e == cudaErrorMemoryAllocation) throw OutOfMemory(msg);
    throw std::runtime_error(msg);
  }
}

// The kernel switches the CUDA sources read while work is queued (gemm.cu, attention*.cu): a captured graph
// keeps the choices made at its capture, so they are part of a step graph's key (a step after a switch
// changed runs eagerly and is captured again instead of replaying the old choice).
inline std::string kernel_switches() {
  std::string s;
  for (const char* name : {"PRIORTUNE_CUDA_GEMM", "PRIORTUNE_CUDA_GEMM_OUT16", "PRIORTUNE_CUDA_GEMM_PEEL",
                           "PRIORTUNE_CUDA_GEMM_SPLITK", "PRIORTUNE_CUDA_WGMMA", "PRIORTUNE_CUDA_TMA",
                           "PRIORTUNE_CUDA_ATTN", "PRIORTUNE_CUDA_ATTN_ASYNC", "PRIORTUNE_CUBLASLT"}) {
    const char* v = std::getenv(name);
    s += v ? v : "";
    s += ',';
  }
  return s;
}
// Whether environment variable `name` is set to exactly `value` (the kernels' switches: "0" keeps a kernel
// off, "1" turns an option on).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

// After a kernel launch: configuration errors (bad grid, too much shared memory) surface here.
inline void check_launch(const char* op) {
  check(cudaGetLastError(), op);
}

// Device 0's properties that kernel choices depend on, read once.
struct DeviceInfo {
  int sms = 1, major = 0;
  size_t smem_optin = 48 * 1024;   // a block's most shared memory (opted in)
  size_t smem_per_sm = 48 * 1024;  // an SM's (each resident block also takes 1 KB of it for the system)
};
inline const DeviceInfo& device_info() {
  static const DeviceInfo info = [] {
    cudaDeviceProp p{};
    check(cudaGetDeviceProperties(&p, 0), "cudaGetDeviceProperties");
    DeviceInfo d;
    d.sms = p.multiProcessorCount > 1 ? p.multiProcessorCount : 1;
    d.major = p.major;
    d.smem_optin = p.sharedMemPerBlockOptin;
    d.smem_per_sm = p.sharedMemPerMultiprocessor;
    return d;
  }();
  return info;
}

// Opts a kernel into `bytes` of dynamic shared memory (more than 48 KB needs it) on the current device.
// The attribute is one setting per kernel for the whole process while launches come from several host
// threads (two kNN indexes searching at once, each launching a kernel with its own size): it only ever
// grows, under one lock, so no launch finds it lowered below what its caller asked for.
template <class Kernel>
void allow_smem(Kernel* kernel, size_t bytes, const char* op) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> granted;
  int dev = 0;
  check(cudaGetDevice(&dev), op);
  std::lock_guard<std::mutex> lock(mu);
  size_t& g = granted[{reinterpret_cast<const void*>(kernel), dev}];
  if (bytes <= g) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        op);
  g = bytes;
}

// Two floats rounded to bf16 (nearest even) and packed, the first in the low half (memory order).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// GPT-2's GELU (tanh approximation): gelu_forward's, and the GEMM epilogue's that writes it beside a product.
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoeff = 0.044715f;
__device__ __forceinline__ float gelu_tanh(float v) {
  return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + kGeluCoeff * v * v * v)));
}
// d * gelu_tanh'(v): gelu_backward's, and the epilogue's that writes it beside the product giving d.
__device__ __forceinline__ float gelu_tanh_grad(float v, float d) {
  const float t = tanhf(kSqrt2OverPi * (v + kGeluCoeff * v * v * v));
  const float local =
      0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCoeff * v * v);
  return d * local;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Grid size for a grid-stride loop over n items with `threads` per block (bounded; never 0).
inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65535 * 8) {
  int64_t b = ceil_div(n > 0 ? n : 1, threads);
  return static_cast<unsigned>(b < max_blocks ? b : max_blocks);
}

// A device allocation owned by one object (moved, never copied).
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { resize(n); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_, n_ = o.n_;
      o.p_ = nullptr, o.n_ = 0;
    }
    return *this;
  }
  // Reallocates (contents lost) when n exceeds the capacity; never shrinks. `what` names the buffer in the
  // out-of-memory message.
  void resize(size_t n, const char* what = nullptr) {
    if (n <= n_) return;
    release();
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, n * sizeof(T));
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw OutOfMemory("CUDA out of memory: cannot allocate " + std::to_string(n * sizeof(T)) + " bytes" +
                        (what ? std::string(" for ") + what : std::string()) + " (" + cudaGetErrorString(e) +
                        ")");
    }
    p_ = static_cast<T*>(p);
    n_ = n;
  }
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Host round-to-nearest-even to bf16 (the device's __float2bfloat16_rn on finite values and infinities; NaN
// stays NaN), its value back as a float, and the two together.
inline uint16_t host_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float host_bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf16(float x) {
  return host_bf16_value(host_bf16_bits(x));
}

// --- Self-test support (synchronous; not for the hot path) ---------------------------------------------
template <class T>
DeviceBuffer<T> to_device(const std::vector<T>& h) {
  DeviceBuffer<T> d(h.size() ? h.size() : 1);
  if (!h.empty())
    check(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "copy to device");
  return d;
}
template <class T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  check(cudaDeviceSynchronize(), "kernel execution");
  if (n) check(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), "copy to host");
  return h;
}
// Uniform values in [-scale, scale), xorshift from `seed` (deterministic).
inline std::vector<float> random_vector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 12345u;
  if (!s) s = 1;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    x = scale * (2.0f * static_cast<float>(s >> 8) / 16777216.0f - 1.0f);
  }
  return v;
}
// The error measure of OpCheck: max |got - want| / max |want|.
inline double rel_error(const std::vector<float>& got, const std::vector<float>& want) {
  double worst = 0.0, scale = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    worst = std::isnan(d) ? INFINITY : (d > worst ? d : worst);
    scale = std::fabs(want[i]) > scale ? std::fabs(want[i]) : scale;
  }
  return worst / scale;
}
inline OpCheck make_check(std::string op, std::string shape, double err, double tol, std::string note) {
  OpCheck c;
  c.op = std::move(op);
  c.shape = std::move(shape);
  c.err = err;
  c.tol = tol;
  c.pass = err <= tol;
  c.note = std::move(note);
  return c;
}

}  // namespace cuda
}  // namespace pt
