"""fp16 GradScaler loops of every variant, and their hand reference in float64 plain torch.

The model's weights are fp32 and its forward runs without autocast: loss scales are powers of 2, so
a scaled gradient is exactly S times the unscaled one, and an AMP run must follow the float64 hand
reference of the unscaled maths to fp32 rounding. What the tests check is the scaler bookkeeping:
which scale each pass carries wherever ``scaler.unscale_`` goes, and which steps an overflow skips
(a skipped step leaves the weights and the base optimizer's state bitwise as they were, and
``scaler.update()`` halves the scale).

The reference transcribes the formulas: SAM (Foret et al. 2021), ASAM (Kwon et al. 2021), Stable
SAM's renormalization, LookSAM's g_v and its reuse, AE-SAM's threshold test, Sparse SAM's masked
perturbation, ESAM's per-tensor SWP, and torch.optim.SGD with momentum. Decisions drawn at random
(SS-SAM's coin, Sparse SAM's random mask, ESAM's tensor selection) are read from the optimizer under
test; LookSAM's and AE-SAM's decisions are computed here and the tests compare them.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

import sam_kernels as sk

SCALE = 1024.0
RHO, LR, MOMENTUM, ETA = 0.1, 0.1, 0.9, 0.01
EPS = 1e-12                # the epsilon of SAM's, Stable SAM's and LookSAM's denominators
CLIP = 0.05                # clip_grad_norm_'s max_norm: below every gradient norm of these batches, so it bites
K, ALPHA = 2, 0.7          # LookSAM: a SAM step at steps 0, 2, ...; the reuse weight
AE_STEPS, AE_DECAY, AE_L1, AE_L2 = 8, 0.9, -1.0, 1.0
BETA = 0.6                 # ESAM's per-tensor selection probability
STEPS = 4
SEED = 3

VARIANTS = ("sam", "asam", "sssam", "stable", "looksam", "aesam", "aelooksam", "sparse", "esam")


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def make_data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)  # AE-SAM: SAM steps 0-2, a plain step 3
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


def make_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=SCALE)


def build(variant: str, params, scaler, backend: str, **extra) -> sk.SAM:
    kw = dict(lr=LR, momentum=MOMENTUM, grad_scaler=scaler, backend=backend, **extra)
    sgd = torch.optim.SGD
    if variant == "sam":
        return sk.SAM(params, sgd, rho=RHO, **kw)
    if variant == "asam":
        return sk.SAM(params, sgd, rho=RHO, adaptive=True, eta=ETA, **kw)
    if variant == "sssam":
        return sk.SSSAM(params, sgd, rho=RHO, p=0.5, seed=0, **kw)  # SAM, plain, SAM, SAM
    if variant == "stable":
        return sk.StableSAM(params, sgd, rho=RHO, **kw)
    if variant == "looksam":
        return sk.LookSAM(params, sgd, rho=RHO, k=K, alpha=ALPHA, **kw)
    if variant == "aesam":
        return sk.AESAM(params, sgd, rho=RHO, total_steps=AE_STEPS, decay=AE_DECAY, l1=AE_L1, l2=AE_L2, **kw)
    if variant == "aelooksam":
        return sk.AELookSAM(params, sgd, rho=RHO, total_steps=AE_STEPS, decay=AE_DECAY, l1=AE_L1, l2=AE_L2,
                            alpha=ALPHA, **kw)
    if variant == "sparse":
        return sk.SparseSAM(params, sgd, rho=RHO, sparsity=0.5, mask="random", seed=SEED, **kw)
    if variant == "esam":
        return sk.ESAM(params, sgd, rho=RHO, beta=BETA, seed=SEED, **kw)
    raise ValueError(variant)


def loss_of(model, x, y, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction=reduction)


def clip(model) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)


# --------------------------------------------------------------------------- overflow

class Overflow:
    """An Inf in element 0 of every gradient that backward pass ``pass_no`` of step ``step`` makes
    (a tensor hook on each parameter; ``at(step, pass_no)`` says which backward runs next)."""

    def __init__(self, model, step: Optional[int], pass_no: Optional[int]):
        self.target = None if pass_no is None else (step, pass_no)
        self.now: Optional[tuple[int, int]] = None
        for p in model.parameters():
            p.register_hook(self._hook)

    def at(self, step: int, pass_no: int) -> None:
        self.now = (step, pass_no)

    def on(self, model) -> "Overflow":
        """The same injection on another model's parameters (one loaded from a checkpoint)."""
        return Overflow(model, *(self.target or (None, None)))

    def _hook(self, g: torch.Tensor) -> torch.Tensor:
        if self.target is None or self.now != self.target:
            return g
        g = g.clone()
        g.view(-1)[0] = math.inf
        return g


