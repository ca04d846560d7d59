"""The unchecked fast path of ``sam_kernels.ops``: compiled backends take whole lists without Python
checks; anything they reject comes back to the checked path, which groups it or raises the precise
error, with nothing written on the way."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sam_kernels.ops as ops
from sam_kernels.ops import dispatch, launch
from tests.utils import DTYPES, assert_lists_close, assert_lists_equal, require_backend

CASES = [("cpp", "cpu"), ("cuda", "cuda")]
CASE_IDS = [f"{b}-{d}" for b, d in CASES]
SHAPES = [(7,), (3, 5), (0,), (2, 3, 3, 3), (1,)]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    backend, device = request.param
    require_backend(backend, device)
    return backend, device


def lists(device, n=3, dtype=torch.float32, shapes=SHAPES):
    return [[torch.randn(s, device=device, dtype=dtype) for s in shapes] for _ in range(n)]


def clones(*ls):
    return [[t.clone() for t in lst] for lst in ls]


CALLS = {
    "grad_sq_norm": lambda p, g, b, **kw: ops.grad_sq_norm(g, params=p, **kw),
    "dot": lambda p, g, b, **kw: ops.dot(p, g, **kw),
    "perturb_": lambda p, g, b, **kw: ops.perturb_(p, g, b, 0.05, **kw),
    "restore_": lambda p, g, b, **kw: ops.restore_(p, b, **kw),
    "sgd_restore_step_": lambda p, g, b, **kw: ops.sgd_restore_step_(p, b, g, [None] * len(p), lr=0.1, momentum=0.9,
                                                                     **kw),
    "adamw_restore_step_": lambda p, g, b, **kw: ops.adamw_restore_step_(
        p, b, g, [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p], 1, lr=0.1, **kw),
    "renormalize_": lambda p, g, b, **kw: ops.renormalize_(g, ops.grad_sq_norm(p), **kw),
    "fisher_accumulate_": lambda p, g, b, **kw: ops.fisher_accumulate_(b, g, scale=0.5, **kw),
    "looksam_store_": lambda p, g, b, **kw: ops.looksam_store_(b, g, p, **kw),
    "looksam_apply_": lambda p, g, b, **kw: ops.looksam_apply_(g, b, 0.7, **kw),
    "mix_": lambda p, g, b, **kw: ops.mix_(g, b, 1.3, -0.4, **kw),
}


@pytest.mark.parametrize("op", list(CALLS))
def test_valid_lists_skip_python_checks_and_match_eager(case, op, monkeypatch):
    backend, device = case
    p, g, b = lists(device)
    ref = clones(p, g, b)

    def no_checks(*args, **kwargs):
        raise AssertionError("the checked path ran for a valid single-group call")
    monkeypatch.setattr(launch, "check_lists", no_checks)
    out = CALLS[op](p, g, b, backend=backend)
    assert dispatch.last_used[op] == backend
    monkeypatch.undo()
    out_ref = CALLS[op](*ref, backend="eager")
    if isinstance(out, torch.Tensor):
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip((p, g, b), ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_fall_back_to_groups(case):
    backend, device = case
    p32, g32, b32 = lists(device)
    p64, g64, b64 = lists(device, dtype=torch.float64)
    p, g, b = p32 + p64, g32 + g64, b32 + b64
    ref_p = [t.clone() for t in p]
    ops.perturb_(p, g, b, 0.05, backend=backend)
    assert dispatch.last_used["perturb_"] == backend  # each dtype group still ran compiled
    exp = [t.clone() for t in ref_p]
    ops.perturb_(exp, [t.clone() for t in g], [torch.empty_like(t) for t in exp], 0.05, backend="eager")
    torch.testing.assert_close(p, exp, rtol=1e-5, atol=1e-6)
    assert_lists_equal(b, ref_p, "backups")


def test_non_contiguous_entry_runs_eagerly_and_correctly(case):
    backend, device = case
    p, g, b = lists(device)
    p[1] = torch.randn(5, 3, device=device).t()
    g[1], b[1] = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    ref = clones(p, g, b)
    ops.restore_(p, b)
    # Only the entry whose param and backup layouts differ runs eagerly; the other non-empty ones stay compiled.
    parts = dispatch.last_call["restore_"].parts
    assert [(x.backend, x.tensors, x.elements, x.fallback) for x in parts] == [
        (backend, 3, 7 + 54 + 1, ""), ("eager", 1, 15, "layout")]
    assert_lists_equal(p, ref[2], "restored")


@pytest.mark.parametrize("bad, error, message", [
    ("shape", ValueError, r"backups\[1\] has shape \(5, 3\), expected \(3, 5\)"),
    ("dtype", TypeError, r"backups\[1\] has dtype torch.float64 but entry 1 has torch.float32"),
    ("none", TypeError, r"backups\[1\] is NoneType, not a tensor"),
    ("length", ValueError, r"backups has 4 tensors but the first list has 5"),
    ("int", TypeError, r"entry 1 has dtype torch.int64"),
])
def test_rejected_lists_get_the_checked_error_and_nothing_is_written(case, bad, error, message):
    backend, device = case
    p, g, b = lists(device)
    if bad == "shape":
        b[1] = torch.randn(5, 3, device=device)  # same numel as (3, 5): only a shape check catches it
    elif bad == "dtype":
        b[1] = b[1].double()
    elif bad == "none":
        b[1] = None
    elif bad == "length":
        b = b[:4]
    elif bad == "int":
        p[1] = torch.ones(3, 5, dtype=torch.int64, device=device)
    before = [None if t is None else t.clone() for t in p + b]
    with pytest.raises(error, match=message):
        ops.perturb_(p, g, b, 0.05, sq_norm=torch.ones((), device=device), backend=backend)
    for t, t0 in zip(p + b, before):
        if t is not None:
            assert torch.equal(t, t0), "a rejected call wrote to a tensor"


def test_sgd_with_some_new_buffers_checks_everything_before_writing(case):
    backend, device = case
    p, g, b = lists(device)
    bufs = [torch.zeros_like(t) for t in p]
    bufs[0] = None  # one param joins late: two launches (new and existing buffers)
    b[-1] = torch.randn(2, device=device)  # wrong shape in the second launch's share
    before = [t.clone() for t in p]
    with pytest.raises(ValueError, match=r"backups\[4\] has shape \(2,\), expected \(1,\)"):
        ops.sgd_restore_step_(p, b, g, bufs, lr=0.1, momentum=0.9, backend=backend)
    assert_lists_equal(p, before, "params")


def test_device_errors_are_not_retried(monkeypatch):
    """A launch error may come after some work ran: the fast path must not redo the call."""
    calls = []

    def failing(params, backups):
        calls.append(1)
        raise torch.AcceleratorError("launch failed")
    monkeypatch.setattr(dispatch, "resolve", lambda op, device_type, backend=None: ("fake", failing, ""))
    monkeypatch.setattr(dispatch, "checks_lists", lambda name: True)
    with pytest.raises(torch.AcceleratorError, match="launch failed"):
        ops.restore_([torch.zeros(3)], [torch.ones(3)])
    assert len(calls) == 1


def test_rejections_from_the_fast_path_reach_the_checked_path(monkeypatch):
    """A call the unchecked backend rejects runs again, grouped, after the Python checks."""
    calls = []

    def picky(params, backups):
        calls.append(len(params))
        if len(calls) == 1:
            raise ValueError("not one group")
        for p, b in zip(params, backups):
            p.copy_(b)
    monkeypatch.setattr(dispatch, "resolve", lambda op, device_type, backend=None: ("fake", picky, ""))
    monkeypatch.setattr(dispatch, "checks_lists", lambda name: True)
    p, b = [torch.zeros(3), torch.zeros(2)], [torch.ones(3), torch.ones(2)]
    ops.restore_(p, b)
    assert calls == [2, 2]
    assert_lists_equal(p, b)


# --------------------------------------------------------------------------- any mix of lists

_TOL = {dt: (atol, rtol) for dt, atol, rtol in DTYPES}


@st.composite
def mixed_lists(draw):
    """Up to 6 entries, each its own size (zero included), dtype and contiguity."""
    entries = []
    for _ in range(draw(st.integers(1, 6))):
        size = draw(st.sampled_from([0, 1, 7, 33, 1000]))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
        strided = draw(st.booleans())
        entries.append((size, dtype, strided))
    return entries


def _tensor(size, dtype, strided, gen):
    t = torch.randn(size, 2 if strided else 1, generator=gen).to(dtype)
    return t[:, 0] if strided else t.view(-1)  # [:, 0]: a non-contiguous view (size >= 2)


@settings(max_examples=40, deadline=None)
@given(entries=mixed_lists(), seed=st.integers(0, 2**31 - 1))
def test_any_mix_of_lists_matches_eager(entries, seed):
    """auto (fast path where it can, grouped where it must) vs the eager backend on the same lists:
    norm, perturb with backups, fused SGD step."""
    require_backend("cpp", "cpu")
    gen = torch.Generator().manual_seed(seed)
    lists = [[_tensor(n, dt, s, gen) for n, dt, s in entries] for _ in range(3)]
    # One norm for both runs: a mixed list's norm is fp32, and its last-bit differences between
    # backends would reach fp64 weights through the scale; the norms are compared on their own.
    sq = ops.grad_sq_norm(lists[1], backend="eager")
    torch.testing.assert_close(ops.grad_sq_norm(lists[1], backend="auto"), sq, rtol=1e-5, atol=1e-6)
    runs = {}
    for backend in ("auto", "eager"):
        p, g, m = ([t.clone() for t in lst] for lst in lists)  # clone() keeps the strides
        b = [torch.empty_like(t) for t in p]
        ops.perturb_(p, g, b, 0.05, sq_norm=sq, backend=backend)
        perturbed = [t.clone() for t in p]
        ops.sgd_restore_step_(p, b, g, m, lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
        runs[backend] = (sq, perturbed, b, p, m)
    for what, mine, ref in zip(("perturbed", "backups", "params", "buffers"), runs["auto"][1:], runs["eager"][1:]):
        for i, (a, e) in enumerate(zip(mine, ref)):
            atol, rtol = _TOL[e.dtype]
            assert_lists_close([a], [e], atol, rtol, f"{what}[{i}]")
    assert_lists_equal(runs["auto"][2], lists[0], "backups")  # exact copies of the weights


def test_single_group_result_keeps_the_contract_dtype():
    """fp64 only when every grad is fp64, even when the other entries are empty (and skipped)."""
    require_backend("cpp", "cpu")
    grads = [torch.randn(5, dtype=torch.float64), torch.empty(0, dtype=torch.float32)]
    assert ops.grad_sq_norm(grads).dtype == torch.float32
    assert ops.grad_sq_norm(grads[:1]).dtype == torch.float64


def test_non_list_arguments_are_named():
    with pytest.raises(TypeError, match="perturb_: expected a list of tensors, got generator"):
        ops.perturb_((torch.zeros(2) for _ in range(2)), [torch.zeros(2)] * 2, [torch.zeros(2)] * 2, 0.05)
