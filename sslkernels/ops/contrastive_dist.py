"""Contrastive losses across the ranks of a process group (``gather_distributed=True``).

Each rank's queries meet the keys of every rank (all-gathered with their gradient, ranks may hold different
batch sizes), positives are located by global index, and each rank's loss is the mean (or sum, or the
vector) over its LOCAL rows: lightly's and OpenCLIP's (local_loss=True, gather_with_grad=True) convention.
The all-gather's backward sums the gradient over ranks, so with equal batches a row's gradient is
world_size × its gradient under the single-process mean over the concatenated batch, and DDP's averaging of
parameter gradients gives back the single-process step.

info_nce and clip_loss call the single-process implementation (fused kernels included) with the gathered
keys and global targets. nt_xent and supcon_loss must leave each anchor's own column out at a global
offset, which no kernel takes yet: they materialize the local n × N_global logits (as OpenCLIP and lightly do).
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .. import distributed as _dist
from .. import reference as ref
from ..backends import dispatch


def _offset(sizes, group) -> int:
    return sum(sizes[:_dist.rank(group)])


def _self_mask(n: int, total: int, offset: int, device) -> torch.Tensor:
    """n × total, True at (i, offset + i): local row i's own column among the gathered rows."""
    mask = torch.zeros(n, total, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    mask[rows, rows + offset] = True
    return mask


def info_nce(query, key, temperature, targets, symmetric, decoupled, reduction, group, backend):
    impl = dispatch("info_nce", backend, query.device)
    n = query.shape[0]
    sizes = _dist.gather_sizes(key.shape[0], key.device, group)
    keys = _dist.all_gather_with_grad(key, sizes, group)
    local = torch.arange(n, device=query.device) + _offset(sizes, group)
    if targets is None:
        targets = local  # paired rows: local row i's positive is this rank's key i
    else:
        check.index_range(targets, "targets", keys.shape[0])
    rows = impl(query, keys, temperature, targets, False, decoupled, "none")
    if symmetric:
        # Column loss of local key j: against every rank's queries (n == m on every rank, so query and key
        # offsets agree). A per-anchor τ belongs to the query rows; dividing the queries by it before the
        # gather keeps logits[i, j] = q_i·k_j / τ_i in the column view, which then runs at τ = 1.
        if isinstance(temperature, torch.Tensor) and temperature.dim() == 1:
            scaled = (query / temperature[:, None].to(query.dtype)).to(query.dtype)
            queries, col_t = _dist.all_gather_with_grad(scaled, sizes, group), 1.0
        else:
            queries, col_t = _dist.all_gather_with_grad(query, sizes, group), temperature
        rows = 0.5 * (rows + impl(key, queries, col_t, local, False, decoupled, "none"))
    return ref.reduce(rows, reduction)


def clip_loss(image_features, text_features, logit_scale, reduction, group, backend):
    # logits = s · image @ text.T is InfoNCE at τ = 1/s (a 0-d tensor scale keeps its gradient through 1/s).
    return info_nce(image_features, text_features, 1.0 / logit_scale, None, True, False, reduction, group, backend)


def nt_xent(z1, z2, temperature, decoupled, reduction, group):
    n = z1.shape[0]
    local = torch.cat([z1, z2])
    sizes = _dist.gather_sizes(2 * n, z1.device, group)
    # Rank-major (z1_r, z2_r) blocks: another order of the single-process Z, same per-row losses.
    z = _dist.all_gather_with_grad(local, sizes, group)
    off = _offset(sizes, group)
    logits = ref._divide_by_temperature(ref._up(local) @ ref._up(z).T, temperature)
    logits = logits.masked_fill(_self_mask(2 * n, z.shape[0], off, z1.device), float("-inf"))
    targets = off + (torch.arange(2 * n, device=z1.device) + n) % (2 * n)
    return ref.reduce(ref._ce_rows(logits, targets, decoupled), reduction)


def supcon_loss(features, labels, temperature, reduction, group):
    n = features.shape[0]
    sizes = _dist.gather_sizes(n, features.device, group)
    everyone = _dist.all_gather_with_grad(features, sizes, group)
    all_labels = _dist.all_gather_uneven(labels, sizes, group)
    f, g = ref._up(features), ref._up(everyone)
    logits = (f @ g.T) / ref._scalar(temperature, f)
    self_mask = _self_mask(n, g.shape[0], _offset(sizes, group), f.device)
    # Mean over this rank's anchors that have a positive on any rank.
    return ref.supcon_rows(logits, labels, all_labels, self_mask, reduction)
