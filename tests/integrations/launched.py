"""One rank of a 2-process CPU (gloo) run under ``torch.distributed.run``; saves its final weights.

``python -m torch.distributed.run --nproc_per_node 2 tests/integrations/launched.py FRAMEWORK OUT_DIR``
with FRAMEWORK one of ``lightning``, ``transformers``, ``accelerate``. Each rank trains on its
slice of ``make_data(WORLD * STEPS * BATCH)`` (sample ``i`` goes to rank ``i % WORLD``), so a global
step covers the contiguous samples ``[WORLD * BATCH * s, WORLD * BATCH * (s + 1))``: the reference
is one process on those.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.integrations.common import make_data, make_net, make_sam  # noqa: E402

WORLD, STEPS, BATCH = 2, 3, 4


def lightning(out: str) -> None:
    import lightning.pytorch as L

    from sam_kernels.integrations.lightning import sam_precision

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(torch.float64)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return make_sam(self.parameters())

    module = Module()
    trainer = L.Trainer(max_steps=STEPS, strategy="ddp", accelerator="cpu", devices=WORLD, plugins=[sam_precision()],
                        gradient_clip_val=0.05, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, my_slice(torch.float64))
    save(module.net, out)


def transformers(out: str) -> None:
    """SAMTrainer under the Trainer's own DDP setup (gloo on CPU), 2 micro-batches per step, clipped."""
    import tempfile

    from transformers import TrainingArguments

    from tests.integrations.test_transformers import ACCUM, InOrder, Regressor, Rows

    x, y = make_data(WORLD * STEPS * ACCUM * BATCH, torch.float64)
    model = Regressor()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.05, logging_strategy="no",
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=Rows(x, y), sam_kwargs={"rho": 0.05})
    assert trainer.args.world_size == WORLD, trainer.args.world_size
    trainer.train()
    save(model.net, out)


def accelerate(out: str) -> None:
    """The documented accelerate loop on 2 processes (gloo on CPU), 2 micro-batches per step, clipped."""
    import accelerate as acc

    from tests.integrations.test_accelerate import ACCUM, documented_loop, loader_of

    accelerator = acc.Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    assert accelerator.num_processes == WORLD, accelerator.num_processes
    x, y = make_data(WORLD * STEPS * ACCUM * BATCH, torch.float64)
    net = make_net(torch.float64)
    opt = make_sam(net.parameters())
    documented_loop(accelerator, net, opt, loader_of(x, y), F.mse_loss, 0.05)
    save(net, out)


def my_slice(dtype) -> torch.utils.data.DataLoader:
    """This rank's samples, in order (an explicit slice: Lightning's own DistributedSampler shuffles)."""
    rank = int(os.environ["RANK"])
    x, y = make_data(WORLD * STEPS * BATCH, dtype)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[rank::WORLD], y[rank::WORLD]), batch_size=BATCH)


def save(net: torch.nn.Module, out: str) -> None:
    rank = int(os.environ["RANK"])
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    {"lightning": lightning, "transformers": transformers, "accelerate": accelerate}[sys.argv[1]](sys.argv[2])
    # An orderly teardown: a rank that exits while the other still holds its gloo connections was
    # seen to abort once on a loaded machine ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
