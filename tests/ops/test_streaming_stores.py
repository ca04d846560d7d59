"""The CPU kernels' streaming stores (lists larger than the last-level cache, or any list with
SAM_KERNELS_STREAM_BYTES=0): perturb_'s backups and the fused descents' weights. A child process
with the threshold at 0 runs the ops on aligned and unaligned tensors (vector body, scalar head
and tail); its results must be bitwise those of ordinary stores (this process: small lists) and
match float64 maths by hand. The default descent writes its new momentum into spares or over the
gradients (SAM's hand-over, which takes ordinary stores either way)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sam_kernels
from tests.utils import assert_lists_close

pytestmark = pytest.mark.skipif(not sam_kernels.backends()["cpp"]["available"], reason="no compiled CPU kernels")

LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.05
BETAS, EPS = (0.9, 0.999), 1e-8

# Runs in both processes: the ops on fixed inputs, results saved to argv[1].
_SCRIPT = r"""
import sys, torch
import sam_kernels.ops as ops

def lists(dtype):
    gen = torch.Generator().manual_seed(0)
    # 1 element, vectors plus a tail, and views starting one element into their storage (unaligned)
    sizes = [1, 37, 1000, 70001]
    def make(scale):
        out = []
        for n in sizes:
            base = torch.randn(n + 1, generator=gen, dtype=torch.float64).mul_(scale).to(dtype)
            out += [base[:n].clone(), base[1:]]
        return out
    return make(1.0), make(1e-2), make(1e-2), make(1e-3), [t.abs() for t in make(1e-3)]

out = {}
for dtype in (torch.float32, torch.float64):
    w, g, gs, m, v = lists(dtype)
    params, backups = [t.clone() for t in w], [torch.full_like(t, 7.0) for t in w]
    sq = ops.grad_sq_norm(g, backend="cpp")
    ops.perturb_(params, g, backups, %(rho)r, sq_norm=sq, backend="cpp")
    out[f"{dtype} perturbed"], out[f"{dtype} backups"] = params, backups
    sgd_params, bufs = [t.clone() for t in params], [t.clone() for t in m]
    ops.sgd_restore_step_(sgd_params, backups, gs, bufs, lr=%(lr)r, momentum=%(mom)r, weight_decay=%(wd)r,
                          backend="cpp")
    out[f"{dtype} sgd"], out[f"{dtype} bufs"] = sgd_params, bufs
    # the default step's descent: the check in its pass (new buffers into spares) and telemetry sums
    checked, spares, flag = [t.clone() for t in params], [torch.empty_like(t) for t in m], torch.zeros(())
    ops.sgd_restore_step_(checked, backups, gs, [t.clone() for t in m], lr=%(lr)r, momentum=%(mom)r,
                          weight_decay=%(wd)r, momentum_out=spares, nonfinite=flag, sums=torch.zeros(2),
                          backend="cpp")
    out[f"{dtype} sgd checked"], out[f"{dtype} spares"], out[f"{dtype} flag"] = checked, spares, [flag.reshape(1)]
    # SAM's hand-over: every other entry's new buffer written over its gradient, the others into spares
    handed, grads = [t.clone() for t in params], [t.clone() for t in gs]
    outs = [grads[i] if i %% 2 else torch.empty_like(t) for i, t in enumerate(m)]
    ops.sgd_restore_step_(handed, backups, grads, [t.clone() for t in m], lr=%(lr)r, momentum=%(mom)r,
                          weight_decay=%(wd)r, momentum_out=outs, nonfinite=flag, sums=torch.zeros(2),
                          backend="cpp")
    out[f"{dtype} sgd handed"], out[f"{dtype} handed bufs"] = handed, outs
    adam_params, ms, vs = [t.clone() for t in params], [t.clone() for t in m], [t.clone() for t in v]
    ops.adamw_restore_step_(adam_params, backups, gs, ms, vs, step=3, lr=%(lr)r, beta1=%(b1)r, beta2=%(b2)r, eps=%(eps)r,
                            weight_decay=%(wd)r, backend="cpp")
    out[f"{dtype} adamw"] = adam_params
    out[f"{dtype} inputs"] = (w, g, gs, m, v)
