// The element-wise body shared by every element-wise op and reduction, on multi_tensor_apply.
//
// An op is a small struct describing its lists and the maths on ONE element:
//   kLists            scalar lists of the table, all of the group's storage type T;
//   kReads / kWrites  bit l set: list l is loaded / stored (a list that is only written is not read);
//   kMasked           one more list after them: optional bool masks (empty list = all selected);
//   kReduce           operator() returns a contribution summed over the group (reductions);
//   load_scalars()    run once per thread before the loop (reads device scalars: norms, dots);
//   operator()(T (&x)[kLists], bool selected, int64_t index_in_tensor, int64_t aux)
//                     reads/updates x in place (storage type: values not written stay bitwise).
// Absent optional lists (null pointers) are neither loaded nor stored; the op knows from its own
// flags that they are absent.
#pragma once

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>

#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {

template <typename T, typename Op>
struct ElementwiseFunctor {
  using A = acc_type<T>;
  static constexpr int kIlp = ilp_of<T>();
  static constexpr int kLists = Op::kLists;
  static constexpr int kDepth = kLists + (Op::kMasked ? 1 : 0);

  Op op;
  A* partials;  // reductions: one partial per chunk, indexed by ChunkRef::block

  __device__ void operator()(const BlockTensors<kDepth>& tensors, const ChunkRef& c) const {
    Op o = op;
    o.load_scalars();
    A sum = A(0);
    for_each_group<kIlp>(c, [&](int64_t i) {
      if (i >= c.end) return;
      Vec<T, kIlp> v[kLists] = {};
#pragma unroll
      for (int l = 0; l < kLists; ++l)
        if ((Op::kReads >> l & 1u) && tensors.ptrs[l] != nullptr)
          v[l] = load_group<T, kIlp>(tensors.ptrs[l], i, c.end, c.aligned);
      Vec<bool, kIlp> sel;
#pragma unroll
      for (int k = 0; k < kIlp; ++k) sel.v[k] = true;
      if constexpr (Op::kMasked) {
        if (tensors.ptrs[kLists] != nullptr)
          sel = load_group<bool, kIlp>(tensors.ptrs[kLists], i, c.end, c.aligned);
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        if (i + k >= c.end) break;
        T x[kLists];
#pragma unroll
        for (int l = 0; l < kLists; ++l) x[l] = v[l].v[k];
        if constexpr (Op::kReduce) {
          sum += o(x, sel.v[k], i + k, c.aux);
        } else {
          o(x, sel.v[k], i + k, c.aux);
        }
#pragma unroll
        for (int l = 0; l < kLists; ++l) v[l].v[k] = x[l];
      }
#pragma unroll
      for (int l = 0; l < kLists; ++l)
        if ((Op::kWrites >> l & 1u) && tensors.ptrs[l] != nullptr)
          store_group<T, kIlp>(tensors.ptrs[l], v[l], i, c.end, c.aligned);
    });
    if constexpr (Op::kReduce) {
      // Fixed tree over a fixed thread -> element assignment: the partial is deterministic.
      using BlockReduce = cub::BlockReduce<A, kBlockSize>;
      __shared__ typename BlockReduce::TempStorage tmp;
      const A total = BlockReduce(tmp).Sum(sum);
      if (threadIdx.x == 0) partials[c.block] = total;
    }
  }
};

// Pass 2 of a reduction: one block sums the per-chunk partials in a fixed order into the 0-dim out.
template <typename A>
__global__ void __launch_bounds__(kBlockSize) sum_partials_kernel(const A* partials, int64_t n, A* out) {
  A sum = A(0);
  for (int64_t i = threadIdx.x; i < n; i += kBlockSize) sum += partials[i];
  using BlockReduce = cub::BlockReduce<A, kBlockSize>;
  __shared__ typename BlockReduce::TempStorage tmp;
  const A total = BlockReduce(tmp).Sum(sum);
  if (threadIdx.x == 0) *out = total;
}

// Runs an element-wise op over a group (one launch per table fill).
template <typename T, typename Op>
void apply_elementwise(const std::array<at::TensorList, ElementwiseFunctor<T, Op>::kDepth>& lists, const Op& op,
                       at::IntArrayRef aux = {}) {
  static_assert(!Op::kReduce, "use reduce_sum");
  multi_tensor_apply(lists, aux, ElementwiseFunctor<T, Op>{op, nullptr});
}

// Σ of the op's contributions over a group as a 0-dim tensor of the compute type (fp64 for fp64,
// else fp32): pass 1 writes one partial per chunk, pass 2 sums them in chunk order. Deterministic,
// no host synchronization.
template <typename T, typename Op>
at::Tensor reduce_sum(const std::array<at::TensorList, ElementwiseFunctor<T, Op>::kDepth>& lists, const Op& op) {
  static_assert(Op::kReduce, "use apply_elementwise");
  using A = acc_type<T>;
  const auto opts = lists[0][0].options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const int64_t chunks = count_chunks(lists[0]);
  at::Tensor out = at::empty({}, opts);
  at::Tensor partials = at::empty({chunks}, opts);
  multi_tensor_apply(lists, {}, ElementwiseFunctor<T, Op>{op, static_cast<A*>(partials.data_ptr())});
  sum_partials_kernel<A><<<1, kBlockSize, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const A*>(partials.data_ptr()), chunks, static_cast<A*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace sam_kernels::cuda
