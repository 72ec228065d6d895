"""nn.Module wrappers over sslkernels.functional.

Where a popular library has a class for the same job, the constructor and ``forward`` also accept that
library's signature, with the same numbers: lightly's NTXentLoss / DCLLoss / DCLWLoss / BarlowTwinsLoss /
VICRegLoss / NegativeCosineSimilarity / DINOLoss / SwaVLoss / MemoryBankModule (checked against lightly
1.6.0 by tests/test_dropin_lightly.py; ``sslkernels.integrations.lightly.patch()`` swaps them into lightly),
OpenCLIP's ClipLoss, the official DINO DINOLoss.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
from numbers import Integral, Real
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _checks as check
from . import functional as Fn
from .backends import dispatch
from .distributed import all_gather_rows, all_gather_with_grad, is_distributed
from .ops.cross_correlation_dist import barlow_twins_across_ranks
from .reference import compute_dtype

__all__ = [
    "InfoNCELoss", "NTXentLoss", "ClipLoss", "MoCoLoss", "SupConLoss", "DCLLoss", "DINOLoss",
    "NegativeCosineSimilarity", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss",
    "DCLWLoss", "MemoryBankModule", "negative_mises_fisher_weights", "SigLipLoss", "ModelEmaV3",
]


class _Loss(nn.Module):
    def __init__(self, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        self.reduction, self.backend = check.reduction(reduction), backend


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
    if isinstance(temperature, bool) or not isinstance(temperature, Real):  # numpy scalars are Real too
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(temperature).__name__}")
    # lightly only rejects |τ| < 1e-8 and would run with a negative τ; a negative temperature turns the
    # loss upside down, so it is refused here rather than reproduced.
    return _positive_number(temperature, name)


def _positive_number(value, name: str) -> float:
    """A positive, finite Python number (a constructor argument such as a temperature), by the caller's name."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def _count(value, name: str, low: int = 1) -> int:
    """An int >= ``low`` (numpy ints too; no float or string that int() would silently accept)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _unit_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _check_gather_available(gather_distributed: bool, name: str = "gather_distributed") -> None:
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(f"{name} is True but torch.distributed is not available; set {name}=False or install "
                         "a torch build with distributed support")


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
      dropped, not wrapped to the start) and the pointer goes back to 0. Decided on the device (the enqueue
      kernel's ``cut`` mode): unlike lightly's, the write reads nothing back to the host, so a step with a
      bank stays sync-free and compiles into one graph.
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True, *, backend: Optional[str] = None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if isinstance(size, Integral) and not isinstance(size, bool):
            size_tuple = (size,)
        elif isinstance(size, (tuple, list, torch.Size)):
            size_tuple = tuple(size)
        else:
            raise TypeError(f"size must be 0 or a (num_features, dim) tuple of ints, got {size!r}")
        for v in size_tuple:
            if isinstance(v, bool) or not isinstance(v, Integral):
                raise TypeError(f"size must be 0 or a (num_features, dim) tuple of ints, got {size!r}")
            if v < 0:
                raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        size_tuple = tuple(int(v) for v in size_tuple)
        if isinstance(size, Integral) and size > 0:
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
            self._init_memory_bank(size_tuple, generator)

    @torch.no_grad()
    def _init_memory_bank(self, size, generator: Optional[torch.Generator] = None) -> None:
        # Drawn on the CPU with the global RNG before moving, as lightly does: seeds reproduce its bank
        # (``generator``, a CPU generator, instead: NTXentLoss's bank sized at its first call).
        self.bank = F.normalize(torch.randn(size, generator=generator).to(self.bank), dim=-1)
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
        # lightly's rule (rows past the end dropped, ptr back to 0) decided on the device by the enqueue
        # kernel's cut mode: no host read of the pointer (lightly reads it), so the step stays sync-free.
        dispatch("queue_enqueue_", self.backend, self.bank.device)(self.bank, self.bank_ptr.view(()), batch,
                                                                  False, True)
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
    bank each rank's 2n rows meet every rank's rows (functional ``nt_xent(gather_distributed=True)``), the
    loss is the mean over the local rows and the gather's backward sums over ranks: lightly's values and
    gradients per rank (tests/test_distributed_dropins.py).
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, decoupled: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.temperature = _lightly_temperature(temperature)
        _check_gather_available(gather_distributed)
        self._lazy_bank_size = 0
        if isinstance(memory_bank_size, Integral) and not isinstance(memory_bank_size, bool) and memory_bank_size > 0:
            self._lazy_bank_size, memory_bank_size = int(memory_bank_size), 0
            # The bank's rows come from a generator seeded now, from the global RNG: the first call draws nothing
            # from it (a run resumed at a later step would otherwise shift the augmentation stream by that draw).
            self._lazy_bank_seed = int(torch.randint(0, 2 ** 62, ()))
        self.memory_bank = MemoryBankModule(memory_bank_size, gather_distributed=gather_distributed, backend=backend)
        self.gather_distributed, self.decoupled, self.normalize = gather_distributed, decoupled, normalize
        self.eps = 1e-8

    def forward(self, out0, out1):
        # Here, by lightly's names (before F.normalize, whose error for integer inputs names no argument; nt_xent
        # would call them z1 / z2).
        Fn._pair("out0", out0, "out1", out1, same_rows=True)
        if self.normalize:
            out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        if self._lazy_bank_size and self.memory_bank.size[0] == 0:
            check.features(out1, "out1")
            # In the dtype the module was converted to (the empty placeholder bank followed .double() / .half()).
            self.memory_bank = MemoryBankModule(
                (self._lazy_bank_size, out1.shape[1]), self.gather_distributed, backend=self.backend,
                generator=torch.Generator().manual_seed(self._lazy_bank_seed),
            ).to(device=out1.device, dtype=self.memory_bank.bank.dtype)
        if self.memory_bank.size[0] and out1.shape[1] != self.memory_bank.bank.shape[1]:
            raise ValueError(f"out1 has dimension {out1.shape[1]} but the memory bank holds rows of dimension "
                             f"{self.memory_bank.bank.shape[1]} (memory_bank_size={self.memory_bank.size})")
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

    ``gather_distributed=True`` across ranks: negatives are every rank's rows, the weights and the mean stay
    per rank (lightly's convention, values and gradients per rank).
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
        Fn._pair("out0", out0, "out1", out1, same_rows=True)  # by lightly's names, before F.normalize
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
            if not isinstance(w, (torch.Tensor, Real)) or isinstance(w, bool):
                raise TypeError(f"weight_fn must return a tensor of weights (or a float), got {type(w).__name__}")
            if isinstance(w, torch.Tensor) and (w.dim() > 1 or w.numel() not in (1, n)):
                raise ValueError(f"weight_fn returned weights of shape {tuple(w.shape)}; one weight per row "
                                 f"(shape [{n}]) is needed")
            rows.append((1 - w) * pos)
        return loss + _reduce(torch.cat(rows), self.reduction)


class DCLWLoss(DCLLoss):
    """lightly's DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False): DCLLoss weighted by
    :func:`negative_mises_fisher_weights` with ``sigma``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 reduction: str = "mean", backend: Optional[str] = None):
        if isinstance(sigma, bool) or not isinstance(sigma, Real) or not sigma > 0:
            raise ValueError(f"sigma must be a positive float, got {sigma!r}")
        super().__init__(temperature, functools.partial(negative_mises_fisher_weights, sigma=float(sigma)),
                         gather_distributed, reduction=reduction, backend=backend)
        self.sigma = sigma


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
        if isinstance(dim, bool) or not isinstance(dim, Integral):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if isinstance(eps, bool) or not isinstance(eps, Real) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.dim, self.eps, self.stop_gradient = int(dim), float(eps), bool(stop_gradient)

    def forward(self, x0, x1):
        check.tensor(x0, "x0")
        check.tensor(x1, "x1")
        try:
            x0, x1 = torch.broadcast_tensors(x0, x1)
        except RuntimeError:
            raise ValueError(f"x0 of shape {tuple(x0.shape)} and x1 of shape {tuple(x1.shape)} do not broadcast "
                             "to one shape") from None
        if x0.dim() == 0:
            raise ValueError("x0 and x1 are 0-d; the cosine is taken along dim of vectors (at least 1-d inputs)")
        if not -x0.dim() <= self.dim < x0.dim():
            raise ValueError(f"dim={self.dim} is out of range for inputs of shape {tuple(x0.shape)}")
        for name, x in (("x0", x0), ("x1", x1)):  # by lightly's names (the fused op calls them p and z)
            if x.dtype not in check.FLOAT_DTYPES:
                raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                                f"got {x.dtype}")
        if x0.numel() == 0:
            raise ValueError(f"x0 and x1 (broadcast to shape {tuple(x0.shape)}) hold no elements")
        if x0.dtype != x1.dtype:
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

    ``gather_distributed=True`` across several ranks: the ranks' c averaged before the loss through a
    differentiable all-reduce, as lightly (plain torch: the D×D matrix is formed; one process: the fused op)."""

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        _check_gather_available(gather_distributed)
        self.lambda_param = check.loss_weight(lambda_param, "lambda_param")  # at construction, by the module's name
        self.gather_distributed, self.backend = gather_distributed, backend

    def forward(self, z_a, z_b):
        Fn._pair("z_a", z_a, "z_b", z_b, same_rows=True)  # by lightly's names (the functional op's are z1 / z2)
        if self.gather_distributed and is_distributed():
            return barlow_twins_across_ranks(z_a, z_b, self.lambda_param, differentiable_reduce=True)
        if z_a.shape[0] < 2:
            raise ValueError("z_a and z_b need at least 2 rows: Barlow Twins normalizes each feature over the batch")
        return Fn.barlow_twins_loss(z_a, z_b, self.lambda_param, backend=self.backend)


class VICRegLoss(nn.Module):
    """VICReg with lightly's signature VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0,
    gather_distributed=False, eps=1e-4): lambda = invariance (sim) weight, mu = variance weight, nu =
    covariance weight, ``eps`` inside the variance term's square root.

    As lightly's, inputs may be (batch, ..., dim): the invariance and variance terms average over every
    position, the covariance term is taken per position over ``dim`` and averaged, which is the mean over
    positions of the 2-d loss. ``gather_distributed=True`` across several ranks: as lightly, the invariance term
    on this rank's rows, the variance and covariance terms on every rank's (all-gathered with their gradient).
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 1e-4, *, backend: Optional[str] = None):
        super().__init__()
        _check_gather_available(gather_distributed)
        if isinstance(eps, bool) or not isinstance(eps, Real) or not 0 <= eps < float("inf"):
            raise ValueError(f"eps must be a non-negative, finite float, got {eps!r}")
        # checked here by the module's names (the functional op calls them sim/var/cov_weight)
        self.lambda_param, self.mu_param, self.nu_param = (check.loss_weight(w, name) for w, name in (
            (lambda_param, "lambda_param"), (mu_param, "mu_param"), (nu_param, "nu_param")))
        self.gather_distributed, self.eps, self.backend = gather_distributed, float(eps), backend

    def forward(self, z_a, z_b):
        check.tensor(z_a, "z_a")
        check.tensor(z_b, "z_b")
        if z_a.shape != z_b.shape:
            raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        if z_a.dim() < 2 or z_a.shape[0] < 2:
            raise ValueError(f"z_a and z_b must be (batch, ..., dim) with batch size > 1, got {tuple(z_a.shape)}")
        for name, z in (("z_a", z_a), ("z_b", z_b)):  # by lightly's names (the functional op's are z1 / z2)
            if z.dtype not in check.FLOAT_DTYPES:
                raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                                f"got {z.dtype}")
        check.same_device(("z_a", z_a), ("z_b", z_b))
        check.same_dtype(("z_a", z_a), ("z_b", z_b))
        if z_a.numel() == 0:
            raise ValueError(f"z_a and z_b of shape {tuple(z_a.shape)} hold no elements")
        a = z_a.reshape(z_a.shape[0], -1, z_a.shape[-1])  # lightly's (batch, ..., dim) form: the mean of the
        b = z_b.reshape(z_b.shape[0], -1, z_b.shape[-1])  # 2-d loss over positions
        if self.gather_distributed and is_distributed():
            all_a, all_b = all_gather_with_grad(a), all_gather_with_grad(b)
            # lightly: the invariance term on this rank's rows, the rest on every rank's
            terms = [Fn.vicreg_loss(a[:, i], b[:, i], self.lambda_param, 0.0, 0.0, backend=self.backend)
                     + self._loss(all_a[:, i], all_b[:, i], 0.0) for i in range(a.shape[1])]
        else:
            terms = [self._loss(a[:, i], b[:, i], self.lambda_param) for i in range(a.shape[1])]
        return terms[0] if len(terms) == 1 else sum(terms) / len(terms)

    def _loss(self, z_a, z_b, sim_weight):
        if self.eps == 1e-4:  # the fused op's ε (VICReg's reference value)
            return Fn.vicreg_loss(z_a, z_b, sim_weight, self.mu_param, self.nu_param, backend=self.backend)
        # Another ε: the fused op gives the invariance and covariance terms, the O(N·D) variance hinge is
        # added here with this ε.
        loss = Fn.vicreg_loss(z_a, z_b, sim_weight, 0.0, self.nu_param, backend=self.backend)
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
                    or (isinstance(second, Integral) and not isinstance(second, bool)))
        sig = inspect.signature(_official_dino if official else _lightly_dino)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"DINOLoss takes the official DINO signature {inspect.signature(_official_dino)} or "
                            f"lightly's {inspect.signature(_lightly_dino)}: {err}") from None
        bound.apply_defaults()
        a = bound.arguments
        # Checked here, by the signature's names: int() would take 16.0 or "16", a zero or negative temperature
        # or momentum would only fail at the first forward (under the functional op's names), a negative count
        # deep inside numpy / torch.
        for name in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
            a[name] = _positive_number(a[name], name)
        a["center_momentum"] = _unit_number(a["center_momentum"], "center_momentum")
        a["warmup_teacher_temp_epochs"] = _count(a["warmup_teacher_temp_epochs"], "warmup_teacher_temp_epochs", 0)
        dim_name = "out_dim" if official else "output_dim"
        a[dim_name] = _count(a[dim_name], dim_name)
        n_global_crops = _count(n_global_crops, "n_global_crops")
        self.n_global_crops, self.async_center = n_global_crops, bool(async_center)
        self.student_temp, self.center_momentum = a["student_temp"], a["center_momentum"]
        self.teacher_temp = a["teacher_temp"]
        self.warmup_teacher_temp_epochs = int(a["warmup_teacher_temp_epochs"])
        if official:
            self.ncrops = _count(a["ncrops"], "ncrops")
            if n_global_crops > self.ncrops:
                raise ValueError(f"n_global_crops={n_global_crops} is more than ncrops={self.ncrops}: the student "
                                 "sees every crop, the global ones included")
            nepochs = _count(a["nepochs"], "nepochs", 0)
            self.register_buffer("center", torch.zeros(1, a["out_dim"]))
            # Linear warm-up of the teacher temperature, then constant: the official schedule, a numpy array.
            self.teacher_temp_schedule = np.concatenate((
                np.linspace(a["warmup_teacher_temp"], a["teacher_temp"], self.warmup_teacher_temp_epochs),
                np.ones(max(nepochs - self.warmup_teacher_temp_epochs, 0)) * a["teacher_temp"]))
        else:
            if a["center_mode"] != "mean":
                raise ValueError(f"center_mode must be 'mean' (lightly's only mode), got {a['center_mode']!r}")
            self.ncrops = None
            self.register_buffer("center", torch.zeros(1, 1, a["output_dim"]))
            # lightly's attribute: a float32 tensor over the warm-up epochs only (later epochs use teacher_temp).
            self.teacher_temp_schedule = torch.linspace(a["warmup_teacher_temp"], a["teacher_temp"],
                                                        self.warmup_teacher_temp_epochs)
        # The schedule as Python floats for the lookups: a float() of an array element inside torch.compile is a
        # data-dependent value (a graph break), a list element a constant.
        self._temps = [float(t) for t in self.teacher_temp_schedule.tolist()]
        self._pending = None

    @staticmethod
    def _epoch(epoch) -> int:
        """A non-negative int epoch: a float or string would index the schedule truncated, a negative one from
        its end (the official schedule is a numpy array, lightly's a tensor: both take epoch = -1 silently)."""
        if isinstance(epoch, torch.Tensor) and epoch.dim() == 0 and not (
                epoch.is_floating_point() or epoch.is_complex() or epoch.dtype == torch.bool):
            epoch = int(epoch)
        if isinstance(epoch, bool) or not isinstance(epoch, Integral):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__} {epoch!r}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return int(epoch)

    def _temperature(self, epoch) -> float:
        if epoch is None or not self._temps:
            return self.teacher_temp
        return self._temps[min(self._epoch(epoch), len(self._temps) - 1)]

    def forward(self, *args, **kwargs):
        first = args[0] if args else kwargs.get("teacher_out", kwargs.get("student_output"))
        if isinstance(first, (list, tuple)):
            return self._forward_lightly(*args, **kwargs)
        return self._forward_official(*args, **kwargs)

    def _forward_official(self, student_output, teacher_output, epoch: int = 0):
        check.features(student_output, "student_output")
        check.features(teacher_output, "teacher_output")
        if teacher_output.shape[0] % self.n_global_crops:
            raise ValueError(f"teacher_output has {teacher_output.shape[0]} rows, not a multiple of "
                             f"n_global_crops={self.n_global_crops}")
        b = teacher_output.shape[0] // self.n_global_crops
        if self.ncrops is not None and student_output.shape[0] != self.ncrops * b:
            raise ValueError(f"student_output has {student_output.shape[0]} rows; ncrops={self.ncrops} crops of the "
                             f"batch size {b} make {self.ncrops * b}")
        self._check_teacher_width(teacher_output, "teacher_output")
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
        elif epoch is not None and (e := self._epoch(epoch)) < self.warmup_teacher_temp_epochs:
            temp = self._temps[e]  # lightly's float32 schedule value, exactly
        else:
            temp = self.teacher_temp
        self._check_teacher_width(teacher_out[0], "teacher_out[0]")
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
        # fp32 at least (the fp32 centre would promote only the teacher side, and einsum refuses the mix;
        # s/τs overflows fp16 above ~6.5e3); the loss comes back in fp32 as on the fused path.
        ct = torch.promote_types(compute_dtype(teacher_out[0].dtype), compute_dtype(student_out[0].dtype))
        t = torch.softmax((torch.stack(teacher_out).to(ct) - self.center.detach()) / teacher_temp, dim=-1)
        s = torch.log_softmax(torch.stack(student_out).to(ct) / self.student_temp, dim=-1)
        pairs = -torch.einsum("tbd,sbd->tsb", t, s)  # (teacher crop, student crop, sample)
        n_t, n_s = len(teacher_out), len(student_out)
        n_pairs = n_t * n_s - min(n_t, n_s)  # pairs with different crops, counted on the host
        if n_pairs == 0:
            raise ValueError("DINOLoss needs at least one (teacher crop, student crop) pair with different crops")
        # A masked sum, not pairs[keep] (a boolean index is a nonzero: a host sync on the GPU, also in its backward).
        same = torch.eye(n_t, n_s, dtype=torch.bool, device=pairs.device)
        rows = pairs.masked_fill(same[:, :, None], 0).sum(dim=(0, 1)) / n_pairs
        self.update_center(torch.cat(teacher_out))
        return _reduce(rows, self.reduction)

    def _check_teacher_width(self, teacher, name: str) -> None:
        if teacher.shape[1] != self.center.shape[-1]:
            dim_name = "output_dim" if self.ncrops is None else "out_dim"
            raise ValueError(f"{name} has {teacher.shape[1]} columns but the centre has "
                             f"{self.center.shape[-1]} ({dim_name})")

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
    def update_center(self, teacher_output=None, *, teacher_out=None) -> None:
        """EMA of the centre towards the teacher output's mean row (over all ranks when distributed).
        The argument has the official DINO name (``teacher_output``) and lightly's (``teacher_out``)."""
        if (teacher_output is None) == (teacher_out is None):
            raise TypeError("update_center takes one teacher output: teacher_output (official DINO's name) or "
                            "teacher_out (lightly's)")
        name = "teacher_out" if teacher_output is None else "teacher_output"
        teacher_output = teacher_out if teacher_output is None else teacher_output
        if isinstance(teacher_output, (list, tuple)):
            teacher_output = torch.cat(list(teacher_output))
        check.tensor(teacher_output, name)
        if teacher_output.dim() < 2 or teacher_output.shape[-1] != self.center.shape[-1]:
            # Rows of the centre's width (lightly passes (crops, batch, dim)); reshape(-1, dim) alone would turn a
            # [4, 8] output into [2, 16] rows for a 16-wide centre.
            raise ValueError(f"{name} must be (..., {self.center.shape[-1]}) (the centre's width), got shape "
                             f"{tuple(teacher_output.shape)}")
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

    # A pending asynchronous update belongs to the centre: it is applied before the centre is saved, replaced
    # by a loaded one, converted (.to / .double / .half, which would leave it writing into the old tensor) or
    # copied (deepcopy / pickle, which cannot take its in-flight collective). Each only waits for a collective
    # every rank has already issued.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.apply_center_update()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.apply_center_update()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, *args, **kwargs):
        self.apply_center_update()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        self.apply_center_update()
        return dict(self.__dict__)


