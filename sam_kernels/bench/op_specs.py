"""What each benchmarked op reads and writes, and how each implementation calls it.

Bytes floors (N elements, s bytes per element, masks 1 byte): the bytes an implementation must
move at the least — each input read once, each output written once; a reduction whose result
gates an element-wise pass (renormalize, LookSAM) costs one extra read of what it reduces. The
ops' floors are the op table's (:mod:`sam_kernels.ops.contract`: ``OpInfo.floor_units``, what is
counted in ``OpInfo.moves``). For fp32 these are DESIGN §7's figures (grad norm 4N, perturb 16N,
restore+SGD 20N, step ≈40N). The steps through the optimizer count the ascent that writes w + e into
the backups and trades storages (:mod:`sam_kernels.optim.storage_swap`: 12N instead of 16N), since
an optimizer step need not write w where it is. The composite steps:

| step                | floor      | counted                                                   |
|---------------------|------------|-----------------------------------------------------------|
| sam_step            | 10·sN      | grad norm + perturb + restore/SGD-momentum step           |
| sam_optimizer_step  | 9·sN       | same work through the SAM optimizer's first/second_step   |
| sam_adamw_step      | 11·sN      | grad norm + perturb + restore/AdamW step, through SAM     |
| sam_amp_step        | 10·sN      | sam_optimizer_step under a GradScaler: + the second pass's|
|                     |            | overflow check (read g); the unscale is in the kernels    |
| sam_unscale_step    | 10·sN      | the same work done the usual way: GradScaler's unscale    |
|                     |            | pass over the grads of each pass, then the SAM step       |

The AMP steps run at scale 1.0 (the same work as any scale), so every implementation computes the
numbers of sam_optimizer_step's reference. sam_amp_step's loop is davda54's class after the two
unscale passes (torch's ``_amp_foreach_non_finite_check_and_unscale_``, what ``GradScaler.unscale_``
runs: read and write g); sam_unscale_step is sam_kernels.SAM (no scaler) after the same passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops
from ..ops import contract, reference
from . import baselines

RHO = 0.05
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
ADAM_STEP = 10  # fixed: every repeat does the same maths (bias corrections constant)
FISHER_SCALE = 1e-3
EMA_WEIGHT = 0.4  # VaSSO's theta
BSAM_N = 50000.0  # bSAM's num_data (a CIFAR-sized training set)
BSAM_ASCENT = dict(rho=0.01, beta2=0.999, damping=0.1, weight_decay=5e-4, perturb=True)  # the official defaults
BSAM_DESCENT = dict(lr=0.5, beta1=0.9, weight_decay=5e-4)
LOOKSAM_ALPHA = 1e-3  # small so that repeated calls do not blow g up (the speed does not depend on it)
EPS = 1e-12

State = dict  # list name -> list of tensors; "sq_norm" -> 0-dim tensor


@dataclass(frozen=True)
class OpSpec:
    name: str
    lists: tuple[str, ...]                     # tensor lists the op needs (see state.make_state)
    outputs: tuple[str, ...]                   # lists the op writes, compared after one call
    floor_units: int                           # bytes floor in units of s·N
    api: Callable[[State, str], object]        # through sam_kernels.ops with backend=...
    reference: Callable[[State], object]       # the eager reference directly (what torch.compile traces)
    loop: Optional[Callable[[State], object]]  # per-parameter Python loop, or None when there is none
    mask_bytes: int = 0                        # extra bytes per element (bool masks)
    exact: bool = False                        # outputs must match the reference bitwise
    bandwidth_bound: bool = True
    needs_sq_norm: bool = False                # state gets sq_norm = ‖grads‖² (a given, not timed)
    optimizer: bool = False                    # goes through sam_kernels.SAM (skipped while it does not exist)
    no_loop: str = "no per-parameter formulation (one global selection over all tensors)"  # why loop is None
    # Pieces of ``reference`` that torch.compile must trace separately: in training a forward and
    # backward run between SAM's ascent and descent, so one graph over both would let the compiler
    # drop the perturbed weights and the backup altogether (measured: "faster" than the copy floor).
    compile_phases: tuple[Callable[[State], object], ...] = ()

    def floor_bytes(self, numel: int, elem_size: int) -> int:
        return (self.floor_units * elem_size + self.mask_bytes) * numel


def _sgd_kw() -> dict:
    return dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _ref_sgd(s: State) -> None:
    reference.sgd_restore_step_(s["params"], s["backups"], s["grads"], s["bufs"], dampening=0.0, nesterov=False,
                                maximize=False, init_buffers=False, **_sgd_kw())


def _ref_perturb(s: State, sq_norm: torch.Tensor) -> None:
    reference.perturb_(s["params"], s["grads"], s["backups"], sq_norm, RHO, EPS, None, False, 0.01, 1.0,
                       [0] * len(s["params"]))


def _api_sam_step(s: State, b: str) -> None:
    sq = ops.grad_sq_norm(s["grads"], backend=b)
    ops.perturb_(s["params"], s["grads"], s["backups"], RHO, sq_norm=sq, backend=b)
    ops.sgd_restore_step_(s["params"], s["backups"], s["grads"], s["bufs"], backend=b, **_sgd_kw())


def _ref_sam_ascent(s: State) -> None:
    _ref_perturb(s, reference.grad_sq_norm(s["grads"], None, None, 0.01))


def _ref_sam_step(s: State) -> None:
    _ref_sam_ascent(s)
    _ref_sgd(s)


def _attach_grads(s: State) -> None:
    for p, g in zip(s["params"], s["grads"]):
        p.grad = g


def _loop_sam_step(s: State) -> None:
    """davda54's SAM with torch.optim.SGD (its default implementation), momentum buffers = state's."""
    opt = s.get("_davda54")
    if opt is None:
        _attach_grads(s)
        opt = s["_davda54"] = baselines.Davda54SAM(s["params"], torch.optim.SGD, rho=RHO, **_sgd_kw())
        for p, buf in zip(s["params"], s["bufs"]):
            opt.base_optimizer.state[p]["momentum_buffer"] = buf
    opt.first_step()
    opt.second_step()


def _adamw_kw() -> dict:
    return dict(lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"],
                weight_decay=ADAM["weight_decay"])


def _loop_sam(base: type, kw: Callable[[], dict]) -> Callable[[State], None]:
    """davda54's SAM around ``base`` (torch's default implementation for the device), from a fresh
    optimizer: it creates the base state (momentum buffers, moments), like sam_kernels.SAM."""
    def step(s: State) -> None:
        opt = s.get("_davda54")
        if opt is None:
            _attach_grads(s)
            opt = s["_davda54"] = baselines.Davda54SAM(s["params"], base, rho=RHO, **kw())
        opt.first_step()
        opt.second_step()
    return step


def _api_sam(base: type, kw: Callable[[], dict]) -> Callable[[State, str], None]:
    """sam_kernels.SAM(backend=b) around ``base``: first_step + second_step, grads kept (no
    forward/backward). finite_check=False: its checks are host syncs, and the davda54 baseline has none."""
    def step(s: State, b: str) -> None:
        opt = s.get("_sam")
        if opt is None:
            import sam_kernels  # the optimizer layer may not exist yet: the runner checks before calling
            _attach_grads(s)
            opt = s["_sam"] = sam_kernels.SAM(s["params"], base, rho=RHO, backend=b, finite_check=False, **kw())
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)
    return step


def _ref_sam_adamw_step(s: State) -> None:
    """One SAM step from a fresh AdamW state (moments zero, step 1)."""
    _ref_perturb(s, reference.grad_sq_norm(s["grads"], None, None, 0.01))
    zeros = [torch.zeros_like(p) for p in s["params"]]
    reference.adamw_restore_step_(s["params"], s["backups"], s["grads"], zeros, [z.clone() for z in zeros], step=1,
                                  maximize=False, **ADAM)


def _ref_sam_optimizer_step(s: State) -> None:
    """One SAM step from fresh momentum buffers (torch: buf = d_p on the first step)."""
    _ref_perturb(s, reference.grad_sq_norm(s["grads"], None, None, 0.01))
    bufs = [torch.empty_like(p) for p in s["params"]]
    reference.sgd_restore_step_(s["params"], s["backups"], s["grads"], bufs, dampening=0.0, nesterov=False,
                                maximize=False, init_buffers=True, **_sgd_kw())


def _unscale_passes(s: State) -> None:
    """GradScaler's unscale of both passes' gradients (read + write g, twice), at scale 1.0."""
    device = s["grads"][0].device
    found = s.setdefault("_found", torch.zeros((), device=device))
    inv = s.setdefault("_inv", torch.ones((), device=device))
    for _ in range(2):
        torch._amp_foreach_non_finite_check_and_unscale_(s["grads"], found, inv)


def _loop_sam_unscaled(s: State) -> None:
    _unscale_passes(s)
    _loop_sam(torch.optim.SGD, _sgd_kw)(s)


def _api_sam_unscaled(s: State, b: str) -> None:
    _unscale_passes(s)
    _api_sam(torch.optim.SGD, _sgd_kw)(s, b)


def _api_sam_amp(s: State, b: str) -> None:
    """sam_kernels.SAM with an attached GradScaler: the unscale happens in the fused kernels and the
    overflow checks are the norms of the two passes (no unscale pass)."""
    opt = s.get("_sam")
    if opt is None:
        import sam_kernels
        _attach_grads(s)
        device = s["grads"][0].device
        scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
        scaler.scale(torch.zeros((), device=device))  # creates its scale tensor
        opt = s["_sam"] = sam_kernels.SAM(s["params"], torch.optim.SGD, rho=RHO, backend=b, grad_scaler=scaler,
                                          **_sgd_kw())
    opt.first_step(zero_grad=False)
    opt.second_step(zero_grad=False)


def _renorm_ref(s: State) -> None:
    sq = reference.grad_sq_norm(s["grads"], None, None, 0.01)
    reference.renormalize_(s["grads"], s["sq_norm"], sq, EPS)


def _looksam_store_ref(s: State) -> None:
    d = reference.dot(s["grads"], s["sam_grads"])
    sq = reference.grad_sq_norm(s["grads"], None, None, 0.01)
    reference.looksam_store_(s["g_v"], s["grads"], s["sam_grads"], d, sq, EPS)


def _looksam_apply_ref(s: State) -> None:
    g_sq = reference.grad_sq_norm(s["grads"], None, None, 0.01)
    gv_sq = reference.grad_sq_norm(s["g_v"], None, None, 0.01)
    reference.looksam_apply_(s["grads"], s["g_v"], LOOKSAM_ALPHA, g_sq, gv_sq, EPS)


MIX_A, MIX_B = 1.2, -0.4  # GSAM's (1 + alpha·c, −alpha) shape of factors


def _topk_k(s: State) -> int:
    return int(sum(t.numel() for t in s["scores"]) * 0.5)


def _op_spec(name: str, lists: tuple[str, ...], outputs: tuple[str, ...], **kw) -> OpSpec:
    """An op's spec, with its bytes floor from the op table."""
    op = contract.OPS[name]
    return OpSpec(name, lists, outputs, op.floor_units, mask_bytes=op.bytes_per_element[1], **kw)


