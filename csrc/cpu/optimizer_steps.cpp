// Restore + base optimizer update in one pass: read backup, grad and state once, write the
// weight and the state once (no separate restore pass). Maths as torch.optim.SGD / AdamW
// (see reference.py); fp16/bf16 computed in fp32 and rounded once.
#include "multi_tensor.h"

#include <torch/library.h>

#include <atomic>
#include <cstring>

namespace sam_kernels::cpu {
namespace {

// AMP: a CPU found_inf is read here on the host (no device to synchronize with).
bool skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf && *found_inf->data_ptr<float>() != 0.0f;
}

// Telemetry: the sums of the grads as given (scaled), g read once more only on a skipped AMP step.
template <typename scalar_t, typename T>
void add_sums(LaneSum<scalar_t>* acc, const scalar_t* g, const scalar_t* a, int64_t i) {
  const T gi = load<T>(g, i);
  acc[0].add_product(gi, gi);
  if (a) acc[1].add_product(load<T>(a, i), gi);
}

// A skipped AMP step: params <- backups (state untouched), and the telemetry sums still taken.
void skip_step(const std::vector<Chunk>& chunks, at::TensorList params, at::TensorList backups, at::TensorList grads,
               const std::optional<at::TensorList>& ascent_grads, const std::optional<at::Tensor>& sums) {
  copy_chunks(chunks, params, backups);
  if (!sums) return;
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "descent sums", [&] {
    for_each_chunk_summing<scalar_t>(chunks, sums, ascent_grads.has_value(),
                                     [&](const Chunk& c, int64_t lo, int64_t hi, LaneSum<scalar_t>* acc) {
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      const scalar_t* a = ascent_grads ? data<scalar_t>((*ascent_grads)[c.tensor]) : nullptr;
      elementwise<scalar_t>(lo, hi, /*vectorize=*/true, [&](auto tag, int64_t i) {
        add_sums<scalar_t, decltype(tag)>(acc, g, a, i);
      });
    });
  });
}

// Whether g[lo, hi)·inv_scale, in the compute type as the update computes it, holds a NaN or an
// Inf: the exact answer for a block whose sum of squares was not finite (which an overflow of the
// sum, with every element finite, also gives).
template <typename scalar_t>
bool has_nonfinite(const scalar_t* g, int64_t lo, int64_t hi, float inv_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = lo; i < hi; ++i) {
    if (!std::isfinite(static_cast<acc_t>(g[i]) * static_cast<acc_t>(inv_scale))) return true;
  }
  return false;
}

// 1/grad_scale rounded to fp32, as reference.unscale_factor (exact for GradScaler's powers of 2).
float unscale_factor(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale ? 1.0f / *grad_scale->data_ptr<float>() : 1.0f;
}

