"""Memory-efficient PyTorch paths for DINO's loss, the Sinkhorn-Knopp assignment and SwaV (CPU tensors).

dino_loss: the official code forms G·S − min(G, S) products of B×P tensors (and autograd keeps S
log-softmaxes). Here the loss of sample i is rewritten as

    (Σ_b n_b·LSE_b − (1/τs)·(⟨Σ_a t_a, Σ_b s_b⟩ − Σ_{a<min(G,S)} ⟨t_a, s_a⟩)) / n_terms

so the forward holds one B×P sum of teacher probabilities plus one crop's temporary at a time, and the
backward writes the closed-form gradient (n_b·softmax(s_b/τs) − Σ_{a≠b} t_a)/(τs·n_terms) crop by crop,
in place in the gradient's own rows. Everything is plain torch on any device; the Triton path uses it for
float64 inputs.

sinkhorn_knopp: log-domain iterations that keep only the row and column potentials (B and P vectors);
the scores are streamed in row chunks, so no B×P temporary exists before the result.

swav_loss: with at least one iteration the codes are q = softmax_p(scores/ε + u) (the last normalization
is per sample), i.e. DINO's teacher probabilities for "teacher logits" scores + ε·u at temperature ε, and
SwaV's pair structure (code of high-res crop i, predicted by every other crop) is DINO's. So SwaV runs on
the DINO loss, without any B×P code matrix.
"""
from __future__ import annotations

import math

import torch

from ..backends import register
from ..distributed import gather_sizes
from ..reference import compute_dtype, logsumexp_across_ranks, reduce
from ..reference import swav_loss as _swav_reference
from ._common import first_order_only

CHUNK_ELEMENTS = 1 << 18  # rows per sinkhorn chunk ≈ this / P (1 MiB of fp32 temporaries)


def _n_terms(G: int, S: int) -> int:
    return G * S - min(G, S)


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """exp in place, floored just above log(smallest normal): sharp temperatures (τt = 0.04, ε = 0.05) send most
    exponents far below it, and CPU exp of results in the subnormal range is ~100× slower. What the floor adds
    is < 3·finfo.tiny per entry, against sums ≥ 1 (+1: exp at the exact floor rounds below tiny)."""
    return x.clamp_min_(math.log(torch.finfo(x.dtype).tiny) + 1.0).exp_()


