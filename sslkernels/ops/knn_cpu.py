"""Streaming k-nearest-neighbour search for CPU tensors: the bank is visited in blocks, a running top-k
is merged after each, so memory stays O(N·(k + block)) instead of O(N·M)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import register
from ..reference import compute_dtype

BANK_BLOCK = 4096


@register("knn_topk", "cpu")
@torch.no_grad()
def knn_topk(query, bank, k, normalize, block: int = BANK_BLOCK):
    ct = compute_dtype(query.dtype)
    q = query.to(ct)
    if normalize:
        q = F.normalize(q, dim=1)
    best_v = torch.full((q.shape[0], 0), float("-inf"), dtype=ct, device=q.device)
    best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], block):
        b = bank[start:start + block].to(ct)
        if normalize:
            b = F.normalize(b, dim=1)
        v = q @ b.T
        i = torch.arange(start, start + b.shape[0], device=q.device).expand_as(v)
        # Candidates = running best + this block; keep the top k of them.
        cand_v, cand_i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
        kk = min(k, cand_v.shape[1])
        best_v, pos = torch.topk(cand_v, kk, dim=1)
        best_i = cand_i.gather(1, pos)
    return best_v, best_i
