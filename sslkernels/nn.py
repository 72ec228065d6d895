"""nn.Module wrappers over sslkernels.functional.

Where a popular library has a class for the same job, the constructor and ``forward`` also accept that
library's signature (lightly's NTXentLoss / DCLLoss / BarlowTwinsLoss / VICRegLoss /
NegativeCosineSimilarity / DINOLoss / SwaVLoss, OpenCLIP's ClipLoss, the official DINO DINOLoss), with the
same numbers.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as Fn
from .state import MemoryQueue

__all__ = [
    "InfoNCELoss", "NTXentLoss", "ClipLoss", "MoCoLoss", "SupConLoss", "DCLLoss", "DINOLoss",
    "NegativeCosineSimilarity", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss",
]


class _Loss(nn.Module):
    def __init__(self, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        self.reduction, self.backend = reduction, backend


class InfoNCELoss(_Loss):
    """``info_nce`` as a module: forward(query, key, targets=None)."""

    def __init__(self, temperature: Union[float, torch.Tensor] = 0.1, *, symmetric: bool = False,
                 decoupled: bool = False, reduction: str = "mean", gather_distributed: bool = False,
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.temperature, self.symmetric, self.decoupled = temperature, symmetric, decoupled
        self.gather_distributed = gather_distributed

    def forward(self, query, key, targets=None):
        return Fn.info_nce(query, key, self.temperature, targets=targets, symmetric=self.symmetric,
                           decoupled=self.decoupled, reduction=self.reduction,
                           gather_distributed=self.gather_distributed, backend=self.backend)


class NTXentLoss(_Loss):
    """SimCLR's loss with lightly's signature: NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False).

    As lightly's, it L2-normalizes its inputs (``normalize=False`` to skip). With ``memory_bank_size > 0``
    it follows lightly's bank semantics: out0 is contrasted one-directionally against out1 and the bank
    (the bank as it was before this step), then out1 is enqueued when out0 requires grad.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: int = 0, gather_distributed: bool = False, *,
                 decoupled: bool = False, normalize: bool = True, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        if isinstance(memory_bank_size, (tuple, list)):  # lightly >= 1.5 also accepts (size, dim)
            memory_bank_size = memory_bank_size[0]
        if isinstance(memory_bank_size, bool) or not isinstance(memory_bank_size, int) or memory_bank_size < 0:
            raise ValueError(f"memory_bank_size must be a non-negative int, got {memory_bank_size!r}")
        self.temperature, self.memory_bank_size = temperature, memory_bank_size
        self.gather_distributed, self.decoupled, self.normalize = gather_distributed, decoupled, normalize
        self.bank: Optional[MemoryQueue] = None

    def forward(self, out0, out1):
        if self.normalize:
            out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        if self.memory_bank_size == 0:
            return Fn.nt_xent(out0, out1, self.temperature, decoupled=self.decoupled, reduction=self.reduction,
                              gather_distributed=self.gather_distributed, backend=self.backend)
        if self.decoupled:
            raise ValueError("decoupled=True is not available with a memory bank")
        if self.bank is None:  # the feature width is known only now
            self.bank = MemoryQueue(self.memory_bank_size, out1.shape[1], dtype=out1.dtype, device=out1.device)
        loss = Fn.moco_loss(out0, out1, self.bank.queue.clone(), self.temperature, reduction=self.reduction,
                            gather_distributed=self.gather_distributed, backend=self.backend)
        if out0.requires_grad:
            self.bank.enqueue_(out1)
        return loss


class DCLLoss(NTXentLoss):
    """Decoupled contrastive loss (Yeh et al.) with lightly's signature: DCLLoss(temperature=0.1, weight_fn=None,
    gather_distributed=False). Inputs are L2-normalized as lightly does."""

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False, *,
                 reduction: str = "mean", backend: Optional[str] = None):
        if weight_fn is not None:
            raise NotImplementedError("DCLLoss(weight_fn=...) (DCLW) is not implemented yet; use weight_fn=None")
        super().__init__(temperature, 0, gather_distributed, decoupled=True, reduction=reduction, backend=backend)


