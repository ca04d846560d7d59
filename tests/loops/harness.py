"""The loop matrix's driver: one variant (a ``VariantInfo`` row) in one training loop, stepped in
lockstep with its hand reference.

``Run`` holds the model and optimizer under test and the reference (float64 weights, plain-torch
maths). Each loop method takes one optimizer step the way a user writes it, reads from the
optimizer only what the reference takes as input (SAM step or not, masks, ESAM's selections),
then advances the reference by one step on its own weights. ``check`` compares the two.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Optional

import torch
from torch.func import functional_call

from sam_kernels.ops import dispatch
from tests.optim.hand_reference import clip
from tests.optim.variants import STEPS, VariantInfo, loss_fn, make_batches, make_model

Micro = list  # micro-batches [(x, y), ...] of one step; the loss of each is divided by their count

TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-6, 2e-5)}


@dataclasses.dataclass
class Record:
    """What the reference needs of one step: was it a SAM step, the probe's inputs, ESAM's sample indices."""
    sam: bool = False
    inputs: dict = dataclasses.field(default_factory=dict)
    indices: Optional[torch.Tensor] = None


def inject_inf(model: torch.nn.Module) -> None:
    """An overflow: one Inf in the first parameter's gradient."""
    g = next(model.parameters()).grad
    g.view(-1)[0] = float("inf")


def inf_on_next_backward(model: torch.nn.Module) -> None:
    """An overflow in the next backward (for steps that run the backward themselves)."""
    p = next(model.parameters())

    def hook(g):
        handle.remove()
        g = g.clone()
        g.view(-1)[0] = float("inf")
        return g
    handle = p.register_hook(hook)


@contextlib.contextmanager
def only_kernels_of(backend: str, what: str):
    """Asserts that every op call of the block ran on ``backend`` (``what``: its kernels, for the
    message), none on the eager fallback, and that some op call was made."""
    with dispatch.recording() as log:
        yield
    assert log, "no op call was made"
    others = sorted({(r.op, p.backend) for r in log for p in r.parts if p.backend != backend})
    assert not others, f"op calls that did not run {what}: {others}"


