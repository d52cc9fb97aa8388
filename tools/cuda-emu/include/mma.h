// Stand-in for CUDA's <mma.h> in the CPU emulator: nvcuda::wmma, declared in emu_cuda.h (read its header
// comment for what the emulation checks and what it cannot prove).
#pragma once
#include "emu_cuda.h"
