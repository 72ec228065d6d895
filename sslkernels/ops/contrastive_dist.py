"""Contrastive losses across the ranks of a process group (``gather_distributed=True`` / ``distributed="ring"``).

Each rank's queries meet the keys of every rank (ranks may hold different batch sizes), positives are located
by global index, and each rank's loss is the mean (or sum, or the vector) over its LOCAL rows: lightly's and
OpenCLIP's (local_loss=True, gather_with_grad=True) convention. Every rank's keys reach every rank either
all-gathered with their gradient (whose backward sums over ranks) or around the ring (whose backward carries
each key's gradient back to its owner through every rank): either way, with equal batches a row's gradient
is world_size × its gradient under the single-process mean over the concatenated batch, and DDP's averaging
of parameter gradients gives back the single-process step.

All-gather: info_nce and clip_loss run the single-process implementation (fused kernels included) on the
gathered keys with global targets (symmetric info_nce with a per-anchor τ takes the ring: see info_nce);
nt_xent, supcon_loss and siglip_loss leave each anchor's own column at a global offset (or pair it there),
which the block engine (contrastive_blockwise.py) takes.
Ring: every loss runs the block engine on one rank's block at a time (memory flat in the world size).
The engine gets the raw features and the logit scale s (1/τ or logit_scale, [1] or per anchor), so the
scale's gradient comes from it, and runs Triton per block where ``backend`` says so (on CUDA by default).
"""
from __future__ import annotations

import torch

from .. import distributed as _dist
from .. import reference as ref
from ..backends import dispatch
from . import contrastive_blockwise as blockwise
from ._common import row_scale


def _scale(value, invert: bool, x: torch.Tensor) -> torch.Tensor:
    """s as the block engine takes it: [1] or [n], fp32 (fp64 for fp64 features), with τ's gradient."""
    return row_scale(value, invert, x.device, torch.promote_types(x.dtype, torch.float32))


def _offset(sizes, group) -> int:
    return sum(sizes[:_dist.rank(group)])


def info_nce(query, key, temperature, targets, symmetric, decoupled, reduction, group, backend, ring=False):
    if symmetric and isinstance(temperature, torch.Tensor) and temperature.dim() == 1:
        # Symmetric with a per-anchor τ, all-gather asked for or not, takes the block engine around the ring. The
        # column view needs each query's own τ_i; folding it into the queries before the gather (q_i / τ_i) would
        # round τ and q/τ to bf16 / fp16 (~1e-2 off in the loss and in τ's gradient), and keeping q/τ exact would
        # gather it in fp32 (twice the bytes, each way) and run the column kernels in fp32 (TF32 where allowed,
        # which rounds it again). The engine keeps s_i = 1/τ_i in fp32 beside the raw features, and the ring moves
        # fewer bytes than the two gathers with their gradient all-reduces: the keys each way plus an fp32 key-
        # gradient carry, no queries. (A rank passing a 0-d τ meanwhile makes another call: the ranks' call check
        # raises on every rank.)
        ring = True
    if ring:
        return _ring_info_nce(query, key, _scale(temperature, True, query), targets, symmetric, decoupled,
                              reduction, group, backend, "info_nce")
    impl = dispatch("info_nce", backend, query.device)
    n = query.shape[0]
    keys, _, sizes = blockwise.keys_across_ranks(key, False, group, _call("info_nce", targets, symmetric, decoupled),
                                                 targets)
    local = _row_ids(n, sizes, group, query.device)
    if targets is None:
        targets = local  # paired rows: local row i's positive is this rank's key i
    rows = impl(query, keys, temperature, targets, False, decoupled, "none")
    if symmetric:
        # Column loss of local key j: against every rank's queries (n == m on every rank, so query and key
        # offsets agree) at the one τ (a per-anchor τ went around the ring above).
        queries = _dist.all_gather_with_grad(query, sizes, group)
        rows = 0.5 * (rows + impl(key, queries, temperature, local, False, decoupled, "none"))
    return ref.reduce(rows, reduction)


