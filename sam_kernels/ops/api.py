"""Public ops: argument checks, (device, dtype) grouping, global reductions, backend dispatch.

Every op takes Python lists of tensors. Entries are grouped by (device, dtype, contiguity); each
group goes to the backend chosen by :mod:`dispatch`; reductions across groups are summed on the
first tensor's device. Zero-size tensors are skipped. Nothing here reads tensor data on the host.
"""
from __future__ import annotations

import math
from collections import defaultdict
from operator import attrgetter, methodcaller
from typing import Optional, Sequence

import torch

from . import dispatch
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
    if not isinstance(primary, (list, tuple)):
        raise TypeError(f"{op}: expected a list of tensors, got {type(primary).__name__}")
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


def _run(op: str, device: torch.device, contiguous: bool, backend: Optional[str]):
    name, fn = dispatch.resolve(op, device.type, backend, contiguous)
    dispatch.last_used[op] = name
    return fn


def _sum_on(parts: list[torch.Tensor], primary: Tensors) -> torch.Tensor:
    """Sum group partial results on the first tensor's device (fp32 unless everything is fp64)."""
    if not primary:
        raise ValueError("cannot reduce an empty list of tensors")
    device = primary[0].device
    dtype = torch.float64 if all(t.dtype == torch.float64 for t in primary) else torch.float32
    if not parts:
        return torch.zeros((), dtype=dtype, device=device)
    if len(parts) == 1:
        return parts[0].to(device=device, dtype=dtype)
    return torch.stack([p.to(device=device, dtype=dtype) for p in parts]).sum()


# --------------------------------------------------------------------------- reductions

def grad_sq_norm(grads: Tensors, *, params: Optional[Tensors] = None, masks: Optional[Tensors] = None,
                 eta: float = 0.01, backend: Optional[str] = None) -> torch.Tensor:
    """Σ over all tensors of (m ⊙ T ⊙ g)², T = |w| + eta when ``params`` is given (ASAM), else 1.

    Returns a 0-dim fp32 tensor (fp64 if every grad is fp64) on the first grad's device, computed
    in a fixed order (deterministic) without synchronizing with the host.
    """
    _check_lists("grad_sq_norm", grads, params=params, masks=masks)
    parts = []
    for device, contiguous, idx in _groups(grads, params, masks):
        fn = _run("grad_sq_norm", device, contiguous, backend)
        parts.append(fn(_pick(grads, idx), _pick(params, idx), _pick(masks, idx), float(eta)))
    return _sum_on(parts, grads)


def dot(a: Tensors, b: Tensors, *, backend: Optional[str] = None) -> torch.Tensor:
    """Σ_i ⟨a_i, b_i⟩ over all tensors, as a 0-dim fp32 tensor (fp64 if all inputs are fp64)."""
    _check_lists("dot", a, b=b)
    parts = []
    for device, contiguous, idx in _groups(a, b):
        parts.append(_run("dot", device, contiguous, backend)(_pick(a, idx), _pick(b, idx)))
    return _sum_on(parts, a)


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
    _check_lists("perturb_", params, grads=grads, backups=backups, masks=masks)
    if keep_prob is not None and not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"perturb_: keep_prob must be in (0, 1], got {keep_prob}")
    keep = 1.0 if keep_prob is None else float(keep_prob)
    if keep < 1.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU generator: no device sync
    keys = [tensor_key(seed, i) for i in range(len(params))] if keep < 1.0 else [0] * len(params)
    if sq_norm is None:
        sq_norm = grad_sq_norm(grads, params=params if adaptive else None, eta=eta, backend=backend)
    for device, contiguous, idx in _groups(params, grads, backups, masks):
        fn = _run("perturb_", device, contiguous, backend)
        fn(_pick(params, idx), _pick(grads, idx), _pick(backups, idx), sq_norm.to(device), float(rho), float(eps),
           _pick(masks, idx), bool(adaptive), float(eta), keep, _pick(keys, idx))


