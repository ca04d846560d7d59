// bSAM's three passes (Moellenhoff and Khan, ICLR 2023; the official code's update, see
// sam_kernels/ops/reference.py): the noise sample, the ascent with the variance update, and the
// restore with the descent. One pass each, one launch per group (per table fill); fp16/bf16
// computed in fp32 and rounded once when stored; AMP scalars read on the device (amp.cuh).
#include <torch/library.h>

#include <cmath>

#include "amp.cuh"
#include "elementwise.cuh"

namespace sam_kernels::cuda {
namespace {

// lists: 0 params (rw), 1 backups (w), 2 s (r), 3 noise (r). b ← w; w ← w + z·(1/sqrt(s·N)).
template <typename T>
struct NoiseOp {
  using A = acc_type<T>;
  static constexpr int kLists = 4;
  static constexpr unsigned kReads = 0b1101, kWrites = 0b0011;
  static constexpr bool kMasked = false, kReduce = false;
  A num_data;

  __device__ void load_scalars() {}
  __device__ void operator()(T (&x)[4], bool, int64_t, int64_t) const {
    x[1] = x[0];
    const A sigma = A(1) / ::sqrt(static_cast<A>(x[2]) * num_data);
    x[0] = static_cast<T>(static_cast<A>(x[0]) + static_cast<A>(x[3]) * sigma);
  }
};

// lists: 0 params (w), 1 backups (r), 2 grads (r), 3 s (r), 4 s_next (w).
// w ← b + (g/s)·rho (b when not perturb or skipped); s_next ← s·beta2 + (1 − beta2)·(sqrt(s)·|g| + shift).
template <typename T>
struct AscentOp {
  using A = acc_type<T>;
  static constexpr int kLists = 5;
  static constexpr unsigned kReads = 0b01110, kWrites = 0b10001;
  static constexpr bool kMasked = false, kReduce = false;
  A rho, beta2, one_minus_beta2, shift;  // shift = damping + weight_decay
  bool perturb;
  AmpScalars amp;

  __device__ void load_scalars() { amp.load(); }
  __device__ void operator()(T (&x)[5], bool, int64_t, int64_t) const {
    A g = static_cast<A>(x[2]);
    if (amp.grad_scale != nullptr) g = g * static_cast<A>(amp.inv_scale);
    const A s = static_cast<A>(x[3]);
    x[0] = perturb && !amp.skip ? static_cast<T>(static_cast<A>(x[1]) + (g / s) * rho) : x[1];
    x[4] = static_cast<T>(s * beta2 + one_minus_beta2 * (::sqrt(s) * ::fabs(g) + shift));
  }
};

// lists: 0 params (w), 1 backups (r), 2 grads (r), 3 exp_avgs (rw), 4 s (r), 5 s_next (rw; passed only
// with found_inf, so a step without AMP neither reads nor writes it).
// w ← b; m ← m·beta1 + (1 − beta1)·g (+ decay·w); w ← w + (−lr)·(m/s). Skipped: w ← b, s_next ← s, m kept.
template <typename T>
struct DescentOp {
  using A = acc_type<T>;
  static constexpr int kLists = 6;
  static constexpr unsigned kReads = 0b111110, kWrites = 0b101001;
  static constexpr bool kMasked = false, kReduce = false;
  A neg_lr, beta1, one_minus_beta1, decay;  // decay = (1 − beta1)·weight_decay
  bool has_decay;
  AmpScalars amp;

  __device__ void load_scalars() { amp.load(); }
  __device__ void operator()(T (&x)[6], bool, int64_t, int64_t) const {
    if (amp.skip) {
      x[0] = x[1];
      x[5] = x[4];
      return;
    }
    A g = static_cast<A>(x[2]);
    if (amp.grad_scale != nullptr) g = g * static_cast<A>(amp.inv_scale);
    const A w = static_cast<A>(x[1]);
    A m = static_cast<A>(x[3]) * beta1 + one_minus_beta1 * g;
    if (has_decay) m = m + decay * w;
    x[3] = static_cast<T>(m);
    x[0] = static_cast<T>(w + neg_lr * (m / static_cast<A>(x[4])));
  }
};

void bsam_noise_cuda(at::TensorList params, at::TensorList backups, at::TensorList s, at::TensorList noise,
                     double num_data) {
  check_primary("bsam_noise_", "params", params);
  check_list("bsam_noise_", "backups", params, backups);
  check_list("bsam_noise_", "s", params, s);
  check_list("bsam_noise_", "noise", params, noise);
  sam_kernels::check_no_shared_writes("bsam_noise_", {{params, true}, {backups, true}, {s, false}, {noise, false}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_floats(params[0].scalar_type(), "bsam_noise_", [&](auto tag) {
    using T = decltype(tag);
    apply_elementwise<T>({params, backups, s, noise}, NoiseOp<T>{static_cast<acc_type<T>>(num_data)});
  });
}

void bsam_ascent_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList s,
                      at::TensorList s_next, double rho, double beta2, double damping, double weight_decay,
                      bool perturb, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  check_primary("bsam_ascent_", "params", params);
  check_list("bsam_ascent_", "backups", params, backups);
  check_list("bsam_ascent_", "grads", params, grads);
  check_list("bsam_ascent_", "s", params, s);
  check_list("bsam_ascent_", "s_next", params, s_next);
  sam_kernels::check_no_shared_writes(
      "bsam_ascent_", {{params, true}, {backups, false}, {grads, false}, {s, false}, {s_next, true}});
  const AmpScalars amp = amp_scalars("bsam_ascent_", grad_scale, found_inf, params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_floats(params[0].scalar_type(), "bsam_ascent_", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    apply_elementwise<T>({params, backups, grads, s, s_next},
                         AscentOp<T>{static_cast<A>(rho), static_cast<A>(beta2), static_cast<A>(1.0 - beta2),
                                     static_cast<A>(damping + weight_decay), perturb, amp});
  });
}

void bsam_descent_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList s, at::TensorList s_next, double lr, double beta1, double weight_decay,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_primary("bsam_descent_", "params", params);
  check_list("bsam_descent_", "backups", params, backups);
  check_list("bsam_descent_", "grads", params, grads);
  check_list("bsam_descent_", "exp_avgs", params, exp_avgs);
  check_list("bsam_descent_", "s", params, s);
  check_list("bsam_descent_", "s_next", params, s_next);
  sam_kernels::check_no_shared_writes("bsam_descent_", {{params, true}, {backups, false}, {grads, false},
                                                        {exp_avgs, true}, {s, false}, {s_next, true}});
  const AmpScalars amp = amp_scalars("bsam_descent_", grad_scale, found_inf, params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_floats(params[0].scalar_type(), "bsam_descent_", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    apply_elementwise<T>({params, backups, grads, exp_avgs, s, found_inf ? s_next : at::TensorList{}},
                         DescentOp<T>{static_cast<A>(-lr), static_cast<A>(beta1), static_cast<A>(1.0 - beta1),
                                      static_cast<A>((1.0 - beta1) * weight_decay), weight_decay != 0.0, amp});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("bsam_noise_", &bsam_noise_cuda);
  m.impl("bsam_ascent_", &bsam_ascent_cuda);
  m.impl("bsam_descent_", &bsam_descent_cuda);
}

}  // namespace sam_kernels::cuda
