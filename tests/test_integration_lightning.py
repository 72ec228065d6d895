"""sslkernels.integrations.lightning.MomentumUpdate in a real Lightning fit (CPU)."""
import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning", reason="PyTorch Lightning is not installed (lightly brings it)")

import sslkernels  # noqa: E402
from sslkernels.integrations.lightning import MomentumUpdate  # noqa: E402
from sslkernels.state import scheduled_momentum  # noqa: E402


class _BYOLish(pl.LightningModule):
    def __init__(self, total_steps):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
        self.teacher = sslkernels.MomentumEncoder(self.student, 0.9, total_steps=total_steps)
        self.history = []  # the student's parameters after every optimizer step

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return -torch.nn.functional.cosine_similarity(self.student(x), self.teacher(x).detach()).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step > len(self.history):
            self.history.append([p.detach().clone() for p in self.student.parameters()])

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_teacher_follows_the_scheduled_ema_of_each_optimizer_step(accumulate):
    torch.manual_seed(0)
    steps = 5
    model = _BYOLish(total_steps=steps)
    expected = [p.detach().clone() for p in model.student.parameters()]  # the teacher starts as a copy
    callback = MomentumUpdate(teacher="teacher", student="student")
    data = torch.utils.data.TensorDataset(torch.randn(96, 6, generator=torch.Generator().manual_seed(0)))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                         callbacks=[callback])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == steps and len(model.history) == steps
    for i, student in enumerate(model.history):
        m = float(scheduled_momentum(torch.tensor(i), 0.9, 1.0, steps, "cosine"))
        expected = [m * t + (1 - m) * s for t, s in zip(expected, student)]
    for t, e in zip(model.teacher.module.parameters(), expected):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)
    assert int(model.teacher.step) == steps


def test_wrong_attribute_names_fail_before_training():
    model = _BYOLish(total_steps=3)
    with pytest.raises(AttributeError, match="no attribute 'online'"):
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[MomentumUpdate(teacher="teacher", student="online")])
        trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 6)), batch_size=8))
    with pytest.raises(TypeError, match="MomentumEncoder"):
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[MomentumUpdate(teacher="student", student="student")])
        trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 6)), batch_size=8))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_resumed_fit_gives_the_teacher_of_an_uninterrupted_one(accumulate, tmp_path):
    # With gradient accumulation the first micro-batch after a resume takes no optimizer step: it must not
    # repeat the last update (the callback's marker is not in the checkpoint; global_step is).
    steps = []

    class Spy(sslkernels.MomentumEncoder):
        def update_(self, module, step=None, **kw):
            steps.append(int(step))
            return super().update_(module, step, **kw)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.student = nn.Linear(4, 4)
            self.teacher = Spy(self.student, 0.9, total_steps=20)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.student(x).pow(2).mean() + 0.1 * self.teacher(x).detach().sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.student.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    kw = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accumulate_grad_batches=accumulate, num_sanity_val_steps=0)

    def fit(model, epochs, ckpt_path=None):
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[MomentumUpdate("teacher", "student")], **kw)
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2), ckpt_path=ckpt_path)
        return trainer

    whole = Module()
    fit(whole, 2)
    want_steps, steps[:] = list(steps), []
    first = Module()
    fit(first, 1).save_checkpoint(str(tmp_path / "epoch1.ckpt"))
    resumed = Module()
    fit(resumed, 2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert steps == want_steps, "the updates of both halves are the uninterrupted run's, once each"
    for a, b in zip(whole.teacher.parameters(), resumed.teacher.parameters()):
        assert torch.equal(a, b)