void sgd_restore_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                          at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                          double weight_decay, bool nesterov, bool maximize, bool init_buffers,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          std::optional<at::TensorList> ascent_grads, const std::optional<at::Tensor>& sums,
                          std::optional<at::TensorList> momentum_out, const std::optional<at::Tensor>& nonfinite) {
  const bool has_momentum = momentum != 0.0;
  sam_kernels::check_sgd_args(params, backups, grads, momentum_buffers, has_momentum, c10::DeviceType::CPU);
  sam_kernels::check_sgd_out_args(params, momentum_out, nonfinite, has_momentum, init_buffers);
  sam_kernels::check_amp_scalar("sgd_restore_step_", "grad_scale", grad_scale, params);
  sam_kernels::check_amp_scalar("sgd_restore_step_", "found_inf", found_inf, params);
  sam_kernels::check_amp_scalar("sgd_restore_step_", "nonfinite", nonfinite, params);
  sam_kernels::check_telemetry_args("sgd_restore_step_", ascent_grads, sums, params);
  // With momentum_out the old buffers are only read (kept for a restore).
  sam_kernels::check_no_shared_writes("sgd_restore_step_",
                                      {{params, true}, {backups, false}, {grads, false},
                                       {has_momentum ? momentum_buffers : at::TensorList{}, !momentum_out},
                                       {momentum_out.value_or(at::TensorList{}), true},
                                       {ascent_grads.value_or(at::TensorList{}), false}});
  const auto chunks = make_chunks(params);
  // The new buffers: momentum_out, else the buffers in place.
  const at::TensorList new_bufs = momentum_out ? *momentum_out : momentum_buffers;
  // Undo a step whose gradients were not finite (or that AMP skips): params <- backups, new buffers
  // <- old ones (0 for a first step's), bitwise.
  auto undo = [&] {
    copy_chunks(chunks, params, backups);
    if (!has_momentum) return;
    if (init_buffers) {
      const int64_t item = params[0].element_size();
      for_each_chunk(chunks, [&](const Chunk& c) {
        std::memset(static_cast<char*>(new_bufs[c.tensor].data_ptr()) + c.begin * item, 0, (c.end - c.begin) * item);
      });
    } else if (momentum_out) {
      copy_chunks(chunks, *momentum_out, momentum_buffers);
    }
  };
  if (skipped(found_inf)) {
    skip_step(chunks, params, backups, grads, ascent_grads, sums);
    if (momentum_out) undo();  // the caller keeps momentum_out as the state: it must equal the old buffers
    return;
  }
  const float inv_scale = unscale_factor(grad_scale);
  std::atomic<bool> found_nonfinite{false};
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "sgd_restore_step_", [&] {
    // w is written, not read (the loop reads the backup); so is momentum_out (the loop reads the old),
    // except an entry that is the grads (SAM's hand-over): those lines were just read, a store finds
    // them in cache (decided per chunk, below).
    const bool streaming = stream_writes(params);
    with_static_flags([&](auto has_sums, auto check, auto scaled, auto stream, auto stream_out) {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t lr_c = lr, mom = momentum, damp = 1.0 - dampening, wd = weight_decay;
      for_each_chunk_summing<scalar_t>(chunks, sums, ascent_grads.has_value(),
                                       [&](const Chunk& c, int64_t lo, int64_t hi, LaneSum<scalar_t>* acc) {
        scalar_t* w = data<scalar_t>(params[c.tensor]);
        const scalar_t* b = data<scalar_t>(backups[c.tensor]);
        const scalar_t* g = data<scalar_t>(grads[c.tensor]);
        const scalar_t* a = ascent_grads ? data<scalar_t>((*ascent_grads)[c.tensor]) : nullptr;
        const scalar_t* old = has_momentum ? data<scalar_t>(momentum_buffers[c.tensor]) : nullptr;
        scalar_t* buf = has_momentum ? data<scalar_t>(new_bufs[c.tensor]) : nullptr;
        // The sums of this block in locals (kept in registers: stores to w or buf cannot reach them),
        // added to acc at its end: acc is zero here, so the bits are those of adding into acc.
        // The finite check reads the block's Σ g² (the telemetry's, or its own; Σ (g/scale)² under a
        // loss scale), not each element: its elements are looked at only when that sum is not
        // finite. With a compare per vector the check and the sums together cost 20 % of the
        // descent on one thread; this way the check's test costs what one sum costs (2-4 %).
        // The check's block is summed before the update writes it: momentum_out may be the grads
        // themselves (SAM's second_step(zero_grad=True) hands them over), and a rescan must read g.
        LaneSum<scalar_t> local[2];
        if constexpr (check) {
          LaneSum<scalar_t> unscaled;  // Σ d², d = g/grad_scale: the check's own sum under a loss scale
          elementwise<scalar_t>(lo, hi, /*vectorize=*/true, [&](auto tag, int64_t i) {
            using T = decltype(tag);
            if constexpr (scaled) {
              const T d = load<T>(g, i) * T(inv_scale);
              unscaled.add_product(d, d);
            }
            if constexpr (has_sums || !scaled) add_sums<scalar_t, T>(local, g, a, i);
          });
          const bool sum_finite = scaled ? unscaled.finite() : local[0].finite();
          if (C10_UNLIKELY(!sum_finite) && has_nonfinite(g, lo, hi, inv_scale)) {
            found_nonfinite.store(true, std::memory_order_relaxed);
          }
        }
        auto update = [&](auto stream_buf) {
          elementwise<scalar_t>(lo, hi, /*vectorize=*/true, [&](auto tag, int64_t i) {
            using T = decltype(tag);
            // The old buffer first: the stream this pass writes (the grads themselves, when handed
            // over) is then not the first one each iteration touches. On GPT-2's list, one thread, the
            // descent over the grads took 0.98-1.15 of the in-place one's time this way, 1.01-1.35
            // with g first (four alternations each, under load from other tenants).
            const T oi = has_momentum && !init_buffers ? load<T>(old, i) : T(0);
            if constexpr (has_sums && !check) add_sums<scalar_t, T>(local, g, a, i);
            const T wi = load<T>(b, i);
            T d = load<T>(g, i);
            if constexpr (scaled) d = d * T(inv_scale);
            if (maximize) d = -d;
            if (weight_decay != 0.0) d = fma_(T(wd), wi, d);
            if (has_momentum) {
              const T v = init_buffers ? d : fma_(T(mom), oi, T(damp) * d);
              T vs = v;
              if constexpr (std::is_same_v<scalar_t, acc_t>) {  // stored as computed
                if constexpr (decltype(stream_buf)::value) {
                  store_stream(buf, i, v);
                } else {
                  store(buf, i, v);
                }
              } else {
                store(buf, i, v);
                vs = load<T>(buf, i);  // torch continues from the stored (rounded) buffer
              }
              d = nesterov ? fma_(T(mom), vs, d) : vs;
            }
            if constexpr (stream) {
              store_stream(w, i, fma_(T(-lr_c), d, wi));
            } else {
              store(w, i, fma_(T(-lr_c), d, wi));
            }
          });
        };
        if constexpr (stream_out) {
          if (buf != g) {
            update(std::true_type{});
          } else {
            update(std::false_type{});
          }
        } else {
          update(std::false_type{});
        }
        // Once per chunk (a block of a summing loop is a part of one): a fence waits for every streamed line.
        if (stream && hi == c.end) stream_fence();
        if constexpr (has_sums) {
          for (int k = 0; k < 2; ++k) {
            acc[k].lanes = acc[k].lanes + local[k].lanes;
            acc[k].rest += local[k].rest;
          }
        }
      }, /*blocks=*/check);
    }, sums.has_value(), nonfinite.has_value(), grad_scale.has_value(), streaming,
       streaming && momentum_out.has_value());
  });
  if (!nonfinite) return;
  float* flag = nonfinite->data_ptr<float>();  // host memory: the decision costs no synchronization
  if (found_nonfinite.load()) *flag = 1.0f;
  if (*flag != 0.0f) undo();
}

