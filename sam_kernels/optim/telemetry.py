"""Sharpness telemetry and cost accounting of a SAM optimizer, with no host sync in the step.

Per SAM step (``telemetry="norms"``, the optimizers' default: all but the cosine; ``telemetry=True``:
all; ``telemetry=False``: none; see the costs below), as 0-dim fp32 device tensors, never read back
in the step:

- ``grad_norm``: ‖g(w)‖, global L2 over every parameter with a first-pass gradient, unscaled (AMP).
- ``sam_grad_norm``: ‖g(w + e)‖ of the descent gradient before any descent modifier, unscaled.
- ``grad_cosine``: cos(g(w), g(w + e)) = ⟨g(w), g(w + e)⟩ / (‖g(w)‖·‖g(w + e)‖) over the parameters
  that have both gradients (the loss scales cancel). g(w) is kept from ``first_step`` to the descent
  by reference, not copied: ``zero_grad`` (set_to_none, torch's default) makes the second backward
  write new tensors. Version counters and storage pointers (host metadata) tell when a loop wrote
  p.grad in place instead (``zero_grad(set_to_none=False)``, no zero_grad, DDP's
  ``gradient_as_bucket_view``): that step's cosine is NaN (one RuntimeWarning) and later steps copy
  g(w) in ``first_step``; so do compiled steps. LookSAM/AE-LookSAM: their own ``looksam_g`` copy.
- ``perturbation_norm``: ‖e‖ as applied. Plain SAM (one rho, no ASAM, masks, keep mask or
  variant norm): rho·‖g‖/(‖g‖ + eps·S) from the ascent norm (scalar maths, S = loss scale, 1
  without AMP); any other ascent (ASAM, Sparse SAM, ESAM, several rho): ‖w_perturbed − backup‖
  over the perturbed tensors, i.e. exactly what was added.
- ``sharpness``: L(w + e) − L(w), when the optimizer saw both losses: a closure step that ran the
  first pass itself, ``step(closure, loss=L(w))``, ``first_step(loss=...)`` + ``second_step(loss=...)``
  in the manual loop, and ``ESAM.step`` (mean per-sample losses; with SDS the extra forward's
  full-batch losses at w + e). Otherwise NaN. The losses are this rank's (no collective).

The values of the last SAM step and their exponential moving averages (``decay``; each EMA starts
at its first finite value and ignores NaN/Inf values) are kept. An AMP step that overflowed leaves
both unchanged (the step was skipped).

Cost (ours), per SAM step over N gradient elements, at the floors. With SGD or AdamW as the base and
no descent modifier, the fused descent (``ops.sgd_restore_step_``/``adamw_restore_step_`` with
``ascent_grads``/``sums``) adds ‖g(w + e)‖² and ⟨g(w), g(w + e)⟩ in the pass that reads g(w + e)
for the update: the cosine costs one read of g(w) (N), ‖g(w + e)‖ nothing; that read is the floor
of the cosine, since g(w) and g(w + e) never exist in one pass otherwise (+10 % of the 10N-access
SAM-SGD step). A loop that writes p.grad in place pays the copy too, written by ``perturb_``
(``grad_copies``) in the pass that reads g(w): one write of N. Other base
optimizers, Stable SAM and LookSAM: ‖g(w + e)‖ reuses the descent's finite check (else a
``grad_sq_norm``, read N, which Stable SAM's renormalization then reuses) and the dot is its own op
(read 2N). ``telemetry="norms"`` (the default) leaves the cosine out: SAM, SS-SAM, AE-SAM, Stable
SAM, Sparse SAM and ESAM around SGD or AdamW then pay no pass over the parameters at all.
``grad_norm`` reuses the ascent norm except under ASAM (its ascent norm is ‖T ⊙ g‖) and when
gradients exist beyond the ascent's params (an ESAM selection whose first backward ran outside
``ascent_pass``): one more ``grad_sq_norm``, read N. ``perturbation_norm`` outside plain SAM is
summed by ``perturb_`` as it writes w + e (``perturbation_sq``): no pass. Under FSDP2 every global
value the step does not compute anyway is one more scalar all-reduce.
``sam_kernels.bench.telemetry_bench`` measures it.

Cost accounting (host integers and floats, always on, no device work): optimizer steps, SAM steps,
forward and backward passes in full-batch equivalents (a SAM step 2 + 2, k + 1 each with a k-step
ascent, a plain step 1 + 1, ESAM's SDS: the extra forward counts 1 and the second pass k/B; what the
optimizer does not run itself is
counted by the protocol: Sparse SAM's Fisher batch-1 passes are not counted), and the bytes the
optimizer's ``sam_kernels.ops`` calls moved, at each op's bytes floor (:data:`FLOOR_UNITS`, the op
table's bytes floors, :mod:`sam_kernels.ops.contract`), per backend. Eager parts move more
than the floor; a plain step's ``base_optimizer.step()`` (torch's own) is not counted.

Under DDP and FSDP2 (``distributed="global"``) the norms are the global ones (the gradients are
synchronized; DTensor reductions are all-reduced by the ops). Under m-SAM, g(w) is this rank's
unsynchronized gradient: ``grad_norm`` and the cosine use it (what this rank ascended with).
"""
from __future__ import annotations

