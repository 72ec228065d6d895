"""The Triton similarity kernels (sslkernels/ops/similarity.py) against float64 math written here.

similarity: values and both input gradients, cosine and dot product, on odd sizes with tiles of 16 so rows,
columns and features all span several tiles with ragged edges. knn_topk: values, indices (ties: lower bank
index first), sorted order, k = 1 … M including k wider than a tile, several bank splits. Without a GPU the
kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1); with one, on CUDA.
"""
import pytest
import torch

from conftest import HAS_CUDA, assert_close

from sslkernels.backends import available
from sslkernels.ops import similarity as similarity_ops

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the Triton backend runs on CPU tensors only when interpreted
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
F64 = torch.float64


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # 16 is tl.dot's minimum: the smallest tiles make small inputs take every multi-tile path.
    for table in (similarity_ops.SIMILARITY, similarity_ops.KNN):
        for kind, cfg in list(table.items()):
            monkeypatch.setitem(table, kind, cfg._replace(block_m=16, block_n=16, block_d=16))


def _impl(op):
    return available(op)["triton"]


def _feats(n, d, dtype, scale=1.0, grad=True):
    """(leaf on DEVICE in ``dtype``, float64 leaf holding the same values)."""
    x = (torch.randn(n, d, dtype=F64) * scale).to(dtype)
    lo = x.to(DEVICE, copy=True).requires_grad_(grad)
    return lo, x.to(F64, copy=True).requires_grad_(grad)


def similarity64(a, b, normalize):
    if normalize:
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
    return a @ b.T


def _strided(x, how):
    """The same values in a non-contiguous layout: a column slice of a wider tensor, or a transpose."""
    if how == "slice":
        wide = torch.zeros(x.shape[0], x.shape[1] + 5, dtype=x.dtype, device=x.device)
        wide[:, 2:2 + x.shape[1]] = x
        return wide[:, 2:2 + x.shape[1]]
    return x.T.contiguous().T  # column-major: the feature dimension has a stride > 1


# ------------------------------------------------------------------------------------------ similarity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,m,d", [(1, 1, 7), (13, 37, 33), (37, 5, 16), (1, 29, 40)])
def test_similarity(n, m, d, normalize, dtype):
    a, a64 = _feats(n, d, dtype, scale=2.0)
    b, b64 = _feats(m, d, dtype, scale=0.5)
    out = _impl("similarity")(a, b, normalize)
    want = similarity64(a64, b64, normalize)
    assert out.shape == (n, m) and out.dtype == torch.float32  # the compute dtype, as reference.py
    assert_close(out, want, dtype)
    cot = torch.randn(n, m, dtype=F64)
    ga, gb = torch.autograd.grad(out, [a, b], cot.to(out.device, out.dtype))
    ea, eb = torch.autograd.grad(want, [a64, b64], cot)
    assert ga.dtype == dtype and gb.dtype == dtype
    assert_close(ga, ea, dtype, name="grad a")
    assert_close(gb, eb, dtype, name="grad b")


@pytest.mark.parametrize("which", ["a", "b"])
def test_similarity_one_input_needs_grad(which):
    a, a64 = _feats(13, 7, torch.float32, grad=which == "a")
    b, b64 = _feats(19, 7, torch.float32, grad=which == "b")
    out = _impl("similarity")(a, b, True)
    x, x64 = (a, a64) if which == "a" else (b, b64)
    cot = torch.randn(13, 19, dtype=F64)
    (g,) = torch.autograd.grad(out, [x], cot.to(out.device, out.dtype))
    (e,) = torch.autograd.grad(similarity64(a64, b64, True), [x64], cot)
    assert_close(g, e, torch.float32)


@pytest.mark.parametrize("how", ["slice", "transpose"])
def test_similarity_non_contiguous(how):
    a, a64 = _feats(13, 33, torch.float32, grad=False)
    b, b64 = _feats(21, 33, torch.float32, grad=False)
    a_s, b_s = _strided(a, how).requires_grad_(), _strided(b, how).requires_grad_()
    assert not a_s.is_contiguous()
    out = _impl("similarity")(a_s, b_s, True)
    a64.requires_grad_()
    b64.requires_grad_()
    want = similarity64(a64, b64, True)
    assert_close(out, want, torch.float32)
    cot = torch.randn(13, 21, dtype=F64)
    got = torch.autograd.grad(out, [a_s, b_s], cot.to(out.device, out.dtype))
    exp = torch.autograd.grad(want, [a64, b64], cot)
    for g, e in zip(got, exp):
        assert_close(g, e, torch.float32)


