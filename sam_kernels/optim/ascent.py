"""One ascent of a SAM step (w ← w + e) as the step loop runs it (ours): what it perturbs, by
how much, with which options (:func:`first_ascent`), and the perturbation itself (:class:`Ascent`)."""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Optional

import torch

from .. import ops
from ..ops.lists import numel_sum
from . import aliases, amp, backups, follow, groups, param_scan, sparse_grads, storage_swap
from .compiled import hyper
from .policy import grad_norm_for


@dataclass
class Ascent:
    """One ascent (``first_step``) as the step loop runs it; telemetry observes it."""

    entries: list            # (param group, param) to perturb, in group order
    sq: Optional[torch.Tensor]     # their ‖T ⊙ g‖² (scaled under AMP; this rank's), None without entries
    scale: Optional[torch.Tensor]  # the loss scale the gradients carry (None: unscaled)
    subset: bool             # ``ascent_params()`` chose the params (not every param with a gradient)
    options: dict = field(default_factory=dict)  # extra ``ops.perturb_`` keyword arguments
    buckets: dict = field(default_factory=dict)  # (rho, adaptive, eta) -> indices into ``entries``
    alias_keys: dict = field(default_factory=dict)  # params over shared memory (:func:`.aliases.find`)
    sparse: bool = False     # some gradient is sparse (those params take the eager path, :mod:`.sparse_grads`)
    backup_key: str = "backup"  # the state entry that receives w (a later ascent of a multi-step one: scratch)
    whole_sq: Optional[torch.Tensor] = None  # ‖g‖² over the perturbed and SAM-ON's skipped groups, when taken
    read_grads: InitVar[Optional[list]] = None  # the params' gradients when the caller has just read them
    params: list = field(init=False)
    grads: list = field(init=False)
    kept: Optional[list] = field(init=False, default=None)  # the params' backups (their w), once perturbed

    def __post_init__(self, read_grads: Optional[list]):
        self.params = groups.params_of(self.entries)
        self.grads = [p.grad for p in self.params] if read_grads is None else read_grads

    @property
    def plain_rho(self) -> Optional[float]:
        """rho when this is plain SAM (one bucket without ASAM; no masks, keep mask or variant norm)
        and a float, so ‖e‖ follows from the norm by scalar maths; else None."""
        if len(self.buckets) != 1:
            return None
        rho, adaptive, _ = next(iter(self.buckets))
        if isinstance(rho, torch.Tensor):  # a compiled step's rho (.compiled): the kernel measures ‖e‖
            return None
        plain = not adaptive and not any(k in self.options for k in ("masks", "keep_prob", "sq_norm"))
        return rho if plain else None

    def perturb(self, state: dict, backend: Optional[str], trade: Optional[bool] = False,
                found: Optional[param_scan.ParamScan] = None) -> None:
        """w ← w + e: ``ops.perturb_`` per bucket of equal (rho, adaptive, eta), each param's w kept in
        ``state[p]["backup"]`` (:attr:`kept`). Aliased params run one layer after the other (see
        :mod:`.aliases`). On any error the weights are w again. ``trade``: the ``swap_storages``
        option (:mod:`.storage_swap`): the params may end in their backups' memory. ``found``: the
        step's scan when its params are exactly :attr:`params` (their element count and device).

        Raises ``ValueError`` before writing when an ASAM bucket holds a second alias of one memory:
        its T = |w| + eta would be read at the already perturbed weights."""
        params, grads = self.params, self.grads
        layer = aliases.layers(params, self.alias_keys)
        buckets = list(self.buckets.items())
        if layer is not None and any(adaptive and any(layer[i] for i in idx) for (_, adaptive, _), idx in buckets):
            raise ValueError("SAM: ASAM (adaptive=True) on parameters that share their memory is not supported "
                             "(T = |w| + eta would be read at the perturbed weights); tie the weight by using one "
                             "Parameter in both places (b.weight = a.weight), or use adaptive=False for them")
        kept = self.kept = backups.get(state, params, self.backup_key)
        # Write w + e into the backups and trade storages after (fewer bytes, :mod:`.storage_swap`):
        # the first ascent's backups only; aliases and sparse gradients keep the in-place ascent.
        into = (trade is not False and not torch.compiler.is_compiling() and self.backup_key == "backup"
                and layer is None and not self.sparse
                and storage_swap.wanted(trade, *_size(params, found), len(params))
                and storage_swap.tradeable(params, kept))
        if into:
            self.options["into_backups"] = True
        done: list[int] = []
        try:
            for n in range(1 + max(layer or [0])):
                for b, ((rho, adaptive, eta), all_idx) in enumerate(buckets):
                    idx = all_idx if layer is None else [i for i in all_idx if layer[i] == n]
                    if self.sparse:
                        for i in [i for i in idx if grads[i].is_sparse]:
                            self._perturb_sparse(state, i, rho, eta if adaptive else None)
                            done.append(i)
                        idx = [i for i in idx if not grads[i].is_sparse]
                    if idx:
                        self._perturb_bucket(state, backend, idx, rho, adaptive, eta, b + n * len(buckets))
                        done.extend(idx)
        except BaseException:  # never leave weights perturbed: undo what ran (into the backups: nothing to undo)
            if done and not into:
                backups.copy_back([params[i] for i in done], [kept[i] for i in done], backend, self.alias_keys)
            raise
        finally:
            self.options.pop("into_backups", None)
        if into:
            storage_swap.swap(params, kept)

    def _perturb_sparse(self, state: dict, i: int, rho: float, eta: Optional[float]) -> None:
        """Entry ``i`` has a sparse gradient: the eager ascent at its stored indices."""
        p, masks = self.params[i], self.options.get("masks")
        if self.kept[i].shape != p.shape or self.kept[i].dtype != p.dtype or self.kept[i].device != p.device:
            backups.renew_stale(state, self.params, self.kept, [i], self.backup_key)
        sparse_grads.perturb_(p, self.grads[i], self.kept[i], self.options.get("sq_norm", self.sq), rho, eta,
                              None if masks is None else masks[i],
                              perturbation_sq=self.options.get("perturbation_sq"))

    def _perturb_bucket(self, state: dict, backend: Optional[str], idx: list[int], rho, adaptive: bool,
                        eta: float, b: int) -> None:
        """``ops.perturb_`` on the entries ``idx`` (none of them aliases another); ``b`` numbers the launch."""
        params, grads, kept = self.params, self.grads, self.kept
        whole = len(idx) == len(params)
        pick = (lambda xs: xs) if whole else (lambda xs: [xs[i] for i in idx])
        kw = {k: (pick(v) if k in ("masks", "grad_copies") and v is not None else v)
              for k, v in self.options.items()}
        kw.setdefault("sq_norm", self.sq)
        if b and kw.get("seed") is not None:
            # perturb_ keys its element RNG by (seed, position in this launch): give each launch
            # its own seed so launches of equal shapes do not repeat the first one's draws.
            kw["seed"] = (int(kw["seed"]) + 0x9E3779B97F4A7C15 * b) % (1 << 62)
        for retry in (False, True):
            try:
                ops.perturb_(pick(params), pick(grads), pick(kept), rho, adaptive=adaptive, eta=eta,
                             backend=backend, **kw)
                return
            except (TypeError, ValueError):  # rejected before writing anything
                if retry or not backups.renew_stale(state, params, kept, idx, self.backup_key):
                    raise


