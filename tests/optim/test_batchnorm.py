"""BatchNorm running statistics across SAM steps: updated once per step, by the first forward.

Oracles: (1) the same SAM run whose second forward is followed by copying every buffer back to
its value before that forward (save/restore: "stats updated once per step by the FIRST forward"
by construction), compared bitwise, weights included; (2) float64 running statistics computed
here from the inputs each BatchNorm saw in the first forwards (PyTorch's update rule: unbiased
batch variance, factor = momentum, or 1/num_batches_tracked when momentum is None).
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import sam_kernels as sk
from sam_kernels.optim import batchnorm as B
from sam_kernels.optim import esam as esam_module

from ..utils import assert_close, assert_lists_equal

LOSS = nn.functional.cross_entropy
STEPS = 4
MOMENTA = [0.1, None]
MOMENTUM_IDS = ["momentum0.1", "momentumNone"]


def net(kind: str, momentum, affine: bool = True, track: bool = True, seed: int = 0) -> nn.Module:
    """A small classifier with BatchNorm layer(s) of ``kind``; inputs from :func:`batches`."""
    torch.manual_seed(seed)

    def bn(cls, c):
        return cls(c, momentum=momentum, affine=affine, track_running_stats=track)

    if kind == "1d":
        return nn.Sequential(nn.Linear(6, 8), bn(nn.BatchNorm1d, 8), nn.ReLU(), nn.Linear(8, 3))
    if kind == "3d":
        return nn.Sequential(nn.Conv3d(2, 3, 2), bn(nn.BatchNorm3d, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 3 * 3 * 3, 3))
    norm2d = {"2d": nn.BatchNorm2d, "sync": nn.SyncBatchNorm}[kind]
    return nn.Sequential(nn.Conv2d(2, 4, 3), bn(norm2d, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8),
                         bn(nn.BatchNorm1d, 8), nn.ReLU(), nn.Linear(8, 3))


INPUT_SHAPE = {"1d": (6,), "2d": (2, 6, 6), "sync": (2, 6, 6), "3d": (2, 4, 4, 4)}


def batches(kind: str, steps: int = STEPS, batch: int = 8, seed: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch,) + INPUT_SHAPE[kind], generator=g).to(device),
             torch.randint(0, 3, (batch,), generator=g).to(device)) for _ in range(steps)]


def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


# --------------------------------------------------------------------------- the second forward's handling

@contextlib.contextmanager
def restored_buffers(model: nn.Module):
    """The oracle: every buffer copied back to its value before the block."""
    saved = [(b, b.clone()) for b in model.buffers()]
    yield
    with torch.no_grad():
        for b, s in saved:
            b.copy_(s)


@contextlib.contextmanager
def zero_momentum(model: nn.Module):
    """The common fix (davda54/sam's bypass_bn): momentum = 0 on the second forward."""
    saved = [(m, m.momentum) for m in bn_modules(model)]
    for m, _ in saved:
        m.momentum = 0.0
    yield
    for m, mom in saved:
        m.momentum = mom


def second_pass(mode: str, model: nn.Module):
    if mode == "model":
        return sk.frozen_running_stats(model)
    if mode == "hook":
        return sk.frozen_running_stats()
    if mode == "reference":
        return restored_buffers(model)
    if mode == "zero_momentum":
        return zero_momentum(model)
    assert mode in ("calls", "none")
    return contextlib.nullcontext()


def run_sam(model: nn.Module, data, mode: str, record=None) -> None:
    """STEPS SAM steps (SGD momentum); ``record``: list receiving each BatchNorm's input in the first forwards."""
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    first = [True]
    handles = []
    if record is not None:
        for i, m in enumerate(bn_modules(model)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, i=i: record.append((i, args[0].detach().double())) if first[0] else None))
    for x, y in data:
        if mode == "calls":
            B.enable_running_stats(model)  # davda54/sam's spelling: before the first forward
        first[0] = True
        LOSS(model(x), y).backward()
        opt.first_step(zero_grad=True)
        first[0] = False
        if mode == "calls":
            B.disable_running_stats(model)
        with second_pass(mode, model):
            LOSS(model(x), y).backward()
        opt.second_step(zero_grad=True)
    if mode == "calls":
        B.enable_running_stats(model)
    for h in handles:
        h.remove()


