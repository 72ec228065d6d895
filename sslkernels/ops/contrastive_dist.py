"""Contrastive losses across the ranks of a process group (``gather_distributed=True`` / ``distributed="ring"``).

Each rank's queries meet the keys of every rank (ranks may hold different batch sizes), positives are located
by global index, and each rank's loss is the mean (or sum, or the vector) over its LOCAL rows: lightly's and
OpenCLIP's (local_loss=True, gather_with_grad=True) convention. Every rank's keys reach every rank either
all-gathered with their gradient (whose backward sums over ranks) or around the ring (whose backward carries
each key's gradient back to its owner through every rank): either way, with equal batches a row's gradient
is world_size × its gradient under the single-process mean over the concatenated batch, and DDP's averaging
of parameter gradients gives back the single-process step.

All-gather: info_nce and clip_loss run the single-process implementation (fused kernels included) on the
gathered keys with global targets; nt_xent, supcon_loss and siglip_loss leave each anchor's own column at a
global offset (or pair it there), which the block engine (contrastive_blockwise.py) takes, chunk by chunk.
Ring: every loss runs the block engine on one rank's block at a time (memory flat in the world size).
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .. import distributed as _dist
from .. import reference as ref
from ..backends import dispatch
from . import contrastive_blockwise as blockwise
from ._common import scaled_rows


def _offset(sizes, group) -> int:
    return sum(sizes[:_dist.rank(group)])


def info_nce(query, key, temperature, targets, symmetric, decoupled, reduction, group, backend, ring=False):
    if ring:
        return _ring_info_nce(query, key, temperature, targets, symmetric, decoupled, reduction, group)
    impl = dispatch("info_nce", backend, query.device)
    n = query.shape[0]
    keys, _, sizes = blockwise.keys_across_ranks(key, False, group)
    local = _row_ids(n, sizes, group, query.device)
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


def clip_loss(image_features, text_features, logit_scale, reduction, group, backend, ring=False):
    # logits = s · image @ text.T is InfoNCE at τ = 1/s (a 0-d tensor scale keeps its gradient through 1/s).
    return info_nce(image_features, text_features, 1.0 / logit_scale, None, True, False, reduction, group, backend,
                    ring)


def _row_ids(n: int, sizes, group, device) -> torch.Tensor:
    """Global indices of this rank's n rows among every rank's (rank-major)."""
    return _offset(sizes, group) + torch.arange(n, device=device)


def _ring_info_nce(query, key, temperature, targets, symmetric, decoupled, reduction, group):
    keys, ring, sizes = blockwise.keys_across_ranks(key, True, group)
    if targets is None:
        targets = _row_ids(query.shape[0], sizes, group, query.device)  # local row i's positive: this rank's key i
    else:
        check.index_range(targets, "targets", sum(sizes))
    # logits = (q_i / τ_i)·k_j: a per-anchor τ stays with its row in the column view of symmetric losses.
    qs = scaled_rows(query, 1.0 / temperature)
    rows, _ = blockwise.loss(blockwise.Spec(symmetric=symmetric, decoupled=decoupled), qs, keys, ring,
                             targets=targets)
    return ref.reduce(rows, reduction)


def nt_xent(z1, z2, temperature, decoupled, reduction, group, ring=False):
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    # Rank-major (z1_r, z2_r) blocks: another order of the single-process Z, same per-row losses.
    keys, rg, sizes = blockwise.keys_across_ranks(z, ring, group)
    ids = _row_ids(2 * n, sizes, group, z.device)
    targets = ids[0] + (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    rows, _ = blockwise.loss(blockwise.Spec(decoupled=decoupled, exclude_self=True),
                             scaled_rows(z, 1.0 / temperature), keys, rg, targets=targets, row_ids=ids)
    return ref.reduce(rows, reduction)


def supcon_loss(features, labels, temperature, reduction, group, ring=False):
    keys, rg, sizes = blockwise.keys_across_ranks(features, ring, group)
    key_labels = labels if ring else _dist.all_gather_uneven(labels, sizes, group)
    rows, count = blockwise.loss(blockwise.Spec(exclude_self=True, supcon=True),
                                 scaled_rows(features, 1.0 / temperature), keys, rg,
                                 row_ids=_row_ids(features.shape[0], sizes, group, features.device),
                                 labels=labels, key_labels=key_labels)
    if reduction == "mean":
        # Mean over this rank's anchors that have a positive on some rank (0, graph kept, if none has).
        has_pos = count > 0
        return rows.sum() / has_pos.sum().clamp(min=1)
    return ref.reduce(rows, reduction)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction, group, ring=False):
    # Image i's positive is its own text (global index = its own); every other rank's texts are negatives,
    # as OpenCLIP's SigLipLoss over ranks, whose per-rank loss is also the sum over pairs / local rows.
    keys, rg, sizes = blockwise.keys_across_ranks(text_features, ring, group)
    ims = scaled_rows(image_features, logit_scale)
    bias = logit_bias.to(ims.dtype) if isinstance(logit_bias, torch.Tensor) else torch.tensor(
        float(logit_bias), dtype=ims.dtype, device=ims.device)
    rows, _ = blockwise.loss(blockwise.Spec(sigmoid=True), ims, keys, rg, bias=bias,
                             targets=_row_ids(ims.shape[0], sizes, group, ims.device))
    return ref.reduce(rows, reduction)
