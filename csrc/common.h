// Pieces shared by the CPU and the CUDA kernels: group checks, the perturb_ argument checks and
// the counter-based keep-mask hash. Host code only, except the hash (host and device).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#ifdef __CUDACC__
#define SAM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SAM_HOST_DEVICE inline
#endif

namespace sam_kernels {

// Whether `t` and `ref` (same shape, both non-overlapping and dense) put every element at the same
// offset from their data pointers: equal strides on every dim of size > 1 (the stride of a size-1
// dim is never used, and autograd's layout contract lets it differ between a param and its grad).
inline bool same_memory_order(const at::Tensor& t, const at::Tensor& ref) {
  const auto sizes = ref.sizes();
  const auto a = t.strides();
  const auto b = ref.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != 1 && a[d] != b[d]) return false;
  }
  return true;
}

// Validates one list of a group against the primary list: same length, the primary's device,
// strided, the primary's shapes, the primary's dtype (torch.bool for masks), and a layout the
// kernels can walk as flat storage: non-overlapping and dense (contiguous, channels_last,
// channels_last_3d, permuted, ...) with the same memory order as the primary's entry, so element
// k of every list's storage is the same logical element. Zero-size tensors are skipped by the
// kernels and not checked for layout.
inline void check_list(const char* op, const char* name, at::TensorList primary, at::TensorList lst,
                       bool is_mask = false) {
  TORCH_CHECK(lst.size() == primary.size(), op, ": ", name, " has ", lst.size(), " tensors, expected ",
              primary.size());
  const auto device = primary[0].device();
  const auto dtype = primary[0].scalar_type();
  // The primary list checked against itself (check_primary): its shapes and memory order agree
  // with themselves; skipping those comparisons halves the per-tensor cost of that pass.
  const bool itself = lst.data() == primary.data();
  for (size_t i = 0; i < lst.size(); ++i) {
    const auto& t = lst[i];
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(itself || t.sizes() == primary[i].sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(),
                ", expected ", primary[i].sizes());
    if (is_mask) {
      TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, "[", i, "] must be torch.bool, got ", t.scalar_type());
    } else {
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
                  dtype, " (one dtype per group)");
    }
    if (t.numel() == 0) continue;
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i, "] overlaps or has gaps (strides ",
                t.strides(), "); the Python layer routes such tensors to the eager backend");
    TORCH_CHECK(itself || same_memory_order(t, primary[i]), op, ": ", name, "[", i, "] has strides ", t.strides(),
                " but entry ", i, " of the first list has ", primary[i].strides(), "; the Python layer routes tensors ",
                "whose layouts differ to the eager backend");
  }
}

// The primary list of a group: non-empty, on `device_type`, one supported float dtype.
inline void check_primary(const char* op, const char* name, at::TensorList primary, c10::DeviceType device_type) {
  TORCH_CHECK(!primary.empty(), op, ": empty tensor list");
  TORCH_CHECK(primary[0].device().type() == device_type, op, ": ", name, "[0] is on ", primary[0].device(),
              "; this kernel runs on ", c10::DeviceTypeName(device_type), " tensors");
  const auto dtype = primary[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": unsupported dtype ", dtype, "; supported: float32, float64, float16, bfloat16");
  check_list(op, name, primary, primary);
}

// One list of an op call for check_no_shared_writes: its tensors (none: not given) and whether the op
// writes them.
struct Listed {
  at::TensorList tensors;
  bool written;
};

// Whether two tensors of `lists` that hold elements start at one address. An open-addressing hash
// set of the start addresses, at most half full, so an insert is about one probe: a sort of the
// thousands of addresses of a long parameter list cost more than the rest of an op's checks.
inline bool any_shared_start(std::initializer_list<Listed> lists) {
  size_t total = 0;
  for (const auto& l : lists) total += l.tensors.size();
  int bits = 4;
  while ((size_t{1} << bits) < 2 * total) ++bits;
  const size_t mask = (size_t{1} << bits) - 1;
  std::vector<uint64_t> table(mask + 1, 0);  // 0: an empty slot
  for (const auto& l : lists) {
    for (const auto& t : l.tensors) {
      if (t.numel() == 0) continue;
      const auto start = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
      if (start == 0) return true;  // cannot be stored here: the exact check decides
      // Fibonacci hashing: the top bits of the product mix every bit of the address.
      size_t slot = static_cast<size_t>((start * 0x9E3779B97F4A7C15ull) >> (64 - bits));
      for (; table[slot] != 0; slot = (slot + 1) & mask) {
        if (table[slot] == start) return true;
      }
      table[slot] = start;
    }
  }
  return false;
}

