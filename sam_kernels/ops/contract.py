"""The op table: one :class:`OpInfo` per op of ``torch.ops.sam_kernels``, the only list of the ops.

Everything else is derived from it: the exports of :mod:`sam_kernels.ops`, the fake (meta)
implementations (:mod:`.fake`), each backend's op list and so :func:`dispatch.backends`, the lists
whose version counters Triton bumps (the compiled ops bump theirs from the same schema), the
bytes floors of telemetry and of the benchmark, and the op tests (``tests/ops/opinfo.py``).

Adding an op:

1. an :class:`OpInfo` entry below: its schema exactly as ``csrc/sam_kernels.cpp`` defines it (a
   test compares them), its kind, the bytes per element it must move and the backends that have
   kernels for it;
2. its eager reference in :mod:`.reference` (same name and argument order as the schema; it is
   the specification, the oracle of the tests and the fallback of every device);
3. its public function in :mod:`.api` (argument checks, grouping, global reductions);
4. its kernels: the schema in ``csrc/sam_kernels.cpp`` (and, if it writes, in the list of ops
   whose version counters are bumped there), a ``TORCH_LIBRARY_IMPL`` per device, a function of
   the same name in a module of :mod:`.backends.triton`;
5. its sample inputs in ``tests/ops/opinfo.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from . import reference

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPLEX = (torch.complex64, torch.complex128)
"""Complex tensors run as ``torch.view_as_real`` views (real and imaginary parts as two floats)."""
LAYOUTS = ("contiguous", "dense", "strided")
"""``contiguous``; ``dense``: non-overlapping and dense in any memory order (channels_last,
permuted), fused where entry i of every list has the same order; ``strided``: anything else
(overlapping or gapped views), run eagerly, that entry only."""
BACKENDS = ("eager", "cpp", "cuda", "triton")
KINDS = ("reduction", "update", "mask")
"""``reduction``: returns a 0-dim tensor (fp32, fp64 when every input is fp64); ``update``: writes
its ``(x!)`` arguments in place, returns nothing; ``mask``: returns new bool tensors shaped like
its first list."""


@dataclass(frozen=True)
class OpInfo:
    """One op. ``schema``: the torch.library schema without its namespace; ``bytes_per_element``:
    (units of the element size, extra bytes) the op's own pass must move at the least, each input
    read once and each output written once (ours); ``reduction_units``: the reads of the norms and
    dots a composite op takes through :func:`grad_sq_norm` / :func:`dot` calls of its own (the
    benchmark counts them in the op's floor, telemetry as those calls); ``moves``: what is counted."""
    name: str
    schema: str
    kind: str
    doc: str
    reference: Callable
    bytes_per_element: tuple[int, int]
    moves: str
    reduction_units: int = 0
    dtypes: tuple[torch.dtype, ...] = FLOATS + COMPLEX
    layouts: tuple[str, ...] = LAYOUTS
    backends: tuple[str, ...] = BACKENDS
    per_row: bool = False
    """The op works on each row of dim 0 of its tensors (those of more than one dimension): the
    kernels take an entry only where every row is one contiguous run of storage (dim 0 outermost:
    contiguous, channels_last), the others run eagerly; a DTensor must be sharded along dim 0 only."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.parsed.name != self.name:
            raise ValueError(f"{self.name}: the schema names {self.parsed.name!r}")

    @cached_property
    def parsed(self) -> torch._C.FunctionSchema:
        return torch._C.parse_schema(self.schema)

    @property
    def arguments(self) -> tuple[str, ...]:
        """The schema's argument names, in order."""
        return tuple(a.name for a in self.parsed.arguments)

    @property
    def writes(self) -> tuple[str, ...]:
        """The arguments the op writes (``Tensor(a!)`` in the schema), in order."""
        return tuple(a.name for a in self.parsed.arguments if a.alias_info is not None and a.alias_info.is_write)

    @property
    def floor_units(self) -> int:
        """The benchmark's floor in units of s·N: the op's pass and the reductions it needs."""
        return self.bytes_per_element[0] + self.reduction_units


OPS: dict[str, OpInfo] = {op.name: op for op in (
    OpInfo("grad_sq_norm", "grad_sq_norm(Tensor[] grads, Tensor[]? params, Tensor[]? masks, float eta) -> Tensor",
           "reduction", "Σ (m ⊙ T ⊙ g)², T = |w| + eta with params (ASAM), else 1", reference.grad_sq_norm,
           (1, 0), "read g"),
    OpInfo("dot", "dot(Tensor[] a, Tensor[] b) -> Tensor",
           "reduction", "Σ ⟨a, b⟩", reference.dot, (2, 0), "read a, b"),
    OpInfo("perturb_",
           "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sq_norm, float rho, float eps, "
           "Tensor[]? masks, bool adaptive, float eta, float keep_prob, int[] keys, Tensor(c!)? perturbation_sq=None, "
           "Tensor(d!)[]? grad_copies=None, bool into_backups=False) -> ()",
           "update", "backups ← w; w += rho·(m ⊙ T² ⊙ g)·keep/keep_prob / (‖g‖ + eps) (into_backups: backups ← that "
           "w + ..., w only read)", reference.perturb_,
           (4, 0), "read w, g; write backup, w (norm given)"),
    OpInfo("restore_", "restore_(Tensor(a!)[] params, Tensor[] backups) -> ()",
           "update", "w ← backups, bitwise", reference.restore_, (2, 0), "read backup; write w"),
    OpInfo("sgd_restore_step_",
           "sgd_restore_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
           "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
           "bool init_buffers, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? ascent_grads=None, "
           "Tensor(c!)? sums=None, Tensor(d!)[]? momentum_out=None, Tensor(e!)? nonfinite=None) -> ()",
           "update", "w ← backups, then torch.optim.SGD's update", reference.sgd_restore_step_,
           (5, 0), "read backup, g, buf; write w, buf"),
    OpInfo("adamw_restore_step_",
           "adamw_restore_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] exp_avgs, "
           "Tensor(c!)[] exp_avg_sqs, int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
           "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? ascent_grads=None, "
           "Tensor(d!)? sums=None) -> ()",
           "update", "w ← backups, then torch.optim.AdamW's update", reference.adamw_restore_step_,
           (7, 0), "read backup, g, m, v; write w, m, v"),
    OpInfo("renormalize_", "renormalize_(Tensor(a!)[] grads, Tensor ref_sq_norm, Tensor sq_norm, float eps) -> ()",
           "update", "g ← g·sqrt(ref)/(‖g‖ + eps) (Stable SAM)", reference.renormalize_,
           (2, 0), "norm: read g; then read g, write g", reduction_units=1),
    OpInfo("fisher_accumulate_", "fisher_accumulate_(Tensor(a!)[] fisher, Tensor[] grads, float scale) -> ()",
           "update", "F += scale·g² (empirical Fisher)", reference.fisher_accumulate_, (3, 0), "read F, g; write F"),
    OpInfo("looksam_store_",
           "looksam_store_(Tensor(a!)[] g_v, Tensor[] grads, Tensor[] sam_grads, Tensor gs_dot_g, Tensor g_sq_norm, "
           "float eps) -> ()",
           "update", "g_v ← g_s − (⟨g, g_s⟩/‖g‖²)·g (LookSAM)", reference.looksam_store_,
           (3, 0), "dot+norm: read g, g_s; then read g, g_s, write g_v", reduction_units=2),
    OpInfo("looksam_apply_",
           "looksam_apply_(Tensor(a!)[] grads, Tensor[] g_v, float alpha, Tensor g_sq_norm, Tensor gv_sq_norm, "
           "float eps) -> ()",
           "update", "g ← g + alpha·(‖g‖/‖g_v‖)·g_v (LookSAM)", reference.looksam_apply_,
           (3, 0), "norms: read g, g_v; then read g, g_v, write g", reduction_units=2),
    OpInfo("ema_update_", "ema_update_(Tensor(a!)[] emas, Tensor[] grads, Tensor(b!)[]? directions, float weight, float sigma, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()",
           "update", "d ← g − sigma·S·m (when given); m ← m + weight·(g/S − m) unless found_inf (Friendly-SAM, VaSSO)",
           reference.ema_update_, (3, 0), "read m, g; write m (and d: one more list when given)"),
    OpInfo("mix_", "mix_(Tensor(a!)[] grads, Tensor[] others, Tensor a, Tensor b) -> ()",
           "update", "g ← a·g + b·o (GSAM, WSAM)", reference.mix_, (3, 0), "read g, o; write g"),
    # bSAM: three passes, one between each pair of forward/backward passes (no fewer is possible: the
    # noise precedes the first backward, the ascent needs its g, the descent the second pass's g).
    OpInfo("bsam_noise_",
           "bsam_noise_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor[] s, Tensor[] noise, float num_data) -> ()",
           "update", "backups ← w; w ← w + z / sqrt(N·s) (bSAM's noisy sample)", reference.bsam_noise_,
           (5, 0), "read w, s, z; write backup, w", dtypes=FLOATS),
    OpInfo("bsam_ascent_",
           "bsam_ascent_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor[] s, Tensor(b!)[] s_next, "
           "float rho, float beta2, float damping, float weight_decay, bool perturb, Tensor? grad_scale=None, "
           "Tensor? found_inf=None) -> ()",
           "update", "w ← backup + rho·g/s; s_next ← beta2·s + (1 − beta2)·(sqrt(s)·|g| + damping + delta) (bSAM)",
           reference.bsam_ascent_, (5, 0), "read backup, g, s; write w, s_next", dtypes=FLOATS),
    OpInfo("bsam_descent_",
           "bsam_descent_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] s, "
           "Tensor(c!)[] s_next, float lr, float beta1, float weight_decay, Tensor? grad_scale=None, "
           "Tensor? found_inf=None) -> ()",
           "update", "w ← backups, then m ← beta1·m + (1 − beta1)·(g + delta·w); w ← w − lr·m/s (bSAM)",
           reference.bsam_descent_, (6, 0), "read backup, g, m, s; write w, m (s_next ← s only on a skipped step)",
           dtypes=FLOATS),
    OpInfo("centralize_", "centralize_(Tensor(a!)[] grads) -> ()",
           "update", "g ← g − mean(g over dims 1..) per row of dim 0, tensors of more than one dimension (GCSAM)",
           reference.centralize_, (2, 0), "read g, write g (each row read twice, the second time from cache)",
           per_row=True),
    OpInfo("topk_mask", "topk_mask(Tensor[] scores, int k) -> Tensor[]",
           "mask", "keep the k largest scores over all tensors", reference.topk_mask,
           (1, 1), "read scores, write bool masks (sort-bound)", dtypes=FLOATS),
    OpInfo("nm_mask", "nm_mask(Tensor[] scores, int n, int m) -> Tensor[]",
           "mask", "keep the n largest of every m consecutive scores", reference.nm_mask,
           (1, 1), "read scores, write bool masks (sort-bound)", dtypes=FLOATS),
)}


def ops_of(backend: str) -> tuple[OpInfo, ...]:
    """The ops with kernels in ``backend``, in table order."""
    return tuple(op for op in OPS.values() if backend in op.backends)
