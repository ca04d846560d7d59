"""Group-level wrappers over ``torch.ops.sam_kernels``: the same signatures as ``reference.py``.

The compiled ops dispatch on the tensors' device, so these wrappers serve both the ``cpp`` (CPU)
and the ``cuda`` backends; each backend module keeps only the ops its device has kernels for.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._extension import has_kernel


def _op(name: str):
    return getattr(torch.ops.sam_kernels, name).default


def grad_sq_norm(grads, params, masks, eta):
    return _op("grad_sq_norm")(grads, params, masks, eta)


def dot(a, b):
    return _op("dot")(a, b)


def perturb_(params, grads, backups, sq_norm, rho, eps, masks, adaptive, eta, keep_prob, keys, perturbation_sq=None,
             grad_copies=None):
    _op("perturb_")(params, grads, backups, sq_norm, rho, eps, masks, adaptive, eta, keep_prob, keys, perturbation_sq,
                    grad_copies)


def restore_(params, backups):
    _op("restore_")(params, backups)


def sgd_restore_step_(params, backups, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
                      maximize, init_buffers, grad_scale=None, found_inf=None, ascent_grads=None, sums=None):
    _op("sgd_restore_step_")(params, backups, grads, momentum_buffers or [], lr, momentum, dampening, weight_decay,
                             nesterov, maximize, init_buffers, grad_scale, found_inf, ascent_grads, sums)


def adamw_restore_step_(params, backups, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay,
                        maximize, grad_scale=None, found_inf=None, ascent_grads=None, sums=None):
    _op("adamw_restore_step_")(params, backups, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                               weight_decay, maximize, grad_scale, found_inf, ascent_grads, sums)


def renormalize_(grads, ref_sq_norm, sq_norm, eps):
    _op("renormalize_")(grads, ref_sq_norm, sq_norm, eps)


def fisher_accumulate_(fisher, grads, scale):
    _op("fisher_accumulate_")(fisher, grads, scale)


def looksam_store_(g_v, grads, sam_grads, gs_dot_g, g_sq_norm, eps):
    _op("looksam_store_")(g_v, grads, sam_grads, gs_dot_g, g_sq_norm, eps)


def looksam_apply_(grads, g_v, alpha, g_sq_norm, gv_sq_norm, eps):
    _op("looksam_apply_")(grads, g_v, alpha, g_sq_norm, gv_sq_norm, eps)


def topk_mask(scores, k):
    return list(_op("topk_mask")(scores, k))


def nm_mask(scores, n, m):
    return list(_op("nm_mask")(scores, n, m))


ALL: dict[str, Callable] = {fn.__name__: fn for fn in (
    grad_sq_norm, dot, perturb_, restore_, sgd_restore_step_, adamw_restore_step_, renormalize_,
    fisher_accumulate_, looksam_store_, looksam_apply_, topk_mask, nm_mask)}


def ops_with_kernel(dispatch_key: str) -> dict[str, Callable]:
    """The wrappers whose op has a kernel for ``dispatch_key``."""
    return {name: fn for name, fn in ALL.items() if has_kernel(name, dispatch_key)}
