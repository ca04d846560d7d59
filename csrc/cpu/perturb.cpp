// perturb_ (backup + ascent step) and restore_; see reference.py for the contract.
#include <torch/library.h>

#include <cstring>

#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

template <typename scalar_t, typename acc_t>
void add_scaled(scalar_t* w, const scalar_t* g, acc_t scale, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i)
    w[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) + static_cast<acc_t>(g[i]) * scale);
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sq_norm,
                 double rho, double eps, std::optional<at::TensorList> masks, bool adaptive, double eta,
                 double keep_prob, at::IntArrayRef keys) {
  check_primary("perturb_", "params", params);
  check_list("perturb_", "grads", params, grads);
  check_list("perturb_", "backups", params, backups);
  if (masks) check_list("perturb_", "masks", params, *masks, /*is_mask=*/true);
  const bool keep = keep_prob < 1.0;
  TORCH_CHECK(!keep || keys.size() == params.size(), "perturb_: need one RNG key per tensor, got ", keys.size());
  const uint32_t threshold = static_cast<uint32_t>(keep_prob * (1 << 24));
  const auto chunks = make_chunks(params);
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t sq = read_scalar<acc_t>(sq_norm, "perturb_", "sq_norm");
    acc_t scale = static_cast<acc_t>(rho) / (std::sqrt(sq) + static_cast<acc_t>(eps));
    if (keep) scale /= static_cast<acc_t>(keep_prob);
    // A non-finite norm must not move any weight (the backup is still taken). An Inf gradient
    // gives scale 0, and 0·inf = NaN: the norm itself is tested too.
    const bool finite = std::isfinite(scale) && std::isfinite(sq);
    const acc_t eta_c = static_cast<acc_t>(eta);
    for_each_chunk(chunks, [&](const Chunk& c) {
      scalar_t* w = data<scalar_t>(params[c.tensor]);
      const scalar_t* g = data<scalar_t>(grads[c.tensor]);
      scalar_t* b = data<scalar_t>(backups[c.tensor]);
      const bool* m = masks ? data<bool>((*masks)[c.tensor]) : nullptr;
      const uint32_t key = keep ? static_cast<uint32_t>(keys[c.tensor]) : 0u;
      std::copy(w + c.begin, w + c.end, b + c.begin);
      if (!finite) return;
      if (!adaptive && !m && !keep) return add_scaled(w, g, scale, c.begin, c.end);
      for (int64_t i = c.begin; i < c.end; ++i) {
        // Unselected entries are skipped, not added zero: bitwise unchanged, -0.0 included.
        if ((m && !m[i]) || (keep && !keep_element(key, i, threshold))) continue;
        const acc_t wi = static_cast<acc_t>(w[i]);
        const acc_t t = adaptive ? std::abs(wi) + eta_c : acc_t(1);
        w[i] = static_cast<scalar_t>(wi + t * t * static_cast<acc_t>(g[i]) * scale);
      }
    });
  });
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_primary("restore_", "params", params);
  check_list("restore_", "backups", params, backups);
  const auto chunks = make_chunks(params);
  const int64_t item = params[0].element_size();
  for_each_chunk(chunks, [&](const Chunk& c) {
    auto* dst = static_cast<char*>(params[c.tensor].data_ptr());
    const auto* src = static_cast<const char*>(backups[c.tensor].data_ptr());
    std::memcpy(dst + c.begin * item, src + c.begin * item, (c.end - c.begin) * item);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
}

}  // namespace sam_kernels::cpu