# --------------------------------------------------------------------------- the loops

@dataclass
class Record:
    """What one step of a loop did, as the reference needs it."""
    sam: bool = False
    selected: Optional[list[bool]] = None    # ESAM: which tensors were perturbed
    masks: Optional[list[torch.Tensor]] = None  # Sparse SAM: the masks of this step
    indices: Optional[torch.Tensor] = None   # ESAM SDS: the second pass's samples
    clip_single: bool = False                # a plain step whose one pass was unscaled and clipped


def read_choices(opt, rec: Record) -> None:
    rec.sam = True
    params = [p for g in opt.param_groups for p in g["params"]]
    if isinstance(opt, sk.ESAM):
        chosen = opt.selected()
        rec.selected = [True] * len(params) if chosen is None else [any(p is q for q in chosen) for p in params]
    if isinstance(opt, sk.SparseSAM):
        rec.masks = [m.clone() for m in opt.masks]


def manual_step(opt, model, scaler, x, y, t: int, place, overflow: Overflow, finish: str = "scaler") -> Record:
    """The manual loop: first pass, [unscale_ + clip], first_step, second pass, [unscale_ + clip],
    ``scaler.step(opt)`` (``finish="second_step"``: ``opt.second_step()`` / ``base_step()``), update.
    ``place``: where ``scaler.unscale_(opt)`` goes: None, 1, 2 or "both" (on a plain step, 2 means
    before ``scaler.step``: its one pass)."""
    rec = Record()
    overflow.at(t, 1)
    with opt.ascent_pass() if isinstance(opt, sk.ESAM) else contextlib.nullcontext():
        scaler.scale(loss_of(model, x, y)).backward()
    if place in (1, "both"):
        scaler.unscale_(opt)
        clip(model)
    if opt.wants_sam():
        opt.first_step(zero_grad=True)
        read_choices(opt, rec)
        overflow.at(t, 2)
        scaler.scale(loss_of(model, x, y)).backward()
        if place in (2, "both"):
            scaler.unscale_(opt)
            clip(model)
        scaler.step(opt) if finish == "scaler" else opt.second_step()
    else:
        if place == 2:
            scaler.unscale_(opt)
            clip(model)
            rec.clip_single = True
        scaler.step(opt) if finish == "scaler" else opt.base_step()
    scaler.update()
    opt.zero_grad()
    return rec


def closure_step(opt, model, scaler, x, y, t: int, place, overflow: Overflow) -> Record:
    """README's closure loop: first pass, [unscale_ + clip], ``scaler.step(opt, closure)`` whose closure
    runs the second pass [and unscale_ + clip inside it: ``place`` 2], update."""
    rec = Record()
    overflow.at(t, 1)
    scaler.scale(loss_of(model, x, y)).backward()
    if place in (1, "both"):
        scaler.unscale_(opt)
        clip(model)

    def closure():
        read_choices(opt, rec)
        overflow.at(t, 2)
        loss = loss_of(model, x, y)
        scaler.scale(loss).backward()
        if place in (2, "both"):
            scaler.unscale_(opt)
            clip(model)
        return loss

    scaler.step(opt, closure)
    scaler.update()
    opt.zero_grad()
    return rec


