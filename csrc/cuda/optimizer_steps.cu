// Restore + base optimizer update in one pass: read backup, grad and state once, write the weight
// and the state once (no separate restore pass). Maths as reference.py (torch.optim.SGD / AdamW):
// fp16/bf16 computed in fp32 and rounded once when stored; one launch per group (per table fill).
// Telemetry (`sums`, reference.add_descent_sums): the same pass also returns [g², ⟨a, g⟩] per
// element, reduced like reduce_sum and added into sums (add_sums); the ops without sums are
// separate instantiations with the lists and the work they had before.
// Finite check (sgd_restore_step_'s `nonfinite`): noted in the update's pass, undone on the device
// by a second launch that costs no memory pass when the flag is 0 (UndoFunctor).
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>

#include "amp.cuh"
#include "elementwise.cuh"

namespace sam_kernels::cuda {
namespace {

// The telemetry contributions of one element: [g², ⟨a, g⟩] over the grad as given (still scaled
// under AMP), in the compute type. An absent ascent_grads list is not loaded (a = 0; that sum is
// then not written).
template <typename T>
__device__ __forceinline__ Sums<acc_type<T>, 2> descent_sums(T grad, T ascent_grad) {
  using A = acc_type<T>;
  const A g = static_cast<A>(grad);
  return {{g * g, static_cast<A>(ascent_grad) * g}};
}

// One element of a fused descent op (its update(x)); with kSums also its telemetry contributions,
// taken before the update (so on a skipped step too) from lists 2 (grads) and the last (ascent_grads).
// The return type is spelled out, not auto (see reduction_t).
template <typename T, bool kSums, typename Op>
__device__ __forceinline__ std::conditional_t<kSums, Sums<acc_type<T>, 2>, void> descend(const Op& op, T* x) {
  if constexpr (kSums) {
    const auto sums = descent_sums(x[2], x[Op::kLists - 1]);
    op.update(x);
    return sums;
  } else {
    op.update(x);
  }
}

// lists: 0 params (w), 1 backups (r), 2 grads (r), 3 momentum_buffers (rw, only read with kOut; absent
// when momentum == 0), with kOut: 4 momentum_out (w: the new buffers), with kSums: last ascent_grads (r;
// absent: only Σ g²).
// kCheck: the finite check in the pass (when `nonfinite` is not null): a thread notes a NaN/Inf
// unscaled gradient and finish_block publishes it with one store per block; UndoFunctor, launched
// next, puts everything back. Compiled out of the ops without it (their registers stay as they were).
template <typename T, bool kSums, bool kOut, bool kCheck>
struct SgdOp {
  static_assert(kCheck || !kOut, "momentum_out comes with the check (nonfinite may still be null)");
  using A = acc_type<T>;
  static constexpr int kNew = kOut ? 4 : 3;  // the list the new buffers go to
  static constexpr int kLists = 4 + kOut + kSums;
  static constexpr unsigned kReads = 0b1110u | (kSums ? 1u << (kLists - 1) : 0u), kWrites = 1u | 1u << kNew;
  static constexpr bool kMasked = false, kReduce = kSums;
  A lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum, has_weight_decay, nesterov, maximize, init_buffers;
  AmpScalars amp;
  float* nonfinite = nullptr;  // null: no finite check
  mutable bool seen = false;   // this thread met a NaN/Inf (each thread works on its own copy of the op)

  __device__ void load_scalars() { amp.load(); }
  // Spelled out, not auto (see reduction_t).
  using Result = std::conditional_t<kSums, Sums<A, 2>, void>;

  __device__ Result operator()(T (&x)[kLists], bool, int64_t, int64_t) const { return descend<T, kSums>(*this, x); }

