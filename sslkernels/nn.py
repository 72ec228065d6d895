"""nn.Module wrappers over sslkernels.functional.

Where a popular library has a class for the same job, the constructor and ``forward`` also accept that
library's signature, with the same numbers: lightly's NTXentLoss / DCLLoss / DCLWLoss / BarlowTwinsLoss /
VICRegLoss / NegativeCosineSimilarity / DINOLoss / SwaVLoss / MemoryBankModule (checked against lightly
1.6.0 by tests/test_dropin_lightly.py; ``sslkernels.integrations.lightly.patch()`` swaps them into lightly),
OpenCLIP's ClipLoss, the official DINO DINOLoss.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks as check
from . import functional as Fn
from .backends import dispatch
from .distributed import all_gather_rows

__all__ = [
    "InfoNCELoss", "NTXentLoss", "ClipLoss", "MoCoLoss", "SupConLoss", "DCLLoss", "DINOLoss",
    "NegativeCosineSimilarity", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss",
    "DCLWLoss", "MemoryBankModule", "negative_mises_fisher_weights",
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


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def _lightly_temperature(temperature, name: str = "temperature"):
    """Constructor-time check of a lightly-style temperature (a float, or a 0-d tensor checked at forward)."""
    if isinstance(temperature, torch.Tensor):
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(temperature).__name__}")
    # lightly only rejects |τ| < 1e-8 and would run with a negative τ; a negative temperature turns the
    # loss upside down, so it is refused here rather than reproduced.
    if not temperature > 0:
        raise ValueError(f"{name} must be positive, got {temperature!r}")
    return temperature


def _check_gather_available(gather_distributed: bool, name: str = "gather_distributed") -> None:
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(f"{name} is True but torch.distributed is not available; set {name}=False or install "
                         "a torch build with distributed support")


def _multi_rank_unsupported(gather_distributed: bool, what: str) -> None:
    """lightly's ``gather_distributed=True`` changes nothing on one process; across ranks sslkernels cannot
    reproduce it for ``what`` yet, so it refuses instead of returning a different (local) loss."""
    if gather_distributed and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise NotImplementedError(f"{what}(gather_distributed=True) across {torch.distributed.get_world_size()} "
                                  "ranks is not implemented; use gather_distributed=False for each rank's local loss")


class MemoryBankModule(nn.Module):
    """lightly's ``MemoryBankModule(size, gather_distributed=False, feature_dim_first=True)`` (lightly 1.6.0),
    writing with MemoryQueue's enqueue kernel.

    - ``size`` is ``0`` (no bank: ``forward`` returns ``(output, None)``) or ``(num_features, dim)``; a bare
      int > 0 is refused, as by lightly 1.6.0.
    - Buffers ``bank`` (num_features×dim, float32, random unit rows drawn at construction with the global
      RNG on the CPU, as lightly draws them: the same seed gives the same bank) and ``bank_ptr`` (shape
      [1], int64); both non-persistent, so state dicts have the same keys as lightly's (none).
    - ``forward(output, labels=None, update=False)`` returns ``(output, bank)`` where ``bank`` is a detached
      copy of the bank from *before* this call (``dim×num_features`` when ``feature_dim_first``), then,
      with ``update=True``, writes ``output`` (all ranks' rows first when ``gather_distributed`` and
      torch.distributed runs on several ranks). There is no warm-up: the random rows serve as negatives
      until real ones replace them.
    - lightly's write rule, which differs from MemoryQueue's ring buffer: rows are written from
      ``bank_ptr`` on; a batch that reaches the end of the bank is cut there (its remaining rows are
      dropped, not wrapped to the start) and the pointer goes back to 0.
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True, *, backend: Optional[str] = None):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
        for v in size_tuple:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"size must be 0 or a (num_features, dim) tuple of ints, got {size!r}")
            if v < 0:
                raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(f"Memory bank size 'size={size}' does not specify the feature dimension. Set it with "
                             f"'size=({size}, dim)', or pass 'size=0' to disable the memory bank.")
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or 'size=0' "
                             "to disable the memory bank.")
        self.size = size_tuple
        self.gather_distributed, self.feature_dim_first, self.backend = gather_distributed, feature_dim_first, backend
        self.register_buffer("bank", torch.empty(size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            self._init_memory_bank(size_tuple)

    @torch.no_grad()
    def _init_memory_bank(self, size) -> None:
        # Drawn on the CPU with the global RNG before moving, as lightly does: seeds reproduce its bank.
        self.bank = F.normalize(torch.randn(size).to(self.bank), dim=-1)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=self.bank_ptr.device)

    def forward(self, output: torch.Tensor, labels=None, update: bool = False):
        if self.size[0] == 0:
            return output, None
        bank = self.bank.clone().detach()
        if self.feature_dim_first:
            bank = bank.transpose(0, -1)
        if update:
            self._dequeue_and_enqueue(output)
        return output, bank

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: torch.Tensor) -> None:
        check.features(batch, "output")
        if batch.shape[1] != self.bank.shape[1]:
            raise ValueError(f"output has dimension {batch.shape[1]} but the memory bank holds rows of dimension "
                             f"{self.bank.shape[1]} (size={self.size})")
        batch = batch.detach()
        if self.gather_distributed:
            batch = all_gather_rows(batch)
        if batch.device != self.bank.device:  # lightly's slice assignment copies across devices
            batch = batch.to(self.bank.device)
        # lightly's rule needs to know how many rows fit before the end: one host read of the pointer
        # per update (lightly reads it too). The kernel then advances it to ptr + n, i.e. to 0 when cut.
        n = min(batch.shape[0], self.size[0] - int(self.bank_ptr))
        if n > 0:
            dispatch("queue_enqueue_", self.backend, self.bank.device)(self.bank, self.bank_ptr.view(()), batch[:n],
                                                                      False)
            torch.autograd.graph.increment_version(self.bank)  # an in-place write, as lightly's

    def extra_repr(self) -> str:
        return f"size={self.size}, gather_distributed={self.gather_distributed}"


