// perturb_ (backup + ascent step) and restore_; see reference.py for the contract.
#include "multi_tensor.h"

#include <torch/library.h>


namespace sam_kernels::cpu {
namespace {

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sq_norm,
                 double rho, double eps, std::optional<at::TensorList> masks, bool adaptive, double eta,
                 double keep_prob, at::IntArrayRef keys, const std::optional<at::Tensor>& perturbation_sq,
                 std::optional<at::TensorList> grad_copies, bool into_backups) {
  const uint32_t threshold =
      sam_kernels::check_perturb_args(params, grads, backups, masks, keep_prob, keys, c10::DeviceType::CPU);
  if (perturbation_sq) sam_kernels::check_sums_tensor("perturb_", "perturbation_sq", *perturbation_sq, 1, params);
  if (grad_copies) check_list("perturb_", "grad_copies", params, *grad_copies);
  sam_kernels::check_no_shared_writes("perturb_", {{params, true}, {grads, false}, {backups, true},
                                                   {masks.value_or(at::TensorList{}), false},
                                                   {grad_copies.value_or(at::TensorList{}), true}});
  const bool keep = keep_prob < 1.0;
  const auto chunks = make_chunks(params);
  SAM_DISPATCH_FLOATS(params[0].scalar_type(), "perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double stored = read_scalar<double>(sq_norm, "perturb_", "sq_norm");  // exact: fp32/fp64 storage
    const acc_t sq = static_cast<acc_t>(stored);
    acc_t scale = static_cast<acc_t>(rho) / (std::sqrt(sq) + static_cast<acc_t>(eps));
    if (keep) scale /= static_cast<acc_t>(keep_prob);
    // A non-finite norm must not move any weight (the backup is still taken). An Inf gradient
    // gives scale 0, and 0·inf = NaN: the norm itself is tested too, as stored (like the reference).
    const bool finite = std::isfinite(scale) && std::isfinite(stored);
    const bool select = masks || keep;
    with_static_flags([&](auto stream, auto adaptive_, auto summing, auto into) {
      // perturbation_sq: Σ (w_new − w)² of the stored values, summed while they are in cache.
      for_each_chunk_summing<scalar_t>(chunks, perturbation_sq, /*both=*/false,
                                       [&](const Chunk& c, int64_t lo, int64_t hi, LaneSum<scalar_t>* acc) {
        scalar_t* w = data<scalar_t>(params[c.tensor]);
        const scalar_t* g = data<scalar_t>(grads[c.tensor]);
        scalar_t* b = data<scalar_t>(backups[c.tensor]);
        const bool* m = masks ? data<bool>((*masks)[c.tensor]) : nullptr;
        const uint32_t key = keep ? static_cast<uint32_t>(keys[c.tensor]) : 0u;
        if (grad_copies) {  // g(w) for telemetry, from the piece the loop below reads (in cache)
          scalar_t* copy = data<scalar_t>((*grad_copies)[c.tensor]);
          std::copy(g + lo, g + hi, copy + lo);
        }
        if (!finite) {
          std::copy(w + lo, w + hi, b + lo);
          return;
        }
        // The backup is taken in the same loop as the ascent: one read of w for both. With
        // into_backups, w + e goes to the backups instead and w is only read (the caller swaps
        // the two tensors' storages: a pass that writes one list instead of two).
        // Selections are per element (bool mask, hash): the scalar path, which skips unselected
        // entries instead of adding zero, so they stay bitwise unchanged (-0.0 included).
        scalar_t* out = into ? b : w;
        elementwise<scalar_t>(lo, hi, /*vectorize=*/!select, [&](auto tag, int64_t i) {
          using T = decltype(tag);
          const T wi = load<T>(w, i);
          if constexpr (is_vec<T>::value) {
            if constexpr (!into) {
              if constexpr (stream) {
                store_stream(b, i, wi);
              } else {
                store(b, i, wi);
              }
            }
          } else {
            const bool skipped = (m && !m[i]) || (keep && !keep_element(key, i, threshold));
            if (!into || skipped) b[i] = w[i];  // bitwise, whatever the dtype
            if (skipped) return;
          }
          T e = load<T>(g, i);
          if constexpr (adaptive_) {
            const T t = vabs(wi) + T(eta);
            e = t * t * e;
          }
          const T next = fma_(e, T(scale), wi);  // the order of reference.perturb_, one rounding
          if constexpr (into && stream && is_vec<T>::value) {
            store_stream(out, i, next);
          } else {
            store(out, i, next);
          }
          if constexpr (summing) {
            const T applied = load<T>(out, i) - wi;  // as stored (rounded to fp16/bf16)
            acc[0].add_product(applied, applied);
          }
        });
        // Once per chunk (a block of a summing loop is a part of one): a fence waits for every streamed line.
        if (stream && hi == c.end) stream_fence();
      });
    }, stream_writes(backups), adaptive, perturbation_sq.has_value(), into_backups);
  });
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_primary("restore_", "params", params);
  check_list("restore_", "backups", params, backups);
  sam_kernels::check_no_shared_writes("restore_", {{params, true}, {backups, false}});
  copy_chunks(make_chunks(params), params, backups);
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
}

}  // namespace sam_kernels::cpu
