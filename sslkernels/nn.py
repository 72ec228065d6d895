"""nn.Module wrappers over sslkernels.functional.

Where a popular library has a class for the same job, the constructor and ``forward`` also accept that
library's signature (lightly's NTXentLoss / DCLLoss / BarlowTwinsLoss / VICRegLoss /
NegativeCosineSimilarity, OpenCLIP's ClipLoss, the official DINO DINOLoss), with the same numbers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as Fn
from .state import MemoryQueue

__all__ = [
    "InfoNCELoss", "NTXentLoss", "ClipLoss", "MoCoLoss", "SupConLoss", "DCLLoss", "DINOLoss",
    "NegativeCosineSimilarity", "BarlowTwinsLoss", "VICRegLoss",
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


class DINOLoss(_Loss):
    """DINO's loss with the official signature DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9).

    forward(student_output, teacher_output, epoch) returns the loss and then updates the ``center`` buffer
    from the teacher output, as the official module does.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, nepochs: int = 1, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, n_global_crops: int = 2, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.ncrops, self.n_global_crops = ncrops, n_global_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Linear warm-up of the teacher temperature, then constant (the official schedule).
        warm = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, dtype=torch.float64)
        self.teacher_temp_schedule = warm.tolist() + [teacher_temp] * max(nepochs - warmup_teacher_temp_epochs, 1)

    def forward(self, student_output, teacher_output, epoch: int = 0):
        b = teacher_output.shape[0] // self.n_global_crops
        if student_output.shape[0] != self.ncrops * b:
            raise ValueError(f"student_output has {student_output.shape[0]} rows; ncrops={self.ncrops} crops of the "
                             f"batch size {b} make {self.ncrops * b}")
        temp = self.teacher_temp_schedule[min(int(epoch), len(self.teacher_temp_schedule) - 1)]
        loss = Fn.dino_loss(student_output, teacher_output, self.center.to(teacher_output.device),
                            student_temp=self.student_temp, teacher_temp=temp,
                            n_global_crops=self.n_global_crops, reduction=self.reduction, backend=self.backend)
        if self.center.device != teacher_output.device:
            self.center = self.center.to(teacher_output.device)
        Fn.update_center_(self.center, teacher_output.detach(), self.center_momentum, backend=self.backend)
        return loss
