"""bSAM: Bayesian Sharpness-Aware Minimization (Moellenhoff and Khan, "SAM as an Optimal Relaxation
of Bayes", ICLR 2023; official code github.com/team-approx-bayes/bayesian-sam, ``optim.py``,
``build_bsam_optimizer``, and ``train.py`` for the defaults).

A standalone Adam-like optimizer: it has no base optimizer of the user's, but keeps a Gaussian
posterior N(w, 1/(N·s)) over the weights (mean w, per-element precision s) and a momentum m. One step,
with N = ``num_data``, delta = ``weight_decay`` (prior precision / N), gamma = ``damping``::

    z ~ N(0, I)                       noisy sample  w_n = w + z / sqrt(N·s)        (``ascent_pass``)
    g = ∇L(w_n)                       first backward, at the sample
    e = rho · g / s                   perturbation from the MEAN w, no norm          (``first_step``)
    g_e = ∇L(w + e)                   second backward
    m ← beta1·m + (1 − beta1)·(g_e + delta·w)                                       (``second_step``)
    w ← w − lr · m / s
    s ← beta2·s + (1 − beta2)·(sqrt(s)·|g| + gamma + delta)

in that order (the w update reads the old s), as the official code. No bias correction, s starts at
``s_init``. Where the official code splits the batch into ``msharpness`` sub-batches (one noise draw
and perturbation each, gradients averaged), this class takes one: m-sharpness comes from data
parallelism (``distributed="m-sam"``: the first backward under DDP's ``no_sync()``; each replica
perturbs with its own g, and the variance update averages the replicas' sqrt(s)·|g| as the official
code averages its sub-batches', one all-reduce of N values per step; the noise z is the same on every
replica, where the official code draws one per sub-batch).

The peer library's ``pytorch_optimizer.BSAM`` (4.1) differs from the official code, which this class
follows: its noise has standard deviation 1/(N·s) (not 1/sqrt(N·s)) and stays in the weights (the
perturbation and the update start from the noisy sample, never from w); its momentum averages
``weight_decay · g`` instead of g + delta·w; its s averages (sqrt(s)·|g_e| + delta + gamma)², with the
perturbed-point gradient g_e and a square, instead of sqrt(s)·|g| + gamma + delta with the
noisy-sample g. Its first step's perturbation rho·g/s agrees (tested where that package is installed).

Randomness: z comes from ``self.generator``, a ``torch.Generator`` on the device of the first
parameter, seeded with ``seed`` (rank 0's under ``torch.distributed``: every rank draws the same z);
draws are float32, per parameter in param-group order (:func:`draw_noise`), so a run is
reproducible from its seed and the generator's state is part of ``state_dict``.

Protocol (manual loop; ``step(closure)`` does the same with the closure)::

    with opt.ascent_pass():                # w <- w + z / sqrt(N s) (w kept)
        loss_fn(model(x), y).backward()    # g at the noisy sample
    opt.first_step(zero_grad=True)         # w <- w + rho g / s (from the kept w)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)        # w restored, then m, w, s as above

Between steps the model holds the mean w. ``first_step`` without ``ascent_pass`` raises
``RuntimeError`` (the gradient would be at w, not at a sample: another algorithm), and so does
``step(closure)`` after a backward outside ``ascent_pass``. Every step is a bSAM step (no ``policy``,
no ``base_step``); ``perturb=False`` groups (SAM-ON) keep their noise sample and variance update but
get e = 0. Not supported (clear errors): ``adaptive`` groups (s already scales e per element), parameters that
share memory and FSDP2's DTensor parameters (``ValueError``), complex parameters and sparse gradients
(``TypeError``), telemetry of the sharpness values (the step and pass counters of ``stats()`` are
kept).

Cost per step: two forward/backward passes, as SAM; optimizer state 4 tensors per parameter (backup,
m, s, s_next). The per-element maths runs as three fused ops of :mod:`sam_kernels.ops`, one pass each:
``bsam_noise_`` (5 units of the element size per element: read w, s, z; write the backup, w),
``bsam_ascent_`` (5: read the backup, g, s; write w, s_next) and ``bsam_descent_`` (6: read the
backup, g, m, s; write w, m; the restore of w is part of it), counted in ``stats()["optimizer_bytes"]``.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator, Optional, Union

import torch

from .. import ops
from ..ops.dtensor import is_dtensor
from . import backups, groups, sparse_grads
from .compiled import hyper
from .dispatch_summary import records_step
from .distributed import agreed_seed, all_reduce_
from .sam import SAM



def draw_noise(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """z ~ N(0, 1) per element: ``torch.randn(p.shape, dtype=float32, generator=generator)`` for each
    param in order, on the generator's device, then moved and cast to the param's."""
    dev = generator.device
    return [torch.randn(p.shape, dtype=torch.float32, generator=generator, device=dev).to(p.device, p.dtype)
            for p in params]


def check_hyperparameters(group: dict, where: str) -> None:
    """``ValueError`` naming the key unless lr, weight_decay, damping >= 0; 0 <= beta1, beta2 < 1;
    s_init, num_data > 0 (s must stay positive: it divides)."""
    rules = {"lr": lambda v: v >= 0, "beta1": lambda v: 0 <= v < 1, "beta2": lambda v: 0 <= v < 1,
             "weight_decay": lambda v: v >= 0, "damping": lambda v: v >= 0, "s_init": lambda v: v > 0,
             "num_data": lambda v: v > 0}
    for key, ok in rules.items():
        if not ok(group[key]):
            raise ValueError(f"BSAM: {where}: invalid {key} {group[key]!r} (lr, weight_decay, damping >= 0; "
                             f"0 <= beta1, beta2 < 1; s_init, num_data > 0)")


class Sample:
    """The noise sample the model holds between ``ascent_pass`` and ``first_step``. A plain object, as
    :class:`~sam_kernels.optim.step_state.StepState`: torch.compile keeps attribute stores on it."""

    def __init__(self):
        self.pending: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None  # (params, their w)


class BSAMUpdate(torch.optim.Optimizer):
    """bSAM's own descent (the ``base_optimizer`` of :class:`BSAM`; not meant to be used alone):
    m ← beta1·m + (1 − beta1)·(g + weight_decay·w); w ← w − lr·m/s; then s ← s_next, the variance
    ``BSAM.first_step`` computed from the noisy-sample gradient. State per param: ``exp_avg`` (m),
    ``s``, ``s_next``. In a BSAM step the restore of w and this update are one pass
    (:meth:`restore_step_`, ``ops.bsam_descent_``). Under AMP the SAM step hands it ``grad_scale``
    and ``found_inf``: it unscales and skips on the device."""

    _step_supports_amp_scaling = True  # takes grad_scale / found_inf and skips on the device (no sync)

    def __init__(self, params, lr: float, beta1: float, beta2: float, weight_decay: float, damping: float,
                 s_init: float, num_data: float):
        defaults = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, damping=damping,
                        s_init=s_init, num_data=num_data)
        check_hyperparameters(defaults, "keyword arguments")
        super().__init__(params, defaults)

    def variance(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """s of ``p`` (created at ``s_init`` with m = 0 on first use)."""
        st = self.state[p]
        if "s" not in st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["s"] = torch.full_like(p, group["s_init"], memory_format=torch.preserve_format)
            st["s_next"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return st["s"]

    @torch.no_grad()
    def step(self, closure=None):
        """The descent at the current weights (each param its own backup)."""
        if closure is not None:
            raise TypeError("BSAMUpdate.step() takes no closure: BSAM.step(closure) runs the passes")
        self.restore_step_([], {}, None, getattr(self, "grad_scale", None), getattr(self, "found_inf", None))

    def restore_step_(self, perturbed: list[torch.Tensor], backup_of: dict, backend: Optional[str],
                      grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
                      read: Callable[[dict, str], Any] = operator.getitem) -> None:
        """w ← ``backup_of[p]`` for the ``perturbed`` params, then the descent, in one pass per param group
        (``ops.bsam_descent_``); a param without a backup is its own. Under AMP, ``grad_scale`` (the loss
        scale the grads carry) and ``found_inf`` (non-zero: skip, keeping m and s) are read on the
        device. ``read(group, "lr")`` gives the group's lr (a compiled step's: a tensor, see
        :func:`.compiled.hyper`). The hooks of ``step()`` are the caller's (:func:`.base_step.restore_and_step`)."""
        by_group = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        if any("s_next" not in self.state[p] for _, ps in by_group for p in ps):  # before anything is written
            raise RuntimeError("BSAM: a descent without its first_step (no variance update from a noisy "
                               "sample for this step): use BSAM's first_step/second_step or step(closure)")
        rest = [p for p in perturbed if p.grad is None]
        if rest:  # no gradient: only the restore
            backups.copy_back(rest, [backup_of[p] for p in rest], backend)
        for group, params in by_group:
            if not params:
                continue
            sts = [self.state[p] for p in params]
            kept = [backup_of.get(p, p) for p in params]

            def descend():
                ops.bsam_descent_(params, kept, [p.grad for p in params], [st["exp_avg"] for st in sts],
                                  [st["s"] for st in sts], [st["s_next"] for st in sts], lr=read(group, "lr"),
                                  beta1=group["beta1"], weight_decay=group["weight_decay"], grad_scale=grad_scale,
                                  found_inf=found_inf, backend=backend)
            try:
                descend()
            except (TypeError, ValueError):  # rejected before writing: a backup taken before its param was cast
                stale = [i for i, (b, p) in enumerate(zip(kept, params)) if (b.dtype, b.device) != (p.dtype, p.device)]
                if not stale:
                    raise
                for i in stale:
                    kept[i] = kept[i].to(dtype=params[i].dtype, device=params[i].device)
                descend()
            for st in sts:  # s <- s_next: the buffers swap
                st["s"], st["s_next"] = st["s_next"], st["s"]


