"""DINO's loss with the student gradient formed in the forward, while each student row is still in L2.

The two-pass kernels (ops/dino.py) read every student logit twice from HBM: once in the forward for its
row's LSE, once in the backward for the gradient. That traffic, 2R + W against the floor's R + W, is 1.54×
the floor at the paper size, over issue 5's 1.5× target before any inefficiency. Here a persistent program
takes one student row (sample i, crop b), or CROPS rows of one sample, at a time and walks them twice
back to back: first for their LSEs, then for their gradients and loss terms. With few enough programs
that their rows fit in L2 together, the second walk reads L2, not HBM: traffic R + W plus the teacher.

The teacher's row statistics come first, from a split streaming launch (G·B rows, 1/(S+1) of the student
traffic at the paper size; its P-splits are merged by the main kernel, no launch in between). The main
kernel reads a sample's G teacher rows once per work item; programs take items sample-major, so a
sample's S crops run at about the same time and all but the first of those reads hit L2.

The forward stores the gradient for an upstream gradient of 1. The backward hands it out, after the
two-pass backward kernel (ops/dino.py) has recomputed in place the samples whose upstream gradient is not
exactly 1; its programs for the others (all of them after ``loss.backward()``) return at once, so that
costs one launch, no pass over the gradient and no host sync. Recomputing rather than scaling the stored
gradient keeps a bf16 gradient rounded once. A second backward (retain_graph) finds the gradient handed
out and recomputes all of it.

Opt-in until measured on a GPU (``SSLKERNELS_DINO_FUSED=1``); benchmarks/NOTES.md has the prediction.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import cdiv, empty as _empty, l2_bytes, next_pow2, sm_count, stream_split

# The main kernel's tile along P, at most TILE_ELEMENTS / (GP · CROPS) wide: walk 2 holds each crop's
# partner teacher probabilities, a [CROPS, GP, tile] block. The teacher statistics pass streams
# TEACHER_BLOCK-wide tiles. Tests lower these to make tiny inputs span
# several tiles and P-splits, and set INTERPRETER_PROGRAMS (the persistent grid off the GPU).
BLOCK_P = 4096
TILE_ELEMENTS = 8192
TEACHER_BLOCK = 1024
INTERPRETER_PROGRAMS = 4
# Share of L2 the programs' rows may fill: each keeps its current student row there between the two walks,
# and its gradient writes pass through L2 as well.
L2_SHARE = 0.5
PROGRAMS_PER_SM = (1, 4)  # at least one program per SM (bandwidth), at most four (L2 reuse)
# Software pipelining of the two walks' loads (tl.range num_stages): 1 = none, each tile's loads waited on
# before the next are issued. More stages keep more bytes in flight per program (what few programs per SM
# need for bandwidth) at the cost of shared memory (fp32, 4096-wide tiles, 3 stages: 128 KB, one program
# per SM). Offline sm_90 compiles confirm the loads are pipelined; which wins is for the GPU sweep.
STAGES = 1
# Student crops per work item (a power of two): walk 2 computes a column's G teacher probabilities once for
# all of them, so exps per student logit fall from 2 + G to 2 + G/CROPS, at CROPS rows of L2 per program.
# 1 until the GPU sweep says otherwise (benchmarks/NOTES.md: bf16 may be bound by exps, not bytes).
CROPS = 1
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "−inf" for running maxima: exp(m_old − m_new) stays 1, never NaN


def enabled() -> bool:
    return os.environ.get("SSLKERNELS_DINO_FUSED", "0") not in ("", "0")


@triton.jit
def inv_teacher_temp(tt_ptr, tt_val, TT_FROM_PTR: tl.constexpr):
    """1/τt from a 0-d tensor (read on the device: a warm-up schedule changes it without a recompile or a
    host sync) or from a float. Shared by both DINO paths."""
    if TT_FROM_PTR:
        return 1.0 / tl.load(tt_ptr).to(tl.float32)
    return 1.0 / tt_val


@triton.jit
def _teacher_stats_kernel(t_ptr, c_ptr, tt_ptr, part_ptr, B, P, stride_t, tt_val, tiles_per_split,
                          GP: tl.constexpr, KP: tl.constexpr, TT_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    # Program (r, k): teacher row r = a·B + i over the k-th range of P: the partial (max, sum) of its
    # centred, sharpened logits (t − c)/τt.
    r = tl.program_id(0)
    k = tl.program_id(1)
    inv_tt = inv_teacher_temp(tt_ptr, tt_val, TT_FROM_PTR)
    row = t_ptr + r.to(tl.int64) * stride_t
    m = tl.full([], _NEG_BIG, tl.float32)
    z = tl.zeros([], tl.float32)
    first = k * tiles_per_split * BLOCK
    for j in range(0, tiles_per_split):
        cols = first + j * BLOCK + tl.arange(0, BLOCK)
        ok = cols < P
        t = tl.load(row + cols, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.where(ok, (t - c) * inv_tt, float("-inf"))
        m_new = tl.maximum(m, tl.max(u, axis=0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), axis=0)
        m = m_new
    i = r % B
    a = r // B
    slot = part_ptr + ((i * GP + a) * KP + k) * 2
    tl.store(slot, m)
    tl.store(slot + 1, z)


@triton.jit
def _dino_fused_kernel(s_ptr, t_ptr, c_ptr, tt_ptr, tpart_ptr, g_ptr, lse_t_ptr, lse_s_ptr, loss_ptr,
                       B, P, stride_s, stride_t, stride_g, n_split, inv_ts, tt_val, coef,
                       G: tl.constexpr, S: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr, KP: tl.constexpr,
                       C: tl.constexpr, NG: tl.constexpr, TT_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
                       STAGES: tl.constexpr):
    # Persistent: program p takes items p, p + programs, ... in sample-major order (i, group). An item is C
    # student crops of sample i (crops group·C ... group·C + C − 1; NG groups cover the S crops): the
    # teacher probabilities of a column, G exps, then serve C crops instead of one.
    inv_tt = inv_teacher_temp(tt_ptr, tt_val, TT_FROM_PTR)
    ga = tl.arange(0, GP)
    t_ok = ga < G
    kk = tl.arange(0, KP)
    cc = tl.arange(0, C)
    for item in range(tl.program_id(0), B * NG, tl.num_programs(0)):
        i = item // NG
        bv = (item % NG) * C + cc  # the item's crops
        b_ok = bv < S
        s_rows = (bv * B + i).to(tl.int64) * stride_s

        # Walk 1: the rows' LSEs of s/τs. Their lines stay in L2 for walk 2 (evict_last).
        m = tl.full([C], _NEG_BIG, tl.float32)
        z = tl.zeros([C], tl.float32)
        for start in tl.range(0, P, BLOCK, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK)
            smask = b_ok[:, None] & (cols < P)[None, :]
            s = tl.load(s_ptr + s_rows[:, None] + cols[None, :], mask=smask, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            v = tl.where(smask, s * inv_ts, float("-inf"))
            m_new = tl.maximum(m, tl.max(v, axis=1))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new[:, None]), axis=1)
            m = m_new
        lse_b = tl.where(b_ok, m + tl.log(tl.where(b_ok, z, 1.0)), 0.0)  # 0 past S: no inf in the masked rows

        # The sample's teacher LSEs from the split partials.
        pmask = t_ok[:, None] & (kk < n_split)[None, :]
        part = tpart_ptr + ((i * GP + ga)[:, None] * KP + kk[None, :]) * 2
        pm = tl.load(part, mask=pmask, other=_NEG_BIG)
        pz = tl.load(part + 1, mask=pmask, other=0.0)
        mt = tl.max(pm, axis=1)
        zt = tl.sum(pz * tl.exp(pm - mt[:, None]), axis=1)
        lse_t = tl.where(t_ok, mt + tl.log(tl.where(t_ok, zt, 1.0)), 0.0)
        # Walk 2 takes t = exp(u − mt)/zt, not exp(u − lse_t): lse_t's own fp32 rounding (an ulp of |u|, 8e-6 at
        # τt = 0.04) would scale every t of the row by the same factor, Σ_p t = 1 + δ, and the loss with it.
        rz_t = 1.0 / tl.where(t_ok, zt, 1.0)

        # Walk 2: gradient (n_b·softmax(s_b/τs) − Σ_{a≠b} t_a)·coef, and Σ_p (Σ_{a≠b} t_a)·s_b for the loss.
        # Crop b < G leaves its own teacher crop out (n_b = G − 1); the others pair with all G.
        n_b = tl.where(bv < G, G - 1.0, G * 1.0)
        other = (ga[None, :] != bv[:, None]) & t_ok[None, :]  # [C, GP]: teacher crops paired with crop b
        t_rows = (ga * B + i).to(tl.int64) * stride_t
        g_rows = (bv * B + i).to(tl.int64) * stride_g
        cross = tl.zeros([C, BLOCK], tl.float32)
        for start in tl.range(0, P, BLOCK, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < P
            tmask = t_ok[:, None] & ok[None, :]
            t = tl.load(t_ptr + t_rows[:, None] + cols[None, :], mask=tmask, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            c = tl.load(c_ptr + cols, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
            tp = tl.where(tmask, tl.exp((t - c[None, :]) * inv_tt - mt[:, None]) * rz_t[:, None], 0.0)
            # Each crop's own sum over its partners (not Σ_a t_a − t_b, which cancels when t_b ≈ 1).
            t_other = tl.sum(tl.where(other[:, :, None], tp[None, :, :], 0.0), axis=1)
            smask = b_ok[:, None] & ok[None, :]
            s = tl.load(s_ptr + s_rows[:, None] + cols[None, :], mask=smask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            ls = s * inv_ts - lse_b[:, None]  # log-softmax, as the reference takes it
            sp = tl.exp(ls)
            # −Σ t·log-softmax, not n_b·lse − Σ t·s/τs: any error in Σ_p t would come times |s|/τs there (1.1 on
            # a loss of 28 at logits ~1000), here times the loss.
            cross -= t_other * ls
            grad = coef * (n_b[:, None] * sp - t_other)
            tl.store(g_ptr + g_rows[:, None] + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=smask,
                     eviction_policy="evict_first")

        tl.store(loss_ptr + i * S + bv, tl.sum(cross, axis=1), mask=b_ok)
        tl.store(lse_s_ptr + i * SP + bv, lse_b, mask=b_ok)
        tl.store(lse_t_ptr + i * GP + ga, lse_t, mask=(ga < GP) & (item % NG == 0))


def _programs(rows: int, row_bytes: int, device: torch.device) -> int:
    """Programs of the persistent grid for ``rows`` work items of ``row_bytes`` of student logits each."""
    override = os.environ.get("SSLKERNELS_DINO_FUSED_PROGRAMS")
    if override:
        return max(1, min(rows, int(override)))
    if device.type != "cuda":
        return min(rows, INTERPRETER_PROGRAMS)
    sms = sm_count(device)
    l2 = l2_bytes(device)
    lo, hi = PROGRAMS_PER_SM
    # A program holds its student rows and the gradient rows it writes: 2·row_bytes of L2.
    fit = int(L2_SHARE * l2 / (2 * row_bytes))
    return max(1, min(rows, max(lo * sms, min(hi * sms, fit))))


def forward_with_grad(student, teacher, center, tt_ptr, tt_val, G, S, B, gp, sp, inv_ts, n_terms, reduction,
                      target_programs):
    """(per-sample loss rows [B], teacher LSEs [B, gp], student LSEs [B, sp], the student gradient for an
    upstream gradient of 1). ``center`` is float32 and contiguous; ``tt_ptr`` a [1] tensor or None."""
    P = student.shape[1]
    dev = student.device
    # Teacher statistics, split along P so that G·B rows still fill the device.
    t_block = min(next_pow2(P), TEACHER_BLOCK)
    per_split, n_split = stream_split(cdiv(P, t_block), G * B, target_programs)
    kp = next_pow2(n_split)
    tpart = _empty((B, gp, kp, 2), torch.float32, dev)
    _teacher_stats_kernel[(G * B, n_split)](
        teacher, center, tt_ptr if tt_ptr is not None else center, tpart, B, P, teacher.stride(0), tt_val,
        per_split, GP=gp, KP=kp, TT_FROM_PTR=tt_ptr is not None, BLOCK=t_block,
        num_warps=4 if t_block >= 512 else 1)

    crops = min(next_pow2(S), next_pow2(max(1, int(os.environ.get("SSLKERNELS_DINO_FUSED_CROPS", CROPS)))))
    block = max(16, min(next_pow2(P), BLOCK_P, TILE_ELEMENTS // (gp * crops)))
    override = os.environ.get("SSLKERNELS_DINO_FUSED_BLOCK")
    if override:
        block = max(16, min(next_pow2(P), int(override)))
    grad = _empty(student.shape, student.dtype, dev)
    lse_t = _empty((B, gp), torch.float32, dev)
    lse_s = _empty((B, sp), torch.float32, dev)
    loss = _empty((B * S,), torch.float32, dev)
    coef = inv_ts / n_terms / (B if reduction == "mean" else 1)
    groups = cdiv(S, crops)
    programs = _programs(B * groups, crops * P * student.element_size(), dev)
    stages = int(os.environ.get("SSLKERNELS_DINO_FUSED_STAGES", STAGES))
    _dino_fused_kernel[(programs,)](
        student, teacher, center, tt_ptr if tt_ptr is not None else center, tpart, grad, lse_t, lse_s, loss,
        B, P, student.stride(0), teacher.stride(0), grad.stride(0), n_split, inv_ts, tt_val, coef,
        G=G, S=S, GP=gp, SP=sp, KP=kp, C=crops, NG=groups, TT_FROM_PTR=tt_ptr is not None, BLOCK=block,
        STAGES=stages, num_warps=8 if gp * crops * block >= 4096 else 4)
    rows = loss.view(B, S).sum(dim=1).mul_(1.0 / n_terms)
    return rows, lse_t, lse_s, grad

