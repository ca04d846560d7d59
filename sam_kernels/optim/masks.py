"""Mask providers for Sparse SAM (SSAM): which weights the ascent step perturbs.

A mask is a list of ``torch.bool`` tensors aligned with a list of parameters (True = perturbed).
This module is pure: functions over tensor lists, plus small stateful providers that remember the
current mask, their seeded generator and their refresh cadence (all in ``state_dict``).

Scores and patterns
-------------------
- ``fisher_scores``: empirical Fisher F = Σ_i g_i² over ``num_samples`` examples at batch size 1
  (a sum, as in the authors' code), accumulated with :func:`sam_kernels.ops.fisher_accumulate_`.
- ``unstructured``: one GLOBAL top-k over all parameters (biases and norm params included),
  keeping exactly ``keep_count(N, 1 − sparsity)`` = int(N·(1 − sparsity)) entries.
- ``structured``: whole rows ranked by their MEAN score, globally across tensors. A row is
  ``t[i]`` for a tensor of dim ≥ 2 (a Linear output unit, a conv filter). Our choice for 1-D and
  0-D tensors (biases, norm scales): every element is its own row of length 1 — it is the
  bias/scale of one output channel, so it competes like a filter of its own. Rows are kept in
  descending order of mean score while the kept element count stays ≤ int(N·(1 − sparsity)), so the
  density is at most 1 − sparsity and short of it by less than one row.
- ``nm``: :func:`sam_kernels.ops.nm_mask` over the scores: in each group of ``m`` consecutive
  weights along the reduction dimension (in_features; in·kh·kw for conv) keep the ``n`` largest.
  The density is n/m, so the sparsity is implied (1 − n/m).

Distributed
-----------
Seeds are rank 0's (:func:`~sam_kernels.optim.distributed.agreed_seed`), Fisher scores are summed
over the ranks before the top-k (the sum then covers ``num_samples`` per rank), and the top-k /
N:M choice is deterministic, so every rank holds the same mask. With DTensor (FSDP2) parameters a
refresh gathers the full gradients and masks (``full_tensor``: one all-gather per tensor, at
refresh time only), builds the mask exactly as one process would, and keeps DTensor masks placed
like the parameters (ours; it costs the full model's size in memory during the refresh).

Refresh cadence
---------------
:class:`RefreshCadence` counts time in ``update_unit`` ("epoch" or "step") and says a refresh is
due when no mask exists yet or when at least ``update_freq`` units passed since the last refresh.
Steps are counted by the optimizer (one per SAM step). Epochs are ``step // steps_per_epoch`` when
``steps_per_epoch`` is given, else whatever the training loop last passed to ``set_epoch``.
Over T units, ceil(T / update_freq) refreshes happen (at units 0, f, 2f, ...).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..ops import dtensor
from .distributed import agreed_seed, sum_over_ranks

Tensors = Sequence[torch.Tensor]
PATTERNS = ("unstructured", "structured", "nm")
UNITS = ("epoch", "step")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- counting and top-k

def keep_count(numel: int, density: float) -> int:
    """int(numel·density), with the same 1e-9 slack as ``ops.topk_mask`` (so 10·0.7 keeps 7, not 6)."""
    return max(0, min(numel, int(math.floor(numel * density + 1e-9))))


def topk_exact(scores: Tensors, k: int, backend: Optional[str] = None) -> list[torch.Tensor]:
    """Masks keeping exactly the ``k`` largest scores over all tensors (ties: earlier entry first);
    ``backend``: of ``ops.topk_mask`` (None: the global choice).

    ``ops.topk_mask`` takes a density; asking for (k + 0.5)/N makes its floor land on k whatever
    the rounding of the division.
    """
    total = sum(s.numel() for s in scores)
    if k >= total:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    return ops.topk_mask(list(scores), (k + 0.5) / total, backend=backend)


def mask_density(masks: Tensors) -> float:
    """Fraction of True entries over all masks (reads the data: for tests and reports, not the step)."""
    total = sum(m.numel() for m in masks)
    return sum(int(m.sum()) for m in masks) / max(total, 1)


# --------------------------------------------------------------------------- patterns

def unstructured_mask(scores: Tensors, density: float, backend: Optional[str] = None) -> list[torch.Tensor]:
    """Global top-k: exactly int(N·density) entries, the largest scores over all tensors."""
    return topk_exact(scores, keep_count(sum(s.numel() for s in scores), density), backend)


def _rows(s: torch.Tensor) -> torch.Tensor:
    """(rows, row_length) view: dim ≥ 2 → one row per leading index; 0-D/1-D → one row per element."""
    return s.reshape(s.shape[0], -1) if s.dim() >= 2 else s.reshape(-1, 1)


def structured_mask(scores: Tensors, density: float) -> list[torch.Tensor]:
    """Whole rows (output units / filters; single elements of 1-D tensors) ranked by mean score, globally.

    Rows are taken best first while the kept element count stays ≤ int(N·density). Ties go to the
    earlier row (list order, then row index); NaN means rank lowest.
    """
    if not scores:
        return []
    device = scores[0].device
    row_scores, row_sizes = [], []
    for s in scores:
        r = _rows(s.detach()).to(torch.float64)
        row_scores.append(r.mean(dim=1) if r.shape[1] > 0 else torch.full((r.shape[0],), -math.inf,
                                                                          dtype=torch.float64, device=device))
        row_sizes.append(torch.full((r.shape[0],), r.shape[1], dtype=torch.int64, device=device))
    flat = torch.nan_to_num(torch.cat(row_scores), nan=-math.inf)
    sizes = torch.cat(row_sizes)
    budget = keep_count(sum(s.numel() for s in scores), density)
    order = torch.sort(flat, descending=True, stable=True).indices
    keep_sorted = torch.cumsum(sizes[order], 0) <= budget
    keep_rows = torch.zeros_like(keep_sorted)
    keep_rows[order] = keep_sorted
    out = []
    for s, k in zip(scores, keep_rows.split([r.numel() for r in row_scores])):
        out.append(k.view(-1, 1).expand_as(_rows(s)).reshape(s.shape).clone())
    return out


def pattern_mask(scores: Tensors, pattern: str, density: float, n: int = 2, m: int = 4,
                 backend: Optional[str] = None) -> list[torch.Tensor]:
    """Dispatch to the pattern: ``"unstructured"`` | ``"structured"`` | ``"nm"`` (density ignored: n/m);
    ``backend``: of the mask ops (None: the global choice)."""
    if pattern == "unstructured":
        return unstructured_mask(scores, density, backend)
    if pattern == "structured":
        return structured_mask(scores, density)
    if pattern == "nm":
        return ops.nm_mask(list(scores), n, m, backend=backend)
    raise ValueError(f"unknown mask pattern {pattern!r}; choose one of {PATTERNS}")


def random_scores(params: Tensors, generator: torch.Generator) -> list[torch.Tensor]:
    """Uniform [0, 1) scores drawn from a CPU generator (device-independent, reproducible), moved to each param's device."""
    total = sum(p.numel() for p in params)
    u = torch.rand(total, generator=generator, dtype=torch.float32)
    return [c.view(p.shape).to(p.device) for c, p in zip(u.split([p.numel() for p in params]), params)]