def state(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    sd = model.state_dict()
    return list(sd), [t.detach().clone() for t in sd.values()]


def float64_stats(record, num_modules: int, momentum):
    """Running mean/var after the recorded first-forward inputs, PyTorch's rule in float64."""
    out = []
    for i in range(num_modules):
        xs = [x for j, x in record if j == i]
        c = xs[0].shape[1]
        mean, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        for t, x in enumerate(xs, start=1):
            dims = [d for d in range(x.dim()) if d != 1]
            f = 1.0 / t if momentum is None else momentum
            mean = (1 - f) * mean + f * x.mean(dims)
            var = (1 - f) * var + f * x.var(dims, unbiased=True)
        out.append((mean, var, len(xs)))
    return out


# --------------------------------------------------------------------------- SAM steps

@pytest.mark.parametrize("momentum", MOMENTA, ids=MOMENTUM_IDS)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d", "sync"])
@pytest.mark.parametrize("mode", ["model", "hook", "calls"])
def test_sam_steps_update_stats_once_per_step(mode, kind, momentum):
    data = batches(kind)
    ref, got = net(kind, momentum), net(kind, momentum)
    run_sam(ref, data, "reference")
    run_sam(got, data, mode)
    names, expected = state(ref)
    assert_lists_equal(state(got)[1], expected, f"{mode}: {names}")  # buffers AND weights, bitwise
    for m in bn_modules(got):
        assert int(m.num_batches_tracked) == STEPS
        assert m.track_running_stats  # flags back after the block


@pytest.mark.parametrize("momentum", MOMENTA, ids=MOMENTUM_IDS)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d", "sync"])
def test_stats_equal_float64_one_update_per_step(kind, momentum):
    data, record = batches(kind), []
    model = net(kind, momentum)
    run_sam(model, data, "model", record)
    mods = bn_modules(model)
    for m, (mean, var, count) in zip(mods, float64_stats(record, len(mods), momentum)):
        assert count == STEPS  # one recorded first forward per step
        assert_close(m.running_mean, mean, 1e-6, 1e-5, "running_mean")
        assert_close(m.running_var, var, 1e-6, 1e-5, "running_var")


@pytest.mark.parametrize("momentum", MOMENTA, ids=MOMENTUM_IDS)
def test_without_helper_stats_update_twice_per_step(momentum):
    """The fault the helper fixes; also shows the oracle above can fail."""
    data = batches("2d")
    ref, plain, zero = net("2d", momentum), net("2d", momentum), net("2d", momentum)
    run_sam(ref, data, "reference")
    run_sam(plain, data, "none")
    run_sam(zero, data, "zero_momentum")
    for r, p, z in zip(bn_modules(ref), bn_modules(plain), bn_modules(zero)):
        assert int(p.num_batches_tracked) == 2 * STEPS
        assert not torch.equal(p.running_mean, r.running_mean)
        assert not torch.equal(p.running_var, r.running_var)
        assert int(z.num_batches_tracked) == 2 * STEPS  # momentum = 0 still counts the second forward
        if momentum is None:  # ... and then every cumulative-average factor 1/t is wrong
            assert not torch.equal(z.running_mean, r.running_mean)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("mode", ["model", "hook", "calls"])
def test_affine_false_and_untracked_modules(mode, track):
    data = batches("2d")
    ref, got = net("2d", 0.1, affine=False, track=track), net("2d", 0.1, affine=False, track=track)
    run_sam(ref, data, "reference")
    run_sam(got, data, mode)
    names, expected = state(ref)
    assert_lists_equal(state(got)[1], expected, f"{mode}: {names}")
    for m in bn_modules(got):
        assert m.track_running_stats is track
        assert (m.running_mean is None) is (not track)


# --------------------------------------------------------------------------- the block itself

@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("form", ["model", "hook"])
def test_outputs_and_grads_unchanged_inside(form, train):
    outside = net("2d", None)
    with torch.no_grad():  # non-trivial running stats for eval mode
        for m in bn_modules(outside):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(3)
    inside = copy.deepcopy(outside)
    outside.train(train)
    inside.train(train)
    x, y = batches("2d", steps=1)[0]
    out_a = outside(x)
    LOSS(out_a, y).backward()
    before = [b.clone() for b in inside.buffers()]
    with sk.frozen_running_stats(inside if form == "model" else None):
        out_b = inside(x)
        LOSS(out_b, y).backward()
    assert_lists_equal([out_b], [out_a], "output")
    assert_lists_equal([p.grad for p in inside.parameters()], [p.grad for p in outside.parameters()], "grads")
    assert_lists_equal(list(inside.buffers()), before, "buffers inside the block")
    if train:
        assert not torch.equal(outside[1].running_mean, inside[1].running_mean)


@pytest.mark.parametrize("form", ["model", "hook"])
def test_nested_blocks_and_exception_restore(form):
    model = net("2d", 0.1)
    x, _ = batches("2d", steps=1)[0]
    arg = model if form == "model" else None
    with pytest.raises(RuntimeError, match="boom"):
        with sk.frozen_running_stats(arg):
            with sk.frozen_running_stats(arg):
                model(x)
            model(x)  # still frozen after the inner block
            assert all(int(m.num_batches_tracked) == 0 for m in bn_modules(model))
            raise RuntimeError("boom")
    assert all(m.track_running_stats for m in bn_modules(model))
    assert not torch.nn.modules.module._global_forward_pre_hooks  # the hook is gone
    model(x)
    assert all(int(m.num_batches_tracked) == 1 for m in bn_modules(model))


def test_disable_twice_then_enable_once():
    model = net("2d", 0.1)
    x, _ = batches("2d", steps=1)[0]
    B.enable_running_stats(model)  # nothing disabled: no-op
    assert all(m.track_running_stats for m in bn_modules(model))
    B.disable_running_stats(model)
    B.disable_running_stats(model)
    model(x)
    assert all(int(m.num_batches_tracked) == 0 for m in bn_modules(model))
    B.enable_running_stats(model)
    model(x)
    assert all(m.track_running_stats and int(m.num_batches_tracked) == 1 for m in bn_modules(model))


@pytest.mark.parametrize("form", ["model", "hook", "calls"])
def test_instance_norm_tracking_stats_restored(form):
    """InstanceNorm updates tracked buffers whatever the flag: saved and copied back instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    reference = copy.deepcopy(model)
    x = torch.randn(3, 2, 6, 6)
    before = [b.clone() for b in model.buffers()]
    if form == "calls":
        B.disable_running_stats(model)
        out = model(x)
        B.enable_running_stats(model)
    else:
        with sk.frozen_running_stats(model if form == "model" else None):
            out = model(x)
    assert_lists_equal(list(model.buffers()), before, "instance norm buffers")
    assert_lists_equal([out], [reference(x)], "output")
    assert not torch.equal(reference[1].running_mean, before[0])  # without the block they move
    assert model[1].track_running_stats


@pytest.mark.parametrize("form", ["model", "hook", "calls"])
def test_uninitialized_lazy_batchnorm_raises(form):
    model = nn.Sequential(nn.Linear(6, 8), nn.LazyBatchNorm1d())
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match="not initialized"):
        if form == "calls":
            B.disable_running_stats(model)
        else:
            with sk.frozen_running_stats(model if form == "model" else None):
                model(x)
    assert model[1].track_running_stats and not hasattr(model[1], B._DISABLED_ATTR)
    model(x)  # initializes; then freezing works
    with sk.frozen_running_stats(model if form == "model" else None):
        model(x)
    assert int(model[1].num_batches_tracked) == 1


def test_hook_form_through_ddp_wrapper():
    """The pre-hook form finds the BatchNorm inside a DistributedDataParallel wrapper (1-process gloo group)."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "store"), rank=0, world_size=1)
        try:
            data = batches("2d")
            ref, got = net("2d", None), net("2d", None)
            run_sam(ref, data, "reference")
            run_sam(nn.parallel.DistributedDataParallel(got), data, "hook")
            names, expected = state(ref)
            assert_lists_equal(state(got)[1], expected, f"ddp: {names}")
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- ESAM's own passes

def run_esam(model: nn.Module, data, gamma: float, beta: float, reference: bool) -> None:
    """STEPS ESAM steps; ``reference``: the closure copies every buffer back after each call but the first of a step."""
    opt = sk.ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=beta, gamma=gamma, seed=3, lr=0.1,
                  momentum=0.9)
    for x, y in data:
        calls = [0]

        def closure(indices=None):
            calls[0] += 1
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            ctx = restored_buffers(model) if reference and calls[0] > 1 else contextlib.nullcontext()
            with ctx:
                return LOSS(model(xs), ys, reduction="none")

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
        assert calls[0] == (3 if gamma < 1 else 2)


