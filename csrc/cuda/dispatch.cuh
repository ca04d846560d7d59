// Dtype dispatch, compute types, argument checks and device scalars shared by the CUDA ops.
#pragma once

#include "../common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace sam_kernels::cuda {

// Compute type of a storage type: fp16/bf16/fp32 compute in float, fp64 in double
// (reference.py: maths in fp32, rounded once when stored).
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Calls f(T{}) with T the storage type of dtype: float, double, c10::Half or c10::BFloat16.
template <typename F>
void dispatch_floats(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype, "; supported: float32, float64, float16, bfloat16");
  }
}

// Group checks and the keep-mask hash are shared with the CPU kernels (csrc/common.h).
using sam_kernels::check_list;
using sam_kernels::keep_element;

inline void check_primary(const char* op, const char* name, at::TensorList primary) {
  sam_kernels::check_primary(op, name, primary, c10::DeviceType::CUDA);
}

// A 0-dim fp32/fp64 tensor read inside the kernels (norms, dots): data-dependent scalars never
// visit the host. Read in the compute type like reference.py's `x.to(cdt)`.
struct DeviceScalar {
  const void* ptr;
  bool is_double;

  template <typename A>
  __device__ __forceinline__ A get() const {
    return is_double ? static_cast<A>(*static_cast<const double*>(ptr)) : static_cast<A>(*static_cast<const float*>(ptr));
  }
  // Finiteness of the value as stored (not after rounding to the compute type), like torch.isfinite(t).
  __device__ __forceinline__ bool is_finite() const {
    return is_double ? ::isfinite(*static_cast<const double*>(ptr)) : ::isfinite(*static_cast<const float*>(ptr));
  }
};

inline DeviceScalar device_scalar(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the tensors are on ",
              like.device(), " (reading it elsewhere would synchronize)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  return DeviceScalar{t.data_ptr(), t.scalar_type() == at::kDouble};
}

}  // namespace sam_kernels::cuda
