"""What the Triton interpreter does not check and a GPU does: CUDA's launch limits at the sizes the library
promises, the TF32 setting as every torch version spells it, and the int64 offsets of inputs past 2³¹ elements.

The interpreter runs any grid; CUDA refuses a launch whose grid axis 1 or 2 exceeds 65535 programs (axis 0:
2³¹ − 1) or that asks for more than 32 warps. The size tests below record the launches an op makes, without
running them (inputs are stride-0 expanded rows: no memory), and hold every grid to those limits.
"""
import pytest
import torch

import sslkernels
from sslkernels.ops import _grid, contrastive, cross_correlation_triton as cct, dino, similarity, sinkhorn

from conftest import HAS_CUDA, assert_close, launches

# The Triton backend takes CPU tensors only under the interpreter: on a GPU machine every input lives on the GPU.
DEVICE = "cuda" if HAS_CUDA else "cpu"

MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def _assert_launchable(seen, names):
    launched = {name for name, _, _ in seen}
    assert set(names) <= launched, f"expected launches of {sorted(names)}, saw {sorted(launched)}"
    for name, grid, kwargs in seen:
        assert len(grid) <= 3 and all(g >= 1 for g in grid), f"{name}: grid {grid}"
        for axis, (g, cap) in enumerate(zip(grid, MAX_GRID)):
            assert g <= cap, f"{name}: grid axis {axis} has {g} programs; CUDA allows {cap}"
        assert kwargs.get("num_warps", 4) <= 32, f"{name}: {kwargs['num_warps']} warps > 1024 threads"


def _rows(n, d, dtype=torch.float32):
    """n identical rows, no memory: the launch code sees an [n, d] tensor with unit-stride rows."""
    return torch.ones(1, d, dtype=dtype, device=DEVICE).expand(n, d)


# ------------------------------------------------------------------------------ grids at large sizes


def test_similarity_grid_fits_cuda_for_a_bank_of_millions():
    # 4.2M bank rows: 65536 column tiles of 64, one past grid axis 1's limit when the tiles went there.
    m = 65535 * similarity.SIMILARITY["fp32"].block_n + 1
    with launches(execute=False) as seen:
        sslkernels.similarity(_rows(3, 32), _rows(m, 32), backend="triton")
    _assert_launchable(seen, {"_similarity_kernel"})


def test_sinkhorn_assignment_grid_fits_cuda_for_wide_p(monkeypatch):
    # 16-wide column blocks (the tests' small tiles) make P = 1M as many blocks as 128-wide ones at P = 8.4M.
    monkeypatch.setattr(sinkhorn, "BLOCK_P", 16)
    p = 65535 * 16 + 1
    with launches(execute=False) as seen:
        sslkernels.sinkhorn_knopp(_rows(4, p), iterations=1, backend="triton")
    _assert_launchable(seen, {"_assign_kernel", "_column_lse_kernel", "_row_lse_kernel"})


def test_dino_backward_grid_fits_cuda_for_wide_p(monkeypatch):
    # 16-wide tiles of P (TILE_ELEMENTS / 2 crops): P = 1M makes as many as 12 crops' 256-wide tiles at 16.7M.
    monkeypatch.setattr(dino, "TILE_ELEMENTS", 32)
    p = 65535 * 16 + 1
    student = _rows(2, p).clone().requires_grad_()  # B = 1, S = G = 2
    with launches(execute=False) as seen:
        loss = sslkernels.dino_loss(student, _rows(2, p), _rows(1, p), backend="triton")
        loss.backward()
    _assert_launchable(seen, {"_dino_fwd_kernel", "_dino_merge_kernel", "_dino_bwd_kernel"})


@pytest.mark.parametrize("loss", ["info_nce", "symmetric", "nt_xent", "moco"])
def test_contrastive_grids_fit_cuda_at_n_262144(monkeypatch, loss):
    # The engine at the issue's size, fwd + bwd, with the key splits an H100's 132 SMs would get.
    monkeypatch.setattr(contrastive, "_SPLIT_PROGRAMS", 132)
    n, d = 262144, 64
    q = _rows(n, d).clone().requires_grad_()
    k = _rows(n, d).clone().requires_grad_()
    with launches(execute=False) as seen:
        if loss == "nt_xent":
            out = sslkernels.nt_xent(q, k, backend="triton")
        elif loss == "moco":
            out = sslkernels.moco_loss(q[:256], k[:256], _rows(65536, d), backend="triton")
        else:
            out = sslkernels.info_nce(q, k, symmetric=loss == "symmetric", backend="triton")
        out.backward()
    key_grads = loss in ("info_nce", "symmetric")  # nt_xent's keys are its rows; MoCo's queue takes none
    _assert_launchable(seen, {"_fwd_kernel", "_bwd_rows_kernel"} | ({"_bwd_cols_kernel"} if key_grads else set()))


