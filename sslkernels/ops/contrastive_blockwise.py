"""Contrastive losses whose keys arrive in blocks: the ring exchange (``distributed="ring"``) and the
all-gathered keys of NT-Xent, SupCon and SigLIP across ranks.

A rank holds its anchors (raw features ``a`` and their logit scale ``s``: 1/τ, per-anchor 1/τ_i, or SigLIP's
logit_scale) and meets the keys one block at a time: the whole gathered key set as one block (or slices of
it, ``block_rows``), or every rank's own keys in turn as they travel around the ring (distributed.Ring).
What the engine keeps between blocks is O(rows):

* softmax losses: each anchor's running log-sum-exp and its positive logit (SupCon: the sum and count of
  its positives); symmetric losses also a running column LSE per key, which travels with its block;
* SigLIP: each anchor's running sum of pair terms (every pair is independent: no LSE).

The backward recomputes each block's logits from the global statistics, as the single-GPU kernels do:
dS = g_row·(softmax_row − positive) [+ g_col·(softmax_col − positive)], dA += s·dS·K, ∂s += Σ dS ⊙ (A·Kᵀ),
dK += dSᵀ·(s·A), and on the ring dK travels with its block back to its owner. With the ring, memory per
rank is O(local rows · D) whatever the world size.

What one block costs is a path's business (same interface, chosen by device and backend):
  contrastive_blockwise_triton.py  the fused kernels of ops/contrastive.py per block (CUDA tensors; CPU
                                   ones under the interpreter with backend="triton"): input-dtype dots
                                   with fp32 accumulation, statistics in base 2;
  contrastive_blockwise_torch.py   chunked torch matmuls in fp32 (fp64 for fp64 inputs), natural log.

Indices are global: key rows are numbered rank-major over the whole key set; each anchor carries the global
index of its positive (``targets``); the anchors themselves are the contiguous rows
[row_base, row_base + n) of that numbering (``row_base``), whose own column the self-similarity losses leave
out and whose own pair is SigLIP's positive.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import distributed as _dist
from ..backends import resolve, triton_available
from ._common import first_order_only


class Spec(NamedTuple):
    sigmoid: bool = False       # SigLIP: Σ_j −log σ(±logit_ij) instead of a softmax
    symmetric: bool = False     # CLIP: the keys' column loss against every anchor too (½ each)
    decoupled: bool = False     # DCL: the positive leaves the LSE
    exclude_self: bool = False  # NT-Xent / SupCon: the keys are the anchors' own rows; their own column is out
    supcon: bool = False        # positives are the keys with the anchor's label


class Block(NamedTuple):
    keys: torch.Tensor              # m × D, input dtype
    offset: int                     # global index of its first row
    labels: Optional[torch.Tensor]  # SupCon: the keys' labels


class BlockStats(NamedTuple):
    """One block's statistics over this rank's anchors, in the path's log base."""
    val: torch.Tensor              # [n] LSE over the block's kept keys; SigLIP: the sum of pair terms (nats)
    pos: torch.Tensor              # [n] positive logit where the target is in the block, else 0; SupCon: sum
    count: Optional[torch.Tensor]  # [n] SupCon: positives in the block
    col: Optional[torch.Tensor]    # [m] symmetric: the block keys' column LSE over these anchors


class RowGrads(NamedTuple):
    """Global per-anchor statistics the backward of every block reads."""
    lse: torch.Tensor  # row LSE after all blocks (finite), path's base
    g: torch.Tensor    # weight of the softmax term: ∂loss/∂(row loss) (½ of it for symmetric losses)
    w: torch.Tensor    # weight of each positive: g, or g / count for SupCon


def _path(kernels: bool):
    # Imported here: the Triton path needs triton, and both paths build on this module's types.
    if kernels:
        from . import contrastive_blockwise_triton as path
    else:
        from . import contrastive_blockwise_torch as path
    return path.Blocks


def use_kernels(backend: Optional[str], x: torch.Tensor, op: str = "info_nce") -> bool:
    """Whether the Triton path runs the blocks: what ``backend`` resolves to for ``op`` on x's device
    (CUDA: Triton unless "torch"; CPU: the torch path, Triton for "triton" under the interpreter; an
    impossible explicit choice raises as the single-process op does). fp64 stays on the torch path (the
    kernels accumulate in fp32); the compiled extension has no block kernels, so "cuda" takes Triton's."""
    kind = resolve(op, backend, x.device)
    return x.dtype != torch.float64 and (kind == "triton" or (kind == "cuda" and triton_available()))


