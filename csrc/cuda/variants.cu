// Element-wise ops of the variants: Stable SAM renormalization, Fisher accumulation, LookSAM
// store/apply, GSAM/WSAM's mix. Their global norms/dots arrive as 0-dim device tensors (grad_sq_norm / dot) and are
// read inside the kernel: one launch per group (per table fill), no host synchronization.
#include <torch/library.h>

#include "elementwise.cuh"

namespace sam_kernels::cuda {
namespace {

// lists: 0 grads (rw). g ← g·sqrt(ref)/(sqrt(sq)+eps).
template <typename T>
struct RenormalizeOp {
  using A = acc_type<T>;
  static constexpr int kLists = 1;
  static constexpr unsigned kReads = 0b1, kWrites = 0b1;
  static constexpr bool kMasked = false, kReduce = false;
  DeviceScalar ref_sq_norm, sq_norm;
  A eps;
  A ratio;  // set by load_scalars

  __device__ void load_scalars() { ratio = ::sqrt(ref_sq_norm.get<A>()) / (::sqrt(sq_norm.get<A>()) + eps); }
  __device__ void operator()(T (&x)[1], bool, int64_t, int64_t) const { x[0] = static_cast<T>(static_cast<A>(x[0]) * ratio); }
};

// lists: 0 fisher (rw), 1 grads (r). f ← f + scale·g·g.
template <typename T>
struct FisherOp {
  using A = acc_type<T>;
  static constexpr int kLists = 2;
  static constexpr unsigned kReads = 0b11, kWrites = 0b01;
  static constexpr bool kMasked = false, kReduce = false;
  A scale;

  __device__ void load_scalars() {}
  __device__ void operator()(T (&x)[2], bool, int64_t, int64_t) const {
    const A g = static_cast<A>(x[1]);
    x[0] = static_cast<T>(static_cast<A>(x[0]) + scale * g * g);
  }
};

// lists: 0 g_v (w), 1 grads (r), 2 sam_grads (r). g_v ← g_s − (dot/(sq+eps))·g.
template <typename T>
struct LookSamStoreOp {
  using A = acc_type<T>;
  static constexpr int kLists = 3;
  static constexpr unsigned kReads = 0b110, kWrites = 0b001;
  static constexpr bool kMasked = false, kReduce = false;
  DeviceScalar gs_dot_g, g_sq_norm;
  A eps;
  A coef;  // set by load_scalars

  __device__ void load_scalars() { coef = gs_dot_g.get<A>() / (g_sq_norm.get<A>() + eps); }
  __device__ void operator()(T (&x)[3], bool, int64_t, int64_t) const {
    x[0] = static_cast<T>(static_cast<A>(x[2]) - static_cast<A>(x[1]) * coef);
  }
};

// lists: 0 grads (rw), 1 g_v (r). g ← g + alpha·sqrt(g_sq)/(sqrt(gv_sq)+eps)·g_v.
template <typename T>
struct LookSamApplyOp {
  using A = acc_type<T>;
  static constexpr int kLists = 2;
  static constexpr unsigned kReads = 0b11, kWrites = 0b01;
  static constexpr bool kMasked = false, kReduce = false;
  DeviceScalar g_sq_norm, gv_sq_norm;
  A alpha, eps;
  A coef;  // set by load_scalars

  __device__ void load_scalars() { coef = alpha * ::sqrt(g_sq_norm.get<A>()) / (::sqrt(gv_sq_norm.get<A>()) + eps); }
  __device__ void operator()(T (&x)[2], bool, int64_t, int64_t) const {
    x[0] = static_cast<T>(static_cast<A>(x[0]) + static_cast<A>(x[1]) * coef);
  }
};

// lists: 0 grads (rw), 1 others (r). g ← a·g + b·o (GSAM, WSAM).
template <typename T>
struct MixOp {
  using A = acc_type<T>;
  static constexpr int kLists = 2;
  static constexpr unsigned kReads = 0b11, kWrites = 0b01;
  static constexpr bool kMasked = false, kReduce = false;
  DeviceScalar a, b;
  A ca, cb;  // set by load_scalars

