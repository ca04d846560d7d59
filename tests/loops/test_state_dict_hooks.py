"""torch.optim's state-dict hook contract on every variant (issue input 9 and its class).

PyTorch's own optimizer tests register hooks that add a non-parameter entry to ``optimizer.state``
(``state["test"] = 1``), return new dicts from pre-load and post-save hooks, and record from a
post-load hook; each variant must honour them exactly as ``torch.optim.SGD`` does, and keep
stepping afterwards. The expected values are torch.optim.SGD's own behaviour under the same hooks.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk

SGD = dict(lr=0.1, momentum=0.9)


def _make(name: str, params):
    if name == "SAM":
        return sk.SAM(params, torch.optim.SGD, rho=0.05, **SGD)
    if name == "ASAM":
        return sk.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, **SGD)
    if name == "SSSAM":
        return sk.SSSAM(params, torch.optim.SGD, rho=0.05, p=0.5, seed=3, **SGD)
    if name == "StableSAM":
        return sk.StableSAM(params, torch.optim.SGD, rho=0.05, **SGD)
    if name == "LookSAM":
        return sk.LookSAM(params, torch.optim.SGD, rho=0.05, k=2, **SGD)
    if name == "AESAM":
        return sk.AESAM(params, torch.optim.SGD, rho=0.05, total_steps=4, **SGD)
    if name == "AELookSAM":
        return sk.AELookSAM(params, torch.optim.SGD, rho=0.05, total_steps=4, **SGD)
    if name == "SparseSAM":
        return sk.SparseSAM(params, torch.optim.SGD, rho=0.05, sparsity=0.5, mask="random", update_unit="step",
                            seed=5, **SGD)
    if name == "ESAM":
        return sk.ESAM(params, torch.optim.SGD, rho=0.05, beta=0.6, seed=2, **SGD)
    if name == "GSAM":
        return sk.GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.4, **SGD)
    if name == "WSAM":
        return sk.WSAM(params, torch.optim.SGD, rho=0.05, gamma=0.9, **SGD)
    if name == "GCSAM":
        return sk.SAM(params, torch.optim.SGD, rho=0.05, use_gc=True, **SGD)
    raise KeyError(name)


VARIANTS = ("SAM", "ASAM", "SSSAM", "StableSAM", "LookSAM", "AESAM", "AELookSAM", "SparseSAM", "ESAM", "GSAM", "WSAM",
            "GCSAM")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def _steps(model, opt, n=2):
    """``n`` optimizer steps through ``step(closure)`` (ESAM's closure returns per-sample losses)."""
    x, y = _batch()
    for _ in range(n):
        opt.zero_grad()
        if isinstance(opt, sk.ESAM):
            opt.step(lambda idx=None: F.cross_entropy(model(x if idx is None else x[idx]),
                                                       y if idx is None else y[idx], reduction="none"))
            continue

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        closure().detach()
        opt.step(closure)


def _pre_hook(optimizer):
    optimizer.state["test"] = 1


def _post_hook(optimizer, state_dict):
    """torch's test: drop the pre-hook's entry again and say whether it was there."""
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


@pytest.mark.parametrize("variant", VARIANTS)
def test_input_09_pre_hook_adds_a_state_entry(variant):
    model = _model()
    opt = _make(variant, model.parameters())
    _steps(model, opt)
    opt.register_state_dict_pre_hook(_pre_hook)
    sd = opt.state_dict()
    assert sd["state"]["test"] == 1
    assert opt.state["test"] == 1
    # the parameters' entries are still there, indexed as torch.optim indexes them
    n = sum(1 for g in opt.param_groups for _ in g["params"])
    assert {k for k in sd["state"] if k != "test"} <= set(range(n))
    # and training goes on with the extra entry in optimizer.state (relayout, steps, saves)
    _steps(model, opt, 1)
    assert opt.state_dict()["state"]["test"] == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_input_09_pre_and_post_hook_together(variant):
    model = _model()
    opt = _make(variant, model.parameters())
    _steps(model, opt)
    opt.register_state_dict_pre_hook(_pre_hook)
    opt.register_state_dict_post_hook(_post_hook)
    sd = opt.state_dict()
    assert "test" not in sd["state"]
    assert sd["ran_state_dict_pre_hook"] is True


def test_input_09_reference_behaviour_of_torch_sgd():
    """What the variants are held to: torch.optim.SGD under the same hooks (so a torch change shows here)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), **SGD)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.register_state_dict_pre_hook(_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(_post_hook)
    sd = opt.state_dict()
    assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_input_09_load_hooks_return_new_dicts(variant):
    """torch's load hooks: a pre hook that edits in place, one that returns a new dict (which wins),
    and a post hook that records; then the loaded optimizer steps like the saved one."""
    model = _model()
    opt = _make(variant, model.parameters())
    _steps(model, opt)
    sd = opt.state_dict()

    def edit_in_place(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def return_new(optimizer, state_dict):
        new = copy.deepcopy(state_dict)
        assert new["param_groups"][0]["lr"] == 0.002  # the hooks run in order
        new["param_groups"][0]["lr"] = 0.003
        return new

    def post(optimizer):
        optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
        optimizer.state["ran_load_state_dict_post_hook"] = True

    model2 = copy.deepcopy(model)
    opt2 = _make(variant, model2.parameters())
    opt2.register_load_state_dict_pre_hook(edit_in_place)
    opt2.register_load_state_dict_pre_hook(return_new)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert opt2.state["ran_load_state_dict_pre_hook2"] is True
    assert opt2.state["ran_load_state_dict_post_hook"] is True
    assert opt2.param_groups[0]["lr"] == 0.003
    assert opt2.base_optimizer.param_groups[0]["lr"] == 0.003  # the groups stay shared
    assert sd["param_groups"][0]["lr"] == 0.002  # only the in-place hook touched the caller's dict

    # a state-dict post hook that returns a NEW dict: that dict is what state_dict() gives
    opt2.register_state_dict_post_hook(lambda o, s: {**s, "extra": "kept"})
    assert opt2.state_dict()["extra"] == "kept"
    # the hooks' non-parameter entries do not stop training, and the SAM state was loaded:
    # the same lr on both, the same next steps
    opt.param_groups[0]["lr"] = 0.003
    _steps(model, opt, 2)
    _steps(model2, opt2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
