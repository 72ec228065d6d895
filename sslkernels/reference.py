"""Plain eager PyTorch implementations of every op: the oracle, and ``backend="torch"``.

These materialize everything (the N×M logits included) and favour obviously-right code over speed.
Low-precision inputs are computed in float32 (as the fused kernels accumulate); float32 and float64
inputs are computed in their own precision. Losses come back in that compute dtype; gradients flow
back to the inputs in their own dtypes.
Arguments arrive validated (see functional.py); signatures match the registered kernel implementations.
"""
from __future__ import annotations

import math
from typing import List, Union

import torch
import torch.nn.functional as F

Scalar = Union[float, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x.dtype))


def _scalar(v: Scalar, like: torch.Tensor):
    return v.to(like.dtype) if isinstance(v, torch.Tensor) else v


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _divide_by_temperature(logits: torch.Tensor, temperature: Scalar) -> torch.Tensor:
    t = _scalar(temperature, logits)
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        t = t[:, None]  # per-anchor: row i uses τ_i
    return logits / t


def _ce_rows(logits: torch.Tensor, targets: torch.Tensor, decoupled: bool) -> torch.Tensor:
    """Per-row LSE_j(logits) − logits[i, t_i]; DCL drops the positive from the LSE."""
    pos = logits.gather(1, targets[:, None]).squeeze(1)
    if decoupled:
        logits = logits.scatter(1, targets[:, None], float("-inf"))
    return torch.logsumexp(logits, dim=1) - pos


# --------------------------------------------------------------------------------------- contrastive


def info_nce(query, key, temperature, targets, symmetric, decoupled, reduction):
    q, k = _up(query), _up(key)
    logits = _divide_by_temperature(q @ k.T, temperature)
    if targets is None:
        targets = torch.arange(q.shape[0], device=q.device)
    rows = _ce_rows(logits, targets, decoupled)
    if symmetric:
        rows = 0.5 * (rows + _ce_rows(logits.T, targets, decoupled))
    return reduce(rows, reduction)