  __device__ __forceinline__ void update(T* x) const {
    const A w = static_cast<A>(x[1]);
    if (amp.skip) {  // not looked at: the flag stays as it was
      x[0] = x[1];
      if constexpr (kOut) x[4] = x[3];  // the caller keeps momentum_out as the state
      return;
    }
    A d = static_cast<A>(x[2]);
    if (amp.grad_scale != nullptr) d = d * static_cast<A>(amp.inv_scale);
    if constexpr (kCheck) {
      if (nonfinite != nullptr && !::isfinite(d)) seen = true;
    }
    if (maximize) d = -d;
    if (has_weight_decay) d = d + weight_decay * w;
    if (has_momentum) {
      // torch keeps the buffer in the param dtype and continues from the stored (rounded) value.
      x[kNew] = static_cast<T>(init_buffers ? d : static_cast<A>(x[3]) * momentum + one_minus_dampening * d);
      const A buf = static_cast<A>(x[kNew]);
      d = nesterov ? d + momentum * buf : buf;
    }
    x[0] = static_cast<T>(w + (-lr) * d);
  }

  // One store per block at most, and none on a finite step.
  __device__ void finish_block() const {
    if constexpr (kCheck) {
      if (nonfinite == nullptr) return;  // the same for every thread of the block
      __shared__ int any;
      if (threadIdx.x == 0) any = 0;
      __syncthreads();
      if (seen) any = 1;
      __syncthreads();
      if (threadIdx.x == 0 && any != 0) *nonfinite = 1.0f;
    }
  }
};

// The undo of sgd_restore_step_'s finite check: the launch after the update's, on the same stream,
// so the decision never visits the host. Every block reads the flags first and returns at once
// (no memory pass) when nonfinite is 0, or when found_inf skipped the step from the start (the
// update then wrote nothing to undo); else params <- backups and the new buffers <- the old ones,
// zeros where there are none (a first step), bitwise.
// lists: 0 params (w), 1 backups (r), 2 old buffers (r; absent: zero-fill), 3 new buffers (w; absent
// without momentum).
template <typename T>
struct UndoFunctor {
  static constexpr int kIlp = ilp_of<T>();
  static constexpr int kDepth = 4;
  const float* nonfinite;
  const float* found_inf;  // null: no AMP skip

  __device__ void operator()(const BlockTensors<kDepth>& t, const ChunkRef& c) const {
    if (*nonfinite == 0.0f || (found_inf != nullptr && *found_inf != 0.0f)) return;
    for_each_group<kIlp>(c, [&](int64_t i) {
      if (i >= c.end) return;
      store_group<T, kIlp>(t.ptrs[0], load_group<T, kIlp>(t.ptrs[1], i, c.end, c.aligned), i, c.end, c.aligned);
      if (t.ptrs[3] == nullptr) return;
      Vec<T, kIlp> old;
#pragma unroll
      for (int k = 0; k < kIlp; ++k) old.v[k] = static_cast<T>(0.0f);
      if (t.ptrs[2] != nullptr) old = load_group<T, kIlp>(t.ptrs[2], i, c.end, c.aligned);
      store_group<T, kIlp>(t.ptrs[3], old, i, c.end, c.aligned);
    });
  }
};

// lists: 0 params (w), 1 backups (r), 2 grads (r), 3 exp_avgs (rw), 4 exp_avg_sqs (rw),
// with kSums: 5 ascent_grads (r; absent: only Σ g²).
template <typename T, bool kSums>
struct AdamWOp {
  using A = acc_type<T>;
  static constexpr int kLists = kSums ? 6 : 5;
  static constexpr unsigned kReads = kSums ? 0b111110 : 0b11110, kWrites = 0b11001;
  static constexpr bool kMasked = false, kReduce = kSums;
  A decay;               // 1 - lr * weight_decay
  A one_minus_beta1;     // lerp weight
  A beta2, one_minus_beta2;
  A bias_correction2_sqrt;
  A neg_step_size;       // -lr / bias_correction1
  A eps;
  bool maximize;
  AmpScalars amp;