# --------------------------------------------------------------------------- Fisher scores

def _samples(data: Iterable, limit: int) -> Iterator[tuple[Any, Any]]:
    """Yield (inputs, targets) chunks of at most the remaining sample budget from (x, y) batches."""
    seen = 0
    for batch in data:
        if seen >= limit:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("fisher data must yield (inputs, targets) batches")
        x, y = batch[0], batch[1]
        take = min(limit - seen, x.shape[0])
        yield x[:take], y[:take]
        seen += take


def _buffers_mutated_under_vmap(model: nn.Module) -> bool:
    """True when a forward in the current mode writes buffers (BatchNorm running stats), which vmap rejects."""
    return any(mod.training and getattr(mod, "track_running_stats", False) for mod in model.modules())


def _vmap_grads(model: nn.Module, loss_fn: Callable, names: list[str], params: Tensors, x: torch.Tensor,
                y: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gradients [B, *shape] of loss_fn(model(x_i[None]), y_i[None]) w.r.t. ``params``."""
    from torch.func import functional_call, grad, vmap

    wanted = {id(p) for p in params}
    fixed = {n: p.detach() for n, p in model.named_parameters() if id(p) not in wanted}
    buffers = dict(model.named_buffers())

    def sample_loss(trainable: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **trainable}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    trainable = {n: p.detach() for n, p in zip(names, params)}
    g = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(trainable, x, y)
    return [g[n] for n in names]


def fisher_scores(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data: Iterable,
                  params: Optional[Tensors] = None, *, num_samples: int = 128, method: str = "auto",
                  train: Optional[bool] = None, backend: Optional[str] = None) -> list[torch.Tensor]:
    """Empirical Fisher F = Σ_i g_i² over the first ``num_samples`` examples of ``data``, at batch size 1.

    Args:
        model: the network; ``params`` must be among its parameters.
        loss_fn: ``loss_fn(model(x), y)`` → scalar loss; called on batches of ONE example.
        data: an iterable of ``(inputs, targets)`` batches (any batch size, e.g. a DataLoader);
            samples are taken along dim 0 until ``num_samples`` are seen (fewer if it runs out).
        params: tensors to score (default: every parameter of ``model``), e.g. the optimizer's.
        num_samples: number of examples summed (the authors use 16–128).
        method: ``"vmap"`` (``torch.func`` per-sample grads, one batched pass per chunk), ``"loop"``
            (one forward/backward per example) or ``"auto"``: vmap unless a module in training mode
            tracks running stats (BatchNorm writes buffers, which vmap rejects) or vmap fails on
            the model, in which case that chunk and the rest use the loop.
        train: ``None`` keeps every module's mode; True/False sets ``model.train(train)`` for the pass.
            Batch-1 BatchNorm1d cannot run in training mode; pass ``train=False`` for such models.
        backend: of ``ops.fisher_accumulate_`` (None: the global choice).

    Side effects: none that survive. Every buffer (BatchNorm running stats, num_batches_tracked)
    is saved and restored and every module's train/eval flag is restored; ``.grad`` is never
    touched (gradients come from ``torch.autograd.grad`` / ``torch.func``). Dropout draws from the
    global RNG. Returns tensors shaped like ``params`` (fp32 for fp16/bf16 params, else the param
    dtype).
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"fisher_scores: method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if num_samples < 1:
        raise ValueError(f"fisher_scores: num_samples must be >= 1, got {num_samples}")
    params = list(model.parameters()) if params is None else list(params)
    name_of = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in name_of]
    if missing:
        raise ValueError(f"fisher_scores: params {missing} are not parameters of the model")
    names = [name_of[id(p)] for p in params]
    fisher = [torch.zeros_like(p, dtype=torch.float32 if p.dtype in _LOW_PRECISION else p.dtype,
                               memory_format=torch.preserve_format) for p in params]

    modes = [(mod, mod.training) for mod in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    # enable_grad: refreshes run inside optimizer steps, which are decorated with no_grad.
    with torch.enable_grad():
        _fisher_pass(model, loss_fn, data, params, names, fisher, num_samples, method, train, modes, saved, backend)
    return fisher


def _fisher_pass(model, loss_fn, data, params, names, fisher, num_samples, method, train, modes, saved,
                 backend) -> None:
    """The batch-1 passes of :func:`fisher_scores`; restores buffers and modes whatever happens."""
    try:
        if train is not None:
            model.train(train)
        use_vmap = method == "vmap" or (method == "auto" and not _buffers_mutated_under_vmap(model))
        seen = 0
        for x, y in _samples(data, num_samples):
            chunk = None
            if use_vmap:
                try:
                    chunk = _vmap_grads(model, loss_fn, names, params, x, y)
                except Exception:
                    if method == "vmap":
                        raise
                    use_vmap = False  # the model is not vmap-able (data-dependent control flow, ...)
            if chunk is not None:
                for i in range(x.shape[0]):
                    ops.fisher_accumulate_(fisher, [g[i].to(f.dtype) for g, f in zip(chunk, fisher)],
                                           backend=backend)
            else:
                for i in range(x.shape[0]):
                    loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    ops.fisher_accumulate_(fisher, [torch.zeros_like(f) if g is None else g.to(f.dtype)
                                                    for g, f in zip(grads, fisher)], backend=backend)
            seen += x.shape[0]
        if seen == 0:
            raise ValueError("fisher_scores: the data yielded no samples")
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
        for mod, flag in modes:
            mod.training = flag


# --------------------------------------------------------------------------- dynamic sparse mask

def cosine_drop_rate(t: float, horizon: float, drop_rate: float = 0.5) -> float:
    """dr(t) = drop_rate·(1 + cos(pi·t/horizon))/2, t clipped to [0, horizon] (SSAM-D)."""
    if horizon <= 0:
        raise ValueError(f"cosine_drop_rate: horizon must be > 0, got {horizon}")
    t = min(max(float(t), 0.0), float(horizon))
    return drop_rate * (1.0 + math.cos(math.pi * t / horizon)) / 2.0


def dynamic_update(masks: Tensors, grads: Sequence[Optional[torch.Tensor]], density: float, drop_rate: float,
                   generator: torch.Generator, backend: Optional[str] = None) -> list[torch.Tensor]:
    """One drop/grow update of a dynamic sparse mask; the live count ends at exactly K = int(N·density).

    Drop: keep the top int(N·density·(1 − drop_rate)) live entries by |g| (ties: earlier entry).
    Grow: the remaining K − keep entries are drawn uniformly at random, from the previously DEAD
    entries first (only if there are too few of them, from the ones just dropped), with the CPU
    ``generator``. ``grads[i] is None`` counts as a zero gradient. ``backend``: of ``ops.topk_mask``.
    """
    total = sum(m.numel() for m in masks)
    k = keep_count(total, density)
    keep = min(k, keep_count(total, density * (1.0 - drop_rate)))
    live_scores = [torch.where(m, (torch.zeros_like(m, dtype=torch.float32) if g is None else g.detach().abs().float()),
                               torch.tensor(-math.inf, device=m.device)) for m, g in zip(masks, grads)]
    kept = topk_exact(live_scores, keep, backend)
    u = random_scores(list(masks), generator)
    # priority: previously dead in [1, 2), just dropped in [0, 1), kept entries never regrow.
    priority = [torch.where(kp, torch.tensor(-math.inf, device=kp.device), ui + (~m).float())
                for kp, ui, m in zip(kept, u, masks)]
    grown = topk_exact(priority, k - keep, backend)
    return [a | b for a, b in zip(kept, grown)]


# --------------------------------------------------------------------------- cadence

class RefreshCadence:
    """When to rebuild the mask: every ``update_freq`` epochs or steps.

    ``tick()`` is called once per optimizer step (after it); ``set_epoch(e)`` may be called by the
    training loop when epochs are not derived from ``steps_per_epoch``. ``due`` is a pure host
    computation (no tensor is read).
    """

    def __init__(self, update_freq: int = 1, update_unit: str = "epoch", steps_per_epoch: Optional[int] = None):
        if update_unit not in UNITS:
            raise ValueError(f"update_unit must be one of {UNITS}, got {update_unit!r}")
        if int(update_freq) < 1:
            raise ValueError(f"update_freq must be >= 1, got {update_freq}")
        if steps_per_epoch is not None and int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.update_freq = int(update_freq)
        self.update_unit = update_unit
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.step = 0
        self.epoch = 0
        self.last: Optional[int] = None
        self.refreshes = 0

    def now(self) -> int:
        """Current time in ``update_unit``."""
        if self.update_unit == "step":
            return self.step
        return self.step // self.steps_per_epoch if self.steps_per_epoch is not None else self.epoch

    @property
    def due(self) -> bool:
        """True when no refresh happened yet or ``update_freq`` units passed since the last one."""
        return self.last is None or self.now() - self.last >= self.update_freq

    def mark(self) -> None:
        """Record a refresh at the current time."""
        self.last = self.now()
        self.refreshes += 1

    def tick(self) -> None:
        """One optimizer step is done."""
        self.step += 1

    def set_epoch(self, epoch: int) -> None:
        """Tell the cadence the current epoch (used when ``steps_per_epoch`` is None)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "last": self.last, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.last = None if state["last"] is None else int(state["last"])
        self.refreshes = int(state["refreshes"])


# --------------------------------------------------------------------------- providers

class MaskProvider:
    """Base class: the current mask, a seeded CPU generator and a refresh cadence.

    Subclasses implement ``_build(params, grads, **kwargs) -> masks``. ``refresh`` builds and
    stores a new mask and records it in the cadence; ``state_dict`` holds mask, generator state and
    cadence so that a resumed run rebuilds the same masks.
    """

    kind = "base"

    def __init__(self, *, sparsity: float = 0.5, pattern: str = "unstructured", n: int = 2, m: int = 4,
                 cadence: Optional[RefreshCadence] = None, seed: Optional[int] = None):
        if pattern not in PATTERNS:
            raise ValueError(f"unknown mask pattern {pattern!r}; choose one of {PATTERNS}")
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        if pattern == "nm" and not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
            raise ValueError(f"N:M pattern needs integers 0 <= n <= m, m >= 1; got n={n}, m={m}")
        self.sparsity = float(sparsity)
        self.pattern = pattern
        self.n, self.m = n, m
        self.cadence = cadence if cadence is not None else RefreshCadence()
        self.generator = torch.Generator()
        self.generator.manual_seed(agreed_seed(seed))  # distributed: rank 0's seed, same masks everywhere
        self.masks: Optional[list[torch.Tensor]] = None
        self.process_group = None  # the data-parallel group Fisher scores are summed over (None: default group)
        self.backend: Optional[str] = None  # of the mask ops (the optimizer's; None: the global choice)

    @property
    def density(self) -> float:
        """Target fraction of perturbed entries (n/m for the N:M pattern)."""
        return self.n / self.m if self.pattern == "nm" else 1.0 - self.sparsity

    def _build(self, params: Tensors, grads: Sequence[Optional[torch.Tensor]], **kwargs) -> list[torch.Tensor]:
        raise NotImplementedError

    def refresh(self, params: Tensors, grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
                **kwargs) -> list[torch.Tensor]:
        """Build a new mask for ``params`` now, store it and record the refresh in the cadence."""
        params = list(params)
        grads = [None] * len(params) if grads is None else list(grads)
        if any(dtensor.is_dtensor(p) for p in params):  # FSDP2: build on full tensors, keep each rank's slice
            kept = self.masks
            self.masks = None if kept is None else dtensor.full_tensors(kept)
            try:
                built = self._build(params, dtensor.full_tensors(grads), **kwargs)
            finally:
                self.masks = kept
            self.masks = dtensor.shard_like(built, params)
        else:
            # In each param's memory layout (a copy where a pattern built it row-major), so perturb_ walks
            # mask and param as one flat storage order: channels_last weights stay on the fused kernels.
            self.masks = [mk if mk.stride() == p.stride() else torch.empty_like(p, dtype=torch.bool).copy_(mk)
                          for mk, p in zip(self._build(params, grads, **kwargs), params)]
        self.cadence.mark()
        return self.masks

    def state_dict(self) -> dict:
        return {"kind": self.kind, "masks": None if self.masks is None else [mk.clone() for mk in self.masks],
                "generator": self.generator.get_state(), "cadence": self.cadence.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"mask state is for a {state.get('kind')!r} mask, this provider is {self.kind!r}")
        self.masks = None if state["masks"] is None else [mk.clone() for mk in state["masks"]]
        self.generator.set_state(state["generator"])
        self.cadence.load_state_dict(state["cadence"])


class RandomMask(MaskProvider):
    """Random scores (seeded) through the pattern: the baseline of the SSAM paper."""

    kind = "random"

    def _build(self, params, grads, **kwargs):
        return pattern_mask(random_scores(params, self.generator), self.pattern, self.density, self.n, self.m,
                            self.backend)


class FisherMask(MaskProvider):
    """Fisher-information mask (SSAM-F): top entries of Σ_i g_i² over ``num_samples`` batch-1 examples.

    ``refresh(params, model=..., loss_fn=..., data=...)`` scores with :func:`fisher_scores` and keeps
    the scores in ``last_scores``.
    """

    kind = "fisher"

    def __init__(self, *, num_samples: int = 128, method: str = "auto", train: Optional[bool] = None, **kwargs):
        super().__init__(**kwargs)
        self.num_samples = int(num_samples)
        self.method = method
        self.train = train
        self.last_scores: Optional[list[torch.Tensor]] = None

    def _build(self, params, grads, *, model: Optional[nn.Module] = None, loss_fn: Optional[Callable] = None,
               data: Optional[Iterable] = None, **kwargs):
        if model is None or loss_fn is None or data is None:
            raise ValueError("a Fisher mask needs data: refresh(params, model=..., loss_fn=..., data=...)")
        # Summed over the ranks (each saw its own data), so every rank ranks the same scores.
        self.last_scores = sum_over_ranks(fisher_scores(model, loss_fn, data, params, num_samples=self.num_samples,
                                                        method=self.method, train=self.train, backend=self.backend),
                                         self.process_group)
        return pattern_mask(self.last_scores, self.pattern, self.density, self.n, self.m, self.backend)


class DynamicMask(MaskProvider):
    """Dynamic sparse mask (SSAM-D): random start, then cosine-decayed drop (by |g|) and random grow.

    ``horizon`` is the training length in the cadence's unit (E epochs, or steps); the drop rate
    at refresh time t is ``cosine_drop_rate(t, horizon, drop_rate)``. Unstructured only.
    """

    kind = "dynamic"

    def __init__(self, *, horizon: int, drop_rate: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if self.pattern != "unstructured":
            raise ValueError("the dynamic mask is unstructured only (drop/grow works on single entries)")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        self.horizon = int(horizon)
        self.drop_rate = float(drop_rate)
        self.last_drop_rate: Optional[float] = None

    def _build(self, params, grads, **kwargs):
        if self.masks is None or [mk.shape for mk in self.masks] != [p.shape for p in params]:
            self.last_drop_rate = None
            return unstructured_mask(random_scores(params, self.generator), self.density, self.backend)
        self.last_drop_rate = cosine_drop_rate(self.cadence.now(), self.horizon, self.drop_rate)
        return dynamic_update(self.masks, grads, self.density, self.last_drop_rate, self.generator, self.backend)
