// Stand-in for CUDA's <cuda_bf16.h> in the CPU emulator: __nv_bfloat16 and its conversions, declared in
// emu_cuda.h (read its header comment for what the emulation checks and what it cannot prove).
#pragma once
#include "emu_cuda.h"
