"""torch.distributed helpers: the collectives the state ops need, no home-made transport.

Everything here is the identity when torch.distributed is not initialized or the world has one rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def all_reduce_sum(x: torch.Tensor, group=None, async_op: bool = False):
    """Sum ``x`` over ranks in place; returns ``x`` (or ``(x, work)`` with ``async_op``)."""
    work = dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group, async_op=async_op) if is_distributed(group) else None
    return (x, work) if async_op else x


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along dim 0, rank order; no gradient."""
    if not is_distributed(group):
        return x
    out = torch.empty((world_size(group) * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def requested(gather_distributed: bool, distributed: Optional[str], group=None) -> bool:
    """Whether a contrastive loss was asked to span ranks and there are ranks to span."""
    if distributed not in (None, "ring"):
        raise ValueError(f"distributed must be None or 'ring', got {distributed!r}")
    return bool(gather_distributed or distributed) and is_distributed(group)
