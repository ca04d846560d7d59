// One place for every schema of torch.ops.sam_kernels. Implementations register themselves per
// device with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu. The Python-side contract
// and eager reference of each op live in sam_kernels/ops/reference.py (same argument order).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing sam_kernels._C only has to run the static registrations below: no pybind module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sam_kernels, m) {
  // Reductions: 0-dim fp32 result (fp64 for fp64 inputs), fixed order, no host sync.
  m.def("grad_sq_norm(Tensor[] grads, Tensor[]? params, Tensor[]? masks, float eta) -> Tensor");
  m.def("dot(Tensor[] a, Tensor[] b) -> Tensor");
  // keys: one 32-bit RNG key per tensor (ignored when keep_prob >= 1).
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sq_norm, float rho, "
        "float eps, Tensor[]? masks, bool adaptive, float eta, float keep_prob, int[] keys) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  // AMP: grads carry the loss scale `grad_scale` (divided out in the kernel); a non-zero
  // `found_inf` skips the update on the device (params <- backups, state untouched).
  m.def("sgd_restore_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
        "bool init_buffers, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def("adamw_restore_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def("renormalize_(Tensor(a!)[] grads, Tensor ref_sq_norm, Tensor sq_norm, float eps) -> ()");
  m.def("fisher_accumulate_(Tensor(a!)[] fisher, Tensor[] grads, float scale) -> ()");
  m.def("looksam_store_(Tensor(a!)[] g_v, Tensor[] grads, Tensor[] sam_grads, Tensor gs_dot_g, Tensor g_sq_norm, "
        "float eps) -> ()");
  m.def("looksam_apply_(Tensor(a!)[] grads, Tensor[] g_v, float alpha, Tensor g_sq_norm, Tensor gv_sq_norm, "
        "float eps) -> ()");
  m.def("topk_mask(Tensor[] scores, int k) -> Tensor[]");
  m.def("nm_mask(Tensor[] scores, int n, int m) -> Tensor[]");
}