def _size(params: list, found: Optional[param_scan.ParamScan]) -> tuple:
    """(the params' device, or None when they are on several or none; their element count), from
    the step's scan ``found`` when it has them (as :func:`.base_step.in_pass_check` reads it)."""
    if found is not None:
        return found.device, found.numel
    numel = numel_sum(params)
    if not params or numel < storage_swap.MIN_MEAN_NUMEL * len(params):  # the device is not needed
        return None, numel
    return follow.one_device(params), numel


def ascent_rho(sam, group: dict):
    """The rho of one ascent (rho/k of a k-step ascent, :mod:`.multi_step`), read as a compiled step
    must (:func:`.compiled.hyper`)."""
    rho = hyper(sam, group, "rho")
    return rho if sam.ascent_steps == 1 else rho / sam.ascent_steps


def bucket_key(sam):
    """The key of :func:`.groups.bucket` for an ascent: (rho of one ascent, adaptive, eta)."""
    return lambda g: (ascent_rho(sam, g), g["adaptive"], g["eta"])


def first_ascent(sam) -> Ascent:
    """The ascent of a SAM step (its first, for a multi-step one): collect, norm, agree across ranks,
    screen, modifiers, options, then perturb per bucket (the weights are w again on any error)."""
    now = sam.step_state
    entries, grads, sparse, found = param_scan.take(sam)
    if sparse:  # every param's, chosen or not: before any write
        sparse_grads.refuse_unsupported(sam)
        if sam.ascent_steps > 1:
            sparse_grads.refuse_multi_step(sam)
    chosen = sam.ascent_params()
    if chosen is not None:
        entries = groups.with_grads(sam.param_groups, chosen)
    if now.decision is None and entries:  # SAM forced without wants_sam(): stateful policies still learn
        sam.policy.observe(now.step_count, grad_norm_for(sam.policy, sam))
    every_group = groups.all_perturbed(sam.param_groups)
    skipped = []
    if not every_group:  # SAM-ON: groups with perturb=False are neither perturbed nor in the norm
        skipped = [e for e in entries if not e[0]["perturb"]]
        entries = [e for e in entries if e[0]["perturb"]]
    for m in sam.modifiers:
        m.before_ascent(sam, [p for _, p in entries], [p.grad for _, p in entries])
    if chosen is not None or not every_group or sam.modifiers:  # other entries, or gradients a modifier replaced
        grads = None
    sq = groups.sq_norm(entries, sam.backend, grads=grads, dense=grads is not None and not sparse) if entries else None
    ascent = Ascent(entries, sq, sam.loss_scale, subset=chosen is not None or not every_group,
                    alias_keys=now.aliases, sparse=sparse, read_grads=grads)
    whole = sq
    if sq is not None and skipped and (sam.finite_check or sam.amp.active or sam.modifiers
                                       or sam.telemetry.enabled):
        # the overflow screen, Stable SAM's and telemetry's ‖g(w)‖ cover every first-pass gradient,
        # as plain SAM's norm does: the skipped groups are read here only when one of them needs it
        whole = sq + groups.sq_norm(skipped, sam.backend).to(sq.device)
        if chosen is None:
            ascent.whole_sq = whole
    agreed = None if sq is None else sam.distributed.ascent_sq_norm(sam, whole)  # m-SAM: the rank mean
    if agreed is not None:
        sam.amp.screen(sam, agreed, "first_step")
    params, grads = ascent.params, ascent.grads
    for m in sam.modifiers:
        m.after_ascent(sam, params, grads, None if agreed is None else amp.unscaled(agreed, ascent.scale))
    ascent.options = sam.perturbation_options(params, grads) if entries else {}
    direction = sam.ascent_direction(params, grads, ascent.scale) if entries else None
    direction_scale = ascent.scale
    if direction is not None:  # perturb along d: its own norm; g(w) stays what telemetry reads
        ascent.grads, direction_scale = direction
        ascent.options["sq_norm"] = groups.sq_norm(entries, sam.backend, grads=ascent.grads)
    ascent.options.update(sam.amp.perturb_args(sam, direction_scale))
    ascent.buckets = groups.bucket(entries, bucket_key(sam))
    ascent.options.update(sam.telemetry.perturb_options(sam, ascent))
    if direction is not None:
        ascent.options.pop("grad_copies", None)  # perturb_ would copy d, not g(w): telemetry copies g(w) itself
    if sparse:
        sparse_grads.refuse_unsupported(sam, ascent.options)
    whole = found is not None and not found.missing and chosen is None and every_group  # the scan's params
    ascent.perturb(sam.state, sam.backend, sam.swap_storages, found if whole else None)
    return ascent