torch.save(out, sys.argv[1])
""" % dict(rho=RHO, lr=LR, mom=MOMENTUM, wd=WD, b1=BETAS[0], b2=BETAS[1], eps=EPS)


def _run(tmp_path: Path, name: str, stream_bytes: str | None) -> dict:
    env = dict(os.environ)
    env.pop("SAM_KERNELS_STREAM_BYTES", None)
    if stream_bytes is not None:
        env["SAM_KERNELS_STREAM_BYTES"] = stream_bytes
    path = tmp_path / f"{name}.pt"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


def test_streamed_results_equal_ordinary_stores_and_hand_maths(tmp_path):
    streamed = _run(tmp_path, "streamed", "0")
    ordinary = _run(tmp_path, "ordinary", None)
    for key, tensors in streamed.items():
        if key.endswith("inputs"):
            continue
        for i, (a, b) in enumerate(zip(tensors, ordinary[key])):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{key}[{i}]: streamed stores changed bits"
    for dtype, (atol, rtol) in ((torch.float32, (1e-6, 1e-5)), (torch.float64, (1e-12, 1e-10))):
        w, g, gs, m, v = streamed[f"{dtype} inputs"]
        w64, g64, gs64, m64, v64 = ([t.double() for t in ts] for ts in (w, g, gs, m, v))
        # SAM's ascent (Foret et al. 2021): w + rho·g/‖g‖; the backups hold w bitwise
        norm = torch.sqrt(sum((t * t).sum() for t in g64))
        perturbed = [a + RHO * b / (norm + 1e-12) for a, b in zip(w64, g64)]
        assert_lists_close(streamed[f"{dtype} perturbed"], perturbed, atol, rtol, f"{dtype} perturbed")
        for i, (b, a) in enumerate(zip(streamed[f"{dtype} backups"], w)):
            assert torch.equal(b, a), f"{dtype} backups[{i}] is not w"
        # torch.optim.SGD from w: d = g + wd·w, buf = momentum·buf + d, w − lr·buf
        bufs = [MOMENTUM * b + (a + WD * p) for b, a, p in zip(m64, gs64, w64)]
        sgd = [p - LR * b for p, b in zip(w64, bufs)]
        assert_lists_close(streamed[f"{dtype} bufs"], bufs, atol, rtol, f"{dtype} bufs")
        assert_lists_close(streamed[f"{dtype} sgd"], sgd, atol, rtol, f"{dtype} sgd")
        assert float(streamed[f"{dtype} flag"][0]) == 0.0
        for name, want in (("sgd checked", "sgd"), ("spares", "bufs"), ("sgd handed", "sgd"),
                           ("handed bufs", "bufs")):  # the check, and where the new buffers go, change no bit
            for i, (a, b) in enumerate(zip(streamed[f"{dtype} {name}"], streamed[f"{dtype} {want}"])):
                assert torch.equal(a, b), f"{dtype} {name}[{i}] differs from {want} in place"
        # torch.optim.AdamW (Loshchilov & Hutter 2019) at step 3 from w
        b1, b2, step = BETAS[0], BETAS[1], 3
        adam = []
        for p, a, mi, vi in zip(w64, gs64, m64, v64):
            mn, vn = b1 * mi + (1 - b1) * a, b2 * vi + (1 - b2) * a * a
            denom = vn.sqrt() / (1 - b2 ** step) ** 0.5 + EPS
            adam.append(p * (1 - LR * WD) - LR / (1 - b1 ** step) * mn / denom)
        assert_lists_close(streamed[f"{dtype} adamw"], adam, atol, rtol, f"{dtype} adamw")
