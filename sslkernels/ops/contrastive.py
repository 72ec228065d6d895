"""Fused contrastive losses in Triton: the N×M logits exist only as register tiles, never in memory.

Every loss here is a function of the logits S_ij = s_i·(a_i·b_j) (s = 1/τ, or CLIP's logit scale; one
value or one per row of a) and of a few per-row statistics, so one engine serves all of them:

forward, rows pass (a program per tile of rows of a): stream tiles of b, keep an online max/sum per row
    in base 2 (exp2, with log2(e) folded into the scale) and sum the positive logits. It saves the LSE
    and the positive logit of each row: O(N) floats. The loss reduction is O(N) torch on the host.
forward, columns pass (symmetric losses only): the same kernel with a and b swapped, the scale read per
    streamed row. A second pass over the logits was chosen over fusing it into the rows pass: a row
    tile only sees part of each column, and merging those partial (max, sum) pairs across row tiles
    needs either atomics (there is no atomic log-add-exp) or an O(N/BLOCK·M) buffer of partials.
backward: recompute each tile from a, b and the saved statistics, turn it into dS = ∂loss/∂S, and
    contract it at once (fp32 accumulation, no atomics, deterministic):
      rows pass (per tile of a): dA_i = s_i Σ_j dS_ij b_j, plus G_i = Σ_j dS_ij (a_i·b_j) = ∂loss/∂s_i
        (a per-row [N] buffer, summed on the host for a scalar s);
      cols pass (per tile of b): dB_j = Σ_i dS_ij s_i a_i.

Engine v2 (the default; launch_config.Engine, SSLKERNELS_CONTRASTIVE_ENGINE=v1 keeps the above as it was):
  resident tiles: when D fits one tile (launch_config: D ≤ 256 half, ≤ 128 fp32) a program loads its
    [BLOCK_M, D] tile once, not once per key tile and feature chunk; a backward program writes all D
    output columns, so each key tile is loaded once and serves both S = a·bᵀ and dA += dS·b.
  fixed shift (SSLKERNELS_CONTRASTIVE_SHIFT=fixed): a pre-pass computes on the device
    shift = log2(e)·max_i |s_i|‖a_i‖·max_j ‖b_j‖ ≥ every z_ij (Cauchy–Schwarz; for L2-normalized inputs
    s·log2 e, i.e. |S| ≤ 1/τ), and the sums become l_i = Σ_j exp2(z_ij − shift): no running max, and
    plain sums that add across programs, so one exp per logit feeds the row sums and (atomics) the column
    sums of a symmetric loss in the same pass. No overflow is possible; a row whose sum falls under
    n·2^-106 (unnormalized or far-from-bound inputs) is recomputed by the online kernel in a repair
    launch whose programs skip all work unless their tile holds such a row, decided on the device:
    no host sync, any input stays exact.
  self-similarity reuse: NT-Xent / SupCon forward walks only the upper triangle of Z·Zᵀ tiles (plain
    sums again: each tile adds its row sums to its row block and its column sums to its column block).
  one-exp backward (two-sided and self losses): P_ij and Pᶜ_ij share exp2(z_ij − max LSE), scaled per
    row/column; guarded by a device flag that hands the pass to the two-exp kernel when some LSE lies
    more than 100 (base 2) under the largest.
  The backward's symmetric reuse for NT-Xent is not done: it needs a cross-program fp32 reduction of dZ
    (4·2N·D bytes extra), far above the 1 MB per 16k rows budget; see benchmarks/NOTES.md.

Loss families are flags of the same kernels:
  cross      info_nce, clip_loss: a = queries, b = keys, the positive of row i is column t_i.
  symmetric  adds the column loss: dS = row part + column part, which needs the column LSE.
  self       nt_xent, supcon_loss: a = b = Z with a scalar s, so S is symmetric and
             ∂loss/∂Z = s·(dS + dSᵀ)·Z. The rows pass gets dSᵀ_ij = dS_ji from row j's statistics in the
             same tile (the same form as the symmetric column part); no cols pass runs.
  queue      moco_loss: b = the queue (negatives only, no gradient); the positive q_i·k_i is a row dot
             product that seeds the online LSE, and its gradient is added in the rows pass epilogue.
  sigmoid    siglip_loss: row sums of softplus(−label·x), x = s·(a·b) + bias; no LSE.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import reference
from ..backends import device_guard, register, triton_interpreted
from ..reference import reduce
from . import launch_config
from ._common import cdiv, empty as _empty, first_order_only, sm_count, tf32_matmul
from ._common import row_scale as _scale  # fp32 [1] or [N] s, differentiable

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Finite start for running maxima: exp2(m_old − m_new) stays 1 (not NaN) while a row has seen only
# masked entries, e.g. a tile of nothing but the excluded diagonal.
_NEG_BIG = tl.constexpr(-1.0e30)

# Where a row's positive is: nowhere (column LSE pass), column t_i, every other row with the same label
# (SupCon), or an extra key row of its own (MoCo's q_i·k_i).
POS_NONE, POS_TARGET, POS_LABEL, POS_EXTRA = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile(ptr, rows, ok, stride, D, BLOCK_D: tl.constexpr):
    # [rows, BLOCK_D] tile holding every feature of the rows (BLOCK_D ≥ D); padding reads as 0.
    dd = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + dd[None, :],
                   mask=ok[:, None] & (dd < D)[None, :], other=0.0)


@triton.jit
def _dots(a_ptr, a_rows, a_ok, stride_a, b_ptr, b_rows, b_ok, stride_b, D,
          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    # [BLOCK_A, BLOCK_B] fp32 tile of a_rows · b_rowsᵀ over all D features; padding reads as 0.
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    a_off = a_rows.to(tl.int64)[:, None] * stride_a
    b_off = b_rows.to(tl.int64)[None, :] * stride_b
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        a = tl.load(a_ptr + a_off + dd[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + b_off + dd[:, None], mask=d_ok[:, None] & b_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _row_dots(a_ptr, b_ptr, rows, r_ok, stride_a, stride_b, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # a_i · b_i for each row of the tile (MoCo's positive), fp32.
    out = tl.zeros([BLOCK_M], dtype=tl.float32)
    r64 = rows.to(tl.int64)[:, None]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (dd < D)[None, :]
        a = tl.load(a_ptr + r64 * stride_a + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + r64 * stride_b + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        out += tl.sum(a * b, axis=1)
    return out


@triton.jit
def _norm_bound_kernel(x_ptr, s_ptr, out_ptr, N, D, stride, s_stride, scale, HAS_S: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Pre-pass of the fixed shift: scale·max_i |s_i|·‖x_i‖ over a block of rows, one float per program (the
    # host takes the max of these on the device: no sync). O(N·D) reads, ~1% of one logits pass at D=256.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride + dd[None, :],
                    mask=ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    nrm = tl.sqrt(ss)
    if HAS_S:
        nrm = nrm * tl.abs(tl.load(s_ptr + rows * s_stride, mask=ok, other=0.0).to(tl.float32))
    # A row of norm > 1.8e19 overflows its fp32 sum of squares to inf, and inf·0 (all-zero keys) or inf − inf
    # later is NaN: a finite bound sends such rows to the repair pass (NaN fails the test and stays NaN).
    nrm = nrm * scale
    nrm = tl.where(nrm > 3.4028234663852886e38, 3.4028234663852886e38, nrm)
    tl.store(out_ptr + tl.program_id(0), tl.max(nrm, axis=0))


@triton.jit
def _row_meta(tgt_ptr, lab_ptr, rows, r_ok, EXCL_TGT: tl.constexpr, POS: tl.constexpr):
    # (target column, label) of each row where the mode reads them; the row index stands in elsewhere.
    if EXCL_TGT or POS == 1:
        t_r = tl.load(tgt_ptr + rows, mask=r_ok, other=-1)
    else:
        t_r = rows
    if POS == 2:
        lab_r = tl.load(lab_ptr + rows, mask=r_ok, other=0)
    else:
        lab_r = rows
    return t_r, lab_r


@triton.jit
def _needs_repair(lse, shift, n_terms):
    # A fixed-shift sum l = Σ exp2(z − shift) is trusted when l ≥ n_terms·2^-106: exp2 flushes results
    # below 2^-126 to zero, so the terms lost weigh at most n_terms·2^-126 ≤ 2^-20·l. lse = shift + log2 l;
    # a row with no term at all (l = 0, lse = −inf) is "repaired" to the online path's sentinel.
    return (lse - shift) < (tl.log2(n_terms * 1.0) - 106.0)


@triton.jit
def _masks(r, c, ok, t_r, lab_r, lab_c, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr):
    # (entries inside the LSE, positive entries) for broadcastable row indices r and column indices c;
    # the same code serves a tile and its transpose (the cols pass passes r as a row vector). r is the
    # row's own column (its index minus the diagonal offset of a key block), so c == r is "the same sample".
    keep = ok
    if EXCL_DIAG:
        keep = keep & (c != r)
    if EXCL_TGT:
        keep = keep & (c != t_r)
    if POS == 1:
        pos = ok & (c == t_r)
    elif POS == 2:
        pos = ok & (lab_c == lab_r) & (c != r)
    else:
        pos = ok & (c != c)
    return keep, pos


@triton.jit
def _softplus(y):
    # log(1 + e^y) without overflow; log2/exp2 are the fast hardware forms. log(1 + t) for t = e^−|y| < 0.01 by
    # its series: 1 + t rounds away t's digits (to 0 below 6e-8), which made a sum of tiny terms 0.
    t = tl.exp2(-tl.abs(y) * LOG2E)
    return tl.maximum(y, 0.0) + tl.where(t < 0.01, t * (1.0 - t * (0.5 - t * (1.0 / 3.0))), tl.log2(1.0 + t) * LN2)


@triton.jit
def _at_least_one(l):
    # max(l, 1) that keeps a NaN: the running max skips a NaN logit, but its exp makes l NaN, and the
    # default maximum would turn that back into a finite (wrong) LSE instead of a NaN loss.
    return tl.maximum(l, 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, bpos_ptr, s_ptr, bias_ptr, tgt_ptr, lab_ptr, klab_ptr, val_ptr, pos_ptr, cnt_ptr,
                shift_ptr, colsum_ptr,
                N, M, D, stride_a, stride_b, stride_bpos, s_stride, cols_per_split, diag_off,
                SCALE_ON_COLS: tl.constexpr, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr,
                SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr, RESIDENT: tl.constexpr, FIXED: tl.constexpr, COL_SUMS: tl.constexpr,
                REPAIR: tl.constexpr):
    # One program per tile of rows of a. Writes per row: LSE in base 2 (SIGMOID: the softplus sum, in
    # nats), the positive logit in base 2 (SupCon: the sum over positives) and SupCon's positive count.
    # RESIDENT: the [BLOCK_M, D] tile of a is loaded once, not once per key tile and feature chunk.
    # FIXED: l = Σ exp2(z − shift) with the device-side bound shift ≥ every z (no running max, no
    #   rescaling); COL_SUMS adds each tile's column sums of the same exps to colsum (atomics: plain sums
    #   combine across programs, running maxima would not), the column LSE of a symmetric loss in one pass.
    # REPAIR: the online path again, only for programs holding a row whose fixed-shift sum failed
    #   _needs_repair (the loop runs 0 times elsewhere: no host sync decides it); rewrites those LSEs.
    # Key split (grid axis 1): program (i, p) covers keys [p·cols_per_split, (p+1)·cols_per_split) and
    #   writes its partial statistics to row p of [splits, N] buffers, combined on the host (O(splits·N)).
    #   It fills the GPU when the rows are few and the keys many (MoCo: 256 queries, 65536 queue keys).
    # diag_off (runtime: one compiled kernel for any value): b is a block of keys whose column c is the
    #   same sample as row c + diag_off of a (0 for a single process); klab_ptr: the keys' labels (SupCon).
    pid_s = tl.program_id(1)
    first = pid_s == 0
    lo = pid_s * cols_per_split
    c_end = tl.minimum(M, lo + cols_per_split)
    out_off = pid_s * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    own = rows - diag_off  # each row's own column (a row vector op, not one per logit)
    s_r = tl.load(s_ptr + rows * s_stride, mask=r_ok, other=1.0).to(tl.float32)
    t_r, lab_r = _row_meta(tgt_ptr, lab_ptr, rows, r_ok, EXCL_TGT, POS)
    hi = c_end
    if FIXED or REPAIR:
        shift = tl.load(shift_ptr)
    if REPAIR:
        need = r_ok & _needs_repair(tl.load(val_ptr + rows, mask=r_ok, other=0.0), shift, M)
        hi = tl.where(tl.max(need.to(tl.int32), axis=0) > 0, c_end, lo)
    m = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    if POS == 3:
        psum = _row_dots(a_ptr, bpos_ptr, rows, r_ok, stride_a, stride_bpos, D, BLOCK_M, 32) * (s_r * LOG2E)  # 32: few regs
        # The positive enters the sums of the first key split only.
        if FIXED:
            l = tl.where(first, tl.exp2(psum - shift), 0.0)
        else:
            m = tl.where(first, psum, _NEG_BIG)
            l = l + tl.where(first, 1.0, 0.0)
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    if RESIDENT:
        a_t = _tile(a_ptr, rows, r_ok, stride_a, D, BLOCK_D)
    for c0 in range(lo, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        c_ok = cols < c_end
        ok = r_ok[:, None] & c_ok[None, :]
        if RESIDENT:
            acc = tl.dot(a_t, tl.trans(_tile(b_ptr, cols, c_ok, stride_b, D, BLOCK_D)), input_precision=DOT_PREC)
        else:
            acc = _dots(a_ptr, rows, r_ok, stride_a, b_ptr, cols, c_ok, stride_b, D, BLOCK_M, BLOCK_N, BLOCK_D,
                        DOT_PREC)
        if SIGMOID:
            x = acc * s_r[:, None] + bias
            y = tl.where(cols[None, :] == own[:, None], -x, x)  # label +1 on the diagonal, −1 elsewhere
            l += tl.sum(tl.where(ok, _softplus(y), 0.0), axis=1)
        else:
            if SCALE_ON_COLS:
                s_c = tl.load(s_ptr + cols * s_stride, mask=c_ok, other=1.0).to(tl.float32)
                z = acc * (s_c * LOG2E)[None, :]
            else:
                z = acc * (s_r * LOG2E)[:, None]
            if POS == 2:
                lab_c = tl.load(klab_ptr + cols, mask=c_ok, other=0)
            else:
                lab_c = cols
            keep, pos = _masks(own[:, None], cols[None, :], ok, t_r[:, None], lab_r[:, None], lab_c[None, :],
                               EXCL_DIAG, EXCL_TGT, POS)
            zk = tl.where(keep, z, float("-inf"))
            if FIXED:
                e = tl.exp2(zk - shift)
                l += tl.sum(e, axis=1)
                if COL_SUMS:
                    tl.atomic_add(colsum_ptr + cols, tl.sum(e, axis=0), mask=c_ok)
            else:
                m_new = tl.maximum(m, tl.max(zk, axis=1))
                l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(zk - m_new[:, None]), axis=1)
                m = m_new
            if not REPAIR:
                if POS == 1 or POS == 2:
                    psum += tl.sum(tl.where(pos, z, 0.0), axis=1)
                if POS == 2:
                    cnt += tl.sum(pos.to(tl.float32), axis=1)
    if SIGMOID:
        tl.store(val_ptr + out_off + rows, l, mask=r_ok)
    elif REPAIR:
        tl.store(val_ptr + rows, m + tl.log2(_at_least_one(l)), mask=need)
    else:
        if FIXED:
            # −inf for a row with no entry (repaired); padding rows read l = 1, never stored.
            tl.store(val_ptr + out_off + rows, shift + tl.log2(tl.where(r_ok, l, 1.0)), mask=r_ok)
        else:
            # l ≥ 1 once a row has an entry (its maximum adds exp2(0)); a row with none (SupCon's lone
            # anchor, padding) keeps l = 0 and gets LSE = −1e30, finite, its loss masked on the host.
            tl.store(val_ptr + out_off + rows, m + tl.log2(_at_least_one(l)), mask=r_ok)
        if POS != 0:
            tl.store(pos_ptr + out_off + rows, psum, mask=r_ok)
        if POS == 2:
            tl.store(cnt_ptr + out_off + rows, cnt, mask=r_ok)


@triton.jit
def _self_fwd_kernel(z_ptr, s_ptr, tgt_ptr, shift_ptr, l_ptr, pos_ptr, N, D, stride,
                     EXCL_TGT: tl.constexpr, POS: tl.constexpr, RESIDENT: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    # NT-Xent forward over the upper triangle of Z·Zᵀ tiles (S is symmetric, so are the masks: the diagonal,
    # the involution i ↔ i ± N). Tile (I, J ≥ I) adds its row sums to rows I and, off the diagonal, its
    # column sums to rows J: half the dots and exps of the full square. With the fixed shift the sums are
    # plain, so every contribution is an atomic add into zeroed l/pos. (No label masks: SupCon's forward is
    # faster online, see _forward_stats; its triangle branch went in session 21, unreachable.)
    # Program p walks row blocks p and T−1−p: T + 1 tiles for every program, a balanced grid of T/2.
    p = tl.program_id(0)
    T = tl.cdiv(N, BLOCK)
    shift = tl.load(shift_ptr)
    sl = tl.load(s_ptr).to(tl.float32) * LOG2E
    for h in tl.static_range(2):
        if h == 0:
            I = p
            lo = p
        else:
            I = T - 1 - p
            lo = tl.where(I == p, T, I)  # the middle block of an odd T is walked once
        rows = I * BLOCK + tl.arange(0, BLOCK)
        r_ok = rows < N
        t_r, lab_r = _row_meta(tgt_ptr, tgt_ptr, rows, r_ok, EXCL_TGT, POS)
        if RESIDENT:
            z_i = _tile(z_ptr, rows, r_ok, stride, D, BLOCK_D)
        l = tl.zeros([BLOCK], dtype=tl.float32)
        psum = tl.zeros([BLOCK], dtype=tl.float32)
        for J in range(lo, T):
            cols = J * BLOCK + tl.arange(0, BLOCK)
            c_ok = cols < N
            ok = r_ok[:, None] & c_ok[None, :]
            if RESIDENT:
                S = tl.dot(z_i, tl.trans(_tile(z_ptr, cols, c_ok, stride, D, BLOCK_D)), input_precision=DOT_PREC)
            else:
                S = _dots(z_ptr, rows, r_ok, stride, z_ptr, cols, c_ok, stride, D, BLOCK, BLOCK, BLOCK_D, DOT_PREC)
            z = S * sl
            keep, pos = _masks(rows[:, None], cols[None, :], ok, t_r[:, None], lab_r[:, None], cols[None, :],
                               True, EXCL_TGT, POS)
            e = tl.exp2(tl.where(keep, z, float("-inf")) - shift)
            off = c_ok & (J != I)
            l += tl.sum(e, axis=1)
            tl.atomic_add(l_ptr + cols, tl.sum(e, axis=0), mask=off)
            if POS == 1:
                pz = tl.where(pos, z, 0.0)
                psum += tl.sum(pz, axis=1)
                tl.atomic_add(pos_ptr + cols, tl.sum(pz, axis=0), mask=off)
        # Other programs add these rows' column contributions: the row sums are atomic adds too.
        tl.atomic_add(l_ptr + rows, l, mask=r_ok & (lo < T))
        if POS == 1:
            tl.atomic_add(pos_ptr + rows, psum, mask=r_ok & (lo < T))


@triton.jit
def _dlogits(z, x, r, c, ok, keep, pos, r_lse, gr, gw, c_lse, gc, gcw, shift,
             HAS_COL: tl.constexpr, SIGMOID: tl.constexpr, ONE_EXP: tl.constexpr):
    # ∂loss/∂S for a tile (or its transpose: every per-row/per-column operand arrives pre-broadcast).
    # Softmax: g_i (P_ij − w_i [pos]) + (two-sided) g_j (Pᶜ_ij − wᶜ_j [pos]). Masked entries become
    # −inf before exp2 (→ 0): the excluded diagonal could otherwise overflow, and 0·inf is NaN.
    # ONE_EXP (two-sided): P_ij = exp2(z − shift)·2^(shift − lse_i) and Pᶜ_ij = exp2(z − shift)·2^(shift −
    # lseᶜ_j); the host folds the 2^(shift − lse) factors into gr and gc, so one exp serves both terms.
    if SIGMOID:
        ds = tl.where(ok, gr * (_sigmoid(x) - tl.where(c == r, 1.0, 0.0)), 0.0)
    else:
        zk = tl.where(keep, z, float("-inf"))
        if ONE_EXP:
            ds = tl.exp2(zk - shift) * (gr + gc)
            w = gw + gcw
        else:
            ds = tl.exp2(zk - r_lse) * gr
            w = gw
            if HAS_COL:
                ds += tl.exp2(zk - c_lse) * gc
                w = w + gcw
        ds = ds - tl.where(pos, w, 0.0)
    return ds


@triton.jit
def _guard(flag_ptr, GUARD: tl.constexpr):
    # GUARD 1: run only when the device flag is 0 (one-exp path safe); 2: only when it is set (fallback).
    flag = tl.load(flag_ptr)
    if GUARD == 1:
        return flag == 0
    else:
        return flag != 0


@triton.jit
def _bwd_rows_kernel(a_ptr, b_ptr, bpos_ptr, s_ptr, bias_ptr, tgt_ptr, lab_ptr, klab_ptr,
                     rlse_ptr, rg_ptr, rgw_ptr, clse_ptr, cg_ptr, cgw_ptr, pos_ptr,
                     da_ptr, dbpos_ptr, gs_ptr, gsum_ptr, shift_ptr, flag_ptr, hs_ptr,
                     N, M, D, stride_a, stride_b, stride_bpos, stride_da, stride_dbpos, s_stride,
                     cols_per_split, da_split_stride, diag_off,
                     HAS_COL: tl.constexpr, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr,
                     SIGMOID: tl.constexpr, WANT_DBPOS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
                     DOT_PREC: tl.constexpr, RESIDENT: tl.constexpr, ONE_EXP: tl.constexpr, GUARD: tl.constexpr,
                     HALF_SCALE: tl.constexpr):
    # Program (row tile, feature chunk): dA for those rows and features; chunk 0 also writes per row
    # G_i = Σ_j dS_ij (a_i·b_j) (∂loss/∂s_i) and Σ_j dS_ij (∂loss/∂bias), summed from the fp32 tiles
    # (not from the low-precision dS that feeds the tensor cores).
    # RESIDENT (BLOCK_D = BLOCK_DOUT ≥ D, one feature chunk): a's tile is loaded once and each key tile
    # once, serving both S = a·bᵀ and dA += dS·b (v1 recomputes S for every output chunk).
    # Key split (grid axis 2, as in _fwd_kernel): partial dA (fp32), G and Σ dS per split, summed on the host.
    # diag_off, klab_ptr: a block of keys, as in _fwd_kernel.
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    first = pid_s == 0
    lo = pid_s * cols_per_split
    c_end = tl.minimum(M, lo + cols_per_split)
    out_off = pid_s * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    own = rows - diag_off
    r64 = rows.to(tl.int64)
    dcols = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dc_ok = dcols < D
    hi = c_end
    w_ok = r_ok
    if GUARD != 0:
        active = _guard(flag_ptr, GUARD)
        hi = tl.where(active, c_end, lo)
        w_ok = r_ok & active
    if ONE_EXP:
        shift = tl.load(shift_ptr)
    else:
        shift = 0.0
    s_r = tl.load(s_ptr + rows * s_stride, mask=r_ok, other=1.0).to(tl.float32)
    t_r, lab_r = _row_meta(tgt_ptr, lab_ptr, rows, r_ok, EXCL_TGT, POS)
    r_lse = tl.load(rlse_ptr + rows, mask=r_ok, other=0.0)
    gr = tl.load(rg_ptr + rows, mask=r_ok, other=0.0)
    gw = tl.load(rgw_ptr + rows, mask=r_ok, other=0.0)
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    if HALF_SCALE:
        hs = tl.load(hs_ptr)  # fp16: dS scaled by 2^k before its cast (_half_scale), the sum unscaled after
    else:
        hs = 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    gsv = tl.zeros([BLOCK_M], dtype=tl.float32)
    if RESIDENT:
        a_t = _tile(a_ptr, rows, r_ok, stride_a, D, BLOCK_D)
    for c0 in range(lo, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        c_ok = cols < c_end
        ok = r_ok[:, None] & c_ok[None, :]
        if RESIDENT:
            b = _tile(b_ptr, cols, c_ok, stride_b, D, BLOCK_D)
            S = tl.dot(a_t, tl.trans(b), input_precision=DOT_PREC)
        else:
            S = _dots(a_ptr, rows, r_ok, stride_a, b_ptr, cols, c_ok, stride_b, D, BLOCK_M, BLOCK_N, BLOCK_D,
                      DOT_PREC)
            b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                        mask=c_ok[:, None] & dc_ok[None, :], other=0.0)
        z = S * (s_r * LOG2E)[:, None]
        x = S * s_r[:, None] + bias
        if POS == 2:
            lab_c = tl.load(klab_ptr + cols, mask=c_ok, other=0)
        else:
            lab_c = cols
        if HAS_COL:
            c_lse = tl.load(clse_ptr + cols, mask=c_ok, other=0.0)[None, :]
            gc = tl.load(cg_ptr + cols, mask=c_ok, other=0.0)[None, :]
            gcw = tl.load(cgw_ptr + cols, mask=c_ok, other=0.0)[None, :]
        else:
            c_lse = 0.0
            gc = 0.0
            gcw = 0.0
        keep, pos = _masks(own[:, None], cols[None, :], ok, t_r[:, None], lab_r[:, None], lab_c[None, :],
                           EXCL_DIAG, EXCL_TGT, POS)
        ds = _dlogits(z, x, own[:, None], cols[None, :], ok, keep, pos, r_lse[:, None], gr[:, None], gw[:, None],
                      c_lse, gc, gcw, shift, HAS_COL, SIGMOID, ONE_EXP)
        gsv += tl.sum(ds * S, axis=1)
        if SIGMOID:
            dsum += tl.sum(ds, axis=1)
        # dS goes to the tensor cores in the input dtype (as flash attention's P).
        acc = tl.dot((ds * hs).to(b.dtype), b, acc, input_precision=DOT_PREC)
    out_mask = w_ok[:, None] & dc_ok[None, :]
    if POS == 3:
        # MoCo's positive column: dS_i0 = g_i (P_i0 − 1), with the key row k_i as its "b" (first split only).
        pos2 = tl.load(pos_ptr + rows, mask=r_ok, other=0.0)
        dpos = tl.where(first, gr * (tl.exp2(pos2 - r_lse) - 1.0), 0.0)
        kp = tl.load(bpos_ptr + r64[:, None] * stride_bpos + dcols[None, :], mask=out_mask, other=0.0)
        acc += (dpos * hs)[:, None] * kp.to(tl.float32)  # acc holds hs·dA until the store
        gsv += dpos * (pos2 / (s_r * LOG2E))
        if WANT_DBPOS:
            a = tl.load(a_ptr + r64[:, None] * stride_a + dcols[None, :], mask=out_mask, other=0.0).to(tl.float32)
            tl.store(dbpos_ptr + r64[:, None] * stride_dbpos + dcols[None, :],
                     ((s_r * dpos)[:, None] * a).to(dbpos_ptr.dtype.element_ty), mask=out_mask & first)
    tl.store(da_ptr + pid_s.to(tl.int64) * da_split_stride + r64[:, None] * stride_da + dcols[None, :],
             (acc * (s_r / hs)[:, None]).to(da_ptr.dtype.element_ty), mask=out_mask)
    tl.store(gs_ptr + out_off + rows, gsv, mask=w_ok & (pid_d == 0))
    if SIGMOID:
        tl.store(gsum_ptr + out_off + rows, dsum, mask=w_ok & (pid_d == 0))


@triton.jit
def _bwd_cols_kernel(a_ptr, b_ptr, s_ptr, bias_ptr, tgt_ptr, lab_ptr, klab_ptr,
                     rlse_ptr, rg_ptr, rgw_ptr, clse_ptr, cg_ptr, cgw_ptr, db_ptr, shift_ptr, flag_ptr, hs_ptr,
                     N, M, D, stride_a, stride_b, stride_db, s_stride, diag_off,
                     HAS_COL: tl.constexpr, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr,
                     SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DOUT: tl.constexpr, DOT_PREC: tl.constexpr, RESIDENT: tl.constexpr,
                     ONE_EXP: tl.constexpr, GUARD: tl.constexpr, HALF_SCALE: tl.constexpr):
    # Program (tile of BLOCK_M rows of b, feature chunk): dB_j = Σ_i dS_ij s_i a_i, streaming rows of a.
    # Tiles are transposed: [rows of b, rows of a]. RESIDENT / ONE_EXP / GUARD / diag_off / klab_ptr as in
    # the rows pass (row r of a is still the same sample as column r − diag_off of b).
    pid_d = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = cols < M
    dcols = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dc_ok = dcols < D
    hi = N
    w_ok = c_ok
    if GUARD != 0:
        active = _guard(flag_ptr, GUARD)
        hi = tl.where(active, N, 0)
        w_ok = c_ok & active
    if ONE_EXP:
        shift = tl.load(shift_ptr)
    else:
        shift = 0.0
    if POS == 2:
        lab_c = tl.load(klab_ptr + cols, mask=c_ok, other=0)
    else:
        lab_c = cols
    if HAS_COL:
        c_lse = tl.load(clse_ptr + cols, mask=c_ok, other=0.0)[:, None]
        gc = tl.load(cg_ptr + cols, mask=c_ok, other=0.0)[:, None]
        gcw = tl.load(cgw_ptr + cols, mask=c_ok, other=0.0)[:, None]
    else:
        c_lse = 0.0
        gc = 0.0
        gcw = 0.0
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    if HALF_SCALE:
        hs = tl.load(hs_ptr)  # as in the rows pass
    else:
        hs = 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=tl.float32)
    if RESIDENT:
        b_t = _tile(b_ptr, cols, c_ok, stride_b, D, BLOCK_D)
    for r0 in range(0, hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        r_ok = rows < N
        s_r = tl.load(s_ptr + rows * s_stride, mask=r_ok, other=1.0).to(tl.float32)
        t_r, lab_r = _row_meta(tgt_ptr, lab_ptr, rows, r_ok, EXCL_TGT, POS)
        r_lse = tl.load(rlse_ptr + rows, mask=r_ok, other=0.0)
        gr = tl.load(rg_ptr + rows, mask=r_ok, other=0.0)
        gw = tl.load(rgw_ptr + rows, mask=r_ok, other=0.0)
        ok = c_ok[:, None] & r_ok[None, :]
        if RESIDENT:
            a = _tile(a_ptr, rows, r_ok, stride_a, D, BLOCK_D)
            St = tl.dot(b_t, tl.trans(a), input_precision=DOT_PREC)
        else:
            St = _dots(b_ptr, cols, c_ok, stride_b, a_ptr, rows, r_ok, stride_a, D, BLOCK_M, BLOCK_N, BLOCK_D,
                       DOT_PREC)
            a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_a + dcols[None, :],
                        mask=r_ok[:, None] & dc_ok[None, :], other=0.0)
        z = St * (s_r * LOG2E)[None, :]
        x = St * s_r[None, :] + bias
        own = rows - diag_off
        keep, pos = _masks(own[None, :], cols[:, None], ok, t_r[None, :], lab_r[None, :], lab_c[:, None],
                           EXCL_DIAG, EXCL_TGT, POS)
        dst = _dlogits(z, x, own[None, :], cols[:, None], ok, keep, pos, r_lse[None, :], gr[None, :],
                       gw[None, :], c_lse, gc, gcw, shift, HAS_COL, SIGMOID, ONE_EXP)
        acc = tl.dot((dst * (s_r * hs)[None, :]).to(a.dtype), a, acc, input_precision=DOT_PREC)
    tl.store(db_ptr + cols.to(tl.int64)[:, None] * stride_db + dcols[None, :],
             (acc * (1.0 / hs)).to(db_ptr.dtype.element_ty), mask=w_ok[:, None] & dc_ok[None, :])


# -------------------------------------------------------------------------------------- host side


class _Mode(NamedTuple):
    pos: int  # POS_*
    excl_diag: bool = False  # j == i is no entry of row i (NT-Xent, SupCon)
    excl_tgt: bool = False  # j == t_i is no entry of row i's LSE (decoupled)
    two_sided: bool = False  # symmetric: + the column loss
    # b is a (one tensor) with a scalar scale. The rows pass then reuses row i's masks for dS_ji, which
    # holds because they are symmetric: the diagonal, labels, and targets that are an involution
    # (NT-Xent's i ↔ i ± N).
    self_sim: bool = False
    sigmoid: bool = False


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 features follow PyTorch's matmul setting (exact by default); fp16/bf16 always use the
    # tensor cores (the precision flag only affects fp32 operands).
    if dtype == torch.float32 and not tf32_matmul():
        return "ieee"
    return "tf32"


def _config(kernel: str, x: torch.Tensor, d: int, version: str, key: tuple, run):
    """The table's config, or (SSLKERNELS_AUTOTUNE=1, v2, CUDA) the fastest candidate for this key."""
    if version == "v2" and launch_config.autotune_enabled(x.device):
        return launch_config.autotune(kernel, x.dtype, d, key, run)
    return launch_config.get(kernel, x.dtype, d, version)


