"""Sparse SAM masks, SparseSAM and ESAM against the maths (float64 / naive references written here)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sam_kernels.optim import masks as M

LOSS = nn.functional.cross_entropy


def mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def data(n: int = 24, shape=(6,), seed: int = 1, batch: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(shape), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def naive_fisher(model, batches, num_samples, params=None):
    """Σ_i g_i² by an explicit batch-1 loop with .backward(), in float64."""
    params = list(model.parameters()) if params is None else params
    out = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    seen = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            if seen == num_samples:
                return out
            model.zero_grad()
            LOSS(model(x[i:i + 1]), y[i:i + 1]).backward()
            for o, p in zip(out, params):
                o += p.grad.double() ** 2
            seen += 1
    return out


# --------------------------------------------------------------------------- patterns

SHAPES = [(7, 13), (7,), (5, 3, 3, 3), (5,), (1,), (11, 4)]


def scores(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) for s in shapes]


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.7, 0.9, 1.0])
def test_unstructured_exact_density_and_global_topk(sparsity):
    s = scores()
    mk = M.unstructured_mask(s, 1 - sparsity)
    n = sum(t.numel() for t in s)
    k = int(n * (1 - sparsity) + 1e-9)
    assert sum(int(m.sum()) for m in mk) == k
    flat = torch.cat([t.reshape(-1) for t in s])
    kept = torch.cat([m.reshape(-1) for m in mk])
    if 0 < k < n:  # global: every kept score beats every dropped one (biases compete too)
        assert flat[kept].min() > flat[~kept].max()


def test_unstructured_ties_deterministic_exact_count():
    s = [torch.ones(10), torch.ones(3, 3)]
    mk = M.unstructured_mask(s, 0.5)
    assert sum(int(m.sum()) for m in mk) == 9
    assert mk[0][:9].all() and not mk[0][9] and not mk[1].any()  # lower position first


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_groups_valid(n, m):
    s = scores([(6, 16), (4, 2, 3, 3), (10,), (3, 7)])
    mk = M.pattern_mask(s, "nm", 0.0, n, m)
    for t, k in zip(s, mk):
        rows = k.reshape(t.shape[0], -1) if t.dim() > 1 else k.reshape(1, -1)
        vals = t.reshape(rows.shape)
        for r in range(rows.shape[0]):
            for c0 in range(0, rows.shape[1], m):
                grp, v = rows[r, c0:c0 + m], vals[r, c0:c0 + m]
                assert int(grp.sum()) == min(n, grp.numel())  # exactly n for full groups
                if 0 < grp.sum() < grp.numel():
                    assert v[grp].min() >= v[~grp].max()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_structured_whole_rows_ranked_by_mean(sparsity):
    s = scores()
    mk = M.structured_mask(s, 1 - sparsity)
    n = sum(t.numel() for t in s)
    budget = int(n * (1 - sparsity) + 1e-9)
    rows, means = [], []
    for t, k in zip(s, mk):
        kr = k.reshape(t.shape[0], -1) if t.dim() >= 2 else k.reshape(-1, 1)
        assert torch.equal(kr.all(1), kr.any(1)), "a row is partly kept"
        rows.append(kr[:, 0])
        means.append((t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1, 1)).double().mean(1))
    kept = sum(int(k.sum()) for k in mk)
    assert kept <= budget
    # a naive ranked prefix, written independently
    sizes = torch.cat([torch.full((len(r),), t[0].numel() if t.dim() >= 2 else 1) for r, t in zip(rows, s)])
    allm, allr = torch.cat(means), torch.cat(rows)
    order = sorted(range(len(allm)), key=lambda i: (-allm[i].item(), i))
    expect, total = torch.zeros_like(allr), 0
    for i in order:
        if total + sizes[i] > budget:
            break
        expect[i], total = True, total + sizes[i]
    assert torch.equal(allr, expect)
    assert budget - kept < sizes.max()


# --------------------------------------------------------------------------- Fisher

@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_fisher_equals_per_sample_loop(method):
    net, batches = mlp(), data()
    got = M.fisher_scores(net, LOSS, batches, num_samples=17, method=method)
    want = naive_fisher(mlp(), batches, 17)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in net.parameters())  # .grad untouched


def test_fisher_bn_stats_and_modes_restored():
    net, batches = cnn(), data(shape=(2, 6, 6))
    bn = net[1]
    net.train()
    net[4].eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = M.fisher_scores(net, LOSS, batches, num_samples=9)  # auto → loop (BN in training mode)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.training and not net[4].training and net.training
    bn_ref = cnn()
    bn_ref.train()
    want = naive_fisher(bn_ref, batches, 9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
    # the naive loop DID change the stats: the restore above is not vacuous
    assert not torch.equal(bn_ref[1].running_mean, before["1.running_mean"])


def test_fisher_eval_mode_option_and_global_mask():
    net, batches = mlp(bn=True), data()
    net.train()
    f = M.fisher_scores(net, LOSS, batches, num_samples=8, train=False)  # BN1d at batch 1 needs eval
    assert net.training and net[1].training
    fm = M.FisherMask(num_samples=8, sparsity=0.5, seed=0, train=False)
    mk = fm.refresh(list(net.parameters()), model=net, loss_fn=LOSS, data=batches)
    n = sum(p.numel() for p in net.parameters())
    assert sum(int(m.sum()) for m in mk) == n // 2
    for a, b in zip(fm.last_scores, f):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- dynamic mask

@pytest.mark.parametrize("t,horizon", [(0, 10), (3, 10), (5, 10), (10, 10), (12, 10)])
def test_cosine_drop_rate(t, horizon):
    tc = min(t, horizon)
    assert M.cosine_drop_rate(t, horizon, 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * tc / horizon)) / 2)


@pytest.mark.parametrize("sparsity,dr", [(0.5, 0.5), (0.2, 0.5), (0.9, 0.3), (0.5, 0.0), (0.5, 1.0)])
def test_dynamic_update_exact_live_count(sparsity, dr):
    s = scores()
    gen = torch.Generator().manual_seed(3)
    n = sum(t.numel() for t in s)
    k = int(n * (1 - sparsity) + 1e-9)
    mk = M.unstructured_mask(M.random_scores(s, gen), 1 - sparsity)
    assert sum(int(m.sum()) for m in mk) == k
    grads = scores(seed=5)
    new = M.dynamic_update(mk, grads, 1 - sparsity, dr, gen)
    assert sum(int(m.sum()) for m in new) == k
    keep = int(n * (1 - sparsity) * (1 - dr) + 1e-9)
    # survivors are the top-|g| live entries, exactly `keep` of them (+ regrown from the dead)
    live_g = torch.cat([torch.where(m, g.abs(), torch.tensor(-1.0)).reshape(-1) for m, g in zip(mk, grads)])
    top = set(torch.sort(live_g, descending=True, stable=True).indices[:keep].tolist())
    old, nw = torch.cat([m.reshape(-1) for m in mk]), torch.cat([m.reshape(-1) for m in new])
    assert top <= set(torch.nonzero(nw).reshape(-1).tolist())
    grown = nw & ~old
    assert int(grown.sum()) == min(k - keep, int((~old).sum()))


def test_dynamic_provider_drop_rate_follows_cosine_per_epoch():
    params = [torch.zeros(20, 5), torch.zeros(5)]
    prov = M.DynamicMask(horizon=4, drop_rate=0.5, sparsity=0.6, seed=0,
                         cadence=M.RefreshCadence(1, "epoch", steps_per_epoch=3))
    seen = []
    for step in range(12):
        if prov.cadence.due:
            prev = None if prov.masks is None else torch.cat([m.reshape(-1) for m in prov.masks])
            prov.refresh(params, [torch.randn_like(p) for p in params])
            now = torch.cat([m.reshape(-1) for m in prov.masks])
            assert int(now.sum()) == int(105 * 0.4)
            if prev is not None:
                e = step // 3
                dr = 0.5 * (1 + math.cos(math.pi * e / 4)) / 2
                assert prov.last_drop_rate == pytest.approx(dr)
                # 63 dead entries ≥ 42 − keep: every regrown entry comes from the dead, so exactly
                # 42 − keep live entries are dropped
                assert int((prev & ~now).sum()) == 42 - int(105 * 0.4 * (1 - dr) + 1e-9)
            seen.append(step)
        prov.cadence.tick()
    assert seen == [0, 3, 6, 9]


# --------------------------------------------------------------------------- cadence

@pytest.mark.parametrize("freq,unit,spe,steps,expect", [
    (1, "step", None, 7, [0, 1, 2, 3, 4, 5, 6]),
    (3, "step", None, 10, [0, 3, 6, 9]),
    (1, "epoch", 4, 12, [0, 4, 8]),
    (2, "epoch", 3, 20, [0, 6, 12, 18]),
])
def test_refresh_cadence_counts(freq, unit, spe, steps, expect):
    c = M.RefreshCadence(freq, unit, spe)
    hits = []
    for s in range(steps):
        if c.due:
            c.mark()
            hits.append(s)
        c.tick()
    units = steps if unit == "step" else math.ceil(steps / spe)
    assert hits == expect and c.refreshes == len(expect) == math.ceil(units / freq)


def test_refresh_cadence_explicit_epochs():
    c = M.RefreshCadence(2, "epoch")
    hits = []
    for epoch in range(5):
        c.set_epoch(epoch)
        for _ in range(3):
            if c.due:
                c.mark()
                hits.append(epoch)
            c.tick()
    assert hits == [0, 2, 4]


# --------------------------------------------------------------------------- implicit form (masked input gradient)

def test_masked_input_grad_matches_reference_and_restores_modules():
    from sam_kernels.optim.sparse import masked_input_grad

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    masks = {m.weight: torch.rand_like(m.weight) > 0.5 for m in net if hasattr(m, "weight")}

    def grads(patched):
        net.zero_grad()
        if patched:
            with masked_input_grad(net, masks):
                loss = LOSS(net(x), y)
            loss.backward()  # the custom backward was recorded inside the block
        else:  # reference: value of W, input gradient through W ⊙ m (written without custom autograd)
            h = x
            for mod in net:
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    w, wm = mod.weight, (mod.weight * masks[mod.weight]).detach()
                    f = mod._conv_forward if isinstance(mod, nn.Conv2d) else (lambda i, a, b: nn.functional.linear(i, a, b))
                    h = f(h, wm, None) + f(h.detach(), w, mod.bias) - f(h.detach(), wm, None)
                else:
                    h = mod(h)
            loss = LOSS(h, y)
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    l1, g1 = grads(True)
    l0, g0 = grads(False)
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert "forward" not in net[0].__dict__ and "forward" not in net[4].__dict__
    net.zero_grad()
    LOSS(net(x), y).backward()  # outside the block: dense input gradients again
    assert not torch.allclose(net[0].weight.grad, g1[0])


# --------------------------------------------------------------------------- properties (hypothesis)

from hypothesis import given, settings, strategies as st  # noqa: E402

_shapes = st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(shapes=_shapes, sparsity=st.floats(0.0, 1.0), dr=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_property_dynamic_and_topk_exact_counts(shapes, sparsity, dr, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.empty(s) for s in shapes]
    n = sum(p.numel() for p in params)
    k = M.keep_count(n, 1 - sparsity)
    mk = M.unstructured_mask(M.random_scores(params, gen), 1 - sparsity)
    assert sum(int(m.sum()) for m in mk) == k
    grads = [torch.randn(s, generator=gen) for s in shapes]
    new = M.dynamic_update(mk, grads, 1 - sparsity, dr, gen)
    assert sum(int(m.sum()) for m in new) == k
    st_mask = M.structured_mask(grads, 1 - sparsity)
    assert sum(int(m.sum()) for m in st_mask) <= k


# --------------------------------------------------------------------------- SparseSAM

from sam_kernels.optim import SAM  # noqa: E402
from sam_kernels.optim.esam import ESAM, sharpness_indices  # noqa: E402
from sam_kernels.optim.sparse import SparseSAM  # noqa: E402


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def first_pass(net, x, y):
    LOSS(net(x), y).backward()


@pytest.mark.parametrize("masked_norm", [False, True])
@pytest.mark.parametrize("pattern", ["unstructured", "structured", "nm"])
def test_sparse_first_step_masked_perturbation(masked_norm, pattern):
    net, (x, y) = mlp(), data()[0]
    params = list(net.parameters())
    rho = 0.3
    opt = SparseSAM(params, torch.optim.SGD, rho=rho, mask="random", pattern=pattern, seed=0,
                    masked_norm=masked_norm, lr=0.1)
    first_pass(net, x, y)
    w0 = [p.detach().clone() for p in params]
    g = [p.grad.detach().double() for p in params]
    opt.first_step()
    masks = opt.masks
    assert masks is not None and 0 < sum(int(m.sum()) for m in masks) < sum(m.numel() for m in masks)
    # float64 maths: e = rho·(m⊙g)/‖g‖ (full norm) or /‖m⊙g‖ (masked norm)
    denom = math.sqrt(sum(float(((m.double() * gi) if masked_norm else gi).pow(2).sum()) for m, gi in zip(masks, g)))
    e = [rho * m.double() * gi / denom for m, gi in zip(masks, g)]
    norm_e = math.sqrt(sum(float(t.pow(2).sum()) for t in e))
    assert norm_e == pytest.approx(rho, rel=1e-6) if masked_norm else norm_e < rho
    for p, w, m, ei in zip(params, w0, masks, e):
        assert bits_equal(p.detach()[~m], w[~m])  # outside the mask: bitwise untouched
        torch.testing.assert_close(p.detach().double(), w.double() + ei, rtol=1e-6, atol=1e-7)
    opt.restore()
    for p, w in zip(params, w0):
        assert bits_equal(p.detach(), w)


def test_sparse_zero_sparsity_equals_sam():
    """sparsity 0 (every weight perturbed) must be plain SAM, bitwise, over several steps."""
    nets = [mlp(), mlp()]
    opts = [SAM(nets[0].parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
            SparseSAM(nets[1].parameters(), torch.optim.SGD, rho=0.1, sparsity=0.0, mask="random", seed=0,
                      update_unit="step", lr=0.1, momentum=0.9)]
    for x, y in data():
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            first_pass(net, x, y)
            opt.step(lambda: first_pass(net, x, y))
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert bits_equal(a.detach(), b.detach())


@pytest.mark.parametrize("unit,freq,spe,expect", [("step", 1, None, 6), ("step", 4, None, 2), ("epoch", 1, 2, 3),
                                                  ("epoch", 2, 2, 2)])
def test_sparse_refresh_cadence_in_optimizer(unit, freq, spe, expect):
    net, batches = mlp(), data(n=48, batch=8)  # 6 steps
    calls = []
    opt = SparseSAM(net.parameters(), torch.optim.SGD, mask="fisher", num_samples=4, update_freq=freq,
                    update_unit=unit, steps_per_epoch=spe, model=net, loss_fn=LOSS,
                    fisher_data=lambda: calls.append(1) or batches, lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        first_pass(net, x, y)
        opt.step(lambda: first_pass(net, x, y))
    assert len(calls) == opt.mask_provider.cadence.refreshes == expect


def test_sparse_fisher_needs_data_clear_error_and_manual_update():
    net, batches = mlp(), data()
    opt = SparseSAM(net.parameters(), torch.optim.SGD, mask="fisher", num_samples=5, lr=0.1)
    x, y = batches[0]
    first_pass(net, x, y)
    with pytest.raises(RuntimeError, match="update_mask"):
        opt.first_step()
    masks = opt.update_mask(net, LOSS, batches)
    want = M.unstructured_mask(naive_fisher(mlp(), batches, 5), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(masks, want))
    opt.first_step()
    opt.second_step()


def test_sparse_dynamic_in_optimizer_exact_live_count():
    net, batches = mlp(), data(n=48, batch=8)
    opt = SparseSAM(net.parameters(), torch.optim.SGD, mask="dynamic", sparsity=0.7, update_unit="step",
                    horizon=6, seed=1, lr=0.1)
    k = int(sum(p.numel() for p in net.parameters()) * 0.3 + 1e-9)
    prev = None
    for x, y in batches:
        opt.zero_grad()
        first_pass(net, x, y)
        opt.step(lambda: first_pass(net, x, y))
        now = torch.cat([m.reshape(-1) for m in opt.masks])
        assert int(now.sum()) == k
        if prev is not None:  # exactly K − int(N·0.3·(1 − dr)) entries were dropped (and as many regrown)
            n = now.numel()
            dr = 0.5 * (1 + math.cos(math.pi * opt.mask_provider.cadence.step / 6 - math.pi / 6)) / 2
            assert opt.mask_provider.last_drop_rate == pytest.approx(dr)
            assert int((prev & ~now).sum()) == k - int(n * 0.3 * (1 - dr) + 1e-9)
        prev = now


def test_sparse_implicit_masks_input_grads_only_and_perturbs_dense():
    net, batches = mlp(), data()
    opt = SparseSAM(net.parameters(), torch.optim.SGD, rho=0.1, mask="random", pattern="nm", implicit=True,
                    model=net, seed=0, lr=0.1)
    x, y = batches[0]
    first_pass(net, x, y)
    with pytest.raises(RuntimeError, match="ascent_pass"):
        opt.first_step()
    net.zero_grad()
    with opt.ascent_pass():
        first_pass(net, x, y)
    g_implicit = [p.grad.clone() for p in net.parameters()]
    ref = mlp()
    first_pass(ref, x, y)
    # last layer: its weight gradient is dense and unchanged; first layer: input grads of layer 2 masked
    assert torch.equal(g_implicit[2], ref[2].weight.grad)
    assert not torch.allclose(g_implicit[0], ref[0].weight.grad)
    w0 = [p.detach().clone() for p in net.parameters()]
    opt.first_step()
    assert all(not torch.equal(p.detach(), w) for p, w in zip(net.parameters(), w0))  # dense e


def test_sparse_composes_with_policy_and_renormalize():
    from sam_kernels.optim import ScheduledPolicy

    net, batches = mlp(), data(n=48, batch=8)
    opt = SparseSAM(net.parameters(), torch.optim.SGD, mask="dynamic", horizon=6, update_unit="step", seed=0,
                    renormalize=True, policy=ScheduledPolicy("constant", 0.5, seed=0), lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        first_pass(net, x, y)
        opt.step(lambda: first_pass(net, x, y))
    assert opt.step_count == 6 and opt.mask_provider.cadence.step == 6


def _run_sparse(opt, net, batches):
    for x, y in batches:
        opt.zero_grad()
        first_pass(net, x, y)
        opt.step(lambda: first_pass(net, x, y))


@pytest.mark.parametrize("mask", ["dynamic", "random"])
def test_sparse_state_dict_resume_bitwise(mask):
    batches = data(n=64, batch=8)

    def build(net):
        return SparseSAM(net.parameters(), torch.optim.SGD, rho=0.1, mask=mask, horizon=8, update_unit="step",
                         update_freq=2, seed=3, lr=0.1, momentum=0.9)

    net = mlp()
    opt = build(net)
    _run_sparse(opt, net, batches[:3])
    ckpt_opt = {k: v for k, v in opt.state_dict().items()}
    import copy
    ckpt_opt = copy.deepcopy(ckpt_opt)
    ckpt_net = copy.deepcopy(net.state_dict())
    _run_sparse(opt, net, batches[3:])

    net2 = mlp(seed=7)
    net2.load_state_dict(ckpt_net)
    opt2 = build(net2)
    opt2.load_state_dict(ckpt_opt)
    _run_sparse(opt2, net2, batches[3:])
    for a, b in zip(net.parameters(), net2.parameters()):
        assert bits_equal(a.detach(), b.detach())
    assert all(torch.equal(a, b) for a, b in zip(opt.masks, opt2.masks))


# --------------------------------------------------------------------------- ESAM

def per_sample(net, x, y):
    def closure(indices=None):
        xs, ys = (x, y) if indices is None else (x[indices], y[indices])
        return LOSS(net(xs), ys, reduction="none")
    return closure


@pytest.mark.parametrize("adaptive,renormalize", [(False, False), (True, False), (False, True)])
def test_esam_beta1_gamma1_is_sam_bitwise(adaptive, renormalize):
    nets = [mlp(), mlp()]
    kw = dict(rho=0.1, adaptive=adaptive, renormalize=renormalize, lr=0.1, momentum=0.9)
    sam = SAM(nets[0].parameters(), torch.optim.SGD, **kw)
    esam = ESAM(nets[1].parameters(), torch.optim.SGD, beta=1.0, gamma=1.0, seed=0, **kw)
    for x, y in data(n=40, batch=8):
        sam.zero_grad()
        per_sample(nets[0], x, y)().mean().backward()
        sam.step(lambda: per_sample(nets[0], x, y)().mean().backward())
        esam.zero_grad()
        esam.step(per_sample(nets[1], x, y))
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert bits_equal(a.detach(), b.detach())


def test_sharpness_selection_matches_argsort_with_ties():
    before = torch.zeros(10)
    after = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, -1.0, 2.0, 2.0, 0.0, 3.0])
    for gamma, want in [(0.5, [1, 2, 4, 6, 9]), (0.3, [1, 2, 4]), (0.2, [1, 2]), (0.7, [0, 1, 2, 4, 6, 7, 9]),
                        (1.0, list(range(10))), (0.01, [1])]:
        assert sharpness_indices(before, after, gamma).tolist() == want
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = torch.randint(0, 3, (17,), generator=g).float()
        a = torch.randint(0, 3, (17,), generator=g).float()
        d = (a - b).tolist()
        k = int(17 * 0.4)
        ref = sorted(sorted(range(17), key=lambda i: (-d[i], i))[:k])  # python sort: ties by index
        assert sharpness_indices(b, a, 0.4).tolist() == ref


def test_esam_sds_second_pass_uses_selected_samples():
    net = mlp()
    x, y = data()[0]
    seen = []

    def closure(indices=None):
        seen.append(None if indices is None else indices.tolist())
        return per_sample(net, x, y)(indices)

    opt = ESAM(net.parameters(), torch.optim.SGD, rho=0.2, gamma=0.5, seed=0, lr=0.1)
    w0 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        before = per_sample(net, x, y)()
    opt.step(closure)
    assert seen[0] is None and seen[1] is None and len(seen) == 3
    # reference: the loss increase at w + e with e from the full-batch mean-loss gradient
    ref = mlp()
    LOSS(ref(x), y).backward()
    gn = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * p.grad / gn)
        after = per_sample(ref, x, y)()
    assert seen[2] == sharpness_indices(before, after, 0.5).tolist() and len(seen[2]) == int(len(x) * 0.5)
    assert w0  # weights moved: the step was taken
    assert not torch.equal(net[0].weight.detach(), w0[0])


def test_esam_tensor_swp_excludes_unselected_from_first_backward():
    net = mlp()
    x, y = data()[0]
    params = list(net.parameters())
    opt = ESAM(params, torch.optim.SGD, rho=0.2, beta=0.5, seed=1, lr=0.1)
    with opt.ascent_pass():
        first_pass(net, x, y)
        inside = [p.requires_grad for p in params]
    sel = opt._selection
    assert 0 < sum(sel) < len(sel), "seed gives a mixed selection"
    assert inside == sel and all(p.requires_grad for p in params)  # restored after the pass
    assert [p.grad is not None for p in params] == sel  # unselected: no gradient computed
    w0 = [p.detach().clone() for p in params]
    g = [None if p.grad is None else p.grad.double() for p in params]
    opt.first_step(zero_grad=True)
    gn = math.sqrt(sum(float(t.pow(2).sum()) for t in g if t is not None))
    for p, w, s, gi in zip(params, w0, sel, g):
        if s:  # e = rho·g/(‖g_sel‖·beta)
            torch.testing.assert_close(p.detach().double(), w.double() + 0.2 * gi / (gn * 0.5), rtol=1e-6, atol=1e-7)
        else:
            assert bits_equal(p.detach(), w)
    first_pass(net, x, y)
    opt.second_step()
    assert opt._selection is None


def test_esam_tensor_swp_in_step_and_policy_plain_steps_dense():
    from sam_kernels.optim import PeriodicPolicy

    net = mlp()
    params = list(net.parameters())
    opt = ESAM(params, torch.optim.SGD, beta=0.5, seed=1, policy=PeriodicPolicy(2), lr=0.1)
    grads_seen = []
    for i, (x, y) in enumerate(data(n=32, batch=8)):
        opt.zero_grad()

        def closure(indices=None):
            if len(grads_seen) == i:  # first call of the step: record which params require grad
                grads_seen.append([p.requires_grad for p in params])
            return per_sample(net, x, y)(indices)
        opt.step(closure)
    assert all(all(r) for r in grads_seen[1::2])  # plain steps: nothing frozen
    assert any(not all(r) for r in grads_seen[0::2])


def test_esam_element_swp_reproducible_with_seed():
    def run(seed):
        net = mlp()
        opt = ESAM(net.parameters(), torch.optim.SGD, rho=0.2, beta=0.5, swp="element", seed=seed, lr=0.1)
        x, y = data()[0]
        first_pass(net, x, y)
        w0 = [p.detach().clone() for p in net.parameters()]
        opt.first_step()
        return [p.detach() != w for p, w in zip(net.parameters(), w0)], [p.detach().clone() for p in net.parameters()]

    (m1, p1), (_, p2), (m3, _) = run(5), run(5), run(6)
    assert all(bits_equal(a, b) for a, b in zip(p1, p2))
    frac = sum(int(m.sum()) for m in m1) / sum(m.numel() for m in m1)
    assert 0.3 < frac < 0.7
    assert any(not torch.equal(a, b) for a, b in zip(m1, m3))


@pytest.mark.parametrize("swp", ["tensor", "element"])
def test_esam_state_dict_resume_bitwise(swp):
    import copy

    batches = data(n=64, batch=8)

    def build(net):
        return ESAM(net.parameters(), torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.5, swp=swp, seed=4, lr=0.1,
                    momentum=0.9)

    def run(opt, net, bs):
        for x, y in bs:
            opt.zero_grad()
            opt.step(per_sample(net, x, y))

    net = mlp()
    opt = build(net)
    run(opt, net, batches[:3])
    ckpt = copy.deepcopy(opt.state_dict())
    ckpt_net = copy.deepcopy(net.state_dict())
    run(opt, net, batches[3:])
    net2 = mlp(seed=9)
    net2.load_state_dict(ckpt_net)
    opt2 = build(net2)
    opt2.load_state_dict(ckpt)
    run(opt2, net2, batches[3:])
    for a, b in zip(net.parameters(), net2.parameters()):
        assert bits_equal(a.detach(), b.detach())


def test_composition_ae_sparse_and_esam_adaptive_renormalize():
    from sam_kernels.optim import AdaptivePolicy, ScheduledPolicy

    batches = data(n=48, batch=8)
    net = mlp()
    sparse = SparseSAM(net.parameters(), torch.optim.SGD, mask="random", update_unit="step", seed=0,
                       policy=AdaptivePolicy(6), lr=0.1)
    _run_sparse(sparse, net, batches)
    assert sparse.step_count == 6 and sparse.mask_provider.cadence.step == 6

    net2 = mlp()
    params = list(net2.parameters())
    esam = ESAM(params, torch.optim.SGD, rho=0.5, adaptive=True, renormalize=True, beta=0.5, gamma=0.5, seed=0,
                policy=ScheduledPolicy("constant", 0.7, seed=0), lr=0.1)
    for x, y in batches:
        esam.zero_grad()
        esam.step(per_sample(net2, x, y))
    assert esam.step_count == 6 and all(torch.isfinite(p).all() for p in params)

    # AE-SAM reads the first-pass norm: ESAM must not freeze tensors then (a plain step needs every grad)
    net3 = mlp()
    params3 = list(net3.parameters())
    esam_ae = ESAM(params3, torch.optim.SGD, beta=0.5, seed=0, policy=AdaptivePolicy(6), lr=0.1)
    flags = []
    for x, y in batches:
        esam_ae.zero_grad()

        def closure(indices=None):
            flags.append(all(p.requires_grad for p in params3))
            return per_sample(net3, x, y)(indices)
        esam_ae.step(closure)
    assert all(flags)
