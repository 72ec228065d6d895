"""Memory-efficient contrastive losses for CPU tensors (what backend="auto" runs off the GPU).

The N×M logits are never held whole: rows are processed in chunks of ``c`` queries, so peak extra
memory is O(c·M) with c·M ≈ CHUNK_ELEMENTS, whatever N is.

* Scalar losses ("mean"/"sum"): the upstream gradient is one number, so each chunk computes its input
  gradients during the forward while its logits are hot (dQ = dS·K, dK += dSᵀ·Q), and the backward only
  scales them — no recomputation, about the same matmul work as eager autograd.
* ``reduction="none"``: the upstream gradient is a vector known only in the backward, so each chunk runs
  inside a checkpoint and the backward recomputes it.

Temperatures are folded into the queries first: logits_ij = (q_i / τ_i)·k_j. Per-anchor temperatures,
the column (key-side) loss of symmetric losses and the τ / logit_scale gradients then all come from one
row computation plus autograd through that scaling.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends import register
from ..reference import reduce
from ._common import first_order_only, scaled_rows

CHUNK_ELEMENTS = 1 << 21  # 8 MiB of fp32 logits per chunk: past this, bigger chunks stop paying (N=8192, D=128)


def _chunk_rows(m: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(m, 1))


def _inverse(t):
    # A half-precision temperature or logit_scale is inverted in fp32: its own dtype would round 1/τ (6e-4 off in
    # bf16), and clip_loss's double inverse would pass s²·∂L/∂s through fp16 (inf above s = 100, upstream 6.5).
    return 1.0 / (t.to(torch.promote_types(t.dtype, torch.float32)) if isinstance(t, torch.Tensor) else t)


# A chunk function maps (start, stop, weights, want_grads, *tensors) to (row losses [stop-start],
# gradient pieces). A piece is (input index, row slice or None for the whole tensor, value) and holds
# d(Σ_i weights_i·loss_i)/d(input) restricted to this chunk's rows; the value may be a Product (a @ b, added
# with addmm_: no product-sized temporary per chunk). With want_grads False it returns no pieces.
ChunkFn = Callable[..., tuple]


class Product(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


class _GradInForward(torch.autograd.Function):
    """Σ_i w_i·loss_i with the input gradients accumulated chunk by chunk during the forward."""

    @staticmethod
    def forward(ctx, chunk_fn: ChunkFn, n: int, step: int, weights: torch.Tensor, *tensors):
        want = [t.requires_grad for t in tensors]
        grads: List[Optional[torch.Tensor]] = [None] * len(tensors)
        total = torch.zeros((), dtype=weights.dtype)
        with torch.no_grad():
            for start in range(0, n, step):
                stop = min(n, start + step)
                loss, pieces = chunk_fn(start, stop, weights[start:stop], any(want), *tensors)
                total = total + (weights[start:stop] * loss).sum()
                for idx, rows, value in pieces:
                    if not want[idx]:
                        continue
                    shape = (value.a.shape[0], value.b.shape[1]) if isinstance(value, Product) else value.shape
                    if grads[idx] is None and shape == tensors[idx].shape:
                        # a whole gradient (one chunk, or a piece over all rows) becomes it: no zeros, no copy
                        grads[idx] = value.a @ value.b if isinstance(value, Product) else value
                        continue
                    if grads[idx] is None:
                        grads[idx] = torch.zeros_like(tensors[idx])
                    target = grads[idx] if rows is None else grads[idx][rows]
                    if isinstance(value, Product):
                        target.addmm_(value.a, value.b)
                    else:
                        target.add_(value)
        grads = [torch.zeros_like(t) if w and g is None else g for g, w, t in zip(grads, want, tensors)]
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.want = want
        return total

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        saved = ctx.saved_tensors
        out = [g * s if w else None for s, w in zip(saved, ctx.want)]
        return (None, None, None, None, *out)


def _run(chunk_fn: ChunkFn, n: int, m: int, reduction: str, tensors: Sequence[torch.Tensor],
         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reduce chunk_fn's per-row losses; ``weights`` overrides the mean's 1/n (SupCon's valid-anchor mean)."""
    step = _chunk_rows(m)
    dtype = tensors[0].dtype
    if reduction != "none":
        if weights is None:
            weights = torch.full((n,), 1.0 / n if reduction == "mean" else 1.0, dtype=dtype, device=tensors[0].device)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _GradInForward.apply(chunk_fn, n, step, weights, *tensors)
        with torch.no_grad():
            return sum((weights[s:min(n, s + step)] * chunk_fn(s, min(n, s + step), None, False, *tensors)[0]).sum()
                       for s in range(0, n, step))

    def rows(start, stop, *ts):
        return chunk_fn(start, stop, None, False, *ts)[0]

    if step >= n:
        return rows(0, n, *tensors)
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    parts = [checkpoint(rows, s, min(n, s + step), *tensors, use_reentrant=False) if use_ckpt
             else rows(s, min(n, s + step), *tensors) for s in range(0, n, step)]
    return torch.cat(parts)


