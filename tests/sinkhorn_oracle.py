"""The float64 Sinkhorn-Knopp oracle shared by the Sinkhorn and SwAV tests."""
import math

import torch


def sinkhorn64(scores, epsilon, iterations):
    """SwAV's distributed_sinkhorn on one process, in float64 and in log space (so it cannot overflow):
    Q = exp(scores/ε)ᵀ; Q /= ΣQ; repeat: rows /= row sums, /= P; columns /= column sums, /= B; Q *= B."""
    logq = scores.double().T / epsilon
    p, b = logq.shape
    logq = logq - torch.logsumexp(logq.reshape(-1), dim=0)
    for _ in range(iterations):
        logq = logq - torch.logsumexp(logq, dim=1, keepdim=True) - math.log(p)
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - math.log(b)
    return (torch.exp(logq) * b).T