void adamw_restore_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step, double lr,
                            double beta1, double beta2, double eps, double weight_decay, bool maximize,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            std::optional<at::TensorList> ascent_grads, const std::optional<at::Tensor>& sums) {
  const auto [bc1, bc2_sqrt] = sam_kernels::check_adamw_args(params, backups, grads, exp_avgs, exp_avg_sqs, step,
                                                              beta1, beta2, c10::DeviceType::CPU);
  sam_kernels::check_amp_scalar("adamw_restore_step_", "grad_scale", grad_scale, params);
  sam_kernels::check_amp_scalar("adamw_restore_step_", "found_inf", found_inf, params);
  sam_kernels::check_telemetry_args("adamw_restore_step_", ascent_grads, sums, params);
  sam_kernels::check_no_shared_writes("adamw_restore_step_",
                                      {{params, true}, {backups, false}, {grads, false}, {exp_avgs, true},
                                       {exp_avg_sqs, true}, {ascent_grads.value_or(at::TensorList{}), false}});
  const auto chunks = make_chunks(params);
  if (skipped(found_inf)) return skip_step(chunks, params, backups, grads, ascent_grads, sums);  // state untouched
  const float inv_scale = unscale_factor(grad_scale);
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "adamw_restore_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t decay = 1.0 - lr * weight_decay, b1 = 1.0 - beta1, b2 = beta2, one_minus_b2 = 1.0 - beta2;
    const acc_t step_size = lr / bc1, bc2 = bc2_sqrt, eps_c = eps;
    const bool stream = stream_writes(params);  // w is written, not read (the loop reads the backup)
    for_each_chunk_summing<scalar_t>(chunks, sums, ascent_grads.has_value(),
                                     [&](const Chunk& c, int64_t lo, int64_t hi, LaneSum<scalar_t>* acc) {
      scalar_t* w = data<scalar_t>(params[c.tensor]);
      const scalar_t* b = data<scalar_t>(backups[c.tensor]);
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      const scalar_t* a = ascent_grads ? data<scalar_t>((*ascent_grads)[c.tensor]) : nullptr;
      scalar_t* m = data<scalar_t>(exp_avgs[c.tensor]);
      scalar_t* v = data<scalar_t>(exp_avg_sqs[c.tensor]);
      elementwise<scalar_t>(lo, hi, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        if (acc) add_sums<scalar_t, T>(acc, g, a, i);
        T gi = load<T>(g, i);
        if (grad_scale) gi = gi * T(inv_scale);
        if (maximize) gi = -gi;
        const T mi = load<T>(m, i);
        const T mn = mi + T(b1) * (gi - mi);
        const T vn = T(b2) * load<T>(v, i) + T(one_minus_b2) * gi * gi;
        const T denom = vsqrt(vn) / T(bc2) + T(eps_c);
        const T wn = load<T>(b, i) * T(decay) - T(step_size) * mn / denom;
        if (stream) {
          store_stream(w, i, wn);
        } else {
          store(w, i, wn);
        }
        store(m, i, mn);
        store(v, i, vn);
      });
      // Once per chunk (a block of a summing loop is a part of one): a fence waits for every streamed line.
      if (stream && hi == c.end) stream_fence();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("sgd_restore_step_", &sgd_restore_step_cpu);
  m.impl("adamw_restore_step_", &adamw_restore_step_cpu);
}

}  // namespace sam_kernels::cpu
