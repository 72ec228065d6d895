"""Sinkhorn-Knopp (Triton kernels under the interpreter, and the streamed CPU path) against the official
SwAV normalization in float64 (tests/sinkhorn_oracle.py)."""

import pytest
import torch

import sslkernels
from conftest import HAS_CUDA, assert_close
from sinkhorn_oracle import sinkhorn64

pytest.importorskip("triton")
from sslkernels.ops import dino_cpu, sinkhorn  # noqa: E402

KINDS = {"triton": sinkhorn.sinkhorn_knopp, "cpu": dino_cpu.sinkhorn_knopp}
# Triton runs on the GPU where there is one, else on CPU tensors under the interpreter.
DEVICE = {"triton": "cuda" if HAS_CUDA else "cpu", "cpu": "cpu"}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # Several row blocks, column tiles, P-splits and CPU chunks even for tiny inputs.
    monkeypatch.setattr(sinkhorn, "BLOCK_B", 4)
    monkeypatch.setattr(sinkhorn, "BLOCK_P", 16)
    monkeypatch.setattr(sinkhorn, "TARGET_PROGRAMS", 8)
    monkeypatch.setattr(dino_cpu, "CHUNK_ELEMENTS", 100)


def swav64_exp(scores, epsilon, iterations):
    """The same, literally as the official code (exp domain); float64 holds it for moderate scores."""
    q = torch.exp(scores.double() / epsilon).T
    p, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / p
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def test_oracles_agree():
    s = torch.randn(6, 11)
    assert_close(sinkhorn64(s, 0.05, 3), swav64_exp(s, 0.05, 3), torch.float64)


@pytest.mark.parametrize("kind", ["triton", "cpu"])
@pytest.mark.parametrize("B,P", [(5, 37), (1, 20), (7, 1), (13, 70), (40, 9)])
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_sinkhorn_matches_float64(kind, B, P, iterations):
    scores = torch.randn(B, P)
    got = KINDS[kind](scores.to(DEVICE[kind]), 0.05, iterations)
    assert got.shape == (B, P) and got.dtype == torch.float32
    assert_close(got, swav64_exp(scores, 0.05, iterations), torch.float32)
    if iterations:
        assert_close(got.sum(dim=1), torch.ones(B, dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("kind", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sinkhorn_dtypes(kind, dtype):
    scores = torch.randn(9, 30).to(dtype)
    got = KINDS[kind](scores.to(DEVICE[kind]), 0.1, 3)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(got, sinkhorn64(scores, 0.1, 3), dtype)


@pytest.mark.parametrize("kind", ["triton", "cpu"])
@pytest.mark.parametrize("scale", [1e2, 1e3, 1e6])
def test_sinkhorn_extreme_scores(kind, scale):
    # exp(scores/ε) would overflow float32 (and float64 for 1e6): the log domain must not. Nor may it lose
    # digits: the potentials are as large as |scores|/ε (2e7 here) and cancel it in every exponent, so they are
    # kept in float64 (in float32 an ulp of 2e7 is 2, and entries were 0.45 off at 1e6, 6e-5 at 1e2).
    scores = torch.randn(11, 45) * scale
    got = KINDS[kind](scores.to(DEVICE[kind]), 0.05, 3)
    assert_close(got.sum(dim=1), torch.ones(11, dtype=torch.float64), torch.float32)
    assert_close(got, sinkhorn64(scores, 0.05, 3), torch.float32, atol=1e-6)


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("kind", ["triton", "cpu"])
def test_sinkhorn_scores_on_a_large_offset(kind, offset):
    # Q does not see a common offset, but the rounding does: with scores ~1e4 and ε = 0.03, scores/ε ~3.3e5 has
    # an fp32 ulp of 0.03, which would land in every exponent (Q entries a few % off); log Q must be formed in
    # float64 before the potentials cancel the offset. The oracle gets the exact differences (fp32 scores ± 1e4
    # are exact in float64). −1e4: every exponent of the first pass is ~−3.3e5, far below a running maximum
    # started at 0 (exp underflows to 0: log 0).
    noise = torch.randn(11, 45)
    scores = noise + offset
    got = KINDS[kind](scores.to(DEVICE[kind]), 0.03, 3)
    assert_close(got, sinkhorn64(scores.double() - offset, 0.03, 3), torch.float32, atol=1e-6)


def test_sinkhorn_triton_non_contiguous_scores():
    scores = torch.randn(30, 9).T  # 9×30 with a column stride of 9
    assert_close(sinkhorn.sinkhorn_knopp(scores.to(DEVICE["triton"]), 0.05, 2), sinkhorn64(scores, 0.05, 2), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
def test_sinkhorn_public_api(backend):
    scores = torch.randn(8, 21)
    dev = DEVICE["triton"] if backend == "triton" else "cpu"
    got = sslkernels.sinkhorn_knopp(scores.to(dev), epsilon=0.05, iterations=3, backend=backend)
    assert_close(got, sinkhorn64(scores, 0.05, 3), torch.float32)


# ------------------------------------------------------------------------------------------ distributed


def _distributed_worker(rank, world, path):
    """One of two gloo ranks, each holding half the samples of one batch (SwAV's distributed_sinkhorn)."""
    import torch.distributed as dist

    from sslkernels import reference

    # A forked child must not enter OpenMP: the parent's thread team does not survive fork() and its first
    # parallel region would wait on it forever (seen in the full suite). One thread keeps ATen inline.
    torch.set_num_threads(1)
    sinkhorn.BLOCK_B, sinkhorn.BLOCK_P, sinkhorn.TARGET_PROGRAMS, dino_cpu.CHUNK_ELEMENTS = 4, 16, 8, 100
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        full = torch.randn(world * 5, 23, generator=torch.Generator().manual_seed(7)) * 3
        mine = full[rank * 5:(rank + 1) * 5]
        impls = dict(KINDS, torch=reference.sinkhorn_knopp)
        for iterations in (0, 1, 3):
            want = sinkhorn64(full, 0.05, iterations)[rank * 5:(rank + 1) * 5]
            for kind, impl in impls.items():
                got = impl(mine, 0.05, iterations, True, None)
                assert_close(got, want, torch.float32, name=f"{kind}, {iterations} iterations, rank {rank}")
        # DINOv2's asynchronous centre: the mean over both ranks' rows, applied on wait().
        for backend in ("triton", "torch"):
            center = torch.zeros(1, 23)
            handle = sslkernels.update_center_(center, mine, 0.9, async_op=True, backend=backend)
            assert_close(handle.wait(), 0.1 * full.double().mean(dim=0, keepdim=True), torch.float32)
        # SwaV's codes from the distributed Sinkhorn: the DINO-kernel paths against the eager one.
        crops = [mine, torch.randn(5, 23, generator=torch.Generator().manual_seed(rank))]
        want = sslkernels.functional.swav_loss(crops[:1], crops[1:], gather_distributed=True, backend="torch")
        for backend in ("triton", "auto"):
            got = sslkernels.functional.swav_loss(crops[:1], crops[1:], gather_distributed=True, backend=backend)
            assert_close(got, want, torch.float32, name=f"swav_loss {backend} rank {rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_sinkhorn_distributed_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    # fork: the ranks inherit the imported modules (a spawned interpreter re-imports torch and triton, ~10 s).
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True,
                       start_method="fork")
