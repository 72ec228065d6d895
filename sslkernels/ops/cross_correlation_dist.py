"""Barlow Twins across ranks as lightly and solo-learn compute it: each rank batch-normalizes its own rows,
and the ranks' cross-correlations C_r = A_rᵀB_r / n_r are averaged before the loss.

The average needs the D×D matrix itself (one all-reduce of it), so this is plain torch, not the fused path of
cross_correlation.py, which never forms C. The two libraries differ in the gradient only:

- lightly all-reduces with ``torch.distributed.nn.all_reduce`` (differentiable): every rank's C_r receives the
  sum over ranks of dL/dC̄, divided by the world size;
- solo-learn all-reduces C in place (outside autograd) and divides by the world size: each rank's C_r receives
  its own dL/dC̄, divided by the world size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cross_correlation import BN_EPS


def barlow_twins_across_ranks(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float, *,
                              differentiable_reduce: bool, group=None) -> torch.Tensor:
    """Σ(1 − C̄_ii)² + λ·Σ_{i≠j} C̄_ij² with C̄ the ranks' mean cross-correlation (module docstring);
    ``differentiable_reduce``: lightly's gradient (True) or solo-learn's (False)."""
    if z1.shape[0] < 2:
        raise ValueError("z1 needs at least 2 rows: Barlow Twins normalizes each feature over the batch")
    world = dist.get_world_size(group)
    a, b = (F.batch_norm(z, None, None, training=True, eps=BN_EPS) for z in (z1, z2))
    corr = a.T @ b / z1.shape[0]
    if differentiable_reduce:
        from torch.distributed.nn.functional import all_reduce  # here: it imports the RPC machinery

        corr = all_reduce(corr / world, group=group or dist.group.WORLD)
    else:
        total = corr.detach().clone()
        dist.all_reduce(total, group=group)
        corr = (corr + (total - corr.detach())) / world  # the ranks' mean; the gradient of this rank's term
    eye = torch.eye(corr.shape[0], dtype=corr.dtype, device=corr.device)
    sq = (corr - eye).pow(2)
    return (sq * eye).sum() + lambda_offdiag * (sq * (1 - eye)).sum()
