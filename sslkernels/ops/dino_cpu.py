"""Memory-efficient PyTorch paths for DINO's loss and the Sinkhorn-Knopp assignment (CPU tensors).

dino_loss: the official code forms G·S − min(G, S) products of B×P tensors (and autograd keeps S
log-softmaxes). Here the loss of sample i is rewritten as

    (Σ_b n_b·LSE_b − (1/τs)·(⟨Σ_a t_a, Σ_b s_b⟩ − Σ_{a<min(G,S)} ⟨t_a, s_a⟩)) / n_terms

so the forward holds one B×P sum of teacher probabilities plus one crop's temporary at a time, and the
backward writes the closed-form gradient (n_b·softmax(s_b/τs) − Σ_{a≠b} t_a)/(τs·n_terms) crop by crop.
Everything is plain torch on any device; the Triton path uses it for float64 inputs.

sinkhorn_knopp: log-domain iterations that keep only the row and column potentials (B and P vectors);
the scores are streamed in row chunks, so no B×P temporary exists before the result.
"""
from __future__ import annotations

import math

import torch

from ..backends import register
from ..reference import compute_dtype, reduce

CHUNK_ELEMENTS = 1 << 21  # rows per sinkhorn chunk ≈ this / P (8 MiB of fp32 temporaries)


def _n_terms(G: int, S: int) -> int:
    return G * S - min(G, S)


def _teacher_probs(teacher, center, teacher_temp, a: int, b: int, dtype) -> torch.Tensor:
    t = teacher[a * b:(a + 1) * b].to(dtype)
    return torch.softmax((t - center) / teacher_temp, dim=-1)


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
                own += (ta * student[a * B:(a + 1) * B].to(dtype)).sum(dim=-1)
            t_sum = ta if t_sum is None else t_sum.add_(ta)
        lse = torch.empty(S, B, dtype=dtype, device=student.device)
        weighted = torch.zeros(B, dtype=dtype, device=student.device)
        cross = -own
        for b in range(S):
            sb = student[b * B:(b + 1) * B].to(dtype)
            lse[b] = torch.logsumexp(sb / student_temp, dim=-1)
            weighted += (G - (1 if b < G else 0)) * lse[b]
            cross += (t_sum * sb).sum(dim=-1)
        rows = (weighted - cross / student_temp) / _n_terms(G, S)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(student, teacher, center, lse)
            ctx.args = (tt, student_temp, G, reduction, dtype)
        return reduce(rows, reduction)

    @staticmethod
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
        grad = torch.empty_like(student)
        for b in range(S):
            sb = student[b * B:(b + 1) * B].to(dtype)
            g = torch.exp(sb / student_temp - lse[b][:, None]).mul_(G - (1 if b < G else 0)).sub_(t_sum)
            if b < G:  # crop b's own teacher crop is not among its pairs
                g.add_(_teacher_probs(teacher, center, tt, b, B, dtype))
            grad[b * B:(b + 1) * B] = g.mul_(coef)
        return grad, None, None, None, None, None, None


@register("dino_loss", "cpu")
def dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, n_global_crops, reduction):
    return _DinoLossCPU.apply(student_output, teacher_output, center, student_temp, teacher_temp,
                              n_global_crops, reduction)


# ------------------------------------------------------------------------------------ sinkhorn_knopp


def _row_chunks(b: int, p: int):
    step = max(1, CHUNK_ELEMENTS // max(p, 1))
    return [(i, min(b, i + step)) for i in range(0, b, step)]


@register("sinkhorn_knopp", "cpu")
@torch.no_grad()
def sinkhorn_knopp(scores, epsilon, iterations):
    """Q[b, p] = exp(scores[b, p]/ε + u[p] + v[b] + log B), alternating the reference's two
    normalizations as updates of the potentials u (prototypes) and v (samples)."""
    dtype = compute_dtype(scores.dtype)
    b, p = scores.shape
    chunks = _row_chunks(b, p)
    u = torch.zeros(p, dtype=dtype, device=scores.device)
    v = torch.zeros(b, dtype=dtype, device=scores.device)

    def scaled(i, j):
        return scores[i:j].to(dtype) / epsilon

    def update_v():
        for i, j in chunks:
            v[i:j] = -torch.logsumexp(scaled(i, j) + u, dim=1)

    if iterations == 0:
        # Only the global normalization: one constant shift, the same for every sample.
        update_v()
        v.copy_((-torch.logsumexp(-v, dim=0)).expand(b))
    for _ in range(iterations):
        # Each prototype's total mass → 1/P (the reference's first normalization); u is the new potential.
        lse_cols = torch.full((p,), float("-inf"), dtype=dtype, device=scores.device)
        for i, j in chunks:
            lse_cols = torch.logaddexp(lse_cols, torch.logsumexp(scaled(i, j) + v[i:j, None], dim=0))
        u = -lse_cols - math.log(p)
        # Each sample's total mass → 1/B.
        update_v()
        v -= math.log(b)
    out = torch.empty(b, p, dtype=dtype, device=scores.device)
    for i, j in chunks:
        out[i:j] = torch.exp(scaled(i, j) + u + (v[i:j, None] + math.log(b)))
    return out
