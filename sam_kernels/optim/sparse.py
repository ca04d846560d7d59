"""Sparse SAM (SSAM, Mi et al.): perturb only a masked subset of the weights.

``SparseSAM`` is the SAM core (:class:`~sam_kernels.optim.sam.SAM`) plus a mask provider from
:mod:`.masks`; every core option (``adaptive``, ``renormalize``, ``policy``, ``modifiers``,
``backend``, base optimizer kwargs) composes with it.

Explicit form (default): e = rho·(m ⊙ g)/‖g‖ — the norm is over the FULL gradient, so ‖e‖ ≤ rho
(the authors' choice); ``masked_norm=True`` divides by ‖m ⊙ g‖ instead (‖e‖ = rho). With ASAM the
usual T = |w| + eta weighting applies inside both norms and to e. Weights outside the mask are
bitwise unchanged by ``first_step``.

Implicit form (``implicit=True``, the authors' variant): the perturbation itself is dense (plain
SAM's e), but during the ASCENT backward every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` whose weight has
a mask sends its input gradient through W ⊙ mask (∂x = ∂y·(W ⊙ m)); the forward value and the
weight/bias gradients stay dense. (The authors run this with an N:M mask so that the input-gradient
matmul can use 2:4 sparse tensor cores; here it is a masked dense matmul: same maths, no speed-up.)
It is done by :func:`masked_input_grad`, which patches those modules' ``forward`` per instance
while the first forward runs, so the first pass must run inside ``with opt.ascent_pass():``::

    with opt.ascent_pass():                   # implicit: masked input gradients; explicit: no-op
        loss_fn(model(x), y).backward()
    opt.step(lambda: loss_fn(model(x), y).backward())

Masks need data (Fisher) or gradients (dynamic); see :class:`SparseSAM` for when they refresh.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dtensor import is_dtensor
from . import follow, groups, sparse_grads
from .masks import PATTERNS, UNITS, DynamicMask, FisherMask, MaskProvider, RandomMask, RefreshCadence
from .sam import SAM

MASKS = ("fisher", "dynamic", "random")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- implicit form

class _LinearMaskedInputGrad(torch.autograd.Function):
    """y = x Wᵀ + b; backward: ∂x = ∂y (W ⊙ mask); ∂W, ∂b dense."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight * mask)
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = g2.t().matmul(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


class _ConvMaskedInputGrad(torch.autograd.Function):
    """Convolution whose input gradient uses W ⊙ mask; ∂W and ∂b dense (aten's convolution_backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, mask)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        zeros = [0] * (weight.dim() - 2)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = has_bias and need_b
        gx = gw = gb = None
        if need_x:
            gx = torch.ops.aten.convolution_backward(gy, x, weight * mask, None, stride, padding, dilation, False,
                                                     zeros, groups, [True, False, False])[0]
        if need_w or need_b:
            _, gw, gb = torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]] if has_bias else None,
                                                            stride, padding, dilation, False, zeros, groups,
                                                            [False, bool(need_w), bool(need_b)])
        return gx, gw, gb, None, None, None, None, None


def _linear_forward(mask: torch.Tensor):
    def forward(self, x):
        return _LinearMaskedInputGrad.apply(x, self.weight, self.bias, mask)
    return forward


def _conv_forward(module: nn.Module, mask: torch.Tensor):
    nd = module.weight.dim() - 2
    padding = module.padding
    if isinstance(padding, str):
        if padding != "valid":
            raise NotImplementedError(f"implicit Sparse SAM: {type(module).__name__}(padding={padding!r}) is not "
                                      f"supported; use integer padding")
        padding = (0,) * nd
    pre_pad = module.padding_mode != "zeros"

    def forward(self, x):
        pad = list(padding)
        if pre_pad:  # what nn.ConvNd does: pad with the mode, then convolve without padding
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            pad = [0] * nd
        return _ConvMaskedInputGrad.apply(x, self.weight, self.bias, mask, list(self.stride), pad,
                                          list(self.dilation), self.groups)
    return forward


@contextlib.contextmanager
def masked_input_grad(model: nn.Module, masks: Mapping[torch.Tensor, torch.Tensor]) -> Iterator[None]:
    """Inside the block, Linear/Conv layers whose weight is a key of ``masks`` back-propagate through W ⊙ mask.

    Only the gradient sent to the layer's INPUT changes; the forward value and the weight/bias
    gradients are dense. Graphs recorded inside the block keep the masked backward after it
    ends (call ``backward`` inside or after). Modules are patched per instance (an instance
    attribute ``forward``) and restored on exit, even on error; hooks keep working.
    """
    by_id = {id(p): m for p, m in masks.items()}
    patched = []
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or id(weight) not in by_id:
                continue
            mask = by_id[id(weight)].to(weight.dtype)
            if type(module) is nn.Linear:
                fwd = _linear_forward(mask)
            elif type(module) in _CONVS:
                fwd = _conv_forward(module, mask)
            else:
                continue
            patched.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(fwd, module)
        yield
    finally:
        for module, old in patched:
            if old is not None:
                module.forward = old
            else:
                del module.forward


# --------------------------------------------------------------------------- the optimizer

FisherData = Union[Iterable, Callable[[], Iterable]]


class SparseSAM(SAM):
    """Sparse SAM: SAM whose perturbation touches only the weights selected by a mask.

    Args:
        params, base_optimizer, rho, adaptive: as :class:`SAM`; ``**kwargs`` go to SAM (``eta``,
            ``backend``, ``finite_check``, ``policy``, ``renormalize``, ``modifiers``) and then to
            the base optimizer (``lr``, ``momentum``, ...).
        sparsity: fraction of entries NOT perturbed (default 0.5; for ``pattern="nm"`` it is
            1 − n/m and may be omitted).
        mask: ``"fisher"`` (SSAM-F: top empirical-Fisher entries), ``"dynamic"`` (SSAM-D: random
            start, cosine drop by |g| + random grow), ``"random"`` (a fresh random mask each refresh).
        pattern: ``"unstructured"`` (global top-k, exact count), ``"structured"`` (whole rows /
            filters by mean score; 1-D params: one row per element), ``"nm"`` (n of every m along
            the reduction dim). See :mod:`.masks`. The dynamic mask is unstructured only.
        num_samples: Fisher examples per refresh, at batch size 1 (default 128; authors 16–128).
        update_freq, update_unit, steps_per_epoch: refresh cadence (:class:`.masks.RefreshCadence`):
            every ``update_freq`` epochs (default) or steps. Steps are counted by this optimizer
            (every SAM or plain step); epochs are ``steps // steps_per_epoch`` when given, else
            what the loop passes to :meth:`set_epoch`.
        masked_norm: divide by ‖m ⊙ g‖ instead of ‖g‖.
        implicit: the authors' implicit form (see module docstring); needs ``model``.
        model, loss_fn, fisher_data: where Fisher refreshes get data. ``fisher_data`` is a
            re-iterable of ``(x, y)`` batches (e.g. a DataLoader) or a zero-argument callable
            returning one. With all three given, the Fisher mask refreshes automatically on its
            cadence (inside ``first_step``, before perturbing, at the current weights). Without them,
            call :meth:`update_mask` yourself (``opt.mask_due`` says when the cadence wants one);
            ``first_step`` raises if no mask exists yet.
        fisher_method, fisher_train: ``method`` / ``train`` of :func:`.masks.fisher_scores`.
        drop_rate, horizon: dynamic mask: dr(t) = drop_rate·(1 + cos(pi·t/horizon))/2 with t and
            ``horizon`` (E, the training length) in ``update_unit``; ``horizon`` is required.
        seed: seeds the mask generator (random/dynamic masks; distributed: rank 0's seed is used).

    Distributed: every rank holds the same mask (see :mod:`.masks`); with ``distributed="m-sam"``
    the dynamic mask drops by |ḡ|, ḡ the rank-averaged gradient (one gradient all-reduce per refresh). Under
    FSDP2 (DTensor parameters) the random and dynamic masks work; the Fisher mask does not yet
    (its per-sample passes need the unsharded module) and is refused at construction.

    When does the mask refresh? In ``first_step`` (explicit) or ``ascent_pass`` (implicit), when
    no mask exists or the cadence says it is due (and, for Fisher, data is available). The dynamic
    mask's drop/grow uses the first-pass gradients of that step (its first mask is random).
    Refreshing reads no tensor on the host; a Fisher refresh runs ``num_samples`` batch-1
    forward/backward passes (BatchNorm stats and train/eval modes are restored).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 sparsity: Optional[float] = None, mask: str = "fisher", pattern: str = "unstructured", n: int = 2,
                 m: int = 4, num_samples: int = 128, update_freq: int = 1, update_unit: str = "epoch",
                 steps_per_epoch: Optional[int] = None, masked_norm: bool = False, implicit: bool = False,
                 model: Optional[nn.Module] = None, loss_fn: Optional[Callable] = None,
                 fisher_data: Optional[FisherData] = None, fisher_method: str = "auto",
                 fisher_train: Optional[bool] = None, drop_rate: float = 0.5, horizon: Optional[int] = None,
                 seed: Optional[int] = None, **kwargs):
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        if update_unit not in UNITS:
            raise ValueError(f"update_unit must be one of {UNITS}, got {update_unit!r}")
        if pattern == "nm":
            if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
                raise ValueError(f"pattern='nm' needs integers 0 <= n <= m, m >= 1; got n={n}, m={m}")
            if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern='nm' fixes the sparsity at 1 - n/m = {1 - n / m}; got sparsity={sparsity}")
            sparsity = 1 - n / m
        sparsity = 0.5 if sparsity is None else float(sparsity)
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        if implicit:
            if model is None:
                raise ValueError("implicit=True needs model= (its Linear/Conv layers get masked input gradients)")
            if mask == "dynamic":
                raise ValueError("implicit=True needs the mask before the ascent backward; the dynamic mask is "
                                 "built from that backward's gradients. Use mask='fisher' or 'random'")
            if self.policy.needs_grad_norm:
                raise ValueError("implicit=True cannot be combined with a policy that reads the first-pass "
                                 "gradient norm: that gradient is computed with masked input gradients")
        if mask == "fisher" and any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise ValueError("SparseSAM(mask='fisher') does not support FSDP2 (DTensor) parameters yet: its batch-1 "
                             "passes need the unsharded module. Use mask='random' or mask='dynamic'")
        cadence = RefreshCadence(update_freq, update_unit, steps_per_epoch)
        common = dict(sparsity=sparsity, pattern=pattern, n=n, m=m, cadence=cadence, seed=seed)
        self.model, self.loss_fn, self.fisher_data = model, loss_fn, fisher_data
        self.masked_norm = bool(masked_norm)
        self.implicit = bool(implicit)
        self.mask_kind = mask
        provider: MaskProvider
        if mask == "fisher":
            provider = FisherMask(num_samples=num_samples, method=fisher_method, train=fisher_train, **common)
        elif mask == "dynamic":
            if horizon is None:
                raise ValueError("mask='dynamic' needs horizon= (training length in update_unit: epochs E or steps)")
            provider = DynamicMask(horizon=horizon, drop_rate=drop_rate, **common)
        else:
            provider = RandomMask(**common)
        self.mask_provider = provider
        provider.process_group = self.distributed.process_group
        provider.backend = self.backend  # the masks run on the optimizer's backend, as its other ops
        self._ascent_done = False

    # ------------------------------------------------------------------ masks

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _can_refresh(self) -> bool:
        return self.mask_kind != "fisher" or None not in (self.model, self.loss_fn, self.fisher_data)

    @property
    def mask_due(self) -> bool:
        """True when the cadence wants a new mask (no mask yet, or ``update_freq`` units passed)."""
        return self.mask_provider.masks is None or self.mask_provider.cadence.due

    @property
    def masks(self) -> Optional[list[torch.Tensor]]:
        """The current bool masks, aligned with the params of all groups in order (None before the first)."""
        return self.mask_provider.masks

    def set_epoch(self, epoch: int) -> None:
        """Tell the cadence the current epoch (for ``update_unit="epoch"`` without ``steps_per_epoch``)."""
        self.mask_provider.cadence.set_epoch(epoch)

    def update_mask(self, model: Optional[nn.Module] = None, loss_fn: Optional[Callable] = None,
                    data: Optional[FisherData] = None) -> list[torch.Tensor]:
        """Rebuild the mask now. Fisher: from ``model``/``loss_fn``/``data`` (default: the constructor's).

        Dynamic: drop/grow with the current ``.grad`` of the params (random start if no mask yet).
        Records the refresh in the cadence. Returns the masks (aligned with all params).
        """
        params = self._all_params()
        kw = {}
        if self.mask_kind == "fisher":
            model = model if model is not None else self.model
            loss_fn = loss_fn if loss_fn is not None else self.loss_fn
            data = data if data is not None else self.fisher_data
            if None in (model, loss_fn, data):
                raise ValueError("SparseSAM.update_mask: the Fisher mask needs model, loss_fn and data (here or in "
                                 "the constructor: model=, loss_fn=, fisher_data=)")
            kw = dict(model=model, loss_fn=loss_fn, data=data() if callable(data) else data)
        # m-SAM: first-pass gradients differ by rank; the dynamic mask drops by their rank mean.
        grads = self.distributed.agreed_grads([p.grad for p in params]) if self.mask_kind == "dynamic" else None
        return self.mask_provider.refresh(params, grads, **kw)

    def _current_masks(self) -> list[torch.Tensor]:
        """The masks for this step, refreshed first when due (and possible)."""
        prov = self.mask_provider
        params = self._all_params()
        stale = prov.masks is not None and [mk.shape for mk in prov.masks] != [p.shape for p in params]
        if prov.masks is None or stale or prov.cadence.due:
            if self._can_refresh():
                self.update_mask()
            elif prov.masks is None or stale:
                raise RuntimeError("SparseSAM: no Fisher mask yet. Call opt.update_mask(model, loss_fn, data) "
                                   "before the first step, or pass model=, loss_fn=, fisher_data= to the constructor")
        return prov.masks

    def _masked_sq_norm(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                        masks: list[torch.Tensor]) -> torch.Tensor:
        """‖m ⊙ T ⊙ g‖² with each param's group deciding ASAM's T (one global value)."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return groups.sq_norm([(group_of[id(p)], p) for p in params], self.backend, grads=grads, masks=masks)

    # ------------------------------------------------------------------ core hooks

    def perturbation_options(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> dict:
        """Explicit form: masks (and the masked norm if asked). Implicit form: dense SAM perturbation."""
        if self.implicit:
            return {}
        # refreshed before the body (_host_before): a compiled step only reads them
        masks_all = self.mask_provider.masks if torch.compiler.is_compiling() else self._current_masks()
        index = {id(p): i for i, p in enumerate(self._all_params())}
        masks = [masks_all[index[id(p)]] for p in params]
        out: dict = {"masks": masks}
        if self.masked_norm:
            out["sq_norm"] = self._masked_sq_norm(params, grads, masks)
        return out

    @contextlib.contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """Wrap the first forward/backward of a step. Implicit form: masked input gradients; else a no-op.

        On a step the policy makes plain (e.g. SS-SAM), nothing is patched: that single pass is
        the descent gradient and must be dense.
        """
        if not self.implicit or not self.wants_sam():
            yield
            return
        masks = self._current_masks()
        with masked_input_grad(self.model, dict(zip(self._all_params(), masks))):
            yield
        self._ascent_done = True

    def _host_before(self, method: str, compiled: bool) -> None:
        """Before ``first_step``: the implicit form's check, then the mask refresh when due, here on the
        host: a compiled ``first_step`` reads the masks, it never refreshes them (a refresh runs
        Fisher passes or draws from a CPU generator, which a graph cannot hold)."""
        super()._host_before(method, compiled)
        if method == "first_step":
            if self.implicit and not self._ascent_done:
                raise RuntimeError("SparseSAM(implicit=True): run the first forward/backward inside "
                                   "`with opt.ascent_pass():` so that it uses the masked input gradients")
            if not self.implicit and self.step_state.perturbed is None:
                if sparse_grads.any_sparse(self.param_groups):  # refused before a refresh runs the model
                    sparse_grads.refuse_unsupported(self)
                self._current_masks()
        self._ascent_done = False

    def _host_after(self, method: str, compiled: bool, zero_grad: bool) -> None:
        super()._host_after(method, compiled, zero_grad)
        if method != "first_step":
            self.mask_provider.cadence.tick()

    # ------------------------------------------------------------------ state

    def _cast_state(self, params: list[torch.Tensor]) -> None:
        super()._cast_state(params)
        if self.mask_provider.masks is not None:  # bool masks follow their param's device (torch.optim's rule)
            self.mask_provider.masks = [follow.cast_like(mk, p) for mk, p in zip(self.mask_provider.masks, params)]

    _variant_keys = ("sparse",)

    def _variant_state(self) -> dict:
        """The mask, the mask generator's state and the cadence."""
        sparse = self.mask_provider.state_dict()
        sparse["ascent_done"] = self._ascent_done
        return {"sparse": sparse}

    def _load_variant_state(self, saved: dict) -> None:
        sparse = saved["sparse"]
        self.mask_provider.load_state_dict(sparse)
        if self.mask_provider.masks is not None:
            params = self._all_params()
            self.mask_provider.masks = [mk.to(p.device) for mk, p in zip(self.mask_provider.masks, params)]
        self._ascent_done = bool(sparse.get("ascent_done", False))
