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