class ClipLoss(_Loss):
    """CLIP's symmetric loss with OpenCLIP's signature; forward(image_features, text_features, logit_scale,
    output_dict=False) where ``logit_scale`` is already exponentiated."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: sslkernels scales out with torch.distributed")
        self.local_loss, self.gather_with_grad, self.world_size = local_loss, gather_with_grad, world_size

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        loss = Fn.clip_loss(image_features, text_features, logit_scale, reduction=self.reduction,
                            gather_distributed=self.world_size > 1, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class MoCoLoss(_Loss):
    """``moco_loss`` as a module: forward(query, key, queue) where queue is a tensor or a MemoryQueue."""

    def __init__(self, temperature: Union[float, torch.Tensor] = 0.2, *, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.temperature = temperature

    def forward(self, query, key, queue):
        return Fn.moco_loss(query, key, queue, self.temperature, reduction=self.reduction, backend=self.backend)


class SupConLoss(_Loss):
    """``supcon_loss`` as a module: forward(features, labels)."""

    def __init__(self, temperature: Union[float, torch.Tensor] = 0.1, *, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.temperature = temperature

    def forward(self, features, labels):
        return Fn.supcon_loss(features, labels, self.temperature, reduction=self.reduction, backend=self.backend)


class NegativeCosineSimilarity(_Loss):
    """BYOL / SimSiam loss with lightly's signature NegativeCosineSimilarity(dim=1, eps=1e-8); forward(x0, x1).

    Unlike lightly's, the stop-gradient on x1 is built in (as ``negative_cosine_similarity``)."""

    def __init__(self, dim: int = 1, eps: float = 1e-8, *, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(reduction, backend)
        if dim not in (1, -1):
            raise ValueError(f"dim must be 1 (features along dim 1), got {dim!r}")

    def forward(self, x0, x1):
        return Fn.negative_cosine_similarity(x0, x1, reduction=self.reduction, backend=self.backend)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins with lightly's signature BarlowTwinsLoss(lambda_param=5e-3, gather_distributed=False)."""

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        if gather_distributed:
            raise NotImplementedError("BarlowTwinsLoss(gather_distributed=True) is not implemented yet")
        self.lambda_param, self.backend = lambda_param, backend

    def forward(self, z_a, z_b):
        return Fn.barlow_twins_loss(z_a, z_b, self.lambda_param, backend=self.backend)


class VICRegLoss(nn.Module):
    """VICReg with lightly's signature VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0, ...):
    lambda = invariance (sim) weight, mu = variance weight, nu = covariance weight."""

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 1e-4, *, backend: Optional[str] = None):
        super().__init__()
        if gather_distributed:
            raise NotImplementedError("VICRegLoss(gather_distributed=True) is not implemented yet")
        if eps != 1e-4:
            raise ValueError(f"eps must be 1e-4 (VICReg's reference value), got {eps!r}")
        self.sim_weight, self.var_weight, self.cov_weight, self.backend = lambda_param, mu_param, nu_param, backend

    def forward(self, z_a, z_b):
        return Fn.vicreg_loss(z_a, z_b, self.sim_weight, self.var_weight, self.cov_weight, backend=self.backend)


def _official_dino(out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                   warmup_teacher_temp_epochs: int = 0, nepochs: int = 1, student_temp: float = 0.1,
                   center_momentum: float = 0.9):
    """facebookresearch/dino's DINOLoss (defaults added where the official code has none)."""


def _lightly_dino(output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                  warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                  center_mode: str = "mean"):
    """lightly.loss.DINOLoss."""


