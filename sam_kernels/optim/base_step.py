"""The descent of a SAM step: restore w from its backup, then the base optimizer's update.

For ``torch.optim.SGD`` and ``torch.optim.AdamW`` both happen in one fused op per group
(``ops.sgd_restore_step_`` / ``ops.adamw_restore_step_``), writing the base optimizer's own state
entries (SGD ``momentum_buffer``; AdamW ``step``, ``exp_avg``, ``exp_avg_sq``) exactly as torch
lays them out, so its ``state_dict`` is the same as a plain torch run and either path can take
over mid-run. An optimizer with a ``restore_step_(perturbed, backup_of, backend, grad_scale, found_inf, read)``
method fuses both itself (BSAM's; ``read(group, key)`` gives a hyperparameter as a compiled step
must read it, :func:`.compiled.hyper`). Every other optimizer: ``ops.restore_`` then ``base_optimizer.step()``.

The fused path replaces ``base_optimizer.step()``, so it runs the base optimizer's step hooks and
scheduler accounting itself (:mod:`.contract`). State tensors follow their parameter's dtype and
device as torch.optim's ``load_state_dict`` casts them: a stale one (``model.double()`` mid-run)
is cast when the kernel rejects it, before anything is written.

AMP (``grad_scale``, ``found_inf``; see :mod:`.amp`): the fused kernels unscale and skip on the
device. AdamW's step counts are host tensors (torch's layout): a skipped step is taken back from
them with ``found_inf``, which on CUDA reads it back (one host sync). Generic optimizers: torch's
fused ones (``_step_supports_amp_scaling``) get ``grad_scale``/``found_inf`` themselves; any other
is stepped only when ``found_inf`` is zero, read on the host (one sync, as GradScaler does).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from .. import ops
from . import aliases, follow, groups, handover, param_scan, sparse_grads
from .backups import copy_back
from .compiled import hyper
from .contract import mark_stepped, run_step_hooks
from .finite import SPARE_KEY, message

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "maximize")


def fused_kind(base: torch.optim.Optimizer) -> Optional[str]:
    """'sgd' / 'adamw' when the fused restore+update reproduces ``base.step()``, else None."""
    groups = base.param_groups
    # A tensor lr: eagerly base.step() (torch's own maths for it); compiled, the fused descent reads it.
    tensor_lr = not torch.compiler.is_compiling() and any(isinstance(g.get("lr"), torch.Tensor) for g in groups)
    if tensor_lr or any(g.get("differentiable") for g in groups):
        return None
    if type(base) is torch.optim.SGD:
        return "sgd"
    # Eagerly, fused/capturable AdamW keep `step` on the device: reading it would sync, so they stay
    # generic. A compiled step reads the counts as tensors; Dynamo shows every traced AdamW group as
    # capturable (its optimizer handling), so capturable is no reason to leave the fused descent there.
    capturable_ok = torch.compiler.is_compiling()
    if type(base) is torch.optim.AdamW and not any(g.get("amsgrad") or (g.get("capturable") and not capturable_ok)
                                                   or g.get("fused") for g in groups):
        return "adamw"
    return None


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its ``step`` tensors (``optimizer._get_scalar_dtype``, private)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Rows:
    """The descent's entries as aligned columns, in group order: (group, param), param, backup and
    gradient of each (columns, not rows of tuples: built and split without a Python step per entry
    in the usual case of one launch for every param)."""

    __slots__ = ("entries", "params", "backups", "grads")

    def __init__(self, entries: list, params: list, backups: list, grads: list):
        self.entries, self.params, self.backups, self.grads = entries, params, backups, grads

    def pick(self, idx: list[int]) -> "Rows":
        if len(idx) == len(self.params):  # every entry, in order (idx are increasing)
            return self
        return Rows(*([col[i] for i in idx] for col in (self.entries, self.params, self.backups, self.grads)))

    def tuples(self) -> list[tuple]:
        """(group, param, backup, grad) per entry."""
        return [(e[0], p, b, g) for e, p, b, g in zip(self.entries, self.params, self.backups, self.grads)]


def _by_hyperparams(rows: Rows, keys, read) -> list[Rows]:
    """Split ``rows`` by the hyperparameters that reach the kernel (``read(group, key)``: a compiled
    step's lr is a tensor, keyed by identity)."""
    buckets: dict = {}
    for group, start, stop in groups.runs(rows.entries):  # group order: one key per group, not per param
        buckets.setdefault(tuple(read(group, k) for k in keys), []).extend(range(start, stop))
    return [rows.pick(idx) for idx in buckets.values()]


def _follow_params(states: list[dict], params: list[torch.Tensor], keys: tuple[str, ...]) -> bool:
    """Cast the state tensors ``keys`` of each param to its dtype and device (torch.optim's rule on
    ``load_state_dict``); whether any changed."""
    changed = False
    for st, p in zip(states, params):
        for k in keys:
            t = st.get(k)
            if isinstance(t, torch.Tensor) and (t.dtype != p.dtype or t.device != p.device):
                st[k] = t.to(dtype=p.dtype, device=p.device)
                changed = True
    return changed


def _follow_backups(backups: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
    """Cast (in the list) backups taken before their param changed dtype or device mid-step
    (``model.double()`` between first_step and second_step); whether any changed."""
    changed = False
    for i, (b, p) in enumerate(zip(backups, params)):
        if b.dtype != p.dtype or b.device != p.device:
            backups[i] = b.to(dtype=p.dtype, device=p.device)
            changed = True
    return changed


def _with_state_following(call, states: list[dict], params: list[torch.Tensor], keys: tuple[str, ...],
                          backups: list[torch.Tensor]):
    """``call()``; if the kernel rejects the lists (before writing), cast stale state and backups, retry once."""
    try:
        return call()
    except (TypeError, ValueError):
        if not (_follow_params(states, params, keys) | _follow_backups(backups, params)):
            raise
    return call()


def _with_telemetry(call, telemetry, params: list[torch.Tensor]):
    """``call(**kwargs)`` with the telemetry arguments of one launch (:class:`.telemetry.FusedSums`, or
    None). A g(w) list the kernel rejects (a param cast or moved between the passes) is dropped and
    the call made again with the sums only: the step goes on, that step's cosine is unknown."""
    if telemetry is None:
        return call()
    if telemetry.ascent_of is not None and telemetry.dot_ok:
        try:
            return call(sums=telemetry.sums, ascent_grads=[telemetry.ascent_of[id(p)] for p in params])
        except (TypeError, ValueError):  # rejected before anything was written
            telemetry.dot_ok = False
    return call(sums=telemetry.sums)


IN_PASS_BACKENDS = ("eager", "cpp", "cuda", "triton")
"""The backends whose ``sgd_restore_step_`` takes ``momentum_out`` and ``nonfinite``."""
IN_PASS_MIN_MEAN_NUMEL = 16384
"""``finite_check=True`` takes the check in the descent's pass only when the step's gradients
average at least this many elements; below, the separate read (``"pass"``) is cheaper: the spare
buffers' bookkeeping costs about 1 us of Python per tensor (500 tensors of 64 elements: the default
step took 1.38x ``finite_check=False``'s time), one norm launch over gradients that small a few."""


class InPassCheck:
    """The finite check of a SAM step taken by the fused SGD descent in its own pass (ours).

    The descent reads the old momentum buffers and writes the new ones elsewhere: over the gradients
    the caller handed over (``second_step(zero_grad=True)``, :mod:`.handover`; ``handed``: their
    params' ids), else into spare buffers kept in ``sam.state[p][SPARE_KEY]`` (allocated once; not
    saved). It sets ``flag`` (0-dim fp32 on the params' ``device``) on a NaN/Inf gradient, in which
    case the kernels have put the weights back at w and the new buffers at the old values (zero for a
    first step). In the call (host memory, finite check not deferred) the new buffers replace the old
    ones in the base optimizer's state (the old ones become the spares, or are dropped where a
    gradient took their place) only when every launch of the step saw finite gradients:
    :meth:`commit` swaps them, or raises ``FloatingPointError`` with the state as it was. Deferred
    (device memory): the flag is not read; :meth:`commit` swaps them either way (on a fault they hold
    the old values bitwise) and folds the flag into the step's skip flag, whose error :mod:`.finite`
    raises at the next step. :meth:`release` then sets the gradients taken to None, also when the
    descent raised."""

    def __init__(self, sam, device: torch.device, handed: Optional[set[int]] = None):
        self.sam = sam
        self.flag = torch.zeros((), device=device)
        self.deferred = sam.step_state.finite.defers(self.flag)
        self.handed = handed or set()
        self._owns: list[dict] = []  # sam.state[p] of the params of the last spares() call
        self._taken: list[torch.Tensor] = []  # params whose gradient holds a new buffer
        self._installs: list[tuple[list, list, list, list]] = []  # per launch: states, owns, old, new

    def spares(self, params: list[torch.Tensor], old: list[Optional[torch.Tensor]], grads: list[torch.Tensor],
               strict: bool = False) -> list[Optional[torch.Tensor]]:
        """Where each existing buffer of ``old`` gets its new values (None for a first step): the
        gradient when handed over, else a spare. The kernel rejects a spare unlike its buffer before
        writing anything; ``strict`` (the retry) compares them here."""
        state = self.sam.state
        self._owns = owns = [state[p] for p in params]
        out = [own.get(SPARE_KEY) for own in owns]
        if strict:  # the rejected try wrote nothing: its params' gradients are theirs again
            retried = set(map(id, params))
            self._taken = [p for p in self._taken if id(p) not in retried]
        for i, (own, spare, buf) in enumerate(zip(owns, out, old)):
            if buf is None:
                out[i] = None
            elif id(params[i]) in self.handed and not strict:  # strict: a retry, keep to spares
                out[i] = grads[i]
                self._taken.append(params[i])
            elif spare is None or spare is buf or (strict and (
                    spare.shape != buf.shape or spare.dtype != buf.dtype or spare.device != buf.device
                    or spare.stride() != buf.stride() or spare.data_ptr() == buf.data_ptr())):
                out[i] = own[SPARE_KEY] = torch.empty_like(buf, memory_format=torch.preserve_format)
        return out

    def later(self, states: list[dict], old: list[Optional[torch.Tensor]], new: list[torch.Tensor]) -> None:
        """The buffers of one launch (after :meth:`spares` for its params), for :meth:`commit`."""
        self._installs.append((states, self._owns, old, new))

    def commit(self) -> None:
        """Swap in the new buffers, or raise (weights at w, state untouched) when the flag is set;
        deferred, swap them and hand the flag on (no read)."""
        installs, self._installs = self._installs, []
        if self.deferred:
            now = self.sam.step_state
            now.found = self.flag if now.found is None else torch.maximum(now.found, self.flag.to(now.found.device))
        elif bool(self.flag):  # host memory: no synchronization
            raise FloatingPointError(message("second_step", "found in the update's pass"))
        for states, owns, old, new in installs:
            for st, own, before, buf in zip(states, owns, old, new):
                st["momentum_buffer"] = buf
                if before is None:
                    continue
                if own.get(SPARE_KEY) is buf:
                    own[SPARE_KEY] = before
                else:  # a gradient holds the new buffer: the old one is freed
                    own.pop(SPARE_KEY, None)

    def release(self) -> None:
        """Set the gradients that hold new buffers to None (they hold no gradient any more)."""
        taken, self._taken = self._taken, []
        for p in taken:
            p.grad = None


def in_pass_check(sam, perturbed: list[torch.Tensor], params: list[torch.Tensor], sparse: bool,
                  found: Optional[param_scan.ParamScan] = None) -> bool:
    """Whether this SAM step's finite check is taken by the fused descent in its own pass (no read of
    its own): ``finite_check`` True or "fused", a fused SGD descent, parameters on one device and a
    backend of :data:`IN_PASS_BACKENDS` there (in host memory the flag is read in the step without
    synchronization; in device memory the check is deferred: the kernels undo a fault on the device
    and the error is raised at the next step), every param with a gradient perturbed and its own
    backup (the weights can be put back), and nothing that must see the check before the update:
    no AMP, descent modifiers, sparse gradients, compiled step, aliased params or process group
    (every rank must take the same decision); with ``finite_check=True`` also gradients of
    :data:`IN_PASS_MIN_MEAN_NUMEL` elements or more on average. The base optimizer's
    ``momentum_buffer`` entries are then new tensors each step (the handed-over gradients, or the
    previous ones' spares), not updated in place. ``found``: the scan ``params`` come from (its
    element count and device, when every param has a gradient)."""
    if sam.finite_check not in (True, "fused") or sparse or sam.amp.active or sam.modifiers:
        return False
    whole = found is not None and not found.missing  # the scan's params are `params`
    numel = found.numel if whole else sum(map(torch.Tensor.numel, params))
    if sam.finite_check is True and numel < IN_PASS_MIN_MEAN_NUMEL * len(params):
        return False
    now = sam.step_state
    if now.aliases or torch.compiler.is_compiling() or fused_kind(sam.base_optimizer) != "sgd":
        return False
    if getattr(sam.base_optimizer, "restore_step_", None) is not None:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    if len(perturbed) != len(params) or not all(map(operator.is_, perturbed, params)):
        return False
    device = found.device if whole else follow.one_device(params)
    if device is None:  # one flag, on the params' device
        return False
    try:
        return ops.dispatch.resolve("sgd_restore_step_", device.type, sam.backend)[0] in IN_PASS_BACKENDS
    except RuntimeError:  # a backend that cannot run here: the descent raises it
        return False


def _sgd(base: torch.optim.SGD, rows: Rows, backend, amp: dict, telemetry, read,
         check: Optional[InPassCheck] = None) -> None:
    for bucket in _by_hyperparams(rows, _SGD_KEYS, read):
        group = bucket.entries[0][0]
        params, backups, grads = bucket.params, bucket.backups, bucket.grads
        momentum = group["momentum"]
        states = [base.state[p] for p in params] if momentum else []
        in_pass = {} if check is None else {"nonfinite": check.flag}
        tries = []

        def call():
            old = [st.get("momentum_buffer") for st in states] if momentum else None
            if check is not None and momentum:
                in_pass["momentum_out"] = check.spares(params, old, grads, strict=bool(tries))
                tries.append(1)
            return old, _with_telemetry(
                lambda **tele: ops.sgd_restore_step_(params, backups, grads, old, lr=read(group, "lr"), momentum=momentum,
                                                     dampening=group["dampening"], weight_decay=group["weight_decay"],
                                                     nesterov=group["nesterov"], maximize=group["maximize"],
                                                     backend=backend, **amp, **tele, **in_pass), telemetry, params)
        try:
            old, bufs = _with_state_following(call, states, params, ("momentum_buffer",), backups)
        except (TypeError, ValueError):  # rejected before writing: perhaps a spare unlike its buffer
            if not tries:
                raise
            old, bufs = call()  # spares compared and remade (strict)
        if momentum and check is not None:
            check.later(states, old, bufs)
        elif momentum:
            for st, before, buf in zip(states, old, bufs):
                if buf is not before:  # a new buffer (first step of this param); the others were updated in place
                    st["momentum_buffer"] = buf


def _adamw(base: torch.optim.AdamW, rows: Rows, backend, amp: dict, telemetry, read) -> None:
    states = [base.state[p] for p in rows.params]
    for p, st in zip(rows.params, states):
        if len(st) == 0:  # the layout torch.optim.AdamW creates on its first step
            st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    # The steps are CPU tensors (torch's layout for non-capturable AdamW): reading them is no device sync.
    # A compiled step does not read them (a graph would be specialized on them): the kernel takes them
    # as tensors, one per param (the eager reference's maths, which the compiler fuses).
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    if torch.compiler.is_compiling():
        step_of = {id(p): (i, st) for i, (p, st) in enumerate(zip(rows.params, states))}
    else:
        counts = torch.stack(steps).tolist() if len({s.dtype for s in steps}) == 1 else [s.item() for s in steps]
        step_of = {id(p): (int(c), st) for p, c, st in zip(rows.params, counts, states)}
    try:
        _adamw_launches(rows, step_of, backend, amp, telemetry, read)
    except BaseException:  # nothing was stepped for good (the caller restores w): the counts go back too
        torch._foreach_add_(steps, -1)
        raise
    if amp.get("found_inf") is not None:  # a skipped step does not count (torch's fused AdamW does the same)
        torch._foreach_add_(steps, amp["found_inf"].to(steps[0].device, steps[0].dtype), alpha=-1)


def _adamw_launches(rows: Rows, step_of: dict, backend, amp: dict, telemetry, read) -> None:
    """One launch per (hyperparameters, step count): usually one for the whole model. Compiled: one
    per hyperparameters, the step counts a list of tensors."""
    compiling = torch.compiler.is_compiling()
    for bucket in _by_hyperparams(rows, _ADAMW_KEYS, read):
        by_step: dict = {}
        for e in bucket.tuples():
            step, st = step_of[id(e[1])]
            by_step.setdefault(None if compiling else step, []).append((*e, st))
        for step, items in by_step.items():
            group = items[0][0]
            _, params, backups, grads, sts = groups.columns(items, 5)
            if step is None:
                step = [st["step"] for st in sts]
            beta1, beta2 = group["betas"]
            _with_state_following(
                lambda: _with_telemetry(
                    lambda **tele: ops.adamw_restore_step_(params, backups, grads, [st["exp_avg"] for st in sts],
                                                           [st["exp_avg_sq"] for st in sts], step, lr=read(group, "lr"),
                                                           beta1=beta1, beta2=beta2, eps=group["eps"],
                                                           weight_decay=group["weight_decay"],
                                                           maximize=group["maximize"], backend=backend, **amp, **tele),
                    telemetry, params),
                sts, params, ("exp_avg", "exp_avg_sq"), backups)


def _generic_step(base: torch.optim.Optimizer, grad_scale: Optional[torch.Tensor],
                  found_inf: Optional[torch.Tensor]) -> None:
    """``base.step()`` for an optimizer without a fused SAM descent, under AMP when given."""
    if grad_scale is None and found_inf is None:
        base.step()
    elif getattr(base, "_step_supports_amp_scaling", False):  # torch's fused optimizers unscale and skip themselves
        base.grad_scale, base.found_inf = grad_scale, found_inf
        try:
            base.step()
        finally:
            del base.grad_scale, base.found_inf
    else:
        if grad_scale is not None:
            grads = [p.grad for g in base.param_groups for p in g["params"] if p.grad is not None]
            by_device: dict = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            for device, gs in by_device.items():
                torch._foreach_mul_(gs, grad_scale.to(device).double().reciprocal().float())
        if found_inf is None or not bool(found_inf):  # the documented host sync (as GradScaler for such optimizers)
            base.step()


def _rows(param_groups: list[dict], perturbed: list[torch.Tensor], kept: list[torch.Tensor],
          given: Optional[tuple[list, list, list]]) -> tuple[Rows, list]:
    """The rows of every param with a gradient, in group order (a param that was not perturbed is its
    own backup: the fused op then just updates it), and the (param, backup) of perturbed params that
    have no gradient now. ``given``: the (group, param) entries, params and gradients the descent
    read (else read here)."""
    if given is None:
        entries = groups.with_grads(param_groups)
        given = entries, groups.params_of(entries), [p.grad for _, p in entries]
    entries, params, grads = given
    if len(perturbed) == len(params) and all(map(operator.is_, perturbed, params)):
        return Rows(entries, params, list(kept), grads), []  # the usual step: every one
    backup_of = {id(p): (p, b) for p, b in zip(perturbed, kept)}
    backups = []
    for p in params:
        hit = backup_of.pop(id(p), None)
        backups.append(p if hit is None else hit[1])
    return Rows(entries, params, backups, grads), list(backup_of.values())


def restore_and_step(sam, perturbed: list[torch.Tensor], kept: list[torch.Tensor],
                     backend: Optional[str], grad_scale: Optional[torch.Tensor] = None,
                     found_inf: Optional[torch.Tensor] = None, telemetry=None, dense: bool = True,
                     check: Optional[InPassCheck] = None, given: Optional[tuple[list, list, list]] = None) -> None:
    """Restore every perturbed param from its backup (``kept``, aligned with ``perturbed``) and
    take the base step, fused when possible: not with sparse gradients (``dense=False``), which the
    base optimizer's own ``step()`` takes (:mod:`.sparse_grads`).

    AMP: ``grad_scale`` is the loss scale the grads carry, a non-zero ``found_inf`` skips the update
    (weights end at the backups, state untouched). ``telemetry``: the fused descent's sums
    (:class:`.telemetry.FusedSums`); only used on the fused path, whose entries are then exactly the
    params with a gradient. ``check``: the finite check in the SGD descent's pass (:func:`in_pass_check`
    said it applies); raises ``FloatingPointError`` before the step is marked taken. ``given``: the
    (group, param) entries, params and gradients of the params with a gradient, as the caller read
    them (else read here). Errors propagate; the caller restores.
    """
    base = sam.base_optimizer
    own = getattr(base, "restore_step_", None)
    if own is not None and dense:  # an optimizer with its own fused restore + update (BSAM's descent)
        run_step_hooks(base, "pre")
        own(perturbed, dict(zip(perturbed, kept)), backend, grad_scale=grad_scale, found_inf=found_inf,
            read=lambda group, key: hyper(sam, group, key))
        mark_stepped(base)
        run_step_hooks(base, "post")
        return
    kind = fused_kind(base) if dense else None
    alias_keys = sam.step_state.aliases
    if kind is None:
        if perturbed:
            copy_back(perturbed, kept, backend, alias_keys)
        _generic_step(base, grad_scale, found_inf)
        return
    amp = {k: v for k, v in (("grad_scale", grad_scale), ("found_inf", found_inf)) if v is not None}
    if alias_keys and perturbed:
        # Aliased params: restore them first (layer by layer, see .aliases); each is then its own backup,
        # and the fused updates below add up on the shared memory in layer order, as torch.optim's do.
        shared = [i for i, p in enumerate(perturbed) if id(p) in alias_keys]
        copy_back([perturbed[i] for i in shared], [kept[i] for i in shared], backend, alias_keys)
        own = [i for i, p in enumerate(perturbed) if id(p) not in alias_keys]
        perturbed, kept = [perturbed[i] for i in own], [kept[i] for i in own]
    rows, restore_only = _rows(base.param_groups, perturbed, kept, given)
    if restore_only:
        copy_back([p for p, _ in restore_only], [b for _, b in restore_only], backend)
    run_step_hooks(base, "pre")  # what base.step() would have run
    layer = aliases.layers(rows.params, alias_keys)
    read = lambda group, key: hyper(sam, group, key)  # noqa: E731
    try:
        for idx in aliases.split(list(range(len(rows.params))), layer):
            if check is not None:
                _sgd(base, rows.pick(idx), backend, amp, telemetry, read, check)
            else:
                (_sgd if kind == "sgd" else _adamw)(base, rows.pick(idx), backend, amp, telemetry, read)
        if check is not None:
            check.commit()
    finally:
        if check is not None:
            check.release()
    mark_stepped(base)
    run_step_hooks(base, "post")


def descend(sam, perturbed: Optional[list[torch.Tensor]]) -> None:
    """The descent of an optimizer step (``perturbed``: the params at w + e of a SAM step, None for a
    plain step): screen, telemetry, agree, modifiers, then the restore and base step (fused where
    possible). Errors propagate; the caller restores."""
    now = sam.step_state
    sam_step = perturbed is not None
    entries, grads, sparse, found = param_scan.take(sam)
    params = groups.params_of(entries)
    # the gradients it may take are found while only `grads` holds them (each reference counts)
    check = (InPassCheck(sam, params[0].device, handover.sole_grads(sam, params, grads))
             if sam_step and params and in_pass_check(sam, perturbed, params, sparse, found) else None)
    if sparse:
        sparse_grads.refuse_unsupported(sam)
    if not sam_step:
        sam.distributed.before_plain_descent(grads)  # m-SAM: the first backward left them unsynchronized
    scale = sam.loss_scale
    sq = None
    if grads and (sam.finite_check or sam.amp.active) and check is None:
        # before the modifiers, so no NaN reaches their state (LookSAM's g_v)
        sq = groups.grads_sq_norm(grads, sam.backend, sparse)
        sam.amp.screen(sam, sq, "second_step" if sam_step else "base_step")
    if sam_step:
        sq = sam.telemetry.on_descent(sam, params, grads, sq, scale, sparse)
        sam.distributed.before_sam_descent(sam)
    for m in sam.modifiers:
        sq = m.before_descent(sam, params, grads, sam_step, sq)
    if not sam_step and not sam.amp.active and now.found is None and not torch.compiler.is_compiling():
        sam.base_optimizer.step()  # a plain step is exactly the base optimizer's own step
        return
    # Under AMP (in-kernel unscale), with a device-side skip flag (the deferred finite check) and under
    # torch.compile (torch.optim's step graph-breaks), plain steps of SGD/AdamW also run the fused
    # descent, each param its own backup.
    restore_and_step(sam, perturbed or [], now.backups, sam.backend, grad_scale=scale, found_inf=now.found,
                     dense=not sparse, telemetry=sam.telemetry.fused_args() if sam_step else None, check=check,
                     given=None if sam.modifiers else (entries, params, grads))  # a modifier may replace p.grad
    if sam_step:
        for m in sam.modifiers:
            m.after_descent(sam, now.found)
    sam.amp.report(sam)
