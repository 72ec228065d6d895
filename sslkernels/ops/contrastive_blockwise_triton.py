"""One key block of the block engine (contrastive_blockwise.py) on the fused kernels of ops/contrastive.py.

No kernel of its own: a block is a cross loss of this rank's anchors against m keys, which is what the
single-process kernels compute, given three runtime arguments they take for this (the single-process
callers pass their neutral values):
  diag_off = block offset − row_base: key c of the block is anchor c + diag_off (the column the
      self-similarity losses leave out, SigLIP's positive pair, a decoupled symmetric loss's column positive);
  targets − block offset: a row whose target lies outside [0, m) matches no column of this block;
  key_labels: the block's own labels (SupCon).
Forward: the rows pass gives the block's row LSE (base 2), positive logit and SupCon count; a symmetric
loss adds the columns pass, the block keys' LSE over these anchors. Backward: the rows pass with the GLOBAL
row LSE (and the keys' global column LSE) gives dA, ∂s per row and SigLIP's Σ dS; the cols pass gives dK.
The kernels are chosen as for one process (_forward_stats: a fixed shift bounding this block's logits, the
column sums of a symmetric loss from the same exps, a repair pass decided on the device; the one-exp
backward for symmetric losses, guarded by its device flag); only the self-similarity reuse does not apply,
a block's keys not being the anchors. Partial gradients stay fp32 across blocks.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import device_guard
from . import launch_config
from ._common import empty
from .contrastive import (POS_LABEL, POS_NONE, POS_TARGET, _BwdStats, _combine_bwd_rows, _features,
                          _forward_stats, _guarded, _launch_bwd_cols, _launch_bwd_rows, _Mode,
                          _one_exp_factors)
from .contrastive_blockwise import Block, BlockStats, RowGrads, Spec

F32 = torch.float32


class Blocks:
    """The Triton path, with the torch path's interface (contrastive_blockwise_torch.Blocks)."""
    base2 = True
    dtype = F32
    # Ring pieces of at least this many keys: the dK pass runs one program per 64 keys of a block and does
    # not split the anchors it streams, so 8192 keys make 128 programs, about one per SM of an H100 (132).
    # Untuned (no multi-GPU run yet); smaller blocks only cost occupancy, the ring's memory is small here.
    min_piece = 8192

    def __init__(self, spec: Spec, a, s, bias, targets, row_base: int, labels):
        self.spec, self.row_base, self.out_dtype = spec, row_base, a.dtype
        self.a = _features(a)  # unit-stride rows; bf16 becomes fp32 under the interpreter only
        self.s = s.to(F32).contiguous()
        self.bias = bias.to(F32).reshape(1) if spec.sigmoid else None
        self.targets = targets if not (spec.sigmoid or spec.supcon) else None
        self.labels = labels.contiguous() if spec.supcon else None
        pos = POS_NONE if spec.sigmoid else POS_LABEL if spec.supcon else POS_TARGET
        self.mode = _Mode(pos, excl_diag=spec.exclude_self, excl_tgt=spec.decoupled, two_sided=spec.symmetric,
                          sigmoid=spec.sigmoid)
        self.version = launch_config.engine().version
        n = self.a.shape[0]
        self.da = None  # fp32 sums over the blocks: the first block's buffers are taken as they are
        self.gs = torch.zeros(n, dtype=F32, device=a.device)
        self.gsum = torch.zeros(n, dtype=F32, device=a.device) if spec.sigmoid else None

    def _args(self, blk: Block):
        """(keys as the kernels take them, block-local targets, the launchers' key-block arguments)."""
        keys = _features(blk.keys.to(self.out_dtype))
        targets = None if self.targets is None else self.targets - blk.offset
        kw = dict(diag_off=blk.offset - self.row_base,
                  key_labels=None if blk.labels is None else blk.labels.contiguous())
        return keys, targets, kw

    def forward(self, blk: Block) -> BlockStats:
        n, m = self.a.shape[0], blk.keys.shape[0]
        if n == 0 or m == 0:  # no program to launch; nothing to add
            z = torch.zeros(n, dtype=F32, device=self.a.device)
            val = z if self.spec.sigmoid else torch.full_like(z, float("-inf"))
            col = torch.full((m,), float("-inf"), dtype=F32, device=z.device) if self.spec.symmetric else None
            return BlockStats(val, z, z if self.spec.supcon else None, col)
        keys, targets, kw = self._args(blk)
        with device_guard(keys.device):
            # The single-process forward's choice of kernels (fixed shift with the column sums of a symmetric
            # loss in the same pass, repaired on the device; online for SupCon, SigLIP and key splits).
            val, pos, cnt, col = _forward_stats(self.mode, self.a, keys, None, self.s, self.bias, targets,
                                                self.labels, **kw)
        return BlockStats(val, pos, cnt if self.spec.supcon else None, col)

    def backward(self, blk: Block, rg: RowGrads, col, dk: Optional[torch.Tensor]) -> torch.Tensor:
        """Add the block's dA, ∂s and Σ dS into this path's; return dK (fp32) added into ``dk``."""
        n, (m, d) = self.a.shape[0], blk.keys.shape
        if n == 0 or m == 0:
            return torch.zeros((m, d), dtype=F32, device=self.a.device) if dk is None else dk
        keys, targets, kw = self._args(blk)
        # The kernels index these vectors with unit stride; the column pair arrives as views of one [m, 2].
        r_lse, g, w = (t.contiguous() for t in rg)
        c_lse, c_g = (t.contiguous() for t in col) if col is not None else (None, None)
        # r_lse stands in for the positive logits: only MoCo's kernels read them.
        st = _BwdStats(r_lse, g, w, c_lse, c_g, c_g, r_lse)
        with device_guard(keys.device):
            # A symmetric loss takes the one-exp kernels as the single-process backward does: the shift (the
            # largest global row / column LSE of this block) bounds every logit of the block.
            one_exp = None
            if col is not None and self.version == "v2" and launch_config.engine().one_exp_bwd:
                shift, flag, fr, fc = _one_exp_factors(r_lse, g, c_lse, c_g)
                one_exp = (shift, flag, st._replace(gr=fr, gc=fc))
            da, _, gs, gsum = _combine_bwd_rows(
                *_guarded(_launch_bwd_rows, one_exp, self.version, self.mode, self.a, keys, None, self.s,
                          self.bias, targets, self.labels, st, False, da_dtype=F32, **kw), F32)
            db = _guarded(_launch_bwd_cols, one_exp, self.version, self.mode, self.a, keys, self.s, self.bias,
                          targets, self.labels, st, out=empty((m, d), F32, keys.device), **kw)
        self.da = da if self.da is None else self.da.add_(da)
        self.gs += gs
        if self.gsum is not None:
            self.gsum += gsum
        return db if dk is None else dk.add_(db)

    def grads(self):
        """(dA in a's dtype, ∂loss/∂s_i per row, d bias)."""
        da = torch.zeros(self.a.shape, dtype=F32, device=self.a.device) if self.da is None else self.da
        dbias = self.gsum.sum() if self.gsum is not None else None
        return da.to(self.out_dtype), self.gs, dbias
