"""Public ops: argument checks, (device, dtype) grouping, global reductions, backend dispatch.

Every op takes Python lists of tensors. Entries are grouped by (device, dtype, contiguity); each
group goes to the backend chosen by :mod:`dispatch`; reductions across groups are summed on the
first tensor's device. Zero-size tensors are skipped. Nothing here reads tensor data on the host.
"""
from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from operator import attrgetter, methodcaller
from typing import Any, Callable, Optional, Sequence

import torch

from . import dispatch
from .dtensor import all_reduce_partial
from .reference import tensor_key

Tensors = Sequence[torch.Tensor]
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


_layout = attrgetter("layout")
_dtype = attrgetter("dtype")
_device = attrgetter("device")
_shape = attrgetter("shape")
_contig = methodcaller("is_contiguous")
_numel = methodcaller("numel")


def _check_lists(op: str, primary: Tensors, **others: Optional[Tensors]) -> None:
    """Validate aligned lists: same length, same shapes, same device; float/bool dtypes; dense.

    The common valid case is checked with whole-list attribute comparisons (this runs on every
    optimizer step, hundreds of tensors per list); any failure reruns the per-entry checks to
    produce a precise message.
    """
    _require_list(op, primary)
    lists = {name: lst for name, lst in others.items() if lst is not None}
    for name, lst in lists.items():
        if not isinstance(lst, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list of tensors, got {type(lst).__name__}")
        if len(lst) != len(primary):
            raise ValueError(f"{op}: {name} has {len(lst)} tensors but the first list has {len(primary)}")
    try:
        dtypes = list(map(_dtype, primary))
        ok = all(lay == torch.strided for lay in map(_layout, primary)) and all(d in _FLOATS for d in dtypes)
        if ok and lists:
            shapes, devices = list(map(_shape, primary)), list(map(_device, primary))
            for name, lst in lists.items():
                want = [torch.bool] * len(lst) if name == "masks" else dtypes
                ok = ok and (list(map(_dtype, lst)) == want and list(map(_shape, lst)) == shapes
                             and list(map(_device, lst)) == devices
                             and all(lay == torch.strided for lay in map(_layout, lst)))
    except AttributeError:  # a non-tensor entry: the slow path names it
        ok = False
    if not ok:
        _explain_bad_lists(op, primary, lists)


def _explain_bad_lists(op: str, primary: Tensors, lists: dict) -> None:
    """Per-entry checks that raise a precise error for the first bad entry."""
    for i, t in enumerate(primary):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: entry {i} is {type(t).__name__}, not a tensor (drop parameters without grads)")
        if t.layout != torch.strided:
            raise TypeError(f"{op}: entry {i} is a {t.layout} tensor; sparse gradients are not supported "
                            f"(use dense gradients, e.g. nn.Embedding(sparse=False))")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: entry {i} has dtype {t.dtype}; supported: float32, float64, float16, bfloat16")
        for name, lst in lists.items():
            o = lst[i]
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is {type(o).__name__}, not a tensor")
            if o.layout != torch.strided:
                raise TypeError(f"{op}: {name}[{i}] is a {o.layout} tensor; sparse tensors are not supported")
            if o.shape != t.shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(o.shape)}, expected {tuple(t.shape)}")
            if o.device != t.device:
                raise ValueError(f"{op}: {name}[{i}] is on {o.device} but entry {i} is on {t.device}")
            if name == "masks":
                if o.dtype != torch.bool:
                    raise TypeError(f"{op}: masks[{i}] has dtype {o.dtype}; masks must be torch.bool")
            elif o.dtype != t.dtype:
                raise TypeError(f"{op}: {name}[{i}] has dtype {o.dtype} but entry {i} has {t.dtype}; "
                                f"keep optimizer buffers in the parameter's dtype")
    raise AssertionError(f"{op}: list check failed without a reason")  # unreachable: fast and slow checks agree


def _groups(primary: Tensors, *others: Optional[Tensors]):
    """Yield (device, contiguous, index list) for each (device, dtype, contiguity) group; skip empty tensors."""
    present = [lst for lst in (primary, *others) if lst is not None]
    contig = [all(c) for c in zip(*(map(_contig, lst) for lst in present))]
    keys = list(zip(map(_device, primary), map(_dtype, primary), contig))
    sizes = list(map(_numel, primary))
    if len(set(keys)) == 1 and all(sizes):  # the usual case: one group, nothing to skip
        device, _dt, contiguous = keys[0]
        yield device, contiguous, list(range(len(primary)))
        return
    buckets: dict = defaultdict(list)
    for i, key in enumerate(keys):
        if sizes[i]:
            buckets[key].append(i)
    for (device, _dt, contiguous), idx in buckets.items():
        yield device, contiguous, idx


