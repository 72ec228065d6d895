"""gather_distributed=True on the contrastive losses, over real gloo processes (world sizes 2 and 3).

Every rank builds the same global batch from one seed, keeps its own rows (float32) and compares with the
single-process float64 oracle (backend="torch") over the whole batch:
- loss values: the rank's per-row losses ("none") are the oracle's rows of that rank, "mean" / "sum" their
  mean / sum over the LOCAL rows;
- gradients: with equal batches (world 2) backward(rank mean) gives each rank's rows world_size × the oracle's
  global-mean gradient (the lightly / OpenCLIP convention; DDP then averages parameter gradients back to the
  single-process step). With unequal batches (world 3) "mean over local rows" is not a global mean, so the
  test weights each rank's mean by n_rank / N before backward: then every row gets exactly the global-mean
  gradient and the ranks' scalar (temperature / logit_scale) gradients sum to the oracle's.
"""

import pytest
import torch

from gloo_ranks import run_rank, skip_without_gloo, spawn_ranks

WORLDS = {2: [5, 5], 3: [4, 6, 3]}  # rows per rank: even, then uneven


def _close(actual, expected, what):
    expected = expected.double()
    atol = 1e-5 * max(float(expected.abs().max()), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _worker(rank: int, world: int, init_file: str) -> None:  # noqa: C901 (one process runs every case)
    import torch.distributed as dist
    import torch.nn.functional as F
    import sslkernels.functional as SF

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    sizes = WORLDS[world]
    even = len(set(sizes)) == 1
    total, off, n = sum(sizes), sum(sizes[:rank]), sizes[rank]
    sl = slice(off, off + n)
    weight, factor = (1.0, float(world)) if even else (n / total, 1.0)
    g = torch.Generator().manual_seed(1234)
    d = 16

    def feats(rows):
        return F.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1)

    def leaves(*globals_):
        """(float64 global leaves for the oracle, float32 local leaves for this rank)."""
        ref = [x.clone().requires_grad_() for x in globals_]
        mine = [x[sl].float().detach().requires_grad_() for x in globals_]
        return ref, mine

    def check(name, local_fn, global_fn, row_index, ref_leaves, my_leaves, scalars=()):
        """local_fn(reduction) on this rank vs global_fn(reduction) on the oracle; row_index picks this
        rank's rows out of the oracle's per-row losses; scalars: (ref tensor, my tensor) pairs."""
        rows = global_fn("none")
        mine = local_fn("none")
        assert torch.isfinite(mine).all(), f"{name}: non-finite rows"
        _close(mine, rows[row_index].detach(), f"{name} rows")
        _close(local_fn("sum"), rows[row_index].sum().detach(), f"{name} sum")
        loss = local_fn("mean")
        _close(loss, rows[row_index].mean().detach(), f"{name} mean")
        global_fn("mean").backward()
        (loss * weight).backward()
        for i, (r, m) in enumerate(zip(ref_leaves, my_leaves)):
            assert m.grad is not None and torch.isfinite(m.grad).all(), f"{name} grad {i}"
            _close(m.grad, factor * r.grad[sl], f"{name} grad of input {i}")
        for i, (r, m) in enumerate(scalars):
            # DDP would average these over ranks: with the weights, their sum is the global gradient.
            total_grad = m.grad.detach().double().clone()
            dist.all_reduce(total_grad)
            if even:
                total_grad /= world  # unweighted ranks: DDP's average is the global-mean gradient
            _close(total_grad, r.grad, f"{name} grad of scalar {i}")

    gd = dict(gather_distributed=True)
    # info_nce, paired rows, plain and DCL
    for decoupled in (False, True):
        (q, k), (mq, mk) = leaves(feats(total), feats(total))
        check(f"info_nce decoupled={decoupled}",
              lambda red: SF.info_nce(mq, mk, 0.1, decoupled=decoupled, reduction=red, **gd),
              lambda red: SF.info_nce(q, k, 0.1, decoupled=decoupled, reduction=red, backend="torch"),
              sl, [q, k], [mq, mk])
    # info_nce, explicit global targets, ranks holding other key counts than query counts
    ksizes = [s + 2 for s in sizes]
    kg = feats(sum(ksizes))
    targets = torch.randint(0, sum(ksizes), (total,), generator=g)
    q = feats(total).requires_grad_()
    k = kg.clone().requires_grad_()
    koff = sum(ksizes[:rank])
    mq = q.detach()[sl].float().requires_grad_()
    mk = kg[koff:koff + ksizes[rank]].float().requires_grad_()
    ref_rows = SF.info_nce(q, k, 0.1, targets=targets, reduction="none", backend="torch")
    mine = SF.info_nce(mq, mk, 0.1, targets=targets[sl], reduction="none", **gd)
    _close(mine, ref_rows[sl].detach(), "info_nce targets rows")
    SF.info_nce(q, k, 0.1, targets=targets, backend="torch").backward()
    (SF.info_nce(mq, mk, 0.1, targets=targets[sl], **gd) * weight).backward()
    _close(mq.grad, factor * q.grad[sl], "info_nce targets query grad")
    _close(mk.grad, factor * k.grad[koff:koff + ksizes[rank]], "info_nce targets key grad")
    # symmetric info_nce: learnable 0-d τ, then per-anchor τ
    (q, k), (mq, mk) = leaves(feats(total), feats(total))
    t, mt = torch.tensor(0.2, dtype=torch.float64, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    check("info_nce symmetric", lambda red: SF.info_nce(mq, mk, mt, symmetric=True, reduction=red, **gd),
          lambda red: SF.info_nce(q, k, t, symmetric=True, reduction=red, backend="torch"), sl, [q, k], [mq, mk],
          [(t, mt)])
    (q, k, tv), (mq, mk, mtv) = leaves(feats(total), feats(total),
                                       0.1 + 0.2 * torch.rand(total, generator=g, dtype=torch.float64))
    check("info_nce symmetric per-anchor τ",
          lambda red: SF.info_nce(mq, mk, mtv, symmetric=True, reduction=red, **gd),
          lambda red: SF.info_nce(q, k, tv, symmetric=True, reduction=red, backend="torch"),
          sl, [q, k, tv], [mq, mk, mtv])
    # clip_loss with a learnable (already exponentiated) logit_scale
    (i, tx), (mi, mtx) = leaves(feats(total), feats(total))
    s, ms = torch.tensor(14.0, dtype=torch.float64, requires_grad=True), torch.tensor(14.0, requires_grad=True)
    check("clip_loss", lambda red: SF.clip_loss(mi, mtx, ms, reduction=red, **gd),
          lambda red: SF.clip_loss(i, tx, s, reduction=red, backend="torch"), sl, [i, tx], [mi, mtx], [(s, ms)])
    # nt_xent: this rank's rows are its z1 rows and its z2 rows of Z = cat(z1, z2)
    for decoupled in (False, True):
        (z1, z2), (m1, m2) = leaves(feats(total), feats(total))
        idx = torch.cat([torch.arange(off, off + n), total + torch.arange(off, off + n)])
        check(f"nt_xent decoupled={decoupled}",
              lambda red: SF.nt_xent(m1, m2, 0.5, decoupled=decoupled, reduction=red, **gd),
              lambda red: SF.nt_xent(z1, z2, 0.5, decoupled=decoupled, reduction=red, backend="torch"),
              idx, [z1, z2], [m1, m2])
    # moco_loss: per-rank (own key positive, the shared queue as negatives)
    (q, k), (mq, mk) = leaves(feats(total), feats(total))
    queue = feats(7)
    check("moco_loss", lambda red: SF.moco_loss(mq, mk, queue.float(), 0.2, reduction=red, **gd),
          lambda red: SF.moco_loss(q, k, queue, 0.2, reduction=red, backend="torch"), sl, [q, k], [mq, mk])
    # supcon_loss: every label twice or more globally, positives spread over ranks
    labels = torch.arange(total) % (total // 2)
    labels = labels[torch.randperm(total, generator=g)]
    (f,), (mf,) = leaves(feats(total))
    check("supcon_loss", lambda red: SF.supcon_loss(mf, labels[sl], 0.1, reduction=red, **gd),
          lambda red: SF.supcon_loss(f, labels, 0.1, reduction=red, backend="torch"), sl, [f], [mf])

    # process_group=: a subgroup of the first and last ranks spans only their rows (the rest stay out)
    members = [0, world - 1]
    sub = dist.new_group(members)  # every rank takes part in creating it
    qa, ka = feats(total), feats(total)
    if rank in members:
        rows_of = [torch.arange(sum(sizes[:m]), sum(sizes[:m + 1])) for m in members]
        q, k = qa[torch.cat(rows_of)].requires_grad_(), ka[torch.cat(rows_of)].requires_grad_()
        mine = slice(0, n) if rank == members[0] else slice(sizes[0], sizes[0] + n)
        mq, mk = q.detach()[mine].float().requires_grad_(), k.detach()[mine].float().requires_grad_()
        ref_rows = SF.info_nce(q, k, 0.1, symmetric=True, reduction="none", backend="torch")
        _close(SF.info_nce(mq, mk, 0.1, symmetric=True, reduction="none", gather_distributed=True,
                           process_group=sub), ref_rows[mine].detach(), "process_group rows")
        ref_rows.sum().backward()
        SF.info_nce(mq, mk, 0.1, symmetric=True, reduction="sum", gather_distributed=True,
                    process_group=sub).backward()
        _close(mq.grad, q.grad[mine], "process_group query grad (sums: no factor)")
        _close(mk.grad, k.grad[mine], "process_group key grad (sums: no factor)")

    # what does not span ranks says so
    x = torch.randn(n, d)
    for call in (lambda: SF.info_nce(x, x, distributed="ring"),
                 lambda: SF.siglip_loss(x, x, 10.0, -10.0, gather_distributed=True)):
        try:
            call()
        except NotImplementedError:
            pass
        else:
            raise AssertionError("expected NotImplementedError")
    try:
        SF.info_nce(x, x, targets=torch.full((n,), total, dtype=torch.long), **gd)
    except ValueError as err:
        assert "targets" in str(err)
    else:
        raise AssertionError("targets beyond the global keys must raise ValueError")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_gathered_losses_match_single_process(world, tmp_path):
    skip_without_gloo()
    spawn_ranks(__file__, world, tmp_path)


if __name__ == "__main__":
    run_rank(_worker)