class Run:
    def __init__(self, info: VariantInfo, backend: Optional[str] = None, *, dtype=torch.float64, steps: int = STEPS,
                 model_fn: Callable = make_model, autocast: Optional[torch.dtype] = None, scaler=None, **extra):
        self.info, self.backend, self.dtype, self.extra = info, backend, dtype, extra
        self.model = model_fn(dtype)
        self.oracle = copy.deepcopy(self.model)  # its forward only: functional_call on the reference weights
        self.names = [n for n, _ in self.model.named_parameters()]
        self.autocast = autocast
        self.scaler = scaler
        self.opt = info.build(self.model, backend, **({"grad_scaler": scaler} if scaler is not None else {}), **extra)
        self.ref = info.reference(self.model)
        self.data = make_batches(steps, dtype)

    # ------------------------------------------------------------------ forward, reference gradients

    def _autocast(self):
        return torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def loss(self, x, y, reduction="mean"):
        x = x.to(next(self.model.parameters()).dtype)  # the data follows a mid-run cast of the model
        with self._autocast():
            out = self.model(x)
        return loss_fn(out.float() if self.autocast else out, y, reduction)

    def backward(self, micro: Micro) -> None:
        for x, y in micro:
            loss = self.loss(x, y) / len(micro)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def grads(self, ws, micro: Micro, indices=None) -> list[torch.Tensor]:
        """The gradient at weights ``ws`` (float64 list) of the same loss, by autograd in the model's dtype."""
        leaves = [w.to(self.dtype).detach().requires_grad_() for w in ws]
        params = dict(zip(self.names, leaves))
        total = 0
        for x, y in micro:
            if indices is not None:
                x, y = x[indices], y[indices]
            x = x.to(self.dtype)
            with self._autocast():
                out = functional_call(self.oracle, params, (x,))
            total = total + loss_fn(out.float() if self.autocast else out, y) / len(micro)
        return [g.double() for g in torch.autograd.grad(total, leaves)]

    def reference_step(self, rec: Record, micro: Micro, clip1: Optional[float] = None,
                       clip2: Optional[float] = None) -> None:
        def g1_at(ws):
            g1 = self.grads(ws, micro)
            return clip(g1, clip1) if clip1 is not None else g1

        def g2_at(ws):
            g2 = self.grads(ws, micro, rec.indices)
            return clip(g2, clip2) if clip2 is not None else g2
        # bSAM's first pass is at a noisy sample the reference draws itself: it takes the function
        g1 = g1_at if getattr(self.ref, "first_pass_at_sample", False) else g1_at(self.ref.ws)
        extra = {"ascent_at": g1_at} if self.info.ascent_steps > 1 else {}  # later ascents, clipped as the first
        self.ref.step(g1, g2_at, sam=rec.sam, **rec.inputs, **extra)

    def check(self, what: str = "", tol=None) -> None:
        atol, rtol = tol or TOL[self.dtype]
        for name, p, w in zip(self.names, self.model.parameters(), self.ref.ws):
            torch.testing.assert_close(p.detach().double(), w, atol=atol, rtol=rtol,
                                       msg=lambda m: f"{self.info.name} {what} {name}: {m}")

    # ------------------------------------------------------------------ reading the step

    def sam_steps(self) -> int:
        return int(self.opt.stats()["sam_steps"])

    def probe(self, rec: Record) -> None:
        if self.info.probe is not None:
            rec.inputs = self.info.probe(self.opt)

    def ascent_pass(self):
        return self.opt.ascent_pass() if hasattr(self.opt, "ascent_pass") else contextlib.nullcontext()

    # ------------------------------------------------------------------ the loops

    def gradient_pass(self, micro: Micro, overflow: bool, unscale: bool, clip: Optional[float]) -> None:
        """One pass of a loop's step as a user writes it: backward (scaled under AMP), then, where the
        loop asks, an Inf in a gradient (``overflow``), ``scaler.unscale_`` and gradient clipping."""
        self.backward(micro)
        if overflow:
            inject_inf(self.model)
        if unscale:
            self.scaler.unscale_(self.opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)

    def manual(self, micro: Micro, *, clip1=None, clip2=None, unscale=None, overflow=None,
               midstep: Optional[Callable[["Run"], None]] = None, step_with=None) -> Record:
        """The README's manual loop. With a scaler: ``unscale`` in {None, "first", "second"} is where
        ``scaler.unscale_`` goes, ``overflow`` in {None, 1, 2} the pass that gets an Inf, and
        ``scaler.step(opt)`` ends the step. ``midstep(run)`` runs between first_step and the second pass
        (it may replace ``run.model``/``run.opt``, as a checkpoint reload does). A multi-step ascent
        (``info.ascent_steps``) calls ``first_step`` once per pass, ``clip1`` on each ascent pass;
        ``overflow=2`` is then its last (descent) pass. One-pass variants: :meth:`one_pass`."""
        if self.info.one_pass:
            return self.one_pass(micro, clip1=clip1, unscale=unscale, overflow=overflow, midstep=midstep,
                                 step_with=step_with)
        rec = Record()
        with self.ascent_pass():
            self.gradient_pass(micro, overflow == 1, unscale == "first", clip1)
        if self.opt.wants_sam():
            rec.sam = True
            first_step = (step_with or {}).get("first_step", self.opt.first_step)
            first_step()
            for _ in range(self.info.ascent_steps - 1):
                self.opt.zero_grad()
                self.gradient_pass(micro, False, False, clip1)
                first_step()
            self.opt.zero_grad()  # outside the step: torch.optim's zero_grad does not trace
            self.probe(rec)
            if midstep is not None:
                midstep(self)
            self.gradient_pass(micro, overflow == 2, unscale == "second", clip2)
            if self.scaler is not None:
                self.scaler.step(self.opt)
            else:
                (step_with or {}).get("second_step", self.opt.second_step)()
        elif self.scaler is not None:
            self.scaler.step(self.opt)
        else:
            (step_with or {}).get("base_step", self.opt.base_step)()
        if self.scaler is not None:
            self.scaler.update()
        self.opt.zero_grad()
        return rec

    def one_pass(self, micro: Micro, *, clip1=None, unscale=None, overflow=None,
                 midstep: Optional[Callable[["Run"], None]] = None, step_with=None) -> Record:
        """A one-pass step (Momentum-SAM): backward at the weights the model holds, then ``step()``
        (``scaler.step(opt)``). ``midstep`` runs before the backward, where the model holds its perturbed
        weights; only ``overflow=1`` and ``unscale="first"`` have a pass to act on."""
        if midstep is not None:
            midstep(self)
        self.gradient_pass(micro, overflow == 1, unscale == "first", clip1)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            (step_with or {}).get("step", self.opt.step)()
        self.opt.zero_grad()
        return Record()

    def closure(self, micro: Micro, *, first_pass: bool = False, zeroed: bool = False, clip2=None,
                unscale=None, overflow=None) -> Record:
        """``step(closure)`` (ESAM: its per-sample closure, both passes inside ``step``).

        ``first_pass``: no gradient before ``step`` (the closure gives the first pass too);
        ``zeroed``: ``zero_grad(set_to_none=False)`` before ``step`` and inside the closure.
        With a scaler: ``scaler.step(opt, closure)``; ``unscale`` in {None, "first", "closure"};
        ``overflow`` in {None, 1, 2}."""
        if self.info.per_sample_closure:
            return self._per_sample_closure(micro, zeroed=zeroed, overflow=overflow)
        rec = Record()
        before = self.sam_steps()
        calls = []
        if zeroed:
            self.opt.zero_grad(set_to_none=False)
        elif not first_pass:
            self.backward(micro)
            if overflow == 1:
                inject_inf(self.model)
            if unscale == "first":
                self.scaler.unscale_(self.opt)

        def closure():
            if zeroed:
                self.opt.zero_grad(set_to_none=False)
            calls.append(1)
            loss = sum(self.loss(x, y) / len(micro) for x, y in micro)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            pass_no = len(calls) + (0 if first_pass or zeroed else 1)  # which pass this call gives
            descent = 1 + self.info.ascent_steps  # the last pass (2 but for a multi-step ascent)
            if pass_no == descent:
                self.probe(rec)
            if overflow is not None and pass_no == (1 if overflow == 1 else descent):
                inject_inf(self.model)
            if clip2 is not None and pass_no == descent:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip2)
            if unscale == "closure":
                self.scaler.unscale_(self.opt)
            return loss
        if self.scaler is not None:
            self.scaler.step(self.opt, closure)
            self.scaler.update()
        else:
            self.opt.step(closure)
        self.opt.zero_grad(set_to_none=not zeroed)  # zeroed: the buffers stay, all zero
        rec.sam = self.sam_steps() > before
        return rec

    def _per_sample_closure(self, micro: Micro, zeroed: bool = False, overflow=None) -> Record:
        """ESAM's protocol: ``step`` runs both passes (no gradient before it; ``zeroed``: zero buffers)."""
        (x, y), = micro
        rec = Record()
        before = self.sam_steps()
        calls = []

        def closure(indices=None):
            if torch.is_grad_enabled():  # not the no-grad forward of data selection
                calls.append(indices)
                if len(calls) == 2:
                    self.probe(rec)
                    rec.indices = indices
                if overflow == len(calls):  # ESAM runs the backward after the closure returns
                    inf_on_next_backward(self.model)
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            return self.loss(xs, ys, reduction="none")
        self.opt.zero_grad(set_to_none=not zeroed)
        if self.scaler is not None:
            self.scaler.step(self.opt, closure)
            self.scaler.update()
        else:
            self.opt.step(closure)
        self.opt.zero_grad(set_to_none=not zeroed)
        rec.sam = self.sam_steps() > before
        return rec

    # ------------------------------------------------------------------ whole runs

    def train(self, loop: str = "manual", steps: Optional[int] = None, check_each: bool = True, **kw) -> None:
        """``steps`` steps of ``loop`` ("manual" or "closure"), the reference in lockstep."""
        for t, (x, y) in enumerate(self.data[:steps]):
            micro = [(x, y)]
            rec = getattr(self, loop)(micro, **kw)
            self.reference_step(rec, micro, kw.get("clip1"), kw.get("clip2"))
            if check_each:
                self.check(f"{loop} step {t}")