def _pick(lst: Optional[Tensors], idx: list[int]) -> Optional[list[torch.Tensor]]:
    return None if lst is None else [lst[i] for i in idx]


def _whole(lst: Optional[Tensors]) -> Optional[Tensors]:
    return lst


def _require_list(op: str, lst: Tensors) -> None:
    if not isinstance(lst, (list, tuple)):
        raise TypeError(f"{op}: expected a list of tensors, got {type(lst).__name__}")


_DEVICE_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None), getattr(torch, "OutOfMemoryError", None))
                       if e is not None)


def _unchecked_fn(op: str, primary: Tensors, backend: Optional[str]) -> Optional[Callable]:
    """The backend function when a backend that checks its own lists would serve the whole call."""
    if not isinstance(primary, list) or not primary or torch.compiler.is_compiling():
        return None
    first = primary[0]
    if not isinstance(first, torch.Tensor):
        return None
    name, fn = dispatch.resolve(op, first.device.type, backend)
    if not dispatch.checks_lists(name):
        return None
    dispatch.last_used[op] = name
    return fn


def _launch(op: str, backend: Optional[str], call: Callable[[Callable, Callable, torch.device], Any],
            primary: Tensors, **lists: Optional[Tensors]) -> list:
    """``call(fn, pick, device)`` once per (device, dtype, contiguity) group of the aligned lists; the results.

    ``pick(lst)`` selects the group's entries of any list aligned with ``primary`` (None stays None);
    ``device`` is the group's, where the op's device scalars (norms, dots) must be.
    Fast path: a backend that checks its lists itself (the compiled ops, which reject a call before
    writing anything) takes them whole, with no per-tensor Python work; that is the common case of
    an optimizer step, run hundreds of times a second. Whatever it rejects (mixed dtypes or devices,
    non-contiguous or invalid entries) comes to the checked path: precise errors, grouping, eager
    for non-contiguous tensors.
    """
    fn = _unchecked_fn(op, primary, backend)
    if fn is not None:
        try:
            return [call(fn, _whole, primary[0].device)]
        except _DEVICE_ERRORS:  # raised by a launch, after work may have run: never retried
            raise
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            pass
    _check_lists(op, primary, **lists)
    return [call(_run(op, device, contiguous, backend), partial(_pick, idx=idx), device)
            for device, contiguous, idx in _groups(primary, *lists.values())]


def _run(op: str, device: torch.device, contiguous: bool, backend: Optional[str]):
    name, fn = dispatch.resolve(op, device.type, backend, contiguous)
    dispatch.last_used[op] = name
    return fn


def _sum_on(parts: list[torch.Tensor], primary: Tensors) -> torch.Tensor:
    """Sum group partial results on the first tensor's device (fp32 unless everything is fp64)."""
    if not primary:
        raise ValueError("cannot reduce an empty list of tensors")
    if len(parts) == 1 and parts[0].device == primary[0].device and (
            parts[0].dtype == torch.float32 or all(t.dtype == torch.float64 for t in primary)):
        return parts[0]  # one group (the usual case), already in the contract's dtype
    device = primary[0].device
    dtype = torch.float64 if all(t.dtype == torch.float64 for t in primary) else torch.float32
    if not parts:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.stack([p.to(device=device, dtype=dtype) for p in parts]).sum()


# --------------------------------------------------------------------------- reductions

def grad_sq_norm(grads: Tensors, *, params: Optional[Tensors] = None, masks: Optional[Tensors] = None,
                 eta: float = 0.01, backend: Optional[str] = None) -> torch.Tensor:
    """Σ over all tensors of (m ⊙ T ⊙ g)², T = |w| + eta when ``params`` is given (ASAM), else 1.

    Returns a 0-dim fp32 tensor (fp64 if every grad is fp64) on the first grad's device, computed
    in a fixed order (deterministic) without synchronizing with the host.
    """
    eta = float(eta)
    parts = _launch("grad_sq_norm", backend, lambda fn, pick, _: fn(pick(grads), pick(params), pick(masks), eta),
                    grads, params=params, masks=masks)
    return all_reduce_partial(_sum_on(parts, grads))  # DTensor shards: summed over the mesh (ops/dtensor.py)


def dot(a: Tensors, b: Tensors, *, backend: Optional[str] = None) -> torch.Tensor:
    """Σ_i ⟨a_i, b_i⟩ over all tensors, as a 0-dim fp32 tensor (fp64 if all inputs are fp64)."""
    return all_reduce_partial(_sum_on(_launch("dot", backend, lambda fn, pick, _: fn(pick(a), pick(b)), a, b=b), a))


# --------------------------------------------------------------------------- perturb / restore

