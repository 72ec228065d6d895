"""torch.distributed helpers: the collectives the state ops need, no home-made transport.

Everything here is the identity when torch.distributed is not initialized or the world has one rank.
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.distributed as dist

from . import _checks as check


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def all_reduce_sum(x: torch.Tensor, group=None, async_op: bool = False):
    """Sum ``x`` over ranks in place; returns ``x`` (or ``(x, work)`` with ``async_op``)."""
    work = dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group, async_op=async_op) if is_distributed(group) else None
    return (x, work) if async_op else x


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along dim 0, rank order; no gradient."""
    if not is_distributed(group):
        return x
    out = torch.empty((world_size(group) * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def requested(gather_distributed: bool, distributed: Optional[str], group=None) -> bool:
    """Whether a contrastive loss was asked to span ranks and there are ranks to span."""
    if distributed not in (None, "ring"):
        raise ValueError(f"distributed must be None or 'ring', got {distributed!r}")
    return bool(gather_distributed or distributed) and is_distributed(group)


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def _gather_ints(values: list, device: torch.device, group) -> list:
    """Every rank's list of ints (same length everywhere), rank order: one small all-gather and a host read."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [[int(v) for v in row] for row in torch.stack(parts).tolist()]


def gather_sizes(n: int, device: torch.device, group=None) -> list:
    """Every rank's row count, rank order (one small all-gather and a host read)."""
    if not is_distributed(group):
        return [n]
    return [row[0] for row in _gather_ints([n], device, group)]


_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gather_sizes_and_dims(x: torch.Tensor, group=None, call: str = "", targets: Optional[torch.Tensor] = None):
    """(every rank's row count, every rank's feature dim) of a 2-d ``x``, rank order (one small all-gather).

    ``x``'s dtype and ``call`` (the op and the options that decide its collectives) ride along and must agree
    across ranks: a ValueError on every rank otherwise. gloo checks only byte counts, so bf16 on one rank and
    fp16 on another would read each other's bits as their own; other mismatches abort a rank or wait forever.
    ``targets`` (indices into every rank's rows of ``x``): their range rides along too, so a bad index on one
    rank is the same ValueError on every rank, not an error there while the others wait in the next collective.
    """
    if not is_distributed(group):
        if targets is not None:
            check.index_range(targets, "targets", x.shape[0])
        return [x.shape[0]], [x.shape[1]]
    dtype = _DTYPE_CODES.index(x.dtype) if x.dtype in _DTYPE_CODES else -1
    lo, hi = 0, -1  # nothing to check (no targets, or values not readable: under torch.compile / graph capture)
    if targets is not None and targets.numel() and check.values_readable():
        lo, hi = (int(v) for v in torch.stack([targets.min(), targets.max()]).tolist())
    rows = _gather_ints([x.shape[0], x.shape[1], dtype, zlib.crc32(call.encode()), lo, hi], x.device, group)
    if len({r[2] for r in rows}) != 1:
        names = [str(_DTYPE_CODES[r[2]]).replace("torch.", "") if r[2] >= 0 else "other" for r in rows]
        raise ValueError(f"the features' dtype differs across ranks: {names} (rank order); every rank must pass one")
    if len({r[3] for r in rows}) != 1:
        raise ValueError(f"the ranks made different calls (this rank: {call}); every rank must call the same loss "
                         "with the same options (symmetric, decoupled, targets, distributed='ring' or not)")
    total = sum(r[0] for r in rows)
    bad = [(i, r[4], r[5]) for i, r in enumerate(rows) if r[4] <= r[5] and (r[4] < 0 or r[5] >= total)]
    if bad:
        where = ", ".join(f"rank {i}: [{a}, {b}]" for i, a, b in bad)
        raise ValueError(f"targets must lie in [0, {total}) (every rank's keys); got values in {where}")
    return [r[0] for r in rows], [r[1] for r in rows]


def _gather_padded(x: torch.Tensor, sizes: list, group) -> torch.Tensor:
    """all_gather of rows whose count differs by rank: every rank sends max(sizes) rows (gloo and older
    NCCL need equal shapes), the padding is dropped on arrival."""
    x = x.contiguous()
    top = max(sizes)
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Forward: every rank's rows, rank order. Backward: each rank's loss saw every rank's rows, so a
    row's gradient is the sum over ranks of the incoming gradients: all-reduce, keep this rank's slice.
    (Every rank must run the backward, as with any collective in autograd.)"""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.group, ctx.offset, ctx.n = group, sum(sizes[:rank(group)]), x.shape[0]
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g[ctx.offset:ctx.offset + ctx.n], None, None


def all_gather_with_grad(x: torch.Tensor, sizes: Optional[list] = None, group=None) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, gradient flowing back to the owner.

    Ranks may hold different numbers of rows; ``sizes`` (from :func:`gather_sizes`) saves a collective
    when the caller already has them. Identity with one rank."""
    if not is_distributed(group):
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    return _AllGatherRows.apply(x, sizes, group)


@torch.no_grad()
def all_gather_uneven(x: torch.Tensor, sizes: Optional[list] = None, group=None) -> torch.Tensor:
    """:func:`all_gather_with_grad` without the gradient (labels, indices)."""
    if not is_distributed(group):
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    return _gather_padded(x, sizes, group)


def _wait(works) -> None:
    for w in works or ():
        w.wait()


class Ring:
    """The ranks of ``group`` in a ring, for blocks of rows that visit every rank (``distributed="ring"``).

    ``sizes[r]`` is rank r's row count. :meth:`circulate` passes every rank's block once around the ring,
    always to the next rank, with point-to-point sends that run while the caller computes on the block in
    hand; a rank never holds more than two blocks (the one in hand and the one arriving) and one carry.
    """

    def __init__(self, sizes: list, group=None, offsets: Optional[list] = None):
        self.group, self.sizes = group, list(sizes)
        self.world, self.rank = world_size(group), rank(group)
        # global index of each rank's first row (of its piece, for the rings of split())
        self.offsets = list(offsets) if offsets is not None else [sum(self.sizes[:r]) for r in range(self.world)]
        peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = peer((self.rank + 1) % self.world), peer((self.rank - 1) % self.world)

    def split(self, parts: int) -> list:
        """[(ring, this rank's rows)] over ``parts`` consecutive row pieces of every rank's block.

        Circulating the pieces one after another holds a piece in hand, a piece arriving and a piece's carry
        instead of whole blocks: the ring's memory on top of the rank's own rows shrinks by ``parts``."""
        out = []
        for p in range(parts):
            sizes = [m // parts + (1 if p < m % parts else 0) for m in self.sizes]
            starts = [m // parts * p + min(p, m % parts) for m in self.sizes]
            ring = Ring(sizes, self.group, [o + s for o, s in zip(self.offsets, starts)])
            out.append((ring, slice(starts[self.rank], starts[self.rank] + sizes[self.rank])))
        return out

    def _rows_like(self, x: torch.Tensor, owner: int) -> torch.Tensor:
        return torch.empty((self.sizes[owner],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)

    def _exchange(self, send, recv, tag: int) -> list:
        """Send ``send`` to the next rank and receive ``recv`` from the previous one, asynchronously.

        One tag per tensor: gloo matches messages by (peer, tag), NCCL by order, and the order of posts is
        the same on every rank, so both agree (with 2 ranks, next and previous are the same peer)."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recv)]
        return dist.batch_isend_irecv(ops) if ops else []

    def circulate(self, payload, step):
        """Visit every rank's ``payload`` (tensors with this rank's rows first: its block), this rank's first.

        ``step(owner, carry, *block)`` computes on the block of rank ``owner`` and may return a carry: a tensor
        with one row per block row (column sums, key gradients) that follows the block around the ring, one
        step behind it. ``carry`` is what the earlier ranks made of it (None on the block's first visit);
        ``step`` adds its own part into it in place and returns it. After the last step every block's carry
        has seen every rank and takes one more hop home. Returns the complete carry of this rank's own block
        (None if ``step`` returns none).

        Memory: the block in hand, the one arriving and one carry, whatever the world size. The arriving block
        travels while ``step`` computes; the carry is waited for before the step (it left the previous rank
        at the end of its step), so that no second carry-sized buffer is needed.
        """
        block = [t.contiguous() for t in payload]
        carry_in = carry_works = sending = None  # gloo: wait each work exactly once (a second wait hangs)
        for t in range(self.world):
            owner = (self.rank - t) % self.world
            after = (owner - 1) % self.world  # the next block's owner (this rank's own after the last step)
            arriving, works = [], []
            if t < self.world - 1:
                arriving = [self._rows_like(x, after) for x in block]
                works = self._exchange(block, arriving, tag=0)
            if carry_works is not None:  # our carry has left and this block's has arrived
                _wait(carry_works)
                carry_works = sending = None
            carry = step(owner, carry_in, *block)
            if carry is not None:
                sending = carry.contiguous()
                del carry
                carry_in = self._rows_like(sending, after)
                carry_works = self._exchange([sending], [carry_in], tag=len(block))
            _wait(works)
            block = arriving
        if carry_works is not None:
            _wait(carry_works)
        return carry_in
