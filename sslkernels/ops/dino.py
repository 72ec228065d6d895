"""DINO's loss and teacher centring as Triton kernels.

With teacher probabilities t_a (crop a, softmax((t − c)/τt)) and student log-probabilities
log_softmax(s_b/τs), the loss of sample i over all pairs a ≠ b expands to

    loss_i = (Σ_b n_b·LSE_b − (1/τs)·Σ_a ⟨t_a, Σ_b s_b − s_a⟩) / n_terms

(Σ_p t_a = 1; n_b counts the teacher crops a ≠ b; s_a is 0 when a ≥ S). So one streaming pass per
sample over its G teacher rows and S student rows is enough: online max/sum for every row's LSE, and
for each teacher crop an online-rescaled Σ_p exp(u_a − m_a)·(Σ_b s_b − s_a)_p. The pair loop of the
official code (G·S products of B×P tensors) never exists.

The gradient of student crop b is (n_b·softmax(s_b/τs) − Σ_{a≠b} t_a)/(τs·n_terms) per unit of loss_i:
the backward recomputes both softmaxes from the saved row LSEs and writes it straight into the gradient.
ops/dino_fused.py (opt-in) forms it in the forward instead, reading each student row once from HBM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register
from ..distributed import is_distributed
from ..reference import center_update, compute_dtype, reduce
from ._common import STREAM_PROGRAMS, cdiv, empty as _empty, first_order_only, next_pow2, scalar_args as _scalar_args
from ._common import stream_split, unit_stride_rows as _rows
from ._grid import axis1, folded
from . import dino_fused
from .dino_fused import inv_teacher_temp

# Elements of the largest per-tile [rows × BLOCK_P] block (the student one). Tests lower these to make
# tiny inputs span several tiles and P-splits.
TILE_ELEMENTS = 4096
# Programs the forward aims for: P is split among programs until the GPU has plenty queued per SM.
TARGET_PROGRAMS = STREAM_PROGRAMS
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "−inf" for running maxima: exp(m_old − m_new) stays 1, never NaN


@triton.jit
def _dino_fwd_kernel(s_ptr, t_ptr, c_ptr, tt_ptr, part_ptr, B, P, stride_s, stride_t, inv_ts, tt_val,
                     tiles_per_split, G: tl.constexpr, S: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr,
                     TT_FROM_PTR: tl.constexpr, BLOCK_P: tl.constexpr):
    # Program (i, k): sample i, the k-th range of P. Writes per-row partial (max, sum) pairs.
    i = tl.program_id(0)
    k = tl.program_id(1)
    n_split = tl.num_programs(1)
    inv_tt = inv_teacher_temp(tt_ptr, tt_val, TT_FROM_PTR)
    ga = tl.arange(0, GP)
    sb = tl.arange(0, SP)
    t_rows = (ga * B + i).to(tl.int64) * stride_t
    sg_rows = (ga * B + i).to(tl.int64) * stride_s  # student crop a, aligned with teacher crop a
    s_rows = (sb * B + i).to(tl.int64) * stride_s
    t_ok = ga < G
    sg_ok = ga < S
    s_ok = sb < S

    m_t = tl.full([GP], _NEG_BIG, tl.float32)
    z_t = tl.zeros([GP], tl.float32)
    w_t = tl.zeros([GP], tl.float32)
    m_s = tl.full([SP], _NEG_BIG, tl.float32)
    z_s = tl.zeros([SP], tl.float32)
    first = k * tiles_per_split * BLOCK_P
    for j in range(0, tiles_per_split):
        cols = first + j * BLOCK_P + tl.arange(0, BLOCK_P)
        c_ok = cols < P
        smask = s_ok[:, None] & c_ok[None, :]
        s = tl.load(s_ptr + s_rows[:, None] + cols[None, :], mask=smask, other=0.0).to(tl.float32)
        s_sum = tl.sum(s, axis=0)

        v = tl.where(smask, s * inv_ts, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(v, axis=1))
        z_s = z_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(v - ms_new[:, None]), axis=1)
        m_s = ms_new

        tmask = t_ok[:, None] & c_ok[None, :]
        t = tl.load(t_ptr + t_rows[:, None] + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        sg = tl.load(s_ptr + sg_rows[:, None] + cols[None, :], mask=sg_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        u = tl.where(tmask, (t - c[None, :]) * inv_tt, float("-inf"))
        mt_new = tl.maximum(m_t, tl.max(u, axis=1))
        alpha = tl.exp(m_t - mt_new)
        e = tl.exp(u - mt_new[:, None])
        z_t = z_t * alpha + tl.sum(e, axis=1)
        # Teacher crop a pairs with every student crop but its own: Σ_b s_b − s_a.
        w_t = w_t * alpha + tl.sum(e * (s_sum[None, :] - sg), axis=1)
        m_t = mt_new

    base = part_ptr + (i * n_split + k) * (3 * GP + 2 * SP)
    tl.store(base + ga, m_t)
    tl.store(base + GP + ga, z_t)
    tl.store(base + 2 * GP + ga, w_t)
    tl.store(base + 3 * GP + sb, m_s)
    tl.store(base + 3 * GP + SP + sb, z_s)


@triton.jit
def _dino_merge_kernel(part_ptr, lse_t_ptr, lse_s_ptr, rows_ptr, n_split, inv_ts, inv_terms,
                       G: tl.constexpr, S: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr, KP: tl.constexpr):
    # Program i merges sample i's P-split partials (rescaled to the global row maxima) into the row LSEs
    # and its loss; one launch instead of a chain of small torch ops whose host time would dominate.
    i = tl.program_id(0)
    k = tl.arange(0, KP)
    ga = tl.arange(0, GP)
    sb = tl.arange(0, SP)
    k_ok = k < n_split
    width = 3 * GP + 2 * SP
    base = part_ptr + (i * n_split + k)[:, None] * width
    m_t = tl.load(base + ga[None, :], mask=k_ok[:, None], other=_NEG_BIG)
    z_t = tl.load(base + GP + ga[None, :], mask=k_ok[:, None], other=0.0)
    w_t = tl.load(base + 2 * GP + ga[None, :], mask=k_ok[:, None], other=0.0)
    mt = tl.max(m_t, axis=0)
    sc = tl.exp(m_t - mt[None, :])
    zt = tl.sum(z_t * sc, axis=0)
    wt = tl.sum(w_t * sc, axis=0)
    t_ok = ga < G
    lse_t = mt + tl.log(tl.where(t_ok, zt, 1.0))
    cross = tl.sum(tl.where(t_ok, wt / tl.where(t_ok, zt, 1.0), 0.0), axis=0)  # Σ_a ⟨t_a, Σ_b s_b − s_a⟩
    m_s = tl.load(base + 3 * GP + sb[None, :], mask=k_ok[:, None], other=_NEG_BIG)
    z_s = tl.load(base + 3 * GP + SP + sb[None, :], mask=k_ok[:, None], other=0.0)
    ms = tl.max(m_s, axis=0)
    s_ok = sb < S
    lse_s = ms + tl.log(tl.where(s_ok, tl.sum(z_s * tl.exp(m_s - ms[None, :]), axis=0), 1.0))
    n_b = tl.where(sb < G, G - 1.0, G * 1.0)
    weighted = tl.sum(tl.where(s_ok, lse_s * n_b, 0.0), axis=0)
    tl.store(lse_t_ptr + i * GP + ga, lse_t)
    tl.store(lse_s_ptr + i * SP + sb, lse_s)
    tl.store(rows_ptr + i, (weighted - inv_ts * cross) * inv_terms)


@triton.jit
def _dino_bwd_kernel(s_ptr, t_ptr, c_ptr, tt_ptr, lse_t_ptr, lse_s_ptr, go_ptr, g_ptr, B, P,
                     stride_s, stride_t, stride_g, stride_go, scale, inv_ts, tt_val, G: tl.constexpr, S: tl.constexpr,
                     GP: tl.constexpr, SP: tl.constexpr, TT_FROM_PTR: tl.constexpr, BLOCK_P: tl.constexpr,
                     SKIP_UNIT: tl.constexpr):
    # Program (i, k): sample i, tile k of P; writes the gradient of all S student crops there. The tiles of P
    # are folded over grid axes 1 and 2 (_grid.py): axis 1 alone stops at 65535 (P = 16.7M at 12 crops).
    i = tl.program_id(0)
    k = axis1()
    inv_tt = inv_teacher_temp(tt_ptr, tt_val, TT_FROM_PTR)
    cols = k * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = cols < P
    ga = tl.arange(0, GP)
    sb = tl.arange(0, SP)
    t_ok = ga < G
    s_ok = sb < S
    # The upstream gradient (one value: stride 0; "none": per sample) · 1/(τs·n_terms) (· 1/B for "mean"),
    # read here rather than prepared by torch ops: each would be a launch the host pays for.
    up = tl.load(go_ptr + i * stride_go).to(tl.float32)
    coef = up * scale
    # SKIP_UNIT: the gradient for an upstream 1 is already in g (the fused forward wrote it); only samples
    # whose upstream gradient is not exactly 1 are recomputed, rounded once like every other gradient.
    if (up != 1.0) | (SKIP_UNIT == 0):
        tmask = t_ok[:, None] & c_ok[None, :]
        t = tl.load(t_ptr + (ga * B + i).to(tl.int64)[:, None] * stride_t + cols[None, :], mask=tmask,
                    other=0.0).to(tl.float32)
        c = tl.load(c_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        lse_t = tl.load(lse_t_ptr + i * GP + ga, mask=t_ok, other=0.0)
        tp = tl.where(tmask, tl.exp((t - c[None, :]) * inv_tt - lse_t[:, None]), 0.0)
        t_sum = tl.sum(tp, axis=0)

        # Crops b ≥ G pair with every teacher crop: n_b = G, Σ_{a≠b} t_a = Σ_a t_a.
        smask = s_ok[:, None] & c_ok[None, :]
        s = tl.load(s_ptr + (sb * B + i).to(tl.int64)[:, None] * stride_s + cols[None, :], mask=smask,
                    other=0.0).to(tl.float32)
        lse_s = tl.load(lse_s_ptr + i * SP + sb, mask=s_ok, other=0.0)
        sp = tl.exp(s * inv_ts - lse_s[:, None])
        grad = coef * (G * sp - t_sum[None, :])
        out = (sb * B + i).to(tl.int64)[:, None] * stride_g + cols[None, :]
        tl.store(g_ptr + out, grad.to(g_ptr.dtype.element_ty), mask=smask & (sb >= G)[:, None])

        # Crops a < G leave their own teacher crop out: n_a = G − 1, Σ_{a'≠a} t_a' = Σ t − t_a.
        gmask = (t_ok & (ga < S))[:, None] & c_ok[None, :]
        sg = tl.load(s_ptr + (ga * B + i).to(tl.int64)[:, None] * stride_s + cols[None, :], mask=gmask,
                     other=0.0).to(tl.float32)
        lse_g = tl.load(lse_s_ptr + i * SP + ga, mask=ga < S, other=0.0)
        spg = tl.exp(sg * inv_ts - lse_g[:, None])
        grad_g = coef * ((G - 1) * spg - (t_sum[None, :] - tp))
        out_g = (ga * B + i).to(tl.int64)[:, None] * stride_g + cols[None, :]
        tl.store(g_ptr + out_g, grad_g.to(g_ptr.dtype.element_ty), mask=gmask)


def _tiling(G: int, S: int, P: int):
    gp, sp = next_pow2(G), next_pow2(S)
    block_p = max(16, min(next_pow2(P), TILE_ELEMENTS // max(gp, sp)))
    warps = 8 if max(gp, sp) * block_p >= 4096 else 4
    return gp, sp, block_p, warps


def _n_terms(G: int, S: int) -> int:
    return G * S - min(G, S)


def _forward_stats(student, teacher, center, tt_ptr, tt_val, G, S, B, gp, sp, block_p, warps, inv_ts):
    """(teacher LSEs [B, gp], student LSEs [B, sp], per-sample loss rows [B]) by the split streaming pass."""
    P = student.shape[1]
    per_split, n_split = stream_split(cdiv(P, block_p), B, TARGET_PROGRAMS)
    part = _empty((B, n_split, 3 * gp + 2 * sp), torch.float32, student.device)
    _dino_fwd_kernel[(B, n_split)](
        student, teacher, center, tt_ptr if tt_ptr is not None else center, part, B, P,
        student.stride(0), teacher.stride(0), inv_ts, tt_val, per_split, G=G, S=S, GP=gp, SP=sp,
        TT_FROM_PTR=tt_ptr is not None, BLOCK_P=block_p, num_warps=warps)

    # Merge the P-splits: rescale every partial sum to the global row maximum (one launch).
    lse_t = _empty((B, gp), torch.float32, student.device)
    lse_s = _empty((B, sp), torch.float32, student.device)
    rows = _empty((B,), torch.float32, student.device)
    kp = next_pow2(n_split)
    _dino_merge_kernel[(B,)](part, lse_t, lse_s, rows, n_split, inv_ts, 1.0 / _n_terms(G, S), G=G, S=S,
                             GP=gp, SP=sp, KP=kp, num_warps=4 if kp * max(gp, sp) >= 512 else 1)
    return lse_t, lse_s, rows


class _DinoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, G, reduction):
        student, teacher = _rows(student), _rows(teacher.detach())
        # A copy of the centre: official DINO updates it in place between this forward and the backward.
        center = center.detach().reshape(-1).to(torch.float32, copy=True)
        tt_ptr, tt_val = _scalar_args(teacher_temp.detach().to(torch.float32, copy=True)
                                      if isinstance(teacher_temp, torch.Tensor) else teacher_temp)
        B = teacher.shape[0] // G
        S = student.shape[0] // B
        P = student.shape[1]
        gp, sp, block_p, warps = _tiling(G, S, P)
        inv_ts = 1.0 / float(student_temp)
        ctx.fused_grad = None
        if ctx.needs_input_grad[0] and dino_fused.enabled():
            # The gradient in the same pass as the loss (ops/dino_fused.py); the backward hands it out.
            rows, lse_t, lse_s, ctx.fused_grad = dino_fused.forward_with_grad(
                student, teacher, center, tt_ptr, tt_val, G, S, B, gp, sp, inv_ts, _n_terms(G, S), reduction,
                TARGET_PROGRAMS)
        else:
            lse_t, lse_s, rows = _forward_stats(student, teacher, center, tt_ptr, tt_val, G, S, B, gp, sp,
                                                block_p, warps, inv_ts)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(student, teacher, center, tt_ptr, lse_t, lse_s)
            ctx.dims = (B, S, G, gp, sp, block_p, warps, inv_ts, tt_val, reduction)
            ctx.tt_from_ptr = tt_ptr is not None
        return reduce(rows, reduction)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        student, teacher, center, tt, lse_t, lse_s = ctx.saved_tensors
        B, S, G, gp, sp, block_p, warps, inv_ts, tt_val, reduction = ctx.dims
        go = grad_out.reshape(-1)  # [1] ("mean" / "sum") or [B] ("none", any stride)
        scale = inv_ts / _n_terms(G, S) / (B if reduction == "mean" else 1)
        # The fused forward's gradient (for an upstream 1) is handed out once; the kernel then recomputes only
        # the samples whose upstream gradient is not exactly 1 (scaling the stored gradient instead would round
        # a bf16 gradient twice). A second backward (retain_graph) recomputes everything.
        fused, ctx.fused_grad = ctx.fused_grad, None
        grad = fused if fused is not None else _empty(student.shape, student.dtype, student.device)
        P = student.shape[1]
        _dino_bwd_kernel[folded(B, cdiv(P, block_p))](
            student, teacher, center, tt if ctx.tt_from_ptr else center, lse_t, lse_s, go, grad, B, P,
            student.stride(0), teacher.stride(0), grad.stride(0), go.stride(0) if go.numel() > 1 else 0, scale,
            inv_ts, tt_val, G=G, S=S, GP=gp, SP=sp,
            TT_FROM_PTR=ctx.tt_from_ptr, BLOCK_P=block_p, SKIP_UNIT=fused is not None, num_warps=warps)
        return grad, None, None, None, None, None, None


@register("dino_loss", "triton")
def dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, n_global_crops, reduction):
    if compute_dtype(student_output.dtype) == torch.float64 or compute_dtype(teacher_output.dtype) == torch.float64:
        # The kernels accumulate in float32; float64 inputs get the exact (and still pair-free) torch path.
        from .dino_cpu import dino_loss as exact
        return exact(student_output, teacher_output, center, student_temp, teacher_temp, n_global_crops, reduction)
    return _DinoLoss.apply(student_output, teacher_output, center, student_temp, teacher_temp,
                           n_global_crops, reduction)


@register("swav_loss", "triton")
def swav_loss(high, low, temperature, epsilon, iterations, queue, distributed, group):
    # SwaV's codes are DINO teacher probabilities (see dino_cpu): the Sinkhorn potentials, then this loss.
    from .dino_cpu import swav_via_dino
    from .sinkhorn import sinkhorn_potentials
    return swav_via_dino(high, low, temperature, epsilon, iterations, queue, distributed, group,
                         potentials=sinkhorn_potentials, dino=dino_loss)


# ------------------------------------------------------------------------------------- update_center_


@triton.jit
def _center_kernel(center_ptr, t_ptr, m_ptr, sum_ptr, N, P, stride_t, m_val, inv_n,
                   M_FROM_PTR: tl.constexpr, SUM_ONLY: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    # One program per column block: the column sums over all N rows, then the EMA, in one launch.
    cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = cols < P
    acc = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        x = tl.load(t_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :],
                    mask=(rows < N)[:, None] & c_ok[None, :], other=0.0)
        acc += x.to(tl.float32)
    total = tl.sum(acc, axis=0)
    if SUM_ONLY:
        tl.store(sum_ptr + cols, total, mask=c_ok)
    else:
        if M_FROM_PTR:
            m = tl.load(m_ptr).to(tl.float32)
        else:
            m = m_val
        c = tl.load(center_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        new = c * m + (total * inv_n) * (1.0 - m)
        tl.store(center_ptr + cols, new.to(center_ptr.dtype.element_ty), mask=c_ok)


@register("update_center_", "triton")
@torch.no_grad()
def update_center_(center, teacher_output, momentum, async_op=False, group=None):
    if compute_dtype(teacher_output.dtype) == torch.float64 or center.dtype == torch.float64:
        from ..reference import update_center_ as exact
        return exact(center, teacher_output, momentum, async_op, group)
    t = _rows(teacher_output)
    n, p = t.shape
    block_p = min(128, next_pow2(p))
    block_n = 32
    grid = (cdiv(p, block_p),)
    if async_op or is_distributed(group):
        # The mean spans all ranks (as official DINO): column sums here; the all-reduce (asynchronous with
        # async_op, as DINOv2) and the EMA in torch.
        sums = _empty((p,), torch.float32, center.device)
        _center_kernel[grid](sums, t, sums, sums, n, p, t.stride(0), 0.0, 1.0, M_FROM_PTR=False, SUM_ONLY=True,
                             BLOCK_N=block_n, BLOCK_P=block_p)
        return center_update(center, sums, n, momentum, async_op, group)
    flat = center.view(-1) if center.is_contiguous() else center.reshape(-1).clone()
    if isinstance(momentum, torch.Tensor):
        momentum = momentum.to(device=center.device, dtype=torch.float32)
    m_ptr, m_val = _scalar_args(momentum)
    _center_kernel[grid](flat, t, m_ptr if m_ptr is not None else flat, flat, n, p, t.stride(0), m_val,
                         1.0 / n, M_FROM_PTR=m_ptr is not None, SUM_ONLY=False, BLOCK_N=block_n,
                         BLOCK_P=block_p)
    if flat.data_ptr() != center.data_ptr():
        center.copy_(flat.view(center.shape))
    else:
        # The kernel wrote through a raw pointer: tell autograd, as copy_ would (host-side, no sync), so a
        # graph that saved the centre raises instead of differentiating against the new one.
        torch.autograd.graph.increment_version(center)
    return center
