"""SwAV / DINOv2 Sinkhorn-Knopp in the log domain as Triton kernels.

The reference alternates two normalizations of log Q (P×B). Written as potentials,
log Q[b, p] = scores[b, p]/ε + u[p] + w[b] (Q as returned, rows summing to 1), each normalization only
replaces one potential (constants cancel: they are absorbed by the next one):

    u[p] = −LSE_b(scores[b, p]/ε + w[b])      (every prototype's mass equal)
    w[b] = −LSE_p(scores[b, p]/ε + u[p])      (every sample's mass 1/B, times B at the end)

so an iteration is two streaming passes over the scores that write only the P- and B-vectors; the B×P
result, exp(scores/ε + u + w), is written once at the end. Every exponent the kernels take is
relative to a running maximum, so no score range overflows. Distributed (SwAV's distributed_sinkhorn):
the column log-sum-exps, over samples, are combined across ranks (reference.logsumexp_across_ranks);
rows stay local.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backends import register
from ..distributed import gather_sizes
from ..reference import compute_dtype, logsumexp_across_ranks
from ._common import STREAM_PROGRAMS, cdiv, empty as _empty, stream_split, unit_stride_rows as _rows
from ._grid import axis1, folded

# Tile shapes [rows × columns]; tests shrink them so tiny inputs cover several tiles and splits. 16 rows:
# with float64 exponents a 32×128 row-pass tile took 255 registers and spilled (sm_90, triton 3.6); at
# 16×128 the three kernels take 128 / 86 / 64 (the float32 kernels took 204 / 114 / 96 at 32×128).
BLOCK_B = 16
BLOCK_P = 128
TARGET_PROGRAMS = STREAM_PROGRAMS  # programs the LSE passes aim for, splitting their streamed dimension
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _inv_eps64(inv_eps_hi, inv_eps_lo):
    # 1/ε in float64 from two float32 halves (a Python float argument reaches the kernel as float32).
    return tl.cast(inv_eps_hi, tl.float64) + tl.cast(inv_eps_lo, tl.float64)


@triton.jit
def _log_q(s, inv_eps, pot_a, pot_b):
    # log Q = s/ε + u + w in float64: the potentials are as large as |s|/ε and cancel it, so in float32 the
    # rounding of each (an ulp of |s|/ε: 2 at |s|/ε = 2e7) would land in the exponent whole. The sums and
    # exps that follow run in float32 on the small differences.
    return s.to(tl.float64) * inv_eps + pot_a + pot_b


@triton.jit
def _column_lse_kernel(s_ptr, w_ptr, part_ptr, B, P, stride, inv_eps_hi, inv_eps_lo, tiles_per_split,
                       BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    # Partial LSE_b(s[b, p]/ε + w[b]) of a block of columns over the k-th range of rows: (max, sum).
    inv_eps = _inv_eps64(inv_eps_hi, inv_eps_lo)
    cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.program_id(1)
    c_ok = cols < P
    m = tl.full([BLOCK_P], _NEG_BIG, tl.float64)
    z = tl.zeros([BLOCK_P], tl.float32)
    first = k * tiles_per_split * BLOCK_B
    for j in range(0, tiles_per_split):
        rows = first + j * BLOCK_B + tl.arange(0, BLOCK_B)
        r_ok = rows < B
        mask = r_ok[:, None] & c_ok[None, :]
        s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        w = tl.load(w_ptr + rows, mask=r_ok, other=0.0)
        x = tl.where(mask, _log_q(s, inv_eps, w[:, None], 0.0), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        z = z * tl.exp((m - m_new).to(tl.float32)) + tl.sum(tl.exp((x - m_new[None, :]).to(tl.float32)), axis=0)
        m = m_new
    out = part_ptr + k * 2 * P + cols
    tl.store(out, m, mask=c_ok)
    tl.store(out + P, z.to(tl.float64), mask=c_ok)


@triton.jit
def _row_lse_kernel(s_ptr, u_ptr, part_ptr, B, P, stride, inv_eps_hi, inv_eps_lo, tiles_per_split,
                    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    # Partial LSE_p(s[b, p]/ε + u[p]) of a block of rows over the k-th range of columns: (max, sum).
    inv_eps = _inv_eps64(inv_eps_hi, inv_eps_lo)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.program_id(1)
    n_split = tl.num_programs(1)
    r_ok = rows < B
    m = tl.full([BLOCK_B], _NEG_BIG, tl.float64)
    z = tl.zeros([BLOCK_B], tl.float32)
    first = k * tiles_per_split * BLOCK_P
    for j in range(0, tiles_per_split):
        cols = first + j * BLOCK_P + tl.arange(0, BLOCK_P)
        c_ok = cols < P
        mask = r_ok[:, None] & c_ok[None, :]
        s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + cols, mask=c_ok, other=0.0)
        x = tl.where(mask, _log_q(s, inv_eps, u[None, :], 0.0), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        z = z * tl.exp((m - m_new).to(tl.float32)) + tl.sum(tl.exp((x - m_new[:, None]).to(tl.float32)), axis=1)
        m = m_new
    out = part_ptr + (rows.to(tl.int64) * n_split + k) * 2
    tl.store(out, m, mask=r_ok)
    tl.store(out + 1, z.to(tl.float64), mask=r_ok)


@triton.jit
def _assign_kernel(s_ptr, u_ptr, w_ptr, q_ptr, B, P, stride_s, stride_q, inv_eps_hi, inv_eps_lo,
                   BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    inv_eps = _inv_eps64(inv_eps_hi, inv_eps_lo)
    # Column blocks folded over grid axes 1 and 2 (_grid.py): axis 1 alone stops at 65535 (P = 8.4M).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = axis1() * BLOCK_P + tl.arange(0, BLOCK_P)
    r_ok = rows < B
    c_ok = cols < P
    mask = r_ok[:, None] & c_ok[None, :]
    s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + cols, mask=c_ok, other=0.0)
    w = tl.load(w_ptr + rows, mask=r_ok, other=0.0)
    # Masked lanes get −inf: exp of a padding lane's potential alone could overflow (harmlessly, but noisily).
    x = tl.where(mask, _log_q(s, inv_eps, u[None, :], w[:, None]), float("-inf"))
    q = tl.exp(x.to(tl.float32))
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_q + cols[None, :], q, mask=mask)


def _eps_halves(epsilon: float):
    """1/ε as two float32 values whose float64 sum is 1/ε to ~2^-48 (what _inv_eps64 rebuilds)."""
    inv = 1.0 / float(epsilon)
    hi = float(torch.tensor(inv, dtype=torch.float32))
    return hi, inv - hi


def _merge(m: torch.Tensor, z: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ_k z_k·exp(m_k) over the splits (every split saw at least one entry: z ≥ 1 at its maximum, so
    log z is finite); three torch ops per pass, each a launch the host pays for."""
    return torch.logsumexp(m + z.log(), dim=dim)


