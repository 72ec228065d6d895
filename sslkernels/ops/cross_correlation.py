"""Barlow Twins and VICReg without the reference's D×D temporaries.

Both losses are sums of squares of a D×D matrix (Barlow Twins' cross-correlation C = AᵀB/N, VICReg's
covariances XᵀX/(N−1)) plus terms on its diagonal, which is cheap (a column-wise dot product). The sum
of squares has two exact forms:

    ‖AᵀB‖²_F = ⟨AAᵀ, BBᵀ⟩_F      (N×N Gram matrices: 2·N²·D flops)
    ‖AᵀB‖²_F = ⟨AᵀB, AᵀB⟩_F      (one D×D matrix: N·D² flops)

and so has its gradient (2·BBᵀA, or 2·B(AᵀB)ᵀ). With the batch smaller than the feature dimension (the
usual case: D = 8192, N = 256..2048 per device) the Gram form needs no D×D buffer at all; otherwise a single
D×D buffer is consumed in place into the loss and turned into dL/dC. Losses are scalars, so the input
gradients are formed in the forward while everything is at hand, and the backward only scales them.

Plain torch ops on any device (matmuls go to BLAS / cuBLAS); registered as the CPU path. The products
and their sums of squares are one pluggable piece (``TorchProducts``): cross_correlation_triton.py swaps in
Triton kernels that form them tile by tile for CUDA tensors (the "triton" kind), the rest is shared.
"""
from __future__ import annotations

import torch

from ..backends import register
from ..reference import compute_dtype
from ._common import first_order_only

BN_EPS = 1e-5  # BatchNorm1d's default, as the Barlow Twins reference code
VAR_EPS = 1e-4  # VICReg's std = sqrt(var + 1e-4)
# Gram (N×N) form when 4·N²·D < 3·N·D² (its four N²D matmuls against the D×D form's three ND²).
GRAM_RATIO = 0.75


def _use_gram(n: int, d: int) -> bool:
    return n < GRAM_RATIO * d


def _frob_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x.reshape(-1), y.reshape(-1))


class TorchProducts:
    """The two product forms with torch matmuls: (Σ of the product's squares, the matrices if ``keep``)."""

    @staticmethod
    def grams(a, b, keep: bool):
        """⟨AAᵀ, BBᵀ⟩_F and the N×N Gram matrices (b None: B = A, one matrix)."""
        ga = a @ a.T
        gb = ga if b is None else b @ b.T
        return _frob_dot(ga, gb), ga, gb

    @staticmethod
    def cross(a, b, keep: bool):
        """‖AᵀB‖²_F and AᵀB (b None: B = A)."""
        c = a.T @ (a if b is None else b)
        return _frob_dot(c, c), c


def _sq_sum_and_grads(a: torch.Tensor, b: torch.Tensor, want: bool, products=TorchProducts):
    """(‖AᵀB‖²_F, d/dA, d/dB); a and b may be the same tensor (then d/dA already counts both factors)."""
    same = a is b
    if _use_gram(a.shape[0], a.shape[1]):
        total, ga, gb = products.grams(a, None if same else b, want)
        if not want:
            return total, None, None
        if same:
            return total, ga.matmul(a).mul_(4.0), None
        return total, gb.matmul(a).mul_(2.0), ga.matmul(b).mul_(2.0)
    total, c = products.cross(a, None if same else b, want)  # the one D×D buffer (none without gradients)
    if not want:
        return total, None, None
    if same:
        return total, a.matmul(c).mul_(4.0), None
    return total, b.matmul(c.T).mul_(2.0), a.matmul(c).mul_(2.0)


def _batch_norm(z: torch.Tensor):
    """BatchNorm1d(affine=False) in training mode (biased variance); also 1/σ for the backward."""
    mean = z.mean(dim=0)
    inv_std = torch.rsqrt(z.var(dim=0, unbiased=False) + BN_EPS)
    return (z - mean) * inv_std, inv_std


