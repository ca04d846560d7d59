// Emulation stand-in for c10::cuda streams: one (null) stream; kernels run when launched.
#pragma once

#include "cuda_runtime_api.h"

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