// Rejects (ValueError) a call in which a tensor the op writes starts at the same address as a tensor
// of another entry, or as a tensor of its own entry with other strides or another dtype: the result
// would depend on the order of the writes. Within one entry the lists may hold the same tensor or the
// same view (a parameter that is its own backup): every kernel reads an element's inputs before it
// writes it. Start addresses, as sam_kernels/ops/overlap.py, which the Python layer runs after a
// rejection to name the entries; zero-size tensors are skipped. A hash set of the start addresses
// (any_shared_start), a closer look (a sort) only when two are equal.
inline void check_no_shared_writes(const char* op, std::initializer_list<Listed> lists) {
  if (!any_shared_start(lists)) return;
  size_t total = 0;
  for (const auto& l : lists) total += l.tensors.size();
  struct Item {
    uintptr_t start;
    size_t entry;
    bool written;
    const at::Tensor* tensor;
  };
  std::vector<Item> items;
  items.reserve(total);
  for (const auto& l : lists) {
    for (size_t i = 0; i < l.tensors.size(); ++i) {
      const auto& t = l.tensors[i];
      if (t.numel() > 0) items.push_back({reinterpret_cast<uintptr_t>(t.data_ptr()), i, l.written, &t});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.start < b.start; });
  for (size_t lo = 0; lo < items.size();) {
    size_t hi = lo + 1;
    bool written = items[lo].written;
    while (hi < items.size() && items[hi].start == items[lo].start) written |= items[hi++].written;
    if (written) {
      const Item& first = items[lo];
      for (size_t k = lo + 1; k < hi; ++k) {
        const Item& other = items[k];
        TORCH_CHECK_VALUE(other.entry == first.entry && other.tensor->strides() == first.tensor->strides() &&
                              other.tensor->scalar_type() == first.tensor->scalar_type(),
                          op, ": entries ", first.entry, " and ", other.entry, " share memory and ", op,
                          " writes one of them: the result would depend on the order of the writes");
      }
    }
    lo = hi;
  }
}

// The elements of each row of dim 0 of grads[i] (more than one dimension, not empty), for an op on
// rows (centralize_): every row must be one contiguous run of storage (dim 0 outermost).
inline int64_t row_length(const char* op, at::TensorList grads, size_t i) {
  const auto& g = grads[i];
  const int64_t length = g.numel() / g.size(0);
  TORCH_CHECK(g.size(0) == 1 || g.stride(0) == length, op, ": grads[", i, "] has strides ", g.strides(),
              "; its rows of dim 0 are not contiguous runs of storage (the Python layer routes such tensors to "
              "the eager backend)");
  return length;
}

// perturb_'s lists and keep-mask arguments; returns the keep threshold int(keep_prob·2^24)
// of reference.keep_mask.
inline uint32_t check_perturb_args(at::TensorList params, at::TensorList grads, at::TensorList backups,
                                   const std::optional<at::TensorList>& masks, double keep_prob, at::IntArrayRef keys,
                                   c10::DeviceType device_type) {
  check_primary("perturb_", "params", params, device_type);
  check_list("perturb_", "grads", params, grads);
  check_list("perturb_", "backups", params, backups);
  if (masks) check_list("perturb_", "masks", params, *masks, /*is_mask=*/true);
  TORCH_CHECK(keep_prob > 0.0 && keep_prob <= 1.0, "perturb_: keep_prob must be in (0, 1], got ", keep_prob);
  TORCH_CHECK(keep_prob >= 1.0 || keys.size() == params.size(), "perturb_: need one RNG key per tensor, got ",
              keys.size());
  return static_cast<uint32_t>(keep_prob * (1 << 24));
}

// sgd_restore_step_'s lists (momentum buffers only when momentum != 0).
inline void check_sgd_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList momentum_buffers, bool has_momentum, c10::DeviceType device_type) {
  check_primary("sgd_restore_step_", "params", params, device_type);
  check_list("sgd_restore_step_", "backups", params, backups);
  check_list("sgd_restore_step_", "grads", params, grads);
  if (has_momentum) check_list("sgd_restore_step_", "momentum_buffers", params, momentum_buffers);
}