def restore_(params: Tensors, backups: Tensors, *, backend: Optional[str] = None) -> None:
    """params ← backups, bitwise."""
    _check_lists("restore_", params, backups=backups)
    for device, contiguous, idx in _groups(params, backups):
        _run("restore_", device, contiguous, backend)(_pick(params, idx), _pick(backups, idx))


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
    n = len(params)
    bufs: list[Optional[torch.Tensor]] = list(momentum_buffers) if momentum_buffers is not None else [None] * n
    if len(bufs) != n:
        raise ValueError(f"sgd_restore_step_: {len(bufs)} momentum buffers for {n} params")
    if momentum == 0:
        bufs = [None] * n
    fresh = [momentum != 0 and b is None for b in bufs]
    bufs = [torch.empty_like(p, memory_format=torch.contiguous_format) if f else b for p, b, f in zip(params, bufs, fresh)]
    _check_lists("sgd_restore_step_", params, backups=backups, grads=grads,
                 momentum_buffers=bufs if momentum != 0 else None)
    kw = dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening), weight_decay=float(weight_decay),
              nesterov=bool(nesterov), maximize=bool(maximize))
    for init in (False, True):
        sel = [i for i in range(n) if fresh[i] == init]
        if not sel:
            continue
        sub_b = _pick(bufs, sel) if momentum != 0 else None
        for device, contiguous, idx in _groups(_pick(params, sel), _pick(backups, sel), _pick(grads, sel), sub_b):
            fn = _run("sgd_restore_step_", device, contiguous, backend)
            ids = [sel[i] for i in idx]
            fn(_pick(params, ids), _pick(backups, ids), _pick(grads, ids), _pick(bufs, ids) if momentum != 0 else None,
               init_buffers=init, **kw)
    return bufs


def adamw_restore_step_(params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                        step: int, *, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 1e-2, maximize: bool = False, backend: Optional[str] = None) -> None:
    """params ← backups, then torch.optim.AdamW's update (``step`` counted after its increment)."""
    _check_lists("adamw_restore_step_", params, backups=backups, grads=grads, exp_avgs=exp_avgs,
                 exp_avg_sqs=exp_avg_sqs)
    if step < 1:
        raise ValueError(f"adamw_restore_step_: step must be >= 1 (count after increment), got {step}")
    kw = dict(step=int(step), lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
              weight_decay=float(weight_decay), maximize=bool(maximize))
    for device, contiguous, idx in _groups(params, backups, grads, exp_avgs, exp_avg_sqs):
        fn = _run("adamw_restore_step_", device, contiguous, backend)
        fn(_pick(params, idx), _pick(backups, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
           **kw)


# --------------------------------------------------------------------------- variants' element-wise ops

def renormalize_(grads: Tensors, ref_sq_norm: torch.Tensor, *, eps: float = 1e-12,
                 backend: Optional[str] = None) -> torch.Tensor:
    """g ← g·sqrt(ref)/(sqrt(‖g‖²) + eps) with ‖g‖ global over the list (Stable SAM).

    Returns the squared norm of the grads before rescaling (device tensor).
    """
    _check_lists("renormalize_", grads)
    sq = grad_sq_norm(grads, backend=backend)
    for device, contiguous, idx in _groups(grads):
        fn = _run("renormalize_", device, contiguous, backend)
        fn(_pick(grads, idx), ref_sq_norm.to(device), sq.to(device), float(eps))
    return sq


def fisher_accumulate_(fisher: Tensors, grads: Tensors, *, scale: float = 1.0, backend: Optional[str] = None) -> None:
    """fisher += scale·g² (empirical Fisher from per-sample or micro-batch gradients)."""
    _check_lists("fisher_accumulate_", fisher, grads=grads)
    for device, contiguous, idx in _groups(fisher, grads):
        _run("fisher_accumulate_", device, contiguous, backend)(_pick(fisher, idx), _pick(grads, idx), float(scale))


def looksam_store_(g_v: Tensors, grads: Tensors, sam_grads: Tensors, *, eps: float = 1e-12,
                   backend: Optional[str] = None) -> None:
    """g_v ← g_s − (⟨g, g_s⟩/‖g‖²)·g with the dot and norm global over all tensors (LookSAM)."""
    _check_lists("looksam_store_", g_v, grads=grads, sam_grads=sam_grads)
    d = dot(grads, sam_grads, backend=backend)
    sq = grad_sq_norm(grads, backend=backend)
    for device, contiguous, idx in _groups(g_v, grads, sam_grads):
        fn = _run("looksam_store_", device, contiguous, backend)
        fn(_pick(g_v, idx), _pick(grads, idx), _pick(sam_grads, idx), d.to(device), sq.to(device), float(eps))


def looksam_apply_(grads: Tensors, g_v: Tensors, alpha: float, *, eps: float = 1e-12,
                   backend: Optional[str] = None) -> None:
    """g ← g + alpha·(‖g‖/‖g_v‖)·g_v with both norms global over all tensors (LookSAM reuse step)."""
    _check_lists("looksam_apply_", grads, g_v=g_v)
    g_sq = grad_sq_norm(grads, backend=backend)
    gv_sq = grad_sq_norm(g_v, backend=backend)
    for device, contiguous, idx in _groups(grads, g_v):
        fn = _run("looksam_apply_", device, contiguous, backend)
        fn(_pick(grads, idx), _pick(g_v, idx), float(alpha), g_sq.to(device), gv_sq.to(device), float(eps))


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