class SwaVLoss(nn.Module):
    """SwaV with lightly's signature: SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05,
    sinkhorn_gather_distributed=False); forward(high_resolution_outputs, low_resolution_outputs,
    queue_outputs=None) on lists of per-crop prototype scores. See ``functional.swav_loss``."""

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        _check_gather_available(sinkhorn_gather_distributed, "sinkhorn_gather_distributed")
        # Checked here by the module's names (swav_loss calls the last two epsilon / iterations).
        temperature = _positive_number(temperature, "temperature")
        sinkhorn_epsilon = _positive_number(sinkhorn_epsilon, "sinkhorn_epsilon")
        sinkhorn_iterations = _count(sinkhorn_iterations, "sinkhorn_iterations", 0)
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


# ==================================================================================================
# Drop-ins for OpenCLIP (open_clip_torch 3.3.0: ClipLoss, SigLipLoss) and timm (1.0.31: ModelEmaV3).
# Same constructor and forward signatures, attributes, state-dict layout and numbers as the originals;
# sslkernels.integrations.open_clip / .timm swap them into those packages.
# ==================================================================================================


def _one_value(x, name: str):
    """OpenCLIP's scalars may be [1]-shaped (``nonscalar_logit_scale=True`` models): view them as 0-d.

    reshape keeps the autograd link, so the gradient still reaches the [1]-shaped parameter."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        if x.numel() != 1:
            raise ValueError(f"{name} must hold one value (a 0-d or [1] tensor), got shape {tuple(x.shape)}")
        return x.reshape(())
    return x


def _overrides(module: nn.Module, base: type, *hooks: str) -> bool:
    """Whether ``module``'s class replaces any of ``base``'s ``hooks`` (OpenCLIP's get_logits and the like)."""
    return any(getattr(type(module), h) is not getattr(base, h) for h in hooks)


def _rank_args(owner: str, rank, world_size) -> None:
    for name, v, low in (("rank", rank, 0), ("world_size", world_size, 1)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < low:
            raise ValueError(f"{owner}: {name} must be an int >= {low}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"{owner}: rank {rank} is outside [0, world_size={world_size})")


def _check_process_group(owner: str, rank: int, world_size: int) -> None:
    """world_size > 1 is only meaningful inside an initialized process group of that size."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{owner}(world_size={world_size}) needs torch.distributed to be initialized "
                         "(dist.init_process_group) before the forward; on one process use world_size=1")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"{owner}(rank={rank}, world_size={world_size}) does not match the process group "
                         f"(rank {dist.get_rank()} of {dist.get_world_size()})")


def _gather(x: torch.Tensor, with_grad: bool, keep_local: bool, rank: int) -> torch.Tensor:
    """Every rank's rows, rank-major (OpenCLIP's gather_features on torch.distributed).

    ``with_grad``: gradients flow back to the rank that owns each chunk (torch.distributed.nn.all_gather).
    Otherwise the gathered copies are constants; ``keep_local`` puts this rank's own tensor back in its
    slot so its rows still get their gradient (OpenCLIP does this unless local_loss)."""
    world = dist.get_world_size()
    if with_grad:
        return all_gather_with_grad(x, [x.shape[0]] * world)  # OpenCLIP's ranks hold equal batches
    parts = list(all_gather_rows(x.detach()).chunk(world))
    if keep_local:
        parts[rank] = x
    return torch.cat(parts, dim=0)


class ClipLoss(_Loss):
    """CLIP's symmetric loss with OpenCLIP's signature (open_clip_torch 3.3.0):

    ``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
    use_horovod=False)``; ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` → the loss, or ``{"contrastive_loss": loss}``. ``logit_scale`` is already
    exponentiated (OpenCLIP's models return ``logit_scale.exp()``), a float or a 0-d / [1] tensor.

    ``logit_bias`` shifts every logit of a row by the same amount, which leaves a softmax cross-entropy
    unchanged: OpenCLIP's loss does not depend on it, and neither does this one; it is kept in the graph
    with an exactly-zero gradient (OpenCLIP's is zero up to rounding), and a NaN in it still gives a NaN loss.

    ``world_size > 1`` needs an initialized torch.distributed group of that size (rank = this process's
    rank): features are all-gathered as OpenCLIP does (``gather_with_grad``: gradients flow to every rank;
    ``local_loss``: each rank's rows against all columns, labels offset by ``rank``), and the loss runs
    on our fused ops over the gathered features. Horovod is not supported (``use_horovod=True`` is
    accepted on one process, where OpenCLIP never uses it either). Beyond OpenCLIP: ``reduction``, ``backend``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        _rank_args("ClipLoss", rank, world_size)
        if use_horovod and world_size > 1:
            raise ValueError("ClipLoss(use_horovod=True, world_size > 1) is not supported: sslkernels gathers "
                             "with torch.distributed")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        # OpenCLIP's label cache; used only by get_ground_truth (the fused loss needs no label tensor).
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """OpenCLIP's labels for ``num_logits`` rows (offset by rank·num_logits under local_loss)."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def _gathered(self, image_features, text_features):
        _check_process_group("ClipLoss", self.rank, self.world_size)
        keep = not self.local_loss
        return (_gather(image_features, self.gather_with_grad, keep, self.rank),
                _gather(text_features, self.gather_with_grad, keep, self.rank))

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """OpenCLIP's (logits_per_image, logits_per_text), materialized: for inspection and subclasses;
        ``forward`` builds them only for a subclass that overrides this or ``get_ground_truth``."""
        logit_scale, logit_bias = _one_value(logit_scale, "logit_scale"), _one_value(logit_bias, "logit_bias")
        if self.world_size > 1:
            all_image, all_text = self._gathered(image_features, text_features)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_text.T
                per_text = logit_scale * text_features @ all_image.T
            else:
                per_image = logit_scale * all_image @ all_text.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        if _overrides(self, ClipLoss, "get_logits", "get_ground_truth"):
            # A subclass customizes OpenCLIP's hooks: OpenCLIP's forward through them, the logits materialized.
            Fn._pair("image_features", image_features, "text_features", text_features, same_rows=True)
            per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias=logit_bias)
            labels = self.get_ground_truth(image_features.device, per_image.shape[0])
            loss = (F.cross_entropy(per_image, labels, reduction=self.reduction)
                    + F.cross_entropy(per_text, labels, reduction=self.reduction)) / 2
            return {"contrastive_loss": loss} if output_dict else loss
        logit_scale = _one_value(logit_scale, "logit_scale")
        if self.world_size == 1:
            loss = Fn.clip_loss(image_features, text_features, logit_scale, reduction=self.reduction,
                                backend=self.backend)
        else:
            loss = self._distributed_loss(image_features, text_features, logit_scale)
        if isinstance(logit_bias, torch.Tensor):
            loss = loss + 0 * _one_value(logit_bias, "logit_bias").to(loss.dtype)  # gradient exactly 0: see the docstring
        elif logit_bias is not None and (isinstance(logit_bias, bool) or not isinstance(logit_bias, Real)):
            raise TypeError(f"logit_bias must be None, a float or a tensor, got {type(logit_bias).__name__}")
        elif logit_bias is not None and not -math.inf < logit_bias < math.inf:
            loss = loss + 0 * float(logit_bias)  # OpenCLIP adds it to every logit: a NaN / inf bias, a NaN loss
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image_features, text_features, logit_scale):
        all_image, all_text = self._gathered(image_features, text_features)
        if not self.local_loss:
            # Every rank computes the global loss over all gathered rows, as OpenCLIP does.
            return Fn.clip_loss(all_image, all_text, logit_scale, reduction=self.reduction, backend=self.backend)
        # This rank's rows against every rank's columns; row i's positive is global column rank·n + i.
        n = image_features.shape[0]
        targets = torch.arange(n, device=image_features.device) + n * self.rank
        logit_scale = check.positive_scalar(logit_scale, "logit_scale", image_features.device)
        # info_nce divides by a temperature: 1/scale costs one rounding of the scale (≤ 1 ulp of the logits).
        temperature = 1 / logit_scale
        per_image = Fn.info_nce(image_features, all_text, temperature, targets=targets, reduction=self.reduction,
                                backend=self.backend)
        per_text = Fn.info_nce(text_features, all_image, temperature, targets=targets, reduction=self.reduction,
                               backend=self.backend)
        return (per_image + per_text) / 2


class SigLipLoss(_Loss):
    """SigLIP's pairwise sigmoid loss with OpenCLIP's signature (open_clip_torch 3.3.0):

    ``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)`` (dist_impl None means
    "bidir"; one of "bidir", "shift", "reduce", "gather"); ``forward(image_features, text_features,
    logit_scale, logit_bias, output_dict=False)``. As in OpenCLIP, ``logit_scale`` is already exponentiated
    (SigLIP models return ``logit_scale.exp()``) and ``logit_bias`` is used as is (None: no bias); both
    may be floats or 0-d / [1] tensors and get gradients. Labels are +1 on the diagonal and −1 elsewhere;
    loss = −Σ log σ(label · logit) / N.

    ``world_size > 1`` needs an initialized torch.distributed group of that size: this rank's images see
    its own texts with those labels and every other rank's texts as negatives only (OpenCLIP's
    ``negative_only``). OpenCLIP's four exchange schemes compute the same loss; here "bidir" and "shift"
    pass the texts around the ring (``siglip_loss(distributed="ring")``: memory per rank flat in the world
    size) and "reduce" and "gather" all-gather them (``gather_distributed=True``), gradients included.
    Ranks may hold different batch sizes.
    Beyond OpenCLIP: ``reduction`` (per image row sums for "none"), ``backend``.
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(reduction, backend)
        _rank_args("SigLipLoss", rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {self.DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.prev_num_logits = 0  # OpenCLIP keeps (and does not use) a label cache; kept for attribute parity
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only: bool = False) -> torch.Tensor:
        """OpenCLIP's ±1 label matrix (−1 everywhere with ``negative_only``), materialized."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """OpenCLIP's logits, materialized (``forward`` builds them only for a subclass overriding a hook)."""
        logits = _one_value(logit_scale, "logit_scale") * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + _one_value(logit_bias, "logit_bias")
        return logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only: bool = False):
        """OpenCLIP's per-pair loss through ``get_logits`` / ``get_ground_truth``, materialized: what ``forward``
        runs when a subclass overrides one of these hooks."""
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, image_features.dtype, image_features.shape[0],
                                       negative_only=negative_only)
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        if _overrides(self, SigLipLoss, "get_logits", "get_ground_truth", "_loss"):
            if self.world_size > 1:
                raise NotImplementedError("SigLipLoss: a subclass overriding get_logits / get_ground_truth / _loss "
                                          "runs on one process here (OpenCLIP's exchanges are not reproduced)")
            Fn._pair("image_features", image_features, "text_features", text_features, same_rows=True)
            loss = self._loss(image_features, text_features, logit_scale, logit_bias)
            return {"contrastive_loss": loss} if output_dict else loss
        logit_scale = _one_value(logit_scale, "logit_scale")
        logit_bias = 0.0 if logit_bias is None else _one_value(logit_bias, "logit_bias")
        across = {}
        if self.world_size > 1:
            _check_process_group("SigLipLoss", self.rank, self.world_size)
            # OpenCLIP's neighbour exchanges pass the texts around the ring: so does ours, gradients included.
            across = (dict(distributed="ring") if self.dist_impl in ("bidir", "shift")
                      else dict(gather_distributed=True))
        loss = Fn.siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction=self.reduction,
                              backend=self.backend, **across)
        return {"contrastive_loss": loss} if output_dict else loss


# Elements per stochastic-rounding step: timm's chunk size, which fixes how its private RNG is drawn.
_SR_CHUNK = 1 << 22


@torch.no_grad()
def _stochastic_round_ema_(targets, sources, weight, generator) -> None:
    """bf16 EMA targets with stochastic rounding, drawing the same random bits as timm 1.0.31.

    The update t + weight·(s − t) is formed in fp32; 16 random bits are added below the bf16 mantissa
    and the low half truncated, so the value rounds up with probability equal to the discarded fraction
    (an EMA step of 1e-4 relative, far below bf16's 2^-8 resolution, then accumulates in expectation
    instead of always rounding away). Tensors are concatenated in groups of at most _SR_CHUNK elements and
    one randint is drawn per group, in this order, as timm does: with the same seed the EMA weights are
    identical bit for bit. (A fused kernel would need timm's exact RNG stream; this path stays eager.)
    """
    group, size = [], 0
    for t, s in zip(targets, sources):
        if group and size + t.numel() > _SR_CHUNK:
            _stochastic_round_group_(group, weight, generator)
            group, size = [], 0
        group.append((t, s))
        size += t.numel()
    if group:
        _stochastic_round_group_(group, weight, generator)


def _stochastic_round_group_(pairs, weight, generator) -> None:
    x = torch.cat([t.reshape(-1) for t, _ in pairs]).float()
    x.mul_(1.0 - weight).add_(torch.cat([s.reshape(-1) for _, s in pairs]), alpha=weight)
    bits = x.view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator))
    bits.bitwise_and_(-(1 << 16))  # what is left is exactly a bf16 value: the copy below does not round
    for (t, _), v in zip(pairs, x.split([t.numel() for t, _ in pairs])):
        t.copy_(v.view(t.shape))


def _unit_interval(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        value = value.item()  # timm takes a 0-d tensor decay too
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    return float(value)


class ModelEmaV3(nn.Module):
    """timm's ModelEmaV3 (timm 1.0.31) on the fused multi-tensor EMA: the same constructor
    ``ModelEmaV3(model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
    warmup_gamma=1.0, warmup_power=2/3, device=None, dtype=None, stochastic_rounding=True,
    stochastic_rounding_seed=0, foreach=True, exclude_buffers=False)``, ``update(model, step=None)``,
    ``get_decay(step)``, ``set(model)``, ``forward``, ``.module``, and the same state dict
    (``module.<name>``), so checkpoints load in either class.

    What is averaged, as in timm: every floating-point entry of the model's state dict (parameters and
    persistent buffers such as BatchNorm statistics) is lerped, integer entries are copied; with
    ``exclude_buffers=True`` only parameters are lerped and every buffer (``module.buffers()``, persistent
    or not) is copied. Entries pair up by position, as timm's ``zip``, but a count or shape mismatch is an
    error here instead of a silent truncation.

    How: all lerped pairs go to ``ema_update_`` in one call (one kernel launch per dtype pair on the GPU;
    ``foreach`` is kept as an attribute but changes nothing). bf16 EMA tensors with ``stochastic_rounding``
    (timm's default) take timm's stochastic-rounding algorithm with its private RNG, eagerly, so they
    match timm bit for bit. A tensor listed twice in the state dict (tied weights) is updated once with
    decay², which is what timm's sequential lerp over the list computes. Results agree with timm's to
    fp32 rounding (the kernel forms decay·ema + (1 − decay)·model, timm's lerp ema + w·(model − ema)).
    Beyond timm: ``backend`` (keyword-only) for ``ema_update_``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0, foreach: bool = True,
                 exclude_buffers: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        check.module(model, "model")
        self.decay = _unit_interval(decay, "decay")
        self.min_decay = _unit_interval(min_decay, "min_decay")
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, Integral):
            raise TypeError(f"update_after_step must be an int, got {update_after_step!r}")
        warmup_gamma = _positive_number(warmup_gamma, "warmup_gamma")
        warmup_power = _positive_number(warmup_power, "warmup_power")  # <= 0: a decay that falls as steps go by
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.update_after_step, self.use_warmup = update_after_step, use_warmup
        self.warmup_gamma, self.warmup_power = warmup_gamma, warmup_power
        self.foreach, self.device, self.dtype = foreach, device, dtype
        self.stochastic_rounding, self.stochastic_rounding_seed = stochastic_rounding, stochastic_rounding_seed
        self.exclude_buffers, self.backend = exclude_buffers, backend
        first = next(model.parameters(), None)
        if device is not None and (first is None or device != first.device):
            self.foreach = False  # timm's flag: its foreach ops need one device
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)
        # timm's private RNG for stochastic rounding: the global RNG is untouched, ranks round alike.
        own = next(self.module.parameters(), None)
        self._sr_generator = torch.Generator(device=own.device if own is not None else "cpu")
        self._sr_generator.manual_seed(stochastic_rounding_seed)

    def get_decay(self, step: Optional[int] = None) -> float:
        """timm's schedule: ``decay`` without a step; 0 until ``update_after_step + 1``; then, with
        ``use_warmup``, 1 − (1 + t/γ)^(−power) clamped to [min_decay, decay] (t counted from there)."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
        return max(min(decay, self.decay), self.min_decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        check.module(model, "model")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (Real, torch.Tensor))):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}")
        decay = self.get_decay(step)
        if self.exclude_buffers:
            self.apply_update_no_buffers_(model, decay)
        else:
            self.apply_update_(model, decay)

    def _state_pairs(self, model: nn.Module):
        ema_sd, model_sd = self.module.state_dict(), model.state_dict()
        if len(ema_sd) != len(model_sd):
            raise ValueError(f"model's state dict has {len(model_sd)} entries but the EMA copy's has {len(ema_sd)}; "
                             "pass the model the EMA was made from (unwrapped, e.g. ddp_model.module)")
        pairs = []
        for (key, e), m in zip(ema_sd.items(), model_sd.values()):
            if isinstance(e, torch.Tensor):
                if not isinstance(m, torch.Tensor) or e.shape != m.shape:
                    got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                    raise ValueError(f"model's state dict entry for {key!r} is {got}, the EMA copy's "
                                     f"{tuple(e.shape)}; the two must pair up by position")
                pairs.append((e, m))
        return pairs

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        """Lerp every floating-point state-dict entry towards the model's, copy the others."""
        lerp = []
        for e, m in self._state_pairs(model):
            if e.is_floating_point():
                lerp.append((e, m))
            else:
                e.copy_(m)
        self._ema_(lerp, decay)

    @torch.no_grad()
    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        """Lerp parameters, copy every buffer (exclude_buffers=True)."""
        ema_p, model_p = list(self.module.parameters()), list(model.parameters())
        ema_b, model_b = list(self.module.buffers()), list(model.buffers())
        if len(ema_p) != len(model_p) or len(ema_b) != len(model_b):
            raise ValueError(f"model has {len(model_p)} parameters and {len(model_b)} buffers but the EMA copy has "
                             f"{len(ema_p)} and {len(ema_b)}; pass the model the EMA was made from")
        for e, m in zip(ema_p + ema_b, model_p + model_b):
            if e.shape != m.shape:
                raise ValueError(f"a model tensor of shape {tuple(m.shape)} pairs with an EMA tensor of shape "
                                 f"{tuple(e.shape)}; the two must pair up by position")
        self._ema_(list(zip(ema_p, model_p)), decay)
        for e, m in zip(ema_b, model_b):
            e.copy_(m)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy the model's state into the EMA copy."""
        check.module(model, "model")
        for e, m in self._state_pairs(model):
            e.copy_(m)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)  # as timm: not under no_grad

    def _ema_(self, pairs, decay) -> None:
        """ema ← decay·ema + (1 − decay)·model over (ema, model) pairs, sources moved to the EMA's device."""
        pairs = [(e, m if m.device == e.device else m.to(e.device)) for e, m in pairs]
        if self.stochastic_rounding:
            rounded = [(e, m) for e, m in pairs if e.dtype == torch.bfloat16]
            if rounded:
                pairs = [(e, m) for e, m in pairs if e.dtype != torch.bfloat16]
                # timm draws per tensor in its per-tensor path (foreach off), per group otherwise.
                for chunk in ([rounded] if self.foreach else [[p] for p in rounded]):
                    _stochastic_round_ema_([e for e, _ in chunk], [m for _, m in chunk], 1.0 - decay,
                                           self._sr_generator)
        # One ema_update_ per (device, times listed): tied weights appear under several state-dict keys, and
        # k lerps in a row equal one with decay^k; one launch must not write a tensor twice.
        groups: dict = {}
        seen: dict = {}
        for e, m in pairs:
            key = (e.data_ptr(), e.dtype, e.shape, e.stride()) if e.numel() else None
            if key is not None and key in seen:
                seen[key][0] += 1
                continue
            entry = [1, e, m]
            if key is not None:
                seen[key] = entry
            groups.setdefault(e.device, []).append(entry)
        for entries in groups.values():
            by_count: dict = {}
            for count, e, m in entries:
                by_count.setdefault(count, ([], []))
                by_count[count][0].append(e)
                by_count[count][1].append(m)
            for count, (targets, sources) in by_count.items():
                Fn.ema_update_(targets, sources, decay ** count, backend=self.backend)
