"""Barlow Twins and VICReg for CUDA tensors: the D×D (or N×N Gram) products as Triton kernels, tile by tile.

cross_correlation.py reduces both losses to sums of squares of one product per view pair, AᵀB (D×D) or the
Gram pair AAᵀ, BBᵀ (N×N) when the batch is the smaller side, plus column-wise terms. Here each program forms
one tile of the product(s) with tl.dot over the shared dimension and reduces it into its own partial
Σ P₁∘P₂ (Σ P² for one product) on the spot. The tile is written out only when the gradient needs the matrix:

- no gradient (evaluation, monitoring): no D×D or N×N matrix exists at all, at any D (8192 included);
- with gradients: exactly the one matrix per product that the gradient's matmul reads, written once. There is
  no second D×D buffer for dL/dC: its off-diagonal part is a multiple of C itself and the diagonal correction
  is a column-wise term (cross_correlation.py), so dA = B·Cᵀ·s + B·diag(d) goes straight to cuBLAS.

The gradient matmuls and the N×D elementwise parts (batch-norm, centring, hinge) are shared with the CPU
path and run as torch ops (cuBLAS / ATen kernels). float64 inputs use torch's matmuls (exact).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..backends import device_guard, register
from ..reference import compute_dtype
from ._common import cdiv, empty as _empty, tf32_matmul
from .cross_correlation import TorchProducts, _barlow_twins, _GradInForward, _vicreg

# Tile of the product and step over the shared dimension; tests shrink them so tiny inputs span several
# tiles with ragged edges. Untuned (no GPU timing taken yet).
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32
NUM_WARPS = 4


@triton.jit
def _products_kernel(x1_ptr, y1_ptr, x2_ptr, y2_ptr, o1_ptr, o2_ptr, part_ptr, K, M, N,
                     sx1k, sx1m, sy1k, sy1n, sx2k, sx2m, sy2k, sy2n, so1, so2,
                     TWO: tl.constexpr, STORE: tl.constexpr, WIDE: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Tile (i, j) of P₁ = X₁ᵀY₁ (and P₂ = X₂ᵀY₂ when TWO); X is K×M, Y is K×N, any strides.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # WIDE (an input spans 2³¹ elements or more): the M / N index times its stride in int64 too (rk already is).
    # Only then: int64 there costs the two-product kernel 64 B more of spills.
    if WIDE:
        rm_off = rm.to(tl.int64)[:, None]
        rn_off = rn.to(tl.int64)[None, :]
    else:
        rm_off = rm[:, None]
        rn_off = rn[None, :]
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = rk < K
        xmask = m_ok[:, None] & k_ok[None, :]
        ymask = k_ok[:, None] & n_ok[None, :]
        x = tl.load(x1_ptr + rk[None, :] * sx1k + rm_off * sx1m, mask=xmask, other=0.0)
        y = tl.load(y1_ptr + rk[:, None] * sy1k + rn_off * sy1n, mask=ymask, other=0.0)
        acc1 = tl.dot(x, y, acc1, input_precision=DOT_PREC)
        if TWO:
            x = tl.load(x2_ptr + rk[None, :] * sx2k + rm_off * sx2m, mask=xmask, other=0.0)
            y = tl.load(y2_ptr + rk[:, None] * sy2k + rn_off * sy2n, mask=ymask, other=0.0)
            acc2 = tl.dot(x, y, acc2, input_precision=DOT_PREC)
    if TWO:
        prod = acc1 * acc2
    else:
        prod = acc1 * acc1
    # Padding rows and columns hold zeros (masked loads), so they add nothing to the partial.
    tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(prod, axis=1), axis=0))
    if STORE:
        out = rm.to(tl.int64)[:, None] * so1 + rn[None, :]
        omask = m_ok[:, None] & n_ok[None, :]
        tl.store(o1_ptr + out, acc1, mask=omask)
        if TWO:
            tl.store(o2_ptr + rm.to(tl.int64)[:, None] * so2 + rn[None, :], acc2, mask=omask)


def _dot_precision() -> str:
    # fp32 operands follow PyTorch's matmul setting (exact by default), as the gradient's cuBLAS matmuls do.
    return "tf32" if tf32_matmul() else "ieee"


def _launch(xs, ys, k: int, m: int, n: int, keep: bool, device):
    """Σ over tiles of P₁∘P₂ (P₁² for one product) and, with ``keep``, the products. xs/ys: [(ptr, sk, sm)]."""
    two = len(xs) == 2
    grid = (cdiv(m, BLOCK_M), cdiv(n, BLOCK_N))
    part = _empty(grid, torch.float32, device)
    outs = [_empty((m, n), torch.float32, device) if keep else part for _ in xs]
    (x1, sx1k, sx1m), (y1, sy1k, sy1n) = xs[0], ys[0]
    (x2, sx2k, sx2m), (y2, sy2k, sy2n) = xs[-1], ys[-1]
    # The largest element offset a load forms, (K − 1)·sk + (rows − 1)·s_row, decides WIDE.
    reach = max((k - 1) * sk + (rows - 1) * sr for views, rows in ((xs, m), (ys, n)) for _, sk, sr in views)
    with device_guard(device):
        _products_kernel[grid](x1, y1, x2, y2, outs[0], outs[-1], part, k, m, n,
                               sx1k, sx1m, sy1k, sy1n, sx2k, sx2m, sy2k, sy2n, n, n,
                               TWO=two, STORE=keep, WIDE=reach >= 2 ** 31, DOT_PREC=_dot_precision(),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return part.sum(), outs


class TritonProducts:
    """TorchProducts' interface; the matrices exist only when ``keep`` (gradients wanted)."""

    @staticmethod
    def grams(a, b, keep: bool):
        # A·Aᵀ = XᵀY with X = Y = Aᵀ: the K index walks A's columns.
        n, d = a.shape
        views = [(a, a.stride(1), a.stride(0))] + ([] if b is None else [(b, b.stride(1), b.stride(0))])
        total, outs = _launch(views, views, d, n, n, keep, a.device)
        if not keep:
            return total, None, None
        return total, outs[0], outs[-1]

    @staticmethod
    def cross(a, b, keep: bool):
        n, d = a.shape
        b = a if b is None else b
        total, outs = _launch([(a, a.stride(0), a.stride(1))], [(b, b.stride(0), b.stride(1))], n, d, d, keep,
                              a.device)
        return total, (outs[0] if keep else None)


def _products_for(*inputs):
    if any(compute_dtype(x.dtype) == torch.float64 for x in inputs):
        return TorchProducts  # the kernels accumulate in float32
    return TritonProducts


@register("barlow_twins_loss", "triton")
def barlow_twins_loss(z1, z2, lambda_offdiag):
    return _GradInForward.apply(_barlow_twins, (float(lambda_offdiag), _products_for(z1, z2)), z1, z2)


@register("vicreg_loss", "triton")
def vicreg_loss(z1, z2, sim_weight, var_weight, cov_weight):
    args = (float(sim_weight), float(var_weight), float(cov_weight), _products_for(z1, z2))
    return _GradInForward.apply(_vicreg, args, z1, z2)