def perturb_(params: Tensors, grads: Tensors, backups: Tensors, rho: float, *, sq_norm: Optional[torch.Tensor] = None,
             masks: Optional[Tensors] = None, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12,
             keep_prob: Optional[float] = None, seed: Optional[int] = None, backend: Optional[str] = None) -> None:
    """backups ← params; params += rho·s·(m ⊙ T² ⊙ g)·keep/keep_prob, s = 1/(sqrt(sq_norm) + eps).

    ``sq_norm`` defaults to the UNMASKED ``grad_sq_norm(grads, params=params if adaptive)`` (Sparse
    SAM's choice, so ‖e‖ ≤ rho); pass ``grad_sq_norm(grads, masks=masks)`` for the masked norm.
    ``keep_prob``: each element joins the perturbation with that probability (counter-based RNG
    keyed by ``seed`` and the tensor's position in ``params``; reproducible, launch-shape free),
    scaled by 1/keep_prob. Entries outside the mask stay bitwise unchanged; a non-finite norm
    leaves every weight unchanged.
    """
    _require_list("perturb_", params)
    if keep_prob is not None and not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"perturb_: keep_prob must be in (0, 1], got {keep_prob}")
    keep = 1.0 if keep_prob is None else float(keep_prob)
    if keep < 1.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU generator: no device sync
    keys = [tensor_key(seed, i) for i in range(len(params))] if keep < 1.0 else [0] * len(params)
    if sq_norm is None:
        sq_norm = grad_sq_norm(grads, params=params if adaptive else None, eta=eta, backend=backend)
    rho, eps, adaptive, eta = float(rho), float(eps), bool(adaptive), float(eta)

    _launch("perturb_", backend,
            lambda fn, pick, device: fn(pick(params), pick(grads), pick(backups), sq_norm.to(device), rho, eps,
                                        pick(masks), adaptive, eta, keep, pick(keys)),
            params, grads=grads, backups=backups, masks=masks)


def restore_(params: Tensors, backups: Tensors, *, backend: Optional[str] = None) -> None:
    """params ← backups, bitwise."""
    _launch("restore_", backend, lambda fn, pick, _: fn(pick(params), pick(backups)), params, backups=backups)


# --------------------------------------------------------------------------- fused restore + base step

def sgd_restore_step_(params: Tensors, backups: Tensors, grads: Tensors,
                      momentum_buffers: Optional[Sequence[Optional[torch.Tensor]]] = None, *, lr: float,
                      momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                      nesterov: bool = False, maximize: bool = False,
                      backend: Optional[str] = None) -> list[Optional[torch.Tensor]]:
    """params ← backups, then torch.optim.SGD's update with ``grads``, in one pass per group.

    ``momentum_buffers[i] is None`` means "first step": a buffer is created (torch semantics:
    buf = d_p). Returns the buffers (all None when momentum is 0), to be kept in the state.
    """
    _require_list("sgd_restore_step_", params)
    n = len(params)
    bufs: list[Optional[torch.Tensor]] = list(momentum_buffers) if momentum_buffers is not None else [None] * n
    if len(bufs) != n:
        raise ValueError(f"sgd_restore_step_: {len(bufs)} momentum buffers for {n} params")
    fresh = [i for i, b in enumerate(bufs) if b is None] if momentum != 0 else []
    if momentum == 0:
        bufs = [None] * n
    elif fresh:
        for i in fresh:
            bufs[i] = torch.empty_like(params[i], memory_format=torch.contiguous_format)
    kw = dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening), weight_decay=float(weight_decay),
              nesterov=bool(nesterov), maximize=bool(maximize))
    has_buffers = momentum != 0
    if not fresh or len(fresh) == n:  # the usual cases: every buffer exists, or none does (first step)
        subsets = [(bool(fresh), None)]
    else:  # two launches: check everything before the first one writes
        _check_lists("sgd_restore_step_", params, backups=backups, grads=grads, momentum_buffers=bufs)
        new = set(fresh)
        subsets = [(False, [i for i in range(n) if i not in new]), (True, fresh)]
    for init, sel in subsets:
        ps, bs, gs, ms = (params, backups, grads, bufs) if sel is None else (
            _pick(params, sel), _pick(backups, sel), _pick(grads, sel), _pick(bufs, sel))
        ms = ms if has_buffers else None
        _launch("sgd_restore_step_", backend,
                lambda fn, pick, _: fn(pick(ps), pick(bs), pick(gs), pick(ms), init_buffers=init, **kw),
                ps, backups=bs, grads=gs, momentum_buffers=ms)
    return bufs


