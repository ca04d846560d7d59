// The element-wise body shared by every element-wise op and reduction, on multi_tensor_apply.
//
// An op is a small struct describing its lists and the maths on ONE element:
//   kLists            scalar lists of the table, all of the group's storage type T;
//   kReads / kWrites  bit l set: list l is loaded / stored (a list that is only written is not read);
//   kMasked           one more list after them: optional bool masks (empty list = all selected);
//   kReduce           operator() returns a contribution summed over the group (reductions): the
//                     compute type A (reduce_sum), or Sums<A, N> for N sums taken in one pass
//                     (add_sums; an op may update its lists and reduce at once);
//   load_scalars()    run once per thread before the loop (reads device scalars: norms, dots);
//   finish_block()    optional: run by every thread of the block after the loop (block-wide
//                     collectives allowed: publishes a per-thread predicate once per block);
//   operator()(T (&x)[kLists], bool selected, int64_t index_in_tensor, int64_t aux)
//                     reads/updates x in place (storage type: values not written stay bitwise).
// Absent optional lists (null pointers) are neither loaded nor stored; the op knows from its own
// flags that they are absent.
#pragma once

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>

#include <type_traits>
#include <utility>

#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {

// N sums reduced together, element-wise (cub::BlockReduce's Sum takes any type with +). Layout:
// A[N], so a {chunks, N} tensor of A holds one per chunk.
template <typename A, int N>
struct Sums {
  A v[N];

  __host__ __device__ __forceinline__ Sums operator+(const Sums& o) const {
    Sums r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = v[k] + o.v[k];
    return r;
  }
};

// What a reduction op returns per element (A or Sums<A, N>); A, unused, for the other ops. The op
// must spell its return type out: nvcc's host pass, which instantiates the launch, cannot deduce
// `auto` from a __device__ body.
template <typename T, typename Op>
using reduction_t = std::conditional_t<Op::kReduce,
                                       decltype(std::declval<const Op&>()(std::declval<T (&)[Op::kLists]>(), true,
                                                                          int64_t{}, int64_t{})),
                                       acc_type<T>>;

// Whether Op has the optional finish_block().
template <typename Op, typename = void>
struct has_finish_block : std::false_type {};
template <typename Op>
struct has_finish_block<Op, std::void_t<decltype(std::declval<Op&>().finish_block())>> : std::true_type {};

template <typename T, typename Op>
struct ElementwiseFunctor {
  using A = acc_type<T>;
  using R = reduction_t<T, Op>;
  static constexpr int kIlp = ilp_of<T>();
  static constexpr int kLists = Op::kLists;
  static constexpr int kDepth = kLists + (Op::kMasked ? 1 : 0);

  Op op;
  R* partials;  // reductions: one partial per chunk, indexed by ChunkRef::block

  __device__ void operator()(const BlockTensors<kDepth>& tensors, const ChunkRef& c) const {
    Op o = op;
    o.load_scalars();
    R sum{};
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
          sum = sum + o(x, sel.v[k], i + k, c.aux);
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
    if constexpr (has_finish_block<Op>::value) o.finish_block();
    if constexpr (Op::kReduce) {
      // Fixed tree over a fixed thread -> element assignment: the partial is deterministic.
      using BlockReduce = cub::BlockReduce<R, kBlockSize>;
      __shared__ typename BlockReduce::TempStorage tmp;
      const R total = BlockReduce(tmp).Sum(sum);
      if (threadIdx.x == 0) partials[c.block] = total;
    }
  }
};

// Pass 2 of a reduction: one block sums the per-chunk partials in a fixed order and hands the
// total to out (thread 0).
template <typename R, typename Out>
__global__ void __launch_bounds__(kBlockSize) sum_partials_kernel(const R* partials, int64_t n, Out out) {
  R sum{};
  for (int64_t i = threadIdx.x; i < n; i += kBlockSize) sum = sum + partials[i];
  using BlockReduce = cub::BlockReduce<R, kBlockSize>;
  __shared__ typename BlockReduce::TempStorage tmp;
  const R total = BlockReduce(tmp).Sum(sum);
  if (threadIdx.x == 0) out(total);
}

