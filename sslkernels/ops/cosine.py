"""BYOL / SimSiam's negative cosine similarity as Triton kernels (stop-gradient on z unless asked otherwise).

One pass over p and z gives each row's ⟨p, z⟩, ‖p‖², ‖z‖²; the backward is a second pass writing
dp_i = α_i·z_i + β_i·p_i with two per-row scalars, so no normalized copy of p or z ever exists.
With ``stop_gradient=False`` (lightly's NegativeCosineSimilarity) z gets the mirror-image gradient from
the same row sums, one more pass of the same kernel with p and z swapped.

F.cosine_similarity's convention: cos = ⟨p/max(‖p‖, ε), z/max(‖z‖, ε)⟩ (ε = 1e-8 unless given), the
clamp left out of the gradient, so dcos/dp = ẑ/n_p − cos·p/(n_p·‖p‖) with n_p = max(‖p‖, ε) (0 where
‖p‖ = 0), and symmetrically for z.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register
from ..reference import compute_dtype, reduce
from ._common import cdiv, empty as _empty, first_order_only, next_pow2, unit_stride_rows as _rows

EPS = 1e-8
TILE_ELEMENTS = 4096  # tests shrink it so small rows span several column tiles


@triton.jit
def _row_dots_kernel(p_ptr, z_ptr, out_ptr, N, D, stride_p, stride_z,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    pp = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    zz = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    pz = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
        p = p.to(tl.float32)
        z = z.to(tl.float32)
        pp += p * p
        zz += z * z
        pz += p * z
    tl.store(out_ptr + rows * 3, tl.sum(pz, axis=1), mask=r_ok)
    tl.store(out_ptr + rows * 3 + 1, tl.sum(pp, axis=1), mask=r_ok)
    tl.store(out_ptr + rows * 3 + 2, tl.sum(zz, axis=1), mask=r_ok)


@triton.jit
def _axpby_rows_kernel(p_ptr, z_ptr, coef_ptr, g_ptr, N, D, stride_p, stride_z, stride_g,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # g_i = α_i·z_i + β_i·p_i, the coefficients interleaved per row.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    alpha = tl.load(coef_ptr + rows * 2, mask=r_ok, other=0.0)
    beta = tl.load(coef_ptr + rows * 2 + 1, mask=r_ok, other=0.0)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (cols < D)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        p = tl.load(p_ptr + r64 * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + r64 * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = alpha[:, None] * z + beta[:, None] * p
        tl.store(g_ptr + r64 * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


def _tiling(n: int, d: int):
    block_d = max(16, min(next_pow2(d), TILE_ELEMENTS))
    block_n = max(1, min(next_pow2(n), TILE_ELEMENTS // block_d))
    return block_n, block_d, (8 if block_n * block_d >= 4096 else 4)


def _grad_rows(x, y, g, cos, n_x, n_y, norm_x):
    """d(−cos)/dx·g = −g·ŷ/n_x + g·cos·x/(n_x·‖x‖) as one kernel pass; a zero row of x gets only the ŷ
    term (the norm's derivative is 0 there)."""
    n, d = x.shape
    alpha = -g / (n_x * n_y)
    beta = torch.where(norm_x > 0, g * cos / (n_x * norm_x.clamp_min(torch.finfo(torch.float32).tiny)),
                       torch.zeros_like(cos))
    coef = torch.stack([alpha, beta], dim=1).contiguous()
    grad = _empty(x.shape, x.dtype, x.device)
    block_n, block_d, warps = _tiling(n, d)
    _axpby_rows_kernel[(cdiv(n, block_n),)](x, y, coef, grad, n, d, x.stride(0), y.stride(0),
                                                   grad.stride(0), BLOCK_N=block_n, BLOCK_D=block_d,
                                                   num_warps=warps)
    return grad


class _NegativeCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, z, reduction, eps):
        # The caller passes z.detach() for the stop-gradient, so needs_input_grad[1] says which form this is.
        p, z = _rows(p.detach()), _rows(z.detach())
        n, d = p.shape
        block_n, block_d, warps = _tiling(n, d)
        grid = (cdiv(n, block_n),)
        sums = _empty((n, 3), torch.float32, p.device)
        _row_dots_kernel[grid](p, z, sums, n, d, p.stride(0), z.stride(0), BLOCK_N=block_n, BLOCK_D=block_d,
                               num_warps=warps)
        pz, norm_p, norm_z = sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()
        n_p, n_z = norm_p.clamp_min(eps), norm_z.clamp_min(eps)
        cos = pz / (n_p * n_z)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(p, z, cos, n_p, n_z, norm_p, norm_z)
            ctx.reduction = reduction
        return reduce(-cos, reduction)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        p, z, cos, n_p, n_z, norm_p, norm_z = ctx.saved_tensors
        n = p.shape[0]
        g = grad_out.to(torch.float32).expand(n) / (n if ctx.reduction == "mean" else 1)
        grad_p = _grad_rows(p, z, g, cos, n_p, n_z, norm_p) if ctx.needs_input_grad[0] else None
        grad_z = _grad_rows(z, p, g, cos, n_z, n_p, norm_z) if ctx.needs_input_grad[1] else None
        return grad_p, grad_z, None, None


@register("negative_cosine_similarity", "triton")
def negative_cosine_similarity(p, z, reduction, stop_gradient=True, eps=EPS):
    if compute_dtype(p.dtype) == torch.float64 or compute_dtype(z.dtype) == torch.float64:
        from ..reference import negative_cosine_similarity as exact  # float32 accumulators would lose digits
        return exact(p, z, reduction, stop_gradient, eps)
    return _NegativeCosine.apply(p, z.detach() if stop_gradient else z, reduction, float(eps))
