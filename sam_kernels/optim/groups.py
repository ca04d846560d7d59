"""Parameters by param group: which have gradients, how groups bucket, the group-weighted norm (ours).

These run on every step over every parameter: on a model of thousands of small tensors each read
of a tensor attribute per parameter (``p.grad``, ``is_sparse``, a state lookup keyed by the tensor)
costs about as much as a kernel's own per-tensor work, so each is read once per step where it can
be, and work per group replaces work per parameter wherever one group's params are consecutive.
"""
from __future__ import annotations

from itertools import chain
from typing import Callable, Hashable, Iterable, Optional

import torch

from .. import ops
from . import sparse_grads

Entry = tuple[dict, torch.Tensor]
"""(param group, param)."""


def all_params(param_groups: list[dict]) -> list[torch.Tensor]:
    """Every param of ``param_groups``, in group order."""
    return list(chain.from_iterable(group["params"] for group in param_groups))


def with_grads(param_groups: list[dict], params: Optional[Iterable[torch.Tensor]] = None) -> list[Entry]:
    """(group, param) for every param with a gradient (of ``params`` only, if given), in group order.
    Sparse gradients included (:mod:`.sparse_grads` says where they may go)."""
    out = [(group, p) for group in param_groups for p in group["params"] if p.grad is not None]
    if params is not None:
        wanted = {id(p) for p in params}
        out = [e for e in out if id(e[1]) in wanted]
    return out


def params_of(entries: list[Entry]) -> list[torch.Tensor]:
    """The params of ``entries``, in order."""
    return [p for _, p in entries]


def columns(rows: list[tuple], count: int) -> list[list]:
    """The first ``count`` columns of a list of tuples, as lists (``zip(*rows)`` takes 5x as long on
    thousands of rows: it makes an iterator per row)."""
    return [[row[k] for row in rows] for k in range(count)]


def runs(entries: list[Entry]) -> list[tuple[dict, int, int]]:
    """(group, start, stop) of each run of one group in ``entries``, in order. ``entries`` are in group
    order (one group's entries consecutive, each param once), so a group's run holds at most its
    ``len(group["params"])`` entries: when the entry that many places on is still the group's, the
    run is found with one look instead of a look per param."""
    out, i, n = [], 0, len(entries)
    while i < n:
        group = entries[i][0]
        end = i + len(group["params"])
        if not (end <= n and entries[end - 1][0] is group):
            end = i + 1
            while end < n and entries[end][0] is group:
                end += 1
        out.append((group, i, end))
        i = end
    return out


def bucket(entries: list[Entry], key: Callable[[dict], Hashable]) -> dict[Hashable, list[int]]:
    """key(group) -> the indices into ``entries`` of its params, keys in order of first appearance.
    ``entries`` are in group order (:func:`runs`); ``key`` runs once per group, not per param: this
    runs every step."""
    out: dict = {}
    for group, start, stop in runs(entries):
        out.setdefault(key(group), []).extend(range(start, stop))
    return out


def all_perturbed(param_groups: list[dict]) -> bool:
    """Whether every group takes part in the ascent (none sets SAM-ON's ``perturb=False``)."""
    return all(g["perturb"] for g in param_groups)


def asam_eta(group: dict) -> Optional[float]:
    """The group's ASAM offset, or None for a group without ASAM."""
    return group["eta"] if group["adaptive"] else None


def sq_norm(entries: list[Entry], backend: Optional[str], *, grads: Optional[list[torch.Tensor]] = None,
            weights: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            masks: Optional[list[torch.Tensor]] = None, dense: bool = False) -> torch.Tensor:
    """One global ‖m ⊙ T ⊙ g‖² over ``entries`` (0-dim, on the first part's device): T = |w| + eta for
    ASAM groups (ASAM, Kwon et al. 2021), 1 otherwise; m = ``masks`` (aligned with ``entries``), 1 if
    None. ``grads``: the gradients (default ``p.grad``); ``weights(p)``: the w of T (default ``p``).
    Sparse gradients add their stored values, coalesced (:func:`.sparse_grads.sq_norm`); ``dense``:
    the caller has checked that none of ``grads`` is sparse (a read per tensor less)."""
    grads = [p.grad for _, p in entries] if grads is None else grads
    weights = weights or (lambda p: p)
    parts = []
    if not dense and any(g.is_sparse for g in grads):
        for i in [i for i, g in enumerate(grads) if g.is_sparse]:
            group, p = entries[i]
            parts.append(sparse_grads.sq_norm(p, grads[i], asam_eta(group), None if masks is None else masks[i],
                                              weight=weights(p)))
        keep = [i for i in range(len(entries)) if not grads[i].is_sparse]
        entries, grads = [entries[i] for i in keep], [grads[i] for i in keep]
        masks = None if masks is None else [masks[i] for i in keep]
    for eta, idx in bucket(entries, asam_eta).items():
        whole = len(idx) == len(entries)  # one bucket: every entry, in order
        ps = [weights(entries[i][1]) for i in idx] if eta is not None else None
        parts.append(ops.grad_sq_norm(grads if whole else [grads[i] for i in idx], params=ps,
                                      masks=masks if masks is None or whole else [masks[i] for i in idx],
                                      eta=0.0 if eta is None else eta, backend=backend))
    return parts[0] if len(parts) == 1 else torch.stack([x.to(parts[0].device) for x in parts]).sum()


def grads_sq_norm(grads: list[torch.Tensor], backend: Optional[str], sparse: Optional[bool] = None) -> torch.Tensor:
    """‖g‖² over ``grads`` (0-dim), sparse ones by their coalesced stored values. ``sparse``: whether
    any of ``grads`` is sparse, when the caller knows (else looked at here)."""
    if not (any(g.is_sparse for g in grads) if sparse is None else sparse):
        return ops.grad_sq_norm(grads, backend=backend)
    dense = [g for g in grads if not g.is_sparse]
    parts = [g.coalesce().values().float().square().sum() if g.dtype in (torch.float16, torch.bfloat16)
             else g.coalesce().values().square().sum() for g in grads if g.is_sparse]
    if dense:
        parts.insert(0, ops.grad_sq_norm(dense, backend=backend))
    return torch.stack([x.to(parts[0].device) for x in parts]).sum()
