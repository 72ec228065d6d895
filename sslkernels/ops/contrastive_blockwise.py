"""Contrastive losses whose keys arrive in blocks: the ring exchange (``distributed="ring"``) and the
all-gathered keys of NT-Xent, SupCon and SigLIP across ranks.

A rank holds its anchors (queries, already scaled by 1/τ or by SigLIP's logit scale) and meets the keys one
block at a time: the whole gathered key set as one block, or every rank's own keys in turn as they travel
around the ring (distributed.Ring). The block engine never holds more than a chunk of rows × one block of
logits; what it keeps between blocks is O(rows):

* softmax losses: each anchor's running log-sum-exp and its positive logit (SupCon: the sum and count of
  its positives); symmetric losses also a running column LSE per key, which travels with its block;
* SigLIP: each anchor's running sum of pair terms (every pair is independent: no LSE).

The backward recomputes each block's logits from the saved statistics, as the single-GPU kernels do:
dS = g_row·(softmax_row − positive) [+ g_col·(softmax_col − positive)], dQ += dS·K, dK += dSᵀ·Q, and on the
ring dK travels with its block back to its owner. With the ring, memory per rank is O(local rows · D)
whatever the world size.

Indices are global: key rows are numbered rank-major over the whole key set; each anchor carries the global
index of its positive (``targets``) and, for the self-similarity losses, its own global row (``row_ids``),
whose column is left out.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import distributed as _dist

CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}  # logits per chunk: 4 MiB (CPU caches), 128 MiB (GPU matmuls)


class Spec(NamedTuple):
    sigmoid: bool = False       # SigLIP: Σ_j −log σ(±logit_ij) instead of a softmax
    symmetric: bool = False     # CLIP: the keys' column loss against every anchor too (½ each)
    decoupled: bool = False     # DCL: the positive leaves the LSE
    exclude_self: bool = False  # NT-Xent / SupCon: the keys are the anchors' own rows; their own column is out
    supcon: bool = False        # positives are the keys with the anchor's label


def _chunk_rows(m: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(m, 1))


def _hits(ids: torch.Tensor, offset: int, m: int):
    """(rows, columns) of the anchors whose global index ``ids`` falls in the block [offset, offset + m)."""
    inside = (ids >= offset) & (ids < offset + m)
    rows = inside.nonzero().squeeze(1)
    return rows, ids[rows] - offset


class _Block(NamedTuple):
    keys: torch.Tensor              # m × D, compute dtype
    offset: int                     # global index of its first row
    labels: Optional[torch.Tensor]  # SupCon: the keys' labels


class _Chunk(NamedTuple):
    """One chunk of anchors against one block: logits with the masks applied, and where the positives are."""
    logits: torch.Tensor
    pos_rows: torch.Tensor  # positives (target / paired): row and column within the chunk
    pos_cols: torch.Tensor
    pos_mask: Optional[torch.Tensor]  # SupCon: c × m, same label and not the anchor itself


def _logits(spec: Spec, qs, rows: slice, blk: _Block, bias, targets, row_ids, labels) -> _Chunk:
    s = qs[rows] @ blk.keys.T
    m = blk.keys.shape[0]
    empty = torch.empty(0, dtype=torch.long, device=s.device)
    if spec.sigmoid:
        s = s + bias
    pos_mask = None
    if spec.exclude_self:
        self_r, self_c = _hits(row_ids[rows], blk.offset, m)
        s[self_r, self_c] = float("-inf")
    if spec.supcon:
        pos_mask = labels[rows, None] == blk.labels[None, :]
        pos_mask[self_r, self_c] = False
        return _Chunk(s, empty, empty, pos_mask)
    pos_r, pos_c = _hits(targets[rows], blk.offset, m)
    return _Chunk(s, pos_r, pos_c, None)


class _State:
    """What the forward keeps per anchor across blocks (and saves for the backward)."""

    def __init__(self, spec: Spec, n: int, dtype, device):
        self.lse = torch.full((n,), float("-inf"), dtype=dtype, device=device)
        # The positive logit; SupCon: the sum of the positives' logits; SigLIP: the running loss itself.
        self.pos = torch.zeros(n, dtype=dtype, device=device)
        self.count = torch.zeros(n, dtype=torch.long, device=device) if spec.supcon else None
        self.spec = spec

    def consume(self, qs, blk: _Block, bias, targets, row_ids, labels, col=None) -> Optional[torch.Tensor]:
        """Fold one block into the per-anchor state. Symmetric losses: returns the block's column LSE over
        these anchors and the earlier ones' (``col``, updated in place); else None."""
        spec, n, m = self.spec, qs.shape[0], blk.keys.shape[0]
        if spec.symmetric and col is None:
            col = torch.full((m,), float("-inf"), dtype=qs.dtype, device=qs.device)
        step = _chunk_rows(m, qs.device)
        for a in range(0, n, step):
            rows = slice(a, min(n, a + step))
            ch = _logits(spec, qs, rows, blk, bias, targets, row_ids, labels)
            s = ch.logits
            if spec.sigmoid:
                # −log σ(−x) for every pair; a positive pair's −log σ(x) is that minus x.
                self.pos[rows] += -F.logsigmoid(-s).sum(dim=1)
                self.pos[a + ch.pos_rows] -= s[ch.pos_rows, ch.pos_cols]
                continue
            if spec.supcon:
                self.pos[rows] += torch.where(ch.pos_mask, s, torch.zeros_like(s)).sum(dim=1)
                self.count[rows] += ch.pos_mask.sum(dim=1)
            else:
                self.pos[a + ch.pos_rows] = s[ch.pos_rows, ch.pos_cols]
                if spec.decoupled:
                    s[ch.pos_rows, ch.pos_cols] = float("-inf")
            self.lse[rows] = torch.logaddexp(self.lse[rows], torch.logsumexp(s, dim=1))
            if spec.symmetric:
                torch.logaddexp(col, torch.logsumexp(s, dim=0), out=col)
        return col

    def rows(self, col_lse: Optional[torch.Tensor]) -> torch.Tensor:
        if self.spec.sigmoid:
            return self.pos.clone()
        if self.spec.supcon:
            return torch.where(self.count > 0, self.lse - self.pos / self.count.clamp(min=1),
                               torch.zeros_like(self.lse))
        out = self.lse - self.pos
        if col_lse is not None:
            # Key j's column loss: its LSE over every anchor minus its positive, anchor j's own positive logit.
            out = 0.5 * (out + (col_lse - self.pos))
        return out


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """An LSE over nothing (−inf) would make exp(s − lse) NaN where its row's gradient weight is 0 anyway."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def _block_grads(spec: Spec, qs, blk: _Block, bias, targets, row_ids, labels, lse, count, g_rows,
                 col_lse, g_cols, dq: torch.Tensor, dk: Optional[torch.Tensor]):
    """Add this block's dQ into ``dq`` and its dK into ``dk`` (m × D, compute dtype; None: a new one);
    return dK and d bias (SigLIP)."""
    n, m = qs.shape[0], blk.keys.shape[0]
    dk = torch.zeros_like(blk.keys) if dk is None else dk
    dbias = torch.zeros((), dtype=qs.dtype, device=qs.device)
    step = _chunk_rows(m, qs.device)
    for a in range(0, n, step):
        rows = slice(a, min(n, a + step))
        ch = _logits(spec, qs, rows, blk, bias, targets, row_ids, labels)
        s, gr = ch.logits, g_rows[rows]
        if spec.sigmoid:
            ds = torch.sigmoid(s)
            ds[ch.pos_rows, ch.pos_cols] -= 1.0
            ds.mul_(gr[:, None])
            dbias += ds.sum()
        else:
            if spec.decoupled:
                s[ch.pos_rows, ch.pos_cols] = float("-inf")
            # In place where possible: besides the logits a chunk holds one more c × m buffer (memory per rank
            # is what the ring is for).
            ds = s.sub(lse[rows, None]).exp_().mul_(gr[:, None])
            if spec.supcon:
                ds.sub_(ch.pos_mask * (gr / count[rows].clamp(min=1).to(s.dtype))[:, None])
            else:
                ds[ch.pos_rows, ch.pos_cols] -= gr[ch.pos_rows]
            if col_lse is not None:
                ds.add_(s.sub_(col_lse[None, :]).exp_().mul_(g_cols[None, :]))
                ds[ch.pos_rows, ch.pos_cols] -= g_cols[ch.pos_cols]
        dq[rows] += ds @ blk.keys
        dk += ds.T @ qs[rows]
    return dk, dbias


RING_PIECES = 8  # each rank's block travels in up to this many pieces (memory: see distributed.Ring.split)


def _over_blocks(ring, payload, step):
    """step(ring, owner, carry, *block) over every block: the whole ``payload`` when ``ring`` is None, else
    every rank's, piece by piece around the ring. Returns the carry of this rank's rows (None if none)."""
    if ring is None:
        return step(None, 0, None, *payload)
    parts = max(1, min(RING_PIECES, min(ring.sizes)))
    carries = [sub.circulate([t[rows] for t in payload], functools.partial(step, sub))
               for sub, rows in ring.split(parts)]
    return None if carries[0] is None else torch.cat(carries)


class BlockwiseLoss(torch.autograd.Function):
    """Per-anchor losses of ``qs`` (n × D, compute dtype) against keys met block by block.

    ``ring`` None: ``keys`` is the whole key set (offset 0; gathered with its gradient by the caller).
    ``ring`` a distributed.Ring: ``keys`` is this rank's block and the others arrive around the ring.
    Returns (per-anchor losses, per-anchor positive counts: SupCon, else empty).
    """

    @staticmethod
    def forward(ctx, spec: Spec, ring, qs, keys, bias, targets, row_ids, labels, key_labels):
        st = _State(spec, qs.shape[0], qs.dtype, qs.device)
        with torch.no_grad():
            def step(rg, owner, col, k, *lab):
                off = 0 if rg is None else rg.offsets[owner]
                return st.consume(qs, _Block(k.to(qs.dtype), off, lab[0] if lab else None), bias, targets,
                                  row_ids, labels, col)

            col_lse = _over_blocks(ring, [keys] + ([key_labels] if spec.supcon else []), step)
            rows = st.rows(col_lse)
        count = st.count if spec.supcon else torch.empty(0, dtype=torch.long, device=qs.device)
        ctx.mark_non_differentiable(count)
        ctx.spec, ctx.ring = spec, ring
        ctx.save_for_backward(qs, keys, bias, targets, row_ids, labels, key_labels, st.lse, col_lse, count)
        return rows, count

    @staticmethod
    def backward(ctx, g, _g_count):
        spec, ring = ctx.spec, ctx.ring
        qs, keys, bias, targets, row_ids, labels, key_labels, lse, col_lse, count = ctx.saved_tensors
        g = g.to(qs.dtype)
        if spec.supcon:
            g = g * (count > 0)  # anchors without a positive have loss 0
        g_rows, g_cols = (0.5 * g, 0.5 * g) if spec.symmetric else (g, None)
        lse = _finite(lse)
        dq = torch.zeros_like(qs)
        dbias = torch.zeros((), dtype=qs.dtype, device=qs.device)

        def step(rg, owner, dk, k, *meta):
            nonlocal dbias
            meta = list(meta)
            blk_labels = meta.pop(0) if spec.supcon else None
            c_lse, c_g = (meta[0][:, 0], meta[0][:, 1]) if spec.symmetric else (None, None)
            off = 0 if rg is None else rg.offsets[owner]
            dk, db = _block_grads(spec, qs, _Block(k.to(qs.dtype), off, blk_labels), bias, targets, row_ids,
                                  labels, lse, count, g_rows, c_lse, c_g, dq, dk)
            dbias = dbias + db
            return dk

        payload = [keys] + ([key_labels] if spec.supcon else [])
        if spec.symmetric:  # a key's column statistics travel with it: its LSE and its loss's gradient weight
            payload.append(torch.stack([_finite(col_lse), g_cols], dim=1))
        dk = _over_blocks(ring, payload, step)
        dk = dk.to(keys.dtype) if ctx.needs_input_grad[3] else None
        dq = dq if ctx.needs_input_grad[2] else None
        db = dbias.to(bias.dtype) if spec.sigmoid and ctx.needs_input_grad[4] else None
        return None, None, dq, dk, db, None, None, None, None


def keys_across_ranks(keys: torch.Tensor, ring_exchange: bool, group):
    """(the keys the engine starts from, the ring or None, every rank's key count).

    All-gather (with the gradient) unless the ring is asked for; the key dims must agree across ranks (a
    mismatch would otherwise surface as a failed or hung transfer)."""
    sizes, dims = _dist.gather_sizes_and_dims(keys, group)
    if len(set(dims)) != 1:
        raise ValueError(f"the feature dimension differs across ranks: {dims}; every rank must pass the same D")
    if ring_exchange:
        return keys, _dist.Ring(sizes, group), sizes
    return _dist.all_gather_with_grad(keys, sizes, group), None, sizes


def loss(spec: Spec, qs, keys, ring, *, bias=None, targets=None, row_ids=None, labels=None, key_labels=None):
    """The per-anchor losses (and SupCon's positive counts) through :class:`BlockwiseLoss`."""
    none = torch.empty(0, dtype=torch.long, device=qs.device)
    if bias is None:
        bias = torch.zeros((), dtype=qs.dtype, device=qs.device)
    return BlockwiseLoss.apply(spec, ring, qs, keys, bias, none if targets is None else targets,
                               none if row_ids is None else row_ids, none if labels is None else labels,
                               none if key_labels is None else key_labels)