class _State:
    """What the forward keeps per anchor across blocks (and saves for the backward), in the path's base."""

    def __init__(self, spec: Spec, n: int, base2: bool, dtype, device):
        self.spec = spec
        self.log_add = torch.logaddexp2 if base2 else torch.logaddexp
        self.unit = math.log(2) if base2 else 1.0  # a base-2 log times ln 2 is a natural one
        # Softmax: the running LSE; SigLIP: the running sum of pair terms.
        self.val = torch.full((n,), 0.0 if spec.sigmoid else float("-inf"), dtype=dtype, device=device)
        self.pos = torch.zeros(n, dtype=dtype, device=device)
        self.count = torch.zeros(n, dtype=dtype, device=device) if spec.supcon else None

    def merge(self, b: BlockStats, col: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Fold one block in. Symmetric losses: returns the block keys' column LSE merged into ``col`` (the
        earlier ranks' part, updated in place; None on the block's first visit)."""
        if self.spec.sigmoid:
            self.val += b.val
            return None
        self.val = self.log_add(self.val, b.val)
        # The positive lies in one block; every other block reports exactly 0 for it, so adding is exact.
        self.pos += b.pos
        if self.spec.supcon:
            self.count += b.count
        if not self.spec.symmetric:
            return None
        return b.col if col is None else self.log_add(col, b.col, out=col)

    def rows(self, col_lse: Optional[torch.Tensor]) -> torch.Tensor:
        if self.spec.sigmoid:
            return self.val.clone()
        if self.spec.supcon:
            return torch.where(self.count > 0, (self.val - self.pos / self.count.clamp(min=1)) * self.unit,
                               torch.zeros_like(self.val))
        out = (self.val - self.pos) * self.unit
        if col_lse is not None:
            # Key j's column loss: its LSE over every anchor minus its positive, anchor j's own positive logit.
            out = 0.5 * (out + (col_lse - self.pos) * self.unit)
        return out


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """An LSE over nothing (−inf) would make exp(s − lse) NaN where its row's gradient weight is 0 anyway."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


RING_PIECES = 8  # each rank's block travels in up to this many pieces (memory: see distributed.Ring.split)


