// Reductions: grad_sq_norm (Σ (m ⊙ T ⊙ g)²) and dot (Σ ⟨a, b⟩); see reference.py.
// Each chunk accumulates in double, chunks are summed in order: deterministic, and at least as
// accurate as the fp32 accumulation the contract asks for.
#include <torch/library.h>

#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// Loops live in templates: a #pragma cannot sit inside the dispatch macro's argument.
template <typename scalar_t>
double sum_sq(const scalar_t* g, int64_t begin, int64_t end) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<double>(g[i]);
    acc += x * x;
  }
  return acc;
}

template <typename scalar_t>
double sum_prod(const scalar_t* x, const scalar_t* y, int64_t begin, int64_t end) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  return acc;
}

at::Tensor grad_sq_norm_cpu(at::TensorList grads, std::optional<at::TensorList> params,
                            std::optional<at::TensorList> masks, double eta) {
  check_primary("grad_sq_norm", "grads", grads);
  if (params) check_list("grad_sq_norm", "params", grads, *params);
  if (masks) check_list("grad_sq_norm", "masks", grads, *masks, /*is_mask=*/true);
  const auto chunks = make_chunks(grads);
  double total = 0.0;
  SAM_DISPATCH_FLOATS(grads[0].scalar_type(), "grad_sq_norm", [&] {
    total = reduce_chunks(chunks, [&](const Chunk& c) {
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      const scalar_t* w = params ? data<scalar_t>((*params)[c.tensor]) : nullptr;
      const bool* m = masks ? data<bool>((*masks)[c.tensor]) : nullptr;
      if (!w && !m) return sum_sq(g, c.begin, c.end);
      double acc = 0.0;
      for (int64_t i = c.begin; i < c.end; ++i) {
        double x = static_cast<double>(g[i]);
        if (w) x *= std::abs(static_cast<double>(w[i])) + eta;
        if (m && !m[i]) x = 0.0;
        acc += x * x;
      }
      return acc;
    });
  });
  return scalar_result(total, grads[0].scalar_type());
}

at::Tensor dot_cpu(at::TensorList a, at::TensorList b) {
  check_primary("dot", "a", a);
  check_list("dot", "b", a, b);
  const auto chunks = make_chunks(a);
  double total = 0.0;
  SAM_DISPATCH_FLOATS(a[0].scalar_type(), "dot", [&] {
    total = reduce_chunks(chunks, [&](const Chunk& c) {
      const scalar_t* x = data<scalar_t>(a[c.tensor]);
      const scalar_t* y = data<scalar_t>(b[c.tensor]);
      return sum_prod(x, y, c.begin, c.end);
    });
  });
  return scalar_result(total, a[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cpu);
  m.impl("dot", &dot_cpu);
}

}  // namespace sam_kernels::cpu
