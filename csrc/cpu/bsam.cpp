// bSAM's three per-element passes (Moellenhoff and Khan, ICLR 2023; the official code's update, see
// sam_kernels/ops/reference.py): the noise sample, the ascent with the variance update, and the
// restore with the descent. One pass each over the group's lists; fp16/bf16 computed in fp32 and
// rounded once on store.
#include "multi_tensor.h"

#include <torch/library.h>

namespace sam_kernels::cpu {
namespace {

// AMP: a CPU found_inf / grad_scale is read here on the host (no device to synchronize with).
bool skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf && *found_inf->data_ptr<float>() != 0.0f;
}

// 1/grad_scale rounded to fp32, as reference.unscale_factor (exact for GradScaler's powers of 2).
float unscale_factor(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale ? 1.0f / *grad_scale->data_ptr<float>() : 1.0f;
}

void bsam_noise_cpu(at::TensorList params, at::TensorList backups, at::TensorList s, at::TensorList noise,
                    double num_data) {
  check_primary("bsam_noise_", "params", params);
  check_list("bsam_noise_", "backups", params, backups);
  check_list("bsam_noise_", "s", params, s);
  check_list("bsam_noise_", "noise", params, noise);
  sam_kernels::check_no_shared_writes("bsam_noise_", {{params, true}, {backups, true}, {s, false}, {noise, false}});
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "bsam_noise_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t n = num_data;
    const auto chunks = make_chunks(params);
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* w = data<scalar_t>(params[c.tensor]);
      scalar_t* b = data<scalar_t>(backups[c.tensor]);
      const scalar_t* sv = data<scalar_t>(s[c.tensor]);
      const scalar_t* z = data<scalar_t>(noise[c.tensor]);
      elementwise<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        const T wi = load<T>(w, i);
        store(b, i, wi);
        store(w, i, wi + load<T>(z, i) * (T(1) / vsqrt(load<T>(sv, i) * T(n))));
      });
    });
  });
}

void bsam_ascent_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList s,
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
  sam_kernels::check_amp_scalar("bsam_ascent_", "grad_scale", grad_scale, params);
  sam_kernels::check_amp_scalar("bsam_ascent_", "found_inf", found_inf, params);
  // An overflowed pass leaves w at the backup (no NaN reaches a forward); s_next is then unused.
  const bool move = perturb && !skipped(found_inf);
  const float inv_scale = unscale_factor(grad_scale);
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "bsam_ascent_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t rho_c = rho, b2 = beta2, one_minus_b2 = 1.0 - beta2, shift = damping + weight_decay;
    const auto chunks = make_chunks(params);
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* w = data<scalar_t>(params[c.tensor]);
      const scalar_t* b = data<scalar_t>(backups[c.tensor]);
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      const scalar_t* sv = data<scalar_t>(s[c.tensor]);
      scalar_t* sn = data<scalar_t>(s_next[c.tensor]);
      elementwise<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        T gi = load<T>(g, i);
        if (grad_scale) gi = gi * T(inv_scale);
        const T si = load<T>(sv, i);
        const T bi = load<T>(b, i);
        store(w, i, move ? bi + (gi / si) * T(rho_c) : bi);
        store(sn, i, T(b2) * si + T(one_minus_b2) * (vsqrt(si) * vabs(gi) + T(shift)));
      });
    });
  });
}

void bsam_descent_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList exp_avgs,
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
  sam_kernels::check_amp_scalar("bsam_descent_", "grad_scale", grad_scale, params);
  sam_kernels::check_amp_scalar("bsam_descent_", "found_inf", found_inf, params);
  const auto chunks = make_chunks(params);
  if (skipped(found_inf)) {  // w at the backup, m kept, s_next <- s so that the caller's swap keeps s
    copy_chunks(chunks, params, backups);
    copy_chunks(chunks, s_next, s);
    return;
  }
  const float inv_scale = unscale_factor(grad_scale);
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "bsam_descent_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t b1 = beta1, one_minus_b1 = 1.0 - beta1, decay = (1.0 - beta1) * weight_decay, lr_c = lr;
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* w = data<scalar_t>(params[c.tensor]);
      const scalar_t* b = data<scalar_t>(backups[c.tensor]);
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      scalar_t* m = data<scalar_t>(exp_avgs[c.tensor]);
      const scalar_t* sv = data<scalar_t>(s[c.tensor]);
      elementwise<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        T gi = load<T>(g, i);
        if (grad_scale) gi = gi * T(inv_scale);
        const T wi = load<T>(b, i);
        T mn = T(b1) * load<T>(m, i) + T(one_minus_b1) * gi;
        if (weight_decay != 0.0) mn = mn + T(decay) * wi;
        store(m, i, mn);
        store(w, i, wi - T(lr_c) * (mn / load<T>(sv, i)));
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("bsam_noise_", &bsam_noise_cpu);
  m.impl("bsam_ascent_", &bsam_ascent_cpu);
  m.impl("bsam_descent_", &bsam_descent_cpu);
}

}  // namespace sam_kernels::cpu