def _lse_softmax(logits: torch.Tensor, inplace: bool = False):
    """Row LSE and row softmax from one exp pass (torch.logsumexp followed by exp would take two);
    ``inplace``: the softmax overwrites ``logits`` (one c × m buffer less)."""
    m = logits.amax(dim=1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)  # an all -inf row keeps LSE -inf, as torch.logsumexp does
    e = logits.sub_(m).exp_() if inplace else torch.exp(logits - m)
    s = e.sum(dim=1, keepdim=True)
    return (m + s.log()).squeeze(1), e.div_(s)


def _fill(logits: torch.Tensor, columns: torch.Tensor, inplace: bool) -> torch.Tensor:
    """-inf at one column per row (a left-out key)."""
    return (logits.scatter_ if inplace else logits.scatter)(1, columns, float("-inf"))


def _softmax_ce_chunk(targets: torch.Tensor, decoupled: bool, exclude_self: bool) -> ChunkFn:
    """Rows of LSE_j(q_i·k_j) − q_i·k_{t_i} over tensors (qs, k); DCL drops t_i from the LSE and
    ``exclude_self`` drops j == i (NT-Xent's diagonal)."""

    def chunk(start, stop, w, want_grads, qs, k):
        logits = qs[start:stop] @ k.T
        t = targets[start:stop, None]
        pos = logits.gather(1, t).squeeze(1)
        # In place only off the autograd graph (the gradient-in-forward path runs under no_grad; the
        # reduction="none" path records these ops for its checkpointed backward).
        inplace = not torch.is_grad_enabled()
        if exclude_self:
            logits = _fill(logits, torch.arange(start, stop)[:, None], inplace)
        if decoupled:
            logits = _fill(logits, t, inplace)
        if not want_grads:
            return torch.logsumexp(logits, dim=1) - pos, ()
        lse, ds = _lse_softmax(logits, inplace=inplace)
        # dS = w·(softmax − onehot(t)); masked entries have softmax 0 and drop out by themselves.
        ds.scatter_add_(1, t, -torch.ones_like(pos)[:, None])
        ds.mul_(w[:, None])
        return lse - pos, ((0, slice(start, stop), ds @ k), (1, None, Product(ds.T, qs[start:stop])))

    return chunk


