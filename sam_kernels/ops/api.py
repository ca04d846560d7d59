"""Public ops: argument checks, grouping, global reductions, backend dispatch, dispatch records.

Every op takes Python lists of tensors. Complex tensors take part through ``torch.view_as_real``
(real and imaginary parts as two floats, as torch's optimizers treat them). Entries are grouped
by (device, dtype, layout agreement); each group goes to the backend chosen by :mod:`dispatch`;
reductions across groups are summed on the first tensor's device. Zero-size tensors are skipped.
Nothing here reads tensor data on the host.

Layouts: the compiled kernels walk every tensor as flat storage, so they take any non-overlapping
and dense tensors (contiguous, channels_last, channels_last_3d, permuted) as long as entry i of
every list has the same memory order (strides equal on every dim of size > 1). An entry whose
lists disagree (a gradient in another memory format than its parameter, an overlapping or gapped
view) runs eagerly on its own: that tensor only, not its group; the op's :class:`dispatch.Record`
counts it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch

from . import dispatch, overlap
from .dtensor import all_reduce_partial, reduce_groups
from .reference import tensor_key

Tensors = Sequence[torch.Tensor]
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_numel = torch.Tensor.numel




def memory_order(t: torch.Tensor) -> Optional[tuple]:
    """The strides of ``t``'s dims of size > 1 when ``t`` is non-overlapping and dense (its elements
    fill ``numel`` consecutive storage slots), else None. Two same-shape tensors with equal keys put
    every element at the same offset from their data pointers (the check of csrc/common.h)."""
    kept = [(st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1]
    expected = 1
    for st, sz in sorted(kept):
        if st != expected:
            return None
        expected *= sz
    return tuple(st for st, _ in kept)


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
        dtypes = [t.dtype for t in primary]
        ok = all(t.layout == torch.strided for t in primary) and all(d in _FLOATS for d in dtypes)
        if ok and lists:
            shapes, devices = [t.shape for t in primary], [t.device for t in primary]
            for name, lst in lists.items():
                want = [torch.bool] * len(lst) if name == "masks" else dtypes
                ok = ok and ([t.dtype for t in lst] == want and [t.shape for t in lst] == shapes
                             and [t.device for t in lst] == devices
                             and all(t.layout == torch.strided for t in lst))
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
            raise TypeError(f"{op}: entry {i} has dtype {t.dtype}; supported: float32, float64, float16, bfloat16 and their complex types")
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


def _groups(primary: Tensors, lists: list[Tensors]):
    """Yield (device, dtype, fusable, index list) per (device, dtype, layout agreement); skip empty tensors.

    ``fusable``: every list's entry has the primary entry's dense memory order (:func:`memory_order`).
    """
    present = [primary, *lists]
    contig = [all(c) for c in zip(*([t.is_contiguous() for t in lst] for lst in present))]
    sizes = [t.numel() for t in primary]
    if all(contig):
        fusable = contig
    else:  # per entry, only where some list is not contiguous
        fusable = [c or _agree([lst[i] for lst in present]) for i, c in enumerate(contig)]
    keys = list(zip([t.device for t in primary], [t.dtype for t in primary], fusable))
    if len(set(keys)) == 1 and all(sizes):  # the usual case: one group, nothing to skip
        yield (*keys[0], list(range(len(primary))))
        return
    buckets: dict = defaultdict(list)
    for i, key in enumerate(keys):
        if sizes[i]:
            buckets[key].append(i)
    for key, idx in buckets.items():
        yield (*key, idx)


def _agree(entries: list[torch.Tensor]) -> bool:
    order = memory_order(entries[0])
    return order is not None and all(memory_order(t) == order for t in entries[1:])


def _pick(lst: Optional[Tensors], idx: list[int]) -> Optional[list[torch.Tensor]]:
    return None if lst is None else [lst[i] for i in idx]


def _whole(lst: Optional[Tensors]) -> Optional[Tensors]:
    return lst


def _as_real(primary: Tensors, lists: dict) -> tuple[Tensors, dict, dict]:
    """Complex entries as ``torch.view_as_real`` views (a mask of a complex entry is broadcast over
    the real/imaginary pair); (primary, lists, {id(original list): converted list})."""
    cplx = [isinstance(t, torch.Tensor) and t.is_complex() for t in primary]
    if not any(cplx):
        return primary, lists, {}

    def real(lst, masks=False):
        if masks:
            return [m.unsqueeze(-1).expand(*m.shape, 2) if c and isinstance(m, torch.Tensor) else m
                    for m, c in zip(lst, cplx)]
        return [torch.view_as_real(t) if isinstance(t, torch.Tensor) and t.is_complex() else t for t in lst]

    converted = {id(primary): real(primary)}
    out = {}
    for name, lst in lists.items():
        if lst is None or not isinstance(lst, (list, tuple)) or len(lst) != len(primary):
            out[name] = lst  # _check_lists names the problem
            continue
        converted[id(lst)] = out[name] = real(lst, masks=name == "masks")
    return converted[id(primary)], out, converted


def _require_list(op: str, lst: Tensors) -> None:
    if not isinstance(lst, (list, tuple)):
        raise TypeError(f"{op}: expected a list of tensors, got {type(lst).__name__}")


_DEVICE_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None), getattr(torch, "OutOfMemoryError", None))
                       if e is not None)


def _unchecked_fn(op: str, primary: Tensors, backend: Optional[str]) -> Optional[tuple[str, Callable]]:
    """(name, function) of the backend when one that checks its own lists would serve the whole call."""
    if not isinstance(primary, list) or not primary or torch.compiler.is_compiling():
        return None
    first = primary[0]
    if not isinstance(first, torch.Tensor):
        return None
    name, fn, _ = dispatch.resolve(op, first.device.type, backend)
    if not dispatch.checks_lists(name):
        return None
    return name, fn


def _launch(op: str, backend: Optional[str], call: Callable[[Callable, Callable, torch.device], Any],
            primary: Tensors, extra_lists: int = 0, **lists: Optional[Tensors]) -> list:
    """``call(fn, pick, device)`` once per group of the aligned lists; the results.

    ``pick(lst)`` selects the group's entries of any list aligned with ``primary`` (None stays None;
    complex entries of the tensor lists given here come as real views); ``device`` is the group's,
    where the op's device scalars (norms, dots) must be.
    Fast path: a backend that checks its lists itself (the compiled ops, which reject a call before
    writing anything) takes them whole, with no per-tensor Python work; that is the common case of
    an optimizer step, run hundreds of times a second. Whatever it rejects (mixed dtypes or devices,
    complex entries, layouts that differ between the lists, invalid entries) comes to the checked
    path: precise errors, grouping, eager for the entries whose layouts differ. Every call leaves a
    :class:`dispatch.Record`. Memory shared between entries (:mod:`.overlap`) is refused by the
    compiled ops themselves; the checked path looks for it before any backend writes.
    """
    fast = _unchecked_fn(op, primary, backend)
    if fast is not None:
        name, fn = fast
        try:
            out = [call(fn, _whole, primary[0].device)]
        except _DEVICE_ERRORS:  # raised by a launch, after work may have run: never retried
            raise
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            pass
        else:
            dispatch.record(op, [dispatch.Part(name, primary[0].device.type, str(primary[0].dtype)[6:], len(primary),
                                               sum(map(_numel, primary)))], extra_lists)
            return out
    overlap.check(op, primary, lists)  # before any backend writes
    primary, lists, converted = _as_real(primary, lists)
    _check_lists(op, primary, **lists)
    results, parts = [], []
    for device, dtype, fusable, idx in _groups(primary, [lst for lst in lists.values() if lst is not None]):
        if fusable:
            name, fn, fallback = dispatch.resolve(op, device.type, backend)
        else:
            name, fn, fallback = dispatch.eager(op, backend)
        results.append(call(fn, _picker(idx, converted), device))
        parts.append(dispatch.Part(name, device.type, str(dtype)[6:], len(idx), sum(primary[i].numel() for i in idx),
                                   fallback))
    dispatch.record(op, parts, extra_lists)
    return results


def _picker(idx: list[int], converted: dict) -> Callable:
    if not converted:
        return lambda lst: _pick(lst, idx)
    return lambda lst: None if lst is None else _pick(converted.get(id(lst), lst), idx)


def _run_masks(op: str, scores: Tensors, backend: Optional[str], *args) -> list[torch.Tensor]:
    """A mask op on one device's scores. Masks rank in logical (row-major) order, so every backend
    gets contiguous scores (a copy of the others, once per mask refresh); the masks come back in each
    score's memory layout (``torch.preserve_format``), so masks of channels_last weights stay fused
    in ``perturb_``."""
    device = scores[0].device
    name, fn, fallback = dispatch.resolve(op, device.type, backend)
    contiguous = [s.is_contiguous() for s in scores]
    masks = fn([s if c else s.contiguous() for s, c in zip(scores, contiguous)], *args)
    masks = [m if c else torch.empty_like(s, dtype=torch.bool).copy_(m) for m, s, c in zip(masks, scores, contiguous)]
    dispatch.record(op, [dispatch.Part(name, device.type, str(scores[0].dtype)[6:], len(scores),
                                       sum(s.numel() for s in scores), fallback)])
    return masks


def _sum_on(parts: list[torch.Tensor], primary: Tensors) -> torch.Tensor:
    """Sum group partial results on the first tensor's device (fp32 unless everything is fp64)."""
    if not primary:
        raise ValueError("cannot reduce an empty list of tensors")
    if len(parts) == 1 and parts[0].device == primary[0].device and (
            parts[0].dtype == torch.float32 or all(t.dtype.to_real() == torch.float64 for t in primary)):
        return parts[0]  # one group (the usual case), already in the contract's dtype
    device = primary[0].device
    dtype = torch.float64 if all(t.dtype.to_real() == torch.float64 for t in primary) else torch.float32
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
             keep_prob: Optional[float] = None, seed: Optional[int] = None, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None, perturbation_sq: Optional[torch.Tensor] = None,
             grad_copies: Optional[Tensors] = None, backend: Optional[str] = None) -> None:
    """backups ← params; params += rho·s·(m ⊙ T² ⊙ g)·keep/keep_prob, s = 1/(sqrt(sq_norm) + eps).

    ``sq_norm`` defaults to the UNMASKED ``grad_sq_norm(grads, params=params if adaptive)`` (Sparse
    SAM's choice, so ‖e‖ ≤ rho); pass ``grad_sq_norm(grads, masks=masks)`` for the masked norm.
    ``keep_prob``: each element joins the perturbation with that probability (counter-based RNG
    keyed by ``seed`` and the tensor's position in ``params``; reproducible, launch-shape free),
    scaled by 1/keep_prob. Entries outside the mask stay bitwise unchanged; a non-finite norm
    leaves every weight unchanged.

    AMP (``grad_scale``: 0-dim fp32 device tensor S that the grads carry, as from
    ``torch.amp.GradScaler``; ``sq_norm``, when given, is then the norm of the SCALED grads): e is
    computed from g/S. Ours: S folds into the kernel's scale scalar, since
    rho·(g·S)/(‖g·S‖ + eps·S) = rho·g/(‖g‖ + eps) — the squared norm handed to the kernel is
    (sqrt(sq_norm) + eps·(S − 1))², one device scalar op, no pass over the grads. A non-zero
    ``found_inf`` (0-dim) leaves every weight unchanged, like a non-finite norm.

    Telemetry (ours): ``perturbation_sq`` (a float32/float64 tensor of 1 element, on the params'
    device) gets ‖e‖² as applied ADDED — Σ (w_new − w)² over the stored values, in the pass that
    writes them (exactly 0 from unchanged entries). DTensors: summed over the mesh. ``grad_copies``
    (a list aligned with ``params``, like ``grads``): ← grads, bitwise, in the pass that reads them
    (g(w) kept for telemetry's cosine; every element, whatever the mask, norm or ``found_inf``;
    buffers of their own: sharing memory with params or backups is not checked).
    Raises TypeError/ValueError before writing anything.
    """
    _require_list("perturb_", params)
    applied = _AddInto("perturb_", "perturbation_sq", perturbation_sq, 1)
    if keep_prob is not None and not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"perturb_: keep_prob must be in (0, 1], got {keep_prob}")
    keep = 1.0 if keep_prob is None else float(keep_prob)
    if keep < 1.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU generator: no device sync
    keys = [tensor_key(seed, i) for i in range(len(params))] if keep < 1.0 else [0] * len(params)
    if sq_norm is None:
        sq_norm = grad_sq_norm(grads, params=params if adaptive else None, eta=eta, backend=backend)
    if grad_scale is not None or found_inf is not None:
        sq_norm = amp_sq_norm(sq_norm, grad_scale, found_inf, eps)
    rho, eps, adaptive, eta = float(rho), float(eps), bool(adaptive), float(eta)

    if grad_copies is not None:
        _require_list("perturb_", grad_copies)

    def call(fn, pick, device):
        tele = {}
        if perturbation_sq is not None:
            tele["perturbation_sq"] = applied.on(device)
        if grad_copies is not None:
            tele["grad_copies"] = pick(grad_copies)
        fn(pick(params), pick(grads), pick(backups), sq_norm.to(device), rho, eps, pick(masks), adaptive, eta, keep,
           pick(keys), **tele)

    _launch("perturb_", backend, call, params, int(grad_copies is not None), grads=grads, backups=backups,
            masks=masks, grad_copies=grad_copies)
    applied.finish()


