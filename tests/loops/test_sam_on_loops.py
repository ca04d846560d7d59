"""SAM-ON's param groups (``perturb=False``) in every variant of the loop matrix: the skipped tensors
stay at w through the ascent (or the variant refuses such groups before any weight changes)."""
from __future__ import annotations

import pytest
import torch

from tests.loops.matrix import cases
from tests.optim.hand_reference import norm
from tests.optim.variants import LR, loss_fn, make_batches, make_model


PLAIN_ASCENT = {"SAM", "SAM-AdamW", "SAM-Adagrad", "SSSAM", "StableSAM", "LookSAM", "AESAM", "AELookSAM",
                "LatePhaseSAM"}


@pytest.mark.parametrize("info,backend", [c for c in cases("sam_on") + cases("sam_on", refused=True)
                                           if c.values[0].name != "SAM-ON"])
def test_every_variant_leaves_skipped_groups_at_w(info, backend):
    """Each variant class with SAM-ON's groups (the 2-D tensors perturb=False): at the second pass the
    skipped tensors are bitwise at w; for the plain ascents ‖e‖ = rho over the perturbed ones (their
    norm alone is the denominator: with the skipped gradients in it, ‖e‖ would be below rho)."""
    model = make_model()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() == 1]},
              {"params": [p for p in params if p.dim() != 1], "perturb": False}]
    opt = info.factory(groups, model=model, backend=backend)
    x, y = make_batches(1)[0]
    w0 = [p.detach().clone() for p in params]
    with (opt.ascent_pass() if hasattr(opt, "ascent_pass") else torch.enable_grad()):
        loss_fn(model(x), y).backward()
    if "sam_on" in info.refuses:  # an explicit error before any weight changes
        exc, match = info.refuses["sam_on"]
        with pytest.raises(exc, match=match):
            opt.first_step(zero_grad=True)
        assert all(torch.equal(p.detach(), w) for p, w in zip(params, w0)), info.name
        return
    if info.one_pass:  # Momentum-SAM: after step() the model holds w̃; the skipped tensors took a plain step
        wd = opt.param_groups[0]["weight_decay"]  # SGD's first step: buf = g + wd·w (no momentum yet, w̃ = w)
        want = [w - LR * (p.grad.detach() + wd * w) for p, w in zip(params, w0)]
        opt.step()
        for p, w, new in zip(params, w0, want):
            if p.dim() != 1:
                torch.testing.assert_close(p.detach(), new, atol=1e-12, rtol=1e-10, msg=info.name)
        return
    for _ in range(info.ascent_steps - 1):  # a multi-step ascent: the earlier ascents, a backward after each
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    for p, w in zip(params, w0):
        if p.dim() != 1:
            assert torch.equal(p.detach(), w), info.name
    if info.name in PLAIN_ASCENT:
        e_norm = norm([p.detach() - w for p, w in zip(params, w0) if p.dim() == 1])
        torch.testing.assert_close(e_norm, torch.tensor(0.05, dtype=torch.float64), atol=1e-12, rtol=1e-10)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
