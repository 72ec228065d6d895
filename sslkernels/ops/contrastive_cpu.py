"""Memory-efficient contrastive losses for CPU tensors (what backend="auto" runs off the GPU).

The N×M logits are never held whole: rows are processed in chunks of ``c`` queries, each chunk's
[c, M] logits live only inside a checkpointed function, and the backward recomputes them chunk by
chunk. Peak extra memory is O(c·M) with c·M ≈ CHUNK_ELEMENTS, whatever N is. Autograd supplies every
gradient (features, 0-d and per-anchor temperatures, logit scale and bias) from the same code.

Temperatures are folded into the queries first: logits_ij = (q_i / τ_i)·k_j, which makes per-anchor
temperatures and the column (key-side) loss of symmetric losses the same row computation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends import register
from ..reference import compute_dtype, reduce

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 logits per chunk


def _chunk_rows(m: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(m, 1))


def _scaled(x: torch.Tensor, inv_temperature) -> torch.Tensor:
    """x / τ row-wise in the compute dtype; τ a float, a 0-d tensor or a per-row vector."""
    x = x.to(compute_dtype(x.dtype))
    if isinstance(inv_temperature, torch.Tensor):
        inv = inv_temperature.to(x.dtype)
        return x * (inv[:, None] if inv.dim() == 1 else inv)
    return x * inv_temperature


def _inverse(t):
    return 1.0 / t


def _by_chunks(row_fn: Callable, n: int, m: int, *tensors) -> torch.Tensor:
    """Per-row losses [n] from ``row_fn(start, stop, *tensors)``, one checkpointed chunk at a time."""
    step = _chunk_rows(m)
    if step >= n:
        return row_fn(0, n, *tensors)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors if isinstance(t, torch.Tensor))
    parts = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        if need_grad:
            parts.append(checkpoint(row_fn, start, stop, *tensors, use_reentrant=False))
        else:
            parts.append(row_fn(start, stop, *tensors))
    return torch.cat(parts)


def _cross_entropy_rows(qs, k, targets: Optional[torch.Tensor], decoupled: bool, exclude_self: bool):
    """Per-row LSE_j(qs_i·k_j) − qs_i·k_{t_i}; ``exclude_self`` drops j == i (NT-Xent's diagonal)."""
    n = qs.shape[0]
    tgt = torch.arange(n, device=qs.device) if targets is None else targets

    def rows(start, stop, qs, k):
        logits = qs[start:stop] @ k.T
        t = tgt[start:stop, None]
        pos = logits.gather(1, t).squeeze(1)
        if exclude_self:
            own = torch.arange(start, stop, device=qs.device)[:, None]
            logits = logits.scatter(1, own, float("-inf"))
        if decoupled:
            logits = logits.scatter(1, t, float("-inf"))
        return torch.logsumexp(logits, dim=1) - pos

    return _by_chunks(rows, n, k.shape[0], qs, k)


@register("info_nce", "cpu")
def info_nce(query, key, temperature, targets, symmetric, decoupled, reduction):
    qs = _scaled(query, _inverse(temperature))
    k = key.to(qs.dtype)
    out = _cross_entropy_rows(qs, k, targets, decoupled, exclude_self=False)
    if symmetric:
        # Column j's logits are k_j·(q_i/τ_i): the same row computation with the roles swapped.
        out = 0.5 * (out + _cross_entropy_rows(k, qs, None, decoupled, exclude_self=False))
    return reduce(out, reduction)


@register("clip_loss", "cpu")
def clip_loss(image_features, text_features, logit_scale, reduction):
    return info_nce(image_features, text_features, _inverse(logit_scale), None, True, False, reduction)


@register("nt_xent", "cpu")
def nt_xent(z1, z2, temperature, decoupled, reduction):
    z = torch.cat([z1, z2], dim=0)
    zs = _scaled(z, _inverse(temperature))
    n2 = z.shape[0]
    targets = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    out = _cross_entropy_rows(zs, z.to(zs.dtype), targets, decoupled, exclude_self=True)
    return reduce(out, reduction)


@register("moco_loss", "cpu")
def moco_loss(query, key, queue, temperature, reduction):
    qs = _scaled(query, _inverse(temperature))
    k, neg = key.to(qs.dtype), queue.detach().to(qs.dtype)

    def rows(start, stop, qs, k):
        q = qs[start:stop]
        pos = (q * k[start:stop]).sum(dim=1, keepdim=True)
        return torch.logsumexp(torch.cat([pos, q @ neg.T], dim=1), dim=1) - pos.squeeze(1)

    return reduce(_by_chunks(rows, qs.shape[0], 1 + neg.shape[0], qs, k), reduction)


@register("supcon_loss", "cpu")
def supcon_loss(features, labels, temperature, reduction):
    f = features.to(compute_dtype(features.dtype))
    fs = _scaled(features, _inverse(temperature))
    n = f.shape[0]
    n_pos = (labels[:, None] == labels[None, :]).sum(dim=1) - 1
    has_pos = n_pos > 0
    if n == 1:
        rows_out = (fs * 0).sum(dim=1)
    else:
        def rows(start, stop, fs, f):
            logits = fs[start:stop] @ f.T
            own = torch.arange(start, stop, device=f.device)[:, None]
            pos_mask = labels[start:stop, None] == labels[None, :]
            pos_mask = pos_mask.scatter(1, own, False)
            lse = torch.logsumexp(logits.scatter(1, own, float("-inf")), dim=1)
            pos_sum = torch.where(pos_mask, logits, torch.zeros_like(logits)).sum(dim=1)
            cnt = n_pos[start:stop]
            return torch.where(cnt > 0, lse - pos_sum / cnt.clamp(min=1), torch.zeros_like(lse))

        rows_out = _by_chunks(rows, n, n, fs, f)
    if reduction == "mean":
        return rows_out.sum() / has_pos.sum().clamp(min=1)
    return reduce(rows_out, reduction)


@register("siglip_loss", "cpu")
def siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction):
    ims = _scaled(image_features, logit_scale)
    t = text_features.to(ims.dtype)
    bias = logit_bias.to(ims.dtype) if isinstance(logit_bias, torch.Tensor) else logit_bias

    def rows(start, stop, ims, t, *bias_t):
        b = bias_t[0] if bias_t else bias
        logits = ims[start:stop] @ t.T + b
        # −log σ(−x) for every pair, then the diagonal pairs switch to −log σ(x).
        loss = -F.logsigmoid(-logits).sum(dim=1)  # softplus, without F.softplus's linear cut-off at 20
        diag = logits.gather(1, torch.arange(start, stop, device=t.device)[:, None]).squeeze(1)
        return loss - diag

    extra = (bias,) if isinstance(bias, torch.Tensor) else ()
    return reduce(_by_chunks(rows, ims.shape[0], t.shape[0], ims, t, *extra), reduction)