def amp_sq_norm(sq_norm: torch.Tensor, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                eps: float) -> torch.Tensor:
    """The squared norm that makes perturb_'s kernels unscale by ``grad_scale`` and skip on ``found_inf``.

    s = 1/(sqrt(q) + eps) must equal 1/(sqrt(sq_norm) + eps·S): q = (sqrt(sq_norm) + eps·(S − 1))²;
    q = inf when ``found_inf`` is non-zero (a non-finite norm leaves every weight unchanged).
    """
    q = sq_norm
    if grad_scale is not None:
        s = grad_scale.to(device=sq_norm.device, dtype=sq_norm.dtype)
        q = (sq_norm.sqrt() + eps * (s - 1)).square()
    if found_inf is not None:
        q = torch.where(found_inf.to(sq_norm.device).ne(0), torch.full_like(q, float("inf")), q)
    return q


def restore_(params: Tensors, backups: Tensors, *, backend: Optional[str] = None) -> None:
    """params ← backups, bitwise."""
    _launch("restore_", backend, lambda fn, pick, _: fn(pick(params), pick(backups)), params, backups=backups)


# --------------------------------------------------------------------------- fused restore + base step

def _amp_args(grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> dict:
    """The AMP keyword arguments of the fused descents; none at all without AMP (every backend's signature)."""
    out = {}
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            if not (isinstance(t, torch.Tensor) and t.numel() == 1):
                raise TypeError(f"{name} must be a 1-element tensor, got {t!r}")
            out[name] = t.reshape(()).float()
    return out


def _on(scalars: dict, device: torch.device) -> dict:
    """Device scalars moved to a group's device (no copy when already there)."""
    return {k: v.to(device) for k, v in scalars.items()}


class _AddInto:
    """A telemetry output that kernels add into (the descents' ``sums``, perturb_'s
    ``perturbation_sq``), checked before any launch: a contiguous float32/float64 tensor of
    ``numel`` elements. Each group's kernel adds into it directly when it is on the group's device,
    else into a zero temporary added to it at :meth:`finish`; inside a DTensor call every group
    uses a temporary, summed over the mesh first (the local shards' partial sums)."""

    def __init__(self, op: str, name: str, out: Optional[torch.Tensor], numel: int):
        if out is not None and not (isinstance(out, torch.Tensor) and out.numel() == numel and out.dim() <= 1
                                    and out.is_contiguous() and out.dtype in (torch.float32, torch.float64)):
            raise TypeError(f"{op}: {name} must be a contiguous float32/float64 tensor of {numel} element(s), got "
                            f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__} "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        self.out = out
        self.per_device = out is not None and bool(reduce_groups())
        self.temps: dict = {}

    def on(self, device: torch.device) -> Optional[torch.Tensor]:
        """Where a group on ``device`` adds (None without an output)."""
        if self.out is None or (not self.per_device and device == self.out.device):
            return self.out
        t = self.temps.get(device)
        if t is None:
            t = self.temps[device] = torch.zeros_like(self.out, device=device)
        return t

    def finish(self) -> None:
        for t in self.temps.values():
            self.out.add_(all_reduce_partial(t).to(self.out.device))


class _DescentSums(_AddInto):
    """The descents' telemetry arguments (``ascent_grads``, ``sums`` of shape (2,))."""

    def __init__(self, op: str, sums: Optional[torch.Tensor], ascent_grads: Optional[Tensors], n: int):
        if sums is None:
            if ascent_grads is not None:
                raise ValueError(f"{op}: ascent_grads given without sums (where the dot would go)")
        elif isinstance(sums, torch.Tensor) and sums.shape != (2,):
            raise TypeError(f"{op}: sums must have shape (2,), got {tuple(sums.shape)}")
        super().__init__(op, "sums", sums, 2)
        if ascent_grads is not None:
            _require_list(op, ascent_grads)
            if len(ascent_grads) != n:
                raise ValueError(f"{op}: {len(ascent_grads)} ascent_grads for {n} params")

    def kwargs(self, pick: Callable, device: torch.device, ascent_grads: Optional[Tensors]) -> dict:
        """The group's ``ascent_grads`` / ``sums`` keyword arguments (none when telemetry is off);
        ``ascent_grads``: the list aligned with the launch's params."""
        if self.out is None:
            return {}
        kw = {"sums": self.on(device)}
        if ascent_grads is not None:
            kw["ascent_grads"] = pick(ascent_grads)
        return kw


def sgd_restore_step_(params: Tensors, backups: Tensors, grads: Tensors,
                      momentum_buffers: Optional[Sequence[Optional[torch.Tensor]]] = None, *, lr: float,
                      momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                      nesterov: bool = False, maximize: bool = False, grad_scale: Optional[torch.Tensor] = None,
                      found_inf: Optional[torch.Tensor] = None, ascent_grads: Optional[Tensors] = None,
                      sums: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> list[Optional[torch.Tensor]]:
    """params ← backups, then torch.optim.SGD's update with ``grads``, in one pass per group.

    ``momentum_buffers[i] is None`` means "first step": a buffer is created (torch semantics:
    buf = d_p). Returns the buffers (all None when momentum is 0), to be kept in the state.

    AMP, as torch's fused SGD: ``grad_scale`` (0-dim fp32 on the params' device) is the loss scale
    the grads carry and is divided out in the kernel; a non-zero ``found_inf`` (0-dim fp32) skips
    the update on the device: params end bitwise at the backups, buffers unchanged. New buffers
    are then zero-filled (ours: a skipped first step leaves buf = 0, so the next step's
    buf = momentum·0 + (1 − dampening)·d equals torch's first-step buf = d when dampening = 0).

    Telemetry (ours): ``sums`` (float32/float64, shape (2,), on the params' device) gets
    ``[Σ g², Σ ⟨ascent_grads, g⟩]`` ADDED, over the grads as given (an AMP loss scale still in
    them), computed in the same pass that reads g for the update; ``sums[1]`` is left alone
    without ``ascent_grads`` (a list aligned with ``params``: g(w), the first-pass gradients).
    DTensors: summed over the mesh. Raises TypeError/ValueError before writing anything.
    """
    _require_list("sgd_restore_step_", params)
    n = len(params)
    tele = _DescentSums("sgd_restore_step_", sums, ascent_grads, n)
    bufs: list[Optional[torch.Tensor]] = list(momentum_buffers) if momentum_buffers is not None else [None] * n
    if len(bufs) != n:
        raise ValueError(f"sgd_restore_step_: {len(bufs)} momentum buffers for {n} params")
    fresh = [i for i, b in enumerate(bufs) if b is None] if momentum != 0 else []
    if momentum == 0:
        bufs = [None] * n
    elif fresh:
        new = torch.zeros_like if found_inf is not None else torch.empty_like
        for i in fresh:
            bufs[i] = new(params[i], memory_format=torch.preserve_format)
    kw = dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening), weight_decay=float(weight_decay),
              nesterov=bool(nesterov), maximize=bool(maximize))
    amp = _amp_args(grad_scale, found_inf)
    has_buffers = momentum != 0
    if not fresh or len(fresh) == n:  # the usual cases: every buffer exists, or none does (first step)
        subsets = [(bool(fresh), None)]
    else:  # two launches: check everything before the first one writes
        _check_lists("sgd_restore_step_", params, backups=backups, grads=grads, momentum_buffers=bufs,
                     ascent_grads=ascent_grads)
        new = set(fresh)
        subsets = [(False, [i for i in range(n) if i not in new]), (True, fresh)]
    for init, sel in subsets:
        ps, bs, gs, ms, asc = (params, backups, grads, bufs, ascent_grads) if sel is None else (
            _pick(params, sel), _pick(backups, sel), _pick(grads, sel), _pick(bufs, sel), _pick(ascent_grads, sel))
        ms = ms if has_buffers else None
        _launch("sgd_restore_step_", backend,
                lambda fn, pick, device: fn(pick(ps), pick(bs), pick(gs), pick(ms), init_buffers=init, **kw,
                                            **_on(amp, device), **tele.kwargs(pick, device, asc)),
                ps, int(asc is not None), backups=bs, grads=gs, momentum_buffers=ms, ascent_grads=asc)
    tele.finish()
    return bufs