  __device__ void load_scalars() {
    ca = a.get<A>();
    cb = b.get<A>();
  }
  __device__ void operator()(T (&x)[2], bool, int64_t, int64_t) const {
    x[0] = static_cast<T>(ca * static_cast<A>(x[0]) + cb * static_cast<A>(x[1]));
  }
};

// Friendly-SAM / VaSSO. lists: 0 emas (rw), 1 grads (r), with kDirections: 2 directions (w).
// d ← g − (sigma·S)·m; m ← m + weight·(g·(1/S) − m) unless found_inf (S = grad_scale, 1 when null).
template <typename T, bool kDirections>
struct EmaOp {
  using A = acc_type<T>;
  static constexpr int kLists = kDirections ? 3 : 2;
  static constexpr unsigned kReads = 0b011, kWrites = kDirections ? 0b101 : 0b001;
  static constexpr bool kMasked = false, kReduce = false;
  A weight, sigma;
  const float* grad_scale;  // null: grads are not scaled
  const float* found_inf;   // null: never skip
  A c, inv;                 // set by load_scalars
  bool skip;                // set by load_scalars

  __device__ void load_scalars() {
    const float s = grad_scale != nullptr ? *grad_scale : 1.0f;
    inv = static_cast<A>(1.0f / s);  // fp32 reciprocal, as reference.unscale_factor
    c = static_cast<A>(s) * sigma;
    skip = found_inf != nullptr && *found_inf != 0.0f;
  }
  __device__ void operator()(T (&x)[kLists], bool, int64_t, int64_t) const {
    const A g = static_cast<A>(x[1]);
    const A m = static_cast<A>(x[0]);
    if constexpr (kDirections) x[2] = static_cast<T>(g - m * c);
    if (!skip) x[0] = static_cast<T>(m + ((grad_scale != nullptr ? g * inv : g) - m) * weight);
  }
};

void renormalize_cuda(at::TensorList grads, const at::Tensor& ref_sq_norm, const at::Tensor& sq_norm, double eps) {
  check_primary("renormalize_", "grads", grads);
  sam_kernels::check_no_shared_writes("renormalize_", {{grads, true}});
  const DeviceScalar ref = device_scalar(ref_sq_norm, grads[0], "renormalize_", "ref_sq_norm");
  const DeviceScalar sq = device_scalar(sq_norm, grads[0], "renormalize_", "sq_norm");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  dispatch_floats(grads[0].scalar_type(), "renormalize_", [&](auto tag) {
    using T = decltype(tag);
    apply_elementwise<T>({grads}, RenormalizeOp<T>{ref, sq, static_cast<acc_type<T>>(eps), {}});
  });
}

void ema_update_cuda(at::TensorList emas, at::TensorList grads, std::optional<at::TensorList> directions,
                     double weight, double sigma, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  check_primary("ema_update_", "emas", emas);
  check_list("ema_update_", "grads", emas, grads);
  if (directions) check_list("ema_update_", "directions", emas, *directions);
  sam_kernels::check_no_shared_writes("ema_update_", {{emas, true}, {grads, false},
                                                      {directions ? *directions : at::TensorList(), true}});
  sam_kernels::check_amp_scalar("ema_update_", "grad_scale", grad_scale, emas);
  sam_kernels::check_amp_scalar("ema_update_", "found_inf", found_inf, emas);
  const float* scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  const float* found = found_inf ? found_inf->data_ptr<float>() : nullptr;
  const c10::cuda::CUDAGuard guard(emas[0].device());
  dispatch_floats(emas[0].scalar_type(), "ema_update_", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    const A w = static_cast<A>(weight), s = static_cast<A>(sigma);
    if (directions) {
      apply_elementwise<T>({emas, grads, *directions}, EmaOp<T, true>{w, s, scale, found, {}, {}, false});
    } else {
      apply_elementwise<T>({emas, grads}, EmaOp<T, false>{w, s, scale, found, {}, {}, false});
    }
  });
}

void fisher_accumulate_cuda(at::TensorList fisher, at::TensorList grads, double scale) {
  check_primary("fisher_accumulate_", "fisher", fisher);
  check_list("fisher_accumulate_", "grads", fisher, grads);
  sam_kernels::check_no_shared_writes("fisher_accumulate_", {{fisher, true}, {grads, false}});
  const c10::cuda::CUDAGuard guard(fisher[0].device());
  dispatch_floats(fisher[0].scalar_type(), "fisher_accumulate_", [&](auto tag) {
    using T = decltype(tag);
    apply_elementwise<T>({fisher, grads}, FisherOp<T>{static_cast<acc_type<T>>(scale)});
  });
}

void looksam_store_cuda(at::TensorList g_v, at::TensorList grads, at::TensorList sam_grads, const at::Tensor& gs_dot_g,
                        const at::Tensor& g_sq_norm, double eps) {
  check_primary("looksam_store_", "g_v", g_v);
  check_list("looksam_store_", "grads", g_v, grads);
  check_list("looksam_store_", "sam_grads", g_v, sam_grads);
  sam_kernels::check_no_shared_writes("looksam_store_", {{g_v, true}, {grads, false}, {sam_grads, false}});
  const DeviceScalar dot = device_scalar(gs_dot_g, g_v[0], "looksam_store_", "gs_dot_g");
  const DeviceScalar sq = device_scalar(g_sq_norm, g_v[0], "looksam_store_", "g_sq_norm");
  const c10::cuda::CUDAGuard guard(g_v[0].device());
  dispatch_floats(g_v[0].scalar_type(), "looksam_store_", [&](auto tag) {
    using T = decltype(tag);
    apply_elementwise<T>({g_v, grads, sam_grads}, LookSamStoreOp<T>{dot, sq, static_cast<acc_type<T>>(eps), {}});
  });
}

void looksam_apply_cuda(at::TensorList grads, at::TensorList g_v, double alpha, const at::Tensor& g_sq_norm,
                        const at::Tensor& gv_sq_norm, double eps) {
  check_primary("looksam_apply_", "grads", grads);
  check_list("looksam_apply_", "g_v", grads, g_v);
  sam_kernels::check_no_shared_writes("looksam_apply_", {{grads, true}, {g_v, false}});
  const DeviceScalar g_sq = device_scalar(g_sq_norm, grads[0], "looksam_apply_", "g_sq_norm");
  const DeviceScalar gv_sq = device_scalar(gv_sq_norm, grads[0], "looksam_apply_", "gv_sq_norm");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  dispatch_floats(grads[0].scalar_type(), "looksam_apply_", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    apply_elementwise<T>({grads, g_v},
                         LookSamApplyOp<T>{g_sq, gv_sq, static_cast<A>(alpha), static_cast<A>(eps), {}});
  });
}

void mix_cuda(at::TensorList grads, at::TensorList others, const at::Tensor& a, const at::Tensor& b) {
  check_primary("mix_", "grads", grads);
  check_list("mix_", "others", grads, others);
  sam_kernels::check_no_shared_writes("mix_", {{grads, true}, {others, false}});
  const DeviceScalar da = device_scalar(a, grads[0], "mix_", "a");
  const DeviceScalar db = device_scalar(b, grads[0], "mix_", "b");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  dispatch_floats(grads[0].scalar_type(), "mix_", [&](auto tag) {
    using T = decltype(tag);
    apply_elementwise<T>({grads, others}, MixOp<T>{da, db, {}, {}});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("renormalize_", &renormalize_cuda);
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("fisher_accumulate_", &fisher_accumulate_cuda);
  m.impl("looksam_store_", &looksam_store_cuda);
  m.impl("looksam_apply_", &looksam_apply_cuda);
  m.impl("mix_", &mix_cuda);
}

}  // namespace sam_kernels::cuda
