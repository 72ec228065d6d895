"""Similarity ops in Triton: ``similarity`` (normalize + matmul + scale in one kernel) and ``knn_topk``
(a running per-row top-k over tiles of the bank; the N×M similarity matrix never exists).

Both compute a tile of S_ij = (a_i·b_j)·r_i·r'_j with fp32 accumulation, where r = 1/max(‖x‖, ε) (ε = 1e-12,
F.normalize's convention) or 1 without ``normalize``. The squared row norms are summed from the very tiles
the dot product loads, so no normalized copy of either input is written and each input is read once per
tile. The price is (BLOCK_M + BLOCK_N)·D CUDA-core FMAs per tile beside BLOCK_M·BLOCK_N·D on the tensor cores
(1/32 at 64×64 tiles), hidden behind the loads and, for ``similarity``, the N×M store that bounds the kernel
anyway. Both ops use the same helper, so a value ``knn_topk`` returns is bit-identical to that entry of
``similarity``.

similarity: one program per (row tile, column tile) writes its tile of S. The output dtype is the compute
    dtype of reference.py: fp32 for fp16/bf16/fp32 inputs (the dot products are accumulated in fp32, and a
    cosine matrix in fp16 would cost three digits). float64 inputs take the reference.
    Backward: two torch matmuls, dÂ = G·B̂ and dB̂ = Gᵀ·Â (Â = rows of a scaled by r), then the Jacobian of
    the normalization, x̂ ↦ (g − x̂⟨x̂, g⟩)/max(‖x‖, ε), O((N + M)·D). The cotangent G is already an N×M
    tensor in memory, so a fused kernel could save nothing; the two products are plain GEMMs on which
    cuBLAS is at its roofline (and follows the TF32 setting, ops/_common.tf32_matmul, as the forward does).
    They run in fp32 because G is fp32: rounding it to fp16 for the tensor cores would cost more than the fp16
    tolerance.

knn_topk: one program per (tile of query rows, contiguous split of the bank). It streams tiles of W bank rows,
    W = max(BLOCK_N, next power of two ≥ k), and keeps a running list of the W best (value, index) pairs
    per row in registers. Each pair is packed in one int64 key, (order-preserving bits of the fp32 value)
    << 32 | (2³² − 1 − index), so that one integer sort moves values and indices together and equal
    values rank the lower bank index first (deterministic ties). Merging a tile into the list: sort the
    tile ascending (bitonic, log²W stages), take the elementwise max with the list (sorted descending)
    — that holds the W best of both and is bitonic — and bitonic-merge it (log W stages). A tile none of
    whose keys beats any row's current k-th best is skipped after one comparison.
    Splits fill the GPU when there are few query tiles (a kNN monitor over a 50k bank with a few hundred
    queries): each split writes its sorted list to an [N, splits, W] int64 buffer and torch.topk over the
    packed keys merges them, O(N·splits·W) memory, never O(N·M). One split (the common case with many
    queries) needs no merge at all. k above MAX_K would need lists that no longer fit in registers: it
    takes the streamed PyTorch path of knn_cpu.py instead (same contract, ties by torch.topk).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..backends import device_guard, register
from . import knn_cpu, launch_config
from ._common import cdiv, empty as _empty, first_order_only, next_pow2, poison_outputs, sm_count
from ._grid import axis1, folded
from .contrastive import _dot_precision, _features

EPS = 1e-12  # F.normalize's default
MAX_K = 512  # largest k served by the kernel: the list takes BLOCK_M·W int64 registers per program

# Launch configs, one table per kernel ("half": fp16/bf16, "fp32"; block_dout unused). Device: untuned for
# sm_90 — no timing has been taken. Checked offline only (triton 3.8, sm_90a, ptxas -v, normalize=True):
# similarity 128×64×32 at 8 warps uses 186 (half) / 158 (fp32) registers and does not spill, where the
# contrastive forward's 128×64×64 spilled 40 B (the fp32 copies of the loaded tiles for the norms cost
# registers). knn with W = 64 at 64 rows, 8 warps: 253 / 173 registers, no spill; wider lists get 16 warps,
# 32-wide feature chunks and BLOCK_M·W ≤ 4096: W = 256 spills 128 B (half) / 0 (fp32), W = 512 ~500–700 B.
# Tests patch the entries to 16-wide tiles so small inputs span several tiles.
Config = launch_config.Config
SIMILARITY = {"half": Config(128, 64, 32, 0, 8, 3), "fp32": Config(128, 64, 32, 0, 8, 3)}
# knn: block_n is the smallest tile width W; the other fields apply at W = block_n (see _knn_tiles).
KNN = {"half": Config(64, 64, 64, 0, 8, 2), "fp32": Config(64, 64, 32, 0, 8, 2)}
_KNN_TILE_ELEMENTS = 4096  # BLOCK_M·W cap once W grows past block_n: the list and tile keys are int64

# The lowest int64 key: padding (rows past N, bank rows past the split) that every real key beats.
_EMPTY = tl.constexpr(-(2 ** 63))
# What an unwritten key buffer holds in tests: it decodes to NaN, which torch.topk ranks first.
_POISON_KEY = 0x7FC00000DEADBEEF


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _scaled_dots(a_ptr, a_rows, a_ok, stride_a, b_ptr, b_rows, b_ok, stride_b, D,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                 NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr):
    # [BLOCK_A, BLOCK_B] fp32 tile of a_rows·b_rowsᵀ, each row scaled by 1/max(‖row‖, ε) when NORMALIZE;
    # the squared norms come from the same loads as the dot product. Padding reads as 0.
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    ssa = tl.zeros([BLOCK_A], dtype=tl.float32)
    ssb = tl.zeros([BLOCK_B], dtype=tl.float32)
    a_off = a_rows.to(tl.int64)[:, None] * stride_a
    b_off = b_rows.to(tl.int64)[None, :] * stride_b
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        a = tl.load(a_ptr + a_off + dd[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + b_off + dd[:, None], mask=d_ok[:, None] & b_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PREC)
        if NORMALIZE:
            af = a.to(tl.float32)
            bf = bt.to(tl.float32)
            ssa += tl.sum(af * af, axis=1)
            ssb += tl.sum(bf * bf, axis=0)
    if NORMALIZE:
        ra = 1.0 / tl.maximum(tl.sqrt(ssa), 1e-12)
        rb = 1.0 / tl.maximum(tl.sqrt(ssb), 1e-12)
        acc = acc * ra[:, None] * rb[None, :]
    return acc


@triton.jit
def _similarity_kernel(a_ptr, b_ptr, out_ptr, N, M, D, stride_a, stride_b, stride_out,
                       NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    # Column tiles folded over grid axes 1 and 2 (_grid.py): axis 1 alone stops at 65535 (a bank of 4.2M rows).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = axis1() * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    c_ok = cols < M
    s = _scaled_dots(a_ptr, rows, r_ok, stride_a, b_ptr, cols, c_ok, stride_b, D, BLOCK_M, BLOCK_N, BLOCK_D,
                     NORMALIZE, DOT_PREC)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], s.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _pack(s, cols):
    # int64 keys ordered as (value, −index): the fp32 bits made monotonic as a signed integer (negative
    # floats get their magnitude bits flipped) in the high word, 2³² − 1 − index in the low word.
    # A NaN of either sign is made the positive one, which sorts above +inf: first, as torch.topk ranks it
    # (a negative NaN, as x86 makes for 0/0, would otherwise sort below −inf and drop out of the top k).
    bits = tl.where(s == s, s, float("nan")).to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) + (4294967295 - cols.to(tl.int64))


@triton.jit
def _knn_kernel(q_ptr, b_ptr, keys_ptr, N, M, D, k, stride_q, stride_b, tiles_per_split,
                NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, W: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    # Program (query tile, bank split): writes keys[row, split, :], sorted descending, whose first k are
    # the k best of the split; the other places hold distinct genuine keys of the split (so the host's
    # merge over splits may take any W of them), not necessarily its next best.
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    lo = pid_s * tiles_per_split * W
    hi = tl.minimum(lo + tiles_per_split * W, M)
    best = tl.full([BLOCK_M, W], _EMPTY, tl.int64)
    for c0 in range(lo, hi, W):
        cols = c0 + tl.arange(0, W)
        c_ok = cols < hi
        s = _scaled_dots(q_ptr, rows, r_ok, stride_q, b_ptr, cols, c_ok, stride_b, D, BLOCK_M, W, BLOCK_D,
                         NORMALIZE, DOT_PREC)
        key = tl.where(r_ok[:, None] & c_ok[None, :], _pack(s, cols), _EMPTY)
        # Only the first k places must be exact: a tile with no key above any row's k-th best is skipped.
        kth = tl.max(tl.where(tl.arange(0, W)[None, :] == k - 1, best, _EMPTY), axis=1)
        if tl.max((key > kth[:, None]).to(tl.int32)) > 0:
            # best is sorted descending, the tile ascending: their elementwise max holds the W best of
            # both and is bitonic, so one bitonic merge sorts it.
            best = tl.bitonic_merge(tl.maximum(best, tl.sort(key, dim=1)), dim=1, descending=True)
    n_splits = tl.num_programs(1)
    out = keys_ptr + (rows.to(tl.int64)[:, None] * n_splits + pid_s) * W + tl.arange(0, W)[None, :]
    tl.store(out, best, mask=r_ok[:, None])


# -------------------------------------------------------------------------------------- host side


def _config(table, dtype: torch.dtype, d: int) -> Config:
    cfg = table["fp32" if dtype == torch.float32 else "half"]
    # The feature chunk never exceeds D rounded up to a power of two (and tl.dot's minimum of 16).
    return cfg._replace(block_d=min(cfg.block_d, max(16, next_pow2(d))))


def _launch_similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool) -> torch.Tensor:
    n, d = a.shape
    m = b.shape[0]
    cfg = _config(SIMILARITY, a.dtype, d)
    out = _empty((n, m), reference.compute_dtype(a.dtype), a.device)
    _similarity_kernel[folded(cdiv(n, cfg.block_m), cdiv(m, cfg.block_n))](
        a, b, out, n, m, d, a.stride(0), b.stride(0), out.stride(0),
        NORMALIZE=normalize, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        DOT_PREC=_dot_precision(a.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _unit_rows(x32: torch.Tensor):
    """(x / max(‖x‖, ε), max(‖x‖, ε), ‖x‖ > ε) per row, as F.normalize computes it."""
    norm = x32.norm(dim=1, keepdim=True)
    clamped = norm.clamp_min(EPS)
    return x32 / clamped, clamped, norm > EPS


def _normalize_backward(g_hat, x_hat, clamped, unclamped):
    # ∂(x / max(‖x‖, ε))ᵀ g: the radial part of g only counts where the norm was not clamped.
    radial = (x_hat * g_hat).sum(dim=1, keepdim=True) * unclamped
    return (g_hat - x_hat * radial) / clamped


class _Similarity(torch.autograd.Function):
    """S = â·b̂ᵀ in the compute dtype; saves only the inputs (no N×M tensor is kept for the backward)."""

    @staticmethod
    def forward(ctx, a, b, normalize: bool):
        with device_guard(a.device):
            out = _launch_similarity(a, b, normalize)
        ctx.normalize = normalize
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        g = g.to(torch.float32)
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        da = db = None
        if ctx.normalize:
            a_hat, a_den, a_unc = _unit_rows(a32)
            b_hat, b_den, b_unc = _unit_rows(b32)
            if need_a:
                da = _normalize_backward(g @ b_hat, a_hat, a_den, a_unc).to(a.dtype)
            if need_b:
                db = _normalize_backward(g.T @ a_hat, b_hat, b_den, b_unc).to(b.dtype)
        else:
            if need_a:
                da = (g @ b32).to(a.dtype)
            if need_b:
                db = (g.T @ a32).to(b.dtype)
        return da, db, None


@register("similarity", "triton")
def similarity(a, b, normalize):
    if a.dtype == torch.float64:
        return reference.similarity(a, b, normalize)  # the kernel accumulates in fp32
    return _Similarity.apply(_features(a), _features(b), bool(normalize))


def _knn_tiles(dtype: torch.dtype, d: int, k: int):
    """(config, tile width W, query rows per program)."""
    cfg = _config(KNN, dtype, d)
    width = max(cfg.block_n, next_pow2(k))
    block_m = cfg.block_m
    if width > cfg.block_n:
        block_m = max(16, min(block_m, _KNN_TILE_ELEMENTS // width))
        cfg = cfg._replace(block_d=min(cfg.block_d, 32), num_warps=16)
    return cfg, width, block_m


def _auto_splits(device: torch.device, row_tiles: int, bank_tiles: int) -> int:
    # Enough programs for two waves on the GPU; the interpreter runs programs one by one, so one split.
    if device.type != "cuda":
        return 1
    return max(1, min(bank_tiles, cdiv(2 * sm_count(device), row_tiles)))


def _unpack(keys: torch.Tensor):
    """(fp32 values, int64 indices) of packed keys (the inverse of _pack)."""
    mono = (keys >> 32).to(torch.int32)
    bits = mono ^ ((mono >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 4294967295 - (keys & 4294967295)


@register("knn_topk", "triton")
@torch.no_grad()
def knn_topk(query, bank, k, normalize, splits=None):
    """``splits``: bank splits per query tile (None: enough to fill the GPU); tests force several."""
    if query.dtype == torch.float64 or k > MAX_K:
        return knn_cpu.knn_topk(query, bank, k, normalize)
    q, b = _features(query), _features(bank)
    n, d = q.shape
    m = b.shape[0]
    cfg, width, block_m = _knn_tiles(q.dtype, d, k)
    row_tiles, bank_tiles = cdiv(n, block_m), cdiv(m, width)
    if splits is None:
        splits = _auto_splits(q.device, row_tiles, bank_tiles)
    tiles_per_split = cdiv(bank_tiles, max(1, min(splits, bank_tiles)))
    splits = cdiv(bank_tiles, tiles_per_split)  # no empty split
    if poison_outputs():
        keys = torch.full((n, splits, width), _POISON_KEY, dtype=torch.int64, device=q.device)
    else:
        keys = torch.empty((n, splits, width), dtype=torch.int64, device=q.device)
    with device_guard(q.device):
        _knn_kernel[(row_tiles, splits)](
            q, b, keys, n, m, d, k, q.stride(0), b.stride(0), tiles_per_split,
            NORMALIZE=bool(normalize), BLOCK_M=block_m, W=width, BLOCK_D=cfg.block_d,
            DOT_PREC=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits == 1:
        top = keys[:, 0, :k]  # already sorted, best first
    else:
        top = torch.topk(keys.view(n, splits * width), k, dim=1).values
    return _unpack(top)
