"""The documented accelerate loop equals the manual SAM loop over the same micro-batches; 2 processes stay identical."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .common import assert_same_weights, make_data, make_net, make_sam, manual_steps

accelerate = pytest.importorskip("accelerate")
from sam_kernels.integrations.accelerate import sam_optimizer, second_pass  # noqa: E402

import sam_kernels as sk  # noqa: E402

BATCH, ACCUM, STEPS = 4, 2, 3


def documented_loop(accelerator, model, opt, loader, loss_fn, max_norm):
    """The frameworks guide's Accelerate loop, as written there."""
    model, opt, loader = accelerator.prepare(model, opt, loader)
    sam = sam_optimizer(accelerator, opt)
    window = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))          # first pass, at w
            window.append((x, y))
            if accelerator.sync_gradients:                       # the window's last micro-batch
                if sam.wants_sam():                              # False: a plain step (SS-SAM, LookSAM, ...)
                    sam.first_step(zero_grad=True)
                    for x2, y2 in second_pass(accelerator, model, window):
                        accelerator.backward(loss_fn(model(x2), y2))  # second pass, at w + e
                accelerator.clip_grad_norm_(model.parameters(), max_norm)
                opt.step()                                       # second_step (or base_step)
                opt.zero_grad()
                window.clear()
    return sam


def fresh_accelerator(**kw):
    accelerate.state.AcceleratorState._reset_state(True)  # one process, several configurations
    return accelerate.Accelerator(cpu=True, **kw)


def loader_of(x, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def micro_steps(x, y):
    mbs = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    return [mbs[i:i + ACCUM] for i in range(0, len(mbs), ACCUM)]


@pytest.mark.parametrize("max_norm", [float("inf"), 0.05])
def test_loop_equals_manual_loop_float64(max_norm):
    x, y = make_data(STEPS * ACCUM * BATCH, torch.float64)
    net = make_net(torch.float64)
    opt = sk.SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sam = documented_loop(fresh_accelerator(gradient_accumulation_steps=ACCUM), net, opt, loader_of(x, y),
                          F.mse_loss, max_norm)
    assert sam is opt and sam.step_count == STEPS

    ref_net = make_net(torch.float64)
    ref = sk.SAM(ref_net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    manual_steps(ref_net, ref, micro_steps(x, y), clip=max_norm if max_norm < float("inf") else 0.0)
    assert_same_weights(net, ref_net, rtol=0, atol=1e-13)


def test_loop_bf16_equals_manual_loop():
    x, y = make_data(STEPS * ACCUM * BATCH)
    net = make_net()
    opt = sk.SAM(net.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, weight_decay=0.01)
    documented_loop(fresh_accelerator(gradient_accumulation_steps=ACCUM, mixed_precision="bf16"), net, opt,
                    loader_of(x, y), F.mse_loss, 0.05)

    ref_net = make_net()
    ref = sk.SAM(ref_net.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, weight_decay=0.01)
    manual_steps(ref_net, ref, micro_steps(x, y), precision="bf16-mixed", clip=0.05)
    assert_same_weights(net, ref_net, rtol=1e-6, atol=1e-7)



def test_policy_variant_and_batchnorm_equal_manual_loop():
    """SS-SAM (plain steps among SAM steps) on a BatchNorm model: statistics updated once per step."""
    x, y = make_data(5 * ACCUM * BATCH, torch.float64)
    net = make_net(torch.float64, batchnorm=True)
    documented_loop(fresh_accelerator(gradient_accumulation_steps=ACCUM), net, make_sam(net.parameters(), "sssam"),
                    loader_of(x, y), F.mse_loss, 0.05)
    ref_net = make_net(torch.float64, batchnorm=True)
    manual_steps(ref_net, make_sam(ref_net.parameters(), "sssam"), micro_steps(x, y), clip=0.05)
    assert_same_weights(net, ref_net, rtol=0, atol=1e-13)
    assert net[1].num_batches_tracked.item() == 5 * ACCUM



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs fp16 (autocast + GradScaler) on GPUs only")
def test_loop_fp16_grad_scaler_equals_manual_loop():
    x, y = make_data(STEPS * ACCUM * BATCH)
    net = make_net().cuda()
    opt = sk.SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    accelerate.state.AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACCUM, mixed_precision="fp16")
    sam = documented_loop(accelerator, net, opt, loader_of(x, y), F.mse_loss, 0.05)
    assert accelerator.scaler is not None and sam.grad_scaler is accelerator.scaler

    ref_net = make_net().cuda()
    scaler = torch.amp.GradScaler("cuda")
    ref = sk.SAM(ref_net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, grad_scaler=scaler)
    manual_steps(ref_net, ref, micro_steps(x.cuda(), y.cuda()), precision="16-mixed", clip=0.05, scaler=scaler)
    assert_same_weights(net, ref_net, rtol=1e-6, atol=1e-7)
    assert accelerator.scaler.get_scale() == scaler.get_scale()


def test_sam_optimizer_refuses_other_optimizers_and_esam_data_selection():
    net = make_net()
    with pytest.raises(TypeError, match="not a sam_kernels.SAM"):
        sam_optimizer(fresh_accelerator(), torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="ESAM with gamma=0.5"):
        sam_optimizer(fresh_accelerator(), sk.ESAM(net.parameters(), torch.optim.SGD, gamma=0.5, lr=0.1))


def test_two_processes_stay_identical_and_equal_one_process(tmp_path):
    """accelerate under torch.distributed.run (gloo): the prepared loader gives rank r the batches r, r + 2, ...,
    so one global step covers 2 * ACCUM * BATCH contiguous samples."""
    from .common import launch
    from .launched import WORLD

    ranks = launch("accelerate", tmp_path)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    x, y = make_data(WORLD * STEPS * ACCUM * BATCH, torch.float64)
    n = WORLD * ACCUM * BATCH
    net = make_net(torch.float64)
    manual_steps(net, sk.SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
                 [[(x[s * n:(s + 1) * n], y[s * n:(s + 1) * n])] for s in range(STEPS)], clip=0.05)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-12)


def test_docs_loop_as_written(monkeypatch):
    """The Accelerate block of the frameworks guide, executed verbatim (bf16 on CPU), = the manual loop."""
    from tests.docs_blocks import python_blocks

    [block] = python_blocks("guides/frameworks.md", "## Accelerate")
    real = accelerate.Accelerator
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: real(cpu=True, **kw))  # what the block imports
    x, y = make_data(STEPS * ACCUM * BATCH)
    model = make_net()
    accelerate.state.AcceleratorState._reset_state(True)
    scope = {"sk": sk, "torch": torch,
             "model": model, "loss_fn": F.mse_loss, "loader": loader_of(x, y)}
    exec(compile(block, "docs/guides/frameworks.md (Accelerate)", "exec"), scope)
    assert scope["sam"].step_count == STEPS

    ref_net = make_net()
    manual_steps(ref_net, sk.SAM(ref_net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1), micro_steps(x, y),
                 precision="bf16-mixed", clip=1.0)
    assert_same_weights(model, ref_net, rtol=1e-6, atol=1e-7)
