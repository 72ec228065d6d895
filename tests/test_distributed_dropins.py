"""lightly's drop-ins and the distributed training state over real gloo processes (world sizes 2 and 3).

One process launch per world size runs every check (tests/test_distributed_losses.py's launcher):
- lightly 1.6.0's NTXentLoss / DCLLoss / DCLWLoss / BarlowTwinsLoss / VICRegLoss(gather_distributed=True) against
  ours on the same per-rank inputs: loss and input gradients per rank (lightly's GatherLayer sums gradients over
  ranks, as ours; Barlow Twins' all-reduce of the cross-correlation is differentiable there and here);
- solo-learn 1.0.2's barlow_loss_func (its in-place all-reduce: each rank's own gradient term);
- MemoryQueue.enqueue_ with uneven batches: every rank's keys in rank order, the same queue on every rank;
- update_center_ (sync and async_op + wait) and sinkhorn_knopp(gather_distributed=True) against a float64
  single-process computation over all ranks' rows (uneven batches too).
"""
import datetime

import pytest
import torch

from gloo_ranks import run_rank, skip_without_gloo, spawn_ranks

WORLDS = {2: [5, 5], 3: [4, 6, 3]}  # rows per rank for the queue: even, then uneven


def _close(actual, expected, what):
    expected = expected.double()
    atol = 1e-5 * max(float(expected.abs().max()), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _lightly_vs_ours(rank, world, g):
    """Same inputs on both sides; lightly's GatherLayer and ours are collectives, so every rank runs both."""
    import lightly.loss as L
    import sslkernels.nn as snn

    n, d = 6, 16  # lightly's eye_rank / labels assume equal batches on every rank
    cases = [("NTXentLoss", lambda: L.NTXentLoss(0.5, gather_distributed=True),
              lambda: snn.NTXentLoss(0.5, gather_distributed=True)),
             ("DCLLoss", lambda: L.DCLLoss(0.1, gather_distributed=True),
              lambda: snn.DCLLoss(0.1, gather_distributed=True)),
             ("DCLWLoss", lambda: L.DCLWLoss(0.1, sigma=0.5, gather_distributed=True),
              lambda: snn.DCLWLoss(0.1, sigma=0.5, gather_distributed=True)),
             # lightly averages the ranks' cross-correlations (a differentiable all-reduce) ...
             ("BarlowTwinsLoss", lambda: L.BarlowTwinsLoss(0.05, gather_distributed=True),
              lambda: snn.BarlowTwinsLoss(0.05, gather_distributed=True)),
             # ... and takes VICReg's variance and covariance over every rank's rows, the invariance locally
             ("VICRegLoss", lambda: L.VICRegLoss(gather_distributed=True), lambda: snn.VICRegLoss(gather_distributed=True)),
             ("VICRegLoss eps", lambda: L.VICRegLoss(gather_distributed=True, eps=1e-2),
              lambda: snn.VICRegLoss(gather_distributed=True, eps=1e-2))]
    for name, theirs, ours in cases:
        # unnormalized inputs of varied norms: both modules normalize inside
        x0 = torch.randn(world, n, d, generator=g)[rank] * 3
        x1 = torch.randn(world, n, d, generator=g)[rank] * 3
        got = []
        for make in (theirs, ours):
            a, b = x0.clone().requires_grad_(), x1.clone().requires_grad_()
            loss = make()(a, b)
            loss.backward()
            got.append((loss.detach(), a.grad, b.grad))
        (lw, la, lb), (ow, oa, ob) = got
        assert torch.isfinite(ow) and torch.isfinite(oa).all() and torch.isfinite(ob).all(), name
        _close(ow, lw, f"{name} loss, rank {rank}")
        _close(oa, la, f"{name} grad of out0, rank {rank}")
        _close(ob, lb, f"{name} grad of out1, rank {rank}")
        # the gather matters: the local (single-rank) loss differs
        local = dict(NTXentLoss=L.NTXentLoss(0.5), DCLLoss=L.DCLLoss(0.1), DCLWLoss=L.DCLWLoss(0.1),
                     BarlowTwinsLoss=L.BarlowTwinsLoss(0.05), VICRegLoss=L.VICRegLoss(),
                     **{"VICRegLoss eps": L.VICRegLoss(eps=1e-2)})[name](x0, x1)
        assert abs(float(local) - float(ow)) > 1e-4, f"{name}: gathered loss equals the local one"


def _solo_barlow(rank, world, g):
    """solo-learn 1.0.2's barlow_loss_func all-reduces the cross-correlation: ours per rank, loss and gradients."""
    import importlib.util
    import os

    from sslkernels.integrations import solo_learn as ours

    spec = importlib.util.find_spec("solo")  # the loss file alone: solo/__init__.py imports its training stack
    if spec is None:
        return
    path = os.path.join(list(spec.submodule_search_locations)[0], "losses", "barlow.py")
    loader = importlib.util.spec_from_file_location("_solo_barlow", path)
    theirs = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(theirs)
    z1, z2 = (torch.randn(world, 7, 5, generator=g)[rank] * 2 for _ in range(2))
    got = []
    for fn in (theirs.barlow_loss_func, ours.barlow_loss_func):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fn(a, b, lamb=0.05)
        loss.backward()
        got.append((loss.detach(), a.grad, b.grad))
    for what, mine, want in zip(("loss", "grad of z1", "grad of z2"), got[1], got[0]):
        _close(mine, want, f"solo barlow_loss_func {what}, rank {rank}")
    import sslkernels

    local = 0.025 * sslkernels.barlow_twins_loss(z1, z2, 0.05)  # this rank's rows alone
    assert abs(float(local) - float(got[1][0])) > 1e-4, "the ranks' cross-correlations were not averaged"


def _state(rank, world, g):
    import torch.distributed as dist
    import sslkernels.functional as SF
    from sslkernels.state import MemoryQueue

    sizes = WORLDS[world]
    off, n, total = sum(sizes[:rank]), sizes[rank], sum(sizes)

    def everyone(tensor):
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return parts

    # MemoryQueue: two steps of uneven batches, wrapping around a queue smaller than two global batches
    size, d = total + 3, 8
    q = MemoryQueue(size, d)
    q.queue.copy_(torch.zeros(size, d))  # the random init differs by rank; start from a known queue
    expect = torch.zeros(size, d, dtype=torch.float64)
    ptr = 0
    for step in range(2):
        keys = torch.randn(total, d, generator=g, dtype=torch.float64)  # all ranks' keys, rank order
        q.enqueue_(keys[off:off + n].float(), uneven_batches=True)
        for row in keys:
            expect[ptr] = row
            ptr = (ptr + 1) % size
        _close(q.queue, expect, f"queue after step {step}, rank {rank}")
        assert int(q.ptr) == ptr, f"ptr {int(q.ptr)} != {ptr} on rank {rank}"
        for r, other in enumerate(everyone(q.queue)):
            assert torch.equal(other, q.queue), f"rank {r}'s queue differs from rank {rank}'s"

    # Equal batches take the default path (one all-gather, no host read): every rank enqueues 2 rows.
    q2 = MemoryQueue(5, d)
    q2.queue.zero_()
    eq = torch.randn(2 * world, d, generator=g, dtype=torch.float64)
    q2.enqueue_(eq[2 * rank:2 * rank + 2].float())
    expect2 = torch.zeros(5, d, dtype=torch.float64)
    for i, row in enumerate(eq):
        expect2[i % 5] = row
    _close(q2.queue, expect2, f"equal-batch queue, rank {rank}")
    assert int(q2.ptr) == (2 * world) % 5

    # update_center_: the mean over every rank's rows, uneven batches included
    p = 23
    full = torch.randn(total, p, generator=g, dtype=torch.float64) * 3
    mine = full[off:off + n].float()
    start = torch.randn(1, p, generator=g, dtype=torch.float64)
    want = 0.9 * start + 0.1 * full.mean(dim=0, keepdim=True)
    for backend in ("auto", "torch"):
        center = start.float().clone()
        SF.update_center_(center, mine, 0.9, backend=backend)
        _close(center, want, f"update_center_ {backend}, rank {rank}")
        center = start.float().clone()
        handle = SF.update_center_(center, mine, 0.9, async_op=True, backend=backend)
        _close(center, start, f"update_center_ async before wait, {backend}, rank {rank}")
        handle.wait()
        _close(center, want, f"update_center_ async {backend}, rank {rank}")

    # sinkhorn: each rank its own rows' assignments, B counting every rank's rows (equal and uneven batches)
    m = 5
    even = torch.randn(world * m, p, generator=g, dtype=torch.float64) * 3
    for iterations in (0, 1, 3):
        for rows, lo, hi in ((even, rank * m, (rank + 1) * m), (full, off, off + n)):
            want = SF.sinkhorn_knopp(rows, epsilon=0.05, iterations=iterations, backend="torch")[lo:hi]
            for backend in ("auto", "torch"):
                got = SF.sinkhorn_knopp(rows[lo:hi].float(), epsilon=0.05, iterations=iterations,
                                        gather_distributed=True, backend=backend)
                _close(got, want, f"sinkhorn {backend}, {iterations} iterations, {hi - lo} rows, rank {rank}")


def _worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(4321)  # same stream on every rank: each takes its own slice
    _lightly_vs_ours(rank, world, g)
    _solo_barlow(rank, world, g)
    _state(rank, world, g)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_lightly_ntxent_dcl_dclw_and_state_across_ranks(world, tmp_path):
    """lightly.loss.NTXentLoss / DCLLoss / DCLWLoss(gather_distributed=True) per rank, MemoryQueue,
    update_center_ and sinkhorn_knopp across ranks."""
    skip_without_gloo()
    pytest.importorskip("lightly")
    spawn_ranks(__file__, world, tmp_path)


if __name__ == "__main__":
    run_rank(_worker)
