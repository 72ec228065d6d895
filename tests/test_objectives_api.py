"""Non-contrastive and clustering objectives of shared/API.md (negative_cosine_similarity, dino_loss,
update_center_, sinkhorn_knopp, barlow_twins_loss, vicreg_loss) against float64 math written here,
following each method's official reference code. Values and gradients, float64 and float32, odd sizes.

The expected_* functions are imported by test_nn_modules.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close

import sslkernels

F64 = torch.float64
DTYPES = [torch.float64, torch.float32]
REDUCTIONS = ["mean", "sum", "none"]
BACKENDS = ["torch", "auto"]


def reduce(rows, reduction):
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def leaves(x64, dtype):
    x = x64.detach().to(dtype).requires_grad_()
    return x, x.detach().to(F64).requires_grad_()


def check_grads(out, want, pairs, dtype):
    cot = torch.randn_like(want)
    got = torch.autograd.grad(out, [a for a, _ in pairs], cot.to(out.dtype))
    exp = torch.autograd.grad(want, [b for _, b in pairs], cot)
    for i, (g, e, (a, _)) in enumerate(zip(got, exp, pairs)):
        assert g.dtype == a.dtype
        assert_close(g, e, dtype, name=f"grad of input {i}")


# ------------------------------------------------------------------------- float64 math


def expected_neg_cos(p, z, reduction="mean"):
    z = z.detach()
    cos = (p * z).sum(dim=1) / (p.norm(dim=1) * z.norm(dim=1))
    return reduce(-cos, reduction)


def expected_dino(student, teacher, center, student_temp, teacher_temp, n_global, reduction="mean"):
    """The official DINOLoss.forward, with the per-sample losses kept for reduction="none"."""
    b = teacher.shape[0] // n_global
    n_crops = student.shape[0] // b
    s_out = (student / student_temp).chunk(n_crops)
    t_out = F.softmax((teacher.detach() - center.reshape(1, -1)) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, n_terms = 0, 0
    for iq, q in enumerate(t_out):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s_out[v], dim=-1), dim=-1)
            n_terms += 1
    return reduce(total / n_terms, reduction)


def expected_sinkhorn(scores, epsilon, iterations):
    """SwAV's distributed_sinkhorn on one process, literally (float64, moderate scores only)."""
    q = torch.exp(scores / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / b
    q = q * b
    return q.t()


def expected_sinkhorn_logdomain(scores, epsilon, iterations):
    """The same iteration in log space (for scores whose exp overflows even float64)."""
    lq = scores.t() / epsilon
    k, b = lq.shape
    lq = lq - torch.logsumexp(lq.reshape(-1), 0)
    for _ in range(iterations):
        lq = lq - torch.logsumexp(lq, dim=1, keepdim=True) - math.log(k)
        lq = lq - torch.logsumexp(lq, dim=0, keepdim=True) - math.log(b)
    return torch.exp(lq).t() * b


def _off_diagonal(c):
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def expected_barlow(z1, z2, lambd=5e-3):
    """facebookresearch/barlowtwins: BatchNorm1d(affine=False) on each view, c = bn(z1).T @ bn(z2) / N."""
    n, d = z1.shape
    bn = torch.nn.BatchNorm1d(d, affine=False).to(F64).train()
    c = bn(z1).T @ bn(z2) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def expected_vicreg(x, y, sim=25.0, var=25.0, cov=1.0):
    """facebookresearch/vicreg main_vicreg.py VICReg.forward (one process)."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow(2).sum() / d + _off_diagonal(cov_y).pow(2).sum() / d
    return sim * repr_loss + var * std_loss + cov * cov_loss


# ------------------------------------------------------------------------- negative cosine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,d", [(1, 7), (13, 7), (13, 33)])
def test_negative_cosine_similarity(n, d, reduction, dtype, backend):
    p, p64 = leaves(torch.randn(n, d, dtype=F64) * 3, dtype)
    z, z64 = leaves(torch.randn(n, d, dtype=F64) * 0.2, dtype)
    out = sslkernels.negative_cosine_similarity(p, z, reduction=reduction, backend=backend)
    want = expected_neg_cos(p64, z64, reduction)
    assert out.dtype == dtype
    assert_close(out, want, dtype)
    check_grads(out, want, [(p, p64)], dtype)
    # z gets no gradient: the stop-gradient is inside the op.
    out = sslkernels.negative_cosine_similarity(p, z, reduction="sum", backend=backend)
    out.backward()
    assert z.grad is None or not z.grad.any()
    assert p.grad is not None and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------- DINO


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n_global,n_crops,b,p", [(2, 2, 5, 11), (2, 6, 3, 17), (1, 3, 4, 9), (2, 4, 1, 7)])
def test_dino_loss(n_global, n_crops, b, p, reduction, dtype, backend):
    student, s64 = leaves(torch.randn(n_crops * b, p, dtype=F64), dtype)
    teacher = torch.randn(n_global * b, p, dtype=F64).to(dtype).requires_grad_()
    center = (torch.randn(1, p, dtype=F64) * 0.1).to(dtype)
    out = sslkernels.dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04,
                               n_global_crops=n_global, reduction=reduction, backend=backend)
    want = expected_dino(s64, teacher.detach().double(), center.double(), 0.1, 0.04, n_global, reduction)
    if reduction == "none":
        assert out.shape == (b,)
    assert out.dtype == dtype
    assert_close(out, want, dtype)
    check_grads(out, want, [(student, s64)], dtype)
    # The teacher side gets no gradient (the official code detaches it).
    out = sslkernels.dino_loss(student, teacher, center, n_global_crops=n_global, backend=backend)
    (gt,) = torch.autograd.grad(out, [teacher], allow_unused=True)
    assert gt is None or not gt.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_loss_defaults_and_tensor_teacher_temp(backend):
    student, s64 = leaves(torch.randn(4 * 6, 13, dtype=F64), F64)
    teacher, center = torch.randn(2 * 6, 13, dtype=F64), torch.randn(1, 13, dtype=F64) * 0.1
    out = sslkernels.dino_loss(student, teacher, center, backend=backend)  # 0.1, 0.04, 2 global crops
    want = expected_dino(s64, teacher, center, 0.1, 0.04, 2)
    assert_close(out, want, F64)
    check_grads(out, want, [(student, s64)], F64)
    out = sslkernels.dino_loss(student, teacher, center.reshape(-1), teacher_temp=torch.tensor(0.07, dtype=F64),
                               backend=backend)
    assert_close(out, expected_dino(s64, teacher, center, 0.1, 0.07, 2), F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mkind", ["float", "0d"])
@pytest.mark.parametrize("center_shape", ["1xP", "P"])
def test_update_center_(center_shape, mkind, dtype, backend):
    b, p = 13, 7
    c64 = torch.randn(1, p, dtype=F64)
    teacher = torch.randn(b, p, dtype=F64).to(dtype)
    center = c64.to(dtype).reshape(-1 if center_shape == "P" else (1, p)).clone()
    before, before_ptr = center.double().clone(), center.data_ptr()
    m = 0.9 if mkind == "float" else torch.tensor(0.9, dtype=dtype)
    sslkernels.update_center_(center, teacher, m, backend=backend)
    want = 0.9 * before + 0.1 * teacher.double().mean(dim=0).reshape(center.shape)
    assert center.data_ptr() == before_ptr and center.dtype == dtype
    assert_close(center, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_center_default_momentum(backend):
    center = torch.zeros(1, 5, dtype=F64)
    teacher = torch.randn(3, 5, dtype=F64)
    sslkernels.update_center_(center, teacher, backend=backend)
    assert_close(center, 0.1 * teacher.mean(dim=0, keepdim=True), F64)


# ------------------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("iterations", [0, 1, 3, 7])
@pytest.mark.parametrize("b,p", [(1, 5), (13, 7), (6, 40)])
def test_sinkhorn_knopp(b, p, iterations, dtype, backend):
    scores = F.normalize(torch.randn(b, p, dtype=F64), dim=1).to(dtype)  # cosine scores, as SwAV feeds it
    out = sslkernels.sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations, backend=backend)
    want = expected_sinkhorn(scores.double(), 0.05, iterations)
    assert out.shape == (b, p)
    assert_close(out, want, dtype)
    if iterations:
        assert_close(out.sum(dim=1), torch.ones(b, dtype=F64), dtype, name="row sums")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_knopp_defaults(backend):
    scores = F.normalize(torch.randn(13, 7, dtype=F64), dim=1)
    out = sslkernels.sinkhorn_knopp(scores, backend=backend)  # epsilon 0.05, 3 iterations
    assert_close(out, expected_sinkhorn(scores, 0.05, 3), F64)
    out = sslkernels.sinkhorn_knopp(scores, epsilon=0.3, iterations=5, backend=backend)
    assert_close(out, expected_sinkhorn(scores, 0.3, 5), F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sinkhorn_knopp_huge_scores_are_stable(dtype, backend):
    # scores·1000 / 0.05 = 2e4: exp() overflows even float64; the result must stay finite and exact.
    base = F.normalize(torch.randn(13, 7, dtype=F64), dim=1)
    assert not torch.isfinite(expected_sinkhorn(base * 1000, 0.05, 3)).all()  # the literal algorithm breaks
    assert_close(expected_sinkhorn_logdomain(base, 0.05, 3), expected_sinkhorn(base, 0.05, 3), F64)
    scores = (base * 1000).to(dtype)
    out = sslkernels.sinkhorn_knopp(scores, epsilon=0.05, iterations=3, backend=backend)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert_close(out, expected_sinkhorn_logdomain(scores.double(), 0.05, 3), dtype)
    assert_close(out.sum(dim=1), torch.ones(13, dtype=F64), dtype, name="row sums")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_knopp_makes_no_graph(backend):
    # SwAV / DINOv2 use the assignments as targets (computed under no_grad).
    scores = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = sslkernels.sinkhorn_knopp(scores, backend=backend)
    assert not out.requires_grad


# ------------------------------------------------------------------------- Barlow Twins / VICReg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(2, 3), (13, 7), (16, 33)])
@pytest.mark.parametrize("lambd", [None, 0.05])
def test_barlow_twins_loss(n, d, lambd, dtype, backend):
    z1, z1_64 = leaves(torch.randn(n, d, dtype=F64) * 2 + 1, dtype)
    z2, z2_64 = leaves(torch.randn(n, d, dtype=F64) + z1_64.detach() * 0.5, dtype)
    if lambd is None:
        out = sslkernels.barlow_twins_loss(z1, z2, backend=backend)
        want = expected_barlow(z1_64, z2_64)
    else:
        out = sslkernels.barlow_twins_loss(z1, z2, lambd, backend=backend)
        want = expected_barlow(z1_64, z2_64, lambd)
    assert out.dim() == 0 and out.dtype == dtype
    assert_close(out, want, dtype)
    check_grads(out, want, [(z1, z1_64), (z2, z2_64)], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(2, 3), (13, 7), (16, 33)])
@pytest.mark.parametrize("weights", [None, (1.0, 2.0, 3.0)])
def test_vicreg_loss(n, d, weights, dtype, backend):
    # Per-feature scales around 1 so the variance hinge is active on some features and not on others.
    scale = torch.linspace(0.2, 2.5, d, dtype=F64)
    z1, z1_64 = leaves(torch.randn(n, d, dtype=F64) * scale, dtype)
    z2, z2_64 = leaves(torch.randn(n, d, dtype=F64) * scale + 0.3 * z1_64.detach(), dtype)
    if weights is None:
        out = sslkernels.vicreg_loss(z1, z2, backend=backend)
        want = expected_vicreg(z1_64, z2_64)
    else:
        out = sslkernels.vicreg_loss(z1, z2, *weights, backend=backend)
        want = expected_vicreg(z1_64, z2_64, *weights)
    assert out.dim() == 0 and out.dtype == dtype
    assert_close(out, want, dtype)
    check_grads(out, want, [(z1, z1_64), (z2, z2_64)], dtype)