def _over_blocks(ring, payload, step, block_rows: Optional[int] = None, min_piece: int = 1):
    """step(offset, carry, *block) over every block: the whole ``payload`` (or its slices of ``block_rows``)
    when ``ring`` is None, else every rank's, piece by piece around the ring (pieces of at least ``min_piece``
    rows where the blocks allow). Returns the carry of this rank's rows (None if none)."""
    if ring is None:
        m = payload[0].shape[0]
        if block_rows is None or block_rows >= m:
            return step(0, None, *payload)
        carries = [step(o, None, *[t[o:o + block_rows] for t in payload]) for o in range(0, m, block_rows)]
    else:
        def on(sub):  # circulate names a block by its owner; step takes its global offset
            return lambda owner, *rest: step(sub.offsets[owner], *rest)

        parts = max(1, min(RING_PIECES, min(ring.sizes) // min_piece))
        carries = [sub.circulate([t[rows] for t in payload], on(sub)) for sub, rows in ring.split(parts)]
    return None if carries[0] is None else torch.cat(carries)


class BlockwiseLoss(torch.autograd.Function):
    """Per-anchor losses of the anchors ``a`` (n × D) at scale ``s`` ([1] or [n]) against keys met block
    by block; gradients for a, s, the keys and SigLIP's bias.

    ``ring`` None: ``keys`` is the whole key set (offset 0; gathered with its gradient by the caller), met
    in slices of ``block_rows`` (None: at once). ``ring`` a distributed.Ring: ``keys`` is this rank's block
    and the others arrive around the ring. ``kernels``: the Triton path (see use_kernels).
    Returns (per-anchor losses, per-anchor positive counts: SupCon, else empty).
    """

    @staticmethod
    def forward(ctx, spec: Spec, ring, kernels: bool, block_rows, a, s, keys, bias, targets, row_base: int,
                labels, key_labels):
        blocks = _path(kernels)(spec, a, s, bias, targets, row_base, labels)
        st = _State(spec, a.shape[0], blocks.base2, blocks.dtype, a.device)
        with torch.no_grad():
            def step(offset, col, k, *lab):
                return st.merge(blocks.forward(Block(k, offset, lab[0] if lab else None)), col)

            col_lse = _over_blocks(ring, [keys] + ([key_labels] if spec.supcon else []), step, block_rows,
                                   blocks.min_piece)
            rows = st.rows(col_lse)
        count = st.count if spec.supcon else torch.empty(0, device=a.device)
        ctx.mark_non_differentiable(count)
        ctx.spec, ctx.ring, ctx.kernels, ctx.block_rows, ctx.row_base = spec, ring, kernels, block_rows, row_base
        ctx.save_for_backward(a, s, keys, bias, targets, labels, key_labels, st.val, col_lse, count)
        return rows, count

    @staticmethod
    @first_order_only
    def backward(ctx, g, _g_count):
        spec, ring = ctx.spec, ctx.ring
        a, s, keys, bias, targets, labels, key_labels, lse, col_lse, count = ctx.saved_tensors
        blocks = _path(ctx.kernels)(spec, a, s, bias, targets, ctx.row_base, labels)
        g = g.to(lse.dtype).contiguous()  # sum()'s gradient comes expanded (stride 0); kernels index it
        if spec.supcon:
            g = g * (count > 0)  # anchors without a positive have loss 0
        g_rows, g_cols = (0.5 * g, 0.5 * g) if spec.symmetric else (g, None)
        rg = RowGrads(_finite(lse), g_rows, g_rows / count.clamp(min=1) if spec.supcon else g_rows)

        def step(offset, dk, k, *meta):
            meta = list(meta)
            blk_labels = meta.pop(0) if spec.supcon else None
            col = (meta[0][:, 0], meta[0][:, 1]) if spec.symmetric else None  # (column LSE, column weight)
            return blocks.backward(Block(k, offset, blk_labels), rg, col, dk)

        payload = [keys] + ([key_labels] if spec.supcon else [])
        if spec.symmetric:  # a key's column statistics travel with it: its LSE and its loss's gradient weight
            payload.append(torch.stack([_finite(col_lse), g_cols], dim=1))
        dk = _over_blocks(ring, payload, step, ctx.block_rows, blocks.min_piece)
        da, gs, dbias = blocks.grads()
        need = ctx.needs_input_grad  # (spec, ring, kernels, block_rows, a, s, keys, bias, ...)
        da = da if need[4] else None
        ds = (gs if s.numel() > 1 else gs.sum().reshape(1)).to(s.dtype) if need[5] else None
        dk = dk.to(keys.dtype) if need[6] else None
        db = dbias.to(bias.dtype).reshape(bias.shape) if spec.sigmoid and need[7] else None
        return None, None, None, None, da, ds, dk, db, None, None, None, None


def keys_across_ranks(keys: torch.Tensor, ring_exchange: bool, group, call: str = "", targets=None):
    """(the keys the engine starts from, the ring or None, every rank's key count).

    All-gather (with the gradient) unless the ring is asked for; the key dims, dtypes and ``call`` (the loss and
    its options, the ring or not) must agree across ranks (a mismatch would otherwise surface as a failed or
    hung transfer, or as one dtype's bytes read as another's), and ``targets`` (indices into every rank's keys)
    must lie in range on every rank: each of these is the same ValueError on every rank."""
    sizes, dims = _dist.gather_sizes_and_dims(keys, group, f"{call} ring={bool(ring_exchange)}", targets)
    if len(set(dims)) != 1:
        raise ValueError(f"the feature dimension differs across ranks: {dims}; every rank must pass the same D")
    if ring_exchange:
        return keys, _dist.Ring(sizes, group), sizes
    return _dist.all_gather_with_grad(keys, sizes, group), None, sizes


def loss(spec: Spec, a, s, keys, ring, *, bias=None, targets=None, row_base: int = 0, labels=None,
         key_labels=None, backend: Optional[str] = None, op: str = "info_nce", block_rows: Optional[int] = None):
    """The per-anchor losses (and SupCon's positive counts) through :class:`BlockwiseLoss`.

    ``s``: a [1] or [n] float tensor (fp32; fp64 for fp64 features); ``bias``: SigLIP's, [1] or 0-d.
    ``backend`` / ``op``: which path runs (use_kernels)."""
    none = torch.empty(0, dtype=torch.long, device=a.device)
    if bias is None:
        bias = torch.zeros(1, dtype=s.dtype, device=a.device)
    return BlockwiseLoss.apply(spec, ring, use_kernels(backend, a, op), block_rows, a, s, keys, bias,
                               none if targets is None else targets, int(row_base),
                               none if labels is None else labels, none if key_labels is None else key_labels)
