"""BYOL / SimSiam's negative cosine similarity as Triton kernels (stop-gradient on z).

One pass over p and z gives each row's ⟨p, z⟩, ‖p‖², ‖z‖²; the backward is a second pass writing
dp_i = α_i·z_i + β_i·p_i with two per-row scalars, so no normalized copy of p or z ever exists.

F.cosine_similarity's convention: cos = ⟨p/max(‖p‖, ε), z/max(‖z‖, ε)⟩ with ε = 1e-8, the clamp left
out of the gradient, so dcos/dp = ẑ/n_p − cos·p/(n_p·‖p‖) with n_p = max(‖p‖, ε) (0 where ‖p‖ = 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register
from ..reference import compute_dtype, reduce
from ._common import empty as _empty, unit_stride_rows as _rows

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
    block_d = max(16, min(triton.next_power_of_2(d), TILE_ELEMENTS))
    block_n = max(1, min(triton.next_power_of_2(n), TILE_ELEMENTS // block_d))
    return block_n, block_d, (8 if block_n * block_d >= 4096 else 4)


class _NegativeCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, z, reduction):
        p, z = _rows(p), _rows(z.detach())
        n, d = p.shape
        block_n, block_d, warps = _tiling(n, d)
        grid = (triton.cdiv(n, block_n),)
        sums = _empty((n, 3), torch.float32, p.device)
        _row_dots_kernel[grid](p, z, sums, n, d, p.stride(0), z.stride(0), BLOCK_N=block_n, BLOCK_D=block_d,
                               num_warps=warps)
        pz, norm_p, norm_z = sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()
        n_p, n_z = norm_p.clamp_min(EPS), norm_z.clamp_min(EPS)
        cos = pz / (n_p * n_z)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(p, z, cos, n_p, n_z, norm_p)
            ctx.reduction = reduction
        return reduce(-cos, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        p, z, cos, n_p, n_z, norm_p = ctx.saved_tensors
        n, d = p.shape
        g = grad_out.to(torch.float32).expand(n) / (n if ctx.reduction == "mean" else 1)
        # d(−cos)/dp = −ẑ/n_p + cos·p/(n_p·‖p‖); a zero row of p gets only the ẑ term (norm' = 0 there).
        alpha = -g / (n_p * n_z)
        beta = torch.where(norm_p > 0, g * cos / (n_p * norm_p.clamp_min(torch.finfo(torch.float32).tiny)),
                           torch.zeros_like(cos))
        coef = torch.stack([alpha, beta], dim=1).contiguous()
        grad = _empty(p.shape, p.dtype, p.device)
        block_n, block_d, warps = _tiling(n, d)
        _axpby_rows_kernel[(triton.cdiv(n, block_n),)](p, z, coef, grad, n, d, p.stride(0), z.stride(0),
                                                       grad.stride(0), BLOCK_N=block_n, BLOCK_D=block_d,
                                                       num_warps=warps)
        return grad, None, None


@register("negative_cosine_similarity", "triton")
def negative_cosine_similarity(p, z, reduction):
    if compute_dtype(p.dtype) == torch.float64 or compute_dtype(z.dtype) == torch.float64:
        from ..reference import negative_cosine_similarity as exact  # float32 accumulators would lose digits
        return exact(p, z, reduction)
    return _NegativeCosine.apply(p, z, reduction)
