"""Eager reference of every op: the specification, the oracle and the fallback.

Every function here works on ONE homogeneous group: non-empty, aligned tensor lists whose
tensors share a device and a dtype (``dispatch.py`` does the grouping, the global reductions
across groups and the argument checks). Compiled backends expose the same functions with the
same signatures, so ``dispatch`` can swap them freely.

Numerics (shared by all backends so that they can be compared tightly):
- reductions accumulate in fp32 (fp64 for fp64 tensors) and return a 0-dim tensor;
- element-wise maths for fp16/bf16 is done in fp32 and rounded once when stored;
- data-dependent scalars (norms, dots) stay on the device: nothing here synchronizes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensors = Sequence[torch.Tensor]
MaskList = Optional[Sequence[torch.Tensor]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/compute dtype for a storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(ts: Tensors) -> list[torch.Tensor]:
    """fp32 views/copies of low-precision tensors (compute dtype)."""
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in ts]


def _as_scalar(x, like: torch.Tensor, dtype: torch.dtype):
    """A hyperparameter as the maths takes it: a Python number as it is; a 0-dim tensor (a compiled
    step's lr or rho) in ``dtype`` on ``like``'s device, i.e. rounded as a number would be."""
    return x.to(device=like.device, dtype=dtype) if isinstance(x, torch.Tensor) else x


def _store_(dst: Tensors, src: Tensors) -> None:
    """Write compute-dtype results back, rounding once."""
    if dst[0].dtype in _LOW_PRECISION:
        torch._foreach_copy_(list(dst), list(src))


def _sum_sq(ts: Tensors) -> torch.Tensor:
    """Σ t² over the list, accumulated in fp32/fp64, in a fixed order."""
    up = _up(ts)
    if up[0].device.type == "cpu":
        # CPU vector_norm/_foreach_norm/dot accumulate with ~1e-5 relative error at 1e5+ elements
        # (measured, torch 2.14); sum() reduces pairwise and is accurate enough to be the oracle.
        return torch.stack([torch.sum(t * t) for t in up]).sum()
    return torch.stack(torch._foreach_norm(up, 2)).square().sum()


def adaptive_scale(params: Tensors, eta: float) -> list[torch.Tensor]:
    """T_w = |w| + eta in compute dtype (ASAM)."""
    t = torch._foreach_abs(_up(params))
    torch._foreach_add_(t, eta)
    return t


# --------------------------------------------------------------------------- reductions

def grad_sq_norm(grads: Tensors, params: Optional[Tensors], masks: MaskList, eta: float) -> torch.Tensor:
    """Σ (m ⊙ T ⊙ g)² with T = |w| + eta when ``params`` is given, else 1."""
    if params is None and masks is None:
        return _sum_sq(grads)
    g = _up(grads)
    if params is not None:
        g = torch._foreach_mul(adaptive_scale(params, eta), g)
    if masks is not None:  # select, not multiply: a masked-out NaN/Inf contributes nothing
        g = [torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)) for x, m in zip(g, masks)]
    return _sum_sq(g)


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """Σ ⟨a_i, b_i⟩ accumulated in fp32/fp64."""
    return torch.stack([torch.sum(x * y) for x, y in zip(_up(a), _up(b))]).sum()  # pairwise sum, see _sum_sq


# --------------------------------------------------------------------------- random keep mask

_M32 = 0xFFFFFFFF


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 finalizer on uint32 values held in int64 (wrap-around products masked to 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def fmix32_int(x: int) -> int:
    """Host version of :func:`fmix32` for Python ints."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def tensor_key(seed: int, tensor_index: int) -> int:
    """Per-tensor 32-bit RNG key: a function of (seed, position in the caller's list) only."""
    return fmix32_int((seed & _M32) ^ fmix32_int((seed >> 32) + 0x9E3779B9 + tensor_index * 0x632BE5AB))


def keep_mask(numel: int, key: int, keep_prob: float, device: torch.device) -> torch.Tensor:
    """Counter-based Bernoulli(keep_prob) mask for elements 0..numel-1 of one tensor.

    u = fmix32(fmix32(i_lo ^ key) ^ i_hi) >> 8 is a 24-bit uniform; keep iff u < keep_prob·2^24.
    Every backend computes exactly this, so masks agree bit for bit whatever the launch shape.
    The index i is the element's position in memory (:func:`in_memory_order`), which the
    kernels walk as flat storage; for a contiguous tensor it is the row-major index.
    """
    i = torch.arange(numel, device=device, dtype=torch.int64)
    r = fmix32(fmix32((i & _M32) ^ key) ^ (i >> 32))
    return (r >> 8) < int(keep_prob * (1 << 24))


def in_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (1-D, ``like.numel()`` entries) viewed with ``like``'s shape, entry k at the k-th memory
    position of ``like``: ``like``'s own strides when it is non-overlapping and dense (channels_last,
    permuted, ...), else the dense strides ``torch.empty_like(like)`` infers in the same dim order."""
    return flat.as_strided(like.shape, torch.empty_like(like, device="meta").stride())


# --------------------------------------------------------------------------- perturb / restore

def perturb_(params: Tensors, grads: Tensors, backups: Tensors, sq_norm: torch.Tensor, rho: float, eps: float,
             masks: MaskList, adaptive: bool, eta: float, keep_prob: float, keys: Sequence[int],
             perturbation_sq: Optional[torch.Tensor] = None, grad_copies: Optional[Tensors] = None,
             into_backups: bool = False) -> None:
    """backups ← params; params += s·(m ⊙ T² ⊙ g)·keep/keep_prob, s = rho/(sqrt(sq_norm)+eps).
    ``into_backups``: backups ← what params would become; params are only read.

    A non-finite ``sq_norm`` leaves params bitwise unchanged (the backup is still taken), so a NaN
    never reaches the weights.
    Entries outside ``masks`` / the keep mask are left bitwise unchanged.
    Telemetry (ours): ``perturbation_sq`` (1 element, fp32/fp64) += ‖e‖² AS APPLIED, Σ (w_new − w)²
    over the stored values in the compute dtype (accumulated like :func:`grad_sq_norm`; unchanged
    entries add exactly 0), in the pass that writes w_new. ``grad_copies`` (ours): ← grads, bitwise,
    every element whatever the mask or norm (g(w) kept for the cosine while the pass reads it).
    """
    if into_backups:  # the same steps on the backups, holding a copy of w
        torch._foreach_copy_(list(backups), list(params))
        perturb_(backups, grads, [torch.empty_like(b) for b in backups], sq_norm, rho, eps, masks, adaptive, eta, keep_prob, keys, perturbation_sq,
                 grad_copies)
        return
    torch._foreach_copy_(list(backups), list(params))
    if grad_copies is not None:
        torch._foreach_copy_(list(grad_copies), list(grads))
    cdt = acc_dtype(params[0].dtype)
    scale = _as_scalar(rho, sq_norm, cdt) / (sq_norm.to(cdt).sqrt() + eps)
    if keep_prob < 1.0:
        scale = scale / keep_prob
    # An Inf gradient gives sq_norm = inf and scale = 0, but 0·inf = NaN: test the norm too.
    finite = torch.isfinite(scale) & torch.isfinite(sq_norm)
    e = _up(grads)
    if adaptive:
        t = adaptive_scale(params, eta)
        e = torch._foreach_mul(torch._foreach_mul(t, t), e)
        torch._foreach_mul_(e, scale)
    else:
        e = torch._foreach_mul(e, scale)
    select = [finite] * len(params) if masks is None else [m & finite for m in masks]
    if keep_prob < 1.0:
        select = [s & in_memory_order(keep_mask(p.numel(), k, keep_prob, p.device), p)
                  for s, p, k in zip(select, params, keys)]
    # where(), not add: unselected entries (and everything when the norm is not finite) must stay
    # bitwise unchanged, -0.0 included, and a NaN gradient must not leak in through 0·NaN.
    for p, w, ei, sel in zip(params, _up(params), e, select):
        p.copy_(torch.where(sel, w + ei, w))
    if perturbation_sq is not None:  # over the selected entries only: an unselected NaN/Inf weight adds 0
        zero = torch.zeros((), dtype=cdt, device=params[0].device)
        applied = [torch.where(sel, p.to(cdt) - b.to(cdt), zero) for p, b, sel in zip(params, backups, select)]
        perturbation_sq += _sum_sq(applied).to(perturbation_sq.dtype).reshape(perturbation_sq.shape)


def restore_(params: Tensors, backups: Tensors) -> None:
    """params ← backups, bitwise."""
    torch._foreach_copy_(list(params), list(backups))


# --------------------------------------------------------------------------- fused restore + base step

def unscale_factor(grad_scale: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """1/grad_scale rounded to fp32 (as GradScaler's unscale), in the compute dtype: exact for its powers of 2."""
    return grad_scale.float().reciprocal().to(cdt)


def _skip_where(found_inf: Optional[torch.Tensor], kept: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> list:
    """``new`` where the step runs, ``kept`` where ``found_inf`` is non-zero (an AMP overflow skips the step)."""
    if found_inf is None:
        return list(new)
    skip = found_inf.ne(0)
    return [torch.where(skip, k, n) for k, n in zip(kept, new)]


def add_descent_sums(sums: Optional[torch.Tensor], grads: Tensors, ascent_grads: Optional[Tensors]) -> None:
    """Telemetry of the fused descents (ours): ``sums[0] += Σ g²`` and, with ``ascent_grads``,
    ``sums[1] += Σ ⟨a, g⟩``, over the grads AS GIVEN (still carrying an AMP loss scale), accumulated
    like :func:`grad_sq_norm` / :func:`dot` and added in ``sums``' dtype (fp32 or fp64, 2 elements);
    whether or not ``found_inf`` skips the step. The kernels compute them in the pass that already
    reads g for the update, so ‖g(w + e)‖ costs no read and the cosine's dot one read of g(w)."""
    if sums is None:
        return
    sums[0] += _sum_sq(grads).to(sums.dtype)
    if ascent_grads is not None:
        sums[1] += dot(ascent_grads, grads).to(sums.dtype)


def sgd_restore_step_(params: Tensors, backups: Tensors, grads: Tensors, momentum_buffers: Optional[Tensors], *,
                      lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                      maximize: bool, init_buffers: bool, grad_scale: Optional[torch.Tensor] = None,
                      found_inf: Optional[torch.Tensor] = None, ascent_grads: Optional[Tensors] = None,
                      sums: Optional[torch.Tensor] = None, momentum_out: Optional[Tensors] = None,
                      nonfinite: Optional[torch.Tensor] = None) -> None:
    """params ← backups, then exactly torch.optim.SGD's update with ``grads / grad_scale``.

    ``init_buffers``: the buffers hold garbage and this is their first step (torch sets buf = d_p).
    AMP (ours, after torch's fused optimizers): ``grad_scale`` (0-dim fp32, the loss scale the
    grads carry) is divided out element by element; a non-zero ``found_inf`` (0-dim fp32) skips the
    update on the device: params end bitwise at the backups and the buffers are left as they were.
    ``sums`` / ``ascent_grads``: telemetry, see :func:`add_descent_sums`.

    Finite check in the update's pass (ours): ``momentum_out`` (aligned with params; not with
    ``init_buffers``) receives the new buffers, ``momentum_buffers`` are only read. ``nonfinite``
    (0-dim fp32) is set to 1 when some unscaled gradient element is NaN/Inf (it is never cleared;
    a step ``found_inf`` skips is not looked at).
    When it is non-zero at the end of the call: params ← backups bitwise and the new buffers ← the
    old ones bitwise (``momentum_out`` ← ``momentum_buffers``; buffers of a first step,
    ``init_buffers``, ← 0; with ``found_inf`` set they are left as they were).
    """
    add_descent_sums(sums, grads, ascent_grads)
    cdt = acc_dtype(params[0].dtype)
    w0 = _up(backups)
    d = _up(grads)
    if grad_scale is not None:
        d = torch._foreach_mul(d, unscale_factor(grad_scale, cdt))
    skipped_before = found_inf  # a skip known before the pass writes nothing at all
    if nonfinite is not None:
        bad = torch.stack([~torch.isfinite(x).all() for x in d]).any() if d else torch.tensor(False)
        bad = bad.to(nonfinite.device)
        if found_inf is not None:  # a step AMP skips is not looked at
            bad = bad & found_inf.eq(0)
        nonfinite.copy_(torch.maximum(nonfinite, bad.to(nonfinite)))
        found_inf = nonfinite if found_inf is None else torch.maximum(found_inf.float(), nonfinite)
    d = [g.neg() if maximize else g.clone() for g in d]
    if weight_decay != 0:
        torch._foreach_add_(d, w0, alpha=weight_decay)
    if momentum != 0:
        if init_buffers:
            bufs = [x.clone() for x in d]
            # what a skipped first step leaves: the buffers as given when skipped from the start, else 0
            zeros = [torch.zeros_like(x) for x in d]
            old = zeros if skipped_before is None else _skip_where(skipped_before, _up(momentum_buffers), zeros)
        else:
            old = _up(momentum_buffers)
            bufs = torch._foreach_mul(old, momentum)
            torch._foreach_add_(bufs, d, alpha=1 - dampening)
        out = momentum_buffers if momentum_out is None else momentum_out
        torch._foreach_copy_(list(out), _skip_where(found_inf, old, bufs))
        # torch continues from the stored (rounded) buffer
        stored = [x.to(momentum_buffers[0].dtype).to(cdt) for x in bufs]
        if nesterov:
            torch._foreach_add_(d, stored, alpha=momentum)
        else:
            d = stored
    if isinstance(lr, torch.Tensor):  # a compiled step's lr: data, not a constant (torch's SGD does the same)
        w = torch._foreach_add(w0, torch._foreach_mul(d, _as_scalar(lr, w0[0], cdt).neg()))
    else:
        w = torch._foreach_add(w0, d, alpha=-lr)
    torch._foreach_copy_(list(params), _skip_where(found_inf, w0, w))


def adamw_restore_step_(params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, *,
                        step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                        maximize: bool, grad_scale: Optional[torch.Tensor] = None,
                        found_inf: Optional[torch.Tensor] = None, ascent_grads: Optional[Tensors] = None,
                        sums: Optional[torch.Tensor] = None) -> None:
    """params ← backups, then exactly torch.optim.AdamW's update; ``step`` is the count after increment.

    ``lr`` may be a 0-dim tensor and ``step`` a list of 0-dim tensors, one per param (a compiled step
    reads them as data): then the bias corrections are per param, computed in float64.

    ``grad_scale`` / ``found_inf``: as :func:`sgd_restore_step_` (a skipped step leaves params at
    the backups and both moments unchanged; the caller keeps the step count). ``sums`` /
    ``ascent_grads``: telemetry, see :func:`add_descent_sums`.
    """
    add_descent_sums(sums, grads, ascent_grads)
    cdt = acc_dtype(params[0].dtype)
    w0 = _up(backups)
    g = _up(grads)
    if grad_scale is not None:
        g = torch._foreach_mul(g, unscale_factor(grad_scale, cdt))
    g = [x.neg() if maximize else x for x in g]
    m0 = [x.clone() for x in _up(exp_avgs)]
    v0 = [x.clone() for x in _up(exp_avg_sqs)]
    lr = _as_scalar(lr, w0[0], cdt)
    w = torch._foreach_mul(w0, 1 - lr * weight_decay)
    m = [x.clone() for x in m0]
    v = torch._foreach_mul(v0, beta2)
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    if isinstance(lr, torch.Tensor) or isinstance(step, (list, tuple)):
        steps = step if isinstance(step, (list, tuple)) else [torch.tensor(float(step))] * len(w)
        for wi, mi, vi, si in zip(w, m, v, steps):
            si = si.to(device=wi.device, dtype=torch.float64)
            bc1, bc2_sqrt = (1 - beta1 ** si).to(cdt), (1 - beta2 ** si).sqrt().to(cdt)
            wi.add_(mi / (vi.sqrt() / bc2_sqrt + eps) * (-lr / bc1))
    else:
        _adamw_update_(w, m, v, step, lr, beta1, beta2, eps)
    torch._foreach_copy_(list(exp_avgs), _skip_where(found_inf, m0, m))
    torch._foreach_copy_(list(exp_avg_sqs), _skip_where(found_inf, v0, v))
    torch._foreach_copy_(list(params), _skip_where(found_inf, w0, w))


def _adamw_update_(w: list, m: list, v: list, step: int, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """w += −lr/(1 − beta1^step) · m/(sqrt(v)/sqrt(1 − beta2^step) + eps), as torch.optim.AdamW (foreach)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(w, m, denom, -lr / bias_correction1)


# --------------------------------------------------------------------------- variants' element-wise ops

def renormalize_(grads: Tensors, ref_sq_norm: torch.Tensor, sq_norm: torch.Tensor, eps: float) -> None:
    """g ← g·sqrt(ref)/(sqrt(sq_norm)+eps) (Stable SAM); both norms global, given."""
    cdt = acc_dtype(grads[0].dtype)
    ratio = ref_sq_norm.to(cdt).sqrt() / (sq_norm.to(cdt).sqrt() + eps)
    g = _up(grads)
    torch._foreach_mul_(g, ratio)
    _store_(grads, g)


def fisher_accumulate_(fisher: Tensors, grads: Tensors, scale: float) -> None:
    """fisher += scale·g²."""
    f = _up(fisher)
    g = _up(grads)
    torch._foreach_addcmul_(f, g, g, value=scale)
    _store_(fisher, f)


def looksam_store_(g_v: Tensors, grads: Tensors, sam_grads: Tensors, gs_dot_g: torch.Tensor, g_sq_norm: torch.Tensor,
                   eps: float) -> None:
    """g_v ← g_s − (⟨g, g_s⟩/(‖g‖² + eps))·g, with the global dot and norm given."""
    cdt = acc_dtype(grads[0].dtype)
    coef = gs_dot_g.to(cdt) / (g_sq_norm.to(cdt) + eps)
    out = _up(sam_grads)
    out = [x.clone() for x in out] if out[0] is sam_grads[0] else out
    torch._foreach_sub_(out, torch._foreach_mul(_up(grads), coef))
    torch._foreach_copy_(list(g_v), out)


def looksam_apply_(grads: Tensors, g_v: Tensors, alpha: float, g_sq_norm: torch.Tensor, gv_sq_norm: torch.Tensor,
                   eps: float) -> None:
    """g ← g + alpha·(‖g‖/(‖g_v‖ + eps))·g_v, with both global norms given."""
    cdt = acc_dtype(grads[0].dtype)
    coef = alpha * g_sq_norm.to(cdt).sqrt() / (gv_sq_norm.to(cdt).sqrt() + eps)
    g = _up(grads)
    torch._foreach_add_(g, torch._foreach_mul(_up(g_v), coef))
    _store_(grads, g)


def mix_(grads: Tensors, others: Tensors, a: torch.Tensor, b: torch.Tensor) -> None:
    """g ← a·g + b·o with the 0-dim factors given (GSAM's surrogate-gap descent, WSAM's mixes)."""
    cdt = acc_dtype(grads[0].dtype)
    out = torch._foreach_mul(_up(grads), a.to(cdt))
    torch._foreach_add_(out, torch._foreach_mul(_up(others), b.to(cdt)))
    torch._foreach_copy_(list(grads), out)


def centralize_(grads: Tensors) -> None:
    """g ← g − mean(g over dims 1..) for every tensor with more than one dimension: each row of dim 0
    centred on its own mean (gradient centralization, Yong et al., ECCV 2020); tensors of one
    dimension (and zero-size ones) unchanged. Mean and difference in the compute dtype, rounded once.
    Complex tensors are centred on their complex mean (real and imaginary parts each on theirs)."""
    for g in grads:
        if g.dim() < 2 or g.numel() == 0:
            continue
        dims = tuple(range(1, g.dim()))
        if g.dtype in _LOW_PRECISION:
            x = g.float()
            g.copy_(x - x.mean(dim=dims, keepdim=True))
        else:
            g.sub_(g.mean(dim=dims, keepdim=True))


# --------------------------------------------------------------------------- bSAM

def bsam_noise_(params: Tensors, backups: Tensors, s: Tensors, noise: Tensors, num_data: float) -> None:
    """backups ← w; w ← w + z / sqrt(N·s), with z = ``noise`` (drawn by the caller) and N = ``num_data``
    (bSAM's noisy sample: the official code's ``mu + sqrt(1/(Ndata*s)) * n``)."""
    torch._foreach_copy_(list(backups), list(params))
    sigma = torch._foreach_reciprocal(torch._foreach_sqrt(torch._foreach_mul(_up(s), num_data)))
    torch._foreach_copy_(list(params), torch._foreach_addcmul(_up(params), _up(noise), sigma))


def bsam_ascent_(params: Tensors, backups: Tensors, grads: Tensors, s: Tensors, s_next: Tensors, *, rho: float,
                 beta2: float, damping: float, weight_decay: float, perturb: bool,
                 grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """With g the noisy-sample gradient (``grads / grad_scale`` when given, as :func:`sgd_restore_step_`):

        w      ← backup + rho · g / s            (backup, bitwise, when not ``perturb`` or ``found_inf`` ≠ 0)
        s_next ← beta2 · s + (1 − beta2) · (sqrt(s)·|g| + damping + weight_decay)

    (bSAM's first step and variance update, the official code's). s_next is written whatever
    ``found_inf``: a skipped step never reads it (:func:`bsam_descent_` sets it to s)."""
    cdt = acc_dtype(params[0].dtype)
    g = _up(grads)
    if grad_scale is not None:
        g = torch._foreach_mul(g, unscale_factor(grad_scale, cdt))
    sv = _up(s)
    spread = torch._foreach_mul(torch._foreach_sqrt(sv), torch._foreach_abs(g))
    torch._foreach_add_(spread, damping + weight_decay)
    s_new = torch._foreach_mul(sv, beta2)
    torch._foreach_add_(s_new, spread, alpha=1 - beta2)
    b = _up(backups)
    w = b
    if perturb:
        e = torch._foreach_div(g, sv)
        torch._foreach_mul_(e, _as_scalar(rho, b[0], cdt))
        w = _skip_where(found_inf, b, torch._foreach_add(b, e))
    torch._foreach_copy_(list(s_next), s_new)
    torch._foreach_copy_(list(params), w)


def bsam_descent_(params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors, s: Tensors, s_next: Tensors,
                  *, lr: float, beta1: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                  found_inf: Optional[torch.Tensor] = None) -> None:
    """params ← backups, then bSAM's descent with g = ``grads / grad_scale`` (the perturbed-point gradient):

        m ← beta1 · m + (1 − beta1) · (g + weight_decay · w);   w ← w − lr · m / s

    (the official code's; no weight-decay term at all when ``weight_decay`` is 0). A non-zero
    ``found_inf`` skips the step: params end bitwise at the backups, m unchanged, and s_next ← s, so
    that the caller's swap of the s and s_next buffers keeps s; s_next is not written otherwise."""
    cdt = acc_dtype(params[0].dtype)
    w0 = _up(backups)
    g = _up(grads)
    if grad_scale is not None:
        g = torch._foreach_mul(g, unscale_factor(grad_scale, cdt))
    m0 = _up(exp_avgs)
    m = torch._foreach_mul(m0, beta1)
    torch._foreach_add_(m, g, alpha=1 - beta1)
    if weight_decay != 0:
        torch._foreach_add_(m, w0, alpha=(1 - beta1) * weight_decay)
    if isinstance(lr, torch.Tensor):  # a compiled step's lr: data, not a constant
        w = torch._foreach_add(w0, torch._foreach_mul(torch._foreach_div(m, _up(s)), _as_scalar(lr, w0[0], cdt).neg()))
    else:
        w = torch._foreach_addcdiv(w0, m, _up(s), value=-lr)
    if found_inf is not None:
        torch._foreach_copy_(list(s_next), _skip_where(found_inf, _up(s), _up(s_next)))
    torch._foreach_copy_(list(exp_avgs), _skip_where(found_inf, m0, m))
    torch._foreach_copy_(list(params), _skip_where(found_inf, w0, w))


def ema_update_(emas: Tensors, grads: Tensors, directions: Optional[Tensors], weight: float, sigma: float,
                grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """directions ← g − sigma·S·m (m before its update; only when ``directions`` is given) and
    m ← m + weight·(g/S − m), in one pass (Friendly-SAM's d and m; VaSSO's EMA without directions).

    ``grad_scale``: the loss scale S the grads carry (0-dim fp32; 1 when absent); 1/S is an fp32
    reciprocal (:func:`unscale_factor`) and the directions keep the scale (c = sigma·S). A non-zero
    ``found_inf`` leaves every m unchanged (an overflowed g is selected away, never multiplied by
    0); the directions are written either way. weight = 1, sigma = 0 on a zero m gives m ← g/S, d ← g
    (a first observation).
    """
    cdt = acc_dtype(emas[0].dtype)
    m0 = _up(emas)
    g = _up(grads)
    if directions is not None:
        c = sigma if grad_scale is None else grad_scale.to(cdt) * sigma
        torch._foreach_copy_(list(directions), torch._foreach_sub(g, torch._foreach_mul(m0, c)))
    x = g if grad_scale is None else torch._foreach_mul(g, unscale_factor(grad_scale, cdt))
    t = torch._foreach_sub(x, m0)
    torch._foreach_mul_(t, weight)
    torch._foreach_copy_(list(emas), _skip_where(found_inf, m0, torch._foreach_add(m0, t)))


# --------------------------------------------------------------------------- masks

def topk_mask(scores: Tensors, k: int) -> list[torch.Tensor]:
    """Bool masks keeping exactly the ``k`` largest scores over all tensors.

    Ties go to the lower position in the concatenation of the flattened tensors (list order,
    then row-major), so the result is deterministic. NaN scores rank lowest.
    """
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores])
    flat = torch.nan_to_num(flat, nan=-float("inf"))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:k]] = True
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def nm_groups(t: torch.Tensor) -> torch.Tensor:
    """2-D (rows, reduction) view used for N:M grouping: Linear (out, in); conv (out, in·kh·kw); 1-D one row."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def nm_mask(scores: Tensors, n: int, m: int) -> list[torch.Tensor]:
    """Bool masks keeping the ``n`` largest of every ``m`` consecutive entries along the reduction dim.

    A trailing partial group of r < m entries keeps its min(n, r) largest. Ties go to the lower index.
    """
    out = []
    for s in scores:
        # nan_to_num BEFORE padding: NaN -> -inf ranks with the padding, behind every real entry
        # but ahead of the padding by position, so a partial group still keeps min(n, r) entries.
        rows = torch.nan_to_num(nm_groups(s.detach()).to(torch.float64), nan=-float("inf"))
        cols = rows.shape[1]
        pad = (-cols) % m
        padded = torch.nn.functional.pad(rows, (0, pad), value=-float("inf"))
        groups = padded.reshape(rows.shape[0], -1, m)
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., :n], True)
        keep = keep.reshape(rows.shape[0], -1)[:, :cols]
        out.append(keep.reshape(s.shape))
    return out