class NTXentLoss(_Loss):
    """SimCLR's loss with lightly's signature: NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False).

    As lightly's, it L2-normalizes its inputs (``normalize=False`` to skip). ``memory_bank_size`` is 0 or
    ``(num_features, dim)``: then it follows lightly's MoCo mode through ``self.memory_bank`` (a
    :class:`MemoryBankModule`): out0 is contrasted one-directionally against out1 (positive) and the bank
    as it was before this step, then normalized out1 is written into the bank when out0 requires grad.
    Beyond lightly 1.6.0 (which refuses it) a bare int ``memory_bank_size=K`` is accepted: the bank is
    made at the first forward with the width of out1 (as older lightly releases did).
    ``gather_distributed=True`` with a bank gathers only the rows written into it, as lightly; without a
    bank it gathers negatives, which is not implemented across several ranks (an error, not a local loss).
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, decoupled: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.temperature = _lightly_temperature(temperature)
        _check_gather_available(gather_distributed)
        self._lazy_bank_size = 0
        if isinstance(memory_bank_size, int) and not isinstance(memory_bank_size, bool) and memory_bank_size > 0:
            self._lazy_bank_size, memory_bank_size = memory_bank_size, 0
        self.memory_bank = MemoryBankModule(memory_bank_size, gather_distributed=gather_distributed, backend=backend)
        self.gather_distributed, self.decoupled, self.normalize = gather_distributed, decoupled, normalize
        self.eps = 1e-8

    def forward(self, out0, out1):
        if self.normalize:
            out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        if self._lazy_bank_size and self.memory_bank.size[0] == 0:
            check.features(out1, "out1")
            self.memory_bank = MemoryBankModule((self._lazy_bank_size, out1.shape[1]), self.gather_distributed,
                                                backend=self.backend).to(out1.device)
        out1, negatives = self.memory_bank(out1, update=out0.requires_grad)
        if negatives is None:
            return Fn.nt_xent(out0, out1, self.temperature, decoupled=self.decoupled, reduction=self.reduction,
                              gather_distributed=self.gather_distributed, backend=self.backend)
        if self.decoupled:
            raise ValueError("decoupled=True is not available with a memory bank")
        queue = negatives.T if self.memory_bank.feature_dim_first else negatives  # rows are negatives
        # Bank mode is local in lightly too: gather_distributed only widened what was written into the bank.
        return Fn.moco_loss(out0, out1, queue.to(out0.device), self.temperature, reduction=self.reduction,
                            backend=self.backend)


def negative_mises_fisher_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """DCLW's weights (lightly.loss.dcl_loss.negative_mises_fisher_weights): w_i = 2 − N·softmax_i(⟨out0_i,
    out1_i⟩/σ), computed without gradient (lightly detaches them)."""
    similarity = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


class DCLLoss(_Loss):
    """Decoupled contrastive loss (Yeh et al.) with lightly's signature: DCLLoss(temperature=0.1, weight_fn=None,
    gather_distributed=False). Inputs are L2-normalized as lightly does; the loss is the mean over both
    directions (2N rows).

    ``weight_fn(out0, out1)`` (lightly's DCLW hook) scales each row's positive term; it is called as lightly
    calls it, on the normalized inputs, once per direction, and may carry a gradient. Since
    LSE_neg − w·s/τ = (LSE_neg − s/τ) + (1 − w)·s/τ, the weighted loss is the fused decoupled NT-Xent plus
    an O(N·D) correction over the positive pairs.
    """

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False, *,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(reduction, backend)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be a callable (out0, out1) -> weights or None, got "
                            f"{type(weight_fn).__name__}")
        _check_gather_available(gather_distributed)
        self.temperature, self.weight_fn = _lightly_temperature(temperature), weight_fn
        self.gather_distributed = gather_distributed

    def forward(self, out0, out1):
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        loss = Fn.nt_xent(out0, out1, self.temperature, decoupled=True, reduction=self.reduction,
                          gather_distributed=self.gather_distributed, backend=self.backend)
        if not self.weight_fn:
            return loss
        n = out0.shape[0]
        pos = (out0 * out1).sum(dim=1) / self.temperature
        rows = []
        for a, b in ((out0, out1), (out1, out0)):  # lightly's two directions: rows of out0, then of out1
            w = self.weight_fn(a, b)
            if isinstance(w, torch.Tensor) and torch.broadcast_shapes(w.shape, (n,)) != (n,):
                raise ValueError(f"weight_fn returned weights of shape {tuple(w.shape)}; one weight per row "
                                 f"(shape [{n}]) is needed")
            rows.append((1 - w) * pos)
        return loss + _reduce(torch.cat(rows), self.reduction)


class DCLWLoss(DCLLoss):
    """lightly's DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False): DCLLoss weighted by
    :func:`negative_mises_fisher_weights` with ``sigma``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 reduction: str = "mean", backend: Optional[str] = None):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a positive float, got {sigma!r}")
        super().__init__(temperature, functools.partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed, reduction=reduction, backend=backend)
        self.sigma = sigma


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
    """BYOL / SimSiam loss with lightly's signature NegativeCosineSimilarity(dim=1, eps=1e-8); forward(x0, x1)
    = −mean(F.cosine_similarity(x0, x1, dim, eps)), as lightly's: both inputs get their gradient, any shape
    (broadcast like F.cosine_similarity, the cosine taken along ``dim``).

    ``stop_gradient=True`` gives x1 no gradient (the stop-gradient of ``negative_cosine_similarity``, for
    callers that do not detach their targets themselves). ``reduction="none"`` returns the negative cosines
    with ``dim`` removed."""

    def __init__(self, dim: int = 1, eps: float = 1e-8, *, stop_gradient: bool = False, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.dim, self.eps, self.stop_gradient = dim, float(eps), bool(stop_gradient)

    def forward(self, x0, x1):
        check.tensor(x0, "x0")
        check.tensor(x1, "x1")
        try:
            x0, x1 = torch.broadcast_tensors(x0, x1)
        except RuntimeError:
            raise ValueError(f"x0 of shape {tuple(x0.shape)} and x1 of shape {tuple(x1.shape)} do not broadcast "
                             "to one shape") from None
        if not -x0.dim() <= self.dim < max(x0.dim(), 1):
            raise ValueError(f"dim={self.dim} is out of range for inputs of shape {tuple(x0.shape)}")
        if x0.dtype != x1.dtype and x0.is_floating_point() and x1.is_floating_point():
            common = torch.promote_types(x0.dtype, x1.dtype)  # F.cosine_similarity promotes mixed dtypes
            x0, x1 = x0.to(common), x1.to(common)
        # The fused op works on rows: the cosine dimension goes last and every other one into the rows.
        rows_shape = x0.movedim(self.dim, -1).shape[:-1]
        d = x0.shape[self.dim]
        p, z = (x.movedim(self.dim, -1).reshape(-1, d) for x in (x0, x1))
        out = Fn.negative_cosine_similarity(p, z, reduction=self.reduction, stop_gradient=self.stop_gradient,
                                            eps=self.eps, backend=self.backend)
        return out.reshape(rows_shape) if self.reduction == "none" else out


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins with lightly's signature BarlowTwinsLoss(lambda_param=5e-3, gather_distributed=False):
    each view batch-normalized on its own (F.batch_norm in training mode: biased variance, ε = 1e-5, as
    lightly 1.6.0), c = z_aᵀz_b / N, Σ(1 − c_ii)² + λ·Σ_{i≠j} c_ij².

    ``gather_distributed=True`` is the same loss on one process; across several ranks (lightly all-reduces
    c) it raises NotImplementedError rather than return the local loss."""

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        _check_gather_available(gather_distributed)
        self.lambda_param, self.gather_distributed, self.backend = lambda_param, gather_distributed, backend

    def forward(self, z_a, z_b):
        _multi_rank_unsupported(self.gather_distributed, "BarlowTwinsLoss")
        return Fn.barlow_twins_loss(z_a, z_b, self.lambda_param, backend=self.backend)


class VICRegLoss(nn.Module):
    """VICReg with lightly's signature VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0,
    gather_distributed=False, eps=1e-4): lambda = invariance (sim) weight, mu = variance weight, nu =
    covariance weight, ``eps`` inside the variance term's square root.

    As lightly's, inputs may be (batch, ..., dim): the invariance and variance terms average over every
    position, the covariance term is taken per position over ``dim`` and averaged, which is the mean over
    positions of the 2-d loss. ``gather_distributed=True`` across several ranks raises NotImplementedError.
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 1e-4, *, backend: Optional[str] = None):
        super().__init__()
        _check_gather_available(gather_distributed)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        self.lambda_param, self.mu_param, self.nu_param = lambda_param, mu_param, nu_param
        self.gather_distributed, self.eps, self.backend = gather_distributed, eps, backend

    def forward(self, z_a, z_b):
        check.tensor(z_a, "z_a")
        check.tensor(z_b, "z_b")
        if z_a.shape != z_b.shape:
            raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        if z_a.dim() < 2 or z_a.shape[0] < 2:
            raise ValueError(f"z_a and z_b must be (batch, ..., dim) with batch size > 1, got {tuple(z_a.shape)}")
        _multi_rank_unsupported(self.gather_distributed, "VICRegLoss")
        if z_a.dim() > 2:  # lightly's (batch, ..., dim) form: the mean of the 2-d loss over positions
            a = z_a.reshape(z_a.shape[0], -1, z_a.shape[-1])
            b = z_b.reshape(z_b.shape[0], -1, z_b.shape[-1])
            return sum(self._loss(a[:, i], b[:, i]) for i in range(a.shape[1])) / a.shape[1]
        return self._loss(z_a, z_b)

    def _loss(self, z_a, z_b):
        if self.eps == 1e-4:  # the fused op's ε (VICReg's reference value)
            return Fn.vicreg_loss(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, backend=self.backend)
        # Another ε: the fused op gives the invariance and covariance terms, the O(N·D) variance hinge is
        # added here with this ε.
        loss = Fn.vicreg_loss(z_a, z_b, self.lambda_param, 0.0, self.nu_param, backend=self.backend)
        var = sum(F.relu(1 - torch.sqrt(z.var(dim=0) + self.eps)).mean() for z in (z_a, z_b)) / 2
        return loss + self.mu_param * var


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
            # lightly's attribute: a float32 tensor over the warm-up epochs only (later epochs use teacher_temp).
            self.teacher_temp_schedule = torch.linspace(a["warmup_teacher_temp"], a["teacher_temp"],
                                                        self.warmup_teacher_temp_epochs)
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
        crops = [("teacher_out", i, x) for i, x in enumerate(teacher_out)]
        crops += [("student_out", i, x) for i, x in enumerate(student_out)]
        for name, i, x in crops:
            check.features(x, f"{name}[{i}]")
            # lightly stacks the crops: one shape for all, else the rows would pair up wrongly after a cat.
            if x.shape != teacher_out[0].shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but teacher_out[0] has "
                                 f"{tuple(teacher_out[0].shape)}; every crop must be (batch_size, output_dim)")
        if teacher_temp is not None:
            temp = teacher_temp
        elif epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            temp = float(self.teacher_temp_schedule[epoch])  # lightly's float32 schedule value, exactly
        else:
            temp = self.teacher_temp
        if torch.is_grad_enabled() and any(t.requires_grad for t in teacher_out):
            return self._lightly_teacher_grad(list(teacher_out), list(student_out), temp)
        return self._loss_and_update(torch.cat(list(student_out)), torch.cat(list(teacher_out)), temp,
                                     len(teacher_out))

    def _lightly_teacher_grad(self, teacher_out, student_out, teacher_temp):
        """lightly does not detach the teacher: a teacher output that requires grad gets the gradient of the
        softmax through it. The fused kernels give the teacher none, so this (rare) case runs eagerly."""
        self.apply_center_update()
        if self.center.device != teacher_out[0].device:
            self.center = self.center.to(teacher_out[0].device)
        t = torch.softmax((torch.stack(teacher_out) - self.center.detach()) / teacher_temp, dim=-1)
        s = torch.log_softmax(torch.stack(student_out) / self.student_temp, dim=-1)
        pairs = -torch.einsum("tbd,sbd->tsb", t, s)  # (teacher crop, student crop, sample)
        keep = ~torch.eye(len(teacher_out), len(student_out), dtype=torch.bool, device=pairs.device)
        if not keep.any():
            raise ValueError("DINOLoss needs at least one (teacher crop, student crop) pair with different crops")
        rows = pairs[keep].sum(dim=0) / keep.sum()
        self.update_center(torch.cat(teacher_out))
        return _reduce(rows, self.reduction)

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
        _check_gather_available(sinkhorn_gather_distributed, "sinkhorn_gather_distributed")
        self.temperature, self.sinkhorn_iterations = temperature, sinkhorn_iterations
        self.sinkhorn_epsilon, self.sinkhorn_gather_distributed = sinkhorn_epsilon, sinkhorn_gather_distributed
        self.backend = backend

    def subloss(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """lightly's per-pair term: −mean_b Σ_p q·log_softmax(z/τ)."""
        return -torch.mean(torch.sum(q * F.log_softmax(z / self.temperature, dim=1), dim=1))

    def forward(self, high_resolution_outputs, low_resolution_outputs=(), queue_outputs=None):
        # Shape [1], as lightly's (its running sum starts from new_zeros(1)).
        return Fn.swav_loss(high_resolution_outputs, low_resolution_outputs, temperature=self.temperature,
                            epsilon=self.sinkhorn_epsilon, iterations=self.sinkhorn_iterations,
                            queue_outputs=queue_outputs, gather_distributed=self.sinkhorn_gather_distributed,
                            backend=self.backend).reshape(1)