def esam_closure_step(opt, model, scaler, x, y, t: int, overflow: Overflow) -> Record:
    """ESAM's per-sample closure under ``scaler.step(opt, closure)``: ESAM runs both passes itself."""
    rec = Record()
    calls = []

    def closure(indices=None):
        calls.append(indices)
        if len(calls) == 1:
            overflow.at(t, 1)
        elif torch.is_grad_enabled():  # not the no-grad forward of the data selection
            read_choices(opt, rec)
            rec.indices = indices
            overflow.at(t, 2)
        xs, ys = (x, y) if indices is None else (x[indices], y[indices])
        return loss_of(model, xs, ys, reduction="none")

    opt.zero_grad()
    scaler.step(opt, closure)
    scaler.update()
    return rec


# --------------------------------------------------------------------------- the hand reference

def norm(ts) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def dot(a, b) -> float:
    return sum(float((x * y).sum()) for x, y in zip(a, b))


def hand_clip(gs: list[torch.Tensor]) -> list[torch.Tensor]:
    """clip_grad_norm_'s rule: g·min(1, max_norm/(‖g‖ + 1e-6))."""
    return [g * min(1.0, CLIP / (norm(gs) + 1e-6)) for g in gs]


class Hand:
    """One variant's SAM steps with torch.optim.SGD(momentum) in float64 on the unscaled gradients."""

    def __init__(self, variant: str, model):
        self.variant = variant
        self.net = copy.deepcopy(model).double()
        self.names = [n for n, _ in self.net.named_parameters()]
        self.w = [p.detach().double().clone() for p in model.parameters()]
        self.buf: Optional[list[torch.Tensor]] = None
        self.gv: Optional[list[torch.Tensor]] = None
        self.mu = self.var = None
        self.t = 0

    def grads(self, w, x, y, indices=None) -> list[torch.Tensor]:
        if indices is not None:
            x, y = x[indices], y[indices]
        ws = [t.clone().requires_grad_() for t in w]
        out = functional_call(self.net, dict(zip(self.names, ws)), (x.double(),))
        return list(torch.autograd.grad(F.cross_entropy(out, y), ws))

    def decides(self, g1: list[torch.Tensor], overflow1: bool, clipped: bool) -> Optional[bool]:
        """The policy's decision where it is a formula (None: a random draw, read from the optimizer).
        AE-SAM: SAM iff ‖g‖² ≥ mu + c_t·sqrt(var), EMAs of the finite ‖g‖² (an overflowed pass has
        ‖g‖² = Inf, a SAM step, or NaN once clip_grad_norm_ scaled the Inf by 0, a plain one;
        nothing folded); LookSAM: every K-th step."""
        v = self.variant
        if v in ("aesam", "aelooksam"):
            sq = (math.nan if clipped else math.inf) if overflow1 else norm(g1) ** 2
            if math.isfinite(sq):
                if self.mu is None:
                    self.mu, self.var = sq, 0.0
                else:
                    self.mu = AE_DECAY * self.mu + (1 - AE_DECAY) * sq
                    self.var = AE_DECAY * self.var + (1 - AE_DECAY) * (sq - self.mu) ** 2
            s = min(max(self.t / AE_STEPS, 0.0), 1.0)
            c = s * AE_L1 + (1 - s) * AE_L2
            return sq >= (self.mu if self.mu is not None else 0.0) + c * math.sqrt(self.var or 0.0)
        if v == "looksam":
            return self.t % K == 0
        if v == "sssam":
            return None
        return True

    def perturbation(self, g1, rec: Record) -> list[torch.Tensor]:
        v, w = self.variant, self.w
        if v == "asam":
            tg = [(x.abs() + ETA) * g for x, g in zip(w, g1)]
            return [RHO * (x.abs() + ETA) * t / (norm(tg) + EPS) for x, t in zip(w, tg)]
        if v == "sparse":  # explicit Sparse SAM: rho·(m ⊙ g)/‖g‖, the norm over the full gradient
            return [RHO * m.double() * g / (norm(g1) + EPS) for m, g in zip(rec.masks, g1)]
        if v == "esam":  # per-tensor SWP: rho·g/(beta·‖g_sel‖) on the selected tensors, 0 elsewhere
            sel = [g for g, s in zip(g1, rec.selected) if s]
            return [RHO * g / (BETA * norm(sel) + EPS) if s else torch.zeros_like(g)
                    for g, s in zip(g1, rec.selected)]
        return [RHO * g / (norm(g1) + EPS) for g in g1]

    def step(self, x, y, g1, rec: Record, *, clip2: bool, skip: bool) -> None:
        """The step after the first pass's gradients ``g1`` (clipped when the loop clipped them)."""
        self.t += 1
        if skip:
            return
        if not rec.sam:
            g = hand_clip(g1) if rec.clip_single else g1
            if self.variant in ("looksam", "aelooksam") and self.gv is not None:
                coef = ALPHA * norm(g) / (norm(self.gv) + EPS)
                g = [a + coef * b for a, b in zip(g, self.gv)]
            self._sgd(g)
            return
        e = self.perturbation(g1, rec)
        g2 = self.grads([a + b for a, b in zip(self.w, e)], x, y, rec.indices)
        if clip2:
            g2 = hand_clip(g2)
        if self.variant in ("looksam", "aelooksam"):
            coef = dot(g1, g2) / (norm(g1) ** 2 + EPS)
            self.gv = [b - coef * a for a, b in zip(g1, g2)]
        if self.variant == "stable":
            ratio = norm(g1) / (norm(g2) + EPS)
            g2 = [g * ratio for g in g2]
        self._sgd(g2)

    def _sgd(self, g) -> None:
        self.buf = [x.clone() for x in g] if self.buf is None else [MOMENTUM * b + x for b, x in zip(self.buf, g)]
        for w, b in zip(self.w, self.buf):
            w.sub_(LR * b)