def nt_xent(z1, z2, temperature, decoupled, reduction):
    z = _up(torch.cat([z1, z2], dim=0))
    n2 = z.shape[0]
    logits = _divide_by_temperature(z @ z.T, temperature)
    # Each sample is never its own negative: -inf on the diagonal removes it from every LSE.
    eye = torch.eye(n2, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    targets = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    return reduce(_ce_rows(logits, targets, decoupled), reduction)


def clip_loss(image_features, text_features, logit_scale, reduction):
    i, t = _up(image_features), _up(text_features)
    logits = _scalar(logit_scale, i) * (i @ t.T)
    targets = torch.arange(i.shape[0], device=i.device)
    rows = 0.5 * (F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none"))
    return reduce(rows, reduction)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction):
    i, t = _up(image_features), _up(text_features)
    logits = _scalar(logit_scale, i) * (i @ t.T) + _scalar(logit_bias, i)
    n = i.shape[0]
    labels = 2.0 * torch.eye(n, dtype=i.dtype, device=i.device) - 1.0
    # Row i's loss sums its M pair terms, so the "mean" over rows is OpenCLIP's −Σ log σ / N.
    rows = -F.logsigmoid(labels * logits).sum(dim=1)
    return reduce(rows, reduction)


def moco_loss(query, key, queue, temperature, reduction):
    q, k, neg = _up(query), _up(key), _up(queue.detach())
    pos = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([pos, q @ neg.T], dim=1) / _scalar(temperature, q)
    rows = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return reduce(rows, reduction)


def supcon_loss(features, labels, temperature, reduction):
    f = _up(features)
    n = f.shape[0]
    if n == 1:
        # A lone anchor has no positive (and an empty denominator): it contributes 0, graph kept.
        return reduce((f * 0).sum(dim=1), reduction)
    logits = (f @ f.T) / _scalar(temperature, f)
    return supcon_rows(logits, labels, labels, torch.eye(n, dtype=torch.bool, device=f.device), reduction)


def supcon_rows(logits, labels, key_labels, self_mask, reduction):
    """SupCon from anchor × key logits; ``self_mask`` marks each anchor's own column (also used across ranks)."""
    pos_mask = (labels[:, None] == key_labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    n_pos = pos_mask.sum(dim=1)
    # where() rather than multiplication keeps the -inf-free but unused diagonal out of the sum.
    pos_sum = torch.where(pos_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    has_pos = n_pos > 0
    rows = torch.where(has_pos, -pos_sum / n_pos.clamp(min=1), torch.zeros_like(pos_sum))
    if reduction == "mean":
        # Anchors without a positive are left out of the mean; with none at all the loss is 0 (graph kept).
        return rows.sum() / has_pos.sum().clamp(min=1)
    return reduce(rows, reduction)


# --------------------------------------------------------------------------------- non-contrastive


def negative_cosine_similarity(p, z, reduction, stop_gradient=True, eps=1e-8):
    p, z = _up(p), _up(z.detach() if stop_gradient else z)
    return reduce(-F.cosine_similarity(p, z, dim=1, eps=eps), reduction)


def dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, n_global_crops, reduction):
    s, t = _up(student_output), _up(teacher_output.detach())
    c = _up(center.detach()).reshape(1, -1)
    # A tensor teacher temperature (a warm-up schedule's value) is a hyper-parameter: no gradient reaches it.
    tt = teacher_temp.detach() if isinstance(teacher_temp, torch.Tensor) else teacher_temp
    b = t.shape[0] // n_global_crops
    n_crops = s.shape[0] // b
    teacher_probs = torch.softmax((t - c) / _scalar(tt, t), dim=-1).chunk(n_global_crops)
    student_logp = torch.log_softmax(s / student_temp, dim=-1).chunk(n_crops)
    total = torch.zeros(b, dtype=s.dtype, device=s.device)
    n_terms = 0
    for a, ta in enumerate(teacher_probs):
        for v, sv in enumerate(student_logp):
            if v == a:
                continue
            total = total + (-ta * sv).sum(dim=-1)
            n_terms += 1
    return reduce(total / n_terms, reduction)


class CenterUpdate:
    """A pending ``update_center_(..., async_op=True)`` (DINOv2's asynchronous centring): the column sums'
    all-reduce is in flight; :meth:`wait` finishes it and applies the EMA to the centre, once."""

    def __init__(self, center, sums, n_rows, momentum, work, world):
        self.center, self._sums, self._n, self._m, self._work, self._world = center, sums, n_rows, momentum, work, world
        self.done = False

    def is_completed(self) -> bool:
        return self.done or self._work is None or self._work.is_completed()

    @torch.no_grad()
    def wait(self) -> torch.Tensor:
        if not self.done:
            if self._work is not None:
                self._work.wait()
            # Across ranks the row count travelled with the sums (last element): the mean over every rank's
            # rows, whatever each rank's batch size (DINO's sum / (n · world_size) when they are equal).
            sums, n = (self._sums[:-1], self._sums[-1]) if self._world > 1 else (self._sums, self._n)
            mean = (sums / n).reshape(self.center.shape)
            m = _scalar(self._m, mean)
            self.center.copy_((self.center.to(mean.dtype) * m + mean * (1 - m)).to(self.center.dtype))
            self.done, self._sums, self._work = True, None, None
        return self.center


@torch.no_grad()
def center_update(center, sums, n_rows, momentum, async_op, group) -> Union[torch.Tensor, CenterUpdate]:
    """All-reduce the column ``sums`` of ``n_rows`` teacher rows over ranks (when distributed), then the EMA:
    now, or, with ``async_op``, when the returned handle's wait() is called."""
    from .distributed import all_reduce_sum, world_size

    if world_size(group) > 1:  # one collective for the sums and the row count
        sums = torch.cat([sums, sums.new_full((1,), float(n_rows))])
    sums, work = all_reduce_sum(sums, group, async_op=True)
    pending = CenterUpdate(center, sums, n_rows, momentum, work, world_size(group))
    return pending if async_op else pending.wait()


@torch.no_grad()
def update_center_(center, teacher_output, momentum, async_op=False, group=None):
    return center_update(center, _up(teacher_output).sum(dim=0), teacher_output.shape[0], momentum, async_op, group)


def logsumexp_across_ranks(lse: torch.Tensor, distributed: bool, group=None) -> torch.Tensor:
    """Elementwise log Σ_ranks exp(lse) (identity unless ``distributed`` and several ranks): a max all-reduce,
    then a sum of exp(lse − max) ≤ 1, so nothing overflows."""
    from .distributed import all_reduce_sum, is_distributed

    if not (distributed and is_distributed(group)):
        return lse
    import torch.distributed as dist

    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + torch.log(all_reduce_sum(torch.exp(lse - top), group))


@torch.no_grad()
def sinkhorn_knopp(scores, epsilon, iterations, distributed=False, group=None):
    # Log domain: the official exp(scores/ε) overflows for |scores|/ε ≳ 88 in fp32; here only
    # log-sum-exps are taken, and exp() is applied once to values ≤ log(B).
    # ``distributed``: the samples are spread over ranks (SwAV's distributed_sinkhorn): sums over samples
    # and the total are taken over all ranks, B counts every rank's rows.
    from .distributed import gather_sizes

    logq = _up(scores).T / epsilon  # P×B, prototypes by samples, as the official code
    p, b = logq.shape
    # B counts every rank's rows: ranks may hold different numbers (SwAV's n · world_size when equal)
    b = sum(gather_sizes(b, scores.device, group)) if distributed else b
    logq = logq - logsumexp_across_ranks(torch.logsumexp(logq.flatten(), dim=0), distributed, group)
    for _ in range(iterations):
        logq = logq - logsumexp_across_ranks(torch.logsumexp(logq, dim=1, keepdim=True), distributed, group)
        logq = logq - math.log(p)
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - math.log(b)
    return torch.exp(logq + math.log(b)).T


def swav_loss(high_resolution_outputs, low_resolution_outputs, temperature, epsilon, iterations, queue_outputs,
              distributed, group):
    """lightly's SwaVLoss: codes q_i = Sinkhorn(high-res crop i [+ its queue rows]); every other crop v
    predicts them, −mean_b Σ_p q_i·log_softmax(z_v/τ); averaged over the (i, v ≠ i) pairs."""
    crops = [_up(z) for z in list(high_resolution_outputs) + list(low_resolution_outputs)]
    n_high = len(high_resolution_outputs)
    logp = [torch.log_softmax(z / temperature, dim=1) for z in crops]
    loss = 0.0
    for i in range(n_high):
        scores = crops[i].detach()
        if queue_outputs is not None:
            scores = torch.cat([scores, _up(queue_outputs[i]).detach()])
        q = sinkhorn_knopp(scores, epsilon, iterations, distributed, group)[:crops[i].shape[0]]
        sub = sum(-(q * logp[v]).sum(dim=1).mean() for v in range(len(crops)) if v != i)
        loss = loss + sub / (len(crops) - 1)
    return loss / n_high


def _batch_norm(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # BatchNorm1d(affine=False) in training mode: biased variance over the batch.
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def _off_diagonal_sq_sum(c: torch.Tensor) -> torch.Tensor:
    return (c * c).sum() - (torch.diagonal(c) ** 2).sum()


def barlow_twins_loss(z1, z2, lambda_offdiag):
    a, b = _batch_norm(_up(z1)), _batch_norm(_up(z2))
    c = a.T @ b / a.shape[0]
    on_diag = ((torch.diagonal(c) - 1) ** 2).sum()
    return on_diag + lambda_offdiag * _off_diagonal_sq_sum(c)


def vicreg_loss(z1, z2, sim_weight, var_weight, cov_weight):
    x, y = _up(z1), _up(z2)
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 1e-4)
    std_y = torch.sqrt(y.var(dim=0) + 1e-4)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x = x.T @ x / (n - 1)
    cov_y = y.T @ y / (n - 1)
    cov_loss = _off_diagonal_sq_sum(cov_x) / d + _off_diagonal_sq_sum(cov_y) / d
    return sim_weight * repr_loss + var_weight * std_loss + cov_weight * cov_loss


# -------------------------------------------------------------------------------------- state ops


@torch.no_grad()
def ema_update_(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: Scalar) -> None:
    for t, s in zip(targets, sources):
        ct = compute_dtype(t.dtype)
        # 1 - m formed in fp64 (m near 1 keeps its complement's precision).
        w = ((1 - momentum.to(torch.float64)).to(device=t.device, dtype=ct) if isinstance(momentum, torch.Tensor)
             else 1.0 - float(momentum))
        # Lerp form t + w*(s - t), not m*t + w*s: the latter rounds m*t on its own and walks away from
        # t == s (frozen layers of a teacher drift); lerp stays exactly at s, as the kernels' fma does.
        t.copy_(t.to(ct).lerp_(s.to(ct), w))


@torch.no_grad()
def queue_enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool,
                   cut: bool = False) -> None:
    """Write ``keys`` into the ring buffer ``queue`` at the device index ``ptr``; advance ``ptr``.

    A batch larger than the queue leaves only its last ``size`` rows: only those are written, at the
    positions they would have reached, so the result equals writing every row in order.

    ``cut=True`` is lightly's memory-bank rule instead: rows go from ``ptr`` on, those that would pass the
    end are dropped, and ``ptr`` becomes 0 when the batch reaches the end (else ``ptr + n``).
    """
    size, b = queue.shape[0], keys.shape[0]
    keep = min(b, size)
    skip = 0 if cut else b - keep
    # A copy: keys may be a view of the queue itself (a slice enqueued again), which index_copy_ refuses.
    rows = keys[skip:skip + keep].to(compute_dtype(keys.dtype), copy=True)
    if normalize:
        rows = F.normalize(rows, dim=1)
    r = torch.arange(keep, device=keys.device)
    if cut:
        # Without reading ptr on the host: a dropped row rewrites row 0's value at ptr (row 0 always fits),
        # so the duplicate indices carry equal values and the result does not depend on the write order.
        fits = ptr + r < size
        rows, idx = rows[torch.where(fits, r, 0)], torch.where(fits, ptr + r, ptr)
        queue.index_copy_(0, idx, rows.to(queue.dtype))
        ptr.copy_(torch.where(ptr + b >= size, 0, ptr + b))
        return
    idx = (ptr + skip + r) % size
    queue.index_copy_(0, idx, rows.to(queue.dtype))
    ptr.copy_((ptr + b) % size)


# ----------------------------------------------------------------------------- similarity and eval


def similarity(a, b, normalize):
    a, b = _up(a), _up(b)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return a @ b.T


@torch.no_grad()
def knn_topk(query, bank, k, normalize):
    return torch.topk(similarity(query, bank, normalize), k, dim=1)


@torch.no_grad()
def rankme(embeddings, eps):
    s = torch.linalg.svdvals(_up(embeddings))
    # All-zero embeddings (total collapse) have Σs = 0: RankMe's minimum, 1, not 0/0.
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