def _column_lse(scores, w, inv_eps):
    """LSE over each column of scores/ε + w (a P-vector), B split among programs."""
    b, p = scores.shape
    col_blocks = cdiv(p, BLOCK_P)
    per_split, n_split = stream_split(cdiv(b, BLOCK_B), col_blocks, TARGET_PROGRAMS)
    part = _empty((n_split, 2, p), torch.float64, scores.device)
    _column_lse_kernel[(col_blocks, n_split)](scores, w, part, b, p, scores.stride(0), *inv_eps, per_split,
                                              BLOCK_B=BLOCK_B, BLOCK_P=BLOCK_P)
    return _merge(part[:, 0], part[:, 1], 0)


def _row_lse(scores, u, inv_eps):
    """LSE over each row of scores/ε + u (a B-vector), P split among programs."""
    b, p = scores.shape
    row_blocks = cdiv(b, BLOCK_B)
    per_split, n_split = stream_split(cdiv(p, BLOCK_P), row_blocks, TARGET_PROGRAMS)
    part = _empty((b, n_split, 2), torch.float64, scores.device)
    _row_lse_kernel[(row_blocks, n_split)](scores, u, part, b, p, scores.stride(0), *inv_eps, per_split,
                                           BLOCK_B=BLOCK_B, BLOCK_P=BLOCK_P)
    return _merge(part[..., 0], part[..., 1], 1)


@torch.no_grad()
def sinkhorn_potentials(scores, epsilon, iterations, distributed=False, group=None):
    """(u, w) with log Q = scores/ε + u[p] + w[b] (see dino_cpu.sinkhorn_potentials), float64: they are as
    large as |scores|/ε and cancel it in every exponent."""
    if compute_dtype(scores.dtype) == torch.float64:
        from .dino_cpu import sinkhorn_potentials as exact
        return exact(scores, epsilon, iterations, distributed, group)
    scores = _rows(scores)
    b, p = scores.shape
    inv_eps = _eps_halves(epsilon)
    u = torch.zeros(p, dtype=torch.float64, device=scores.device)
    if iterations == 0:
        # Only the global normalization (Q sums to B over all ranks): w is one constant.
        total = logsumexp_across_ranks(torch.logsumexp(_row_lse(scores, u, inv_eps), dim=0), distributed, group)
        b_all = sum(gather_sizes(b, scores.device, group)) if distributed else b  # uneven ranks too
        return u, (math.log(b_all) - total).expand(b).contiguous()
    w = torch.zeros(b, dtype=torch.float64, device=scores.device)  # a constant: cancels out of the first u
    for _ in range(iterations):
        u = logsumexp_across_ranks(_column_lse(scores, w, inv_eps), distributed, group).neg_()
        w = _row_lse(scores, u, inv_eps).neg_()
    return u, w


@register("sinkhorn_knopp", "triton")
@torch.no_grad()
def sinkhorn_knopp(scores, epsilon, iterations, distributed=False, group=None):
    if compute_dtype(scores.dtype) == torch.float64:
        # The kernels accumulate in float32; float64 scores get the streamed torch path in float64.
        from .dino_cpu import sinkhorn_knopp as exact
        return exact(scores, epsilon, iterations, distributed, group)
    scores = _rows(scores)
    b, p = scores.shape
    u, w = sinkhorn_potentials(scores, epsilon, iterations, distributed, group)
    q = _empty((b, p), torch.float32, scores.device)
    _assign_kernel[folded(cdiv(b, BLOCK_B), cdiv(p, BLOCK_P))](
        scores, u, w, q, b, p, scores.stride(0), q.stride(0), *_eps_halves(epsilon), BLOCK_B=BLOCK_B,
        BLOCK_P=BLOCK_P)
    return q
