// Reductions: grad_sq_norm (Σ (m ⊙ T ⊙ g)²) and dot (Σ ⟨a, b⟩); see reference.py.
// Every chunk is summed on its own (chunk_sum: fp32 vector blocks folded into a double), then the
// chunk partials are added in chunk order: deterministic whatever the thread count.
#include "multi_tensor.h"

#include <torch/library.h>

namespace sam_kernels::cpu {
namespace {

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
      // Masked entries count as 0; the bool mask is read element by element (scalar path).
      return chunk_sum<scalar_t>(c.begin, c.end, /*vectorize=*/!m, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        T x = load<T>(g, i);
        if (w) x = x * (vabs(load<T>(w, i)) + T(eta));
        if constexpr (!is_vec<T>::value) {
          if (m && !m[i]) x = T(0);
        }
        return x * x;
      });
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
      return chunk_sum<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        return load<T>(x, i) * load<T>(y, i);
      });
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