def _lse_(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp along ``dim``, using ``x`` as its only B×P buffer (x is overwritten)."""
    top = x.amax(dim=dim, keepdim=True)
    return (top + _exp_(x.sub_(top)).sum(dim=dim, keepdim=True).log_()).squeeze(dim)


def _teacher_probs(teacher, center, teacher_temp, a: int, b: int, dtype) -> torch.Tensor:
    """softmax((t_a − c)/τt) in one B×P buffer (the subtraction's), normalized in place."""
    x = teacher[a * b:(a + 1) * b].to(dtype) - center
    x.div_(teacher_temp)
    _exp_(x.sub_(x.amax(dim=-1, keepdim=True)))
    return x.div_(x.sum(dim=-1, keepdim=True))


def _row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x_i, y_i⟩ for every row (one transient B×P product: bmm of 1×P by P×1 is ~10× slower on CPU)."""
    return (x * y).sum(dim=-1)


class _DinoLossCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, G, reduction):
        dtype = torch.promote_types(compute_dtype(student.dtype), compute_dtype(teacher.dtype))
        teacher = teacher.detach()
        # Copies: official DINO updates the centre in place before the backward; schedules may rewrite τt.
        center = center.detach().reshape(1, -1).to(dtype, copy=True)
        tt = teacher_temp.detach().to(dtype, copy=True) if isinstance(teacher_temp, torch.Tensor) else teacher_temp
        B = teacher.shape[0] // G
        S = student.shape[0] // B
        t_sum = None
        own = torch.zeros(B, dtype=dtype, device=student.device)  # Σ_{a<min(G,S)} ⟨t_a, s_a⟩
        for a in range(G):
            ta = _teacher_probs(teacher, center, tt, a, B, dtype)
            if a < S:
                own += _row_dots(ta, student[a * B:(a + 1) * B].to(dtype))
            t_sum = ta if t_sum is None else t_sum.add_(ta)
        lse = torch.empty(S, B, dtype=dtype, device=student.device)
        weighted = torch.zeros(B, dtype=dtype, device=student.device)
        cross = -own
        for b in range(S):
            sb = student[b * B:(b + 1) * B].to(dtype)
            lse[b] = _lse_(sb / student_temp, dim=-1)
            weighted += (G - (1 if b < G else 0)) * lse[b]
            cross += _row_dots(t_sum, sb)
        rows = (weighted - cross / student_temp) / _n_terms(G, S)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(student, teacher, center, lse)
            ctx.args = (tt, student_temp, G, reduction, dtype)
        return reduce(rows, reduction)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        student, teacher, center, lse = ctx.saved_tensors
        tt, student_temp, G, reduction, dtype = ctx.args
        S, B = lse.shape
        scale = 1.0 / (student_temp * _n_terms(G, S) * (B if reduction == "mean" else 1))
        coef = (grad_out.to(dtype) * scale).expand(B)[:, None]
        t_sum = None
        for a in range(G):
            ta = _teacher_probs(teacher, center, tt, a, B, dtype)
            t_sum = ta if t_sum is None else t_sum.add_(ta)
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        for b in range(S):
            rows = grad[b * B:(b + 1) * B]
            # Same dtype: the crop's gradient is formed in place in its rows of the gradient.
            g = rows if rows.dtype == dtype else torch.empty(rows.shape, dtype=dtype, device=rows.device)
            torch.div(student[b * B:(b + 1) * B].to(dtype), student_temp, out=g)
            _exp_(g.sub_(lse[b][:, None])).mul_(G - (1 if b < G else 0)).sub_(t_sum)
            if b < G:  # crop b's own teacher crop is not among its pairs
                g.add_(_teacher_probs(teacher, center, tt, b, B, dtype))
            g.mul_(coef)
            if g is not rows:
                rows.copy_(g)
        return grad, None, None, None, None, None, None


@register("dino_loss", "cpu")
def dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, n_global_crops, reduction):
    return _DinoLossCPU.apply(student_output, teacher_output, center, student_temp, teacher_temp,
                              n_global_crops, reduction)


# ------------------------------------------------------------------------------------ sinkhorn_knopp


def _row_chunks(b: int, p: int):
    step = max(1, CHUNK_ELEMENTS // max(p, 1))
    return [(i, min(b, i + step)) for i in range(0, b, step)]


@torch.no_grad()
def sinkhorn_potentials(scores, epsilon, iterations, distributed=False, group=None):
    """(u, w) with log Q[b, p] = scores[b, p]/ε + u[p] + w[b], Q as sinkhorn_knopp returns it.

    The reference's two normalizations only replace one potential each (constants in u cancel):
    u[p] = −LSE_b(scores/ε + w) (every prototype's mass equal), then w[b] = −LSE_p(scores/ε + u) (every
    sample's mass 1/B, times B at the end). With ``distributed`` the sums over samples, the only ones
    spanning ranks, are log-sum-exps combined over ranks.

    In float64 whatever the scores' dtype: u and w are as large as |scores|/ε and cancel it in every
    exponent, so float32 would put an ulp of |scores|/ε (2e-3 at 2e4) into each log Q.
    """
    dtype = torch.float64
    b, p = scores.shape
    chunks = _row_chunks(b, p)
    u = torch.zeros(p, dtype=dtype, device=scores.device)
    w = torch.zeros(b, dtype=dtype, device=scores.device)

    def scaled(i, j, shift, dim):
        x = torch.empty(j - i, p, dtype=dtype, device=scores.device).copy_(scores[i:j])  # upcast first
        return x.div_(epsilon).add_(shift if dim == 1 else shift[i:j, None])

    def row_lse(out):
        for i, j in chunks:
            out[i:j] = _lse_(scaled(i, j, u, 1), dim=1)
        return out

    if iterations == 0:
        # Only the global normalization (Q sums to B over all ranks): one constant, the same for every sample.
        total = logsumexp_across_ranks(torch.logsumexp(row_lse(w), dim=0), distributed, group)
        b_all = sum(gather_sizes(b, scores.device, group)) if distributed else b  # uneven ranks too
        return u, w.fill_(0).add_(math.log(b_all) - total)
    for _ in range(iterations):
        lse_cols = torch.full((p,), float("-inf"), dtype=dtype, device=scores.device)
        for i, j in chunks:
            lse_cols = torch.logaddexp(lse_cols, _lse_(scaled(i, j, w, 0), dim=0))
        u = -logsumexp_across_ranks(lse_cols, distributed, group)
        w = -row_lse(w)
    return u, w


@register("sinkhorn_knopp", "cpu")
@torch.no_grad()
def sinkhorn_knopp(scores, epsilon, iterations, distributed=False, group=None):
    u, w = sinkhorn_potentials(scores, epsilon, iterations, distributed, group)
    b, p = scores.shape
    out = torch.empty(b, p, dtype=compute_dtype(scores.dtype), device=scores.device)
    floor = math.log(torch.finfo(out.dtype).tiny) + 1.0  # _exp_'s floor, in the result's dtype
    for i, j in _row_chunks(b, p):
        # log Q in float64 (one chunk), then the exp in the result's rows.
        x = scores[i:j].to(torch.float64, copy=True).div_(epsilon).add_(u).add_(w[i:j, None]).clamp_min_(floor)
        out[i:j].copy_(x).exp_()
    return out


# ------------------------------------------------------------------------------------------ swav_loss


def swav_via_dino(high, low, temperature, epsilon, iterations, queue, distributed, group, *, potentials, dino):
    """SwaV on a DINO loss implementation ``dino`` and a Sinkhorn ``potentials`` implementation."""
    if iterations == 0:
        # No per-sample normalization: the codes' rows do not sum to 1 and are not a softmax; the eager loss.
        return _swav_reference(high, low, temperature, epsilon, iterations, queue, distributed, group)
    teachers = []
    for i, z in enumerate(high):
        scores = z.detach()
        if queue is not None:
            scores = torch.cat([scores, queue[i].detach().to(scores.dtype)])
        u, _ = potentials(scores, epsilon, iterations, distributed, group)
        # q_i = softmax((z_i + ε·u)/ε): DINO's teacher probabilities at teacher_temp = ε, centre 0.
        dtype = compute_dtype(z.dtype)
        teachers.append(z.detach().to(dtype) + (epsilon * u).to(dtype))
    student = torch.cat(list(high) + list(low))
    center = torch.zeros(student.shape[1], dtype=teachers[0].dtype, device=student.device)
    return dino(student, torch.cat(teachers), center, temperature, epsilon, len(high), "mean")


register("swav_loss", "torch")(_swav_reference)


@register("swav_loss", "cpu")
def swav_loss(high, low, temperature, epsilon, iterations, queue, distributed, group):
    return swav_via_dino(high, low, temperature, epsilon, iterations, queue, distributed, group,
                         potentials=sinkhorn_potentials, dino=dino_loss)
