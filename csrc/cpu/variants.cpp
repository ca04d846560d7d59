// Element-wise ops of the variants: Stable SAM renormalization, Fisher accumulation, LookSAM
// store/apply, GSAM/WSAM's mix; GCSAM's per-row centralization. Their global norms/dots arrive as
// 0-dim tensors (computed by grad_sq_norm / dot).
#include "multi_tensor.h"

#include <torch/library.h>

namespace sam_kernels::cpu {
namespace {

// out[i] = a[i] + coef * x[i] (a may alias out), for every element of the group.
template <typename scalar_t, typename acc_t>
void axpy(at::TensorList out, at::TensorList a, at::TensorList x, acc_t coef) {
  const auto chunks = make_chunks(out);
  for_each_chunk(chunks, [&](const Chunk& c) {
    scalar_t* o = data<scalar_t>(out[c.tensor]);
    const scalar_t* av = data<scalar_t>(a[c.tensor]);
    const scalar_t* xv = data<scalar_t>(x[c.tensor]);
    elementwise<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
      using T = decltype(tag);
      store(o, i, load<T>(av, i) + T(coef) * load<T>(xv, i));
    });
  });
}

void renormalize_cpu(at::TensorList grads, const at::Tensor& ref_sq_norm, const at::Tensor& sq_norm, double eps) {
  check_primary("renormalize_", "grads", grads);
  sam_kernels::check_no_shared_writes("renormalize_", {{grads, true}});
  SAM_DISPATCH_FLOATS(grads[0].scalar_type(), "renormalize_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t ratio = std::sqrt(read_scalar<acc_t>(ref_sq_norm, "renormalize_", "ref_sq_norm")) /
                        (std::sqrt(read_scalar<acc_t>(sq_norm, "renormalize_", "sq_norm")) + static_cast<acc_t>(eps));
    const auto chunks = make_chunks(grads);
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* g = data<scalar_t>(grads[c.tensor]);
      elementwise<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        store(g, i, load<T>(g, i) * T(ratio));
      });
    });
  });
}

void fisher_accumulate_cpu(at::TensorList fisher, at::TensorList grads, double scale) {
  check_primary("fisher_accumulate_", "fisher", fisher);
  check_list("fisher_accumulate_", "grads", fisher, grads);
  sam_kernels::check_no_shared_writes("fisher_accumulate_", {{fisher, true}, {grads, false}});
  SAM_DISPATCH_FLOATS(fisher[0].scalar_type(), "fisher_accumulate_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale;
    const auto chunks = make_chunks(fisher);
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* f = data<scalar_t>(fisher[c.tensor]);
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      elementwise<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        const T gi = load<T>(g, i);
        store(f, i, load<T>(f, i) + T(s) * gi * gi);
      });
    });
  });
}

void looksam_store_cpu(at::TensorList g_v, at::TensorList grads, at::TensorList sam_grads, const at::Tensor& gs_dot_g,
                       const at::Tensor& g_sq_norm, double eps) {
  check_primary("looksam_store_", "g_v", g_v);
  check_list("looksam_store_", "grads", g_v, grads);
  check_list("looksam_store_", "sam_grads", g_v, sam_grads);
  sam_kernels::check_no_shared_writes("looksam_store_", {{g_v, true}, {grads, false}, {sam_grads, false}});
  SAM_DISPATCH_FLOATS(g_v[0].scalar_type(), "looksam_store_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t coef = read_scalar<acc_t>(gs_dot_g, "looksam_store_", "gs_dot_g") /
                       (read_scalar<acc_t>(g_sq_norm, "looksam_store_", "g_sq_norm") + static_cast<acc_t>(eps));
    axpy<scalar_t, acc_t>(g_v, sam_grads, grads, -coef);
  });
}

void looksam_apply_cpu(at::TensorList grads, at::TensorList g_v, double alpha, const at::Tensor& g_sq_norm,
                       const at::Tensor& gv_sq_norm, double eps) {
  check_primary("looksam_apply_", "grads", grads);
  check_list("looksam_apply_", "g_v", grads, g_v);
  sam_kernels::check_no_shared_writes("looksam_apply_", {{grads, true}, {g_v, false}});
  SAM_DISPATCH_FLOATS(grads[0].scalar_type(), "looksam_apply_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t coef = static_cast<acc_t>(alpha) *
                       std::sqrt(read_scalar<acc_t>(g_sq_norm, "looksam_apply_", "g_sq_norm")) /
                       (std::sqrt(read_scalar<acc_t>(gv_sq_norm, "looksam_apply_", "gv_sq_norm")) +
                        static_cast<acc_t>(eps));
    axpy<scalar_t, acc_t>(grads, grads, g_v, coef);
  });
}

