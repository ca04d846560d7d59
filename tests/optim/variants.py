"""The variant table: every public optimizer variant once, with its hand reference and its loops.

Like PyTorch's ``OptimizerInfo``: a test takes ``VariantInfo`` rows and a loop, and never builds a
variant by name itself. Adding a variant is adding a row: its factory, whether it takes plain
(one-pass) steps, its hand reference (``tests/optim/hand_reference.py``, plain torch), and the
loops it truly cannot run, each with the error it must raise (``refuses``): those are tested as
errors, not left out.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import sam_kernels as sk
from tests.optim.hand_reference import HandBSAM, HandSAM
from tests.optim.hand_reference_ema import HandFriendlySAM, HandVaSSO
from tests.optim.hand_reference_momentum import HandMomentumSAM, HandMultiStepSAM

# Every loop of the loop matrix (tests/loops/). A row supports all of them but its ``refuses``.
LOOPS = (
    "manual",              # backward; first_step; backward; second_step (base_step on plain steps)
    "closure",             # backward; step(closure)
    "closure_first_pass",  # step(closure) with no gradient yet (Lightning, accelerate, skorch)
    "zeroed_closure",      # zero_grad(set_to_none=False); step(closure) that zeroes, forwards, backwards
    "amp_manual",          # fp16 GradScaler, manual loop, scaler.step(opt)
    "amp_closure",         # fp16 GradScaler, scaler.step(opt, closure)
    "bf16",                # bf16 autocast, manual loop
    "accumulation",        # two micro-batches per pass
    "clipping",            # clip_grad_norm_ on either pass
    "compile",             # torch.compile(first_step / second_step / base_step, fullgraph=True)
    "checkpoint",          # save/load at a step boundary and between first_step and second_step
    "cast",                # model.double() between steps and between first_step and second_step
    "aliased",             # two Parameters over one storage (b.weight.data = a.weight.data)
    "sparse_grad",         # nn.Embedding(sparse=True)
    "sam_on",              # param groups with perturb=False (SAM-ON)
)

RHO, LR, MOMENTUM = 0.05, 0.1, 0.9
SGD = dict(lr=LR, momentum=MOMENTUM)
STEPS = 4  # steps of a matrix run; the table's schedules (LookSAM's k, AE-SAM's T) are sized for it


def loss_fn(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(out, y, reduction=reduction)


def closure_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """torch's closure convention: ``loss_fn`` of ``model`` on (x, y), backward, the loss returned."""
    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    return closure