// sgd_restore_step_'s finite check in its pass: momentum_out (the new buffers, aligned with params)
// needs momentum and old buffers to read (not init_buffers); nonfinite over buffers updated in place
// could not restore them (only new ones, init_buffers, which a fault zero-fills).
inline void check_sgd_out_args(at::TensorList params, const std::optional<at::TensorList>& momentum_out,
                               const std::optional<at::Tensor>& nonfinite, bool has_momentum, bool init_buffers) {
  if (momentum_out) {
    TORCH_CHECK_VALUE(has_momentum && !init_buffers, "sgd_restore_step_: momentum_out needs momentum != 0 and the ",
                      "old buffers (not init_buffers)");
    check_list("sgd_restore_step_", "momentum_out", params, *momentum_out);
  }
  TORCH_CHECK_VALUE(!nonfinite || !has_momentum || init_buffers || momentum_out, "sgd_restore_step_: nonfinite ",
                    "with momentum needs momentum_out (buffers updated in place could not be restored)");
}

// AMP scalars of the fused descents: 0-dim float32 tensors on the params' device (read by the
// kernel: reading them elsewhere would synchronize).
inline void check_amp_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t,
                             at::TensorList params) {
  if (!t) return;
  TORCH_CHECK(t->numel() == 1 && t->dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == params[0].device(), op, ": ", name, " is on ", t->device(), " but the params are on ",
              params[0].device());
}

// A telemetry output a kernel adds into: a contiguous fp32/fp64 tensor of `numel` elements on the
// params' device.
inline void check_sums_tensor(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                              at::TensorList params) {
  TORCH_CHECK(t.numel() == numel && t.dim() <= 1 && t.is_contiguous(), op, ": ", name, " must be a contiguous ",
              "tensor of ", numel, " element(s) (at most 1-D), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == params[0].device(), op, ": ", name, " is on ", t.device(), " but the params are on ",
              params[0].device());
}

// Telemetry outputs of the fused descents: `sums` a contiguous 2-element fp32/fp64 tensor on the
// params' device (accumulated into by the kernel); `ascent_grads` aligned with the params, and only
// together with `sums`.
inline void check_telemetry_args(const char* op, const std::optional<at::TensorList>& ascent_grads,
                                 const std::optional<at::Tensor>& sums, at::TensorList params) {
  if (ascent_grads) {
    TORCH_CHECK(sums.has_value(), op, ": ascent_grads given without sums (where the dot would go)");
    check_list(op, "ascent_grads", params, *ascent_grads);
  }
  if (sums) check_sums_tensor(op, "sums", *sums, 2, params);
}

struct AdamWCorrections {
  double bias_correction1;       // 1 − beta1^step
  double bias_correction2_sqrt;  // sqrt(1 − beta2^step)
};

// adamw_restore_step_'s lists and step; the bias corrections in double on the host, like
// reference.py's Python floats (kernels round them once to the compute type).
inline AdamWCorrections check_adamw_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                         at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step,
                                         double beta1, double beta2, c10::DeviceType device_type) {
  check_primary("adamw_restore_step_", "params", params, device_type);
  check_list("adamw_restore_step_", "backups", params, backups);
  check_list("adamw_restore_step_", "grads", params, grads);
  check_list("adamw_restore_step_", "exp_avgs", params, exp_avgs);
  check_list("adamw_restore_step_", "exp_avg_sqs", params, exp_avg_sqs);
  TORCH_CHECK(step >= 1, "adamw_restore_step_: step must be >= 1, got ", step);
  return {1.0 - std::pow(beta1, static_cast<double>(step)), std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)))};
}

// murmur3 finalizer: reference.keep_mask's counter-based hash, the same bits on every backend.
SAM_HOST_DEVICE uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Element i of a tensor with RNG key `key` is kept iff its 24-bit uniform is below threshold; i is
// the element's position in memory (storage order from the data pointer), as in reference.keep_mask.
SAM_HOST_DEVICE bool keep_element(uint32_t key, int64_t i, uint32_t threshold) {
  const uint64_t u = static_cast<uint64_t>(i);
  const uint32_t r = fmix32(fmix32(static_cast<uint32_t>(u) ^ key) ^ static_cast<uint32_t>(u >> 32));
  return (r >> 8) < threshold;
}

}  // namespace sam_kernels
