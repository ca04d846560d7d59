"""ESAM (Du et al.): Stochastic Weight Perturbation (SWP) + Sharpness-Sensitive Data Selection (SDS).

``ESAM`` is the SAM core (:class:`~sam_kernels.optim.sam.SAM`) with ESAM's ascent and pass
logic; every core option (``adaptive``, ``renormalize``, ``policy``, ``modifiers``, ``backend``,
base optimizer kwargs) composes with it. ``beta = 1`` and ``gamma = 1`` is plain SAM, bit for bit.

SWP, ``swp="tensor"`` (default, the authors' form): at each SAM step every parameter tensor joins
the ascent with probability ``beta`` (draws from a seeded CPU ``torch.Generator``: host values, no
device sync). Unselected tensors get ``requires_grad = False`` during the FIRST forward/backward
(autograd skips their weight gradients: that is the compute saved; the flag is restored right
after) and e = 0. Selected tensors get

    e = rho · g / (‖g_sel‖ · beta)        (ASAM: rho · T² ⊙ g / (‖T ⊙ g_sel‖ · beta))

with ‖g_sel‖ the global norm over the selected tensors only (they are the only ones with a
gradient, as in the authors' code); the extra 1/beta is the authors' scaling, enlarging the
step of the tensors that are perturbed to make up for those left out. ``swp="element"``: every gradient
is computed; each ELEMENT joins with probability beta via ``ops.perturb_(keep_prob=beta, seed=…)``
(counter-based RNG, seed drawn from the same generator: reproducible), e = rho·keep⊙g/(‖g‖·beta)
with ‖g‖ over ALL gradients. No compute is saved in element mode.

SDS (``gamma < 1``): per-sample losses at w come from the first pass; one extra forward without
gradients gives them at w + e; the second forward/backward uses only the k = int(B·gamma) samples
(at least 1) with the largest loss increase — not k − 1 as in the authors' code. Ties go to the
lower sample index (stable sort); the chosen indices are passed in ascending order. With
``gamma = 1`` the extra forward is skipped and the second pass uses the whole batch.

BatchNorm: ``step`` runs the passes at w + e (the extra forward and the second forward/backward)
inside :func:`~sam_kernels.optim.batchnorm.frozen_running_stats`: they run in the model's current
mode (training mode: batch statistics normalize) but leave the running statistics as the first
pass set them, so a step updates them once, as one forward would (ours; the authors' code lets
every forward update them). The manual protocol below needs the same block around its second
forward.

Closure protocol (``step`` runs BOTH passes itself, unlike ``SAM.step`` which expects the first
backward to be done)::

    def closure(indices=None):                # indices: LongTensor of sample positions, or None (all)
        xs, ys = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xs), ys, reduction="none")   # per-sample losses, shape [len(xs)]

    opt.zero_grad(set_to_none=True)
    losses = opt.step(closure)                # detached per-sample losses at w

The closure must NOT call backward: ``step`` backpropagates ``losses.mean()`` (first pass, all
samples; second pass, the selected ones) and calls the closure under ``torch.no_grad()`` for the
extra forward. Manual protocol (no SDS)::

    with opt.ascent_pass():                   # draws the tensor selection, freezes the others
        loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with sam_kernels.frozen_running_stats(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)

Without ``ascent_pass`` the selection is drawn in ``first_step``: unselected tensors still get
e = 0, but their first-pass gradients were computed (no saving).

fp16 (``grad_scaler=scaler``): the closure goes to ``scaler.step(opt, closure)`` as is; ``step``
scales both backwards with the attached scaler (the closure never calls ``scaler.scale``, so
attaching the scaler creates its scale: see :mod:`.amp`), and an overflow in either pass skips the
step. In the manual protocol, ``scaler.step(opt)`` ends the step ``first_step`` began (as
``second_step``), and ``scaler.unscale_(opt)`` may follow either backward (see :mod:`.amp`).

Distributed (``torch.distributed`` initialized): the selections' seed is rank 0's, so every rank
perturbs the same tensors. Tensors are NOT frozen by default there (``freeze=None`` means "freeze
only in a single process"): DDP without ``find_unused_parameters=True`` expects a gradient for every
parameter in each synchronized backward and raises "Expected to have finished reduction" otherwise;
unselected tensors still get e = 0 (same maths, no compute saved). ``freeze=True`` keeps the
saving where the wrapper allows it (DDP with ``find_unused_parameters=True``, or m-SAM, whose first
backward runs under ``no_sync()``). SDS selects GLOBALLY by default (``selection="global"``): the
per-sample loss increases of all ranks are all-gathered (B floats per rank, one collective per
SAM step; equal per-rank batch sizes required), the top int(world·B·gamma) of the whole batch are
kept (ties to the lower global index, ranks in order), and each rank backpropagates
``world/k · Σ`` over its own selected samples, so DDP's average is the single-process mean over the
selected samples. The per-rank count varies, so this reads one count on the host. With
``selection="local"`` each rank keeps its own top int(B·gamma) (no collective, no sync).

Policies: with a policy that does not read the gradient norm (SS-SAM, LookSAM), ``step`` asks it
BEFORE the first pass; a plain step then runs one dense pass. With AE-SAM (which reads ‖g‖), no
tensor is frozen (a plain step needs every gradient) and SWP only zeroes e; noted as a cost.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch

from . import groups
from .batchnorm import frozen_running_stats
from .distributed import agreed_seed, is_initialized
from .sam import SAM

SWP_MODES = ("tensor", "element")


def draw_tensor_selection(num: int, beta: float, generator: torch.Generator) -> list[bool]:
    """Per-tensor Bernoulli(beta) draws from a CPU generator (host values: no device sync).

    ``beta >= 1`` selects everything without drawing, so the generator does not advance.
    """
    if beta >= 1.0:
        return [True] * num
    return (torch.rand(num, generator=generator) < beta).tolist()


def num_selected(batch: int, gamma: float) -> int:
    """k = int(B·gamma) (1e-9 slack: 0.7·10 keeps 7), at least 1 so the second pass has data."""
    return max(1, min(batch, int(math.floor(batch * gamma + 1e-9))))


def sharpness_indices(loss_before: torch.Tensor, loss_after: torch.Tensor, gamma: float) -> torch.Tensor:
    """Indices of the k = int(B·gamma) samples with the largest loss increase, ascending.

    Ties: the lower index wins (stable descending sort). Runs on the losses' device; k comes from
    the shape, so nothing is read back to the host.
    """
    if loss_before.dim() != 1 or loss_before.shape != loss_after.shape:
        raise ValueError(f"ESAM: the closure must return per-sample losses of shape [B]; got "
                         f"{tuple(loss_before.shape)} at w and {tuple(loss_after.shape)} at w + e")
    k = num_selected(loss_before.shape[0], gamma)
    increase = loss_after.detach() - loss_before.detach()
    top = torch.sort(increase, descending=True, stable=True).indices[:k]
    return torch.sort(top).values


def global_sharpness_indices(loss_before: torch.Tensor, loss_after: torch.Tensor, gamma: float,
                             group=None) -> tuple[torch.Tensor, float]:
    """SDS over the whole distributed batch: (this rank's selected indices, ascending; the loss weight).

    The loss increases of every rank are all-gathered (equal per-rank batch sizes B), the top
    k = int(world·B·gamma) over the concatenation in rank order are kept (ties: lower global
    index), and the weight world/k makes DDP's gradient average equal the mean over the k selected
    samples. The local count varies by rank: the boolean selection reads it on the host (one sync).
    """
    import torch.distributed as dist

    if loss_before.dim() != 1 or loss_before.shape != loss_after.shape:
        raise ValueError(f"ESAM: the closure must return per-sample losses of shape [B]; got "
                         f"{tuple(loss_before.shape)} at w and {tuple(loss_after.shape)} at w + e")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    batch = loss_before.shape[0]
    increase = (loss_after.detach() - loss_before.detach()).contiguous()
    parts = [torch.empty_like(increase) for _ in range(world)]
    dist.all_gather(parts, increase, group=group)
    k = num_selected(world * batch, gamma)
    top = torch.sort(torch.cat(parts), descending=True, stable=True).indices[:k]
    mine = top[(top >= rank * batch) & (top < (rank + 1) * batch)] - rank * batch
    return torch.sort(mine).values, world / k


@contextlib.contextmanager
def frozen(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """``requires_grad`` off for ``params`` inside the block (autograd skips their gradients), restored after."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class ESAM(SAM):
    """Efficient SAM: SWP (``beta``, ``swp``) and SDS (``gamma``) on the SAM core.

    Args:
        params, base_optimizer, rho, adaptive: as :class:`SAM`; ``**kwargs`` go to SAM (``eta``,
            ``backend``, ``finite_check``, ``policy``, ``renormalize``, ``modifiers``) and then to
            the base optimizer.
        beta: probability that a tensor (``swp="tensor"``) or element (``"element"``) is perturbed
            (authors' runs 0.5–0.6; 1.0 = off).
        gamma: fraction of the batch used by the second pass (authors' runs 0.5; 1.0 = off).
        swp: ``"tensor"`` (default) or ``"element"``; see the module docstring.
        seed: seeds the CPU generator of the selections (None: drawn from torch's global RNG;
            distributed: rank 0's seed is used on every rank).
        freeze: leave unselected tensors out of the first backward (``requires_grad`` off). None
            (default): only when ``torch.distributed`` is not initialized (see the module docstring).
        selection: ``"global"`` (default) or ``"local"``: where SDS ranks the samples in a
            distributed run (module docstring); no effect in a single process.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *, beta: float = 1.0,
                 gamma: float = 1.0, swp: str = "tensor", seed: Optional[int] = None,
                 freeze: Optional[bool] = None, selection: str = "global", **kwargs):
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if swp not in SWP_MODES:
            raise ValueError(f"swp must be one of {SWP_MODES}, got {swp!r}")
        if selection not in ("global", "local"):
            raise ValueError(f"selection must be 'global' or 'local', got {selection!r}")
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        self.beta, self.gamma, self.swp = float(beta), float(gamma), swp
        self.freeze = (not is_initialized()) if freeze is None else bool(freeze)
        self.selection = selection
        self.generator = torch.Generator()
        self.generator.manual_seed(agreed_seed(seed))  # distributed: rank 0's seed, same selections everywhere
        self._selection: Optional[list[bool]] = None  # per param of all groups, this step

    # ------------------------------------------------------------------ selection

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def _tensor_swp(self) -> bool:
        return self.swp == "tensor" and self.beta < 1.0

    def _draw(self) -> list[bool]:
        if self._selection is None:
            self._selection = draw_tensor_selection(len(self._all_params()), self.beta, self.generator)
        return self._selection

    def selected(self) -> Optional[list[torch.Tensor]]:
        """The tensors perturbed this step (per-tensor SWP after the draw), else None (all)."""
        if not self._tensor_swp or self._selection is None:
            return None
        return [p for p, s in zip(self._all_params(), self._selection) if s]

    @contextlib.contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """Wrap the first forward/backward: per-tensor SWP draws the selection and freezes the others.

        Nothing is frozen for element SWP, for beta = 1, on a step the policy makes plain, or with
        a policy that reads the first-pass gradient norm (see the module docstring).
        """
        if not self._tensor_swp or not self.freeze or self.policy.needs_grad_norm or not self.wants_sam():
            yield
            return
        sel = self._draw()
        if not any(sel):  # nothing drawn: e = 0, and the backward still needs something to differentiate
            yield
            return
        with frozen([p for p, s in zip(self._all_params(), sel) if not s and p.requires_grad]):
            yield

    # ------------------------------------------------------------------ core hooks

    def ascent_params(self) -> Optional[list[torch.Tensor]]:
        if not self._tensor_swp or torch.compiler.is_compiling():
            # compiled: every param with a gradient, the unselected ones' zeroed by the shell
            # (:meth:`_host_before`), so the graph does not depend on the selection
            return None
        self._draw()
        return self.selected()

    def perturbation_options(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> dict:
        if self.beta >= 1.0:
            return {}  # plain SAM: the core's own norm and perturbation, bit for bit
        if self.swp == "element":
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())  # CPU: no device sync
            return {"keep_prob": self.beta, "seed": seed}
        return {"sq_norm": self._sq_norm_of(params, grads) * (self.beta ** 2)}

    def _sq_norm_of(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """‖T ⊙ g‖² over ``params`` (the selected ones), each param's group deciding ASAM's T."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return groups.sq_norm([(group_of[id(p)], p) for p in params], self.backend, grads=grads)

    def _clear(self) -> None:
        self._selection = None

    def _host_before(self, method: str, compiled: bool) -> None:
        """Under torch.compile, before an ascent: per-tensor SWP's selection is applied here, eagerly, so
        that the compiled body sees one list of tensors whatever the draw. Each unselected tensor's
        first-pass gradient becomes zeros (a zero-filled one where it was frozen): its e is then 0 and it
        adds 0 to the norm, so the step equals the eager one, which leaves it out (its w is restored
        bitwise from its backup). Element SWP's seed is a new number every step, which a graph holds as a
        constant: refused here, before any weight changes."""
        super()._host_before(method, compiled)
        if not compiled or method != "first_step" or self.beta >= 1.0:
            return
        if self.swp == "element":
            raise TypeError("ESAM: swp='element' cannot run under torch.compile (its per-step random seed would "
                            "be a new graph every step); the weights are unchanged. Use swp='tensor', or call "
                            "first_step/second_step without torch.compile")
        drawn = list(zip(self._all_params(), self._draw()))
        unused = [i for i, (p, chosen) in enumerate(drawn) if chosen and p.requires_grad and p.grad is None]
        if unused:  # each would add a graph per draw, until the recompile limit
            raise ValueError(f"ESAM under torch.compile: the parameters at positions {unused} (in param_groups "
                             "order) got no gradient in the first pass although selected; each such parameter "
                             "would add a graph per draw until the recompile limit. Keep unused parameters out of "
                             "the optimizer, or call first_step/second_step without torch.compile. The weights "
                             "are unchanged")
        for p, chosen in drawn:
            if chosen:
                continue
            if p.grad is not None:
                p.grad.zero_()
            elif p.requires_grad:
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _host_after(self, method: str, compiled: bool, zero_grad: bool) -> None:
        super()._host_after(method, compiled, zero_grad)
        if method != "first_step":
            self._clear()

    @torch.no_grad()
    def restore(self) -> None:
        super().restore()
        self._clear()

    # ------------------------------------------------------------------ the step

    def _backward(self, loss: torch.Tensor) -> None:
        """backward of a pass this optimizer runs itself: through the attached GradScaler under AMP."""
        (self.grad_scaler.scale(loss) if self.amp.active else loss).backward()

    def _step(self, closure, first_loss=None):
        """``step(closure)``: one ESAM step, BOTH passes included (see the module docstring for the
        closure protocol). Returns the detached per-sample losses at w. ``first_loss`` (``step``'s
        ``loss=``) is unused: this step runs the first pass itself. Without a closure (the manual
        protocol, e.g. ``scaler.step(opt)``): as ``SAM.step()``, the end of a step begun by hand."""
        if closure is None:  # the manual protocol: scaler.step(opt) ends a step begun by first_step
            return super()._step(None)
        self.amp.next_pass(self)  # an unscale_ before this call was of no gradient of this step
        with torch.enable_grad(), self.ascent_pass():
            losses = closure(None)
            if losses.dim() != 1:
                raise ValueError(f"ESAM: the closure must return per-sample losses of shape [B], got shape "
                                 f"{tuple(losses.shape)} (use reduction='none')")
            if losses.requires_grad:
                self._backward(losses.mean())
        if not self.wants_sam():
            self.base_step()
            return losses.detach()
        self.first_step(zero_grad=True, loss=losses.mean())
        try:
            indices, weight, after = None, None, None
            # The closure's model is unknown here: the pre-hook form freezes whatever it calls.
            with frozen_running_stats():
                if self.gamma < 1.0:
                    with torch.no_grad():
                        after = closure(None)
                    if self.selection == "global" and is_initialized():
                        indices, weight = global_sharpness_indices(losses, after, self.gamma,
                                                                   self.distributed.process_group)
                    else:
                        indices = sharpness_indices(losses, after, self.gamma)
                with torch.enable_grad():
                    selected = closure(indices)
                    self._backward(selected.mean() if weight is None else selected.sum() * weight)
        except BaseException:
            self.restore()
            raise
        # Passes in full-batch equivalents: the SDS forward counts 1, the second pass its share of the batch.
        # (global selection: this rank's weight world/k gives the global share k/(world·B) = 1/(weight·B)).
        if indices is not None:
            batch = losses.shape[0]
            share = indices.shape[0] / batch if weight is None else 1.0 / (weight * batch)
            self.telemetry.passes = (2.0 + share, 1.0 + share)
        self.second_step(loss=(selected if after is None else after).mean())
        return losses.detach()

    # ------------------------------------------------------------------ state

    _variant_keys = ("esam",)

    def _variant_state(self) -> dict:
        """The selection generator and the current (mid-step) selection."""
        return {"esam": {"generator": self.generator.get_state(), "selection": self._selection}}

    def _load_variant_state(self, saved: dict) -> None:
        esam = saved["esam"]
        self.generator.set_state(esam["generator"])
        self._selection = None if esam["selection"] is None else list(esam["selection"])
