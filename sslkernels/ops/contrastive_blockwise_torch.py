"""One key block of the block engine (contrastive_blockwise.py) in chunked torch matmuls: the CPU path,
``backend="torch"``, and fp64 features.

The anchors are scaled once, qs = s·a in the compute dtype (fp32; fp64 for fp64 inputs), so a block's logits
are qs·Kᵀ; a chunk of anchor rows × the block's keys is the most that exists at a time. The backward collects
dQs and turns it into the gradients of the engine's inputs at the end: dA = s·dQs and ∂s_i = Σ_d dQs ⊙ A.
Statistics are natural logs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .contrastive_blockwise import Block, BlockStats, RowGrads, Spec

CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}  # logits per chunk: 4 MiB (CPU caches), 128 MiB (GPU matmuls)


def _chunk_rows(m: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(m, 1))


def _hits(ids: torch.Tensor, offset: int, m: int):
    """(rows, columns) of the anchors whose global index ``ids`` falls in the block [offset, offset + m)."""
    inside = (ids >= offset) & (ids < offset + m)
    rows = inside.nonzero().squeeze(1)
    return rows, ids[rows] - offset


class _Chunk(NamedTuple):
    """One chunk of anchors against one block: logits with the masks applied, and where the positives are."""
    logits: torch.Tensor
    pos_rows: torch.Tensor  # positives (target / SigLIP's own pair): row and column within the chunk
    pos_cols: torch.Tensor
    pos_mask: Optional[torch.Tensor]  # SupCon: c × m, same label and not the anchor itself


class Blocks:
    """The torch path: ``forward(block)`` -> BlockStats, ``backward(block, ...)`` -> the block's dK,
    ``grads()`` -> (dA, per-row ∂s, d bias) over every block the backward met."""
    base2 = False
    min_piece = 1  # ring pieces: as small as RING_PIECES allows (chunks cost the same however they come)

    def __init__(self, spec: Spec, a, s, bias, targets, row_base: int, labels):
        self.spec, self.a, self.targets, self.labels = spec, a, targets, labels
        self.dtype = torch.promote_types(a.dtype, torch.float32)
        self.s = s.to(self.dtype)
        self.qs = a.to(self.dtype) * self._per_row(self.s)
        self.bias = bias.to(self.dtype)
        # Global index of each anchor: its own column (exclude_self) and SigLIP's positive pair.
        self.ids = row_base + torch.arange(a.shape[0], device=a.device)
        self.dq = torch.zeros_like(self.qs)
        self.dbias = torch.zeros((), dtype=self.dtype, device=a.device)

    def _per_row(self, s):
        return s[:, None] if s.numel() > 1 else s

    def _logits(self, rows: slice, keys, offset: int, key_labels) -> _Chunk:
        spec = self.spec
        s = self.qs[rows] @ keys.T
        m = keys.shape[0]
        if spec.sigmoid:
            pos_r, pos_c = _hits(self.ids[rows], offset, m)
            return _Chunk(s + self.bias, pos_r, pos_c, None)
        if spec.exclude_self:
            self_r, self_c = _hits(self.ids[rows], offset, m)
            s[self_r, self_c] = float("-inf")
        if spec.supcon:
            pos_mask = self.labels[rows, None] == key_labels[None, :]
            if spec.exclude_self:
                pos_mask[self_r, self_c] = False
            empty = torch.empty(0, dtype=torch.long, device=s.device)
            return _Chunk(s, empty, empty, pos_mask)
        pos_r, pos_c = _hits(self.targets[rows], offset, m)
        return _Chunk(s, pos_r, pos_c, None)

    def _chunks(self, m: int):
        n, step = self.qs.shape[0], _chunk_rows(m, self.qs.device)
        return ((a, slice(a, min(n, a + step))) for a in range(0, n, step))

    def forward(self, blk: Block) -> BlockStats:
        spec, n, m = self.spec, self.qs.shape[0], blk.keys.shape[0]
        keys = blk.keys.to(self.dtype)
        val = torch.full((n,), 0.0 if spec.sigmoid else float("-inf"), dtype=self.dtype, device=keys.device)
        pos = torch.zeros_like(val)
        count = torch.zeros_like(val) if spec.supcon else None
        col = torch.full((m,), float("-inf"), dtype=self.dtype, device=keys.device) if spec.symmetric else None
        for a, rows in self._chunks(m):
            ch = self._logits(rows, keys, blk.offset, blk.labels)
            s = ch.logits
            if spec.sigmoid:
                # −log σ(−x) for every pair; a positive pair's −log σ(x) is that minus x.
                val[rows] = -F.logsigmoid(-s).sum(dim=1)
                val[a + ch.pos_rows] -= s[ch.pos_rows, ch.pos_cols]
                continue
            if spec.supcon:
                pos[rows] = torch.where(ch.pos_mask, s, torch.zeros_like(s)).sum(dim=1)
                count[rows] = ch.pos_mask.sum(dim=1).to(self.dtype)
            else:
                pos[a + ch.pos_rows] = s[ch.pos_rows, ch.pos_cols]
                if spec.decoupled:
                    s[ch.pos_rows, ch.pos_cols] = float("-inf")
            val[rows] = torch.logsumexp(s, dim=1)
            if spec.symmetric:
                torch.logaddexp(col, torch.logsumexp(s, dim=0), out=col)
        return BlockStats(val, pos, count, col)

    def backward(self, blk: Block, rg: RowGrads, col, dk: Optional[torch.Tensor]) -> torch.Tensor:
        """Add the block's dQs into this path's and its dK into ``dk`` (None: a new one); return dK."""
        spec, m = self.spec, blk.keys.shape[0]
        keys = blk.keys.to(self.dtype)
        dk = torch.zeros_like(keys) if dk is None else dk
        for a, rows in self._chunks(m):
            ch = self._logits(rows, keys, blk.offset, blk.labels)
            s, gr = ch.logits, rg.g[rows]
            if spec.sigmoid:
                ds = torch.sigmoid(s)
                ds[ch.pos_rows, ch.pos_cols] -= 1.0
                ds.mul_(gr[:, None])
                self.dbias += ds.sum()
            else:
                if spec.decoupled:
                    s[ch.pos_rows, ch.pos_cols] = float("-inf")
                # In place where possible: besides the logits a chunk holds one more c × m buffer (memory per
                # rank is what the ring is for).
                ds = s.sub(rg.lse[rows, None]).exp_().mul_(gr[:, None])
                w = rg.w[rows]
                if spec.supcon:
                    ds.sub_(ch.pos_mask * w[:, None])
                else:
                    ds[ch.pos_rows, ch.pos_cols] -= w[ch.pos_rows]
                if col is not None:
                    c_lse, c_g = col
                    ds.add_(s.sub_(c_lse[None, :]).exp_().mul_(c_g[None, :]))
                    ds[ch.pos_rows, ch.pos_cols] -= c_g[ch.pos_cols]
            self.dq[rows] += ds @ keys
            dk += ds.T @ self.qs[rows]
        return dk

    def grads(self):
        """(dA in a's dtype, ∂loss/∂s_i per row, d bias): qs = s·a, so dA = s·dQs and ∂s_i = Σ_d dQs ⊙ a."""
        da = (self.dq * self._per_row(self.s)).to(self.a.dtype)
        return da, (self.dq * self.a.to(self.dtype)).sum(dim=1), self.dbias