@pytest.mark.parametrize("momentum", MOMENTA, ids=MOMENTUM_IDS)
@pytest.mark.parametrize("beta", [1.0, 0.6])
@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_esam_step_updates_stats_once(gamma, beta, momentum):
    data = batches("2d")
    ref, got = net("2d", momentum), net("2d", momentum)
    run_esam(ref, data, gamma, beta, reference=True)
    run_esam(got, data, gamma, beta, reference=False)
    names, expected = state(ref)
    assert_lists_equal(state(got)[1], expected, f"esam: {names}")
    assert all(int(m.num_batches_tracked) == STEPS for m in bn_modules(got))


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_esam_without_freeze_counts_every_forward(gamma, monkeypatch):
    """With the block taken out of ESAM.step, every forward counts: the test above can fail."""
    monkeypatch.setattr(esam_module, "frozen_running_stats", lambda: contextlib.nullcontext())
    model = net("2d", 0.1)
    run_esam(model, batches("2d"), gamma, 1.0, reference=False)
    assert all(int(m.num_batches_tracked) == (3 if gamma < 1 else 2) * STEPS for m in bn_modules(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("momentum", MOMENTA, ids=MOMENTUM_IDS)
@pytest.mark.parametrize("kind", ["2d", "sync"])
def test_sam_steps_update_stats_once_per_step_cuda(kind, momentum):
    data = batches(kind, device="cuda")
    ref, got = net(kind, momentum).cuda(), net(kind, momentum).cuda()
    run_sam(ref, data, "reference")
    run_sam(got, data, "model")
    names, expected = state(ref)
    assert_lists_equal(state(got)[1], expected, f"cuda: {names}")
    assert all(int(m.num_batches_tracked) == STEPS for m in bn_modules(got))
