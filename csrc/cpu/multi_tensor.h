// Multi-tensor machinery shared by every CPU op: group checks, chunking, parallel loops,
// deterministic reductions, dtype dispatch.
//
// A group is a set of aligned tensor lists (same length; entry i of every list has the same
// numel; contiguous). Every tensor is cut into fixed chunks of kChunk elements and one
// at::parallel_for runs over the chunks of all tensors, so hundreds of small tensors and one huge
// tensor parallelize the same way. Reductions write one partial per chunk and sum them in chunk
// order: the result does not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sam_kernels::cpu {

constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(at::TensorList primary) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(primary.size()); ++t) {
    const int64_t n = primary[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// Runs f(chunk) for every chunk, in parallel.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(chunks[i]);
  });
}

// Σ over chunks of f(chunk) -> double, summed in chunk order (deterministic).
template <typename F>
double reduce_chunks(const std::vector<Chunk>& chunks, const F& f) {
  std::vector<double> partials(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) partials[i] = f(chunks[i]);
  });
  double total = 0.0;
  for (double p : partials) total += p;
  return total;
}

// A 0-dim result in the reduction dtype of the op contract: fp64 for fp64 inputs, else fp32.
inline at::Tensor scalar_result(double value, at::ScalarType input) {
  const auto dtype = input == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(value, at::TensorOptions().dtype(dtype));
}

// Reads a 0-dim device scalar (sq_norm, dot) in the compute type.
template <typename acc_t>
acc_t read_scalar(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU like the tensors, got ", t.device());
  return static_cast<acc_t>(t.to(at::kDouble).item<double>());
}

// Validates one list of a group against the primary list.
inline void check_list(const char* op, const char* name, at::TensorList primary, at::TensorList lst,
                       bool is_mask = false) {
  TORCH_CHECK(lst.size() == primary.size(), op, ": ", name, " has ", lst.size(), " tensors, expected ",
              primary.size());
  const auto dtype = primary.empty() ? at::kFloat : primary[0].scalar_type();
  for (size_t i = 0; i < lst.size(); ++i) {
    const auto& t = lst[i];
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(), "; the cpp backend runs on CPU");
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
  const auto dtype = primary[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": unsupported dtype ", dtype, "; supported: float32, float64, float16, bfloat16");
  check_list(op, name, primary, primary);
}

template <typename T>
T* data(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Dispatch over the four float dtypes; scalar_t is the storage type.
#define SAM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// murmur3 finalizer; the keep mask of reference.keep_mask: the same bits on every backend.
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

inline bool keep_element(uint32_t key, int64_t i, uint32_t threshold) {
  const uint64_t u = static_cast<uint64_t>(i);
  const uint32_t r = fmix32(fmix32(static_cast<uint32_t>(u) ^ key) ^ static_cast<uint32_t>(u >> 32));
  return (r >> 8) < threshold;
}

}  // namespace sam_kernels::cpu
