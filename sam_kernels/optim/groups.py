"""Parameters by param group: which have gradients, how groups bucket, the group-weighted norm (ours)."""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Optional

import torch

from .. import ops
from . import sparse_grads

Entry = tuple[dict, torch.Tensor]
"""(param group, param)."""


def all_params(param_groups: list[dict]) -> list[torch.Tensor]:
    """Every param of ``param_groups``, in group order."""
    return [p for group in param_groups for p in group["params"]]


def with_grads(param_groups: list[dict], params: Optional[Iterable[torch.Tensor]] = None) -> list[Entry]:
    """(group, param) for every param with a gradient (of ``params`` only, if given), in group order.
    Sparse gradients included (:mod:`.sparse_grads` says where they may go)."""
    wanted = None if params is None else {id(p) for p in params}
    out = []
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None and (wanted is None or id(p) in wanted):
                out.append((group, p))
    return out


def bucket(entries: list[Entry], key: Callable[[dict], Hashable]) -> dict[Hashable, list[int]]:
    """key(group) -> the indices into ``entries`` of its params, keys in order of first appearance.
    ``key`` runs once per run of one group, not per param: this runs every step."""
    out: dict = {}
    last_group, members = None, []
    for i, (group, _) in enumerate(entries):
        if group is not last_group:
            last_group = group
            members = out.setdefault(key(group), [])
        members.append(i)
    return out


def all_perturbed(param_groups: list[dict]) -> bool:
    """Whether every group takes part in the ascent (none sets SAM-ON's ``perturb=False``)."""
    return all(g["perturb"] for g in param_groups)


def asam_eta(group: dict) -> Optional[float]:
    """The group's ASAM offset, or None for a group without ASAM."""
    return group["eta"] if group["adaptive"] else None


def sq_norm(entries: list[Entry], backend: Optional[str], *, grads: Optional[list[torch.Tensor]] = None,
            weights: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            masks: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """One global ‖m ⊙ T ⊙ g‖² over ``entries`` (0-dim, on the first part's device): T = |w| + eta for
    ASAM groups (ASAM, Kwon et al. 2021), 1 otherwise; m = ``masks`` (aligned with ``entries``), 1 if
    None. ``grads``: the gradients (default ``p.grad``); ``weights(p)``: the w of T (default ``p``).
    Sparse gradients add their stored values, coalesced (:func:`.sparse_grads.sq_norm`)."""
    grads = [p.grad for _, p in entries] if grads is None else grads
    weights = weights or (lambda p: p)
    parts = []
    sparse = [i for i, g in enumerate(grads) if g.is_sparse]
    if sparse:
        for i in sparse:
            group, p = entries[i]
            parts.append(sparse_grads.sq_norm(p, grads[i], asam_eta(group), None if masks is None else masks[i],
                                              weight=weights(p)))
        keep = [i for i in range(len(entries)) if not grads[i].is_sparse]
        entries, grads = [entries[i] for i in keep], [grads[i] for i in keep]
        masks = None if masks is None else [masks[i] for i in keep]
    for eta, idx in bucket(entries, asam_eta).items():
        ps = [weights(entries[i][1]) for i in idx] if eta is not None else None
        parts.append(ops.grad_sq_norm([grads[i] for i in idx], params=ps,
                                      masks=None if masks is None else [masks[i] for i in idx],
                                      eta=0.0 if eta is None else eta, backend=backend))
    return parts[0] if len(parts) == 1 else torch.stack([x.to(parts[0].device) for x in parts]).sum()


def grads_sq_norm(grads: list[torch.Tensor], backend: Optional[str]) -> torch.Tensor:
    """‖g‖² over ``grads`` (0-dim), sparse ones by their coalesced stored values."""
    if not any(g.is_sparse for g in grads):
        return ops.grad_sq_norm(grads, backend=backend)
    dense = [g for g in grads if not g.is_sparse]
    parts = [g.coalesce().values().float().square().sum() if g.dtype in (torch.float16, torch.bfloat16)
             else g.coalesce().values().square().sum() for g in grads if g.is_sparse]
    if dense:
        parts.insert(0, ops.grad_sq_norm(dense, backend=backend))
    return torch.stack([x.to(parts[0].device) for x in parts]).sum()