def test_similarity_zero_row_is_zero():
    # F.normalize's convention: a zero row stays 0 (x / max(‖x‖, ε)), never NaN.
    a = torch.randn(5, 7, device=DEVICE)
    a[2] = 0
    out = _impl("similarity")(a, torch.randn(9, 7, device=DEVICE), True)
    assert torch.isfinite(out).all() and (out[2] == 0).all()


def test_similarity_rows_of_tiny_norm():
    # F.normalize's ε = 1e-12: a row of norm 1e-9 is normalized like any other (its cosines are O(1)); a row of
    # norm 1e-13 is divided by ε instead, and its gradient has no radial part (the clamped norm is a constant).
    # Values and gradients against F.normalize in float64, each row of dA relative to its own scale (~1e9).
    a64 = torch.randn(5, 7, dtype=F64)
    a64[1] *= 1e-9 / a64[1].norm()
    a64[3] *= 1e-13 / a64[3].norm()
    a64 = a64.float().double().requires_grad_()
    b64 = torch.randn(9, 7, dtype=F64).float().double().requires_grad_()
    a, b = (x.detach().float().to(DEVICE).requires_grad_() for x in (a64, b64))
    out = _impl("similarity")(a, b, True)
    want = torch.nn.functional.normalize(a64, dim=1) @ torch.nn.functional.normalize(b64, dim=1).T
    assert_close(out, want, torch.float32, name="values")
    cot = torch.randn(5, 9, dtype=F64)
    ga, gb = torch.autograd.grad(out, [a, b], cot.float().to(DEVICE))
    ea, eb = torch.autograd.grad(want, [a64, b64], cot)
    for r in range(5):
        assert_close(ga[r], ea[r], torch.float32, atol=0.0, rtol=1e-4, name=f"grad of a's row {r}")
    assert_close(gb, eb, torch.float32, name="grad of b")


def test_similarity_float64_is_exact():
    a, b = torch.randn(5, 7, dtype=F64, device=DEVICE), torch.randn(6, 7, dtype=F64, device=DEVICE)
    out = _impl("similarity")(a, b, False)
    assert out.dtype == F64
    assert_close(out, a.cpu() @ b.cpu().T, F64)


# ------------------------------------------------------------------------------------------ knn_topk


