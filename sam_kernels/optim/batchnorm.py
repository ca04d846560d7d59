"""BatchNorm running statistics across SAM's extra forwards: updated once per step, by the first forward.

A SAM step runs the model forward at w and again at w + e (ESAM with data selection a third time,
without gradients). In training mode every BatchNorm forward updates ``running_mean``,
``running_var`` and ``num_batches_tracked``, so a plain SAM loop updates them twice per step, the
second time with batch statistics of the perturbed model, and ``num_batches_tracked`` counts 2 per
step (with ``momentum=None`` that also halves every later cumulative-average factor 1/t).
:func:`frozen_running_stats` wraps the extra forwards so that after the step the statistics are
exactly those of one forward per step (the first, at w); inside it, training-mode modules still
normalize with the batch's own statistics, so outputs and gradients are unchanged.

Method (ours): for every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, their lazy
forms, SyncBatchNorm and subclasses that keep PyTorch's forward) with ``track_running_stats=True``,
the block sets ``track_running_stats = False`` and sets it back on exit. In training mode PyTorch's
forward then increments nothing and passes no running buffers to ``F.batch_norm`` (SyncBatchNorm:
to ``sync_batch_norm``), which normalizes with the batch statistics — the same ones, computed by
the same kernel, as with the buffers (bitwise on CPU, checked in the tests); in eval mode it still
normalizes with the running buffers, as before. Why not the alternatives:

- ``momentum = 0.0`` on the second forward (the common fix) still increments
  ``num_batches_tracked``, and for ``momentum=None`` (cumulative moving average, factor
  1/num_batches_tracked) it makes every later update use the wrong factor.
- Saving the buffers and copying them back is exact too, but costs a clone and a copy-back per
  buffer (two kernel launches each) every step, and with ``momentum=None`` the frozen forward would
  still read ``num_batches_tracked`` on the host (PyTorch's ``float(num_batches_tracked)``; ``.item()``
  in SyncBatchNorm): one device sync per BatchNorm layer.

The flag flip does no device work: no tensor is read, copied or written, no host sync, and the
frozen forward skips PyTorch's syncs above; its host cost is a Python walk over the modules. With
SyncBatchNorm across processes the frozen forward takes PyTorch's own ``track_running_stats=False``
path of ``sync_batch_norm`` (not run by the tests: they have no multi-GPU machine; without a
process group SyncBatchNorm runs ``F.batch_norm``, which they test). Its one requirement is that the module's forward
honours ``track_running_stats`` as PyTorch's does. ``_InstanceNorm`` modules with
``track_running_stats=True`` do not (``F.instance_norm`` updates the buffers whenever it gets them
in training mode), so for them the block saves the buffers on entry and copies them back on exit
(exact; one clone per buffer). Other modules are left alone: a custom normalization layer with
running buffers and its own update rule is not covered.

Two forms:

- ``frozen_running_stats(model)``: the modules of ``model`` (``model.modules()``), walked on entry.
- ``frozen_running_stats()``: every module called inside the block, found by a global forward
  pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``) that freezes the called
  module's whole subtree on its first call. Used where the model is not known (ESAM's closure). The
  hook is process-wide while the block runs: a model run by another thread meanwhile is frozen too.

With ``torch.compile``: the flag is guarded, so a compiled model gets one more graph (frozen) on
the first frozen call, then reuses both; the hook form makes PyTorch warn that global hooks fire
once more for the ``OptimizedModule`` (harmless here: freezing is idempotent). Checked by hand
(torch 2.14, CPU), not in the tests.

``disable_running_stats(model)`` / ``enable_running_stats(model)`` are the same freeze as two calls,
named like the helpers of the popular SAM repository (davda54/sam, ``example/utility/bypass_bn.py``,
which uses the momentum = 0 trick): ``enable_running_stats`` before the first forward, which then
updates the statistics normally, ``disable_running_stats`` before the second.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["frozen_running_stats", "disable_running_stats", "enable_running_stats"]

# Attribute under which disable_running_stats keeps a module's undo record until enable_running_stats.
_DISABLED_ATTR = "_sam_kernels_frozen_running_stats"


def _set_flag(module: nn.Module, value: bool) -> None:
    # A plain attribute: object.__setattr__ skips nn.Module's parameter/buffer/submodule checks
    # (~2 µs each; 100+ flips per step on a ResNet).
    object.__setattr__(module, "track_running_stats", value)


class _Frozen:
    """Undo record of one frozen module: a flipped ``track_running_stats`` flag, or saved buffers."""

    __slots__ = ("module", "saved")

    def __init__(self, module: nn.Module, saved: Optional[list[tuple[torch.Tensor, torch.Tensor]]]):
        self.module, self.saved = module, saved

    def undo(self) -> None:
        if self.saved is None:
            _set_flag(self.module, True)
            return
        with torch.no_grad():
            for buf, copy in self.saved:
                buf.copy_(copy)


def _freeze(module: nn.Module) -> Optional[_Frozen]:
    """Stops ``module``'s running-statistics updates exactly; returns the undo record (None: nothing to do)."""
    is_bn = isinstance(module, _BatchNorm)
    if not (is_bn or isinstance(module, _InstanceNorm)) or not module.track_running_stats:
        return None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        # Its first forward materializes the buffers only when track_running_stats is set.
        raise ValueError(f"frozen_running_stats: {type(module).__name__} is not initialized yet; run one forward "
                         f"outside the block first (the first SAM forward does)")
    if is_bn:
        _set_flag(module, False)
        return _Frozen(module, None)
    return _Frozen(module, [(b, b.detach().clone()) for b in module.buffers(recurse=False)])


