"""BYOL / SimSiam negative cosine similarity (Triton kernels under the interpreter) against float64 math
written here, including F.cosine_similarity's ε-clamp convention and the stop-gradient on z."""
import pytest
import torch

import sslkernels
from conftest import HAS_CUDA, assert_close

pytest.importorskip("triton")
from sslkernels.ops import cosine  # noqa: E402


DEVICE = "cuda" if HAS_CUDA else "cpu"  # Triton: the GPU where there is one, else the interpreter


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(cosine, "TILE_ELEMENTS", 64)  # several column tiles and row blocks even when tiny


def neg_cos64(p, z, reduction):
    """−⟨p/max(‖p‖, ε), z/max(‖z‖, ε)⟩ with ε = 1e-8 excluded from the gradient (as F.cosine_similarity)."""
    p, z = p.double(), z.detach().double()
    norm_p = torch.linalg.vector_norm(p, dim=1, keepdim=True)
    with torch.no_grad():
        clamp_p = norm_p.clamp_min(1e-8) - norm_p
    n_z = torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-8)
    rows = -((p / (norm_p + clamp_p)) * (z / n_z)).sum(dim=1)
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def check(n, d, dtype, reduction, scale=1.0, zero_row=False):
    p = (torch.randn(n, d) * scale).to(dtype)
    z = (torch.randn(n, d) * scale).to(dtype)
    if zero_row:
        p[0] = 0
        p[-1] = 1e-10
    p64 = p.double().requires_grad_()
    want = neg_cos64(p64, z, reduction)
    w = torch.rand_like(want) + 0.5
    (want_grad,) = torch.autograd.grad((want * w).sum(), p64)
    pt, zt = p.to(DEVICE).requires_grad_(), z.to(DEVICE).requires_grad_()
    got = cosine.negative_cosine_similarity(pt, zt, reduction)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    (grad,) = torch.autograd.grad((got * w.to(got)).sum(), pt)
    assert grad.dtype == dtype
    assert_close(got, want, dtype, name="loss")
    assert_close(grad, want_grad, dtype, atol=0.0, name="grad p")


@pytest.mark.parametrize("n,d", [(1, 5), (3, 100), (17, 33), (6, 300)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_cosine_matches_float64(n, d, reduction):
    check(n, d, torch.float32, reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_negative_cosine_dtypes(dtype):
    check(5, 70, dtype, "mean")


def test_negative_cosine_extreme_and_zero_rows():
    check(4, 50, torch.float32, "sum", scale=1000.0)
    check(4, 50, torch.float32, "none", zero_row=True)


def test_negative_cosine_stops_gradient_on_z():
    p = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    z = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    cosine.negative_cosine_similarity(p, z, "mean").backward()
    assert z.grad is None and p.grad is not None


@pytest.mark.skipif(not HAS_CUDA, reason="programs run at once only on a GPU (the interpreter runs them in turn)")
def test_negative_cosine_many_rows_odd_width_cuda():
    # A column mask off by one writes past each row's end into the next row's first gradient element: under the
    # interpreter the next program rewrites it in turn, so only concurrent programs show it (mutation audit).
    check(4099, 129, torch.float32, "none")


@pytest.mark.skipif(not HAS_CUDA, reason="a GPU-sized bf16 case (the small ones run under the interpreter)")
def test_negative_cosine_bf16_cuda():
    p = torch.randn(300, 2048, device="cuda").bfloat16().requires_grad_()
    z = torch.randn(300, 2048, device="cuda").bfloat16()
    got = cosine.negative_cosine_similarity(p, z, "mean")
    (grad,) = torch.autograd.grad(got, p)
    p64 = p.detach().cpu().double().requires_grad_()
    want = neg_cos64(p64, z.cpu(), "mean")
    (want_grad,) = torch.autograd.grad(want, p64)
    assert_close(got, want, torch.bfloat16)
    assert_close(grad, want_grad, torch.bfloat16, atol=0.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_negative_cosine_public_api(backend):
    dev = DEVICE if backend == "triton" else "cpu"
    p, z = torch.randn(5, 12, device=dev, requires_grad=True), torch.randn(5, 12, device=dev)
    got = sslkernels.negative_cosine_similarity(p, z, backend=backend)
    got.backward()
    p64 = p.detach().cpu().double().requires_grad_()
    want = neg_cos64(p64, z.cpu(), "mean")
    want.backward()
    assert_close(got, want, torch.float32)
    assert_close(p.grad, p64.grad, torch.float32, atol=0.0)


@pytest.mark.parametrize("eps", [1e-8, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_negative_cosine_without_stop_gradient(eps, reduction):
    """stop_gradient=False (lightly's NegativeCosineSimilarity): z gets the mirror-image gradient, with
    F.cosine_similarity's eps clamp. With the large eps, rows with norms under it (a zero row of p, a short
    row of z) use the clamp; with 1e-8 such rows would have gradients ~1e8 that swamp the comparison."""
    p, z = torch.randn(9, 37, dtype=torch.float64), torch.randn(9, 37, dtype=torch.float64)
    if eps > 0.1:
        p[1], z[2] = 0.0, z[2] * 0.01
    p64, z64 = p.clone().requires_grad_(), z.clone().requires_grad_()
    want = -torch.nn.functional.cosine_similarity(p64, z64, dim=1, eps=eps)
    want = want.mean() if reduction == "mean" else want
    w = torch.rand_like(want) + 0.5
    want_gp, want_gz = torch.autograd.grad((want * w).sum(), [p64, z64])
    for backend in ("triton", "torch"):
        dev = DEVICE if backend == "triton" else "cpu"
        pt, zt = p.float().to(dev).requires_grad_(), z.float().to(dev).requires_grad_()
        got = sslkernels.negative_cosine_similarity(pt, zt, reduction=reduction, stop_gradient=False, eps=eps,
                                                    backend=backend)
        gp, gz = torch.autograd.grad((got * w.to(got)).sum(), [pt, zt])
        assert_close(got, want, torch.float32, name=f"{backend} loss")
        assert_close(gp, want_gp, torch.float32, atol=0.0, name=f"{backend} grad p")
        assert_close(gz, want_gz, torch.float32, atol=0.0, name=f"{backend} grad z")


@pytest.mark.parametrize("eps,error", [(0.0, ValueError), (-1e-8, ValueError), (float("nan"), ValueError),
                                       (float("inf"), ValueError), (True, TypeError), ("1e-8", TypeError),
                                       (torch.tensor(1e-8), TypeError)])
def test_negative_cosine_rejects_a_bad_eps(eps, error):
    # eps clamps the norms: 0 or a negative one divides a zero row by 0 (NaN), NaN / inf poison every row.
    p, z = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(error, match="eps"):
        sslkernels.negative_cosine_similarity(p, z, eps=eps)
