"""Calls of the compiled ops (their raw schemas) whose entries share memory: the op must refuse
them with ``ValueError`` before writing anything, and accept a tensor shared within its own entry.
Used by the CPU tests and by the CUDA emulation's (``mod`` is ``torch.ops.sam_kernels`` or
``torch.ops.sam_kernels_emu``)."""
from __future__ import annotations

import pytest
import torch


def _sgd(mod, params, backups, grads, bufs, found_inf=None):
    mod.sgd_restore_step_(params, backups, grads, bufs, 0.1, 0.9 if bufs else 0.0, 0.0, 0.0, False, False, False,
                          None, found_inf, None, None)


def refused(mod) -> dict:
    """name -> (the call, the lists that must stay unchanged)."""
    w, other = torch.randn(70), torch.randn(70)
    g = [torch.randn(70), torch.randn(70)]
    b = [torch.randn(70), torch.randn(70)]
    big = torch.randn(140)
    return {
        "sgd: one momentum buffer for two params": (lambda: _sgd(mod, [w, other], b, g, [g[0], g[0]]), [[w, other], b, g]),
        "sgd: a grad that is another param": (lambda: _sgd(mod, [w, other], [w, other], [g[0], w], []), [[w, other]]),
        "sgd skipping (found_inf) still refuses": (
            lambda: _sgd(mod, [w, other], b, g, [g[0], g[0]], torch.ones(())), [[w, other], b, g]),
        "perturb_: a backup over another param": (
            lambda: mod.perturb_([w, other], g, [b[0], w], torch.tensor(4.0), 0.1, 1e-12, None, False, 0.01, 1.0, [],
                                 None, None), [[w, other], b]),
        "perturb_: a param twice (another view)": (
            lambda: mod.perturb_([w, w.view(7, 10)], [g[0], g[1].view(7, 10)], [b[0], b[1].view(7, 10)],
                                 torch.tensor(4.0), 0.1, 1e-12, None, False, 0.01, 1.0, [], None, None), [[w], b]),
        "restore_: two views starting at one address": (
            lambda: mod.restore_([big[:70], big[:70].view(7, 10)], [g[0], g[1].view(7, 10)]), [[big]]),
        "renormalize_: a grad twice": (
            lambda: mod.renormalize_([g[0], g[0]], torch.tensor(1.0), torch.tensor(4.0), 1e-12), [g]),
        "mix_: a grad twice": (
            lambda: mod.mix_([g[0], g[0]], b, torch.tensor(1.0), torch.tensor(0.5)), [g, b]),
        "ema_update_: one EMA buffer for two params": (
            lambda: mod.ema_update_([b[0], b[0]], g, None, 0.1, 0.0, None, None), [b, g]),
        "ema_update_: a direction over another EMA": (
            lambda: mod.ema_update_(b, g, [other, b[0]], 0.1, 1.0, None, None), [b, g, [other]]),
        "centralize_: a grad twice (another view)": (
            lambda: mod.centralize_([big.view(14, 10), big.view(10, 14)]), [[big]]),
        "bsam_noise_: a backup over another param": (
            lambda: mod.bsam_noise_([w, other], [b[0], w], [s_ + 1.0 for s_ in b], g, 50.0), [[w, other], b]),
    }


def check_refused(mod) -> None:
    for what, (call, lists) in refused(mod).items():
        before = [[t.clone() for t in lst] for lst in lists]
        with pytest.raises(ValueError, match="share memory"):
            call()
        assert all(torch.equal(t, c) for lst, cl in zip(lists, before) for t, c in zip(lst, cl)), what


def check_allowed(mod) -> None:
    """A param that is its own backup and its own gradient (entry by entry); views of one storage
    that start at different addresses: w ← w − lr·w, and a restore into two halves."""
    w, v = torch.randn(70), torch.randn(70)
    want = [(w.double() * 0.9).float(), (v.double() * 0.9).float()]
    _sgd(mod, [w, v], [w, v], [w.view(70), v], [])
    for t, e in zip((w, v), want):
        torch.testing.assert_close(t, e, atol=1e-6, rtol=1e-6)
    big, src = torch.zeros(140), torch.randn(140)
    mod.restore_([big[:70], big[70:]], [src[:70], src[70:]])
    assert torch.equal(big, src)
