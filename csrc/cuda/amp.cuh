// AMP arguments of the fused CUDA descents (as torch's fused optimizers): the grads carry the loss
// scale, divided out in the kernel; a non-zero found_inf skips the update on the device.
#pragma once

#include <optional>

#include "dispatch.cuh"

namespace sam_kernels::cuda {

struct AmpScalars {
  const float* grad_scale = nullptr;  // null: grads are not scaled
  const float* found_inf = nullptr;   // null: never skip
  float inv_scale = 1.0f;             // set by load()
  bool skip = false;                  // set by load()

  __device__ void load() {
    inv_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;  // fp32 reciprocal, as reference.unscale_factor
    skip = found_inf != nullptr && *found_inf != 0.0f;
  }
};

inline AmpScalars amp_scalars(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, at::TensorList params) {
  sam_kernels::check_amp_scalar(op, "grad_scale", grad_scale, params);
  sam_kernels::check_amp_scalar(op, "found_inf", found_inf, params);
  AmpScalars amp;
  if (grad_scale) amp.grad_scale = grad_scale->data_ptr<float>();
  if (found_inf) amp.found_inf = found_inf->data_ptr<float>();
  return amp;
}

}  // namespace sam_kernels::cuda
