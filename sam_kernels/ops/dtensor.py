"""DTensor (FSDP2 ``fully_shard``) support for every op: local shards in, global reductions out.

The compiled ops have no DTensor sharding rule, and a norm of a sharded gradient is a sum over
every shard. So each public op that receives DTensors runs on the local shards (``to_local()``)
with a *reduction context* active: every global reduction the op computes (``grad_sq_norm``,
``dot`` — hence the norms of ``perturb_``, ``renormalize_``, ``looksam_store_`` /
``looksam_apply_``) is all-reduced (SUM) over the mesh dimensions the tensors are sharded on:
one all-reduce of one 0-dim tensor per reduction, issued on the tensor's device (NCCL: async on
the stream, no host sync). Element-wise ops need no communication.

Rules (ours):
- every DTensor of one call lives on the same mesh and is sharded (``Shard``) on the same mesh
  dimensions; ``Replicate`` dimensions are not reduced over (the replicas hold equal copies). A
  ``Partial`` placement (an unreduced sum) or a mix of plain tensors and DTensors is rejected with
  a clear error before anything is written. (Tensor parallel models, which mix sharded and
  replicated parameters in one list, are therefore refused, not supported.)
- ``topk_mask`` / ``nm_mask`` gather the full scores (``full_tensor()``: one all-gather per
  tensor, at mask refresh time), pick the mask exactly as in a single process (exact global count,
  N:M groups that may straddle shard boundaries of 1-D tensors) and return DTensor masks with
  the scores' placements (each rank keeps its own slice; no further communication).
- ``sgd_restore_step_`` returns its momentum buffers as DTensors placed like the params.
- ``perturb_`` with ``keep_prob`` draws the keep mask at each element's GLOBAL index (the
  single-process mask), so it needs an explicit seed, equal on every rank.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .contract import OPS

_context = threading.local()


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor. torch.distributed.tensor is not imported here (0.35 s): until
    something else imports it, no DTensor can exist."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _dtensor_api():
    from torch.distributed.tensor import DTensor, distribute_tensor
    return DTensor, distribute_tensor


def reduce_groups() -> Optional[list]:
    """The process groups the current op's reductions are summed over (None outside a DTensor call)."""
    return getattr(_context, "groups", None)


def all_reduce_partial(value: torch.Tensor) -> torch.Tensor:
    """Inside a DTensor call: ``value`` (a local partial sum) summed over the sharded mesh dims; else ``value``."""
    groups = reduce_groups()
    if not groups:
        return value
    value = value.clone()  # never reduce in place a tensor a backend may still hold
    for group in groups:
        dist.all_reduce(value, group=group)
    return value


def _layout(op: str, tensors: list[torch.Tensor]):
    """(mesh, sharded mesh dims) shared by every DTensor of the call, or a clear error."""
    mesh, dims = None, None
    for t in tensors:
        if not is_dtensor(t):
            raise TypeError(f"{op}: mixes DTensors and plain tensors; pass every list as DTensors (FSDP2 "
                            f"parameters, their gradients and buffers made with torch.empty_like/zeros_like)")
        if any(pl.is_partial() for pl in t.placements):
            raise ValueError(f"{op}: a DTensor with a Partial placement {t.placements} (an unreduced sum) cannot be "
                             f"read; reduce it first (redistribute to Shard or Replicate)")
        these = tuple(i for i, pl in enumerate(t.placements) if pl.is_shard())
        if mesh is None:
            mesh, dims = t.device_mesh, these
        elif t.device_mesh != mesh or these != dims:
            raise ValueError(f"{op}: DTensors on different meshes or sharded on different mesh dimensions "
                             f"({dims} vs {these}); sam_kernels reduces one call over one set of mesh dimensions")
    return mesh, dims


def _whole_rows(op: str, tensors: list) -> None:
    """An op on rows of dim 0 needs each row on one rank: tensors of more than one dimension may be
    sharded along dim 0 only (FSDP2's default ``Shard(0)``)."""
    for t in tensors:
        if t.dim() > 1 and any(pl.is_shard() and pl.dim != 0 for pl in t.placements):
            raise ValueError(f"{op}: a tensor of shape {tuple(t.shape)} is sharded as {t.placements}: its rows are "
                             f"split across ranks; the rows of dim 0 must each be whole on one rank "
                             f"(FSDP2's default Shard(0))")


def _local(x: Any) -> Any:
    if is_dtensor(x):
        return x.to_local()
    if isinstance(x, (list, tuple)):
        return [None if t is None else (t.to_local() if is_dtensor(t) else t) for t in x]
    return x