def adamw_restore_step_(params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                        step: int, *, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 1e-2, maximize: bool = False, grad_scale: Optional[torch.Tensor] = None,
                        found_inf: Optional[torch.Tensor] = None, ascent_grads: Optional[Tensors] = None,
                        sums: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """params ← backups, then torch.optim.AdamW's update (``step`` counted after its increment).

    ``grad_scale`` / ``found_inf``: as :func:`sgd_restore_step_`; a skipped step leaves both moments
    unchanged (the caller must not count it in ``step``). ``sums`` / ``ascent_grads``: telemetry, as
    :func:`sgd_restore_step_`.
    """
    _require_list("adamw_restore_step_", params)
    tele = _DescentSums("adamw_restore_step_", sums, ascent_grads, len(params))
    if step < 1:
        raise ValueError(f"adamw_restore_step_: step must be >= 1 (count after increment), got {step}")
    kw = dict(step=int(step), lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
              weight_decay=float(weight_decay), maximize=bool(maximize))
    amp = _amp_args(grad_scale, found_inf)
    _launch("adamw_restore_step_", backend,
            lambda fn, pick, device: fn(pick(params), pick(backups), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                                        **kw, **_on(amp, device), **tele.kwargs(pick, device, ascent_grads)),
            params, int(ascent_grads is not None), backups=backups, grads=grads, exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs, ascent_grads=ascent_grads)
    tele.finish()


# --------------------------------------------------------------------------- variants' element-wise ops

def renormalize_(grads: Tensors, ref_sq_norm: torch.Tensor, *, sq_norm: Optional[torch.Tensor] = None,
                 eps: float = 1e-12, backend: Optional[str] = None) -> torch.Tensor:
    """g ← g·sqrt(ref)/(sqrt(‖g‖²) + eps) with ‖g‖ global over the list (Stable SAM).

    ``sq_norm``: ‖g‖² when the caller already has it (``grad_sq_norm(grads)``; saves that read).
    Returns the squared norm of the grads before rescaling (device tensor).
    """
    sq = grad_sq_norm(grads, backend=backend) if sq_norm is None else sq_norm
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
    _single_device("topk_mask", scores)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"topk_mask: density must be in [0, 1], got {density}")
    total = sum(s.numel() for s in scores)
    k = min(total, int(math.floor(total * density + 1e-9)))
    return _run_masks("topk_mask", scores, backend, k)


def nm_mask(scores: Tensors, n: int, m: int, *, backend: Optional[str] = None) -> list[torch.Tensor]:
    """N:M mask: in each group of ``m`` consecutive entries along the reduction dimension keep the ``n`` largest.

    Linear weights (out, in) group along ``in``; conv weights (out, in, kh, kw) along in·kh·kw; 1-D
    tensors along their length. A trailing partial group of r < m entries keeps min(n, r).
    """
    _single_device("nm_mask", scores)
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
        raise ValueError(f"nm_mask: need integers 0 <= n <= m, m >= 1; got n={n}, m={m}")
    return _run_masks("nm_mask", scores, backend, n, m)
