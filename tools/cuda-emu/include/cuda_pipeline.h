// Stand-in for CUDA's <cuda_pipeline.h> in the CPU emulator: the cp.async primitives
// (__pipeline_memcpy_async, __pipeline_commit, __pipeline_wait_prior), declared in emu_cuda.h (read its
// header comment for what the emulation checks and what it cannot prove).
#pragma once
#include "emu_cuda.h"
