"""gather_distributed=True and distributed="ring" on the contrastive losses, over real gloo processes
(world sizes 2 and 3).

Every rank builds the same global batch from one seed, keeps its own rows (float32) and compares with the
single-process float64 oracle (backend="torch") over the whole batch:
- loss values: the rank's per-row losses ("none") are the oracle's rows of that rank, "mean" / "sum" their
  mean / sum over the LOCAL rows;
- gradients: with equal batches (world 2) backward(rank mean) gives each rank's rows world_size × the oracle's
  global-mean gradient (the lightly / OpenCLIP convention; DDP then averages parameter gradients back to the
  single-process step). With unequal batches (world 3) "mean over local rows" is not a global mean, so the
  test weights each rank's mean by n_rank / N before backward: then every row gets exactly the global-mean
  gradient and the ranks' scalar (temperature / logit_scale) gradients sum to the oracle's.

With SSLKERNELS_TEST_DIST_BACKEND=triton in the ranks' environment the same checks run the losses with
backend="triton": the block engine's Triton path (in Triton's interpreter on these CPU tensors) for the ring
and the gathered NT-Xent / SupCon / SigLIP, the single-process kernels for the gathered info_nce / clip_loss;
fp16 then stands in for bf16 (the interpreter's tl.dot is wrong on bf16 operands).
"""
import os

import pytest
import torch

from gloo_ranks import run_rank, skip_without_gloo, spawn_ranks

