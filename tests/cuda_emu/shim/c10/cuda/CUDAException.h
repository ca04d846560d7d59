// Emulation stand-in for c10's CUDA error checks: launches report their errors by throwing.
#pragma once

#include <c10/util/Exception.h>

#include "cuda_runtime_api.h"

#define C10_CUDA_CHECK(expr)                                                                       \
  do {                                                                                             \
    const cudaError_t emu_err = (expr);                                                            \
    TORCH_CHECK(emu_err == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(emu_err));   \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
