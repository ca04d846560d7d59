// Restore + base optimizer update in one pass: read backup, grad and state once, write the
// weight and the state once (no separate restore pass). Maths as torch.optim.SGD / AdamW
// (see reference.py); fp16/bf16 computed in fp32 and rounded once.
#include <torch/library.h>

#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

void sgd_restore_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                          at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                          double weight_decay, bool nesterov, bool maximize, bool init_buffers) {
  check_primary("sgd_restore_step_", "params", params);
  check_list("sgd_restore_step_", "backups", params, backups);
  check_list("sgd_restore_step_", "grads", params, grads);
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) check_list("sgd_restore_step_", "momentum_buffers", params, momentum_buffers);
  const auto chunks = make_chunks(params);
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "sgd_restore_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t lr_c = lr, mom = momentum, damp = 1.0 - dampening, wd = weight_decay;
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* w = data<scalar_t>(params[c.tensor]);
      const scalar_t* b = data<scalar_t>(backups[c.tensor]);
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      scalar_t* buf = has_momentum ? data<scalar_t>(momentum_buffers[c.tensor]) : nullptr;
      for (int64_t i = c.begin; i < c.end; ++i) {
        const acc_t wi = static_cast<acc_t>(b[i]);
        acc_t d = static_cast<acc_t>(g[i]);
        if (maximize) d = -d;
        if (weight_decay != 0.0) d += wd * wi;
        if (has_momentum) {
          const acc_t v = init_buffers ? d : mom * static_cast<acc_t>(buf[i]) + damp * d;
          buf[i] = static_cast<scalar_t>(v);
          const acc_t vs = static_cast<acc_t>(buf[i]);  // torch continues from the stored buffer
          d = nesterov ? d + mom * vs : vs;
        }
        w[i] = static_cast<scalar_t>(wi - lr_c * d);
      }
    });
  });
}

void adamw_restore_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step, double lr,
                            double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  check_primary("adamw_restore_step_", "params", params);
  check_list("adamw_restore_step_", "backups", params, backups);
  check_list("adamw_restore_step_", "grads", params, grads);
  check_list("adamw_restore_step_", "exp_avgs", params, exp_avgs);
  check_list("adamw_restore_step_", "exp_avg_sqs", params, exp_avg_sqs);
  TORCH_CHECK(step >= 1, "adamw_restore_step_: step must be >= 1, got ", step);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  const auto chunks = make_chunks(params);
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "adamw_restore_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t decay = 1.0 - lr * weight_decay, b1 = 1.0 - beta1, b2 = beta2, one_minus_b2 = 1.0 - beta2;
    const acc_t step_size = lr / bc1, bc2 = bc2_sqrt, eps_c = eps;
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* w = data<scalar_t>(params[c.tensor]);
      const scalar_t* b = data<scalar_t>(backups[c.tensor]);
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      scalar_t* m = data<scalar_t>(exp_avgs[c.tensor]);
      scalar_t* v = data<scalar_t>(exp_avg_sqs[c.tensor]);
      for (int64_t i = c.begin; i < c.end; ++i) {
        acc_t gi = static_cast<acc_t>(g[i]);
        if (maximize) gi = -gi;
        const acc_t mi = static_cast<acc_t>(m[i]);
        const acc_t mn = mi + b1 * (gi - mi);
        const acc_t vn = b2 * static_cast<acc_t>(v[i]) + one_minus_b2 * gi * gi;
        const acc_t denom = std::sqrt(vn) / bc2 + eps_c;
        w[i] = static_cast<scalar_t>(static_cast<acc_t>(b[i]) * decay - step_size * mn / denom);
        m[i] = static_cast<scalar_t>(mn);
        v[i] = static_cast<scalar_t>(vn);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("sgd_restore_step_", &sgd_restore_step_cpu);
  m.impl("adamw_restore_step_", &adamw_restore_step_cpu);
}

}  // namespace sam_kernels::cpu