class DINOLoss(_Loss):
    """DINO's loss with both popular signatures, told apart by the arguments:

    - official DINO: ``DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
      nepochs, student_temp=0.1, center_momentum=0.9)`` (an int ``ncrops`` second, or ``out_dim=`` / ``ncrops=``);
      ``forward(student_output, teacher_output, epoch)`` on crop-stacked tensors. Centre buffer 1×P.
    - lightly: ``DINOLoss(output_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.04,
      warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9, center_mode="mean")``;
      ``forward(teacher_out, student_out, teacher_temp=None, epoch=None)`` on lists of per-crop tensors
      (teacher first). Centre buffer 1×1×P, as lightly's state dicts.

    ``forward`` dispatches on its first argument (a list: lightly's form, a tensor: the official one). Both
    return the loss with the centre from before the step, then update the centre from the teacher output.
    Keyword-only extras: ``n_global_crops`` (official form: teacher crops in ``teacher_output``),
    ``async_center=True`` (DINOv2: the centre's all-reduce runs in the background and is applied at the next
    forward, or by ``apply_center_update()``), ``reduction``, ``backend``.
    """

    def __init__(self, *args, n_global_crops: int = 2, async_center: bool = False, reduction: str = "mean",
                 backend: Optional[str] = None, **kwargs):
        super().__init__(reduction, backend)
        second = args[1] if len(args) > 1 else None
        official = ("ncrops" in kwargs or "out_dim" in kwargs
                    or (isinstance(second, int) and not isinstance(second, bool)))
        sig = inspect.signature(_official_dino if official else _lightly_dino)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"DINOLoss takes the official DINO signature {inspect.signature(_official_dino)} or "
                            f"lightly's {inspect.signature(_lightly_dino)}: {err}") from None
        bound.apply_defaults()
        a = bound.arguments
        self.n_global_crops, self.async_center = n_global_crops, bool(async_center)
        self.student_temp, self.center_momentum = a["student_temp"], a["center_momentum"]
        self.teacher_temp = a["teacher_temp"]
        self.warmup_teacher_temp_epochs = int(a["warmup_teacher_temp_epochs"])
        warm = torch.linspace(a["warmup_teacher_temp"], a["teacher_temp"], self.warmup_teacher_temp_epochs,
                              dtype=torch.float64).tolist()
        if official:
            self.ncrops = a["ncrops"]
            self.register_buffer("center", torch.zeros(1, a["out_dim"]))
            # Linear warm-up of the teacher temperature, then constant (the official schedule).
            self.teacher_temp_schedule = warm + [a["teacher_temp"]] * max(a["nepochs"] - len(warm), 1)
        else:
            if a["center_mode"] != "mean":
                raise ValueError(f"center_mode must be 'mean' (lightly's only mode), got {a['center_mode']!r}")
            self.ncrops = None
            self.register_buffer("center", torch.zeros(1, 1, a["output_dim"]))
            self.teacher_temp_schedule = warm + [a["teacher_temp"]]
        self._pending = None

    def _temperature(self, epoch) -> float:
        if epoch is None:
            return self.teacher_temp
        return self.teacher_temp_schedule[min(int(epoch), len(self.teacher_temp_schedule) - 1)]

    def forward(self, *args, **kwargs):
        first = args[0] if args else kwargs.get("teacher_out", kwargs.get("student_output"))
        if isinstance(first, (list, tuple)):
            return self._forward_lightly(*args, **kwargs)
        return self._forward_official(*args, **kwargs)

    def _forward_official(self, student_output, teacher_output, epoch: int = 0):
        b = teacher_output.shape[0] // self.n_global_crops
        if self.ncrops is not None and student_output.shape[0] != self.ncrops * b:
            raise ValueError(f"student_output has {student_output.shape[0]} rows; ncrops={self.ncrops} crops of the "
                             f"batch size {b} make {self.ncrops * b}")
        return self._loss_and_update(student_output, teacher_output, self._temperature(epoch), self.n_global_crops)

    def _forward_lightly(self, teacher_out, student_out, teacher_temp=None, epoch=None):
        if not isinstance(student_out, (list, tuple)):
            raise TypeError("student_out must be a list of per-crop tensors, as teacher_out (lightly's signature)")
        if not teacher_out or not student_out:
            raise ValueError("teacher_out and student_out must each hold at least one crop")
        temp = teacher_temp if teacher_temp is not None else (
            self._temperature(epoch) if epoch is not None and epoch < self.warmup_teacher_temp_epochs
            else self.teacher_temp)
        return self._loss_and_update(torch.cat(list(student_out)), torch.cat(list(teacher_out)), temp,
                                     len(teacher_out))

    def _loss_and_update(self, student, teacher, teacher_temp, n_global):
        self.apply_center_update()
        if self.center.device != teacher.device:
            self.center = self.center.to(teacher.device)
        loss = Fn.dino_loss(student, teacher, self.center.reshape(1, -1), student_temp=self.student_temp,
                            teacher_temp=teacher_temp, n_global_crops=n_global, reduction=self.reduction,
                            backend=self.backend)
        self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output) -> None:
        """EMA of the centre towards the teacher output's mean row (over all ranks when distributed)."""
        if isinstance(teacher_output, (list, tuple)):
            teacher_output = torch.cat(list(teacher_output))
        teacher_output = teacher_output.detach().reshape(-1, self.center.shape[-1])
        self.apply_center_update()
        self._pending = Fn.update_center_(self.center, teacher_output, self.center_momentum,
                                          async_op=self.async_center, backend=self.backend)
        if not self.async_center:
            self._pending = None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Finish a pending asynchronous centre update (DINOv2's name); nothing when none is pending."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()


class SwaVLoss(nn.Module):
    """SwaV with lightly's signature: SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05,
    sinkhorn_gather_distributed=False); forward(high_resolution_outputs, low_resolution_outputs,
    queue_outputs=None) on lists of per-crop prototype scores. See ``functional.swav_loss``."""

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.sinkhorn_iterations = temperature, sinkhorn_iterations
        self.sinkhorn_epsilon, self.sinkhorn_gather_distributed = sinkhorn_epsilon, sinkhorn_gather_distributed
        self.backend = backend

    def subloss(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """lightly's per-pair term: −mean_b Σ_p q·log_softmax(z/τ)."""
        return -torch.mean(torch.sum(q * F.log_softmax(z / self.temperature, dim=1), dim=1))

    def forward(self, high_resolution_outputs, low_resolution_outputs=(), queue_outputs=None):
        return Fn.swav_loss(high_resolution_outputs, low_resolution_outputs, temperature=self.temperature,
                            epsilon=self.sinkhorn_epsilon, iterations=self.sinkhorn_iterations,
                            queue_outputs=queue_outputs, gather_distributed=self.sinkhorn_gather_distributed,
                            backend=self.backend)
