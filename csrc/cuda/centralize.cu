// Gradient centralization (GCSAM): g ← g − mean(g over dims 1..) per row of dim 0, for the tensors
// of more than one dimension; a row is a contiguous run of numel/size(0) elements (dim 0
// outermost: checked on the host). One launch per group (per table fill) on multi_tensor_apply,
// with the row length as each tensor's aux value.
//
// A block takes the rows that START in its chunk (each row starts in exactly one chunk; a row may
// run past the chunk's end). Its threads form segments of kSegment threads (rows shorter than
// kLongRow) or one segment of the whole block (longer rows); a segment sums its row lane-strided,
// reduces the lanes' partials with a fixed tree in shared memory (deterministic), then rewrites
// the row, which it just read (from L2 the second time unless the chunk's rows exceed it).
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

constexpr int kSegment = 32;
constexpr int64_t kLongRow = 2048;

template <typename T>
struct CentralizeRows {
  using A = acc_type<T>;
  static constexpr int kDepth = 1;
  static constexpr int kIlp = ilp_of<T>();  // only sets the launcher's alignment flag (unused here)

  __device__ void operator()(const BlockTensors<1>& tensors, const ChunkRef& c) const {
    __shared__ A partial[kBlockSize];
    T* g = static_cast<T*>(tensors.ptrs[0]);
    const int64_t length = c.aux;
    const int width = length < kLongRow ? kSegment : kBlockSize;  // the same in every thread of the block
    const int segments = kBlockSize / width;
    const int lane = static_cast<int>(threadIdx.x) % width;
    const int segment = static_cast<int>(threadIdx.x) / width;
    const int64_t first = (c.begin + length - 1) / length;  // rows r with begin <= r·length < end
    const int64_t last = (c.end + length - 1) / length;
    for (int64_t r0 = first; r0 < last; r0 += segments) {  // every thread runs every round: barriers
      const int64_t row = r0 + segment;
      const bool active = row < last;
      const int64_t base = row * length;
      A sum = 0;
      if (active) {
        for (int64_t i = lane; i < length; i += width) sum += static_cast<A>(g[base + i]);
      }
      partial[threadIdx.x] = sum;
      __syncthreads();
      for (int s = width / 2; s > 0; s /= 2) {
        if (lane < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
      }
      const A mean = partial[segment * width] / static_cast<A>(length);
      if (active) {
        for (int64_t i = lane; i < length; i += width) g[base + i] = static_cast<T>(static_cast<A>(g[base + i]) - mean);
      }
      __syncthreads();  // partial is rewritten by the next round
    }
  }
};

void centralize_cuda(at::TensorList grads) {
  check_primary("centralize_", "grads", grads);
  sam_kernels::check_no_shared_writes("centralize_", {{grads, true}});
  std::vector<at::Tensor> picked;
  std::vector<int64_t> lengths;
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    if (g.dim() < 2 || g.numel() == 0) continue;
    lengths.push_back(sam_kernels::row_length("centralize_", grads, i));
    picked.push_back(g);
  }
  if (picked.empty()) return;
  const c10::cuda::CUDAGuard guard(grads[0].device());
  dispatch_floats(grads[0].scalar_type(), "centralize_", [&](auto tag) {
    using T = decltype(tag);
    multi_tensor_apply<CentralizeRows<T>>({at::TensorList(picked)}, lengths, CentralizeRows<T>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("centralize_", &centralize_cuda);
}

}  // namespace sam_kernels::cuda