def make_model(dtype=torch.float64, seed: int = 0) -> torch.nn.Module:
    """The shared tiny model: Linear(4, 6) · tanh · Linear(6, 3)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def make_batches(steps: int, dtype=torch.float64, seed: int = 1, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, generator=g, dtype=dtype), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(steps)]


def fisher_data(model: torch.nn.Module) -> Callable[[], list]:
    """The Fisher mask's data, in the model's dtype at each refresh (it follows a mid-run cast)."""
    return lambda: make_batches(1, next(model.parameters()).dtype, seed=9, batch=4)


@dataclasses.dataclass(frozen=True)
class VariantInfo:
    """One row. ``factory(params, model=..., backend=..., **extra)`` builds the optimizer;
    ``hand_reference(weights)`` builds its plain-torch reference (``HandSAM``).

    ``refuses``: loop -> (exception type, message regex) for loops the variant cannot run: the
    loop must raise that error before any weight changes. ``per_sample_closure``: the variant's
    ``step`` takes ESAM's closure (per-sample losses, both passes run by ``step``).
    ``probe(opt)``: the decisions of the running step the reference needs (masks, selections),
    read from the optimizer between its two passes. ``one_pass``: the step is ``backward(); step()``
    (the loops' "first pass" is its only pass; mid-step hooks run before that backward, where the
    model holds its perturbed weights). ``ascent_steps``: the manual loop calls ``first_step`` that
    many times, a backward before each.
    """
    name: str
    factory: Callable[..., sk.SAM]
    has_plain_steps: bool
    hand_reference: Callable[[list], HandSAM]
    refuses: dict = dataclasses.field(default_factory=dict)
    per_sample_closure: bool = False
    probe: Optional[Callable[[sk.SAM], dict]] = None
    one_pass: bool = False  # one forward/backward per step, ended by ``step()`` (Momentum-SAM)
    ascent_steps: int = 1   # first_step calls per SAM step, a backward before each (multi-step ascent)

    @property
    def supports(self) -> frozenset:
        return frozenset(LOOPS) - frozenset(self.refuses)

    def build(self, model: torch.nn.Module, backend: Optional[str] = None, **extra) -> sk.SAM:
        return self.factory(model.parameters(), model=model, backend=backend, **extra)

    def reference(self, model: torch.nn.Module) -> HandSAM:
        return self.hand_reference([p.detach() for p in model.parameters()])


def _hand(base="sgd", base_kwargs=SGD, **kw):
    return functools.partial(HandSAM, base=base, base_kwargs=dict(base_kwargs), **{"rho": RHO, **kw})


def _sam(cls, **fixed):
    def factory(params, model=None, backend=None, **extra):
        return cls(params, **{**fixed, **extra}, backend=backend)
    return factory


def _masks(opt) -> dict:
    return {"masks": [m.clone() for m in opt.masks]}


def _esam_selection(opt) -> dict:
    chosen = opt.selected()
    if chosen is None:
        return {}
    ids = {id(p) for p in chosen}
    return {"selected": [id(p) in ids for g in opt.param_groups for p in g["params"]]}


def _fisher(params, model=None, backend=None, **extra):
    return sk.SparseSAM(params, torch.optim.SGD, rho=RHO, sparsity=0.5, mask="fisher", model=model, loss_fn=loss_fn,
                        fisher_data=fisher_data(model), num_samples=4, update_unit="step",
                        update_freq=2, backend=backend, **{**SGD, **extra})


def _late_phase(params, model=None, backend=None, **extra):
    return sk.SAM(params, torch.optim.SGD, rho=RHO, policy=sk.LatePhasePolicy(STEPS, fraction=0.5), backend=backend,
                  **{**SGD, **extra})


def _sam_on(params, model=None, backend=None, **extra):
    """SAM-ON's groups on a model without normalization layers: the 1-D tensors (biases, as a norm
    layer's scale and shift) perturbed, the others not."""
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() == 1]},
              {"params": [p for p in params if p.dim() != 1], "perturb": False}]
    return sk.SAM(groups, torch.optim.SGD, rho=RHO, backend=backend, **{**SGD, **extra})


def _hand_sam_on(ws):
    return HandSAM(ws, base="sgd", base_kwargs=dict(SGD), rho=RHO, perturbed=[w.dim() == 1 for w in ws])


BSAM_KW = dict(lr=0.05, num_data=100, rho=0.05, weight_decay=1e-2, seed=11)


BSAM_BACKWARD_AT_W = (RuntimeError, "noisy sample")  # a backward before step() took its gradient at w


def _bsam(params, model=None, backend=None, **extra):
    return sk.BSAM(params, backend=backend, **{**BSAM_KW, **extra})


def _hand_bsam(ws):
    return HandBSAM(ws, **BSAM_KW)


ADAMW = dict(lr=1e-2, weight_decay=1e-2)
ADAGRAD = dict(lr=0.1)
SAM_ON_REFUSED = (ValueError, r"perturb=False \(SAM-ON\) are not supported")  # g(w) of every param mixed in
SPARSE_REFUSED = (TypeError, "sparse")
ALIAS_REFUSED = (ValueError, "share their memory")