def _resident(cfg, d: int, version: str) -> bool:
    return version == "v2" and launch_config.is_resident(cfg, d)


def _first(*tensors):
    """The first tensor that is not None (pointer arguments: the keys' labels default to the rows')."""
    return next(t for t in tensors if t is not None)


_FLT_MAX = torch.finfo(torch.float32).max


def _norm_bound(x: torch.Tensor, s: Optional[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """min(scale·max_i |s_i|·‖x_i‖, FLT_MAX) (fp32 [1], on the device: no host sync)."""
    n, d = x.shape
    block_r, block_d = 32, min(128, launch_config._pad(d))
    parts = torch.empty((cdiv(n, block_r),), dtype=torch.float32, device=x.device)
    _norm_bound_kernel[(parts.numel(),)](x, s if s is not None else parts, parts, n, d, x.stride(0),
                                         1 if s is not None and s.numel() > 1 else 0, scale, HAS_S=s is not None,
                                         BLOCK_R=block_r, BLOCK_D=block_d)
    return parts.amax().reshape(1)


def _shift(a, b, bpos, s) -> torch.Tensor:
    """The fixed shift in base 2: log2(e)·max_i |s_i|‖a_i‖·max_j ‖b_j‖ ≥ every z_ij (Cauchy–Schwarz), so
    exp2(z − shift) ≤ 1 for any inputs; for L2-normalized ones it is s·log2(e), i.e. |S| ≤ 1/τ. Kept finite
    (the product of two finite bounds can overflow): rows past it take the repair pass."""
    nb = _norm_bound(b, None)
    if bpos is not None:
        nb = torch.maximum(nb, _norm_bound(bpos, None))
    return torch.mul(_norm_bound(a, s, LOG2E.value), nb).clamp_(max=_FLT_MAX)


def _launch_fwd(mode: _Mode, a, b, bpos, s, bias, targets, labels, *, columns: bool, version: str = "v1",
                fixed: bool = False, shift=None, repair=None, cfg=None, diag_off: int = 0, key_labels=None):
    """Rows pass over a (``columns``: over b, i.e. the column LSE of a symmetric loss).

    ``fixed``: the fixed-shift sums (+ the column sums of a two-sided loss, returned 4th). ``repair``: the
    LSE buffer of an earlier fixed-shift pass (over the same rows), rewritten in place where it failed.
    ``diag_off`` / ``key_labels``: b is a block of keys (contrastive_blockwise): row i of a is the same
    sample as column i − diag_off of b; key_labels are b's labels (SupCon; default ``labels``).
    """
    if columns:
        a, b = b, a
        diag_off = -diag_off  # the same pairs, seen from b's rows
    n, d = a.shape
    m = b.shape[0]
    col_sums = fixed and mode.two_sided and not columns
    if cfg is None:
        key = (mode, columns, fixed, repair is not None)
        cfg = _config("fwd", a, d, version, key, lambda c: _launch_fwd(
            mode, *((b, a) if columns else (a, b)), bpos, s, bias, targets, labels, columns=columns,
            version=version, fixed=fixed, shift=shift,
            repair=None if repair is None else repair.clone(), cfg=c,
            diag_off=-diag_off if columns else diag_off, key_labels=key_labels))
    if mode.pos == POS_EXTRA and not columns and _resident(cfg, d, version):
        cfg = cfg._replace(block_m=min(cfg.block_m, 64))  # MoCo's extra row dot: 128 rows spill at D = 256
    f32 = dict(dtype=torch.float32, device=a.device)
    row_tiles = cdiv(n, cfg.block_m)
    splits, per_split = (1, m) if repair is not None else _key_split(row_tiles, m, cfg.block_n, a.device)
    val = _empty((splits, n), **f32) if repair is None else repair
    pos_kind = POS_NONE if columns else mode.pos
    pos = _empty((splits, n), **f32) if pos_kind != POS_NONE and repair is None else val
    cnt = _empty((splits, n), **f32) if pos_kind == POS_LABEL and repair is None else val
    colsum = torch.zeros((m,), **f32) if col_sums else val
    # Unused pointer arguments get any tensor: constexpr flags keep them from being read.
    _fwd_kernel[(row_tiles, splits)](
        a, b, bpos if bpos is not None else a, s, bias if bias is not None else s,
        targets if targets is not None else val, labels if labels is not None else val,
        _first(key_labels, labels, val), val, pos, cnt, shift if shift is not None else val, colsum,
        n, m, d, a.stride(0), b.stride(0), bpos.stride(0) if bpos is not None else 0, 1 if s.numel() > 1 else 0,
        per_split, diag_off, SCALE_ON_COLS=columns, EXCL_DIAG=mode.excl_diag or (columns and mode.excl_tgt),
        EXCL_TGT=mode.excl_tgt and not columns, POS=pos_kind, SIGMOID=mode.sigmoid,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_PREC=_dot_precision(a.dtype),
        RESIDENT=_resident(cfg, d, version), FIXED=fixed and repair is None, COL_SUMS=col_sums,
        REPAIR=repair is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if repair is None:
        val, pos, cnt = _combine_splits(val, pos, cnt, pos_kind, mode.sigmoid)
    return val, pos, cnt, (colsum if col_sums else None)


# Programs to aim for when splitting the keys; None: the device's SM count on CUDA, no split in the
# interpreter (tests set it to exercise the split path on CPU).
_SPLIT_PROGRAMS: Optional[int] = None


# A row grid of at most a quarter of the device (MoCo's 4 or 16 row tiles, SimCLR-size batches) aims for
# this many programs per SM: one program per SM streaming thousands of keys in small tiles is latency-bound
# (tune3: MoCo v2's rows backward took 0.80 ms for ~20 µs of work). Grids nearer one wave keep one program
# per SM (info_nce at N = 16384 keeps its unsplit fixed-shift forward).
_UNDERFILLED_WAVES = 4


def _key_split(programs: int, m: int, block_n: int, device: torch.device, max_splits: Optional[int] = None):
    """(splits, keys per split): enough splits over the keys for ``programs`` row programs to fill the
    device once (4 times when they would fill under a quarter of it), each split keeping at least 4 key
    tiles so the partials stay a small fraction of the work, and at most ``max_splits`` (a memory cap set
    by the caller)."""
    target = _SPLIT_PROGRAMS
    if target is None:
        target = sm_count(device) if device.type == "cuda" else 1
    if programs * _UNDERFILLED_WAVES <= target:
        target *= _UNDERFILLED_WAVES
    splits = max(1, min(target // max(programs, 1), cdiv(m, 4 * block_n)))
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    if splits == 1:
        return 1, max(m, 1)
    per_split = cdiv(cdiv(m, splits), block_n) * block_n
    return cdiv(m, per_split), per_split


def _combine_splits(val, pos, cnt, pos_kind: int, sigmoid: bool):
    """Per-split forward statistics [splits, N] -> [N]: LSEs (base 2) combine by log-sum-exp, sums add;
    MoCo's positive logit is computed whole by every split."""
    if val.shape[0] == 1:
        return val[0], pos[0] if pos.dim() == 2 else pos, cnt[0] if cnt.dim() == 2 else cnt
    out = val.sum(0) if sigmoid else torch.logsumexp(val * LN2.value, dim=0) / LN2.value
    out_pos = pos
    if pos_kind == POS_EXTRA:
        out_pos = pos[0]
    elif pos_kind != POS_NONE:
        out_pos = pos.sum(0)
    out_cnt = cnt.sum(0) if pos_kind == POS_LABEL else out
    return out, out_pos if pos_kind != POS_NONE else out, out_cnt


def _launch_self_fwd(mode: _Mode, z, s, targets, shift, cfg=None):
    """NT-Xent fixed-shift sums over the upper triangle of tiles: (l, positive sum)."""
    assert mode.pos != POS_LABEL, "label masks take the online forward (_forward_stats)"
    n, d = z.shape
    if cfg is None:
        cfg = _config("self_fwd", z, d, "v2", (mode,), lambda c: _launch_self_fwd(mode, z, s, targets, shift, cfg=c))
    block = cfg.block_m
    stats = torch.zeros((2, n), dtype=torch.float32, device=z.device)
    l, pos = stats[0], stats[1]
    _self_fwd_kernel[(cdiv(cdiv(n, block), 2),)](
        z, s, targets if targets is not None else l, shift, l, pos, n, d, z.stride(0), EXCL_TGT=mode.excl_tgt,
        POS=mode.pos, RESIDENT=_resident(cfg, d, "v2"), BLOCK=block, BLOCK_D=cfg.block_d,
        DOT_PREC=_dot_precision(z.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return l, pos


def _forward_stats(mode: _Mode, a, b, bpos, s, bias, targets, labels, **block):
    """(row LSE, positive, count, column LSE or None) in base 2, by the engine in force. ``block``: the
    key-block arguments of _launch_fwd (``diag_off``, ``key_labels``; the block engine's Triton path)."""
    eng = launch_config.engine()
    # SupCon's label-mask forward is faster online: on an H100 (N = 32768, D = 256, bf16) the fixed-shift
    # upper-triangle pass made the step 9.7 ms against 5.9 ms (benchmarks/results/h100/tune3).
    if (eng.version == "v1" or eng.shift == "online" or mode.sigmoid or mode.pos == POS_LABEL
            or _splits_keys(mode, a, b) or (_adds_atomically(mode, eng, block) and _deterministic())):
        val, pos, cnt, _ = _launch_fwd(mode, a, b, bpos, s, bias, targets, labels, columns=False,
                                       version=eng.version, **block)
        c_lse = None
        if mode.two_sided:
            c_lse = _launch_fwd(mode, a, b, bpos, s, bias, targets, labels, columns=True, version=eng.version,
                                **block)[0]
        return val, pos, cnt, c_lse
    shift = _shift(a, b, bpos, s)
    if mode.self_sim and eng.self_reuse and not block:
        l, pos = _launch_self_fwd(mode, a, s, targets, shift)
        val = shift + torch.log2(l)
        cnt = val  # (a count only for label masks, which never come here)
        colsum = None
    else:
        val, pos, cnt, colsum = _launch_fwd(mode, a, b, bpos, s, bias, targets, labels, columns=False,
                                            version="v2", fixed=True, shift=shift, **block)
    if not _REPAIR:
        return val, pos, cnt, None if colsum is None else shift + torch.log2(colsum)
    # Rows whose sum the shift pushed under the trusted range take the online path, decided on the device.
    _launch_fwd(mode, a, b, bpos, s, bias, targets, labels, columns=False, version="v2", shift=shift, repair=val,
                **block)
    c_lse = None
    if colsum is not None:
        c_lse = shift + torch.log2(colsum)
        _launch_fwd(mode, a, b, bpos, s, bias, targets, labels, columns=True, version="v2", shift=shift,
                    repair=c_lse, **block)
    return val, pos, cnt, c_lse


def _adds_atomically(mode: _Mode, eng, block) -> bool:
    """Whether the fixed-shift forward would sum with float atomics, whose order varies from run to run: the
    column sums of a two-sided loss, and the self-similarity pass (each tile adds to its rows and columns)."""
    return mode.two_sided or (mode.self_sim and eng.self_reuse and not block)


def _deterministic() -> bool:
    # Under torch.use_deterministic_algorithms(True) (warn_only too) such losses take the online kernels,
    # where every sum is made by one program in a fixed order: the same bits on every run, a second pass
    # over the keys for the column LSE of a two-sided loss.
    return torch.are_deterministic_algorithms_enabled()


def _splits_keys(mode: _Mode, a, b) -> bool:
    """Whether the rows pass splits the keys (few rows, many keys: MoCo's queue). Those shapes take the
    online path: they are bound by reading the keys, not by exps, and a fixed-shift repair pass (run
    unsplit) would read the keys again on a handful of programs."""
    if mode.self_sim:
        return False
    cfg = launch_config.get("fwd", a.dtype, a.shape[1], "v2")
    return _key_split(cdiv(a.shape[0], cfg.block_m), b.shape[0], cfg.block_n, a.device)[0] > 1


# Tests switch the repair pass off to check the fixed-shift sums alone (normalized inputs need none).
_REPAIR = True

# Rows whose LSE lies more than this (base 2) under the largest one make 2^(shift − lse) too large for
# the one-exp backward (exp2(z − shift) would lose them to underflow): the two-exp kernels run instead.
_ONE_EXP_RANGE = 100.0


def _one_exp_factors(r_lse, gr, c_lse, gc):
    """(shift, flag, gr·2^(shift − lse), gc·2^(shift − lseᶜ)) for the one-exp backward, all on the device.

    shift = the largest LSE ≥ every kept z, so exp2(z − shift) ≤ 1. ``flag`` (int32 [1]) is set when some
    row's LSE is more than _ONE_EXP_RANGE below it; then the guarded two-exp kernels do the work.
    Rows without any entry (LSE −1e30 or −inf) get a factor 0: their P is 0 either way.
    """
    # Rows and columns in one vector: half the small ops, each a kernel launch (host time is what a small
    # batch's step is made of).
    n = r_lse.shape[0]
    lse, g = torch.cat([r_lse, c_lse]), torch.cat([gr, gc])
    shift = lse.amax().reshape(1)
    valid = lse > -1e29
    fac = (shift - lse).clamp_(max=126.0).exp2_().mul_(g).masked_fill_(~valid, 0.0)
    flag = ((lse < shift - _ONE_EXP_RANGE) & valid).any().to(torch.int32).reshape(1)
    return shift, flag, fac[:n], fac[n:]


class _ContrastiveLoss(torch.autograd.Function):
    """Per-row losses (fp32) of one loss family; saves only O((N + M)·D) inputs and O(N + M) statistics."""

    @staticmethod
    def forward(ctx, mode: _Mode, a, b, bpos, s, bias, targets, labels):
        with device_guard(a.device):
            return _ContrastiveLoss._forward(ctx, mode, a, b, bpos, s, bias, targets, labels)

    @staticmethod
    def _forward(ctx, mode, a, b, bpos, s, bias, targets, labels):
        b_ = a if b is None else b
        val, pos, cnt, c_lse = _forward_stats(mode, a, b_, bpos, s, bias, targets, labels)
        if mode.sigmoid:
            rows = val.clone()
        elif mode.pos == POS_LABEL:
            # L_out: LSE − mean positive logit; anchors with no positive give 0 (and leave the mean).
            rows = torch.where(cnt > 0, (val - pos / cnt.clamp(min=1)) * math.log(2), torch.zeros_like(val))
        else:
            if mode.two_sided:  # ½·((lse − pos) + (lseᶜ − pos)), base 2 → nats: three ops, not six
                rows = torch.sub(val + c_lse, pos, alpha=2).mul_(0.5 * math.log(2))
            else:
                rows = (val - pos).mul_(math.log(2))
        ctx.mode = mode
        ctx.save_for_backward(a, b, bpos, s, bias, targets, labels, val, pos, cnt, c_lse)
        aux = cnt if mode.pos == POS_LABEL else torch.empty(0, device=a.device)
        ctx.mark_non_differentiable(aux)
        return rows, aux

    @staticmethod
    @first_order_only
    def backward(ctx, g_rows, _g_aux):
        with device_guard(g_rows.device):
            return _ContrastiveLoss._backward(ctx, g_rows)

    @staticmethod
    def _backward(ctx, g_rows):
        mode: _Mode = ctx.mode
        a, b, bpos, s, bias, targets, labels, val, pos, cnt, c_lse = ctx.saved_tensors
        need = ctx.needs_input_grad  # (mode, a, b, bpos, s, bias, targets, labels)
        if not any(need[1:6]):
            return (None,) * 8
        eng = launch_config.engine()
        b_ = a if b is None else b
        g = g_rows.to(torch.float32).contiguous()
        gr = gw = g
        if mode.pos == POS_LABEL:
            gr = torch.where(cnt > 0, g, torch.zeros_like(g))
            gw = gr / cnt.clamp(min=1)
        if mode.two_sided:
            gr = gw = gc = gcw = 0.5 * g
        elif mode.self_sim:
            # dSᵀ_ij = dS_ji: row j's own statistics, read per column.
            c_lse, gc, gcw = val, gr, gw
        else:
            gc = gcw = None
        stats = _BwdStats(val, gr, gw, c_lse, gc, gcw, pos)
        one_exp = None
        if eng.version == "v2" and eng.one_exp_bwd and gc is not None and not mode.sigmoid:
            shift, flag, fr, fc = _one_exp_factors(val, gr, c_lse, gc)
            one_exp = (shift, flag, stats._replace(gr=fr, gc=fc))

        da = dbpos = gs = gsum = None
        want_dbpos = bpos is not None and need[3]
        if need[1] or need[3] or need[4] or need[5]:
            da, dbpos, gs, gsum = _combine_bwd_rows(
                *_guarded(_launch_bwd_rows, one_exp, eng.version, mode, a, b_, bpos, s, bias, targets, labels,
                          stats, want_dbpos), a.dtype)
        db = None
        if b is not None and need[2]:
            db = _guarded(_launch_bwd_cols, one_exp, eng.version, mode, a, b, s, bias, targets, labels, stats)

        ds = None
        if need[4]:
            g_s = gs
            if mode.self_sim:
                g_s = 0.5 * g_s  # Σ (dS + dSᵀ) ⊙ A counts every logit twice
            ds = g_s if s.numel() > 1 else g_s.sum().reshape(1)
        dbias = gsum.sum().reshape(1) if need[5] else None
        return None, da if need[1] else None, db, dbpos, ds, dbias, None, None


class _BwdStats(NamedTuple):
    """Per-row / per-column statistics the backward kernels read (see _dlogits)."""
    r_lse: torch.Tensor
    gr: torch.Tensor
    gw: torch.Tensor
    c_lse: Optional[torch.Tensor]
    gc: Optional[torch.Tensor]
    gcw: Optional[torch.Tensor]
    pos: torch.Tensor


# fp16's normal range ends at 6.1e-5 and its subnormals at 6e-8, while dS = g·(P − y) with a mean's g = 1/N and
# P ≈ 1/M is ~1e-9 at N = M = 32768: cast to fp16 for the tensor cores, the negatives' part of the gradient
# would vanish. The fp16 passes scale dS by a power of two that puts its largest possible value at 2^12 (dS is
# at most |g_r| + |g_w| + |g_c| + |g_cw|, times s in the columns pass) and unscale the fp32 sums. bf16 has
# fp32's exponent range and fp32 is not cast: no scale there.
_HALF_HEADROOM = 12


def _half_scale(a: torch.Tensor, st: "_BwdStats", s: Optional[torch.Tensor], placeholder: torch.Tensor):
    """(the scale as a device [1] tensor, True) for fp16 operands, else (placeholder, False); no host sync.
    ``st``: the plain statistics (not the one-exp factors)."""
    if a.dtype != torch.float16:
        return placeholder, False
    parts = [t.abs().amax() for t in (st.gr, st.gw, st.gc, st.gcw) if t is not None and t.numel()]
    top = torch.stack(parts).sum()
    if s is not None:
        top = top * s.detach().float().abs().amax()
    return torch.exp2(_HALF_HEADROOM - torch.ceil(torch.log2(top.clamp(min=1e-30)))).reshape(1), True


def _guarded(launch, one_exp, version, *args, **kw):
    """One backward pass: plain; or (one-exp engine) the one-exp kernel and the two-exp fallback, each
    running only when the device flag says so, both writing the same outputs. ``kw``: the launcher's
    keyword arguments (a key block's, an ``out`` buffer)."""
    if one_exp is None:
        return launch(*args, version=version, **kw)
    shift, flag, fast_stats = one_exp
    fast_args = list(args)
    st = -2 if launch is _launch_bwd_rows else -1
    fast_args[st] = fast_stats
    # fp16's dS scale from the plain statistics: the one-exp factors fold 2^(shift − lse) into g, so they bound
    # nothing (dS itself stays within the plain g's there too).
    kw = {**kw, "half": (_half_scale(args[2], args[st], None, args[st].r_lse) if launch is _launch_bwd_rows
                         else _half_scale(args[1], args[st], args[3], args[st].r_lse))}
    out = launch(*fast_args, version=version, one_exp=(shift, flag), **kw)
    launch(*args, version=version, fallback=flag, **{**kw, "out": out})
    return out


def _launch_bwd_rows(mode, a, b, bpos, s, bias, targets, labels, st: _BwdStats, want_dbpos, *, version,
                     one_exp=None, fallback=None, out=None, cfg=None, diag_off: int = 0, key_labels=None,
                     da_dtype=None, half=None):
    """dA (+ MoCo's dK), and the per-row partials of ∂loss/∂s and ∂loss/∂bias.

    ``diag_off`` / ``key_labels`` as in _launch_fwd; ``da_dtype``: dA's dtype (default a's; the block
    engine asks for fp32 to add the blocks' parts without rounding each)."""
    n, d = a.shape
    has_col = st.gc is not None
    placeholder = st.r_lse  # any tensor for pointer arguments a constexpr flag leaves unread
    if cfg is None:
        key = (mode, want_dbpos, one_exp is not None, fallback is not None)
        cfg = _config("bwd_rows", a, d, version, key, lambda c: _launch_bwd_rows(
            mode, a, b, bpos, s, bias, targets, labels, st, want_dbpos, version=version, one_exp=one_exp,
            fallback=fallback, cfg=c, diag_off=diag_off, key_labels=key_labels, da_dtype=da_dtype, half=half))
    if mode.pos == POS_EXTRA and _resident(cfg, d, version):
        # MoCo's epilogue holds two more [BLOCK_M, D] fp32 tiles (k_i, q_i): 32+ rows at D = 256 spill on sm_90.
        cfg = cfg._replace(block_m=min(cfg.block_m, 16))
    n_chunks = cdiv(d, cfg.block_dout)
    row_tiles = cdiv(n, cfg.block_m)
    m = b.shape[0]
    if out is None:
        # The fp32 partials of dA ([splits, N, D]) may take at most the memory of the keys themselves: MoCo's
        # 256 queries split 128 ways over a 65536-key queue, while N = M = 4096 (SimCLR-sized) never splits.
        cap = (m * b.element_size()) // (4 * max(n, 1))
        splits, per_split = _key_split(row_tiles * n_chunks, m, cfg.block_n, a.device, cap)
        # Split partials of dA are fp32 [splits, N, D], summed (and cast) by _combine_bwd_rows.
        da = _empty(a.shape, da_dtype or a.dtype, a.device) if splits == 1 else \
            _empty((splits, n, d), torch.float32, a.device)
        dbpos = _empty(bpos.shape, bpos.dtype, bpos.device) if want_dbpos else None
        gs = _empty((splits, n), torch.float32, a.device)
        gsum = _empty((splits, n), torch.float32, a.device) if mode.sigmoid else placeholder
    else:
        da, dbpos, gs, gsum = out  # the fallback pass writes the same buffers: same split
        splits = gs.shape[0]
        per_split = cdiv(m, splits) if splits > 1 else max(m, 1)
    shift, flag = one_exp if one_exp is not None else (placeholder, fallback)
    hs, half_scale = half if half is not None else _half_scale(b, st, None, placeholder)
    da_rows = da if da.dim() == 2 else da[0]
    _bwd_rows_kernel[(row_tiles, n_chunks, splits)](
        a, b, bpos if bpos is not None else a, s, bias if bias is not None else s,
        targets if targets is not None else placeholder, labels if labels is not None else placeholder,
        _first(key_labels, labels, placeholder),
        st.r_lse, st.gr, st.gw, st.c_lse if has_col else placeholder, st.gc if has_col else placeholder,
        st.gcw if has_col else placeholder, st.pos, da, dbpos if want_dbpos else da, gs, gsum,
        shift, flag if flag is not None else placeholder, hs,
        n, m, d, a.stride(0), b.stride(0), bpos.stride(0) if bpos is not None else 0, da_rows.stride(0),
        dbpos.stride(0) if want_dbpos else 0, 1 if s.numel() > 1 else 0,
        per_split, da.stride(0) if da.dim() == 3 else 0, diag_off,
        HAS_COL=has_col, EXCL_DIAG=mode.excl_diag, EXCL_TGT=mode.excl_tgt, POS=mode.pos, SIGMOID=mode.sigmoid,
        WANT_DBPOS=want_dbpos, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        BLOCK_DOUT=cfg.block_dout, DOT_PREC=_dot_precision(a.dtype), RESIDENT=_resident(cfg, d, version),
        ONE_EXP=one_exp is not None, GUARD=1 if one_exp is not None else 2 if fallback is not None else 0,
        HALF_SCALE=half_scale, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return da, dbpos, gs, gsum


def _combine_bwd_rows(da, dbpos, gs, gsum, dtype: torch.dtype):
    """Sum the key splits' partials of a rows pass ([splits, ...] -> [...])."""
    if da.dim() == 3:
        da = da.sum(0).to(dtype)
    return da, dbpos, gs.sum(0), gsum.sum(0) if gsum.dim() == 2 else gsum


def _launch_bwd_cols(mode, a, b, s, bias, targets, labels, st: _BwdStats, *, version, one_exp=None,
                     fallback=None, out=None, cfg=None, diag_off: int = 0, key_labels=None, half=None):
    """dB = dSᵀ·(s ⊙ A), written into ``out`` when given (any float dtype). ``diag_off`` / ``key_labels``
    as in _launch_fwd."""
    n, d = a.shape
    m = b.shape[0]
    has_col = st.gc is not None
    placeholder = st.r_lse
    if cfg is None:
        key = (mode, one_exp is not None, fallback is not None)
        cfg = _config("bwd_cols", a, d, version, key, lambda c: _launch_bwd_cols(
            mode, a, b, s, bias, targets, labels, st, version=version, one_exp=one_exp, fallback=fallback,
            cfg=c, diag_off=diag_off, key_labels=key_labels, half=half))
    db = _empty(b.shape, b.dtype, b.device) if out is None else out
    shift, flag = one_exp if one_exp is not None else (placeholder, fallback)
    hs, half_scale = half if half is not None else _half_scale(a, st, s, placeholder)
    _bwd_cols_kernel[(cdiv(m, cfg.block_m), cdiv(d, cfg.block_dout))](
        a, b, s, bias if bias is not None else s,
        targets if targets is not None else placeholder, labels if labels is not None else placeholder,
        _first(key_labels, labels, placeholder),
        st.r_lse, st.gr, st.gw, st.c_lse if has_col else placeholder, st.gc if has_col else placeholder,
        st.gcw if has_col else placeholder, db, shift, flag if flag is not None else placeholder, hs,
        n, m, d, a.stride(0), b.stride(0), db.stride(0), 1 if s.numel() > 1 else 0, diag_off,
        HAS_COL=has_col, EXCL_DIAG=mode.excl_diag, EXCL_TGT=mode.excl_tgt, POS=mode.pos,
        SIGMOID=mode.sigmoid, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        BLOCK_DOUT=cfg.block_dout, DOT_PREC=_dot_precision(a.dtype), RESIDENT=_resident(cfg, d, version),
        ONE_EXP=one_exp is not None, GUARD=1 if one_exp is not None else 2 if fallback is not None else 0,
        HALF_SCALE=half_scale, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return db


# ------------------------------------------------------------------------------------ public impls


def _exact(x: torch.Tensor) -> bool:
    # The kernels accumulate in fp32; float64 inputs take the float64 reference (it materializes N×M).
    return x.dtype == torch.float64


def _features(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16 and triton_interpreted():
        x = x.float()  # the interpreter's tl.dot is wrong on bf16 operands; the GPU path keeps bf16
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _run(mode, a, b, bpos, s, bias=None, targets=None, labels=None):
    return _ContrastiveLoss.apply(mode, a, b, bpos, s, bias, targets, labels)


@register("info_nce", "triton")
def info_nce(query, key, temperature, targets, symmetric, decoupled, reduction):
    if _exact(query):
        return reference.info_nce(query, key, temperature, targets, symmetric, decoupled, reduction)
    q, k = _features(query), _features(key)
    if targets is None:
        targets = torch.arange(q.shape[0], device=q.device)
    mode = _Mode(POS_TARGET, excl_tgt=decoupled, two_sided=symmetric)
    rows, _ = _run(mode, q, k, None, _scale(temperature, True, q.device), targets=targets.contiguous())
    return reduce(rows, reduction)


@register("clip_loss", "triton")
def clip_loss(image_features, text_features, logit_scale, reduction):
    if _exact(image_features):
        return reference.clip_loss(image_features, text_features, logit_scale, reduction)
    i, t = _features(image_features), _features(text_features)
    targets = torch.arange(i.shape[0], device=i.device)
    rows, _ = _run(_Mode(POS_TARGET, two_sided=True), i, t, None, _scale(logit_scale, False, i.device),
                   targets=targets)
    return reduce(rows, reduction)


@register("nt_xent", "triton")
def nt_xent(z1, z2, temperature, decoupled, reduction):
    if _exact(z1):
        return reference.nt_xent(z1, z2, temperature, decoupled, reduction)
    z = torch.cat([_features(z1), _features(z2)], dim=0)
    n2 = z.shape[0]
    targets = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    mode = _Mode(POS_TARGET, excl_diag=True, excl_tgt=decoupled, self_sim=True)
    rows, _ = _run(mode, z, None, None, _scale(temperature, True, z.device), targets=targets)
    return reduce(rows, reduction)


@register("moco_loss", "triton")
def moco_loss(query, key, queue, temperature, reduction):
    if _exact(query):
        return reference.moco_loss(query, key, queue, temperature, reduction)
    q, k, neg = _features(query), _features(key), _features(queue.detach().to(query.dtype))
    rows, _ = _run(_Mode(POS_EXTRA), q, neg, k, _scale(temperature, True, q.device))
    return reduce(rows, reduction)


@register("supcon_loss", "triton")
def supcon_loss(features, labels, temperature, reduction):
    if _exact(features):
        return reference.supcon_loss(features, labels, temperature, reduction)
    f = _features(features)
    mode = _Mode(POS_LABEL, excl_diag=True, self_sim=True)
    rows, n_pos = _run(mode, f, None, None, _scale(temperature, True, f.device), labels=labels.contiguous())
    if reduction == "mean":
        # Anchors without a positive are left out of the mean; with none at all the loss is 0 (graph kept).
        return rows.sum() / (n_pos > 0).sum().clamp(min=1)
    return reduce(rows, reduction)


@register("siglip_loss", "triton")
def siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction):
    if _exact(image_features):
        return reference.siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction)
    i, t = _features(image_features), _features(text_features)
    s = _scale(logit_scale, False, i.device)
    bias = _scale(logit_bias, False, i.device)
    rows, _ = _run(_Mode(POS_NONE, sigmoid=True), i, t, None, s, bias)
    return reduce(rows, reduction)
