"""Similarity and evaluation ops of shared/API.md (similarity, knn_topk, rankme) against float64 math
written here."""
import math

import numpy as np

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


# ------------------------------------------------------------------------- autocast, gradients, edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_and_knn_keep_fp32_under_autocast(backend):
    # A kNN monitor runs inside the training's precision context (e.g. bf16-mixed validation): fp32 features
    # keep fp32 similarities and the same neighbours, as the losses do.
    query, bank = torch.randn(9, 16), torch.randn(300, 16)
    sim = sslkernels.similarity(query, bank, backend=backend)
    values, indices = sslkernels.knn_topk(query, bank, 7, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim_ac = sslkernels.similarity(query, bank, backend=backend)
        values_ac, indices_ac = sslkernels.knn_topk(query, bank, 7, backend=backend)
    assert sim_ac.dtype == torch.float32 and values_ac.dtype == torch.float32
    torch.testing.assert_close(sim_ac, sim)
    torch.testing.assert_close(values_ac, values)
    assert torch.equal(indices_ac, indices)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_knn_topk_values_carry_gradients(normalize, dtype, backend):
    # API.md: every differentiable input gets its gradient. The values are similarities of the chosen rows
    # (a bank row chosen by several queries gathers all their gradients).
    query, q64 = leaves(torch.randn(6, 5, dtype=F64), dtype)
    bank, b64 = leaves(torch.randn(11, 5, dtype=F64) * (0.5 + torch.rand(11, 1, dtype=F64)), dtype)
    values, indices = sslkernels.knn_topk(query, bank, 4, normalize=normalize, backend=backend)
    want = expected_similarity(q64, b64, normalize).gather(1, indices)
    assert_close(values, want, dtype, name="values")
    cot = torch.randn(6, 4, dtype=F64)
    got = torch.autograd.grad(values, [query, bank], cot.to(dtype))
    exp = torch.autograd.grad(want, [q64, b64], cot)
    for g, e, name in zip(got, exp, ("query", "bank")):
        assert g.dtype == dtype
        assert_close(g, e, dtype, name=f"grad {name}")
    with torch.no_grad():  # the monitor's usual call: the kernel's values, no graph
        assert not sslkernels.knn_topk(query, bank, 4, normalize=normalize, backend=backend)[0].requires_grad


@pytest.mark.parametrize("k", [np.int64(3), torch.tensor(3)], ids=["numpy", "tensor"])
def test_knn_topk_takes_any_integer_k(k):
    query, bank = torch.randn(4, 6), torch.randn(10, 6)
    values, indices = sslkernels.knn_topk(query, bank, k)
    assert values.shape == indices.shape == (4, 3)


def test_knn_topk_k_errors():
    query, bank = torch.randn(4, 6), torch.randn(10, 6)
    for bad, exc in ((2.0, TypeError), (True, TypeError), (0, ValueError), (11, ValueError)):
        with pytest.raises(exc, match="^k must"):
            sslkernels.knn_topk(query, bank, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rankme_of_a_total_collapse_is_one(backend):
    # All-zero embeddings: Σs = 0; RankMe's minimum (1), not 0/0.
    assert abs(sslkernels.rankme(torch.zeros(8, 4), backend=backend) - 1.0) < 1e-5


def test_rankme_under_a_process_wide_kernel_backend():
    # rankme has one implementation (an SVD): set_backend("triton") for the losses must not break it.
    z = torch.randn(20, 6, dtype=F64)
    sslkernels.set_backend("triton")
    try:
        out = sslkernels.rankme(z)
    finally:
        sslkernels.set_backend(None)
    assert_close(torch.tensor(out), torch.tensor(expected_rankme(z)), F64)
