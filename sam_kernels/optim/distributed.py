"""Distributed training (``torch.distributed``: DDP, m-SAM, FSDP2): what every rank must agree on.

SAM under data parallelism must (1) give the single-process answer, or the documented m-SAM one,
and (2) keep every rank in lockstep: a rank that decides to run a second backward while another
does not pairs its collectives with the wrong step, and training hangs (NCCL) or dies (gloo).
This module holds everything the optimizer layer needs for that; the step loop (``sam.py``)
calls into it at a few fixed points.

Modes (``SAM(..., distributed=...)``):

- ``"global"`` (default): both backwards synchronize their gradients (DDP's default, FSDP2).
  Every gradient the optimizer reads is the global one, identical on every rank, so SAM equals
  single-process SAM on the full batch and every decision derived from gradients agrees. The
  optimizer adds no collective per step (FSDP2's DTensor reductions aside, see
  :mod:`sam_kernels.ops.dtensor`) except at the first ``AGREEMENT_STEPS`` steps under DDP: there the ranks
  compare the squared norm of the first-pass gradient (one scalar all-reduce and one host read per
  step) and raise if they differ, before any weight changes. That catches the m-SAM recipe (first
  backward under ``no_sync()``) run without ``distributed="m-sam"``, whose plain steps would
  otherwise let the replicas drift apart silently.
- ``"m-sam"`` (:class:`PerReplica`): the first backward runs under DDP's ``no_sync()``, so each
  replica perturbs with its own gradient (m-SAM: Foret et al. §4 / Andriushchenko & Flammarion);
  the second backward synchronizes. The optimizer then keeps the ranks in lockstep itself: plain
  steps (SS-SAM, AE-SAM, LookSAM) average the unsynchronized gradients across ranks first (one
  gradient all-reduce, what DDP would have done); policies that read ‖g‖² (AE-SAM) decide from
  the mean over ranks of the local ‖g_r‖² (one scalar all-reduce); ``first_step``'s NaN/Inf check
  and Stable SAM's reference norm use the same kind of mean (one scalar all-reduce, skipped when
  neither is on, and reused from the policy's when that one covered the same norm: no ASAM group,
  every parameter perturbed); LookSAM averages its stored first-pass gradient on its SAM steps (one gradient
  all-reduce every k steps), so its g_v is the same on every rank.

Random draws agree by construction: every seed the optimizer layer draws (SS-SAM's policy, ESAM's
selections, Sparse SAM's masks) goes through :func:`agreed_seed`, which broadcasts rank 0's seed
at construction when ``torch.distributed`` is initialized (one broadcast per seeded object, none
per step). Sparse SAM's Fisher scores are summed across ranks before the top-k (so the mask
covers every rank's ``num_samples``), and m-SAM's dynamic masks drop by |ḡ|, ḡ the rank-averaged
gradient.

FSDP1 (``FullyShardedDataParallel``) is refused at construction (:func:`check_params`): its flat
shards would give every rank its own shard's norm, a silently wrong perturbation.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import groups

MODES = ("global", "m-sam")


def is_initialized() -> bool:
    """Whether a default process group exists (``torch.distributed.init_process_group`` ran)."""
    return dist.is_available() and dist.is_initialized()


def _collective_device(group=None) -> torch.device:
    """Where host values (seeds) travel: the current CUDA device for NCCL-only groups, else CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agreed_seed(seed: Optional[int] = None) -> int:
    """A seed every rank agrees on: ``seed`` (or one drawn from torch's global RNG when None), then,
    when ``torch.distributed`` is initialized, rank 0's value broadcast over the default group.

    Every rank must call it (it is a collective): the optimizers do so in their constructors.
    An explicit seed is broadcast too, so ranks that pass ``base + rank`` still agree (rank 0's wins).
    """
    value = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=0)
    return int(t.item())  # construction time, not a step: the host read is fine