class BSAM(SAM):
    """Bayesian SAM (Moellenhoff and Khan, ICLR 2023): see the module docstring for the step, the
    protocol and how it differs from the peer library.

    Args:
        params: parameters or param groups (groups may set ``lr``, ``rho``, ``beta1``, ``beta2``,
            ``weight_decay``, ``damping``, ``s_init``, ``num_data`` and SAM-ON's ``perturb=False``).
        lr: learning rate (0.5, the official README's bSAM runs on CIFAR).
        num_data: N, the number of training examples (required; the official runs multiply it by
            the augmentation factor ``--dafactor``, 4 on CIFAR).
        rho: perturbation size (0.01, the official README's CIFAR runs).
        beta1, beta2: momentum and variance averaging (0.9, 0.999, the official code's).
        prior_precision: delta·N (25, the official code's default); ``weight_decay`` = delta is
            ``prior_precision / num_data`` unless given.
        damping: gamma added to the variance update (0.1, the official code's).
        s_init: the initial precision s (1.0, the official code's ``--custominit``).
        seed: seed of the noise generator (None: a random seed from torch's default generator).
        backend, finite_check, grad_scaler, distributed: as :class:`~sam_kernels.optim.sam.SAM`.

    Units: lr and rho in the weights' units per gradient unit, as Adam's; state tensors in the
    parameter's dtype. Raises ``ValueError`` for bad hyperparameters, ``adaptive`` groups and
    parameters over shared memory; ``TypeError`` for complex parameters and sparse gradients.
    """

    def __init__(self, params, lr: float = 0.5, *, num_data: float, rho: float = 0.01, beta1: float = 0.9,
                 beta2: float = 0.999, prior_precision: float = 25.0, weight_decay: Optional[float] = None,
                 damping: float = 0.1, s_init: float = 1.0, seed: Optional[int] = None,
                 backend: Optional[str] = None, finite_check: Union[bool, str] = True,
                 grad_scaler: Optional[torch.amp.GradScaler] = None, distributed: str = "global"):
        if weight_decay is None:
            weight_decay = prior_precision / num_data if num_data > 0 else 0.0
        super().__init__(params, BSAMUpdate, rho, backend=backend, finite_check=finite_check,
                         grad_scaler=grad_scaler, distributed=distributed, lr=lr, beta1=beta1, beta2=beta2,
                         weight_decay=weight_decay, damping=damping, s_init=s_init, num_data=num_data)
        self._check_groups()
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.generator = torch.Generator(device=first.device if first is not None else "cpu")
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # torch's default CPU generator: no device sync
        self.generator.manual_seed(agreed_seed(seed))
        self.sample = Sample()

    def _check_groups(self) -> None:
        for i, g in enumerate(self.param_groups):
            check_hyperparameters(g, f"param group {i}")
        if any(g["adaptive"] for g in self.param_groups):
            raise ValueError("BSAM: adaptive=True is not supported (bSAM's e = rho·g/s is already scaled per "
                             "element by its precision s)")
        if any(p.is_complex() for g in self.param_groups for p in g["params"]):
            raise TypeError("BSAM: complex parameters are not supported (its variance sqrt(s)·|g| is defined on "
                            "real weights); split them into real and imaginary parts")
        if any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise ValueError("BSAM: FSDP2 (DTensor parameters) is not supported (its noise is drawn per whole "
                             "tensor); use DDP")
        if self.step_state.aliases:
            raise ValueError("BSAM: parameters that share their memory are not supported (each would add its "
                             "own noise and perturbation to the one storage); tie the weight by using one "
                             "Parameter in both places (b.weight = a.weight)")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if "base_optimizer" in self.__dict__:
            self._check_groups()

    def _noise_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ------------------------------------------------------------------ the step

    @contextlib.contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """Wrap the first forward/backward: the model holds a sample w + z/sqrt(N·s) inside (and after,
        until ``first_step``); on an error inside, w is restored before it propagates."""
        self._sample()
        try:
            yield
        except BaseException:
            self.restore()
            raise

    @records_step(starts_step=True)  # the noise pass begins a bSAM step (its bytes are counted in stats())
    @torch.no_grad()
    def _sample(self) -> None:
        now = self.step_state
        if now.perturbed is not None or self.sample.pending is not None:
            raise RuntimeError("BSAM.ascent_pass(): a step is already under way (call second_step() or restore())")
        self._check_groups()
        self._follow_casts()
        self.step_state.scan = None  # the backward that follows writes new gradients
        params = self._noise_params()
        if not params:
            return
        kept = backups.get(self.state, params)
        backups.renew_stale(self.state, params, kept, list(range(len(params))))
        base = self.base_optimizer
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        s = [base.variance(p, group_of[id(p)]) for p in params]
        by_n: dict = {}
        for i, p in enumerate(params):
            by_n.setdefault(group_of[id(p)]["num_data"], []).append(i)
        noise = draw_noise(params, self.generator)
        self.sample.pending = (params, kept)
        for n, idx in by_n.items():
            ops.bsam_noise_([params[i] for i in idx], [kept[i] for i in idx], [s[i] for i in idx],
                            [noise[i] for i in idx], num_data=n, backend=self.backend)

    def _ascend(self) -> None:
        """w ← kept w + rho·g/s (perturb groups; the kept w for the others), s_next from g (see the module)."""
        noisy, self.sample.pending = self.sample.pending, None
        if noisy is None:
            raise RuntimeError("BSAM.first_step(): the first backward must run at bSAM's noisy sample, inside "
                               "`with opt.ascent_pass():` (or use step(closure), which does it)")
        params_all, kept_all = noisy
        try:
            self._ascend_from(params_all, kept_all)
        except BaseException:
            backups.copy_back(params_all, kept_all, self.backend)  # never leave a sample or w + e behind
            raise
        self.step_state.set_perturbed(params_all, kept_all)

    def _ascend_from(self, params_all: list[torch.Tensor], kept_all: list[torch.Tensor]) -> None:
        now = self.step_state
        if sparse_grads.any_sparse(self.param_groups):
            raise TypeError("BSAM: sparse gradients are not supported (its variance update is dense)")
        entries = groups.with_grads(self.param_groups, params_all)
        base = self.base_optimizer
        if entries and (self.finite_check or self.amp.active):
            sq = groups.grads_sq_norm([p.grad for _, p in entries], self.backend)
            self.amp.screen(self, self.distributed.ascent_sq_norm(self, sq), "first_step")
        scale = self.loss_scale
        kept_of = dict(zip(map(id, params_all), kept_all))
        with_grad = {id(p) for _, p in entries}
        variances = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in with_grad]
            if ps:
                sts = [base.state[p] for p in ps]
                ops.bsam_ascent_(ps, [kept_of[id(p)] for p in ps], [p.grad for p in ps], [st["s"] for st in sts],
                                 [st["s_next"] for st in sts], rho=hyper(self, group, "rho"), beta2=group["beta2"],
                                 damping=group["damping"], weight_decay=group["weight_decay"],
                                 perturb=group["perturb"], grad_scale=scale, found_inf=now.found,
                                 backend=self.backend)
                variances += [st["s_next"] for st in sts]
        if self.distributed.per_replica:
            # m-SAM: each replica's s_next is from its own g; their mean is the official code's average of
            # sqrt(s)·|g| over its msharpness sub-batches, the same on every rank (one all-reduce of N)
            all_reduce_(variances, self.distributed.process_group, mean=True)
        rest = [i for i, p in enumerate(params_all) if id(p) not in with_grad]
        if rest:  # no gradient: back to w for the second pass
            backups.copy_back([params_all[i] for i in rest], [kept_all[i] for i in rest], self.backend)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a noise sample (``ascent_pass``) or a ``first_step`` without a descent (bitwise)."""
        noisy, self.sample.pending = self.sample.pending, None
        if noisy is not None:
            backups.copy_back(*noisy, self.backend)
        super().restore()

    def wants_sam(self) -> bool:
        """Always True: every bSAM step takes both passes."""
        return True

    def base_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("BSAM takes no plain step: every step is ascent_pass, first_step, second_step "
                           "(or step(closure))")

    def _step(self, closure, first_loss=None):
        if closure is not None and self.sample.pending is None and self.step_state.perturbed is None:
            params = self._params()
            if self.step_state.backward.ran(params):
                raise RuntimeError("BSAM.step(closure): gradients of a backward before step() are at w, not at "
                                   "bSAM's noisy sample; run that backward inside `with opt.ascent_pass():`, or "
                                   "zero the gradients (zero_grad) and let step(closure) run both passes")
            if any(p.grad is not None for p in params):
                self.zero_grad(set_to_none=False)
            self.amp.next_pass(self)
            with torch.enable_grad(), self.ascent_pass():
                first_loss = closure()
        return super()._step(closure, first_loss)

    # ------------------------------------------------------------------ state

    _variant_keys = ("bsam",)

    def _variant_state(self) -> dict:
        if self.sample.pending is not None:
            raise RuntimeError("BSAM.state_dict(): the model holds a noise sample (inside ascent_pass, before "
                               "first_step); save between steps or after first_step")
        return {"bsam": {"generator": self.generator.get_state()}}

    def _load_variant_state(self, saved: dict) -> None:
        self.generator.set_state(saved["bsam"]["generator"])