import inspect
import math
import operator
import warnings
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from .. import ops
from ..ops import contract, dtensor
from ..ops.reference import acc_dtype
from . import groups
from .base_step import fused_kind

if TYPE_CHECKING:
    from .ascent import Ascent

KEYS = ("grad_norm", "sam_grad_norm", "grad_cosine", "perturbation_norm", "sharpness", "steps", "sam_steps",
        "sam_step_fraction", "forward_passes", "backward_passes", "optimizer_bytes")
"""The keys of ``SAM.stats()``, in order."""
VALUES = KEYS[:5]
"""The device values (the others are host counters)."""

FLOOR_UNITS = {op.name: op.bytes_per_element for op in contract.OPS.values()}
"""op -> (bytes per element in units of the element size, extra bytes per element): the op table's
bytes floors of each op's own pass (:mod:`sam_kernels.ops.contract`; ASAM's read of w and mask
reads are not in the floors). ``renormalize_`` and the LookSAM ops count their element-wise pass
only: the norms and dots they take run as ``grad_sq_norm``/``dot`` calls with records of their own."""

FOLD = 64
"""SAM steps whose raw values are kept (0-dim device tensors) before they are folded into the values
and averages in one batch: the per-step device work of telemetry is then only what the kernels add."""

_RECORD = ("g1_sq", "scale", "plain_rho", "e_sq", "g2_sq", "scale2", "dot", "n1", "n2", "sums", "fused_dot", "before",
           "after", "found")
"""What a SAM step records (raw, scaled norms as the ops returned them; None when unknown). ``scale``,
``scale2``: the loss scale of the first and of the second pass (AMP; either may have been unscaled). ``sums``:
the fused descent's [Σ g(w + e)², Σ ⟨g(w), g(w + e)⟩] (the dot only when ``fused_dot``)."""

SCRATCH_KEY = "telemetry_g"
"""Per-parameter ``sam.state`` entry holding the copy of g(w) from ``first_step`` to the descent."""

_PERTURB_EPS = inspect.signature(ops.perturb_).parameters["eps"].default  # what SAM's first_step uses


def _modifier_copies(sam, params: list[torch.Tensor], grads: list[torch.Tensor]) -> Optional[list[torch.Tensor]]:
    """A descent modifier's own copy of g(w) (LookSAM's, taken in first_step) when every param has one, else None."""
    for m in sam.modifiers:
        copies = m.first_grads(sam, params)
        if copies is not None and all(f is not None and f.shape == g.shape for f, g in zip(copies, grads)):
            return copies
    return None