def all_reduce_(tensors: Sequence[torch.Tensor], group=None, *, mean: bool = False) -> None:
    """In place: each tensor ← its sum (``mean``: its mean) over the ranks of ``group``.

    The tensors are packed into one flat buffer per (device, dtype) (as DDP's buckets), so a model's
    gradients cost one collective, not one per parameter. The mean is SUM then divide: gloo has no AVG.
    """
    if not is_initialized() or not tensors:
        return
    buckets: dict = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        if mean:
            flat.div_(dist.get_world_size(group))
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view_as(t))


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """A new tensor: the sum of ``t`` over the ranks of ``group`` (``t`` itself when not distributed)."""
    if not is_initialized():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def sum_over_ranks(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """New tensors: each summed over the ranks (one all-reduce per (device, dtype)); a copy-free
    identity when not distributed. Used for mask scores (Fisher), at refresh time only."""
    if not is_initialized():
        return list(tensors)
    out = [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]
    all_reduce_(out, group)
    return out


def check_params(params: Sequence[torch.Tensor]) -> None:
    """Refuse parameters SAM cannot handle correctly in a distributed run (before any step).

    FSDP1 flattens parameters into per-rank shards that are plain tensors: every global norm would
    silently be the local shard's. ``fully_shard`` (FSDP2) gives DTensors, whose reductions
    :mod:`sam_kernels.ops.dtensor` all-reduces over the mesh.
    """
    for p in params:
        if getattr(p, "_fsdp_flattened", False):  # torch.distributed.fsdp._common_utils.FSDP_FLATTENED
            raise ValueError(
                "SAM: these parameters are managed by FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel), "
                "whose flat per-rank shards would make every norm of the SAM step local to one shard (a silently "
                "wrong perturbation). Use FSDP2 instead (torch.distributed.fsdp.fully_shard: DTensor parameters, "
                "whose norms sam_kernels reduces over the mesh), or DistributedDataParallel")


def _is_dtensor(t: torch.Tensor) -> bool:
    from ..ops.dtensor import is_dtensor
    return is_dtensor(t)


AGREEMENT_STEPS = 2
"""Global mode: the first steps at which the ranks check that they hold the same first-pass gradient."""


class GlobalSync:
    """``distributed="global"``: gradients are synchronized by DDP/FSDP2 before the optimizer reads
    them; nothing to add but the agreement check of the first steps (see the module docstring)."""

    mode = "global"
    per_replica = False

    def __init__(self, process_group=None):
        self.process_group = process_group
        self._checks_left = AGREEMENT_STEPS

    def check(self, params: Sequence[torch.Tensor]) -> None:
        check_params(params)
        if any(_is_dtensor(p) for p in params):  # FSDP2 reduces every backward and every norm: nothing to compare
            self._checks_left = 0

    def policy_sq_norm(self, sam, sq: torch.Tensor) -> torch.Tensor:
        """The ‖g‖² a policy decides from (``sq``: this rank's, of every first-pass gradient)."""
        return sq

    def ascent_sq_norm(self, sam, sq: torch.Tensor) -> torch.Tensor:
        """The ascent ‖g‖² the NaN/Inf check and the descent modifiers (Stable SAM) see."""
        self._check_agreement(sq)
        return sq

    def before_sam_descent(self, sam) -> None:
        """Called in ``second_step`` before the descent modifiers."""

    def before_plain_descent(self, grads: Sequence[torch.Tensor]) -> None:
        """Called in ``base_step`` before anything reads the gradients."""
        if self._checks_left > 0 and is_initialized() and not torch.compiler.is_compiling():
            from .. import ops
            self._check_agreement(ops.grad_sq_norm(list(grads)) if grads else torch.zeros(()))

    def _check_agreement(self, sq: torch.Tensor) -> None:
        """At the first steps: raise on every rank if the ranks' first-pass ‖g‖² differ (one scalar
        all-reduce, one host read). Non-finite norms are left to the finite check and AMP. Not inside
        torch.compile, where the host read would break the graph."""
        if (self._checks_left <= 0 or torch.compiler.is_compiling() or not is_initialized()
                or dist.get_world_size(self.process_group) == 1):
            return
        self._checks_left -= 1
        sq = sq.detach().double().reshape(())
        both = torch.stack([sq, -sq])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
        high, low = both[0], -both[1]
        agree = torch.isclose(high, low, rtol=1e-6, atol=0.0) | ~torch.isfinite(both).all()
        if not bool(agree):  # the documented host read, first steps only
            raise RuntimeError(
                f"SAM(distributed='global'): the ranks hold different first-pass gradients (squared norms from "
                f"{low.item():.6g} to {high.item():.6g}), so each would descend with its own gradient and the replicas "
                f"would drift apart. If the first backward runs under DDP's no_sync() (m-SAM), build the optimizer "
                f"with distributed='m-sam'; otherwise let DDP synchronize the first backward. The weights are unchanged")

    def agreed_grads(self, grads: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """First-pass gradients as every rank sees them (dynamic sparse masks): unchanged here."""
        return list(grads)


class PerReplica(GlobalSync):
    """``distributed="m-sam"``: the first backward runs under DDP's ``no_sync()``; see the module
    docstring for what is all-reduced and when (ours: the rank-mean of the local ‖g_r‖² for AE-SAM's
    decisions and Stable SAM's reference)."""

    mode = "m-sam"
    per_replica = True

    def __init__(self, process_group=None):
        super().__init__(process_group)
        self._policy_mean: Optional[tuple[int, torch.Tensor]] = None  # (step, rank-mean ‖g‖²) of wants_sam

    def check(self, params: Sequence[torch.Tensor]) -> None:
        super().check(params)
        if any(_is_dtensor(p) for p in params):
            raise ValueError("SAM(distributed='m-sam') is DDP's no_sync() recipe; FSDP2 (DTensor parameters) "
                             "synchronizes every backward: use distributed='global'")

    def _mean(self, sq: torch.Tensor) -> torch.Tensor:
        if not is_initialized():
            return sq
        return all_reduce_sum(sq, self.process_group) / dist.get_world_size(self.process_group)

    def policy_sq_norm(self, sam, sq):
        mean = self._mean(sq)
        self._policy_mean = (sam.step_count, mean)
        return mean

    def ascent_sq_norm(self, sam, sq):
        from .descent import Renormalize
        if not (sam.finite_check or any(isinstance(m, Renormalize) for m in sam.modifiers)):
            return sq
        cached, self._policy_mean = self._policy_mean, None
        if (cached is not None and cached[0] == sam.step_count and sam.ascent_params() is None
                and groups.all_perturbed(sam.param_groups) and not any(g["adaptive"] for g in sam.param_groups)):
            # The ascent norm is then the policy's ‖g‖² of the same gradients (the same op on the same
            # list, bitwise): reuse its rank mean, so AE-SAM costs one scalar all-reduce per step, not two.
            return cached[1]
        return self._mean(sq)

    def before_sam_descent(self, sam) -> None:
        # a modifier's own copy of g(w) (LookSAM's) is this rank's: average it as the plain steps' grads
        params = [p for group in sam.param_groups for p in group["params"] if p.grad is not None]
        firsts = [g for m in sam.modifiers for g in (m.first_grads(sam, params) or ()) if g is not None]
        all_reduce_(firsts, self.process_group, mean=True)

    def before_plain_descent(self, grads):
        all_reduce_(list(grads), self.process_group, mean=True)

    def agreed_grads(self, grads):
        present = [g.detach().clone() for g in grads if g is not None]
        all_reduce_(present, self.process_group, mean=True)
        it = iter(present)
        return [None if g is None else next(it) for g in grads]


def make_sync(option: Union[str, GlobalSync], params: Sequence[torch.Tensor]) -> GlobalSync:
    """The sync object for ``SAM(distributed=option)`` (a mode name or an instance), checked against ``params``."""
    if isinstance(option, GlobalSync):
        sync = option
    elif option == "global":
        sync = GlobalSync()
    elif option == "m-sam":
        sync = PerReplica()
    else:
        raise ValueError(f"distributed must be one of {MODES} (or a GlobalSync/PerReplica instance), got {option!r}")
    sync.check(params)
    return sync
