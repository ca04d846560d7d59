// Reductions: grad_sq_norm (Σ (m ⊙ T ⊙ g)²) and dot (Σ ⟨a, b⟩); see reference.py.
// Two launches per group: per-chunk partials, then a one-block fixed-order sum (elementwise.cuh).
#include <torch/library.h>

#include "elementwise.cuh"

namespace sam_kernels::cuda {
namespace {

// lists: 0 grads (r), 1 params (r, absent unless adaptive), then optional masks.
template <typename T>
struct SqNormOp {
  using A = acc_type<T>;
  static constexpr int kLists = 2;
  static constexpr unsigned kReads = 0b11, kWrites = 0b00;
  static constexpr bool kMasked = true, kReduce = true;
  bool adaptive;
  bool masked;
  A eta;

  __device__ void load_scalars() {}
  __device__ A operator()(T (&x)[2], bool selected, int64_t, int64_t) const {
    A g = static_cast<A>(x[0]);
    if (adaptive) g = (::fabs(static_cast<A>(x[1])) + eta) * g;
    // Masked-out entries contribute nothing, even a NaN/Inf (reference.py selects, it does not multiply).
    if (masked && !selected) g = A(0);
    return g * g;
  }
};

// lists: 0 a (r), 1 b (r).
template <typename T>
struct DotOp {
  using A = acc_type<T>;
  static constexpr int kLists = 2;
  static constexpr unsigned kReads = 0b11, kWrites = 0b00;
  static constexpr bool kMasked = false, kReduce = true;

  __device__ void load_scalars() {}
  __device__ A operator()(T (&x)[2], bool, int64_t, int64_t) const {
    return static_cast<A>(x[0]) * static_cast<A>(x[1]);
  }
};

at::Tensor grad_sq_norm_cuda(at::TensorList grads, std::optional<at::TensorList> params,
                             std::optional<at::TensorList> masks, double eta) {
  check_primary("grad_sq_norm", "grads", grads);
  if (params) check_list("grad_sq_norm", "params", grads, *params);
  if (masks) check_list("grad_sq_norm", "masks", grads, *masks, /*is_mask=*/true);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  at::Tensor out;
  dispatch_floats(grads[0].scalar_type(), "grad_sq_norm", [&](auto tag) {
    using T = decltype(tag);
    const SqNormOp<T> op{params.has_value(), masks.has_value(), static_cast<acc_type<T>>(eta)};
    out = reduce_sum<T>({grads, params.value_or(at::TensorList{}), masks.value_or(at::TensorList{})}, op);
  });
  return out;
}

at::Tensor dot_cuda(at::TensorList a, at::TensorList b) {
  check_primary("dot", "a", a);
  check_list("dot", "b", a, b);
  const c10::cuda::CUDAGuard guard(a[0].device());
  at::Tensor out;
  dispatch_floats(a[0].scalar_type(), "dot", [&](auto tag) {
    using T = decltype(tag);
    out = reduce_sum<T>({a, b}, DotOp<T>{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cuda);
  m.impl("dot", &dot_cuda);
}

}  // namespace sam_kernels::cuda
