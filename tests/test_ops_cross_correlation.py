"""Barlow Twins and VICReg (the Gram-matrix and D×D forms of the CPU path) against the papers' reference
code written here in float64: values and the gradients of both inputs."""
import pytest
import torch

import sslkernels
from conftest import assert_close
from sslkernels.ops import cross_correlation as cc


def barlow64(z1, z2, lambd):
    """Barlow Twins' reference: BatchNorm1d(affine=False) on both, c = bn(z1)ᵀ bn(z2) / N."""
    def bn(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = bn(z1.double()).T @ bn(z2.double()) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.flatten()[:-1].view(c.shape[0] - 1, c.shape[0] + 1)[:, 1:].flatten()  # the paper's off_diagonal()
    return on_diag + lambd * off.pow(2).sum()


def vicreg64(x, y, sim, var, cov):
    """VICReg's reference (Bardes et al., Algorithm 1 / the official main_vicreg.py), single process."""
    x, y = x.double(), y.double()
    n, d = x.shape
    repr_loss = ((x - y) ** 2).mean()
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    std_loss = torch.relu(1 - std_x).mean() / 2 + torch.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim * repr_loss + var * std_loss + cov * cov_loss


FORMS = {"gram": 1e9, "dxd": 0.0}


def check(fn64, impl, args, n, d, dtype, form, monkeypatch, scale=1.0, requires=(True, True)):
    monkeypatch.setattr(cc, "GRAM_RATIO", FORMS[form])
    z1 = (torch.randn(n, d) * scale + 0.3).to(dtype)
    z2 = (z1.float() + torch.randn(n, d) * 0.5 * scale).to(dtype)
    x64, y64 = z1.double().requires_grad_(requires[0]), z2.double().requires_grad_(requires[1])
    want = fn64(x64, y64, *args)
    wanted = [t for t in (x64, y64) if t.requires_grad]
    want_grads = torch.autograd.grad(want, wanted)
    a, b = z1.clone().requires_grad_(requires[0]), z2.clone().requires_grad_(requires[1])
    got = impl(a, b, *args)
    assert got.dim() == 0 and got.dtype == torch.promote_types(dtype, torch.float32)
    got_grads = torch.autograd.grad(got, [t for t in (a, b) if t.requires_grad])
    assert_close(got, want, dtype, name="loss")
    for g, w, name in zip(got_grads, want_grads, ("z1", "z2")):
        assert g.dtype == dtype
        assert_close(g, w, dtype, atol=0.0, name=f"grad {name}")


SHAPES = [(3, 4), (5, 17), (16, 8), (7, 33)]


@pytest.mark.parametrize("form", ["gram", "dxd"])
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_barlow_twins_matches_float64(form, n, d, dtype, monkeypatch):
    check(barlow64, cc.barlow_twins_loss, (5e-3,), n, d, dtype, form, monkeypatch)


@pytest.mark.parametrize("form", ["gram", "dxd"])
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vicreg_matches_float64(form, n, d, dtype, monkeypatch):
    # A small scale puts some feature stds under 1, so the variance hinge is active.
    check(vicreg64, cc.vicreg_loss, (25.0, 25.0, 1.0), n, d, dtype, form, monkeypatch, scale=0.7)


@pytest.mark.parametrize("form", ["gram", "dxd"])
def test_batch_of_two(form, monkeypatch):
    # With N = 2 batch-norm maps every feature to ±1 and Barlow Twins' gradient nearly cancels: float32
    # keeps ~1e-4 of it (the eager reference as well), so this edge is checked in float64.
    check(barlow64, cc.barlow_twins_loss, (5e-3,), 2, 3, torch.float64, form, monkeypatch)
    check(vicreg64, cc.vicreg_loss, (25.0, 25.0, 1.0), 2, 3, torch.float32, form, monkeypatch)


@pytest.mark.parametrize("form", ["gram", "dxd"])
def test_low_precision_and_one_sided_grad(form, monkeypatch):
    check(barlow64, cc.barlow_twins_loss, (0.1,), 9, 20, torch.float16, form, monkeypatch, requires=(True, False))
    check(vicreg64, cc.vicreg_loss, (1.0, 2.0, 3.0), 9, 20, torch.float16, form, monkeypatch, requires=(False, True))


def test_extreme_scale(monkeypatch):
    check(barlow64, cc.barlow_twins_loss, (5e-3,), 12, 10, torch.float32, "gram", monkeypatch, scale=1e4)
    check(vicreg64, cc.vicreg_loss, (25.0, 25.0, 1.0), 12, 10, torch.float32, "dxd", monkeypatch, scale=1e-3)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_public_api(backend):
    z1, z2 = torch.randn(6, 11, requires_grad=True), torch.randn(6, 11, requires_grad=True)
    loss = sslkernels.barlow_twins_loss(z1, z2, backend=backend) + sslkernels.vicreg_loss(z1, z2, backend=backend)
    loss.backward()
    x, y = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    want = barlow64(x, y, 5e-3) + vicreg64(x, y, 25.0, 25.0, 1.0)
    want.backward()
    assert_close(loss, want, torch.float32)
    assert_close(z1.grad, x.grad, torch.float32, atol=0.0)
    assert_close(z2.grad, y.grad, torch.float32, atol=0.0)


def test_no_grad_forward():
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    with torch.no_grad():
        assert_close(cc.barlow_twins_loss(z1, z2, 5e-3), barlow64(z1, z2, 5e-3), torch.float32)
        assert_close(cc.vicreg_loss(z1, z2, 25.0, 25.0, 1.0), vicreg64(z1, z2, 25.0, 25.0, 1.0), torch.float32)


def test_autocast_keeps_float32_matmuls():
    z1, z2 = torch.randn(6, 11), torch.randn(6, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cc.barlow_twins_loss(z1, z2, 5e-3)
    assert_close(got, barlow64(z1, z2, 5e-3), torch.float32)


def under_autocast(impl):
    def run(a, b, *args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return impl(a, b, *args)
    return run


@pytest.mark.parametrize("form", ["gram", "dxd"])
def test_autocast_keeps_float32_gradients(form, monkeypatch):
    # bf16 products would shift the loss by only ~1e-5 relative (inside float32's tolerance above), but the
    # gradients by ~1e-3: checking them catches an op that lets autocast reach its matmuls.
    check(barlow64, under_autocast(cc.barlow_twins_loss), (5e-3,), 7, 13, torch.float32, form, monkeypatch)
    check(vicreg64, under_autocast(cc.vicreg_loss), (25.0, 25.0, 1.0), 7, 13, torch.float32, form, monkeypatch,
          scale=0.7)


# ------------------------------------------------------------------------------- Triton products (CUDA)

pytest.importorskip("triton")
from sslkernels.ops import cross_correlation_triton as cct  # noqa: E402

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU


@pytest.fixture
def small_tiles(monkeypatch):
    # Several 16×16 product tiles and K steps, with ragged edges, even for tiny inputs.
    monkeypatch.setattr(cct, "BLOCK_M", 16)
    monkeypatch.setattr(cct, "BLOCK_N", 16)
    monkeypatch.setattr(cct, "BLOCK_K", 16)


def on_device(impl):
    # check() builds CPU leaves; .to() is differentiable, so their gradients come back through it.
    return lambda a, b, *args: impl(a.to(TRITON_DEVICE), b.to(TRITON_DEVICE), *args)


@pytest.mark.parametrize("form", ["gram", "dxd"])
@pytest.mark.parametrize("n,d", [(7, 33), (20, 17)])
def test_triton_products_match_float64(form, n, d, small_tiles, monkeypatch):
    check(barlow64, on_device(cct.barlow_twins_loss), (5e-3,), n, d, torch.float32, form, monkeypatch)
    check(vicreg64, on_device(cct.vicreg_loss), (25.0, 25.0, 1.0), n, d, torch.float32, form, monkeypatch, scale=0.7)


@pytest.mark.parametrize("form", ["gram", "dxd"])
def test_triton_products_fp16_one_sided_and_no_grad(form, small_tiles, monkeypatch):
    check(barlow64, on_device(cct.barlow_twins_loss), (0.1,), 9, 20, torch.float16, form, monkeypatch, requires=(True, False))
    check(vicreg64, on_device(cct.vicreg_loss), (1.0, 2.0, 3.0), 9, 20, torch.float16, form, monkeypatch, requires=(False, True))
    monkeypatch.setattr(cc, "GRAM_RATIO", FORMS[form])
    z1, z2 = torch.randn(6, 18), torch.randn(6, 18)
    with torch.no_grad():  # no product is stored at all: only per-tile partial sums
        assert_close(cct.barlow_twins_loss(z1, z2, 5e-3), barlow64(z1, z2, 5e-3), torch.float32)
        assert_close(cct.vicreg_loss(z1, z2, 25.0, 25.0, 1.0), vicreg64(z1, z2, 25.0, 25.0, 1.0), torch.float32)


def test_triton_kind_runs_the_kernels_except_for_float64(small_tiles, monkeypatch):
    # The Triton kind must form its products with the kernels (torch's matmuls would pass every value check
    # above just as well), and float64 must keep torch's exact matmuls (the kernels accumulate in float32).
    calls = []
    launch = cct._launch
    monkeypatch.setattr(cct, "_launch", lambda *a, **k: calls.append(a[2:5]) or launch(*a, **k))
    for form in ("gram", "dxd"):
        monkeypatch.setattr(cc, "GRAM_RATIO", FORMS[form])
        z1 = torch.randn(6, 10, device=TRITON_DEVICE, requires_grad=True)
        z2 = torch.randn(6, 10, device=TRITON_DEVICE)
        calls.clear()
        cct.barlow_twins_loss(z1, z2, 5e-3).backward()
        cct.vicreg_loss(z1, z2, 25.0, 25.0, 1.0).backward()
        # (K, M, N): the Gram pair over D (one launch for both views), or AᵀB and each view's ZcᵀZc over N
        want = [(10, 6, 6)] * 3 if form == "gram" else [(6, 10, 10)] * 3
        assert calls == want, (form, calls)
        calls.clear()
        z64 = z1.detach().double().requires_grad_()
        cct.barlow_twins_loss(z64, z2.double(), 5e-3).backward()
        cct.vicreg_loss(z64, z2.double(), 25.0, 25.0, 1.0).backward()
        assert calls == [], form


def test_triton_public_api(small_tiles):
    z1 = torch.randn(5, 21, device=TRITON_DEVICE, requires_grad=True)
    z2 = torch.randn(5, 21, device=TRITON_DEVICE, requires_grad=True)
    loss = sslkernels.barlow_twins_loss(z1, z2, backend="triton") + sslkernels.vicreg_loss(z1, z2, backend="triton")
    loss.backward()
    x, y = z1.detach().cpu().double().requires_grad_(), z2.detach().cpu().double().requires_grad_()
    want = barlow64(x, y, 5e-3) + vicreg64(x, y, 25.0, 25.0, 1.0)
    want.backward()
    assert_close(loss, want, torch.float32)
    assert_close(z1.grad, x.grad, torch.float32, atol=0.0)
    assert_close(z2.grad, y.grad, torch.float32, atol=0.0)
    # float64 keeps torch's exact matmuls on the same path.
    z64 = torch.randn(4, 9, dtype=torch.float64, device=TRITON_DEVICE)
    assert_close(sslkernels.barlow_twins_loss(z64, z64 + 1, backend="triton"), barlow64(z64, z64 + 1, 5e-3),
                 torch.float64)


@pytest.mark.parametrize("form", ["gram", "dxd"])
def test_triton_products_bf16_inputs(form, small_tiles, monkeypatch):
    # bf16 features are normalized / centred in float32 before any product, so tl.dot only ever sees float32
    # operands: safe under the interpreter (whose bf16 tl.dot is wrong) and the same numbers on the GPU.
    check(barlow64, on_device(cct.barlow_twins_loss), (5e-3,), 11, 19, torch.bfloat16, form, monkeypatch)
    check(vicreg64, on_device(cct.vicreg_loss), (25.0, 25.0, 1.0), 11, 19, torch.bfloat16, form, monkeypatch)