def clip_loss(image_features, text_features, logit_scale, reduction, group, backend, ring=False):
    if ring:
        return _ring_info_nce(image_features, text_features, _scale(logit_scale, False, image_features), None,
                              True, False, reduction, group, backend, "clip_loss")
    # logits = s · image @ text.T is InfoNCE at τ = 1/s (a 0-d tensor scale keeps its gradient through 1/s). A
    # bf16 / fp16 scale is inverted in fp32 (as _scale and contrastive_cpu._inverse do): its own dtype would round
    # 1/s (up to 2⁻⁹ off in bf16, and every logit with it) and pass τ's gradient, s²·∂L/∂s, through fp16 (inf once
    # it passes 65504: at s = 100 when |∂L/∂s| > 6.5).
    tau = 1.0 / (logit_scale.to(torch.promote_types(logit_scale.dtype, torch.float32))
                 if isinstance(logit_scale, torch.Tensor) else logit_scale)
    return info_nce(image_features, text_features, tau, None, True, False, reduction, group, backend)


def _call(op: str, targets, symmetric: bool, decoupled: bool) -> str:
    """What the ranks must agree on besides the keys: the loss and the options that shape its collectives."""
    return f"{op} targets={targets is not None} symmetric={bool(symmetric)} decoupled={bool(decoupled)}"


def _row_ids(n: int, sizes, group, device) -> torch.Tensor:
    """Global indices of this rank's n rows among every rank's (rank-major)."""
    return _offset(sizes, group) + torch.arange(n, device=device)


def _ring_info_nce(query, key, s, targets, symmetric, decoupled, reduction, group, backend, op):
    keys, ring, sizes = blockwise.keys_across_ranks(key, True, group, _call(op, targets, symmetric, decoupled),
                                                    targets)
    if targets is None:
        targets = _row_ids(query.shape[0], sizes, group, query.device)  # local row i's positive: this rank's key i
    # logits = s_i·(q_i·k_j): a per-anchor scale stays with its row in the column view of symmetric losses.
    rows, _ = blockwise.loss(blockwise.Spec(symmetric=symmetric, decoupled=decoupled), query, s, keys, ring,
                             targets=targets, row_base=_offset(sizes, group), backend=backend, op=op)
    return ref.reduce(rows, reduction)


def nt_xent(z1, z2, temperature, decoupled, reduction, group, backend=None, ring=False):
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    # Rank-major (z1_r, z2_r) blocks: another order of the single-process Z, same per-row losses.
    keys, rg, sizes = blockwise.keys_across_ranks(z, ring, group, _call("nt_xent", None, False, decoupled))
    base = _offset(sizes, group)
    targets = base + (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    rows, _ = blockwise.loss(blockwise.Spec(decoupled=decoupled, exclude_self=True), z, _scale(temperature, True, z),
                             keys, rg, targets=targets, row_base=base, backend=backend, op="nt_xent")
    return ref.reduce(rows, reduction)


def supcon_loss(features, labels, temperature, reduction, group, backend=None, ring=False):
    labels = labels.long()  # one label dtype on every rank: int32 here and int64 there would not transfer
    keys, rg, sizes = blockwise.keys_across_ranks(features, ring, group, "supcon_loss")
    key_labels = labels if ring else _dist.all_gather_uneven(labels, sizes, group)
    rows, count = blockwise.loss(blockwise.Spec(exclude_self=True, supcon=True), features,
                                 _scale(temperature, True, features), keys, rg, row_base=_offset(sizes, group),
                                 labels=labels, key_labels=key_labels, backend=backend, op="supcon_loss")
    if reduction == "mean":
        # Mean over this rank's anchors that have a positive on some rank (0, graph kept, if none has).
        has_pos = count > 0
        return rows.sum() / has_pos.sum().clamp(min=1)
    return ref.reduce(rows, reduction)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction, group, backend=None,
                ring=False):
    # Image i's positive is its own text (global index = its own: row_base + i); every other rank's texts are
    # negatives, as OpenCLIP's SigLipLoss over ranks, whose per-rank loss is also the sum over pairs / local rows.
    keys, rg, sizes = blockwise.keys_across_ranks(text_features, ring, group, "siglip_loss")
    rows, _ = blockwise.loss(blockwise.Spec(sigmoid=True), image_features, _scale(logit_scale, False, image_features),
                             keys, rg, bias=_scale(logit_bias, False, image_features),
                             row_base=_offset(sizes, group), backend=backend, op="siglip_loss")
    return ref.reduce(rows, reduction)