  __device__ void load_scalars() { amp.load(); }
  // As SgdOp::Result.
  using Result = std::conditional_t<kSums, Sums<A, 2>, void>;

  __device__ Result operator()(T (&x)[kLists], bool, int64_t, int64_t) const { return descend<T, kSums>(*this, x); }

  __device__ __forceinline__ void update(T* x) const {
    if (amp.skip) {
      x[0] = x[1];
      return;
    }
    A g = static_cast<A>(x[2]);
    if (amp.grad_scale != nullptr) g = g * static_cast<A>(amp.inv_scale);
    if (maximize) g = -g;
    const A m0 = static_cast<A>(x[3]);
    // torch.lerp's two-sided formula (exact at weight 0 and 1).
    const A m = ::fabs(one_minus_beta1) < A(0.5) ? m0 + one_minus_beta1 * (g - m0)
                                                 : g - (g - m0) * (A(1) - one_minus_beta1);
    const A v = static_cast<A>(x[4]) * beta2 + one_minus_beta2 * g * g;
    const A denom = ::sqrt(v) / bias_correction2_sqrt + eps;
    x[0] = static_cast<T>(static_cast<A>(x[1]) * decay + neg_step_size * (m / denom));
    x[3] = static_cast<T>(m);
    x[4] = static_cast<T>(v);
  }
};

// The ops with sums add into `sums`: Σ g² always, Σ ⟨a, g⟩ only with ascent_grads.
int sums_written(const std::optional<at::TensorList>& ascent_grads) { return ascent_grads ? 2 : 1; }

void sgd_restore_step_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                           double weight_decay, bool nesterov, bool maximize, bool init_buffers,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           std::optional<at::TensorList> ascent_grads, const std::optional<at::Tensor>& sums,
                           std::optional<at::TensorList> momentum_out, const std::optional<at::Tensor>& nonfinite) {
  const bool has_momentum = momentum != 0.0;
  sam_kernels::check_sgd_args(params, backups, grads, momentum_buffers, has_momentum, c10::DeviceType::CUDA);
  sam_kernels::check_sgd_out_args(params, momentum_out, nonfinite, has_momentum, init_buffers);
  const AmpScalars amp = amp_scalars("sgd_restore_step_", grad_scale, found_inf, params);
  sam_kernels::check_amp_scalar("sgd_restore_step_", "nonfinite", nonfinite, params);
  sam_kernels::check_telemetry_args("sgd_restore_step_", ascent_grads, sums, params);
  // With momentum_out the old buffers are only read (kept for the undo).
  sam_kernels::check_no_shared_writes("sgd_restore_step_",
                                      {{params, true}, {backups, false}, {grads, false},
                                       {has_momentum ? momentum_buffers : at::TensorList{}, !momentum_out},
                                       {momentum_out.value_or(at::TensorList{}), true},
                                       {ascent_grads.value_or(at::TensorList{}), false}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::TensorList bufs = has_momentum ? momentum_buffers : at::TensorList{};
  const at::TensorList outs = momentum_out.value_or(at::TensorList{});
  const at::TensorList asc = ascent_grads.value_or(at::TensorList{});
  dispatch_floats(params[0].scalar_type(), "sgd_restore_step_", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    auto run = [&](auto op) {
      using Op = decltype(op);
      op.lr = static_cast<A>(lr);
      op.momentum = static_cast<A>(momentum);
      op.one_minus_dampening = static_cast<A>(1.0 - dampening);  // alpha=1 - dampening, formed in double
      op.weight_decay = static_cast<A>(weight_decay);
      op.has_momentum = has_momentum;
      op.has_weight_decay = weight_decay != 0.0;
      op.nesterov = nesterov;
      op.maximize = maximize;
      op.init_buffers = init_buffers;
      op.amp = amp;
      op.nonfinite = nonfinite ? nonfinite->data_ptr<float>() : nullptr;
      if constexpr (Op::kReduce && Op::kNew == 4) {
        add_sums<T>({params, backups, grads, bufs, outs, asc}, op, *sums, sums_written(ascent_grads));
      } else if constexpr (Op::kReduce) {
        add_sums<T>({params, backups, grads, bufs, asc}, op, *sums, sums_written(ascent_grads));
      } else if constexpr (Op::kNew == 4) {
        apply_elementwise<T>({params, backups, grads, bufs, outs}, op);
      } else {
        apply_elementwise<T>({params, backups, grads, bufs}, op);
      }
    };
    // Its parameter must not be named `tag`: nvcc's front end reads T (= decltype(tag) above) in the
    // inner lambda's scope, where `tag` would be this one (g++ alone compiles either).
    auto with_sums = [&](auto sums_tag) {
      constexpr bool kSums = decltype(sums_tag)::value;
      if (momentum_out) {
        run(SgdOp<T, kSums, true, true>{});
      } else if (nonfinite) {
        run(SgdOp<T, kSums, false, true>{});
      } else {
        run(SgdOp<T, kSums, false, false>{});
      }
    };
    if (sums) {
      with_sums(std::true_type{});
    } else {
      with_sums(std::false_type{});
    }
    if (nonfinite) {
      // momentum_out exists exactly when there are old buffers to keep (check_sgd_out_args).
      const at::TensorList olds = has_momentum && !init_buffers ? momentum_buffers : at::TensorList{};
      const at::TensorList news = momentum_out ? outs : bufs;
      multi_tensor_apply(std::array<at::TensorList, 4>{params, backups, olds, news}, {},
                         UndoFunctor<T>{nonfinite->data_ptr<float>(), amp.found_inf});
    }
  });
}

void adamw_restore_step_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step, double lr,
                             double beta1, double beta2, double eps, double weight_decay, bool maximize,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             std::optional<at::TensorList> ascent_grads, const std::optional<at::Tensor>& sums) {
  const auto [bias_correction1, bias_correction2_sqrt] = sam_kernels::check_adamw_args(
      params, backups, grads, exp_avgs, exp_avg_sqs, step, beta1, beta2, c10::DeviceType::CUDA);
  const AmpScalars amp = amp_scalars("adamw_restore_step_", grad_scale, found_inf, params);
  sam_kernels::check_telemetry_args("adamw_restore_step_", ascent_grads, sums, params);
  sam_kernels::check_no_shared_writes("adamw_restore_step_",
                                      {{params, true}, {backups, false}, {grads, false}, {exp_avgs, true},
                                       {exp_avg_sqs, true}, {ascent_grads.value_or(at::TensorList{}), false}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_floats(params[0].scalar_type(), "adamw_restore_step_", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_type<T>;
    auto run = [&](auto op) {
      op.decay = static_cast<A>(1.0 - lr * weight_decay);
      op.one_minus_beta1 = static_cast<A>(1.0 - beta1);
      op.beta2 = static_cast<A>(beta2);
      op.one_minus_beta2 = static_cast<A>(1.0 - beta2);
      op.bias_correction2_sqrt = static_cast<A>(bias_correction2_sqrt);
      op.neg_step_size = static_cast<A>(-lr / bias_correction1);
      op.eps = static_cast<A>(eps);
      op.maximize = maximize;
      op.amp = amp;
      if constexpr (decltype(op)::kReduce) {
        add_sums<T>({params, backups, grads, exp_avgs, exp_avg_sqs, ascent_grads.value_or(at::TensorList{})}, op,
                    *sums, sums_written(ascent_grads));
      } else {
        apply_elementwise<T>({params, backups, grads, exp_avgs, exp_avg_sqs}, op);
      }
    };
    if (sums) {
      run(AdamWOp<T, true>{});
    } else {
      run(AdamWOp<T, false>{});
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("sgd_restore_step_", &sgd_restore_step_cuda);
  m.impl("adamw_restore_step_", &adamw_restore_step_cuda);
}

}  // namespace sam_kernels::cuda