def adamw_restore_step_(params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                        step: int, *, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 1e-2, maximize: bool = False, backend: Optional[str] = None) -> None:
    """params ← backups, then torch.optim.AdamW's update (``step`` counted after its increment)."""
    if step < 1:
        raise ValueError(f"adamw_restore_step_: step must be >= 1 (count after increment), got {step}")
    kw = dict(step=int(step), lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
              weight_decay=float(weight_decay), maximize=bool(maximize))
    _launch("adamw_restore_step_", backend,
            lambda fn, pick, _: fn(pick(params), pick(backups), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), **kw),
            params, backups=backups, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)


# --------------------------------------------------------------------------- variants' element-wise ops

def renormalize_(grads: Tensors, ref_sq_norm: torch.Tensor, *, eps: float = 1e-12,
                 backend: Optional[str] = None) -> torch.Tensor:
    """g ← g·sqrt(ref)/(sqrt(‖g‖²) + eps) with ‖g‖ global over the list (Stable SAM).

    Returns the squared norm of the grads before rescaling (device tensor).
    """
    sq = grad_sq_norm(grads, backend=backend)
    eps = float(eps)
    _launch("renormalize_", backend,
            lambda fn, pick, device: fn(pick(grads), ref_sq_norm.to(device), sq.to(device), eps), grads)
    return sq


def fisher_accumulate_(fisher: Tensors, grads: Tensors, *, scale: float = 1.0, backend: Optional[str] = None) -> None:
    """fisher += scale·g² (empirical Fisher from per-sample or micro-batch gradients)."""
    scale = float(scale)
    _launch("fisher_accumulate_", backend, lambda fn, pick, _: fn(pick(fisher), pick(grads), scale),
            fisher, grads=grads)


def looksam_store_(g_v: Tensors, grads: Tensors, sam_grads: Tensors, *, eps: float = 1e-12,
                   backend: Optional[str] = None) -> None:
    """g_v ← g_s − (⟨g, g_s⟩/‖g‖²)·g with the dot and norm global over all tensors (LookSAM)."""
    d = dot(grads, sam_grads, backend=backend)
    sq = grad_sq_norm(grads, backend=backend)
    eps = float(eps)
    _launch("looksam_store_", backend,
            lambda fn, pick, device: fn(pick(g_v), pick(grads), pick(sam_grads), d.to(device), sq.to(device), eps),
            g_v, grads=grads, sam_grads=sam_grads)


def looksam_apply_(grads: Tensors, g_v: Tensors, alpha: float, *, eps: float = 1e-12,
                   backend: Optional[str] = None) -> None:
    """g ← g + alpha·(‖g‖/‖g_v‖)·g_v with both norms global over all tensors (LookSAM reuse step)."""
    g_sq = grad_sq_norm(grads, backend=backend)
    gv_sq = grad_sq_norm(g_v, backend=backend)
    alpha, eps = float(alpha), float(eps)
    _launch("looksam_apply_", backend,
            lambda fn, pick, device: fn(pick(grads), pick(g_v), alpha, g_sq.to(device), gv_sq.to(device), eps),
            grads, g_v=g_v)


# --------------------------------------------------------------------------- masks

def _single_device(op: str, scores: Tensors) -> torch.device:
    _check_lists(op, scores)
    devices = {s.device for s in scores}
    if len(devices) > 1:
        raise ValueError(f"{op}: scores span devices {sorted(map(str, devices))}; move them to one device")
    if not scores:
        raise ValueError(f"{op}: empty list of scores")
    return scores[0].device


def topk_mask(scores: Tensors, density: float, *, backend: Optional[str] = None) -> list[torch.Tensor]:
    """Global unstructured mask: keep exactly int(N·density) of the N scores, the largest over all tensors.

    Ties go to the earlier entry (list order, then row-major); NaN ranks lowest. Returns bool tensors.
    """
    device = _single_device("topk_mask", scores)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"topk_mask: density must be in [0, 1], got {density}")
    total = sum(s.numel() for s in scores)
    k = min(total, int(math.floor(total * density + 1e-9)))
    contiguous = all(s.is_contiguous() for s in scores)
    return _run("topk_mask", device, contiguous, backend)(list(scores), k)


def nm_mask(scores: Tensors, n: int, m: int, *, backend: Optional[str] = None) -> list[torch.Tensor]:
    """N:M mask: in each group of ``m`` consecutive entries along the reduction dimension keep the ``n`` largest.

    Linear weights (out, in) group along ``in``; conv weights (out, in, kh, kw) along in·kh·kw; 1-D
    tensors along their length. A trailing partial group of r < m entries keeps min(n, r).
    """
    device = _single_device("nm_mask", scores)
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
        raise ValueError(f"nm_mask: need integers 0 <= n <= m, m >= 1; got n={n}, m={m}")
    contiguous = all(s.is_contiguous() for s in scores)
    return _run("nm_mask", device, contiguous, backend)(list(scores), n, m)
