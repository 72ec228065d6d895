"""Similarity and evaluation ops of shared/API.md (similarity, knn_topk, rankme) against float64 math
written here."""
import math

import pytest
import torch

from conftest import assert_close

import sslkernels

F64 = torch.float64
DTYPES = [torch.float64, torch.float32]
BACKENDS = ["torch", "auto"]


def leaves(x64, dtype):
    x = x64.detach().to(dtype).requires_grad_()
    return x, x.detach().to(F64).requires_grad_()


def expected_similarity(a, b, normalize):
    if normalize:
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
    return a @ b.T


def expected_rankme(z, eps=1e-7):
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + eps
    return math.exp(-(p * torch.log(p)).sum().item())


# ------------------------------------------------------------------------- similarity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False, None])
@pytest.mark.parametrize("n,m,d", [(1, 1, 7), (13, 29, 7), (5, 3, 33)])
def test_similarity(n, m, d, normalize, dtype, backend):
    a, a64 = leaves(torch.randn(n, d, dtype=F64) * 2, dtype)
    b, b64 = leaves(torch.randn(m, d, dtype=F64) * 0.5, dtype)
    if normalize is None:  # the default is cosine
        out = sslkernels.similarity(a, b, backend=backend)
        want = expected_similarity(a64, b64, True)
    else:
        out = sslkernels.similarity(a, b, normalize=normalize, backend=backend)
        want = expected_similarity(a64, b64, normalize)
    assert out.shape == (n, m) and out.dtype == dtype
    assert_close(out, want, dtype)
    cot = torch.randn(n, m, dtype=F64)
    ga, gb = torch.autograd.grad(out, [a, b], cot.to(dtype))
    ea, eb = torch.autograd.grad(want, [a64, b64], cot)
    assert_close(ga, ea, dtype, name="grad a")
    assert_close(gb, eb, dtype, name="grad b")


# ------------------------------------------------------------------------- knn_topk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,m,d,k", [(1, 1, 7, 1), (13, 29, 7, 5), (5, 37, 33, 37), (7, 4500, 8, 20)])
def test_knn_topk(n, m, d, k, normalize, dtype, backend):
    # 4500 bank rows: more than one block of a streamed search.
    query = torch.randn(n, d, dtype=F64).to(dtype)
    bank = (torch.randn(m, d, dtype=F64) * (0.5 + torch.rand(m, 1, dtype=F64))).to(dtype)
    values, indices = sslkernels.knn_topk(query, bank, k, normalize=normalize, backend=backend)
    full = expected_similarity(query.double(), bank.double(), normalize)
    want_v, want_i = torch.topk(full, k, dim=1)
    assert values.shape == (n, k) and indices.shape == (n, k)
    assert indices.dtype == torch.int64
    assert_close(values, want_v, dtype, name="values")
    # Each returned index really has the returned similarity, and no index repeats within a row.
    assert_close(values, full.gather(1, indices), dtype, name="values at the returned indices")
    assert all(len(set(row.tolist())) == k for row in indices)
    assert (values[:, :-1] >= values[:, 1:]).all(), "values must come sorted, best first"
    if dtype == F64:
        assert torch.equal(indices, want_i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_topk_defaults(backend):
    query, bank = torch.randn(4, 6, dtype=F64), torch.randn(50, 6, dtype=F64)
    values, indices = sslkernels.knn_topk(query, bank, backend=backend)  # k = 20, cosine
    want_v, want_i = torch.topk(expected_similarity(query, bank, True), 20, dim=1)
    assert_close(values, want_v, F64)
    assert torch.equal(indices, want_i)


# ------------------------------------------------------------------------- rankme


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,rank", [(40, 10, 10), (40, 10, 3), (7, 13, 7), (1, 5, 1)])
def test_rankme(n, d, rank, dtype, backend):
    z = (torch.randn(n, rank, dtype=F64) @ torch.randn(rank, d, dtype=F64)).to(dtype)
    out = sslkernels.rankme(z, backend=backend)
    assert isinstance(out, float)
    want = expected_rankme(z)
    assert_close(torch.tensor(out), torch.tensor(want), dtype)
    assert 1.0 - 1e-3 <= out <= min(n, d) + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_rankme_eps_and_known_values(backend):
    # d equal singular values: p = 1/d, entropy log d, RankMe = d (up to eps).
    q, _ = torch.linalg.qr(torch.randn(12, 5, dtype=F64))
    assert abs(sslkernels.rankme(q * 3.0, backend=backend) - 5.0) < 1e-5
    z = torch.randn(20, 6, dtype=F64)
    assert_close(torch.tensor(sslkernels.rankme(z, eps=1e-3, backend=backend)), torch.tensor(expected_rankme(z, 1e-3)),
                 F64)
