// perturb_ (backup + ascent step) and restore_; see reference.py for the contract.
// One launch per group (per table fill); the scale is computed in the kernel from the device norm.
// Telemetry (`perturbation_sq`): the same pass also returns (w_new − w)² per element as stored,
// reduced like reduce_sum and added into perturbation_sq (add_sums). Telemetry (`grad_copies`):
// the same pass stores the grads it loaded into one more list, so g(w) is kept at one extra write
// instead of a copy that reads the grads again. perturb_ without either is a separate
// instantiation with the work it had before.
#include <torch/library.h>

#include <type_traits>

#include "elementwise.cuh"

namespace sam_kernels::cuda {
namespace {

// lists: 0 params (rw; only read with kInto), 1 grads (r), 2 backups (w), [3 grad_copies (w) if
// kCopy], then optional masks. aux: the tensor's RNG key. kInto (into_backups): w + e goes to the
// backups and w is not written, so the pass stores one list of weights instead of two.
template <typename T, bool kSums, bool kCopy, bool kInto>
struct PerturbOp {
  using A = acc_type<T>;
  static constexpr int kLists = kCopy ? 4 : 3;
  static constexpr unsigned kReads = 0b0011, kWrites = (kCopy ? 0b1100 : 0b0100) | (kInto ? 0b0000 : 0b0001);
  static constexpr bool kMasked = true, kReduce = kSums;
  DeviceScalar sq_norm;
  A rho, eps, eta, inv_keep_prob;
  bool adaptive, keep;
  uint32_t keep_threshold;
  A scale;      // set by load_scalars
  bool finite;  // set by load_scalars

  __device__ void load_scalars() {
    // As reference.py evaluates it on CUDA: rho / t is reciprocal(t)·rho, t / keep_prob is t·(1/keep_prob).
    scale = (A(1) / (::sqrt(sq_norm.get<A>()) + eps)) * rho;
    if (keep) scale = scale * inv_keep_prob;
    // An Inf gradient gives sq_norm = inf and scale = 0, but 0·inf = NaN: test the norm too.
    finite = ::isfinite(scale) && sq_norm.is_finite();
  }
  // Spelled out, not auto (see reduction_t).
  using Result = std::conditional_t<kSums, Sums<A, 1>, void>;

  __device__ Result operator()(T (&x)[kLists], bool selected, int64_t i, int64_t key) const {
    x[2] = x[0];  // exact copy of the storage bits
    // Before any early return: every element's grad bits, whatever the mask, keep mask or norm.
    if constexpr (kCopy) x[3] = x[1];
    // Unselected entries (mask, keep mask, non-finite scale) keep their bits: no add of zero. They
    // add exactly +0 to perturbation_sq (not (w − w)², NaN for a NaN/Inf weight left alone).
    if (!finite || !selected || (keep && !keep_element(static_cast<uint32_t>(key), i, keep_threshold)))
      return Result();
    const A w = static_cast<A>(x[0]);
    const A g = static_cast<A>(x[1]);
    T& out = x[kInto ? 2 : 0];
    if (adaptive) {
      const A t = ::fabs(w) + eta;
      out = static_cast<T>(w + t * t * g * scale);
    } else {
      out = static_cast<T>(w + g * scale);
    }
    if constexpr (kSums) {
      const A applied = static_cast<A>(out) - w;  // as stored: rounded to fp16/bf16 for those
      return {{applied * applied}};
    }
  }
};

// lists: 0 params (w), 1 backups (r).
template <typename T>
struct CopyOp {
  static constexpr int kLists = 2;
  static constexpr unsigned kReads = 0b10, kWrites = 0b01;
  static constexpr bool kMasked = false, kReduce = false;

  __device__ void load_scalars() {}
  __device__ void operator()(T (&x)[2], bool, int64_t, int64_t) const { x[0] = x[1]; }
};

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sq_norm,
                  double rho, double eps, std::optional<at::TensorList> masks, bool adaptive, double eta,
                  double keep_prob, at::IntArrayRef keys, const std::optional<at::Tensor>& perturbation_sq,
                  std::optional<at::TensorList> grad_copies, bool into_backups) {
  const uint32_t keep_threshold =
      sam_kernels::check_perturb_args(params, grads, backups, masks, keep_prob, keys, c10::DeviceType::CUDA);
  if (perturbation_sq) sam_kernels::check_sums_tensor("perturb_", "perturbation_sq", *perturbation_sq, 1, params);
  if (grad_copies) check_list("perturb_", "grad_copies", params, *grad_copies);
  sam_kernels::check_no_shared_writes("perturb_", {{params, true}, {grads, false}, {backups, true},
                                                   {masks.value_or(at::TensorList{}), false},
                                                   {grad_copies.value_or(at::TensorList{}), true}});
  const bool keep = keep_prob < 1.0;
  const DeviceScalar sq = device_scalar(sq_norm, params[0], "perturb_", "sq_norm");
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_floats(params[0].scalar_type(), "perturb_", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    const at::TensorList masks_or_none = masks.value_or(at::TensorList{});
    auto run = [&](auto op) {
      using Op = decltype(op);
      op.sq_norm = sq;
      op.rho = static_cast<A>(rho);
      op.eps = static_cast<A>(eps);
      op.eta = static_cast<A>(eta);
      op.inv_keep_prob = A(1) / static_cast<A>(keep_prob);
      op.adaptive = adaptive;
      op.keep = keep;
      op.keep_threshold = keep_threshold;
      const at::IntArrayRef aux = keep ? keys : at::IntArrayRef{};
      auto launch = [&](const std::array<at::TensorList, ElementwiseFunctor<T, Op>::kDepth>& lists) {
        if constexpr (Op::kReduce) {
          add_sums<T>(lists, op, *perturbation_sq, 1, aux);
        } else {
          apply_elementwise<T>(lists, op, aux);
        }
      };
      if constexpr (Op::kLists == 4) {
        launch({params, grads, backups, *grad_copies, masks_or_none});
      } else {
        launch({params, grads, backups, masks_or_none});
      }
    };
    auto run_into = [&](auto into) {
      constexpr bool kInto = decltype(into)::value;
      if (perturbation_sq && grad_copies) {
        run(PerturbOp<T, true, true, kInto>{});
      } else if (perturbation_sq) {
        run(PerturbOp<T, true, false, kInto>{});
      } else if (grad_copies) {
        run(PerturbOp<T, false, true, kInto>{});
      } else {
        run(PerturbOp<T, false, false, kInto>{});
      }
    };
    if (into_backups) {
      run_into(std::true_type{});
    } else {
      run_into(std::false_type{});
    }
  });
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  check_primary("restore_", "params", params);
  check_list("restore_", "backups", params, backups);
  sam_kernels::check_no_shared_writes("restore_", {{params, true}, {backups, false}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_floats(params[0].scalar_type(), "restore_", [&](auto tag) {
    using T = decltype(tag);
    apply_elementwise<T>({params, backups}, CopyOp<T>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("perturb_", &perturb_cuda);
  m.impl("restore_", &restore_cuda);
}

}  // namespace sam_kernels::cuda