SPECS: dict[str, OpSpec] = {spec.name: spec for spec in (
    _op_spec("grad_sq_norm", ("grads",), (),
             api=lambda s, b: ops.grad_sq_norm(s["grads"], backend=b),
             reference=lambda s: reference.grad_sq_norm(s["grads"], None, None, 0.01),
             loop=lambda s: baselines.grad_sq_norm(s["grads"])),
    _op_spec("dot", ("grads", "sam_grads"), (),
             api=lambda s, b: ops.dot(s["grads"], s["sam_grads"], backend=b),
             reference=lambda s: reference.dot(s["grads"], s["sam_grads"]),
             loop=lambda s: baselines.dot(s["grads"], s["sam_grads"])),
    _op_spec("perturb_", ("params", "grads", "backups"), ("params", "backups"), needs_sq_norm=True,
             api=lambda s, b: ops.perturb_(s["params"], s["grads"], s["backups"], RHO, sq_norm=s["sq_norm"],
                                           backend=b),
             reference=lambda s: _ref_perturb(s, s["sq_norm"]),
             loop=lambda s: baselines.perturb_(s["params"], s["grads"], s["backups"], s["sq_norm"], RHO)),
    _op_spec("restore_", ("params", "backups"), ("params",), exact=True,
             api=lambda s, b: ops.restore_(s["params"], s["backups"], backend=b),
             reference=lambda s: reference.restore_(s["params"], s["backups"]),
             loop=lambda s: baselines.restore_(s["params"], s["backups"])),
    _op_spec("sgd_restore_step_", ("params", "backups", "grads", "bufs"), ("params", "bufs"),
             api=lambda s, b: ops.sgd_restore_step_(s["params"], s["backups"], s["grads"], s["bufs"], backend=b,
                                                    **_sgd_kw()),
             reference=_ref_sgd,
             loop=lambda s: baselines.sgd_restore_step_(s["params"], s["backups"], s["grads"], s["bufs"],
                                                        **_sgd_kw())),
    _op_spec("adamw_restore_step_", ("params", "backups", "grads", "exp_avgs", "exp_avg_sqs"),
             ("params", "exp_avgs", "exp_avg_sqs"),
             api=lambda s, b: ops.adamw_restore_step_(s["params"], s["backups"], s["grads"], s["exp_avgs"],
                                                      s["exp_avg_sqs"], ADAM_STEP, backend=b, **ADAM),
             reference=lambda s: reference.adamw_restore_step_(s["params"], s["backups"], s["grads"], s["exp_avgs"],
                                                               s["exp_avg_sqs"], step=ADAM_STEP, maximize=False,
                                                               **ADAM),
             loop=lambda s: baselines.adamw_restore_step_(s["params"], s["backups"], s["grads"], s["exp_avgs"],
                                                          s["exp_avg_sqs"], step=ADAM_STEP, **ADAM)),
    _op_spec("renormalize_", ("grads",), ("grads",), needs_sq_norm=True,
             api=lambda s, b: ops.renormalize_(s["grads"], s["sq_norm"], backend=b),
             reference=_renorm_ref,
             loop=lambda s: baselines.renormalize_(s["grads"], s["sq_norm"])),
    _op_spec("fisher_accumulate_", ("fisher", "grads"), ("fisher",),
             api=lambda s, b: ops.fisher_accumulate_(s["fisher"], s["grads"], scale=FISHER_SCALE, backend=b),
             reference=lambda s: reference.fisher_accumulate_(s["fisher"], s["grads"], FISHER_SCALE),
             loop=lambda s: baselines.fisher_accumulate_(s["fisher"], s["grads"], FISHER_SCALE)),
    _op_spec("looksam_store_", ("g_v", "grads", "sam_grads"), ("g_v",),
             api=lambda s, b: ops.looksam_store_(s["g_v"], s["grads"], s["sam_grads"], backend=b),
             reference=_looksam_store_ref,
             loop=lambda s: baselines.looksam_store_(s["g_v"], s["grads"], s["sam_grads"])),
    _op_spec("looksam_apply_", ("grads", "g_v"), ("grads",),
             api=lambda s, b: ops.looksam_apply_(s["grads"], s["g_v"], LOOKSAM_ALPHA, backend=b),
             reference=_looksam_apply_ref,
             loop=lambda s: baselines.looksam_apply_(s["grads"], s["g_v"], LOOKSAM_ALPHA)),
    # VaSSO's form (no direction list: the table's floor); Friendly-SAM's adds one written list
    _op_spec("ema_update_", ("g_v", "grads"), ("g_v",),
             api=lambda s, b: ops.ema_update_(s["g_v"], s["grads"], weight=EMA_WEIGHT, backend=b),
             reference=lambda s: reference.ema_update_(s["g_v"], s["grads"], None, EMA_WEIGHT, 0.0),
             loop=None),
    _op_spec("mix_", ("grads", "sam_grads"), ("grads",),
             api=lambda s, b: ops.mix_(s["grads"], s["sam_grads"], MIX_A, MIX_B, backend=b),
             reference=lambda s: reference.mix_(s["grads"], s["sam_grads"], torch.tensor(MIX_A), torch.tensor(MIX_B)),
             loop=lambda s: baselines.mix_(s["grads"], s["sam_grads"], MIX_A, MIX_B)),
    _op_spec("centralize_", ("grads",), ("grads",),
             api=lambda s, b: ops.centralize_(s["grads"], backend=b),
             reference=lambda s: reference.centralize_(s["grads"]),
             loop=lambda s: baselines.centralize_(s["grads"])),
    _op_spec("bsam_noise_", ("params", "backups", "precisions", "noise"), ("params", "backups"),
             api=lambda s, b: ops.bsam_noise_(s["params"], s["backups"], s["precisions"], s["noise"],
                                              num_data=BSAM_N, backend=b),
             reference=lambda s: reference.bsam_noise_(s["params"], s["backups"], s["precisions"], s["noise"], BSAM_N),
             loop=None),
    _op_spec("bsam_ascent_", ("params", "backups", "grads", "precisions", "precisions_next"),
             ("params", "precisions_next"),
             api=lambda s, b: ops.bsam_ascent_(s["params"], s["backups"], s["grads"], s["precisions"],
                                               s["precisions_next"], **BSAM_ASCENT, backend=b),
             reference=lambda s: reference.bsam_ascent_(s["params"], s["backups"], s["grads"], s["precisions"],
                                                        s["precisions_next"], **BSAM_ASCENT),
             loop=None),
    _op_spec("bsam_descent_", ("params", "backups", "grads", "exp_avgs", "precisions", "precisions_next"),
             ("params", "exp_avgs"),
             api=lambda s, b: ops.bsam_descent_(s["params"], s["backups"], s["grads"], s["exp_avgs"], s["precisions"],
                                                s["precisions_next"], **BSAM_DESCENT, backend=b),
             reference=lambda s: reference.bsam_descent_(s["params"], s["backups"], s["grads"], s["exp_avgs"],
                                                         s["precisions"], s["precisions_next"], **BSAM_DESCENT),
             loop=None),
    _op_spec("topk_mask", ("scores",), (), exact=True, bandwidth_bound=False,
             api=lambda s, b: ops.topk_mask(s["scores"], 0.5, backend=b),
             reference=lambda s: reference.topk_mask(s["scores"], _topk_k(s)),
             loop=None),
    _op_spec("nm_mask", ("scores",), (), exact=True, bandwidth_bound=False,
             api=lambda s, b: ops.nm_mask(s["scores"], 2, 4, backend=b),
             reference=lambda s: reference.nm_mask(s["scores"], 2, 4),
             loop=None),
    OpSpec("sam_step", ("params", "grads", "backups", "bufs"), ("params", "bufs"), 10,
           api=_api_sam_step, reference=_ref_sam_step, loop=_loop_sam_step,
           compile_phases=(_ref_sam_ascent, _ref_sgd)),
    OpSpec("sam_optimizer_step", ("params", "grads", "backups"), ("params",), 9, optimizer=True,
           api=_api_sam(torch.optim.SGD, _sgd_kw), reference=_ref_sam_optimizer_step,
           loop=_loop_sam(torch.optim.SGD, _sgd_kw)),
    OpSpec("sam_adamw_step", ("params", "grads", "backups"), ("params",), 11, optimizer=True,
           api=_api_sam(torch.optim.AdamW, _adamw_kw), reference=_ref_sam_adamw_step,
           loop=_loop_sam(torch.optim.AdamW, _adamw_kw)),
    OpSpec("sam_amp_step", ("params", "grads", "backups"), ("params",), 10, optimizer=True,
           api=_api_sam_amp, reference=_ref_sam_optimizer_step, loop=_loop_sam_unscaled),
    OpSpec("sam_unscale_step", ("params", "grads", "backups"), ("params",), 10, optimizer=True,
           api=_api_sam_unscaled, reference=_ref_sam_optimizer_step, loop=None,
           no_loop="the loop under AMP is sam_amp_step's loop column"),
)}

QUICK = ("grad_sq_norm", "perturb_", "sgd_restore_step_", "sam_step", "sam_optimizer_step", "sam_adamw_step",
         "sam_amp_step", "sam_unscale_step")
HEADLINE = ("sam_optimizer_step", "sam_step")  # the first one that ran is the headline figure