def _symmetric_ce_chunk(decoupled: bool) -> ChunkFn:
    """All rows at once of ½(row CE + column CE) over one logits matrix, positives on the diagonal.

    Used when the whole N×N matrix fits one chunk: the column side then reuses the row side's logits and
    both sides' dS add into one matrix, so it takes one logits matmul and two gradient matmuls instead of
    two full row passes over (Q, K) and (K, Q).
    """

    def chunk(start, stop, w, want_grads, qs, k):
        assert start == 0 and stop == qs.shape[0], "the symmetric chunk covers all rows"
        logits = qs @ k.T
        pos = logits.diagonal().clone()
        if decoupled:
            logits.diagonal().fill_(float("-inf"))
        if not want_grads:
            return 0.5 * (torch.logsumexp(logits, dim=1) + torch.logsumexp(logits, dim=0)) - pos, ()
        lse_r, p_r = _lse_softmax(logits)
        lse_c, p_c = _lse_softmax(logits.T)
        # Row i's loss weight w_i scales row i of the row side and column i of the column side.
        ds = p_r.mul_(0.5 * w[:, None]).add_(p_c.T.mul_(0.5 * w[None, :]))
        ds.diagonal().sub_(w)
        return 0.5 * (lse_r + lse_c) - pos, ((0, None, ds @ k), (1, None, ds.T @ qs))

    return chunk


def _two_sided_chunk(n: int, decoupled: bool) -> ChunkFn:
    """Rows [0, n): query i's CE over the keys; rows [n, 2n): key j's CE over the queries (the column side).

    One _run over both sides when the N×N logits do not fit one chunk: both sides' gradients then add into
    one buffer per input (two row passes would hold four, and scale four in the backward).
    """
    side = _softmax_ce_chunk(torch.arange(n), decoupled, False)

    def chunk(start, stop, w, want_grads, qs, k):
        losses, pieces = [], []
        for lo, a, b, swap in ((0, qs, k, False), (n, k, qs, True)):
            s, e = max(start, lo), min(stop, lo + n)
            if s >= e:
                continue
            loss, ps = side(s - lo, e - lo, None if w is None else w[s - start:e - start], want_grads, a, b)
            losses.append(loss)
            pieces += [(1 - idx if swap else idx, rows, v) for idx, rows, v in ps]
        return torch.cat(losses) if len(losses) > 1 else losses[0], tuple(pieces)

    return chunk


def _softmax_ce(qs, k, targets, decoupled, exclude_self, reduction):
    if targets is None:
        targets = torch.arange(qs.shape[0])
    return _run(_softmax_ce_chunk(targets, decoupled, exclude_self), qs.shape[0], k.shape[0], reduction, (qs, k))


@register("info_nce", "cpu")
def info_nce(query, key, temperature, targets, symmetric, decoupled, reduction):
    qs = scaled_rows(query, _inverse(temperature))
    k = key.to(qs.dtype)
    n = qs.shape[0]
    if symmetric and n * n <= CHUNK_ELEMENTS:
        return _run(_symmetric_ce_chunk(decoupled), n, n, reduction, (qs, k))
    if not symmetric:
        return _softmax_ce(qs, k, targets, decoupled, False, reduction)
    # Column j's logits are k_j·(q_i/τ_i): the same row computation with the roles swapped, in the same pass.
    weights = None if reduction == "none" else torch.full((2 * n,), 0.5 / n if reduction == "mean" else 0.5,
                                                           dtype=qs.dtype)
    out = _run(_two_sided_chunk(n, decoupled), 2 * n, n, reduction, (qs, k), weights)
    return 0.5 * (out[:n] + out[n:]) if reduction == "none" else out


@register("clip_loss", "cpu")
def clip_loss(image_features, text_features, logit_scale, reduction):
    return info_nce(image_features, text_features, _inverse(logit_scale), None, True, False, reduction)