def _batch_norm_backward(da: torch.Tensor, a: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    return (da - da.mean(dim=0) - a * (da * a).mean(dim=0)) * inv_std


def _barlow_twins(z1, z2, lambda_offdiag, products=TorchProducts, *, want):
    n = z1.shape[0]
    dtype = compute_dtype(torch.promote_types(z1.dtype, z2.dtype))
    a, inv_a = _batch_norm(z1.to(dtype))
    b, inv_b = _batch_norm(z2.to(dtype))
    diag = (a * b).sum(dim=0) / n  # C_ii
    total_sq, da, db = _sq_sum_and_grads(a, b, want, products)
    loss = ((diag - 1) ** 2).sum() + lambda_offdiag * (total_sq / (n * n) - (diag * diag).sum())
    if not want:
        return loss, (None, None)
    # dL/dC = 2λ·C + diag(2(C_ii − 1) − 2λ·C_ii); C = AᵀB/N.
    d = (2 * (diag - 1) - 2 * lambda_offdiag * diag) / n
    da = da.mul_(lambda_offdiag / (n * n)).add_(b * d)
    db = db.mul_(lambda_offdiag / (n * n)).add_(a * d)
    return loss, (_batch_norm_backward(da, a, inv_a), _batch_norm_backward(db, b, inv_b))


def _vicreg(x, y, sim_weight, var_weight, cov_weight, products=TorchProducts, *, want):
    n, d = x.shape
    dtype = compute_dtype(torch.promote_types(x.dtype, y.dtype))
    x, y = x.to(dtype), y.to(dtype)
    diff = x - y
    repr_loss = _frob_dot(diff, diff) / (n * d)
    loss = sim_weight * repr_loss
    grads = []
    for z, sign in ((x, 1.0), (y, -1.0)):
        zc = z - z.mean(dim=0)
        var = (zc * zc).sum(dim=0) / (n - 1)
        std = torch.sqrt(var + VAR_EPS)
        hinge = torch.relu(1 - std)
        sq, dzc, _ = _sq_sum_and_grads(zc, zc, want, products)
        # Off-diagonal squares of cov = zcᵀzc/(N−1): all squares minus the diagonal (the variances).
        loss = loss + var_weight * hinge.sum() / (2 * d) + cov_weight * (sq / (n - 1) ** 2 - (var * var).sum()) / d
        if want:
            # Every term's gradient w.r.t. zc has zero column means (zc has), so centering passes it unchanged.
            g = dzc.mul_(cov_weight / (d * (n - 1) ** 2))
            g.sub_(zc * (var * (4 * cov_weight / (d * (n - 1)))))
            g.sub_(zc * torch.where(hinge > 0, var_weight / (2 * d * (n - 1)) / std, torch.zeros_like(std)))
            g.add_(diff, alpha=sign * 2 * sim_weight / (n * d))
            grads.append(g)
    return loss, (tuple(grads) if want else (None, None))


class _GradInForward(torch.autograd.Function):
    """A scalar loss whose input gradients ``fn`` forms in the forward; the backward only scales them."""

    @staticmethod
    def forward(ctx, fn, args, *inputs):
        want = any(x.requires_grad for x in inputs)
        # Autocast off: the Gram matmuls must run in the compute dtype, not in autocast's half precision.
        with torch.no_grad(), torch.autocast(inputs[0].device.type, enabled=False):
            loss, grads = fn(*inputs, *args, want=want)
        ctx.dtypes = [x.dtype for x in inputs]
        ctx.want = [x.requires_grad for x in inputs]
        ctx.save_for_backward(*[g if w else torch.empty(0) for g, w in zip(grads, ctx.want)])
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        grads = [(s * g).to(dt) if w else None for s, w, dt in zip(ctx.saved_tensors, ctx.want, ctx.dtypes)]
        return (None, None, *grads)


@register("barlow_twins_loss", "cpu")
def barlow_twins_loss(z1, z2, lambda_offdiag):
    return _GradInForward.apply(_barlow_twins, (float(lambda_offdiag),), z1, z2)


@register("vicreg_loss", "cpu")
def vicreg_loss(z1, z2, sim_weight, var_weight, cov_weight):
    return _GradInForward.apply(_vicreg, (float(sim_weight), float(var_weight), float(cov_weight)), z1, z2)


try:  # the Triton products for CUDA tensors; without Triton this op keeps its other kinds
    from . import cross_correlation_triton  # noqa: E402,F401
except ImportError as _err:  # pragma: no cover - depends on the environment
    if "triton" not in str(_err):
        raise
