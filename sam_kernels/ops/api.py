"""The public ops: each one's arguments, scalars and telemetry outputs, then :func:`launch.launch`.

Every op takes Python lists of tensors. Complex tensors take part through ``torch.view_as_real``
(:mod:`.complex_views`). Entries are grouped by (device, dtype, layout agreement: :mod:`.layouts`);
each group goes to the backend chosen by :mod:`.dispatch` (:mod:`.launch`); reductions across
groups are summed on the first tensor's device (:mod:`.cross_group`). Zero-size tensors are
skipped. Nothing here reads tensor data on the host. The op table is :mod:`.contract`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .amp_args import amp_args, amp_sq_norm, on_device
from .cross_group import total
from .launch import launch, run_masks
from .lists import check_lists, none_at, pick, require_list
from .reference import centralize_ as centralize_reference, tensor_key
from .telemetry_outputs import AddInto, DescentSums

Tensors = Sequence[torch.Tensor]
Scalar = Union[float, torch.Tensor]
"""A hyperparameter: a Python number, or a 0-dim tensor on the params' device or the CPU (a compiled
step's lr or rho, read as graph data: see ``sam_kernels.optim.compiled``). A tensor runs the eager
reference, whose element-wise maths torch.compile fuses; numbers run the chosen backend."""


def _scalar(x: Scalar, backend: Optional[str]) -> tuple[Scalar, Optional[str]]:
    """(x as the kernels take it, the backend for it): a tensor hyperparameter goes to the eager reference."""
    if isinstance(x, torch.Tensor):
        return x, "eager"
    return float(x), backend


# --------------------------------------------------------------------------- reductions

def grad_sq_norm(grads: Tensors, *, params: Optional[Tensors] = None, masks: Optional[Tensors] = None,
                 eta: float = 0.01, backend: Optional[str] = None) -> torch.Tensor:
    """Σ over all tensors of (m ⊙ T ⊙ g)², T = |w| + eta when ``params`` is given (ASAM), else 1.

    Returns a 0-dim fp32 tensor (fp64 if every grad is fp64) on the first grad's device, computed
    in a fixed order (deterministic) without synchronizing with the host.
    """
    eta = float(eta)
    parts = launch("grad_sq_norm", backend, lambda fn, pick, _: fn(pick(grads), pick(params), pick(masks), eta),
                    grads, params=params, masks=masks)
    return total(parts, grads)


def dot(a: Tensors, b: Tensors, *, backend: Optional[str] = None) -> torch.Tensor:
    """Σ_i ⟨a_i, b_i⟩ over all tensors, as a 0-dim fp32 tensor (fp64 if all inputs are fp64)."""
    return total(launch("dot", backend, lambda fn, pick, _: fn(pick(a), pick(b)), a, b=b), a)


# --------------------------------------------------------------------------- perturb / restore

def perturb_(params: Tensors, grads: Tensors, backups: Tensors, rho: Scalar, *, sq_norm: Optional[torch.Tensor] = None,
             masks: Optional[Tensors] = None, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12,
             keep_prob: Optional[float] = None, seed: Optional[int] = None, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None, perturbation_sq: Optional[torch.Tensor] = None,
             grad_copies: Optional[Tensors] = None, into_backups: bool = False,
             backend: Optional[str] = None) -> None:
    """backups ← params; params += rho·s·(m ⊙ T² ⊙ g)·keep/keep_prob, s = 1/(sqrt(sq_norm) + eps).

    ``into_backups`` (ours): backups ← what params would become, params only read: the pass writes
    one list of weights instead of two. The caller then swaps the two lists' storages
    (:func:`sam_kernels.optim.storage_swap.swap`), which leaves params at w + e and backups at w,
    bitwise as without it.

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
    require_list("perturb_", params)
    applied = AddInto("perturb_", "perturbation_sq", perturbation_sq, 1)
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
    (rho, backend), eps, adaptive, eta = _scalar(rho, backend), float(eps), bool(adaptive), float(eta)

    if grad_copies is not None:
        require_list("perturb_", grad_copies)

    def call(fn, pick, device):
        tele = {}
        if perturbation_sq is not None:
            tele["perturbation_sq"] = applied.on(device)
        if grad_copies is not None:
            tele["grad_copies"] = pick(grad_copies)
        if into_backups:
            tele["into_backups"] = True
        fn(pick(params), pick(grads), pick(backups), sq_norm.to(device), rho, eps, pick(masks), adaptive, eta, keep,
           pick(keys), **tele)

    launch("perturb_", backend, call, params, int(grad_copies is not None), grads=grads, backups=backups,
            masks=masks, grad_copies=grad_copies)
    applied.finish()