@register("nt_xent", "cpu")
def nt_xent(z1, z2, temperature, decoupled, reduction):
    z = torch.cat([z1, z2], dim=0)
    zs = scaled_rows(z, _inverse(temperature))
    n2 = z.shape[0]
    targets = (torch.arange(n2) + n2 // 2) % n2
    return _softmax_ce(zs, z.to(zs.dtype), targets, decoupled, True, reduction)


@register("moco_loss", "cpu")
def moco_loss(query, key, queue, temperature, reduction):
    qs = scaled_rows(query, _inverse(temperature))
    k, neg = key.to(qs.dtype), queue.detach().to(qs.dtype)

    def chunk(start, stop, w, want_grads, qs, k):
        q, kc = qs[start:stop], k[start:stop]
        pos = (q * kc).sum(dim=1)
        neg_logits = q @ neg.T
        lse = torch.logaddexp(pos, torch.logsumexp(neg_logits, dim=1))
        loss = lse - pos
        if not want_grads:
            return loss, ()
        dpos = (torch.exp(pos - lse) - 1) * w  # softmax of the positive minus its one-hot
        dneg = torch.exp(neg_logits - lse[:, None]) * w[:, None]
        rows = slice(start, stop)
        return loss, ((0, rows, dpos[:, None] * kc + dneg @ neg), (1, rows, dpos[:, None] * q))

    return _run(chunk, qs.shape[0], 1 + neg.shape[0], reduction, (qs, k))


@register("supcon_loss", "cpu")
def supcon_loss(features, labels, temperature, reduction):
    fs = scaled_rows(features, _inverse(temperature))
    f = features.to(fs.dtype)
    n = f.shape[0]
    # Positives per anchor from the class sizes: (labels == labels.T).sum(1) would be an N×N int64 (2.3 GB at 16k).
    _, cls, size = torch.unique(labels, return_inverse=True, return_counts=True)
    n_pos = size[cls] - 1
    has_pos = n_pos > 0
    if n == 1:
        # A lone anchor has no positive (and an empty denominator): it contributes 0, graph kept.
        return reduce((fs * 0).sum(dim=1), reduction)

    def chunk(start, stop, w, want_grads, fs, f):
        logits = fs[start:stop] @ f.T
        own = torch.arange(start, stop)[:, None]
        pos_mask = (labels[start:stop, None] == labels[None, :]).scatter(1, own, False)
        logits = logits.scatter(1, own, float("-inf"))
        lse = torch.logsumexp(logits, dim=1)
        cnt = n_pos[start:stop].clamp(min=1).to(logits.dtype)
        pos_mean = torch.where(pos_mask, logits, torch.zeros_like(logits)).sum(dim=1) / cnt
        valid = has_pos[start:stop]
        loss = torch.where(valid, lse - pos_mean, torch.zeros_like(lse))
        if not want_grads:
            return loss, ()
        ds = torch.exp(logits - lse[:, None]) - pos_mask.to(logits.dtype) / cnt[:, None]
        ds.mul_((w * valid)[:, None])
        return loss, ((0, slice(start, stop), ds @ f), (1, None, Product(ds.T, fs[start:stop])))

    weights = None
    if reduction == "mean":
        # Anchors without a positive are left out of the mean; with none at all the loss is 0 (graph kept).
        weights = has_pos.to(fs.dtype) / has_pos.sum().clamp(min=1)
    return _run(chunk, n, n, reduction, (fs, f), weights)


@register("siglip_loss", "cpu")
def siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction):
    ims = scaled_rows(image_features, logit_scale)
    t = text_features.to(ims.dtype)
    # The bias rides along as a tensor input so the same chunk code yields its gradient.
    bias = logit_bias.to(ims.dtype) if isinstance(logit_bias, torch.Tensor) else torch.tensor(logit_bias, dtype=ims.dtype)

    def chunk(start, stop, w, want_grads, ims, t, b):
        logits = ims[start:stop] @ t.T + b
        diag = logits.gather(1, torch.arange(start, stop)[:, None]).squeeze(1)
        # −log σ(−x) over every pair (softplus without F.softplus's linear cut-off at 20), then the
        # diagonal pairs switch to −log σ(x) = softplus(x) − x.
        loss = -F.logsigmoid(-logits).sum(dim=1) - diag
        if not want_grads:
            return loss, ()
        ds = torch.sigmoid(logits)
        ds.scatter_add_(1, torch.arange(start, stop)[:, None], -torch.ones_like(diag)[:, None])
        ds.mul_(w[:, None])
        return loss, ((0, slice(start, stop), ds @ t), (1, None, Product(ds.T, ims[start:stop])), (2, None, ds.sum()))

    return _run(chunk, ims.shape[0], t.shape[0], reduction, (ims, t, bias))
