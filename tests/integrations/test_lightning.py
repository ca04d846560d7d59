"""Lightning's Trainer with sam_kernels.integrations.lightning equals the manual first_step/second_step loop."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from .common import assert_same_weights, make_data, make_net, make_sam, manual_steps

L = pytest.importorskip("lightning.pytorch")
from sam_kernels.integrations.lightning import SAMMixedPrecision, SAMPrecision, sam_precision  # noqa: E402

STEPS, BATCH = 5, 4
# Warnings that are not about the optimizer: this test's one-process loaders and tiny dataset, and
# Lightning 2.6's own use of a torch.utils._pytree API that torch 2.14 deprecates.
SETUP_WARNINGS = [r"does not have many workers", r"The number of training batches .* is smaller than the logging",
                  r"isinstance\(treespec, LeafSpec\)` is deprecated"]


class Module(L.LightningModule):
    def __init__(self, net, base="sgd", gamma=0.5):
        super().__init__()
        self.net, self.base, self.gamma = net, base, gamma
        self.lrs = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        opt = make_sam(self.parameters(), self.base)  # "sgd", "adamw" or "sssam" (tests/integrations/common.py)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(module, x, y, plugin, **trainer_kw):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(max_steps=STEPS, plugins=[plugin], accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, **trainer_kw)
        trainer.fit(module, loader)
    unexpected = [w for w in caught if not any(re.search(p, str(w.message)) for p in SETUP_WARNINGS)]
    assert not unexpected, [f"{w.category.__name__}: {w.message}" for w in unexpected]
    return trainer


def reference(dtype, precision, base, clip=0.0, gamma=0.5, scaler=None):
    x, y = make_data(STEPS * BATCH, dtype)
    net = make_net(dtype)
    opt = make_sam(net.parameters(), base, **({"grad_scaler": scaler} if scaler is not None else {}))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    steps = [[(x[i:i + BATCH], y[i:i + BATCH])] for i in range(0, STEPS * BATCH, BATCH)]
    manual_steps(net, opt, steps, precision=precision, clip=clip, sched=sched, scaler=scaler)
    return net, opt


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_32_true_equals_manual_loop_float64(base, clip):
    module = Module(make_net(torch.float64), base)
    fit(module, *make_data(STEPS * BATCH, torch.float64), sam_precision("32-true"), gradient_clip_val=clip or None)
    net, opt = reference(torch.float64, "32-true", base, clip=clip)
    assert_same_weights(module.net, net, rtol=0, atol=1e-13)
    assert module.lrs == [0.1 * 0.5 ** (i + 1) if base == "sgd" else 0.01 * 0.5 ** (i + 1) for i in range(STEPS)]
    assert module.trainer.optimizers[0].step_count == opt.step_count == STEPS


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_input_10_without_the_plugin_refuses_before_any_step(precision):
    """Automatic optimization without sam_precision: Lightning's own plugin would make the previous step's
    gradients SAM's first pass (32-true, bf16-mixed: step(closure) with them present) or end a step that
    never began (16-mixed: scaler.step(opt)). Either way the first step raises, naming the plugin, and
    no weight has moved."""
    module = Module(make_net(torch.float64 if precision == "32-true" else torch.float32))
    before = [p.detach().clone() for p in module.net.parameters()]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*make_data(STEPS * BATCH, before[0].dtype)),
                                         batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's setup warnings (see SETUP_WARNINGS); the error is the point
        trainer = L.Trainer(max_steps=STEPS, precision=precision, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with pytest.raises((RuntimeError, ValueError), match=r"sam_precision"):
            trainer.fit(module, loader)
    assert all(torch.equal(p, w) for p, w in zip(module.net.parameters(), before))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_bf16_mixed_equals_manual_loop(base):
    module = Module(make_net(), base)
    fit(module, *make_data(STEPS * BATCH), sam_precision("bf16-mixed", device="cpu"), gradient_clip_val=0.05)
    net, _ = reference(torch.float32, "bf16-mixed", base, clip=0.05)
    assert_same_weights(module.net, net, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_16_mixed_with_grad_scaler_equals_manual_loop(clip):
    plugin = SAMMixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    module = Module(make_net())
    fit(module, *make_data(STEPS * BATCH), plugin, gradient_clip_val=clip or None)
    assert module.trainer.optimizers[0].grad_scaler is plugin.scaler
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    net, _ = reference(torch.float32, "16-mixed", "sgd", clip=clip, scaler=scaler)
    assert_same_weights(module.net, net, rtol=1e-6, atol=1e-7)
    assert plugin.scaler.get_scale() == scaler.get_scale()


def test_16_mixed_overflow_skips_the_step_and_backs_off():
    plugin = SAMMixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 60))
    module = Module(make_net(), gamma=1.0)
    before = [p.detach().clone() for p in module.parameters()]
    x, y = make_data(BATCH)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    L.Trainer(max_steps=1, plugins=[plugin], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # fp16 Inf at scale 2^60: skipped
    assert plugin.scaler.get_scale() == 2.0 ** 59


def test_accumulate_grad_batches_is_refused_before_any_change():
    module = Module(make_net())
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 is not supported"):
        fit(module, *make_data(STEPS * BATCH), SAMPrecision(), accumulate_grad_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_sam_precision_names():
    assert isinstance(sam_precision(), SAMPrecision)
    assert sam_precision("bf16-mixed", "cpu").precision == "bf16-mixed"
    with pytest.raises(ValueError, match="'32-true', 'bf16-mixed' or '16-mixed'"):
        sam_precision("64-true")


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    from .common import global_steps, launch
    from .launched import BATCH as B, STEPS as S, WORLD as W

    ranks = launch("lightning", tmp_path)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    x, y = make_data(W * S * B, torch.float64)
    net = make_net(torch.float64)
    manual_steps(net, make_sam(net.parameters()), global_steps(x, y, W, S, B), clip=0.05)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-12)


def test_policy_variant_and_batchnorm_equal_manual_loop():
    """SS-SAM (plain steps among SAM steps) on a BatchNorm model: statistics updated once per step."""
    module = Module(make_net(torch.float64, batchnorm=True), "sssam")
    fit(module, *make_data(STEPS * BATCH, torch.float64), sam_precision(), gradient_clip_val=0.05)
    x, y = make_data(STEPS * BATCH, torch.float64)
    net = make_net(torch.float64, batchnorm=True)
    opt = make_sam(net.parameters(), "sssam")
    manual_steps(net, opt, [[(x[i:i + BATCH], y[i:i + BATCH])] for i in range(0, STEPS * BATCH, BATCH)], clip=0.05,
                 sched=torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    assert_same_weights(module.net, net, rtol=0, atol=1e-13)
    assert module.net[1].num_batches_tracked.item() == STEPS


def test_esam_data_selection_is_refused_before_any_change():
    import sam_kernels as sk

    class ESAMModule(Module):
        def configure_optimizers(self):
            return sk.ESAM(self.parameters(), torch.optim.SGD, gamma=0.5, lr=0.1)

    module = ESAMModule(make_net())
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="ESAM with gamma=0.5"):
        fit(module, *make_data(STEPS * BATCH), sam_precision())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))



def test_checkpoint_resume_continues_bit_exactly(tmp_path):
    """AdamW base + step scheduler: 6 steps straight (2 epochs of 3 batches; ModelCheckpoint saves at the end of
    each) = a new Trainer resumed from the first epoch's checkpoint (fit(ckpt_path=...)): optimizer state, SAM
    state and scheduler restored exactly. The 3 batches are equal: Lightning 2.6.6 itself feeds a resumed run
    other batches than the straight one (it counts the resumed epoch as unfinished, then starts a new one; seen
    with a plain DataLoader, independent of the optimizer), which is no concern of the optimizer's."""
    x, y = make_data(BATCH, torch.float64)
    x, y = x.repeat(3, 1), y.repeat(3, 1)

    def trainer(**kw):
        return L.Trainer(max_steps=6, plugins=[sam_precision()], accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.05, **kw)

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)

    straight = Module(make_net(torch.float64), "adamw", gamma=0.9)
    save = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    trainer(callbacks=[save]).fit(straight, loader())
    resumed = Module(make_net(torch.float64), "adamw", gamma=0.9)
    t = trainer(enable_checkpointing=False)
    t.fit(resumed, loader(), ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert t.optimizers[0].step_count == 6 and t.global_step == 6
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert straight.lrs[-1] == resumed.lrs[-1] == pytest.approx(0.01 * 0.9 ** 6, rel=1e-12)