// reduce_sum's output: the total, stored.
template <typename A>
struct StoreTotal {
  A* out;
  __device__ void operator()(A total) const { *out = total; }
};

// add_sums' output: out[k] += total[k] for the first `count` sums, rounded to out's type S first
// (as reference.py's `sums[k] += total.to(sums.dtype)`); the other elements of out are not written.
template <typename S, typename A, int N>
struct AddTotals {
  S* out;
  int count;
  __device__ void operator()(const Sums<A, N>& total) const {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < count) out[k] = out[k] + static_cast<S>(total.v[k]);
  }
};

// Pass 1 of a reduction: the per-chunk partials, as a {chunks, elements of R / A} tensor of the
// compute type A.
template <typename T, typename Op>
at::Tensor chunk_partials(const std::array<at::TensorList, ElementwiseFunctor<T, Op>::kDepth>& lists, const Op& op,
                          at::IntArrayRef aux) {
  using A = acc_type<T>;
  using R = reduction_t<T, Op>;
  static_assert(sizeof(R) % sizeof(A) == 0 && alignof(R) <= alignof(A), "R must be laid out as A[N]");
  const auto opts = lists[0][0].options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  at::Tensor partials = at::empty({count_chunks(lists[0]), static_cast<int64_t>(sizeof(R) / sizeof(A))}, opts);
  multi_tensor_apply(lists, aux, ElementwiseFunctor<T, Op>{op, static_cast<R*>(partials.data_ptr())});
  return partials;
}

template <typename R, typename Out>
void launch_sum_partials(const at::Tensor& partials, const Out& out) {
  SAM_KERNELS_LAUNCH(1, kBlockSize, 0, c10::cuda::getCurrentCUDAStream(), sum_partials_kernel<R, Out>)(
      static_cast<const R*>(partials.data_ptr()), partials.size(0), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  using A = acc_type<T>;
  static_assert(Op::kReduce && std::is_same_v<reduction_t<T, Op>, A>, "use apply_elementwise or add_sums");
  const at::Tensor partials = chunk_partials<T>(lists, op, {});
  at::Tensor out = at::empty({}, partials.options());
  launch_sum_partials<A>(partials, StoreTotal<A>{static_cast<A*>(out.data_ptr())});
  return out;
}

// Runs an op that returns Sums<A, N> (and may update its lists as apply_elementwise does), then
// ADDS the first `count` of the N sums over the group into sums[0..count) (a contiguous fp32 or
// fp64 tensor on the lists' device, checked by the caller); the rest of sums is not written.
// aux as apply_elementwise's. Pass 1 / pass 2 as reduce_sum: deterministic, no host synchronization.
template <typename T, typename Op>
void add_sums(const std::array<at::TensorList, ElementwiseFunctor<T, Op>::kDepth>& lists, const Op& op,
              const at::Tensor& sums, int count, at::IntArrayRef aux = {}) {
  using A = acc_type<T>;
  using R = reduction_t<T, Op>;
  constexpr int kN = static_cast<int>(sizeof(R) / sizeof(A));
  static_assert(Op::kReduce && std::is_same_v<R, Sums<A, kN>>, "use reduce_sum");
  TORCH_INTERNAL_ASSERT(count >= 0 && count <= kN && sums.numel() >= count && sums.is_contiguous());
  const at::Tensor partials = chunk_partials<T>(lists, op, aux);
  if (sums.scalar_type() == at::kDouble) {
    launch_sum_partials<R>(partials, AddTotals<double, A, kN>{sums.data_ptr<double>(), count});
  } else {
    TORCH_INTERNAL_ASSERT(sums.scalar_type() == at::kFloat);
    launch_sum_partials<R>(partials, AddTotals<float, A, kN>{sums.data_ptr<float>(), count});
  }
}

}  // namespace sam_kernels::cuda
