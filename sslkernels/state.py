"""Training state of momentum methods: the MoCo negative queue and the EMA teacher.

Both keep their counters as device tensors, so a training step never waits on the host (and can be
captured in a CUDA graph).
"""
from __future__ import annotations

import copy
import math
from numbers import Integral
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks as check
from .backends import dispatch
from .distributed import all_gather_rows, all_gather_uneven
from .functional import BUFFER_MODES, ema_update_

SCHEDULES = ("cosine", "cosine_epoch", "constant")


def _saved_counter_ok(state_dict, key: str, error_msgs: list, upper: Optional[int], out_of_range: str) -> bool:
    """Whether a checkpoint's counter (a queue pointer, a step), when present as a tensor, is one integer element
    (0-d, or [1] as the official MoCo code saves queue_ptr) in [0, upper); otherwise the reason goes to
    error_msgs (``out_of_range`` says what the range is). Not a hot path: read on the host."""
    value = state_dict.get(key)
    if not isinstance(value, torch.Tensor):
        return True
    if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        error_msgs.append(f"{key}: expected a 0-d integer tensor, got {value.dtype} of shape {tuple(value.shape)}")
        return False
    v = int(value.reshape(()))
    if v < 0 or (upper is not None and v >= upper):
        error_msgs.append(f"{key} = {v} {out_of_range}")
        return False
    return True