WORLDS = {2: [5, 5], 3: [4, 6, 1]}  # rows per rank: even, then uneven with a lone row
BACKEND_ENV = "SSLKERNELS_TEST_DIST_BACKEND"
MIN_PIECE_ENV = "SSLKERNELS_TEST_MIN_PIECE"


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
    backend = os.environ.get(BACKEND_ENV) or None
    kernels = backend == "triton"
    from sslkernels.ops import contrastive_blockwise
    assert contrastive_blockwise.use_kernels(backend, torch.zeros(1, 4), "nt_xent") == kernels
    if os.environ.get(MIN_PIECE_ENV):
        # Ring pieces as small as the torch path's: every rank's block travels in several pieces here too.
        from sslkernels.ops import contrastive_blockwise_triton
        contrastive_blockwise_triton.Blocks.min_piece = int(os.environ[MIN_PIECE_ENV])
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
        if not kernels:  # the reductions are the same host code on every path
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

    def cases(gd, how):
        # info_nce, paired rows, plain and DCL
        for decoupled in (False, True):
            (q, k), (mq, mk) = leaves(feats(total), feats(total))
            check(f"{how} info_nce decoupled={decoupled}",
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
        _close(mine, ref_rows[sl].detach(), f"{how} info_nce targets rows")
        SF.info_nce(q, k, 0.1, targets=targets, backend="torch").backward()
        (SF.info_nce(mq, mk, 0.1, targets=targets[sl], **gd) * weight).backward()
        _close(mq.grad, factor * q.grad[sl], f"{how} info_nce targets query grad")
        _close(mk.grad, factor * k.grad[koff:koff + ksizes[rank]], f"{how} info_nce targets key grad")
        # symmetric info_nce: learnable 0-d τ, then per-anchor τ
        (q, k), (mq, mk) = leaves(feats(total), feats(total))
        t, mt = torch.tensor(0.2, dtype=torch.float64, requires_grad=True), torch.tensor(0.2, requires_grad=True)
        check(f"{how} info_nce symmetric", lambda red: SF.info_nce(mq, mk, mt, symmetric=True, reduction=red, **gd),
              lambda red: SF.info_nce(q, k, t, symmetric=True, reduction=red, backend="torch"), sl, [q, k], [mq, mk],
              [(t, mt)])
        (q, k, tv), (mq, mk, mtv) = leaves(feats(total), feats(total),
                                           0.1 + 0.2 * torch.rand(total, generator=g, dtype=torch.float64))
        check(f"{how} info_nce symmetric per-anchor τ",
              lambda red: SF.info_nce(mq, mk, mtv, symmetric=True, reduction=red, **gd),
              lambda red: SF.info_nce(q, k, tv, symmetric=True, reduction=red, backend="torch"),
              sl, [q, k, tv], [mq, mk, mtv])
        # clip_loss with a learnable (already exponentiated) logit_scale
        (i, tx), (mi, mtx) = leaves(feats(total), feats(total))
        s, ms = torch.tensor(14.0, dtype=torch.float64, requires_grad=True), torch.tensor(14.0, requires_grad=True)
        check(f"{how} clip_loss", lambda red: SF.clip_loss(mi, mtx, ms, reduction=red, **gd),
              lambda red: SF.clip_loss(i, tx, s, reduction=red, backend="torch"), sl, [i, tx], [mi, mtx], [(s, ms)])
        # nt_xent: this rank's rows are its z1 rows and its z2 rows of Z = cat(z1, z2)
        for decoupled in (False, True):
            (z1, z2), (m1, m2) = leaves(feats(total), feats(total))
            idx = torch.cat([torch.arange(off, off + n), total + torch.arange(off, off + n)])
            check(f"{how} nt_xent decoupled={decoupled}",
                  lambda red: SF.nt_xent(m1, m2, 0.5, decoupled=decoupled, reduction=red, **gd),
                  lambda red: SF.nt_xent(z1, z2, 0.5, decoupled=decoupled, reduction=red, backend="torch"),
                  idx, [z1, z2], [m1, m2])
        # moco_loss: per-rank (own key positive, the shared queue as negatives); no block engine
        if not kernels:
            (q, k), (mq, mk) = leaves(feats(total), feats(total))
            queue = feats(7)
            check(f"{how} moco_loss", lambda red: SF.moco_loss(mq, mk, queue.float(), 0.2, reduction=red, **gd),
                  lambda red: SF.moco_loss(q, k, queue, 0.2, reduction=red, backend="torch"), sl, [q, k], [mq, mk])
        # supcon_loss: every label twice or more globally, positives spread over ranks
        labels = torch.arange(total) % (total // 2)
        labels = labels[torch.randperm(total, generator=g)]
        (f,), (mf,) = leaves(feats(total))
        check(f"{how} supcon_loss", lambda red: SF.supcon_loss(mf, labels[sl], 0.1, reduction=red, **gd),
              lambda red: SF.supcon_loss(f, labels, 0.1, reduction=red, backend="torch"), sl, [f], [mf])

        # siglip_loss: learnable scale and bias; the other ranks' texts are all negatives
        (i, tx), (mi, mtx) = leaves(feats(total), feats(total))
        s, ms = torch.tensor(10.0, dtype=torch.float64, requires_grad=True), torch.tensor(10.0, requires_grad=True)
        b, mb = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
        check(f"{how} siglip_loss", lambda red: SF.siglip_loss(mi, mtx, ms, mb, reduction=red, **gd),
              lambda red: SF.siglip_loss(i, tx, s, b, reduction=red, backend="torch"), sl, [i, tx], [mi, mtx],
              [(s, ms), (b, mb)])

    half, half_tol = (torch.float16, 1e-3) if kernels else (torch.bfloat16, 1e-2)
    for gd, how in ((dict(gather_distributed=True), "gather"), (dict(distributed="ring"), "ring")):
        if backend is not None:
            gd = dict(gd, backend=backend)
        cases(gd, how)
        # bf16 features (what CLIP trains in): fp32 accumulation, bf16 gradients, against the oracle on the
        # same bf16 values (fp16 under the interpreter)
        for name, fn in (("clip_loss", lambda a, b, **kw: SF.clip_loss(a, b, 14.0, **kw)),
                         ("nt_xent", lambda a, b, **kw: SF.nt_xent(a, b, 0.5, **kw)),
                         ("siglip_loss", lambda a, b, **kw: SF.siglip_loss(a, b, 10.0, -5.0, **kw))):
            xa, xb = feats(total).to(half).double(), feats(total).to(half).double()
            ra, rb = xa.clone().requires_grad_(), xb.clone().requires_grad_()
            ma, mb = xa[sl].to(half).requires_grad_(), xb[sl].to(half).requires_grad_()
            rows = fn(ra, rb, reduction="none", backend="torch")
            idx = sl if name != "nt_xent" else torch.cat([torch.arange(off, off + n), total + torch.arange(off, off + n)])
            _close(fn(ma, mb, reduction="none", **gd), rows[idx].detach(), f"{how} {name} {half} rows")
            rows.mean().backward()
            (fn(ma, mb, **gd) * weight).backward()
            for r, m in ((ra, ma), (rb, mb)):
                assert m.grad.dtype == half, f"{how} {name}: gradient dtype {m.grad.dtype}"
                exp = factor * r.grad[sl].double()
                torch.testing.assert_close(m.grad.double(), exp, rtol=half_tol, atol=half_tol * float(exp.abs().max()),
                                           msg=lambda msg: f"{how} {name} {half} grad: {msg}")
        # symmetric info_nce with a learnable per-anchor τ (fp32, as a master weight) on half features: bf16 and
        # fp16 (fp16 alone under the interpreter). The oracle takes the same rounded features and τ, so the loss
        # rows and τ's (fp32) gradient hold to fp32's tolerance; only the features' gradients come back in the
        # half dtype (its tolerance). Folding τ into the queries in the half dtype before the gather was ~1e-3
        # (bf16) / ~1e-4 (fp16) off, relative, in the rows and in τ's gradient.
        for hd, hd_tol in ((half, half_tol),) + (() if kernels else ((torch.float16, 1e-3),)):
            xq, xk = feats(total).to(hd).double(), feats(total).to(hd).double()
            tv = (0.05 + 0.1 * torch.rand(total, generator=g, dtype=torch.float64)).float().double()
            rq, rk, rt = (x.clone().requires_grad_() for x in (xq, xk, tv))
            mq, mk = xq[sl].to(hd).requires_grad_(), xk[sl].to(hd).requires_grad_()
            mt = tv[sl].float().requires_grad_()
            what = f"{how} info_nce symmetric per-anchor τ {hd}"
            rows = SF.info_nce(rq, rk, rt, symmetric=True, reduction="none", backend="torch")
            _close(SF.info_nce(mq, mk, mt, symmetric=True, reduction="none", **gd), rows[sl].detach(), f"{what} rows")
            rows.mean().backward()
            (SF.info_nce(mq, mk, mt, symmetric=True, **gd) * weight).backward()
            assert mt.grad.dtype == torch.float32, f"{what}: τ gradient dtype {mt.grad.dtype}"
            _close(mt.grad, factor * rt.grad[sl], f"{what} τ grad")
            for r, m in ((rq, mq), (rk, mk)):
                assert m.grad.dtype == hd, f"{what}: gradient dtype {m.grad.dtype}"
                exp = factor * r.grad[sl].double()
                torch.testing.assert_close(m.grad.double(), exp, rtol=hd_tol, atol=hd_tol * float(exp.abs().max()),
                                           msg=lambda msg: f"{what} grad: {msg}")
            # clip_loss with the logit_scale itself in the half dtype (a bf16 / fp16 model's): the gathered path
            # inverted it in that dtype (1/s rounded: ~1e-2 (bf16) off in the rows; fp16 τ-gradients overflow).
            s_h = torch.tensor(97.3).to(hd)
            rs, ms = s_h.double().requires_grad_(), s_h.clone().requires_grad_()
            what = f"{how} clip_loss logit_scale {hd}"
            rows = SF.clip_loss(rq.detach(), rk.detach(), rs, reduction="none", backend="torch")
            _close(SF.clip_loss(mq.detach(), mk.detach(), ms, reduction="none", **gd), rows[sl].detach(), f"{what} rows")
            rows.mean().backward()
            (SF.clip_loss(mq.detach(), mk.detach(), ms, **gd) * weight).backward()
            total_grad, top = ms.grad.double().clone(), ms.grad.double().abs()  # each rank's is rounded to hd
            dist.all_reduce(total_grad)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            if even:
                total_grad, top = total_grad / world, top / world
            torch.testing.assert_close(total_grad, rs.grad, rtol=hd_tol, atol=hd_tol * float(top),
                                       msg=lambda msg: f"{what} grad: {msg}")

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
        ref_rows.sum().backward()
        for gd, how in ((dict(gather_distributed=True), "gather"), (dict(distributed="ring"), "ring")):
            gd = dict(gd, backend=backend)
            mq.grad = mk.grad = None
            _close(SF.info_nce(mq, mk, 0.1, symmetric=True, reduction="none", process_group=sub, **gd),
                   ref_rows[mine].detach(), f"{how} process_group rows")
            SF.info_nce(mq, mk, 0.1, symmetric=True, reduction="sum", process_group=sub, **gd).backward()
            _close(mq.grad, q.grad[mine], f"{how} process_group query grad (sums: no factor)")
            _close(mk.grad, k.grad[mine], f"{how} process_group key grad (sums: no factor)")

    if kernels:
        dist.destroy_process_group()  # the rest checks the argument checks, which no backend changes
        return
    # bad input across ranks: every rank raises the same ValueError (no rank left waiting in a collective)
    x = torch.randn(n, d)
    for gd in (dict(gather_distributed=True), dict(distributed="ring")):
        try:
            SF.info_nce(x, x, targets=torch.full((n,), total, dtype=torch.long), **gd)
        except ValueError as err:
            assert "targets" in str(err)
        else:
            raise AssertionError("targets beyond the global keys must raise ValueError")
        # ... and on one rank only: that rank's range rides along with the row counts, so every rank raises the
        # same error (not that rank alone while the others wait in the next collective)
        try:
            SF.info_nce(x, x, targets=torch.full((n,), total if rank == 0 else 0, dtype=torch.long), **gd)
        except ValueError as err:
            assert f"targets must lie in [0, {total})" in str(err) and f"rank 0: [{total}, {total}]" in str(err), err
        else:
            raise AssertionError("a bad target on rank 0 must raise ValueError on every rank")
        y = torch.randn(n, d + rank)  # rank 0 has d, the others more
        try:
            SF.clip_loss(y, y, 10.0, **gd)
        except ValueError as err:
            assert "feature dimension" in str(err), err
        else:
            raise AssertionError("a feature dim that differs across ranks must raise ValueError")
        # bf16 on rank 0, fp16 elsewhere: gloo would move the bytes and each rank read the other's as its own
        h = torch.randn(n, d).to(torch.bfloat16 if rank == 0 else torch.float16)
        try:
            SF.info_nce(h, h, **gd)
        except ValueError as err:
            assert "dtype differs across ranks: ['bfloat16', 'float16'" in str(err), err
        else:
            raise AssertionError("a dtype that differs across ranks must raise ValueError")
        try:  # options that change the collectives (symmetric on rank 0 only) would leave a rank waiting
            SF.info_nce(x, x, symmetric=rank == 0, **gd)
        except ValueError as err:
            assert "different calls" in str(err), err
        else:
            raise AssertionError("ranks calling with different options must raise ValueError")
    try:  # the ring on rank 0, the all-gather elsewhere
        SF.info_nce(x, x, **(dict(distributed="ring") if rank == 0 else dict(gather_distributed=True)))
    except ValueError as err:
        assert "different calls" in str(err), err
    else:
        raise AssertionError("the ring on one rank and the all-gather on another must raise ValueError")
    # labels of another integer dtype on one rank are the same labels
    lab = torch.arange(n) % 2
    SF.supcon_loss(torch.randn(n, d), lab.int() if rank == 0 else lab, gather_distributed=True)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_gathered_losses_match_single_process(world, tmp_path):
    skip_without_gloo()
    spawn_ranks(__file__, world, tmp_path)


def test_triton_block_engine_matches_single_process(tmp_path, monkeypatch):
    """The same checks with backend="triton" on the uneven world (a rank with one row: blocks of one key)."""
    skip_without_gloo()
    pytest.importorskip("triton")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the ranks' CPU tensors, on a GPU machine too
    spawn_ranks(__file__, 3, tmp_path, timeout=240)


def test_triton_ring_in_several_pieces(tmp_path, monkeypatch):
    """backend="triton" on the even world with one-row ring pieces: 5 pieces per rank's block, each carrying
    its own column statistics and key gradients (the default 8192-key pieces leave tiny batches whole)."""
    skip_without_gloo()
    pytest.importorskip("triton")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv(MIN_PIECE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spawn_ranks(__file__, 2, tmp_path, timeout=240)


if __name__ == "__main__":
    run_rank(_worker)
