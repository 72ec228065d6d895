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

import contextlib
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import reference
from ..backends import register, triton_interpreted
from ..reference import reduce
from . import launch_config
from ._common import empty as _empty

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
def _masks(r, c, ok, t_r, lab_r, lab_c, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr):
    # (entries inside the LSE, positive entries) for broadcastable row indices r and column indices c;
    # the same code serves a tile and its transpose (the cols pass passes r as a row vector).
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
    # log(1 + e^y) without overflow; log2/exp2 are the fast hardware forms.
    return tl.maximum(y, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(y) * LOG2E)) * LN2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, bpos_ptr, s_ptr, bias_ptr, tgt_ptr, lab_ptr, val_ptr, pos_ptr, cnt_ptr,
                N, M, D, stride_a, stride_b, stride_bpos, s_stride,
                SCALE_ON_COLS: tl.constexpr, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr,
                SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    # One program per tile of rows of a. Writes per row: LSE in base 2 (SIGMOID: the softplus sum, in
    # nats), the positive logit in base 2 (SupCon: the sum over positives) and SupCon's positive count.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    s_r = tl.load(s_ptr + rows * s_stride, mask=r_ok, other=1.0).to(tl.float32)
    if EXCL_TGT or POS == 1:
        t_r = tl.load(tgt_ptr + rows, mask=r_ok, other=-1)
    else:
        t_r = rows
    if POS == 2:
        lab_r = tl.load(lab_ptr + rows, mask=r_ok, other=0)
    else:
        lab_r = rows
    m = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    if POS == 3:
        psum = _row_dots(a_ptr, bpos_ptr, rows, r_ok, stride_a, stride_bpos, D, BLOCK_M, BLOCK_D) * (s_r * LOG2E)
        m = psum
        l = l + 1.0
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        c_ok = cols < M
        ok = r_ok[:, None] & c_ok[None, :]
        acc = _dots(a_ptr, rows, r_ok, stride_a, b_ptr, cols, c_ok, stride_b, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
        if SIGMOID:
            x = acc * s_r[:, None] + bias
            y = tl.where(cols[None, :] == rows[:, None], -x, x)  # label +1 on the diagonal, −1 elsewhere
            l += tl.sum(tl.where(ok, _softplus(y), 0.0), axis=1)
        else:
            if SCALE_ON_COLS:
                s_c = tl.load(s_ptr + cols * s_stride, mask=c_ok, other=1.0).to(tl.float32)
                z = acc * (s_c * LOG2E)[None, :]
            else:
                z = acc * (s_r * LOG2E)[:, None]
            if POS == 2:
                lab_c = tl.load(lab_ptr + cols, mask=c_ok, other=0)
            else:
                lab_c = cols
            keep, pos = _masks(rows[:, None], cols[None, :], ok, t_r[:, None], lab_r[:, None], lab_c[None, :],
                               EXCL_DIAG, EXCL_TGT, POS)
            zk = tl.where(keep, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zk, axis=1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(zk - m_new[:, None]), axis=1)
            m = m_new
            if POS == 1 or POS == 2:
                psum += tl.sum(tl.where(pos, z, 0.0), axis=1)
            if POS == 2:
                cnt += tl.sum(pos.to(tl.float32), axis=1)
    if SIGMOID:
        tl.store(val_ptr + rows, l, mask=r_ok)
    else:
        # l ≥ 1 once a row has an entry (its maximum adds exp2(0)); a row with none (SupCon's lone
        # anchor, padding) keeps l = 0 and gets LSE = −1e30, finite, its loss masked on the host.
        tl.store(val_ptr + rows, m + tl.log2(tl.maximum(l, 1.0)), mask=r_ok)
        if POS != 0:
            tl.store(pos_ptr + rows, psum, mask=r_ok)
        if POS == 2:
            tl.store(cnt_ptr + rows, cnt, mask=r_ok)


@triton.jit
def _dlogits(z, x, r, c, ok, keep, pos, r_lse, gr, gw, c_lse, gc, gcw,
             HAS_COL: tl.constexpr, SIGMOID: tl.constexpr):
    # ∂loss/∂S for a tile (or its transpose: every per-row/per-column operand arrives pre-broadcast).
    # Softmax: g_i (P_ij − w_i [pos]) + (two-sided) g_j (Pᶜ_ij − wᶜ_j [pos]). Masked entries become
    # −inf before exp2 (→ 0): the excluded diagonal could otherwise overflow, and 0·inf is NaN.
    if SIGMOID:
        ds = tl.where(ok, gr * (_sigmoid(x) - tl.where(c == r, 1.0, 0.0)), 0.0)
    else:
        zk = tl.where(keep, z, float("-inf"))
        ds = tl.exp2(zk - r_lse) * gr
        w = gw
        if HAS_COL:
            ds += tl.exp2(zk - c_lse) * gc
            w = w + gcw
        ds = ds - tl.where(pos, w, 0.0)
    return ds


@triton.jit
def _bwd_rows_kernel(a_ptr, b_ptr, bpos_ptr, s_ptr, bias_ptr, tgt_ptr, lab_ptr,
                     rlse_ptr, rg_ptr, rgw_ptr, clse_ptr, cg_ptr, cgw_ptr, pos_ptr,
                     da_ptr, dbpos_ptr, gs_ptr, gsum_ptr,
                     N, M, D, stride_a, stride_b, stride_bpos, stride_da, stride_dbpos, s_stride,
                     HAS_COL: tl.constexpr, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr,
                     SIGMOID: tl.constexpr, WANT_DBPOS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    # Program (row tile, feature chunk): dA for those rows and features; chunk 0 also writes per row
    # G_i = Σ_j dS_ij (a_i·b_j) (∂loss/∂s_i) and Σ_j dS_ij (∂loss/∂bias), summed from the fp32 tiles
    # (not from the low-precision dS that feeds the tensor cores).
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    r64 = rows.to(tl.int64)
    dcols = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dc_ok = dcols < D
    s_r = tl.load(s_ptr + rows * s_stride, mask=r_ok, other=1.0).to(tl.float32)
    if EXCL_TGT or POS == 1:
        t_r = tl.load(tgt_ptr + rows, mask=r_ok, other=-1)
    else:
        t_r = rows
    if POS == 2:
        lab_r = tl.load(lab_ptr + rows, mask=r_ok, other=0)
    else:
        lab_r = rows
    r_lse = tl.load(rlse_ptr + rows, mask=r_ok, other=0.0)
    gr = tl.load(rg_ptr + rows, mask=r_ok, other=0.0)
    gw = tl.load(rgw_ptr + rows, mask=r_ok, other=0.0)
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    acc = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    gsv = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        c_ok = cols < M
        ok = r_ok[:, None] & c_ok[None, :]
        S = _dots(a_ptr, rows, r_ok, stride_a, b_ptr, cols, c_ok, stride_b, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
        z = S * (s_r * LOG2E)[:, None]
        x = S * s_r[:, None] + bias
        if POS == 2:
            lab_c = tl.load(lab_ptr + cols, mask=c_ok, other=0)
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
        keep, pos = _masks(rows[:, None], cols[None, :], ok, t_r[:, None], lab_r[:, None], lab_c[None, :],
                           EXCL_DIAG, EXCL_TGT, POS)
        ds = _dlogits(z, x, rows[:, None], cols[None, :], ok, keep, pos, r_lse[:, None], gr[:, None], gw[:, None],
                      c_lse, gc, gcw, HAS_COL, SIGMOID)
        gsv += tl.sum(ds * S, axis=1)
        if SIGMOID:
            dsum += tl.sum(ds, axis=1)
        b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                    mask=c_ok[:, None] & dc_ok[None, :], other=0.0)
        # dS goes to the tensor cores in the input dtype (as flash attention's P); it lies in [−1, 1].
        acc = tl.dot(ds.to(b.dtype), b, acc, input_precision=DOT_PREC)
    out_mask = r_ok[:, None] & dc_ok[None, :]
    if POS == 3:
        # MoCo's positive column: dS_i0 = g_i (P_i0 − 1), with the key row k_i as its "b".
        pos2 = tl.load(pos_ptr + rows, mask=r_ok, other=0.0)
        dpos = gr * (tl.exp2(pos2 - r_lse) - 1.0)
        kp = tl.load(bpos_ptr + r64[:, None] * stride_bpos + dcols[None, :], mask=out_mask, other=0.0)
        acc += dpos[:, None] * kp.to(tl.float32)
        gsv += dpos * (pos2 / (s_r * LOG2E))
        if WANT_DBPOS:
            a = tl.load(a_ptr + r64[:, None] * stride_a + dcols[None, :], mask=out_mask, other=0.0).to(tl.float32)
            tl.store(dbpos_ptr + r64[:, None] * stride_dbpos + dcols[None, :],
                     ((s_r * dpos)[:, None] * a).to(dbpos_ptr.dtype.element_ty), mask=out_mask)
    tl.store(da_ptr + r64[:, None] * stride_da + dcols[None, :],
             (acc * s_r[:, None]).to(da_ptr.dtype.element_ty), mask=out_mask)
    tl.store(gs_ptr + rows, gsv, mask=r_ok & (pid_d == 0))
    if SIGMOID:
        tl.store(gsum_ptr + rows, dsum, mask=r_ok & (pid_d == 0))


@triton.jit
def _bwd_cols_kernel(a_ptr, b_ptr, s_ptr, bias_ptr, tgt_ptr, lab_ptr,
                     rlse_ptr, rg_ptr, rgw_ptr, clse_ptr, cg_ptr, cgw_ptr, db_ptr,
                     N, M, D, stride_a, stride_b, stride_db, s_stride,
                     HAS_COL: tl.constexpr, EXCL_DIAG: tl.constexpr, EXCL_TGT: tl.constexpr, POS: tl.constexpr,
                     SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    # Program (tile of BLOCK_M rows of b, feature chunk): dB_j = Σ_i dS_ij s_i a_i, streaming rows of a.
    # Tiles are transposed: [rows of b, rows of a].
    pid_d = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = cols < M
    dcols = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dc_ok = dcols < D
    if POS == 2:
        lab_c = tl.load(lab_ptr + cols, mask=c_ok, other=0)
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
    acc = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        r_ok = rows < N
        s_r = tl.load(s_ptr + rows * s_stride, mask=r_ok, other=1.0).to(tl.float32)
        if EXCL_TGT or POS == 1:
            t_r = tl.load(tgt_ptr + rows, mask=r_ok, other=-1)
        else:
            t_r = rows
        if POS == 2:
            lab_r = tl.load(lab_ptr + rows, mask=r_ok, other=0)
        else:
            lab_r = rows
        r_lse = tl.load(rlse_ptr + rows, mask=r_ok, other=0.0)
        gr = tl.load(rg_ptr + rows, mask=r_ok, other=0.0)
        gw = tl.load(rgw_ptr + rows, mask=r_ok, other=0.0)
        ok = c_ok[:, None] & r_ok[None, :]
        St = _dots(b_ptr, cols, c_ok, stride_b, a_ptr, rows, r_ok, stride_a, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
        z = St * (s_r * LOG2E)[None, :]
        x = St * s_r[None, :] + bias
        keep, pos = _masks(rows[None, :], cols[:, None], ok, t_r[None, :], lab_r[None, :], lab_c[:, None],
                           EXCL_DIAG, EXCL_TGT, POS)
        dst = _dlogits(z, x, rows[None, :], cols[:, None], ok, keep, pos, r_lse[None, :], gr[None, :],
                       gw[None, :], c_lse, gc, gcw, HAS_COL, SIGMOID)
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_a + dcols[None, :],
                    mask=r_ok[:, None] & dc_ok[None, :], other=0.0)
        acc = tl.dot((dst * s_r[None, :]).to(a.dtype), a, acc, input_precision=DOT_PREC)
    tl.store(db_ptr + cols.to(tl.int64)[:, None] * stride_db + dcols[None, :], acc.to(db_ptr.dtype.element_ty),
             mask=c_ok[:, None] & dc_ok[None, :])


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


def _on(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 features follow PyTorch's matmul setting (exact by default); fp16/bf16 always use the
    # tensor cores (the precision flag only affects fp32 operands).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_fwd(mode: _Mode, a, b, bpos, s, bias, targets, labels, *, columns: bool):
    """Rows pass over a (``columns``: over b, i.e. the column LSE of a symmetric loss)."""
    if columns:
        a, b = b, a
    n, d = a.shape
    m = b.shape[0]
    cfg = launch_config.get("fwd", a.dtype, d)
    f32 = dict(dtype=torch.float32, device=a.device)
    val = _empty((n,), **f32)
    pos_kind = POS_NONE if columns else mode.pos
    pos = _empty((n,), **f32) if pos_kind != POS_NONE else val
    cnt = _empty((n,), **f32) if pos_kind == POS_LABEL else val
    # Unused pointer arguments get any tensor: constexpr flags keep them from being read.
    _fwd_kernel[(triton.cdiv(n, cfg.block_m),)](
        a, b, bpos if bpos is not None else a, s, bias if bias is not None else s,
        targets if targets is not None else val, labels if labels is not None else val, val, pos, cnt,
        n, m, d, a.stride(0), b.stride(0), bpos.stride(0) if bpos is not None else 0, 1 if s.numel() > 1 else 0,
        SCALE_ON_COLS=columns, EXCL_DIAG=mode.excl_diag or (columns and mode.excl_tgt),
        EXCL_TGT=mode.excl_tgt and not columns, POS=pos_kind, SIGMOID=mode.sigmoid,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_PREC=_dot_precision(a.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return val, pos, cnt


class _ContrastiveLoss(torch.autograd.Function):
    """Per-row losses (fp32) of one loss family; saves only O((N + M)·D) inputs and O(N + M) statistics."""

    @staticmethod
    def forward(ctx, mode: _Mode, a, b, bpos, s, bias, targets, labels):
        with _on(a.device):
            return _ContrastiveLoss._forward(ctx, mode, a, b, bpos, s, bias, targets, labels)

    @staticmethod
    def _forward(ctx, mode, a, b, bpos, s, bias, targets, labels):
        b_ = a if b is None else b
        val, pos, cnt = _launch_fwd(mode, a, b_, bpos, s, bias, targets, labels, columns=False)
        c_lse = None
        if mode.sigmoid:
            rows = val.clone()
        elif mode.pos == POS_LABEL:
            # L_out: LSE − mean positive logit; anchors with no positive give 0 (and leave the mean).
            rows = torch.where(cnt > 0, (val - pos / cnt.clamp(min=1)) * math.log(2), torch.zeros_like(val))
        else:
            rows = (val - pos) * math.log(2)
            if mode.two_sided:
                c_lse = _launch_fwd(mode, a, b_, bpos, s, bias, targets, labels, columns=True)[0]
                rows = 0.5 * (rows + (c_lse - pos) * math.log(2))
        ctx.mode = mode
        ctx.save_for_backward(a, b, bpos, s, bias, targets, labels, val, pos, cnt, c_lse)
        aux = cnt if mode.pos == POS_LABEL else torch.empty(0, device=a.device)
        ctx.mark_non_differentiable(aux)
        return rows, aux

    @staticmethod
    @once_differentiable
    def backward(ctx, g_rows, _g_aux):
        with _on(g_rows.device):
            return _ContrastiveLoss._backward(ctx, g_rows)

    @staticmethod
    def _backward(ctx, g_rows):
        mode: _Mode = ctx.mode
        a, b, bpos, s, bias, targets, labels, val, pos, cnt, c_lse = ctx.saved_tensors
        need = ctx.needs_input_grad  # (mode, a, b, bpos, s, bias, targets, labels)
        if not any(need[1:6]):
            return (None,) * 8
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

        da = dbpos = gs = gsum = None
        want_dbpos = bpos is not None and need[3]
        if need[1] or need[3] or need[4] or need[5]:
            da, dbpos, gs, gsum = _launch_bwd_rows(mode, a, b_, bpos, s, bias, targets, labels, val, gr, gw,
                                                   c_lse, gc, gcw, pos, want_dbpos)
        db = None
        if b is not None and need[2]:
            db = _launch_bwd_cols(mode, a, b, s, bias, targets, labels, val, gr, gw, c_lse, gc, gcw)

        ds = None
        if need[4]:
            g_s = gs
            if mode.self_sim:
                g_s = 0.5 * g_s  # Σ (dS + dSᵀ) ⊙ A counts every logit twice
            ds = g_s if s.numel() > 1 else g_s.sum().reshape(1)
        dbias = gsum.sum().reshape(1) if need[5] else None
        return None, da if need[1] else None, db, dbpos, ds, dbias, None, None


def _launch_bwd_rows(mode, a, b, bpos, s, bias, targets, labels, val, gr, gw, c_lse, gc, gcw, pos, want_dbpos):
    """dA (+ MoCo's dK), and the per-row partials of ∂loss/∂s and ∂loss/∂bias."""
    n, d = a.shape
    has_col = gc is not None
    placeholder = val  # any tensor for pointer arguments a constexpr flag leaves unread
    cfg = launch_config.get("bwd_rows", a.dtype, d)
    n_chunks = triton.cdiv(d, cfg.block_dout)
    da = _empty(a.shape, a.dtype, a.device)
    dbpos = _empty(bpos.shape, bpos.dtype, bpos.device) if want_dbpos else None
    gs = _empty((n,), torch.float32, a.device)
    gsum = _empty((n,), torch.float32, a.device) if mode.sigmoid else placeholder
    _bwd_rows_kernel[(triton.cdiv(n, cfg.block_m), n_chunks)](
        a, b, bpos if bpos is not None else a, s, bias if bias is not None else s,
        targets if targets is not None else placeholder, labels if labels is not None else placeholder,
        val, gr, gw, c_lse if has_col else placeholder, gc if has_col else placeholder,
        gcw if has_col else placeholder, pos, da, dbpos if want_dbpos else da, gs, gsum,
        n, b.shape[0], d, a.stride(0), b.stride(0), bpos.stride(0) if bpos is not None else 0, da.stride(0),
        dbpos.stride(0) if want_dbpos else 0, 1 if s.numel() > 1 else 0,
        HAS_COL=has_col, EXCL_DIAG=mode.excl_diag, EXCL_TGT=mode.excl_tgt, POS=mode.pos, SIGMOID=mode.sigmoid,
        WANT_DBPOS=want_dbpos, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        BLOCK_DOUT=cfg.block_dout, DOT_PREC=_dot_precision(a.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return da, dbpos, gs, gsum


def _launch_bwd_cols(mode, a, b, s, bias, targets, labels, val, gr, gw, c_lse, gc, gcw):
    """dB = dSᵀ·(s ⊙ A)."""
    n, d = a.shape
    m = b.shape[0]
    has_col = gc is not None
    placeholder = val
    cfg = launch_config.get("bwd_cols", a.dtype, d)
    db = _empty(b.shape, b.dtype, b.device)
    _bwd_cols_kernel[(triton.cdiv(m, cfg.block_m), triton.cdiv(d, cfg.block_dout))](
        a, b, s, bias if bias is not None else s,
        targets if targets is not None else placeholder, labels if labels is not None else placeholder,
        val, gr, gw, c_lse if has_col else placeholder, gc if has_col else placeholder,
        gcw if has_col else placeholder, db, n, m, d, a.stride(0), b.stride(0), db.stride(0),
        1 if s.numel() > 1 else 0,
        HAS_COL=has_col, EXCL_DIAG=mode.excl_diag, EXCL_TGT=mode.excl_tgt, POS=mode.pos,
        SIGMOID=mode.sigmoid, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        BLOCK_DOUT=cfg.block_dout, DOT_PREC=_dot_precision(a.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return db


# ------------------------------------------------------------------------------------ public impls


def _exact(x: torch.Tensor) -> bool:
    # The kernels accumulate in fp32; float64 inputs take the float64 reference (it materializes N×M).
    return x.dtype == torch.float64


def _features(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16 and triton_interpreted():
        x = x.float()  # the interpreter's tl.dot is wrong on bf16 operands; the GPU path keeps bf16
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _scale(value, invert: bool, device) -> torch.Tensor:
    """fp32 [1] or [N] tensor of s (1/τ when ``invert``), differentiable w.r.t. a tensor ``value``."""
    if isinstance(value, torch.Tensor):
        v = value.to(torch.float32)
        return (1.0 / v if invert else v).reshape(-1)
    return torch.full((1,), 1.0 / value if invert else float(value), dtype=torch.float32, device=device)


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