def _freeze_all(module: nn.Module, records: list[_Frozen], seen: Optional[set[nn.Module]] = None) -> None:
    for mod in module.modules():
        if seen is not None:
            if mod in seen:
                continue
            seen.add(mod)  # the module itself, not its id: a freed module's id can be reused inside the block
        record = _freeze(mod)
        if record is not None:
            records.append(record)


@contextlib.contextmanager
def frozen_running_stats(model: Optional[nn.Module] = None) -> Iterator[None]:
    """Inside the block, BatchNorm leaves ``running_mean``, ``running_var``, ``num_batches_tracked`` untouched.

    Wrap SAM's second forward/backward (at w + e) in it; the first forward (at w) runs outside and
    updates the statistics once per step, exactly as a one-forward training loop does, for any
    ``momentum`` (``None`` included)::

        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        with sam_kernels.frozen_running_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    Training-mode modules still normalize with the batch statistics (outputs and gradients as
    without the block); eval-mode modules with their running buffers, as always. Modules with
    ``track_running_stats=False`` or ``affine=False`` work unchanged. Blocks nest. On exit, also by
    an exception, every flag and buffer is as on entry.

    Args:
        model: the module whose submodules (itself included) are frozen on entry. ``None``: every
            module called inside the block (a process-wide forward pre-hook, removed on exit).

    Raises:
        ValueError: a lazy BatchNorm/InstanceNorm module is not initialized yet (run one forward
            outside the block first).

    Cost: a Python walk over the modules; no device work and no host sync for BatchNorm (an
    InstanceNorm with ``track_running_stats=True`` costs one buffer clone on entry and one copy on
    exit). Method and alternatives: see the module docstring (ours).
    """
    records: list[_Frozen] = []
    handle = None
    try:
        if model is not None:
            _freeze_all(model, records)
        else:
            seen: set[nn.Module] = set()

            def freeze_called(module: nn.Module, args) -> None:
                if module not in seen:
                    _freeze_all(module, records, seen)

            handle = torch.nn.modules.module.register_module_forward_pre_hook(freeze_called)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for record in reversed(records):
            record.undo()


def disable_running_stats(model: nn.Module) -> None:
    """Freeze ``model``'s running statistics until :func:`enable_running_stats` (call before SAM's second forward).

    The exact freeze of :func:`frozen_running_stats`, as a call (davda54/sam's spelling). Calling it
    again before ``enable_running_stats`` changes nothing. Raises ``ValueError`` as
    :func:`frozen_running_stats`.
    """
    records: list[_Frozen] = []
    try:
        for mod in model.modules():
            if getattr(mod, _DISABLED_ATTR, None) is None:
                record = _freeze(mod)
                if record is not None:
                    records.append(record)
    except BaseException:
        for record in reversed(records):  # an error leaves every module as it was
            record.undo()
        raise
    for record in records:
        setattr(record.module, _DISABLED_ATTR, record)


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` on ``model`` (call before SAM's first forward); no-op where not disabled."""
    for mod in model.modules():
        record = getattr(mod, _DISABLED_ATTR, None)
        if record is not None:
            record.undo()
            delattr(mod, _DISABLED_ATTR)