// g ← a·g + b·o (GSAM's surrogate-gap descent, WSAM's mixes); o may alias g.
void mix_cpu(at::TensorList grads, at::TensorList others, const at::Tensor& a, const at::Tensor& b) {
  check_primary("mix_", "grads", grads);
  check_list("mix_", "others", grads, others);
  sam_kernels::check_no_shared_writes("mix_", {{grads, true}, {others, false}});
  SAM_DISPATCH_FLOATS(grads[0].scalar_type(), "mix_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t ca = read_scalar<acc_t>(a, "mix_", "a");
    const acc_t cb = read_scalar<acc_t>(b, "mix_", "b");
    const auto chunks = make_chunks(grads);
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* g = data<scalar_t>(grads[c.tensor]);
      const scalar_t* o = data<scalar_t>(others[c.tensor]);
      elementwise<scalar_t>(c.begin, c.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        store(g, i, T(ca) * load<T>(g, i) + T(cb) * load<T>(o, i));
      });
    });
  });
}

// Friendly-SAM / VaSSO: d ← g − (sigma·S)·m (when directions are given), m ← m + weight·(g·(1/S) − m)
// unless found_inf; one pass. The AMP scalars are CPU tensors here: read on the host.
void ema_update_cpu(at::TensorList emas, at::TensorList grads, std::optional<at::TensorList> directions, double weight,
                    double sigma, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  check_primary("ema_update_", "emas", emas);
  check_list("ema_update_", "grads", emas, grads);
  if (directions) check_list("ema_update_", "directions", emas, *directions);
  sam_kernels::check_no_shared_writes("ema_update_", {{emas, true}, {grads, false},
                                                      {directions ? *directions : at::TensorList(), true}});
  sam_kernels::check_amp_scalar("ema_update_", "grad_scale", grad_scale, emas);
  sam_kernels::check_amp_scalar("ema_update_", "found_inf", found_inf, emas);
  const bool skip = found_inf && *found_inf->data_ptr<float>() != 0.0f;
  const float scale = grad_scale ? *grad_scale->data_ptr<float>() : 1.0f;
  const float inv_scale = 1.0f / scale;  // fp32 reciprocal, as reference.unscale_factor
  SAM_DISPATCH_FLOATS(emas[0].scalar_type(), "ema_update_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = weight, c = static_cast<acc_t>(scale) * static_cast<acc_t>(sigma), inv = inv_scale;
    const bool scaled = grad_scale.has_value();
    const auto chunks = make_chunks(emas);
    for_each_chunk(chunks, [&](const Chunk& ch) {
      scalar_t* m = data<scalar_t>(emas[ch.tensor]);
      const scalar_t* g = data<scalar_t>(grads[ch.tensor]);
      scalar_t* d = directions ? data<scalar_t>((*directions)[ch.tensor]) : nullptr;
      elementwise<scalar_t>(ch.begin, ch.end, /*vectorize=*/true, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        const T gi = load<T>(g, i);
        const T mi = load<T>(m, i);
        if (d) store(d, i, gi - mi * T(c));
        if (!skip) store(m, i, mi + (((scaled ? gi * T(inv) : gi) - mi) * T(w)));
      });
    });
  });
}

// Gradient centralization (GCSAM): g ← g − mean(g over dims 1..) per row of dim 0, for the tensors of
// more than one dimension. A row is a contiguous run of numel/size(0) elements (dim 0 outermost:
// checked). Work items are runs of whole rows of about kChunk elements, so each row is summed and
// then rewritten while it is still in cache: one read from memory for the means, the second from
// cache unless a row is larger than the cache.
void centralize_cpu(at::TensorList grads) {
  check_primary("centralize_", "grads", grads);
  sam_kernels::check_no_shared_writes("centralize_", {{grads, true}});
  struct Rows {
    int64_t tensor;
    int64_t first;
    int64_t last;  // rows [first, last)
    int64_t length;
  };
  std::vector<Rows> items;
  for (int64_t t = 0; t < static_cast<int64_t>(grads.size()); ++t) {
    const auto& g = grads[t];
    if (g.dim() < 2 || g.numel() == 0) continue;
    const int64_t rows = g.size(0);
    const int64_t length = sam_kernels::row_length("centralize_", grads, t);
    const int64_t per_item = std::max<int64_t>(1, kChunk / length);
    for (int64_t r = 0; r < rows; r += per_item) items.push_back({t, r, std::min(rows, r + per_item), length});
  }
  SAM_DISPATCH_FLOATS(grads[0].scalar_type(), "centralize_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Rows& it = items[k];
        scalar_t* g = data<scalar_t>(grads[it.tensor]);
        for (int64_t r = it.first; r < it.last; ++r) {
          const int64_t begin = r * it.length, end = begin + it.length;
          const double sum = chunk_sum<scalar_t>(begin, end, /*vectorize=*/true,
                                                 [&](auto tag, int64_t i) { return load<decltype(tag)>(g, i); });
          const acc_t mean = static_cast<acc_t>(sum / static_cast<double>(it.length));
          elementwise<scalar_t>(begin, end, /*vectorize=*/true, [&](auto tag, int64_t i) {
            using T = decltype(tag);
            store(g, i, load<T>(g, i) - T(mean));
          });
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("centralize_", &centralize_cpu);
  m.impl("ema_update_", &ema_update_cpu);
  m.impl("renormalize_", &renormalize_cpu);
  m.impl("fisher_accumulate_", &fisher_accumulate_cpu);
  m.impl("looksam_store_", &looksam_store_cpu);
  m.impl("looksam_apply_", &looksam_apply_cpu);
  m.impl("mix_", &mix_cpu);
}

}  // namespace sam_kernels::cpu