# --------------------------------------------------------------------------- checks

def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def base_state(opt) -> list[torch.Tensor]:
    """Every tensor of the base optimizer's and SAM's own state (momentum buffers, LookSAM's g_v),
    not the scratch of one step (backups, LookSAM's copy of g(w))."""
    scratch = {"backup", *(k for m in opt.modifiers for k in m.transient_keys)}
    out = []
    for st in (*opt.base_optimizer.state.values(), *opt.state.values()):
        out += [v.clone() for k, v in sorted(st.items()) if isinstance(v, torch.Tensor) and k not in scratch]
    return out


def assert_bitwise(got, want, what: str) -> None:
    assert len(got) == len(want), what
    for a, b in zip(got, want):
        assert torch.equal(a, b), what


def assert_follows(model, hand: Hand, what: str) -> None:
    for p, w in zip(model.parameters(), hand.w):
        torch.testing.assert_close(p.detach().double(), w, atol=2e-6, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def check_step(model, opt, scaler, hand: Hand, before: tuple, skip: bool, what: str) -> None:
    """After a step: skipped (weights and state bitwise as ``before`` = (weights, base_state, scale),
    the scale halved) or the hand reference's weights at an unchanged scale; nothing pending."""
    w0, state0, scale0 = before
    if skip:
        assert_bitwise(weights(model), w0, f"{what}: weights after the skipped step")
        assert_bitwise(base_state(opt), state0, f"{what}: base state after the skipped step")
        assert scaler.get_scale() == scale0 / 2, f"{what}: the overflow did not reach scaler.update()"
    else:
        assert_follows(model, hand, what)
        assert scaler.get_scale() == scale0, f"{what}: the scale changed without an overflow"
    assert opt.step_state.perturbed is None and opt.step_state.found is None