def _kept(scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A copy of a loss scale for the records: the scaler's own tensor changes at ``scaler.update()``."""
    return None if scale is None else scale.clone()


def _locals(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensor gradients (FSDP2), where their data and version counters live."""
    return [g.to_local() for g in grads] if grads and dtensor.is_dtensor(grads[0]) else grads


def _versions(grads: list[torch.Tensor]) -> list[int]:
    return [g._version for g in _locals(grads)]


def _starts(grads: list[torch.Tensor]) -> set[int]:
    """Data pointers (0, an empty tensor's, left out: a false match would only cost the cosine of a step)."""
    return set(map(torch.Tensor.data_ptr, _locals(grads))) - {0}


def _elem_size(dtype: str) -> int:
    dt = getattr(torch, dtype, None)
    return dt.to_real().itemsize if isinstance(dt, torch.dtype) else 4


def record_bytes(records) -> dict[str, int]:
    """backend -> bytes at the ops' floors for a list of :class:`sam_kernels.ops.dispatch.Record`."""
    out: dict[str, int] = {}
    for r in records:
        units, extra = FLOOR_UNITS.get(r.op, (0, 0))
        units += r.extra_lists  # lists read or written beyond the op's own (ascent_grads, grad_copies)
        for p in r.parts:
            out[p.backend] = out.get(p.backend, 0) + (units * _elem_size(p.dtype) + extra) * p.elements
    return out


class FusedSums:
    """The fused descent's telemetry arguments for one SAM step (ours): ``sums`` (2 elements,
    zeroed) gets [Σ g(w + e)², Σ ⟨g(w), g(w + e)⟩] added by every launch; ``ascent_of``: id(param) →
    g(w), or None (no dot). ``dot_ok`` turns False when a launch dropped the dot because the kernel
    rejected a g(w) (its param was cast or moved between the passes): the cosine is then unknown."""

    def __init__(self, ascent_of: Optional[dict], sums: torch.Tensor):
        self.ascent_of, self.sums, self.dot_ok = ascent_of, sums, True


class Telemetry:
    """The telemetry and counters of one optimizer (``SAM.telemetry``); see the module docstring.

    ``mode``: ``"norms"`` (every value but the cosine; the optimizers' default), True (every value)
    or False (counters only); ``decay``: EMA factor in [0, 1); ``ascent_steps``: the ascents of a SAM
    step (one pass each, then the descent's: 1 + ``ascent_steps`` passes).
    """

    def __init__(self, mode: Union[bool, str] = "norms", decay: float = 0.9, ascent_steps: int = 1):
        if not (mode is False or mode is True or mode == "norms"):
            raise ValueError(f"telemetry must be False, True or 'norms', got {mode!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"telemetry_decay must be in [0, 1), got {decay}")
        self.enabled, self.cosine, self.decay = mode is not False, mode is True, float(decay)
        self.last: Optional[torch.Tensor] = None  # [5] fp32, VALUES order
        self.ema: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None  # [5] count of finite values folded into the EMAs
        self.steps = 0
        self.sam_steps = 0
        self.ascent_steps = ascent_steps  # a SAM step's passes follow from sam_steps: no float grows in a graph
        # passes beyond a SAM step's (1 + ascent_steps) x 2 and a plain step's 1 + 1 (ESAM's SDS): host floats changed only
        # by a variant's count, so a compiled step never reads and rewrites a float that grows every step
        self.extra_passes = (0.0, 0.0)
        self.bytes_by_backend: dict[str, int] = {}
        self.pending: dict = {}  # this SAM step's values, from first_step to the end of the descent
        self.passes: Optional[tuple[float, float]] = None  # a variant's pass count for this step (ESAM)
        self.counting = False  # inside an optimizer method whose op calls are being counted
        self.hold_grads = True  # the cosine references g(w) (no copy) until a loop is seen writing it in place
        self.records: list[dict] = []  # raw values of the SAM steps since the last fold (_fold)

    # ------------------------------------------------------------------ inside the step

    def on_loss(self, which: str, loss: Optional[torch.Tensor]) -> None:
        """Remember L(w) (``which="before"``) or L(w + e) (``"after"``) of this step (a tensor, not read)."""
        if loss is not None and self.enabled:
            loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            self.pending[which] = loss if loss.dim() == 0 else loss.float().mean()

    def perturb_options(self, sam, ascent: "Ascent") -> dict:
        """The ``perturb_`` arguments telemetry adds to an ascent: ``perturbation_sq``, the zero tensor
        it adds ‖e‖² (as applied) into, unless ‖e‖ follows from the norm (plain SAM); ``grad_copies``,
        the buffers it copies g(w) into in its pass, when the cosine needs a copy: the loop writes
        p.grad in place (or the step is compiled) and no modifier keeps a copy of its own (every param
        with a gradient is perturbed then: no ``ascent_params`` subset)."""
        params, grads = ascent.params, ascent.grads
        if not self.enabled or not params:
            return {}
        out = {}
        if ascent.plain_rho is None:
            out["perturbation_sq"] = torch.zeros((), dtype=acc_dtype(params[0].dtype), device=params[0].device)
        if (self.cosine and not ascent.subset and not self._holding()
                and _modifier_copies(sam, params, grads) is None):
            out["grad_copies"] = self._buffers(sam, params, grads)
        return out

    def _holding(self) -> bool:
        """Whether the cosine references g(w) itself (no copy): no loop was seen writing p.grad in
        place, and the step is not compiled (a trace cannot check version counters)."""
        return self.hold_grads and not torch.compiler.is_compiling()

    def on_ascent(self, sam, ascent: "Ascent") -> None:
        """After a successful perturbation: g(w) held or copied, ‖g(w)‖², ‖e‖² (device tensors, kept
        raw until the next fold)."""
        if not self.enabled:
            return
        keep = {k: v for k, v in self.pending.items() if k == "before"}
        self.pending = keep
        everyone = groups.with_grads(sam.param_groups) if ascent.subset else ascent.entries
        sq = ascent.sq
        if not everyone or sq is None:
            return
        whole = len(everyone) == len(ascent.entries)
        if whole and not any(g["adaptive"] for g in sam.param_groups):
            # the ascent norm is the plain ‖g‖² of the same list (an ascent's own ``sq_norm`` option,
            # ESAM's or Sparse SAM's, changes what perturb_ divides by, not ``ascent.sq``)
            g1_sq = sq
        elif ascent.whole_sq is not None and not any(g["adaptive"] for g in sam.param_groups):
            g1_sq = ascent.whole_sq  # SAM-ON: the ascent norm plus the skipped groups' (read once, in the step)
        else:
            g1_sq = groups.grads_sq_norm([p.grad for _, p in everyone], sam.backend)
        firsts = None  # (params, their g(w)), aligned: what the cosine's dot reads at the descent
        if self.cosine:
            params = [p for _, p in everyone]
            grads = [p.grad for p in params]
            kept = _modifier_copies(sam, params, grads)
            copied = ascent.options.get("grad_copies")
            if kept is not None:
                firsts = (params, kept)
            elif copied is not None:
                firsts = (params, copied)
            elif self._holding():
                # g(w) itself: the loop replaces p.grad (zero_grad's set_to_none), so the tensor stays
                # intact while referenced; on_descent() checks that (version counter, storage).
                firsts = (params, grads)
                self.pending["held"] = (_versions(grads), _starts(grads))
            else:
                firsts = (params, self._copies(sam, params, grads))
        # raw device scalars only: the maths runs batched at the next fold (_fold)
        self.pending.update(firsts=firsts, g1_sq=g1_sq, scale=_kept(ascent.scale), plain_rho=ascent.plain_rho,
                            e_sq=ascent.options.get("perturbation_sq"))

    def _buffers(self, sam, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Buffers for a copy of g(w) in ``sam.state``, made like each grad."""
        copies = []
        for p, g in zip(params, grads):
            b = sam.state[p].get(SCRATCH_KEY)
            if b is None or b.shape != g.shape or b.dtype != g.dtype or b.device != g.device or b.stride() != g.stride():
                b = sam.state[p][SCRATCH_KEY] = torch.empty_like(g, memory_format=torch.preserve_format)
            copies.append(b)
        return copies

    def _copies(self, sam, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """A copy of g(w) (a perturbation of a subset: ESAM's selection)."""
        copies = self._buffers(sam, params, grads)
        ops.restore_(copies, grads, backend=sam.backend)  # a bitwise list copy
        return copies

    def on_descent(self, sam, params: list[torch.Tensor], grads: list[torch.Tensor], sq: Optional[torch.Tensor],
                   scale: Optional[torch.Tensor], sparse: bool) -> Optional[torch.Tensor]:
        """In a SAM step's descent, before the modifiers: ‖g(w + e)‖ and the cosine, or the ``sums``
        tensor the fused descent fills with both (:meth:`fused_args`). ``sq``: ‖g(w + e)‖² (scaled)
        when the descent has it; returns it, or the one computed here (for the modifiers).
        ``sparse``: whether any of ``grads`` is sparse."""
        if not self.enabled or not grads or "g1_sq" not in self.pending:
            return sq
        self.pending["scale2"] = _kept(scale)
        firsts = self.pending.get("firsts")
        ascent = self._ascent_grads(firsts, params, grads) if firsts is not None else None
        every = ascent is not None and len(firsts[0]) == len(params) and all(a is not None for a in ascent)
        # sparse gradients take the base optimizer's own step, not the fused descent
        if not sparse and not sam.modifiers and fused_kind(sam.base_optimizer) is not None and (
                every or (sq is None and (ascent is None or not any(a is not None for a in ascent)))):
            # the descent's own pass reads g(w + e): it adds ‖g(w + e)‖² (and the dot with g(w)) to sums.
            # (A g(w) whose dtype or device no longer matches is rejected by the kernel: see FusedSums.)
            sums = torch.zeros(2, dtype=acc_dtype(grads[0].dtype), device=grads[0].device)
            self.pending["fused"] = FusedSums(dict(zip(map(id, params), ascent)) if every else None, sums)
            if sq is not None:
                self.pending["g2_sq"] = sq
            return sq
        g2_sq = sq if sq is not None else groups.grads_sq_norm(grads, sam.backend, sparse)
        self.pending["g2_sq"] = g2_sq
        # the pairs whose g(w) still matches g(w + e) (a param cast or moved between the passes has none)
        both = [] if ascent is None else [(a, g) for a, g in zip(ascent, grads) if a is not None and
                                          a.shape == g.shape and a.dtype == g.dtype and a.device == g.device]
        if not both:  # telemetry="norms", or no tensor has both gradients
            return g2_sq
        a, b = [x for x, _ in both], [y for _, y in both]
        self.pending.update(
            dot=ops.dot(a, b, backend=sam.backend),
            n1=None if len(both) == len(firsts[0]) else ops.grad_sq_norm(a, backend=sam.backend),
            n2=None if len(both) == len(grads) else ops.grad_sq_norm(b, backend=sam.backend))
        return g2_sq

    def _ascent_grads(self, firsts: tuple, params: list[torch.Tensor],
                      grads: list[torch.Tensor]) -> Optional[list[Optional[torch.Tensor]]]:
        """g(w) aligned with the descent's ``params`` (None where a param has none); None when a held
        g(w) was written."""
        held = self.pending.pop("held", None)
        if held is not None and not self._intact(firsts[1], held, grads):
            return None
        if len(firsts[0]) == len(params) and all(map(operator.is_, firsts[0], params)):
            ascent = list(firsts[1])  # the usual case: the same params in the same order
        else:
            of = dict(zip(map(id, firsts[0]), firsts[1]))
            ascent = [of.get(id(p)) for p in params]
        return ascent

    def _intact(self, held_grads: list[torch.Tensor], held: tuple, grads: list[torch.Tensor]) -> bool:
        """Whether the held g(w) tensors still hold g(w): none was written since first_step (version
        counters), none is a p.grad again and no g(w + e) starts in its memory. If one fails, the loop
        zeroes or accumulates p.grad in place: this step's cosine is unknown (NaN) and later steps keep
        a copy of g(w) instead."""
        versions, starts = held
        if (_versions(held_grads) == versions and not set(map(id, grads)).intersection(map(id, held_grads))
                and starts.isdisjoint(_starts(grads))):
            return True
        self.hold_grads = False
        warnings.warn("telemetry: the first-pass gradients g(w) were written before the descent (the loop zeroes or "
                      "accumulates p.grad in place, e.g. zero_grad(set_to_none=False), or DDP's "
                      "gradient_as_bucket_view): grad_cosine is NaN for this step, and from the next step on the "
                      "optimizer keeps a copy of g(w) (one more write of the gradients per SAM step)",
                      RuntimeWarning, stacklevel=5)
        return False

    def fused_args(self) -> Optional["FusedSums"]:
        """What the fused descent of this SAM step adds its sums into, when telemetry wants them."""
        return self.pending.get("fused")

    def on_finish(self, sam, sam_step: bool) -> None:
        """End of an optimizer step: counters; on a SAM step, its raw values join the records that
        the next fold turns into values and averages (every ``FOLD`` SAM steps, at ``stats()`` and
        ``state_dict()``; every step inside a compiled step)."""
        self.steps += 1
        if self.passes is not None:
            usual = 1.0 + self.ascent_steps if sam_step else 1.0
            self.extra_passes = (self.extra_passes[0] + self.passes[0] - usual,
                                 self.extra_passes[1] + self.passes[1] - usual)
            self.passes = None
        if sam_step:
            self.sam_steps += 1
        pending, self.pending = self.pending, {}
        if not (self.enabled and sam_step and "g1_sq" in pending):
            return
        fused = pending.get("fused")
        if fused is not None:
            pending["sums"], pending["fused_dot"] = fused.sums, fused.ascent_of is not None and fused.dot_ok
        pending["found"] = sam.step_state.found  # AMP overflow of this step (skipped): keeps the old values
        self.records.append({k: pending.get(k) for k in _RECORD})
        if len(self.records) >= FOLD or torch.compiler.is_compiling():
            self._fold()

    def _fold(self) -> None:
        """The recorded SAM steps' values (5 per step) and their averages, batched on the device: a
        few dozen small ops for up to ``FOLD`` steps instead of per step (no host sync). The EMA
        recurrence ema ← d·ema + (1 − d)·v over the steps whose value is finite (and not an AMP
        overflow), starting at the first such value, is summed in closed form: v_t weighs
        (1 − d)·d^(later folds), the very first d^(later folds), the old average d^(folds)."""
        records, self.records = self.records, []
        if not records:
            return
        device = records[0]["g1_sq"].device
        nan = torch.full((), math.nan, device=device)
        one = torch.ones((), device=device)

        for r in records:  # the fused descent's sums, where the step had them
            if r["sums"] is not None:
                r["g2_sq"] = r["sums"][0] if r["g2_sq"] is None else r["g2_sq"]
                r["dot"] = r["sums"][1] if r["fused_dot"] else None

        def col(key: str, default: Optional[torch.Tensor] = nan, fallback: Optional[str] = None) -> torch.Tensor:
            xs = [r[key] if r[key] is not None else (r[fallback] if fallback and r[fallback] is not None else default)
                  for r in records]
            return torch.stack([x.to(device=device, dtype=torch.float32) for x in xs])

        g1, s2 = col("g1_sq"), col("scale", one).square()
        g2 = col("g2_sq") / col("scale2", one).square()
        cosine = col("dot") / (col("n1", fallback="g1_sq") * col("n2", fallback="g2_sq")).sqrt()
        rhos = {r["plain_rho"] for r in records}  # one rho (or none) in the usual run: a fill, no copy
        rho = (torch.full((len(records),), math.nan if rhos == {None} else rhos.pop(), device=device)
               if len(rhos) == 1 else
               torch.tensor([math.nan if r["plain_rho"] is None else r["plain_rho"] for r in records],
                            dtype=torch.float32).to(device, non_blocking=True))  # pageable: staged, no sync
        r = g1.sqrt()
        # plain SAM: ‖e‖ = rho·‖g‖/(‖g‖ + eps·S); a non-finite norm leaves w unperturbed (e = 0)
        plain = torch.nan_to_num(rho * r / (r + _PERTURB_EPS * s2.sqrt()), nan=0.0, posinf=0.0)
        e = torch.where(rho.isnan(), col("e_sq").sqrt(), plain)
        sharp = col("after") - col("before")
        v = torch.stack([(g1 / s2).sqrt(), g2.sqrt(), cosine, e, sharp], dim=1)  # [K, 5]
        ok = col("found", torch.zeros((), device=device)).eq(0)
        if self.last is None:
            self.last = torch.full((5,), math.nan, device=device)
            self.ema = torch.zeros(5, device=device)
            self.seen = torch.zeros(5, device=device)
        last, ema, seen = (t.to(device) for t in (self.last, self.ema, self.seen))
        steps = torch.arange(len(records), device=device)
        newest = torch.where(ok, steps, -1).max()  # the last step that was not an AMP overflow
        row = torch.where((steps == newest)[:, None], v, 0.0).sum(0)  # its values (no data-dependent indexing)
        self.last = torch.where(newest >= 0, row, last)
        fold = (torch.isfinite(v) & ok[:, None]).float()
        counted = fold.cumsum(0)
        total = counted[-1]
        d = self.decay
        later = torch.pow(d, total - counted)  # d^(folds after step t)
        first = (fold > 0) & (counted == 1) & (seen == 0)
        weight = torch.where(first, later, (1 - d) * later * fold)
        self.ema = torch.where(seen > 0, ema * torch.pow(d, total), 0.0) + (weight * torch.where(fold > 0, v, 0.0)).sum(0)
        self.seen = seen + total

    @property
    def forward_passes(self) -> float:
        """Forward passes in full-batch equivalents (a SAM step 1 + ascent_steps, a plain step 1, plus a
        variant's extra)."""
        return float(self.steps + self.sam_steps * self.ascent_steps) + self.extra_passes[0]

    @property
    def backward_passes(self) -> float:
        """Backward passes in full-batch equivalents (as :attr:`forward_passes`)."""
        return float(self.steps + self.sam_steps * self.ascent_steps) + self.extra_passes[1]

    def on_ascent_again(self) -> None:
        """A later ascent of a multi-step one moved the weights again: ‖e‖ of the whole ascent is not
        the first ascent's, and is not measured (NaN; the norms, cosine and sharpness stay)."""
        if "plain_rho" in self.pending:
            self.pending.update(plain_rho=None, e_sq=None)

    def on_discard(self) -> None:
        """The step was undone (``restore``): forget its pending values."""
        self.pending = {}
        self.passes = None

    def add_bytes(self, records) -> None:
        for backend, n in record_bytes(records).items():
            self.bytes_by_backend[backend] = self.bytes_by_backend.get(backend, 0) + n

    # ------------------------------------------------------------------ reading

    def stats(self, ema: bool = False) -> dict[str, float]:
        """The dict of ``SAM.stats()``: one host sync (reading the device values), none when they do
        not exist. The values are NaN while telemetry is off (even if a state dict brought some), the
        cosine while it is ``"norms"``."""
        self._fold()
        values = [math.nan] * 5
        source = self.ema if ema else self.last
        if source is not None and self.enabled:
            if ema:
                both = torch.cat([source, self.seen.to(source.device)]).tolist()  # the one sync
                values = [v if n > 0 else math.nan for v, n in zip(both[:5], both[5:])]
            else:
                values = source.tolist()  # the one sync
        if not self.cosine:
            values[2] = math.nan
        out = dict(zip(VALUES, (float(v) for v in values)))
        out.update(steps=float(self.steps), sam_steps=float(self.sam_steps),
                   sam_step_fraction=self.sam_steps / self.steps if self.steps else math.nan,
                   forward_passes=float(self.forward_passes), backward_passes=float(self.backward_passes),
                   optimizer_bytes=float(sum(self.bytes_by_backend.values())))
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        self._fold()
        return {"last": self.last, "ema": self.ema, "seen": self.seen, "steps": self.steps,
                "sam_steps": self.sam_steps, "forward_passes": self.forward_passes,
                "backward_passes": self.backward_passes, "bytes_by_backend": dict(self.bytes_by_backend),
                "hold_grads": self.hold_grads}

    def load_state_dict(self, state: dict) -> None:
        self.last, self.ema, self.seen = (None if state.get(k) is None else state[k].clone()
                                          for k in ("last", "ema", "seen"))
        self.steps, self.sam_steps = int(state.get("steps", 0)), int(state.get("sam_steps", 0))
        usual = float(self.steps + self.sam_steps * self.ascent_steps)
        self.extra_passes = (float(state.get("forward_passes", usual)) - usual,
                             float(state.get("backward_passes", usual)) - usual)
        self.bytes_by_backend = dict(state.get("bytes_by_backend", {}))
        self.hold_grads = bool(state.get("hold_grads", True))
        self.pending, self.passes, self.records = {}, None, []


def every(optimizer, n: int, callback: Callable[[dict], object], *, ema: bool = False):
    """Call ``callback(optimizer.stats(ema=ema))`` after every ``n``-th optimizer step (a step post
    hook; one host sync each time it fires). Works with ``print``, a TensorBoard ``SummaryWriter``
    or ``wandb.log`` wrapped in a lambda. Returns the hook handle (``.remove()`` to stop)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"every: n must be an int >= 1, got {n!r}")

    def hook(opt, args, kwargs) -> None:
        if opt.telemetry.steps % n == 0:
            callback(opt.stats(ema=ema))

    return optimizer.register_step_post_hook(hook)
