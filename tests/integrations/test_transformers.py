"""transformers.Trainer -> SAMTrainer equals the manual SAM loop over the same micro-batches, and resumes bit-exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .common import assert_same_weights, make_data, make_net, make_sam, manual_steps

transformers = pytest.importorskip("transformers")
from sam_kernels.integrations.transformers import SAMTrainer  # noqa: E402

import sam_kernels as sk  # noqa: E402

BATCH, ACCUM, STEPS = 4, 2, 3


class Regressor(torch.nn.Module):
    def __init__(self, dtype=torch.float64, batchnorm=False):
        super().__init__()
        self.net = make_net(dtype, batchnorm=batchnorm)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class InOrder(SAMTrainer):
    """Batches in dataset order (the default sampler shuffles), so that the manual loop sees the same micro-batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                max_steps=STEPS, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.05,
                logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def trainer_groups(net):
    """The Trainer's param groups (weights, then biases: its weight-decay split), so norms sum in its order."""
    named = list(net.named_parameters())
    return [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.0},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]


def micro_steps(x, y, n_steps=STEPS):
    mbs = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, n_steps * ACCUM * BATCH, BATCH)]
    return [mbs[i:i + ACCUM] for i in range(0, len(mbs), ACCUM)]


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_accumulation_equals_manual_loop_float64(tmp_path, clip):
    x, y = make_data(STEPS * ACCUM * BATCH, torch.float64)
    model = Regressor()
    trainer = InOrder(model=model, args=args(tmp_path, max_grad_norm=clip), train_dataset=Rows(x, y),
                      sam_kwargs={"rho": 0.05})
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, sk.SAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.step_count == STEPS

    net = make_net(torch.float64)
    ref = sk.SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    manual_steps(net, ref, micro_steps(x, y), clip=clip)
    assert_same_weights(model.net, net, rtol=0, atol=1e-13)


def test_own_optimizer_and_scheduler_bf16(tmp_path):
    """optimizers=(SAM, scheduler) under bf16 autocast: the scheduler steps once per SAM step."""
    x, y = make_data(STEPS * ACCUM * BATCH)
    model = Regressor(torch.float32)
    opt = make_sam(model.parameters(), "adamw")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = InOrder(model=model, args=args(tmp_path, bf16=True), train_dataset=Rows(x, y), optimizers=(opt, sched))
    trainer.train()
    assert opt.param_groups[0]["lr"] == 0.01 * 0.5 ** STEPS

    net = make_net(torch.float32)
    ref = make_sam(net.parameters(), "adamw")
    manual_steps(net, ref, micro_steps(x, y), precision="bf16-mixed", clip=0.05,
                 sched=torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5))
    assert_same_weights(model.net, net, rtol=1e-6, atol=1e-7)


def test_checkpoint_resume_continues_bit_exactly(tmp_path):
    """AdamW base, linear schedule, shuffled batches: 6 steps straight = 3 steps, save, a new Trainer resumes."""
    x, y = make_data(6 * ACCUM * BATCH * 2, torch.float64)
    kw = dict(max_steps=6, optim="adamw_torch", learning_rate=0.01, lr_scheduler_type="linear", weight_decay=0.01)

    straight = Regressor()
    SAMTrainer(model=straight, args=args(tmp_path / "a", **kw), train_dataset=Rows(x, y),
               sam_kwargs={"rho": 0.05}).train()

    first = Regressor()
    SAMTrainer(model=first, args=args(tmp_path / "b", save_strategy="steps", save_steps=3, **kw),
               train_dataset=Rows(x, y), sam_kwargs={"rho": 0.05}).train()
    resumed = Regressor()
    trainer = SAMTrainer(model=resumed, args=args(tmp_path / "b", **kw), train_dataset=Rows(x, y),
                         sam_kwargs={"rho": 0.05})
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert trainer.optimizer.optimizer.step_count == 6
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), Regressor().parameters()))


def test_not_a_sam_optimizer_is_refused_before_any_change(tmp_path):
    x, y = make_data(STEPS * ACCUM * BATCH, torch.float64)
    model = Regressor()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="not a sam_kernels.SAM"):
        SAMTrainer(model=model, args=args(tmp_path), train_dataset=Rows(x, y), optimizers=(opt, None)).train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))




def test_policy_variant_and_batchnorm_equal_manual_loop(tmp_path):
    """sam_class=SSSAM (plain steps among SAM steps) on a BatchNorm model: statistics updated once per step."""
    x, y = make_data(5 * ACCUM * BATCH, torch.float64)
    model = Regressor(batchnorm=True)
    InOrder(model=model, args=args(tmp_path, max_steps=5), train_dataset=Rows(x, y), sam_class=sk.SSSAM,
            sam_kwargs={"rho": 0.05, "p": 0.5, "seed": 1}).train()
    net = make_net(torch.float64, batchnorm=True)
    ref = sk.SSSAM(trainer_groups(net), torch.optim.SGD, rho=0.05, p=0.5, seed=1, lr=0.1)
    manual_steps(net, ref, micro_steps(x, y, 5), clip=0.05)
    assert_same_weights(model.net, net, rtol=0, atol=1e-13)
    assert model.net[1].num_batches_tracked.item() == 5 * ACCUM


def test_esam_data_selection_is_refused_before_any_change(tmp_path):
    x, y = make_data(STEPS * ACCUM * BATCH, torch.float64)
    model = Regressor()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="ESAM with gamma=0.5"):
        SAMTrainer(model=model, args=args(tmp_path), train_dataset=Rows(x, y), sam_class=sk.ESAM,
                   sam_kwargs={"gamma": 0.5}).train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs fp16 (autocast + GradScaler) on GPUs only")
def test_fp16_grad_scaler_equals_manual_loop(tmp_path):
    """fp16 autocast + the accelerator's GradScaler (attached to SAM by SAMTrainer), clipped second pass."""
    x, y = make_data(STEPS * ACCUM * BATCH)
    model = Regressor(torch.float32)
    trainer = InOrder(model=model, args=args(tmp_path, fp16=True, use_cpu=False), train_dataset=Rows(x, y),
                      sam_kwargs={"rho": 0.05})
    trainer.train()
    scaler = trainer.accelerator.scaler
    assert scaler is not None and trainer.optimizer.optimizer.grad_scaler is scaler

    net = make_net(torch.float32).cuda()
    ref_scaler = torch.amp.GradScaler("cuda")
    ref = sk.SAM(trainer_groups(net), torch.optim.SGD, rho=0.05, lr=0.1, grad_scaler=ref_scaler)
    manual_steps(net, ref, micro_steps(x.cuda(), y.cuda()), precision="16-mixed", clip=0.05, scaler=ref_scaler)
    assert_same_weights(model.net, net, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == ref_scaler.get_scale()


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    """The Trainer's DDP (torch.distributed.run, gloo): the accelerate loader gives rank r the batches r, r + 2, ...
    of the in-order batches, so one global step covers 2 * ACCUM * BATCH contiguous samples."""
    from .common import launch
    from .launched import WORLD

    ranks = launch("transformers", tmp_path)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    x, y = make_data(WORLD * STEPS * ACCUM * BATCH, torch.float64)
    n = WORLD * ACCUM * BATCH
    net = make_net(torch.float64)
    manual_steps(net, sk.SAM(trainer_groups(net), torch.optim.SGD, rho=0.05, lr=0.1),
                 [[(x[s * n:(s + 1) * n], y[s * n:(s + 1) * n])] for s in range(STEPS)], clip=0.05)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-12)