def restore_(params: Tensors, backups: Tensors, *, backend: Optional[str] = None) -> None:
    """params ← backups, bitwise."""
    launch("restore_", backend, lambda fn, pick, _: fn(pick(params), pick(backups)), params, backups=backups)


# --------------------------------------------------------------------------- fused restore + base step

def sgd_restore_step_(params: Tensors, backups: Tensors, grads: Tensors,
                      momentum_buffers: Optional[Sequence[Optional[torch.Tensor]]] = None, *, lr: Scalar,
                      momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                      nesterov: bool = False, maximize: bool = False, grad_scale: Optional[torch.Tensor] = None,
                      found_inf: Optional[torch.Tensor] = None, ascent_grads: Optional[Tensors] = None,
                      sums: Optional[torch.Tensor] = None,
                      momentum_out: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      nonfinite: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> list[Optional[torch.Tensor]]:
    """params ← backups, then torch.optim.SGD's update with ``grads``, in one pass per group.

    ``momentum_buffers[i] is None`` means "first step": a buffer is created (torch semantics:
    buf = d_p). Returns the buffers (all None when momentum is 0), to be kept in the state.

    AMP, as torch's fused SGD: ``grad_scale`` (0-dim fp32 on the params' device) is the loss scale
    the grads carry and is divided out in the kernel; a non-zero ``found_inf`` (0-dim fp32) skips
    the update on the device: params end bitwise at the backups, buffers unchanged. New buffers
    are then zero-filled (ours: a skipped first step leaves buf = 0, so the next step's
    buf = momentum·0 + (1 − dampening)·d equals torch's first-step buf = d when dampening = 0).

    Finite check in the update's pass (ours): ``nonfinite`` (0-dim float32 on the params' device)
    is set to 1 when some gradient element, divided by ``grad_scale``, is NaN or Inf; it is read
    in the pass that reads g for the update (no extra read) and never cleared (a step ``found_inf``
    skips is not looked at). With momentum the
    new buffers must then go to ``momentum_out`` (aligned with params, same shapes and dtypes;
    an entry whose ``momentum_buffers`` entry is None may be None) and ``momentum_buffers`` are
    only read: that lets a fault be undone. A ``momentum_out`` entry may be the ``grads`` entry
    itself (every kernel reads an element of g before writing it: SAM's hand-over of gradients
    it may overwrite, :mod:`sam_kernels.optim.handover`); else it is one more buffer per param. When the flag is
    non-zero at the end of the call (set here or before), params end bitwise at the backups,
    ``momentum_out`` bitwise equal to ``momentum_buffers`` and first-step buffers zero, so a caller
    may keep the returned buffers as its state whatever the flag. CPU: decided on the host at the
    end of the call; CUDA and Triton: on the device, by a second launch on the current stream that
    reads the flag and writes nothing when it is 0 (no host synchronization). Returns the new
    buffers: ``momentum_out``'s entries, new ones for first steps.

    Telemetry (ours): ``sums`` (float32/float64, shape (2,), on the params' device) gets
    ``[Σ g², Σ ⟨ascent_grads, g⟩]`` ADDED, over the grads as given (an AMP loss scale still in
    them), computed in the same pass that reads g for the update; ``sums[1]`` is left alone
    without ``ascent_grads`` (a list aligned with ``params``: g(w), the first-pass gradients).
    DTensors: summed over the mesh. Raises TypeError/ValueError before writing anything.
    """
    require_list("sgd_restore_step_", params)
    n = len(params)
    tele = DescentSums("sgd_restore_step_", sums, ascent_grads, n)
    bufs: list[Optional[torch.Tensor]] = list(momentum_buffers) if momentum_buffers is not None else [None] * n
    if len(bufs) != n:
        raise ValueError(f"sgd_restore_step_: {len(bufs)} momentum buffers for {n} params")
    fresh = none_at(bufs) if momentum != 0 else []
    outs = _momentum_out(momentum_out, nonfinite, momentum, bufs, fresh, params)
    olds = bufs
    if momentum == 0:
        bufs = [None] * n
    elif fresh:
        new = torch.zeros_like if found_inf is not None or nonfinite is not None else torch.empty_like
        bufs = list(bufs)
        for i in fresh:
            bufs[i] = new(params[i], memory_format=torch.preserve_format)
    lr, backend = _scalar(lr, backend)
    kw = dict(lr=lr, momentum=float(momentum), dampening=float(dampening), weight_decay=float(weight_decay),
              nesterov=bool(nesterov), maximize=bool(maximize))
    amp = amp_args(grad_scale, found_inf)
    has_buffers = momentum != 0
    if not fresh or len(fresh) == n:  # the usual cases: every buffer exists, or none does (first step)
        subsets = [(bool(fresh), None)]
    else:  # two launches: check everything before the first one writes
        check_lists("sgd_restore_step_", params, backups=backups, grads=grads, momentum_buffers=bufs,
                     momentum_out=[b if o is None else o for b, o in zip(bufs, outs)] if outs else None,
                     ascent_grads=ascent_grads)
        new = set(fresh)
        subsets = [(False, [i for i in range(n) if i not in new]), (True, fresh)]
    calls = 0
    for init, sel in subsets:
        ps, bs, gs, ms, asc = (params, backups, grads, bufs, ascent_grads) if sel is None else (
            pick(params, sel), pick(backups, sel), pick(grads, sel), pick(bufs, sel), pick(ascent_grads, sel))
        ms = ms if has_buffers else None
        out_sel = None if init or outs is None else (outs if sel is None else pick(outs, sel))
        check = {} if nonfinite is None else {"nonfinite": nonfinite}
        calls += len(launch("sgd_restore_step_", backend,
                            lambda fn, pick, device: fn(pick(ps), pick(bs), pick(gs), pick(ms), init_buffers=init,
                                                        **kw, **on_device(amp, device),
                                                        **tele.kwargs(pick, device, asc),
                                                        **({} if out_sel is None else {"momentum_out": pick(out_sel)}), **check),
                            ps, int(asc is not None), backups=bs, grads=gs, momentum_buffers=ms, momentum_out=out_sel,
                            ascent_grads=asc))
    if nonfinite is not None and calls > 1:
        # Each launch undid only its own entries: a later one may have found what an earlier one had written.
        _undo_if(nonfinite, list(params), list(backups))
        if outs is not None:
            kept = [i for i in range(n) if i not in set(fresh)]
            _undo_if(nonfinite, pick(outs, kept), pick(olds, kept))
        if fresh:
            _undo_if(nonfinite, pick(bufs, fresh), [torch.zeros_like(bufs[i]) for i in fresh])
    tele.finish()
    if outs is None:
        return bufs
    return [bufs[i] if o is None else o for i, o in enumerate(outs)]


def _momentum_out(momentum_out, nonfinite, momentum: float, bufs: list, fresh: list[int],
                  params: Tensors) -> Optional[list]:
    """``momentum_out`` as a list after the checks of :func:`sgd_restore_step_`'s finite-check arguments."""
    if nonfinite is not None:
        if not isinstance(nonfinite, torch.Tensor) or nonfinite.dim() != 0 or nonfinite.dtype != torch.float32:
            raise TypeError(f"sgd_restore_step_: nonfinite must be a 0-dim float32 tensor, got {nonfinite!r}")
        if params and nonfinite.device != params[0].device:
            raise ValueError(f"sgd_restore_step_: nonfinite is on {nonfinite.device} but the params are on "
                             f"{params[0].device}")
    if momentum_out is None:
        if nonfinite is not None and momentum != 0 and len(fresh) < len(bufs):
            raise ValueError("sgd_restore_step_: nonfinite with momentum needs momentum_out (buffers updated in "
                             "place could not be restored)")
        return None
    if momentum == 0:
        raise ValueError("sgd_restore_step_: momentum_out needs momentum != 0")
    outs = list(momentum_out)
    if len(outs) != len(bufs):
        raise ValueError(f"sgd_restore_step_: {len(outs)} momentum_out tensors for {len(bufs)} params")
    new = set(fresh)
    missing = [i for i, o in enumerate(outs) if o is None and i not in new]
    if missing:
        raise ValueError(f"sgd_restore_step_: momentum_out[{missing[0]}] is None but its momentum buffer exists")
    return outs


def _undo_if(flag: torch.Tensor, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst ← src bitwise where ``flag`` is non-zero: read on the host for host memory, else on the device."""
    if not dst:
        return
    if flag.device.type == "cpu":
        if bool(flag):  # host memory: no synchronization
            torch._foreach_copy_(dst, src)
        return
    skip = flag.ne(0)
    torch._foreach_copy_(dst, [torch.where(skip, s, d) for d, s in zip(dst, src)])


def adamw_restore_step_(params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                        step: Union[int, Sequence[torch.Tensor]], *, lr: Scalar, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 1e-2, maximize: bool = False, grad_scale: Optional[torch.Tensor] = None,
                        found_inf: Optional[torch.Tensor] = None, ascent_grads: Optional[Tensors] = None,
                        sums: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """params ← backups, then torch.optim.AdamW's update (``step`` counted after its increment).

    ``grad_scale`` / ``found_inf``: as :func:`sgd_restore_step_`; a skipped step leaves both moments
    unchanged (the caller must not count it in ``step``). ``sums`` / ``ascent_grads``: telemetry, as
    :func:`sgd_restore_step_`. ``step`` may be a list of 0-dim tensors aligned with ``params`` (torch's
    per-param ``state["step"]``, read as graph data in a compiled step): the eager reference runs.
    """
    require_list("adamw_restore_step_", params)
    tele = DescentSums("adamw_restore_step_", sums, ascent_grads, len(params))
    steps = None
    if isinstance(step, (list, tuple)):
        steps, step, backend = list(step), 0, "eager"
        if len(steps) != len(params):
            raise ValueError(f"adamw_restore_step_: {len(steps)} step counts for {len(params)} params")
    elif step < 1:
        raise ValueError(f"adamw_restore_step_: step must be >= 1 (count after increment), got {step}")
    lr, backend = _scalar(lr, backend)
    kw = dict(lr=lr, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
              weight_decay=float(weight_decay), maximize=bool(maximize))
    amp = amp_args(grad_scale, found_inf)
    launch("adamw_restore_step_", backend,
            lambda fn, pick, device: fn(pick(params), pick(backups), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                                        step=step if steps is None else pick(steps), **kw, **on_device(amp, device),
                                        **tele.kwargs(pick, device, ascent_grads)),
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
    launch("renormalize_", backend,
            lambda fn, pick, device: fn(pick(grads), ref_sq_norm.to(device), sq.to(device), eps), grads)
    return sq


def fisher_accumulate_(fisher: Tensors, grads: Tensors, *, scale: float = 1.0, backend: Optional[str] = None) -> None:
    """fisher += scale·g² (empirical Fisher from per-sample or micro-batch gradients)."""
    scale = float(scale)
    launch("fisher_accumulate_", backend, lambda fn, pick, _: fn(pick(fisher), pick(grads), scale),
            fisher, grads=grads)


def looksam_store_(g_v: Tensors, grads: Tensors, sam_grads: Tensors, *, eps: float = 1e-12,
                   backend: Optional[str] = None) -> None:
    """g_v ← g_s − (⟨g, g_s⟩/‖g‖²)·g with the dot and norm global over all tensors (LookSAM)."""
    d = dot(grads, sam_grads, backend=backend)
    sq = grad_sq_norm(grads, backend=backend)
    eps = float(eps)
    launch("looksam_store_", backend,
            lambda fn, pick, device: fn(pick(g_v), pick(grads), pick(sam_grads), d.to(device), sq.to(device), eps),
            g_v, grads=grads, sam_grads=sam_grads)


def ema_update_(emas: Tensors, grads: Tensors, *, weight: float, sigma: float = 0.0,
                directions: Optional[Tensors] = None, grad_scale: Optional[torch.Tensor] = None,
                found_inf: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """One pass over the EMAs m of the SAM variants that ascend along them (ours):
    ``directions`` ← g − sigma·S·m (Friendly-SAM's d, m before its update; skipped when None) and
    m ← m + weight·(g/S − m) (Friendly-SAM: weight = 1 − lmbda; VaSSO: weight = theta).

    AMP: ``grad_scale`` is the loss scale S the grads carry (0-dim fp32 device tensor): m stores
    g/S, the directions keep S. A non-zero ``found_inf`` (0-dim) leaves every m unchanged (an
    overflowed gradient is never folded in); the directions are written either way. Lists aligned
    with ``emas``, like layouts; raises TypeError/ValueError before writing anything.
    """
    weight, sigma = float(weight), float(sigma)
    amp = amp_args(grad_scale, found_inf)
    launch("ema_update_", backend,
           lambda fn, pick, device: fn(pick(emas), pick(grads), pick(directions), weight, sigma,
                                       **on_device(amp, device)),
           emas, int(directions is not None), grads=grads, directions=directions)


def looksam_apply_(grads: Tensors, g_v: Tensors, alpha: float, *, eps: float = 1e-12,
                   backend: Optional[str] = None) -> None:
    """g ← g + alpha·(‖g‖/‖g_v‖)·g_v with both norms global over all tensors (LookSAM reuse step)."""
    g_sq = grad_sq_norm(grads, backend=backend)
    gv_sq = grad_sq_norm(g_v, backend=backend)
    alpha, eps = float(alpha), float(eps)
    launch("looksam_apply_", backend,
            lambda fn, pick, device: fn(pick(grads), pick(g_v), alpha, g_sq.to(device), gv_sq.to(device), eps),
            grads, g_v=g_v)


def mix_(grads: Tensors, others: Tensors, a, b, *, backend: Optional[str] = None) -> None:
    """g ← a·g + b·o, element-wise, in the compute dtype (fp32, fp64 for fp64), rounded once.

    ``a``, ``b``: floats or 0-dim tensors (device scalars such as norms and dots: read in the
    kernel, no host sync). ``others`` aligned with ``grads`` (same shapes and dtypes); ``others``
    may be ``grads`` itself. Used by GSAM's surrogate-gap descent and WSAM's mixes (ours: one
    pass instead of a scaling pass and an add pass)."""
    def scalar(x) -> torch.Tensor:
        return x.detach() if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
    a, b = scalar(a), scalar(b)
    launch("mix_", backend, lambda fn, pick, device: fn(pick(grads), pick(others), a.to(device), b.to(device)),
           grads, others=others)


def centralize_(grads: Tensors, *, backend: Optional[str] = None) -> None:
    """g ← g − mean(g over dims 1..) for each tensor of ``grads`` with more than one dimension, in
    place: every row of dim 0 (an output row of a linear weight, a filter of a convolution) centred on
    its own mean; tensors of one dimension (biases, norm scales) and zero-size ones unchanged.
    Gradient centralization: Yong et al., "Gradient Centralization", ECCV 2020, eq. (1), as GCSAM
    (Hassan et al., arXiv 2501.11584) applies it to the ascent gradient.

    Any float dtype (the means in fp32, fp64 for fp64; fp16/bf16 rounded once). The kernels take
    every row as a contiguous run of storage: contiguous and channels_last tensors run fused, a
    tensor whose dim 0 is not outermost (a transposed matrix) runs the eager reference. Complex
    tensors run the eager reference on their complex values (centring the rows of their real view
    would mix real and imaginary parts). DTensors: on the local shards; each row must be whole on
    one rank (``Shard(0)``), else ValueError before any gradient changes. Memory traffic: one read
    and one write of every element (each row is read twice, the second time from cache; rows larger
    than the cache are read twice from memory). Raises TypeError/ValueError before writing anything.
    """
    require_list("centralize_", grads)
    try:
        rows = [g for g in grads if g.dim() > 1]  # the others are unchanged (and not counted as moved)
        cplx = [g for g in rows if g.is_complex()]
    except AttributeError:  # an entry that is not a tensor: the list check names it
        check_lists("centralize_", grads)
        raise
    if cplx:  # checked whole before anything is written
        check_lists("centralize_", [torch.view_as_real(g) if g.is_complex() else g for g in rows])
        rows = [g for g in rows if not g.is_complex()]
    if rows:
        launch("centralize_", backend, lambda fn, pick, _: fn(pick(rows)), rows)
    if cplx:
        centralize_reference(cplx)


# --------------------------------------------------------------------------- bSAM

def _real_only(op: str, params: Tensors) -> None:
    """bSAM's maths (sqrt(s)·|g|, z/sqrt(N·s)) is defined on real tensors only."""
    if any(isinstance(p, torch.Tensor) and p.is_complex() for p in params):
        raise TypeError(f"{op}: complex tensors are not supported (bSAM's variance is defined on real weights)")


def bsam_noise_(params: Tensors, backups: Tensors, s: Tensors, noise: Tensors, *, num_data: float,
                backend: Optional[str] = None) -> None:
    """backups ← params; params ← params + noise / sqrt(num_data·s), in one pass per group (bSAM's noisy
    sample, Moellenhoff and Khan 2023, official code). ``noise``: the caller's draw z ~ N(0, 1), aligned
    with ``params`` (same shapes and dtypes); ``s``: the precisions (> 0). Real float tensors only
    (``TypeError`` for complex); raises TypeError/ValueError before writing anything."""
    require_list("bsam_noise_", params)
    _real_only("bsam_noise_", params)
    num_data = float(num_data)
    launch("bsam_noise_", backend, lambda fn, pick, _: fn(pick(params), pick(backups), pick(s), pick(noise), num_data),
           params, backups=backups, s=s, noise=noise)


def bsam_ascent_(params: Tensors, backups: Tensors, grads: Tensors, s: Tensors, s_next: Tensors, *, rho: Scalar,
                 beta2: float, damping: float, weight_decay: float, perturb: bool = True,
                 grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> None:
    """bSAM's first step and variance update in one pass per group, g = grads / grad_scale:
    params ← backups + rho·g/s (backups when not ``perturb``, or when ``found_inf`` is non-zero: AMP's
    overflow flag, 0-dim, read on the device); s_next ← beta2·s + (1 − beta2)·(sqrt(s)·|g| + damping +
    weight_decay). ``grad_scale``: the loss scale the grads carry (0-dim). Formulas: Moellenhoff and
    Khan 2023, official code. ``rho`` may be a 0-dim tensor (see :data:`Scalar`). Real float tensors
    only; raises TypeError/ValueError before writing."""
    require_list("bsam_ascent_", params)
    _real_only("bsam_ascent_", params)
    rho, backend = _scalar(rho, backend)
    kw = dict(rho=rho, beta2=float(beta2), damping=float(damping), weight_decay=float(weight_decay),
              perturb=bool(perturb))
    amp = amp_args(grad_scale, found_inf)
    launch("bsam_ascent_", backend,
           lambda fn, pick, device: fn(pick(params), pick(backups), pick(grads), pick(s), pick(s_next), **kw,
                                       **on_device(amp, device)),
           params, backups=backups, grads=grads, s=s, s_next=s_next)


def bsam_descent_(params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors, s: Tensors, s_next: Tensors,
                  *, lr: Scalar, beta1: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                  found_inf: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """params ← backups, then bSAM's descent in one pass per group, g = grads / grad_scale:
    m ← beta1·m + (1 − beta1)·(g + weight_decay·w); params ← w − lr·m/s. A non-zero ``found_inf``
    skips it on the device (params at the backups, m unchanged, s_next ← s so that swapping the s and
    s_next buffers keeps s). Formulas: Moellenhoff and Khan 2023, official code. ``lr`` may be a 0-dim
    tensor (see :data:`Scalar`). Real float tensors only; raises TypeError/ValueError before writing anything."""
    require_list("bsam_descent_", params)
    _real_only("bsam_descent_", params)
    lr, backend = _scalar(lr, backend)
    kw = dict(lr=lr, beta1=float(beta1), weight_decay=float(weight_decay))
    amp = amp_args(grad_scale, found_inf)
    launch("bsam_descent_", backend,
           lambda fn, pick, device: fn(pick(params), pick(backups), pick(grads), pick(exp_avgs), pick(s),
                                       pick(s_next), **kw, **on_device(amp, device)),
           params, backups=backups, grads=grads, exp_avgs=exp_avgs, s=s, s_next=s_next)


# --------------------------------------------------------------------------- masks

def _single_device(op: str, scores: Tensors) -> torch.device:
    check_lists(op, scores)
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
    return run_masks("topk_mask", scores, backend, k)


def nm_mask(scores: Tensors, n: int, m: int, *, backend: Optional[str] = None) -> list[torch.Tensor]:
    """N:M mask: in each group of ``m`` consecutive entries along the reduction dimension keep the ``n`` largest.

    Linear weights (out, in) group along ``in``; conv weights (out, in, kh, kw) along in·kh·kw; 1-D
    tensors along their length. A trailing partial group of r < m entries keeps min(n, r).
    """
    _single_device("nm_mask", scores)
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
        raise ValueError(f"nm_mask: need integers 0 <= n <= m, m >= 1; got n={n}, m={m}")
    return run_masks("nm_mask", scores, backend, n, m)
