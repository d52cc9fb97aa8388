// Branch-free float math that compilers vectorise (libm's expf/tanhf do not, and dominated the softmax
// and GELU loops), and PT_MULTIVERSION: elementwise kernels are compiled for AVX-512, AVX2 and baseline
// x86-64 and the loader picks one for the CPU (GCC/Clang function multiversioning), so one binary is
// both portable and vectorised at full width.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define PT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PT_MULTIVERSION
#endif

namespace pt {

// exp(x) for float: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 minimax
// polynomial for e^r (Cephes expf coefficients); max relative error about 2 ulp on [-87, 88].
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by the 1.5 * 2^23 trick (no floorf call, so it vectorises without SSE4.1): `big`'s
  // bits are 0x4B400000 + n.
  const float big = x * 1.44269504088896341f + 12582912.0f;
  const float n = big - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from big's bits, in unsigned arithmetic: a NaN x (the clamp lets it through; p is NaN then) would
  // make a float-to-int cast and a shift of a negative value, both undefined behaviour.
  uint32_t bits;
  std::memcpy(&bits, &big, sizeof bits);
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error below 1e-7, enough for GELU (it multiplies 0.5 x).
inline float tanh_approx(float x) {
  return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f);
}

}  // namespace pt