# ----------------------------------------------------------------------------------------------- TF32


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no new API")
@pytest.mark.parametrize("how", ["fp32_precision", "global", "legacy", "highest"])
def test_fp32_kernels_follow_the_tf32_setting_of_either_api(how, numerics_restored):
    # torch ≥ 2.9: once TF32 is set through the new API, reading torch.backends.cuda.matmul.allow_tf32 raises
    # RuntimeError; every fp32 launch read it. The kernels must take TF32 exactly when cuBLAS would.
    matmul, backends = torch.backends.cuda.matmul, torch.backends
    want = "ieee" if how == "highest" else "tf32"
    if how == "fp32_precision":
        matmul.fp32_precision = "tf32"
    elif how == "global":
        backends.fp32_precision = "tf32"
    elif how == "legacy":
        matmul.allow_tf32 = True
    else:
        torch.set_float32_matmul_precision("highest")
    q, k = torch.randn(24, 16, device=DEVICE), torch.randn(24, 16, device=DEVICE)
    with launches(execute=True) as seen:
        got = sslkernels.info_nce(q, k, 0.5, backend="triton")
        sim = sslkernels.similarity(q, k, backend="triton")
        bt = sslkernels.barlow_twins_loss(q, k, backend="triton")
    precisions = {kw["DOT_PREC"] for _, _, kw in seen if "DOT_PREC" in kw}
    assert precisions == {want}
    tol = 1e-2 if want == "tf32" else 1e-4  # the interpreter may round TF32 operands
    assert_close(got, sslkernels.info_nce(q.double(), k.double(), 0.5, backend="torch"), rtol=tol, name="info_nce")
    assert_close(sim, sslkernels.similarity(q.double(), k.double(), backend="torch"), rtol=tol, name="similarity")
    assert_close(bt, sslkernels.barlow_twins_loss(q.double(), k.double(), backend="torch"), rtol=tol, name="barlow")


# ------------------------------------------------------------------------------ int64 offsets (WIDE)


def test_cross_correlation_takes_64_bit_offsets_for_inputs_past_2_31_elements():
    # A transposed-view layout whose M index times its stride passes 2³¹ (meta tensors: nothing allocated).
    tall = torch.empty_strided((2 ** 17, 2 ** 15), (1, 2 ** 17), device="meta")  # 2³² elements, column-major
    small = torch.empty_strided((64, 32), (32, 1), device="meta")
    with launches(execute=False) as seen:
        cct.TritonProducts.cross(tall, None, keep=False)
        cct.TritonProducts.cross(small, None, keep=False)
    assert [kw["WIDE"] for _, _, kw in seen] == [True, False]


@pytest.mark.parametrize("two", [False, True])
def test_cross_correlation_wide_kernel_matches_the_narrow_one(two):
    # The int64 branch (taken only past 2³¹ elements) computes the same products on any input.
    a, b = torch.randn(37, 70, device=DEVICE), torch.randn(37, 70, device=DEVICE)
    tm, tn = cct.cdiv(70, cct.BLOCK_M), cct.cdiv(70, cct.BLOCK_N)
    parts, outs = [], []
    for wide in (False, True):
        part = torch.empty((tm, tn), device=DEVICE)
        o1, o2 = torch.empty(70, 70, device=DEVICE), torch.empty(70, 70, device=DEVICE)
        cct._products_kernel[(tm, tn)](a, b, b, a, o1, o2, part, 37, 70, 70, a.stride(0), a.stride(1), b.stride(0),
                                       b.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1), 70, 70,
                                       TWO=two, STORE=True, WIDE=wide, DOT_PREC="ieee", BLOCK_M=cct.BLOCK_M,
                                       BLOCK_N=cct.BLOCK_N, BLOCK_K=cct.BLOCK_K)
        parts.append(part.sum())
        outs.append(o1)
    want = a.double().T @ b.double()
    assert_close(outs[1], want, name="wide product")
    assert torch.equal(outs[0], outs[1]) and torch.equal(parts[0], parts[1])


@pytest.mark.parametrize("n1", [0, 1, 65535, 65536, 200_000, 65535 ** 2])
def test_folded_grid_covers_axis_1_within_the_limits(n1):
    grid = _grid.folded(7, n1)
    assert grid[0] == 7 and grid[1] <= 65535 and grid[2] <= 65535
    assert n1 <= grid[1] * grid[2] < n1 + grid[2]  # every index, fewer than grid[2] extra programs
    assert (grid[2] == 1) == (n1 <= 65535)  # the plain 2-D grid wherever it is launchable


def test_folded_kernels_mask_the_extra_programs(monkeypatch):
    # A fold at 2 programs (instead of 65535) runs the folded path, with its extra masked programs, on tiny
    # inputs: 5 tiles along axis 1 as 3 × 2 programs over axes 1 and 2. Outputs are NaN-poisoned under the
    # interpreter, so a missed write fails, and a stray one would show against the float64 references.
    monkeypatch.setattr(_grid, "MAX_AXIS12", 2)
    monkeypatch.setattr(sinkhorn, "BLOCK_P", 16)
    monkeypatch.setattr(dino, "TILE_ELEMENTS", 32)
    a, b = (torch.randn(n, 24, device=DEVICE) for n in (5, 5 * similarity.SIMILARITY["fp32"].block_n - 3))
    scores = torch.randn(6, 77, device=DEVICE)
    student = torch.randn(4, 77, device=DEVICE, requires_grad=True)
    teacher, center = torch.randn(4, 77, device=DEVICE), torch.randn(1, 77, device=DEVICE)
    with launches(execute=True) as seen:
        sim = sslkernels.similarity(a, b, backend="triton")
        q = sslkernels.sinkhorn_knopp(scores, iterations=2, backend="triton")
        (grad,) = torch.autograd.grad(sslkernels.dino_loss(student, teacher, center, backend="triton"), student)
    folded = {name for name, grid, _ in seen if len(grid) == 3 and grid[2] > 1}
    assert folded == {"_similarity_kernel", "_assign_kernel", "_dino_bwd_kernel"}
    assert_close(sim, sslkernels.similarity(a.double(), b.double(), backend="torch"), name="similarity")
    assert_close(q, sslkernels.sinkhorn_knopp(scores.double(), iterations=2, backend="torch"), name="sinkhorn")
    s64 = student.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(sslkernels.dino_loss(s64, teacher.double(), center.double(), backend="torch"), s64)
    assert_close(grad, want, torch.float32, name="dino gradient")