VARIANTS: list[VariantInfo] = [
    VariantInfo("SAM", _sam(sk.SAM, base_optimizer=torch.optim.SGD, rho=RHO, weight_decay=1e-3, **SGD),
                False, _hand(base_kwargs={**SGD, "weight_decay": 1e-3}),
                refuses={"sparse_grad": SPARSE_REFUSED}),  # torch's SGD takes no sparse gradient with weight decay
    VariantInfo("SAM-AdamW", _sam(sk.SAM, base_optimizer=torch.optim.AdamW, rho=RHO, **ADAMW),
                False, _hand("adamw", ADAMW),
                refuses={"sparse_grad": SPARSE_REFUSED}),  # torch's AdamW has no sparse form
    VariantInfo("SAM-Adagrad", _sam(sk.SAM, base_optimizer=torch.optim.Adagrad, rho=RHO, **ADAGRAD),
                False, _hand("adagrad", ADAGRAD),  # a base without a fused descent (generic path)
                refuses={"compile": (TypeError, "needs a fused descent")}),  # its step() breaks the graph
    VariantInfo("ASAM", _sam(sk.SAM, base_optimizer=torch.optim.SGD, rho=0.5, adaptive=True, **SGD),
                False, _hand(rho=0.5, adaptive=True),
                refuses={"aliased": ALIAS_REFUSED}),  # T = |w| + eta would be read at perturbed weights
    VariantInfo("SSSAM", _sam(sk.SSSAM, base_optimizer=torch.optim.SGD, rho=RHO, p=0.5, seed=3, **SGD),
                True, _hand()),
    VariantInfo("StableSAM", _sam(sk.StableSAM, base_optimizer=torch.optim.SGD, rho=RHO, **SGD),
                False, _hand(renormalize=True), refuses={"sparse_grad": SPARSE_REFUSED}),
    VariantInfo("LookSAM", _sam(sk.LookSAM, base_optimizer=torch.optim.SGD, rho=RHO, k=2, alpha=0.7, **SGD),
                True, _hand(looksam_alpha=0.7), refuses={"sparse_grad": SPARSE_REFUSED}),
    VariantInfo("AESAM", _sam(sk.AESAM, base_optimizer=torch.optim.SGD, rho=RHO, total_steps=STEPS, **SGD),
                True, _hand()),
    VariantInfo("AELookSAM", _sam(sk.AELookSAM, base_optimizer=torch.optim.SGD, rho=RHO, total_steps=STEPS,
                                  alpha=0.7, **SGD),
                True, _hand(looksam_alpha=0.7), refuses={"sparse_grad": SPARSE_REFUSED}),
    VariantInfo("SparseSAM-fisher", _fisher, False, _hand(), probe=_masks, refuses={"sparse_grad": SPARSE_REFUSED}),
    VariantInfo("SparseSAM-dynamic", _sam(sk.SparseSAM, base_optimizer=torch.optim.SGD, rho=RHO, sparsity=0.5,
                                          mask="dynamic", horizon=STEPS, update_unit="step", update_freq=2, seed=5,
                                          **SGD),
                False, _hand(), probe=_masks, refuses={"sparse_grad": SPARSE_REFUSED}),
    VariantInfo("SparseSAM-structured", _sam(sk.SparseSAM, base_optimizer=torch.optim.SGD, rho=RHO, sparsity=0.5,
                                             mask="random", pattern="structured", masked_norm=True,
                                             update_unit="step", update_freq=2, seed=6, **SGD),
                False, _hand(masked_norm=True), probe=_masks),
    VariantInfo("SparseSAM-nm", _sam(sk.SparseSAM, base_optimizer=torch.optim.SGD, rho=RHO, mask="random",
                                     pattern="nm", n=2, m=4, update_unit="step", update_freq=2, seed=6, **SGD),
                False, _hand(), probe=_masks),
    VariantInfo("ESAM", _sam(sk.ESAM, base_optimizer=torch.optim.SGD, rho=RHO, beta=0.6, gamma=0.5, seed=7, **SGD),
                False, _hand(beta=0.6), per_sample_closure=True, probe=_esam_selection),
    VariantInfo("GSAM", _sam(sk.GSAM, base_optimizer=torch.optim.SGD, rho=RHO, alpha=0.4, **SGD),
                False, _hand(gsam_alpha=0.4),
                refuses={"sparse_grad": SPARSE_REFUSED, "sam_on": SAM_ON_REFUSED}),
    VariantInfo("GSAM-AdamW", _sam(sk.GSAM, base_optimizer=torch.optim.AdamW, rho=RHO, alpha=0.4, **ADAMW),
                False, _hand("adamw", ADAMW, gsam_alpha=0.4),
                refuses={"sparse_grad": SPARSE_REFUSED, "sam_on": SAM_ON_REFUSED}),
    VariantInfo("WSAM", _sam(sk.WSAM, base_optimizer=torch.optim.SGD, rho=RHO, gamma=0.9, **SGD),
                False, _hand(wsam_gamma=0.9),
                refuses={"sparse_grad": SPARSE_REFUSED, "sam_on": SAM_ON_REFUSED}),
    VariantInfo("WSAM-coupled", _sam(sk.WSAM, base_optimizer=torch.optim.SGD, rho=RHO, gamma=0.9, decouple=False,
                                     **SGD),
                False, _hand(wsam_gamma=0.9, wsam_decouple=False),
                refuses={"sparse_grad": SPARSE_REFUSED, "sam_on": SAM_ON_REFUSED}),
    VariantInfo("GCSAM", _sam(sk.SAM, base_optimizer=torch.optim.SGD, rho=RHO, use_gc=True, **SGD),
                False, _hand(use_gc=True), refuses={"sparse_grad": SPARSE_REFUSED}),
    VariantInfo("LatePhaseSAM", _late_phase, True, _hand()),
    VariantInfo("SAM-ON", _sam_on, False, _hand_sam_on),
    VariantInfo("BSAM", _bsam, False, _hand_bsam,
                refuses={"closure": BSAM_BACKWARD_AT_W, "amp_closure": BSAM_BACKWARD_AT_W,
                         "aliased": ALIAS_REFUSED,  # each alias would add its own noise to the storage
                         "sparse_grad": SPARSE_REFUSED}),  # its variance update is dense
    VariantInfo("FriendlySAM", _sam(sk.FriendlySAM, base_optimizer=torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.6,
                                    **SGD),
                False, functools.partial(HandFriendlySAM, base="sgd", base_kwargs=SGD, rho=RHO, sigma=1.0, lmbda=0.6),
                refuses={"sparse_grad": SPARSE_REFUSED}),  # its EMA buffer is dense
    VariantInfo("VaSSO", _sam(sk.VaSSO, base_optimizer=torch.optim.SGD, rho=RHO, theta=0.4, **SGD),
                False, functools.partial(HandVaSSO, base="sgd", base_kwargs=SGD, rho=RHO, theta=0.4),
                refuses={"sparse_grad": SPARSE_REFUSED}),
    VariantInfo("SAM-3-step", _sam(sk.SAM, base_optimizer=torch.optim.SGD, rho=RHO, ascent_steps=3, **SGD),
                False, functools.partial(HandMultiStepSAM, base="sgd", base_kwargs=SGD, rho=RHO, ascent_steps=3),
                refuses={"sparse_grad": SPARSE_REFUSED}, ascent_steps=3),
    VariantInfo("MomentumSAM", _sam(sk.MomentumSAM, base_optimizer=torch.optim.SGD, rho=RHO, weight_decay=1e-3,
                                    **SGD),
                False, functools.partial(HandMomentumSAM, rho=RHO, weight_decay=1e-3, **SGD),
                refuses={"sparse_grad": SPARSE_REFUSED}, one_pass=True),
]

BY_NAME = {v.name: v for v in VARIANTS}


def variant(name: str) -> VariantInfo:
    return BY_NAME[name]
