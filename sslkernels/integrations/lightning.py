"""A PyTorch Lightning callback that keeps an EMA teacher (BYOL, MoCo, DINO) in step with its student.

    from sslkernels import MomentumEncoder
    from sslkernels.integrations.lightning import MomentumUpdate

    class BYOL(LightningModule):
        def __init__(self):
            super().__init__()
            self.online = nn.Sequential(backbone, projector)
            self.target = MomentumEncoder(self.online, 0.996, total_steps=steps)   # frozen copy
        ...
    Trainer(callbacks=[MomentumUpdate(teacher="target", student="online")]).fit(BYOL())

After every optimizer step (``on_train_batch_end``) it calls ``teacher.update_(student, step)`` with
Lightning's ``global_step`` as the schedule's step, so a resumed fit continues the momentum schedule where
it stopped (the teacher's weights are module state and are checkpointed with the LightningModule). The
update is sslkernels' fused ``ema_update_``: one launch for the whole parameter list on the GPU, no host
sync. Gradient accumulation: the teacher moves once per optimizer step, not per micro-batch.

Importing this module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``); importing
sslkernels does not.
"""
from __future__ import annotations

from typing import Optional

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package (what lightly installs)
    from pytorch_lightning import Callback

from ..state import MomentumEncoder

__all__ = ["MomentumUpdate"]


class MomentumUpdate(Callback):
    """EMA-update ``pl_module.<teacher>`` (a MomentumEncoder) from ``pl_module.<student>`` after each optimizer step.

    backend: as for ema_update_ (default: the process default, "auto").
    """

    def __init__(self, teacher: str = "teacher", student: str = "student", *, backend: Optional[str] = None):
        super().__init__()
        for name, value in (("teacher", teacher), ("student", student)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be the attribute name of a submodule, got {value!r}")
        self.teacher, self.student, self.backend = teacher, student, backend
        self._last_step: Optional[int] = None

    def _modules(self, pl_module):
        missing = [n for n in (self.teacher, self.student) if not hasattr(pl_module, n)]
        if missing:
            raise AttributeError(f"MomentumUpdate: {type(pl_module).__name__} has no attribute {missing[0]!r}")
        teacher, student = getattr(pl_module, self.teacher), getattr(pl_module, self.student)
        if not isinstance(teacher, MomentumEncoder):
            raise TypeError(f"MomentumUpdate: {self.teacher!r} must be an sslkernels.MomentumEncoder, "
                            f"got {type(teacher).__name__}")
        return teacher, student

    def on_fit_start(self, trainer, pl_module) -> None:
        self._modules(pl_module)  # a wrong attribute name fails before the first step, not after it

    def on_train_start(self, trainer, pl_module) -> None:
        # The optimizer steps already taken (a resumed fit restores global_step before this): the teacher has had
        # their updates, and the first micro-batch after a resume with gradient accumulation must not repeat the
        # last one (a checkpoint does not hold this callback's marker).
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if step == self._last_step or step == 0:
            return  # an accumulation micro-batch (no optimizer step since the last call), or none yet
        self._last_step = step
        teacher, student = self._modules(pl_module)
        # The momentum of the step just taken (0-based), as a training loop calling update_(student, i) uses.
        teacher.update_(student, step - 1, backend=self.backend)
