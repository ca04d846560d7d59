// One place for every schema of torch.ops.sam_kernels. Implementations register themselves per
// device with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu. The Python-side contract
// and eager reference of each op live in sam_kernels/ops/reference.py (same argument order).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

TORCH_LIBRARY(sam_kernels, m) {
  // Reductions: 0-dim fp32 result (fp64 for fp64 inputs), fixed order, no host sync.
  m.def("grad_sq_norm(Tensor[] grads, Tensor[]? params, Tensor[]? masks, float eta) -> Tensor");
  m.def("dot(Tensor[] a, Tensor[] b) -> Tensor");
  // keys: one 32-bit RNG key per tensor (ignored when keep_prob >= 1). Telemetry:
  // `perturbation_sq` (1 element, fp32/fp64) += Σ (w_new − w)² as stored, in the same pass;
  // `grad_copies` ← grads, bitwise, every element (g(w) kept for the cosine), in the same pass.
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sq_norm, float rho, "
        "float eps, Tensor[]? masks, bool adaptive, float eta, float keep_prob, int[] keys, "
        "Tensor(c!)? perturbation_sq=None, Tensor(d!)[]? grad_copies=None, bool into_backups=False) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  // AMP: grads carry the loss scale `grad_scale` (divided out in the kernel); a non-zero
  // `found_inf` skips the update on the device (params <- backups, state untouched).
  // Telemetry: `sums` (2 elements, fp32/fp64) += [Σ g², Σ ⟨ascent_grads, g⟩] over the grads as given
  // (scaled), read in the same pass; sums[1] unchanged without ascent_grads.
  // Finite check (SGD): `nonfinite` (0-dim fp32) <- 1 when an unscaled grad is NaN/Inf, in the same
  // pass; the new buffers go to `momentum_out` (the old ones only read); a non-zero flag at the end
  // of the call restores params <- backups and momentum_out <- momentum_buffers, bitwise.
  m.def("sgd_restore_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
        "bool init_buffers, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? ascent_grads=None, "
        "Tensor(c!)? sums=None, Tensor(d!)[]? momentum_out=None, Tensor(e!)? nonfinite=None) -> ()");
  m.def("adamw_restore_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? ascent_grads=None, "
        "Tensor(d!)? sums=None) -> ()");
  m.def("renormalize_(Tensor(a!)[] grads, Tensor ref_sq_norm, Tensor sq_norm, float eps) -> ()");
  m.def("fisher_accumulate_(Tensor(a!)[] fisher, Tensor[] grads, float scale) -> ()");
  m.def("looksam_store_(Tensor(a!)[] g_v, Tensor[] grads, Tensor[] sam_grads, Tensor gs_dot_g, Tensor g_sq_norm, "
        "float eps) -> ()");
  m.def("looksam_apply_(Tensor(a!)[] grads, Tensor[] g_v, float alpha, Tensor g_sq_norm, Tensor gv_sq_norm, "
        "float eps) -> ()");
  // Friendly-SAM / VaSSO: directions ← g − sigma·S·m (m before its update; only when given);
  // emas ← m + weight·(g/S − m) unless found_inf is non-zero (S = grad_scale, 1 when absent).
  m.def("ema_update_(Tensor(a!)[] emas, Tensor[] grads, Tensor(b!)[]? directions, float weight, float sigma, "
        "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def("mix_(Tensor(a!)[] grads, Tensor[] others, Tensor a, Tensor b) -> ()");
  // bSAM (noise drawn by the caller; AMP scalars as the fused descents'; bsam_descent_ restores w from the
  // backups and, on a skipped step, sets s_next <- s so that the caller's s/s_next swap keeps s).
  m.def("bsam_noise_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor[] s, Tensor[] noise, float num_data) -> ()");
  m.def("bsam_ascent_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor[] s, Tensor(b!)[] s_next, "
        "float rho, float beta2, float damping, float weight_decay, bool perturb, Tensor? grad_scale=None, "
        "Tensor? found_inf=None) -> ()");
  m.def("bsam_descent_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] s, "
        "Tensor(c!)[] s_next, float lr, float beta1, float weight_decay, Tensor? grad_scale=None, "
        "Tensor? found_inf=None) -> ()");
  // GCSAM: g ← g − mean(g over dims 1..) per row of dim 0 (tensors of more than one dimension).
  m.def("centralize_(Tensor(a!)[] grads) -> ()");
  m.def("topk_mask(Tensor[] scores, int k) -> Tensor[]");
  m.def("nm_mask(Tensor[] scores, int n, int m) -> Tensor[]");
}

// Autograd safety: every op that writes a tensor bumps its version counter, as torch's in-place
// ops do, on every device; so a backward through a graph that saved a tensor before it was written
// raises autograd's in-place error instead of silently using the new values. The written arguments
// are read from the schema's alias annotations (Tensor(a!)[]); the bump follows a successful call
// (a rejected call writes nothing). torch's own autogradNotImplementedInplaceOrViewFallback only
// bumps tensors an op RETURNS, and these ops return nothing.
namespace {
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  // Handles of the written lists and tensors (the call consumes the stack): a list handle keeps
  // its tensors alive without a reference count taken per tensor.
  std::vector<c10::List<at::Tensor>> lists;
  std::vector<at::Tensor> tensors;
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensorList()) {
      lists.push_back(v.toTensorList());
    } else if (v.isTensor()) {
      tensors.push_back(v.toTensor());
    }
  }
  {
    c10::impl::ExcludeDispatchKeyGuard below(c10::DispatchKey::ADInplaceOrView);
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  const auto bump = [](const at::Tensor& t) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  };
  for (const auto& l : lists) {
    for (size_t i = 0; i < l.size(); ++i) bump(l.get(i));
  }
  for (const auto& t : tensors) bump(t);
}
}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, ADInplaceOrView, m) {
  for (const char* op : {"perturb_", "restore_", "sgd_restore_step_", "adamw_restore_step_", "renormalize_",
                         "fisher_accumulate_", "looksam_store_", "looksam_apply_", "mix_", "bsam_noise_",
                         "bsam_ascent_", "bsam_descent_", "ema_update_", "centralize_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}