def _full_like_scores(op: str, fn: Callable, scores, *args, **kwargs) -> list[torch.Tensor]:
    """Mask ops: gather full scores, build the mask as in one process, keep each rank's slice."""
    _layout(op, list(scores))
    full = fn([s.full_tensor() for s in scores], *args, **kwargs)
    _, distribute_tensor = _dtensor_api()
    # Every rank built the same full mask: slice it locally (src_data_rank=None: no communication).
    return [distribute_tensor(m, s.device_mesh, s.placements, src_data_rank=None) for m, s in zip(full, scores)]


def accepts_dtensor(fn: Callable) -> Callable:
    """Wrap a public op of :mod:`sam_kernels.ops.api` so that DTensor arguments run on their local shards.

    Plain-tensor calls pass straight through (one type check of the first list's first entry).
    """
    sig = inspect.signature(fn)
    first = next(iter(sig.parameters))
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        primary = args[0] if args else kwargs.get(first)
        if not (isinstance(primary, (list, tuple)) and primary and is_dtensor(primary[0])):
            return fn(*args, **kwargs)
        if OPS[name].kind == "mask":
            return _full_like_scores(name, fn, *args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        dtensors = [t for v in bound.arguments.values() if isinstance(v, (list, tuple))
                    for t in v if isinstance(t, torch.Tensor)]
        mesh, dims = _layout(name, dtensors)
        if OPS[name].per_row:
            _whole_rows(name, dtensors)
        local = {k: _local(v) for k, v in bound.arguments.items()}
        if name == "perturb_" and local.get("keep_prob") is not None and local["keep_prob"] < 1.0:
            _global_keep_masks(bound.arguments, local)
        outer = reduce_groups()
        _context.groups = [mesh.get_group(d) for d in dims]
        try:
            out = fn(**local)
        finally:
            _context.groups = outer
        if name == "sgd_restore_step_":
            given, sent = bound.arguments.get("momentum_buffers"), local.get("momentum_buffers")
            return [_rewrap(b, p, None if given is None else given[i], None if sent is None else sent[i])
                    for i, (b, p) in enumerate(zip(out, bound.arguments["params"]))]
        return out

    return wrapper


def _global_index(t) -> torch.Tensor:
    """int64 tensor of the local shard's shape: each element's row-major index in the GLOBAL tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    device = t.to_local().device
    index = torch.zeros(shape, dtype=torch.int64, device=device)
    stride = 1
    for d in reversed(range(len(shape))):
        view = [1] * len(shape)
        view[d] = -1
        index += (torch.arange(offset[d], offset[d] + shape[d], device=device) * stride).view(view)
        stride *= t.shape[d]
    return index


def _global_keep_masks(args: dict, local: dict) -> None:
    """perturb_ with ``keep_prob`` on shards: the keep mask keyed by (seed, tensor position, GLOBAL element
    index) — the single-process draw — folded into ``masks``; rho absorbs the 1/keep_prob scale."""
    from .reference import fmix32, tensor_key

    seed = args.get("seed")
    if seed is None:
        raise ValueError("perturb_: keep_prob on DTensors needs an explicit seed, the same on every rank "
                         "(a seed drawn here would differ between ranks)")
    keep_prob = float(local["keep_prob"])
    masks = local.get("masks")
    out = []
    for i, p in enumerate(args["params"]):
        gi = _global_index(p)
        r = fmix32(fmix32((gi & 0xFFFFFFFF) ^ tensor_key(int(seed), i)) ^ (gi >> 32))
        keep = (r >> 8) < int(keep_prob * (1 << 24))  # reference.keep_mask's formula, at global indices
        out.append(keep if masks is None else keep & masks[i])
    local["masks"] = out
    local["rho"] = float(local["rho"]) / keep_prob
    local["keep_prob"] = None


def _rewrap(buf: Optional[torch.Tensor], param, given, sent) -> Optional[torch.Tensor]:
    """A momentum buffer the op returned as a local tensor, as a DTensor placed like ``param``
    (``given``: the DTensor passed in, whose local shard ``sent`` the op updated in place)."""
    if buf is None:
        return None
    if sent is not None and buf is sent:
        return given
    DTensor, _ = _dtensor_api()
    return DTensor.from_local(buf, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def full_tensors(tensors):
    """Each DTensor gathered to its full (global) value; plain tensors and None unchanged."""
    return [t.full_tensor() if is_dtensor(t) else t for t in tensors]


def shard_like(tensors, likes):
    """Each full tensor sliced like the DTensor at the same position of ``likes`` (no communication:
    every rank holds the same full value); positions whose ``like`` is plain are returned as given."""
    _, distribute_tensor = _dtensor_api()
    return [distribute_tensor(t, ref.device_mesh, ref.placements, src_data_rank=None) if is_dtensor(ref) else t
            for t, ref in zip(tensors, likes)]
