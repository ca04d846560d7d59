// Dtype dispatch, compute types, argument checks and device scalars shared by the CUDA ops.
#pragma once

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

// Validates one list of a group against the primary list: same length, CUDA device of the
// primary, dense, contiguous, same numel, the primary's dtype (torch.bool for masks).
inline void check_list(const char* op, const char* name, at::TensorList primary, at::TensorList lst,
                       bool is_mask = false) {
  TORCH_CHECK(lst.size() == primary.size(), op, ": ", name, " has ", lst.size(), " tensors, expected ",
              primary.size());
  const auto device = primary[0].device();
  const auto dtype = primary[0].scalar_type();
  for (size_t i = 0; i < lst.size(); ++i) {
    const auto& t = lst[i];
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous (the Python layer routes "
                "non-contiguous tensors to the eager backend)");
    TORCH_CHECK(t.numel() == primary[i].numel(), op, ": ", name, "[", i, "] has ", t.numel(), " elements, expected ",
                primary[i].numel());
    if (is_mask) {
      TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, "[", i, "] must be torch.bool, got ", t.scalar_type());
    } else {
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
                  dtype, " (one dtype per group)");
    }
  }
}

inline void check_primary(const char* op, const char* name, at::TensorList primary) {
  TORCH_CHECK(!primary.empty(), op, ": empty tensor list");
  TORCH_CHECK(primary[0].is_cuda(), op, ": ", name, "[0] is on ", primary[0].device(), "; the cuda backend needs CUDA tensors");
  TORCH_CHECK(is_supported_float(primary[0].scalar_type()), op, ": unsupported dtype ", primary[0].scalar_type(),
              "; supported: float32, float64, float16, bfloat16");
  check_list(op, name, primary, primary);
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
};

inline DeviceScalar device_scalar(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the tensors are on ",
              like.device(), " (reading it elsewhere would synchronize)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  return DeviceScalar{t.data_ptr(), t.scalar_type() == at::kDouble};
}

// murmur3 finalizer: reference.keep_mask's counter-based hash, the same bits on every backend.
__device__ __forceinline__ uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Element i of a tensor with RNG key `key` is kept iff its 24-bit uniform is below threshold.
__device__ __forceinline__ bool keep_element(uint32_t key, int64_t i, uint32_t threshold) {
  const uint64_t u = static_cast<uint64_t>(i);
  const uint32_t r = fmix32(fmix32(static_cast<uint32_t>(u) ^ key) ^ static_cast<uint32_t>(u >> 32));
  return (r >> 8) < threshold;
}

}  // namespace sam_kernels::cuda
