// Stand-in for CUDA's <cuda_runtime.h> in the CPU emulator: the CUDA runtime API, declared in emu_cuda.h
// (read its header comment for what the emulation checks and what it cannot prove).
#pragma once
#include "emu_cuda.h"
