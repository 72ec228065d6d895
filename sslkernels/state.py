"""Training state of momentum methods: the MoCo negative queue and the EMA teacher.

Both keep their counters as device tensors, so a training step never waits on the host (and can be
captured in a CUDA graph).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks as check
from .backends import dispatch
from .distributed import all_gather_rows
from .functional import ema_update_

SCHEDULES = ("cosine", "constant")


class MemoryQueue(nn.Module):
    """A ring buffer of ``size`` negatives of width ``dim`` (MoCo's queue, lightly's memory bank).

    ``queue`` starts as random unit rows (as MoCo and lightly initialise theirs), so it can serve as
    negatives from the first step. ``ptr`` is a 0-d int64 tensor on the queue's device.
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype not in check.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        init = F.normalize(torch.randn(size, dim, device=device, dtype=torch.float32), dim=1)
        self.register_buffer("queue", init.to(dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @property
    def dim(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def enqueue_(self, keys: torch.Tensor, *, normalize: bool = False, process_group=None,
                 backend: Optional[str] = None) -> "MemoryQueue":
        """Write ``keys`` (all ranks' keys, when distributed) at ``ptr`` with wrap-around; advance ``ptr``.

        ``normalize=True`` L2-normalizes the rows on the way in (fused with the cast on the GPU).
        """
        check.features(keys, "keys")
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys have dimension {keys.shape[1]} but the queue holds rows of dimension {self.dim}")
        if keys.device != self.queue.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.queue.device}")
        keys = all_gather_rows(keys.detach(), process_group)
        dispatch("queue_enqueue_", backend, keys.device)(self.queue, self.ptr, keys, bool(normalize))
        return self

    def forward(self) -> torch.Tensor:
        return self.queue

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}"


def scheduled_momentum(step: torch.Tensor, base: float, final: float, total_steps: Optional[int],
                       schedule: str) -> torch.Tensor:
    """The EMA momentum at ``step`` as a device tensor (no host sync).

    cosine (BYOL / DINO): final − (final − base)·(cos(π·t/T) + 1)/2, t clamped to T; without
    ``total_steps`` the momentum stays at ``base``.
    """
    s = step.to(torch.float32)
    if schedule == "constant" or total_steps is None:
        return torch.full_like(s, base)
    frac = torch.clamp(s / total_steps, max=1.0)
    return final - (final - base) * (torch.cos(math.pi * frac) + 1) / 2


class MomentumEncoder(nn.Module):
    """A frozen copy of ``module`` updated by EMA (the teacher / key encoder of BYOL, MoCo, DINO)."""

    def __init__(self, module: nn.Module, momentum: float = 0.996, *, final_momentum: float = 1.0,
                 schedule: str = "cosine", total_steps: Optional[int] = None, buffers: str = "copy"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.base_momentum = check.momentum(momentum)
        self.final_momentum = check.momentum(final_momentum, "final_momentum")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        self.schedule, self.total_steps, self.buffers = schedule, total_steps, buffers
        self.module = copy.deepcopy(module)
        for p in self.module.parameters():
            p.requires_grad_(False)
        dev = next(iter(self.module.parameters()), torch.empty(0)).device
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=dev))

    def momentum_at(self, step: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        s = self.step if step is None else torch.as_tensor(step, device=self.step.device)
        return scheduled_momentum(s, self.base_momentum, self.final_momentum, self.total_steps, self.schedule)

    @torch.no_grad()
    def update_(self, module: nn.Module, step: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        """EMA ``module`` into the copy with the momentum of ``step`` (default: an internal counter)."""
        if step is not None:
            self.step.copy_(torch.as_tensor(step, device=self.step.device))
        m = self.momentum_at()
        ema_update_(self.module, module, m, buffers=self.buffers)
        self.step.add_(1)
        return m

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
