"""SAM-ON (Mueller et al. 2023): ``perturb=False`` groups are out of the ascent and of its norm, for
every variant class; ``sam_on_param_groups`` finds the normalization layers.

The maths in every loop is the loop matrix's (row "SAM-ON"); here: the helper, the key's checks,
that each variant leaves the skipped groups exactly at w during the second pass, and that the
skipped tensors are in no ascent op's lists (no extra pass)."""
from __future__ import annotations

import pytest
import torch

import sam_kernels as sk
from sam_kernels import ops
from tests.optim.hand_reference import EPS, norm
from tests.optim.variants import loss_fn, make_batches, make_model


class WRNBlock(torch.nn.Module):
    """Names as in the official code's models (``norm1``, ``bn``), a LayerNorm and a GroupNorm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Linear(4, 6)
        self.norm1 = torch.nn.BatchNorm1d(6)
        self.ln = torch.nn.LayerNorm(6)
        self.gn = torch.nn.GroupNorm(2, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.gn(self.ln(torch.tanh(self.norm1(self.conv(x))))))


def test_groups_by_module():
    model = WRNBlock()
    norm_group, rest = sk.sam_on_param_groups(model, rho=0.5, adaptive=True)
    want = [model.norm1.weight, model.norm1.bias, model.ln.weight, model.ln.bias, model.gn.weight, model.gn.bias]
    assert [id(p) for p in norm_group["params"]] == [id(p) for p in want]
    assert norm_group["rho"] == 0.5 and norm_group["adaptive"] is True and "perturb" not in norm_group
    assert [id(p) for p in rest["params"]] == [id(p) for p in (model.conv.weight, model.conv.bias,
                                                                model.head.weight, model.head.bias)]
    assert rest["perturb"] is False


def test_groups_by_name_is_the_official_rule():
    """'norm' or 'bn' in the qualified name: norm1 matches, ln and gn do not (the official README's caveat)."""
    model = WRNBlock()
    norm_group, rest = sk.sam_on_param_groups(model, rule="names")
    assert [id(p) for p in norm_group["params"]] == [id(model.norm1.weight), id(model.norm1.bias)]
    assert len(rest["params"]) == 8


def test_sequential_names_miss_the_norm_layer_but_modules_find_it():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no parameter name contains"):
        sk.sam_on_param_groups(model, rule="names")
    norm_group, _ = sk.sam_on_param_groups(model)
    assert [id(p) for p in norm_group["params"]] == [id(model[1].weight), id(model[1].bias)]


def test_no_normalization_layer_raises():
    with pytest.raises(ValueError, match="nothing would be perturbed"):
        sk.sam_on_param_groups(make_model())
    with pytest.raises(ValueError, match="rule must be one of"):
        sk.sam_on_param_groups(WRNBlock(), rule="type")


def test_frozen_and_shared_params():
    """Params without requires_grad are left out; a shared norm parameter appears once."""
    model = WRNBlock()
    model.conv.weight.requires_grad_(False)
    model.ln.weight = model.gn.weight
    norm_group, rest = sk.sam_on_param_groups(model)
    ids = [id(p) for g in (norm_group, rest) for p in g["params"]]
    assert len(ids) == len(set(ids)) and id(model.conv.weight) not in ids
    assert sum(1 for p in norm_group["params"] if p is model.gn.weight) == 1


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_perturb_must_be_a_bool(value):
    model = make_model()
    with pytest.raises(TypeError, match="param group 1: perturb must be a bool"):
        sk.SAM([{"params": model[0].parameters()}, {"params": model[2].parameters(), "perturb": value}],
               torch.optim.SGD, lr=0.1)


def test_sam_on_step_by_hand_on_a_batchnorm_model():
    """One SAM-ON step (SGD, no momentum) in float64, by hand: e = rho·g_N/‖g_N‖ on the norm params only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    model.eval()  # fixed statistics: the loss is a plain function of the weights
    x, y = make_batches(1)[0]
    rho, lr = 0.3, 0.1
    w0 = [p.detach().clone() for p in model.parameters()]
    is_norm = [False, False, True, True, False, False]
    opt = sk.SAM(sk.sam_on_param_groups(model), torch.optim.SGD, rho=rho, lr=lr)

    def grads_at(ws):
        leaves = [w.clone().requires_grad_() for w in ws]
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, leaves)), (x,))
        return torch.autograd.grad(loss_fn(out, y), leaves)
    g1 = grads_at(w0)
    n = norm([g for g, k in zip(g1, is_norm) if k])
    e = [rho * g / (n + EPS) if k else torch.zeros_like(g) for g, k in zip(g1, is_norm)]
    g2 = grads_at([w + ei for w, ei in zip(w0, e)])
    expected = [w - lr * g for w, g in zip(w0, g2)]

    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    for p, w, ei in zip(model.parameters(), w0, e):
        torch.testing.assert_close(p.detach(), w + ei, atol=1e-14, rtol=1e-12)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for p, w in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), w, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("telemetry", [False, "norms"])
def test_skipped_groups_are_in_no_ascent_list(monkeypatch, telemetry):
    """No extra pass: the norm and perturb_ launches of first_step get the perturbed tensors only
    (finite_check=False: nothing screens the skipped gradients). Telemetry's ‖g(w)‖ (the default)
    reads the skipped gradients once more, and nothing else: its value is the norm over every gradient."""
    model = make_model()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() == 1]},
              {"params": [p for p in params if p.dim() != 1], "perturb": False}]
    opt = sk.SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1, finite_check=False, telemetry=telemetry)
    seen = []
    for name in ("grad_sq_norm", "perturb_"):
        real = getattr(ops, name)

        def spy(tensors, *args, _real=real, _name=name, **kw):
            seen.append((_name, len(tensors)))
            return _real(tensors, *args, **kw)
        monkeypatch.setattr(ops, name, spy)
    x, y = make_batches(1)[0]
    loss_fn(model(x), y).backward()
    by_hand = torch.cat([p.grad.double().flatten() for p in params]).norm()
    opt.first_step()
    if not telemetry:
        assert seen == [("grad_sq_norm", 2), ("perturb_", 2)]
        return
    assert seen == [("grad_sq_norm", 2), ("grad_sq_norm", 2), ("perturb_", 2)]
    loss_fn(model(x), y).backward()
    opt.second_step()
    assert opt.stats()["grad_norm"] == pytest.approx(by_hand.item(), rel=1e-6)


def test_stable_sam_with_sam_on_groups_in_the_matrix_loops():
    """Stable SAM's ‖g(w)‖ with SAM-ON groups is over every first-pass gradient (as the hand reference)."""
    from tests.loops.harness import Run
    from tests.optim.hand_reference import HandSAM
    from tests.optim.variants import SGD, VariantInfo

    def factory(params, model=None, backend=None, **extra):
        params = list(params)
        groups = [{"params": [p for p in params if p.dim() == 1]},
                  {"params": [p for p in params if p.dim() != 1], "perturb": False}]
        return sk.StableSAM(groups, torch.optim.SGD, rho=0.05, backend=backend, **{**SGD, **extra})
    info = VariantInfo("StableSAM-ON", factory, False,
                       lambda ws: HandSAM(ws, base="sgd", base_kwargs=dict(SGD), rho=0.05, renormalize=True,
                                          perturbed=[w.dim() == 1 for w in ws]))
    for loop in ("manual", "closure"):
        Run(info, "cpp").train(loop)