class MemoryQueue(nn.Module):
    """A ring buffer of ``size`` negatives of width ``dim`` (MoCo's queue, lightly's memory bank).

    ``queue`` starts as random unit rows (as MoCo and lightly initialise theirs), so it can serve as
    negatives from the first step. ``ptr`` is a 0-d int64 tensor on the queue's device.
    ``state_dict()`` round-trips exactly; a state dict saved on another device or in another dtype loads
    into this queue's device and dtype (and ``ptr`` is checked to lie in [0, size)).
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        size, dim = int(size), int(dim)
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
                 uneven_batches: bool = False, backend: Optional[str] = None) -> "MemoryQueue":
        """Write ``keys`` (all ranks' keys in rank order, when distributed) at ``ptr`` with wrap-around; advance ``ptr``.

        Distributed, every rank must enqueue the same number of rows (DDP with drop_last, as official MoCo
        assumes): one all-gather, no host sync. ``uneven_batches=True`` lets ranks differ (e.g. a last, smaller
        batch): the counts are exchanged first, which costs a second small collective and a host read.

        ``normalize=True`` L2-normalizes the rows on the way in (fused with the cast on the GPU).

        The write counts as an in-place modification for autograd on every backend (the kernels bump the
        queue's version counter): a loss that saved the queue for its backward (``moco_loss``) raises
        PyTorch's in-place error if the queue is enqueued before that backward, instead of differentiating
        against the new contents. Enqueue after ``backward()``, or pass ``queue.clone()`` to the loss to
        keep the official MoCo order (enqueue inside the forward).
        """
        check.features(keys, "keys")
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys have dimension {keys.shape[1]} but the queue holds rows of dimension {self.dim}")
        if keys.device != self.queue.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.queue.device}")
        # Either way every rank's rows arrive in rank order, so every rank writes the same rows at the same ptr.
        keys = (all_gather_uneven(keys.detach(), None, process_group) if uneven_batches
                else all_gather_rows(keys.detach(), process_group))
        dispatch("queue_enqueue_", backend, keys.device)(self.queue, self.ptr, keys, bool(normalize))
        torch.autograd.graph.increment_version(self.queue)  # host-side counter: no sync, graph-capturable
        return self

    def forward(self) -> torch.Tensor:
        return self.queue

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state dict saved on another device or in another queue dtype loads into this queue's device and
        # dtype (nn.Module copies into the existing buffers). ptr may also come as a 1-element tensor (the
        # official MoCo code's queue_ptr layout) or another integer dtype. Not a hot path: checking the
        # value here (a host read) is what lets the kernels trust ptr in [0, size).
        saved = state_dict.get(prefix + "queue")
        if isinstance(saved, torch.Tensor) and saved.shape != self.queue.shape:
            # Reported first: with another size, a ptr outside [0, size) is a symptom, not the cause.
            error_msgs.append(f"size mismatch for {prefix}queue: the checkpoint's queue has shape "
                              f"{tuple(saved.shape)}, this MemoryQueue's {tuple(self.queue.shape)} "
                              f"(size={self.size}, dim={self.dim})")
            return
        key = prefix + "ptr"
        if not _saved_counter_ok(state_dict, key, error_msgs, self.size,
                                 f"is outside [0, {self.size}) for a queue of {self.size} rows"):
            return
        ptr = state_dict.get(key)
        if isinstance(ptr, torch.Tensor):
            state_dict = dict(state_dict)
            state_dict[key] = ptr.reshape(()).to(torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}"


def scheduled_momentum(step: torch.Tensor, base: float, final: float, total_steps: Optional[int],
                       schedule: str, *, steps_per_epoch: Optional[int] = None) -> torch.Tensor:
    """The EMA momentum at ``step`` (an integer tensor) as a float64 tensor on its device (no host sync).

    Schedules (``t`` = step, ``T`` = total_steps, ``S`` = steps_per_epoch):

    - ``"cosine"`` (BYOL / DINO, per step): final − (final − base)·(cos(π·min(t/T, 1)) + 1)/2.
    - ``"cosine_epoch"`` (MoCo v3's cosine, changing once per epoch): the same curve over epochs,
      final − (final − base)·(cos(π·min(⌊t/S⌋ / (T/S), 1)) + 1)/2; needs ``steps_per_epoch``. With
      final = 1 this is MoCo v3's ``1 − (1 − base)·(cos(π·epoch/epochs) + 1)/2`` at whole epochs. (The
      official main_moco.py evaluates that formula at the fractional epoch ``epoch + i/iters_per_epoch``,
      which is ``"cosine"`` with final = 1.)
    - ``"constant"``: base.

    Without ``total_steps`` every schedule stays at ``base``. fp64 keeps 1 − m accurate as m nears 1 (the
    EMA kernels form 1 − m from the tensor before rounding).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "cosine_epoch":
        _check_positive_int(steps_per_epoch, "steps_per_epoch", "schedule='cosine_epoch'")
    s = step.to(torch.float64)
    if schedule == "constant" or total_steps is None:
        return torch.full_like(s, base)
    if schedule == "cosine_epoch":
        # Integer floor division on the device: exact for any step count.
        epoch = torch.div(step.to(torch.int64), steps_per_epoch, rounding_mode="floor").to(torch.float64)
        frac = torch.clamp(epoch / (total_steps / steps_per_epoch), max=1.0)
    else:
        frac = torch.clamp(s / total_steps, max=1.0)
    return final - (final - base) * (torch.cos(math.pi * frac) + 1) / 2


def _check_positive_int(value, name: str, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        need = f" ({why} needs one)" if why else ""
        raise ValueError(f"{name} must be a positive int{need}, got {value!r}")


def _step_tensor(step, device: torch.device) -> torch.Tensor:
    """A schedule step as an integer tensor on ``device``: a non-negative int, or an integer tensor (0-d, not read
    by value: no host sync). A float or a negative step would land silently elsewhere on the schedule."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step must be an int or a 0-d integer tensor, got {step.dtype} of shape {tuple(step.shape)}")
        if step.device.type == "cpu" and device.type != "cpu" and not torch.compiler.is_compiling():
            # A host tensor is read without waiting for the GPU, and filled in as below: step.to(device) would be
            # the synchronous copy from pageable memory again. (Traced, the copy is the graph's to place.)
            return torch.full((), int(step), dtype=step.dtype, device=device)
        return step.to(device)
    if isinstance(step, bool) or not isinstance(step, Integral):
        raise TypeError(f"step must be an int or a 0-d integer tensor, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    # A fill with the int as the kernel's argument: torch.tensor(step, device="cuda") builds it on the host and
    # copies it from pageable memory, which waits for the GPU to finish its queue (a stall on every
    # update_(module, step) of a training loop, as the trainers and the Lightning callback call it).
    return torch.full((), int(step), dtype=torch.long, device=device)


class MomentumEncoder(nn.Module):
    """A frozen copy of ``module`` updated by EMA (the teacher / key encoder of BYOL, MoCo, DINO).

    ``momentum`` goes to ``final_momentum`` over ``total_steps`` along ``schedule`` (see
    :func:`scheduled_momentum`: ``"cosine"``, ``"cosine_epoch"``, ``"constant"``); the step counter is a
    device tensor, so the schedule costs no host sync.

    Keyword arguments beyond docs/API.md:
      steps_per_epoch  needed by ``schedule="cosine_epoch"`` (MoCo v3: the momentum changes once per epoch).
      buffers          what :func:`ema_update_` does with floating-point buffers: "copy" (default), "ema", "skip".
    """

    def __init__(self, module: nn.Module, momentum: float = 0.996, *, final_momentum: float = 1.0,
                 schedule: str = "cosine", total_steps: Optional[int] = None, buffers: str = "copy",
                 steps_per_epoch: Optional[int] = None):
        super().__init__()
        check.module(module, "module")
        self.base_momentum = check.momentum(momentum)
        self.final_momentum = check.momentum(final_momentum, "final_momentum")
        for name, m in (("momentum", self.base_momentum), ("final_momentum", self.final_momentum)):
            # A tensor is not read by value in the training step (no sync); once here, it is.
            if isinstance(m, torch.Tensor) and not bool((m >= 0) & (m <= 1)):
                raise ValueError(f"{name} must be in [0, 1], got {m.item()!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, Integral)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        if schedule == "cosine_epoch" or steps_per_epoch is not None:
            _check_positive_int(steps_per_epoch, "steps_per_epoch",
                                "schedule='cosine_epoch'" if schedule == "cosine_epoch" else "")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        self.schedule, self.buffers = schedule, buffers
        self.total_steps = None if total_steps is None else int(total_steps)  # numpy ints are Integral too
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.module = copy.deepcopy(module)
        for p in self.module.parameters():
            p.requires_grad_(False)
        dev = next(iter(self.module.parameters()), torch.empty(0)).device
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=dev))

    def momentum_at(self, step: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        s = self.step if step is None else _step_tensor(step, self.step.device)
        return scheduled_momentum(s, self.base_momentum, self.final_momentum, self.total_steps, self.schedule,
                                  steps_per_epoch=self.steps_per_epoch)

    @torch.no_grad()
    def update_(self, module: nn.Module, step: Optional[Union[int, torch.Tensor]] = None, *,
                backend: Optional[str] = None) -> torch.Tensor:
        """EMA ``module`` into the copy with the momentum of ``step`` (default: an internal counter);
        ``backend`` as for ema_update_."""
        check.module(module, "module")
        if step is not None:
            self.step.copy_(_step_tensor(step, self.step.device))
        m = self.momentum_at()
        ema_update_(self.module, module, m, buffers=self.buffers, backend=backend)
        self.step.add_(1)
        return m

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The step counter drives the schedule: a float would be truncated into the long buffer and a negative step
        # lands before the schedule's start (cos of a negative fraction), both silently. Not a hot path: read here.
        if not _saved_counter_ok(state_dict, prefix + "step", error_msgs, None,
                                 "is negative; the schedule starts at step 0"):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