def _check_knn(values, indices, query64, bank64, k, normalize, dtype):
    full = similarity64(query64, bank64, normalize)
    want_v, _ = torch.topk(full, k, dim=1)
    n = query64.shape[0]
    assert values.shape == (n, k) and indices.shape == (n, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert_close(values, want_v, dtype, name="values")
    idx = indices.cpu()
    assert ((idx >= 0) & (idx < bank64.shape[0])).all()
    assert_close(values, full.gather(1, idx), dtype, name="values at the returned indices")
    assert all(len(set(row.tolist())) == k for row in idx), "an index repeats within a row"
    assert (values[:, :-1] >= values[:, 1:]).all(), "values must come sorted, best first"


# (N, M, D, k, splits, dtype): k = 1, k wider than a tile (W = 64 > 16), k == M, ragged last bank tiles,
# N = 1, several splits (one shorter than the others).
KNN_CASES = [
    (1, 1, 7, 1, None, torch.float32),
    (1, 37, 33, 5, None, torch.float32),
    (13, 37, 33, 5, 3, torch.float32),
    (13, 37, 33, 5, 3, torch.float16),
    (13, 37, 7, 37, None, torch.float32),
    (19, 53, 16, 20, 2, torch.float32),
    (37, 29, 7, 1, None, torch.float32),
] + ([(13, 37, 33, 5, 3, torch.bfloat16)] if HAS_CUDA else [])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("case", KNN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_knn_topk(case, normalize):
    n, m, d, k, splits, dtype = case
    query, query64 = _feats(n, d, dtype, grad=False)
    bank = (torch.randn(m, d, dtype=F64) * (0.5 + torch.rand(m, 1, dtype=F64))).to(dtype)  # norms matter
    bank64 = bank.to(F64)
    values, indices = _impl("knn_topk")(query, bank.to(DEVICE), k, normalize, splits=splits)
    _check_knn(values, indices, query64, bank64, k, normalize, dtype)
    if dtype == torch.float32 and k < m:
        # Where float64's k-th and (k+1)-th scores are well apart, the chosen set matches exactly.
        full = similarity64(query64, bank64, normalize)
        top = torch.topk(full, k + 1, dim=1)
        apart = (top.values[:, k - 1] - top.values[:, k]) > 1e-4
        want = top.indices[:, :k].sort(dim=1).values[apart]
        assert torch.equal(indices.cpu().sort(dim=1).values[apart], want)


@pytest.mark.parametrize("order", ["best_first", "worst_first", "kth_alone_later"])
def test_knn_topk_bank_order(order):
    # best_first: every tile after the first holds nothing better than the k-th best and is skipped;
    # worst_first: every tile displaces the whole list; kth_alone_later: the first tile holds the 3 best and 13
    # far worse, the 4th best comes in the second tile with nothing above the 3rd best: the skip test must
    # compare with the k-th best itself (a tile that beats only it still changes the top k).
    query64 = torch.randn(1, 16, dtype=F64)
    bank64 = torch.randn(53, 16, dtype=F64)
    sims = similarity64(query64, bank64, True)[0]
    rank = sims.argsort(descending=order != "worst_first")
    if order == "kth_alone_later":
        rank = torch.cat([rank[:3], rank[20:33], rank[3:20], rank[33:]])
    bank64 = bank64[rank]
    values, indices = _impl("knn_topk")(query64.float().to(DEVICE), bank64.float().to(DEVICE), 4, True)
    _check_knn(values, indices, query64, bank64, 4, True, torch.float32)
    want = {"best_first": [[0, 1, 2, 3]], "worst_first": [[52, 51, 50, 49]], "kth_alone_later": [[0, 1, 2, 16]]}
    assert indices.cpu().tolist() == want[order]


@pytest.mark.parametrize("normalize", [False, True])
def test_knn_topk_ranks_a_nan_first_whatever_its_sign(normalize):
    # torch.topk puts NaN first; a NaN with its sign bit set (0/0 on x86) must not sort below −inf instead.
    query, bank = torch.randn(3, 8), torch.randn(40, 8)
    bank[7, 2] = torch.tensor(0.0) / torch.tensor(0.0)
    bank[23, 5] = float("nan")
    assert bank[7, 2].view(torch.int32) < 0 and bank[23, 5].view(torch.int32) > 0  # both signs present
    values, indices = _impl("knn_topk")(query.to(DEVICE), bank.to(DEVICE), 4, normalize)
    assert sorted(indices[:, :2].cpu().flatten().tolist()) == [7, 7, 7, 23, 23, 23]
    assert values[:, :2].isnan().all() and not values[:, 2:].isnan().any()


@pytest.mark.parametrize("splits", [1, 3])
def test_knn_topk_ties_lower_index_first(splits):
    # Every bank row appears three times (rows j, j + 11, j + 22) and scaled copies tie under cosine:
    # equal values rank the lower bank index first, across tiles and splits.
    base = torch.randn(11, 7, dtype=F64)
    bank64 = torch.cat([base, 2 * base, 0.5 * base])
    query64 = torch.randn(5, 7, dtype=F64)
    values, indices = _impl("knn_topk")(query64.float().to(DEVICE), bank64.float().to(DEVICE), 9, True,
                                        splits=splits)
    _check_knn(values, indices, query64, bank64, 9, True, torch.float32)
    idx = indices.cpu()
    for r in range(5):
        for j in range(0, 9, 3):
            group = idx[r, j:j + 3].tolist()
            assert group == sorted(group) and {g % 11 for g in group} == {group[0]}, (r, group)


@pytest.mark.parametrize("how", ["slice", "transpose"])
def test_knn_topk_non_contiguous(how):
    query, query64 = _feats(13, 33, torch.float32, grad=False)
    bank, bank64 = _feats(37, 33, torch.float32, grad=False)
    values, indices = _impl("knn_topk")(_strided(query, how), _strided(bank, how), 7, True)
    _check_knn(values, indices, query64, bank64, 7, True, torch.float32)


def test_knn_topk_matches_similarity_bitwise():
    # One tile helper serves both kernels: a returned value is exactly that entry of similarity().
    query, bank = torch.randn(13, 33, device=DEVICE), torch.randn(37, 33, device=DEVICE)
    values, indices = _impl("knn_topk")(query, bank, 6, True, splits=2)
    sim = _impl("similarity")(query, bank, True)
    assert torch.equal(values, sim.gather(1, indices))


def test_knn_topk_float64_and_large_k_take_the_streamed_path(monkeypatch):
    query, bank = torch.randn(3, 5, dtype=F64, device=DEVICE), torch.randn(40, 5, dtype=F64, device=DEVICE)
    values, indices = _impl("knn_topk")(query, bank, 4, False)
    assert values.dtype == F64
    assert_close(values, torch.topk(query.cpu() @ bank.cpu().T, 4, dim=1).values, F64)
    monkeypatch.setattr(similarity_ops, "MAX_K", 3)
    query64, bank64 = query.cpu(), bank.cpu()
    values, indices = _impl("knn_topk")(query.float(), bank.float(), 4, True)
    _check_knn(values, indices, query64, bank64, 4, True, torch.float32)
