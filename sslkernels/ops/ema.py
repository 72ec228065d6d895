"""Multi-tensor EMA, ``t <- m*t + (1-m)*s`` over a whole list of tensors: the update of a momentum encoder
(BYOL, MoCo, DINO teachers) in one kernel launch per dtype pair instead of one or three per parameter.

Implementations of op "ema_update_" (signature ``(targets, sources, momentum) -> None``, in place):

  "triton"  one Triton launch per (target dtype, source dtype) group
  "cuda"    the same scheme in csrc/ema.cu (sslkernels._C), one launch per group
  "cpu"     per-tensor in-place lerp with fp32 math for low-precision targets, in bounded-size steps

How a list becomes one launch (the shape of apex's multi_tensor_apply, with the tables in device memory):
every pair is cut into chunks of ``CHUNK_SIZE`` elements; a device int64 buffer holds a tensor table
(target address, source address, numel) and a chunk table (tensor index, first element); program/block
``i`` processes chunk ``i``. The Triton kernel turns the int64 addresses back into typed pointers
(``int.to(tl.pointer_type(...))``, which the interpreter supports too, as a bitcast). Tables are cached
per (addresses, numels), so a training loop builds them once; a cache entry is a pure function of its
key, so a reused address can never make it stale. A CUDA-graph capture must be preceded by one eager
call with the same tensors (as every warm-up does): building a table copies it to the device.

Arithmetic: fp32 for fp32/fp16/bf16 targets, fp64 for fp64 targets (reference.compute_dtype); sources
are read in their own dtype; the update is fma(m, t, (1-m)*s), rounded once into the target (source ==
target stays fixed). ``momentum`` is a float or a 0-d tensor read on the device (no host sync).

Layouts: a pair goes to the kernels when target and source occupy dense memory with the same strides
(contiguous, channels_last, transposed...): then the element order in memory is the same for both and
the flat view is exact. Any other pair (strided slices, mismatched layouts, other dtypes) takes the
eager path of the "cpu" impl on its own device; it is never an error.
"""
from __future__ import annotations

import collections
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import triton
import triton.language as tl

from ..backends import cuda_extension, device_guard, register, triton_interpreted
from .._checks import HashedKey, tensors_signature
from ..reference import compute_dtype

Scalar = Union[float, torch.Tensor]
Pair = Tuple[torch.Tensor, torch.Tensor]

# Elements per chunk (one CUDA block / Triton program). Large enough that a launch over a big model has
# a few thousand programs, small enough that a 1-element bias wastes little. A multiple of _BLOCK.
CHUNK_SIZE = 16384
_BLOCK = 1024  # Triton elements per loop step (4 warps: 8 per thread, two 16-byte fp32 accesses)
_NUM_WARPS = 4
_CPU_STEP = 1 << 20  # elements per step of the eager path's fp32 temporaries (bounded extra memory)
_CACHE_SIZE = 16

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
# Codes of csrc/dtypes.h (also _C.dtypes).
_C_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


# ------------------------------------------------------------------------------------------ Triton


@triton.jit
def _ema_step(m, w, t, s, COMPUTE: tl.constexpr, EMULATE_FMA: tl.constexpr):
    # fma(m, t, w*s), as csrc/ema.cu: m*t is not rounded on its own, so t == s stays fixed (a separate
    # rounding of m*t walks away from it, by hundreds of ulp over a run).
    # (tl.fma does not broadcast: m goes to t's shape.)
    r = tl.fma(tl.broadcast_to(m, t.shape), t, w * s)
    if EMULATE_FMA:
        if COMPUTE == tl.float32:
            # The interpreter's tl.fma rounds m*t first (numpy a*b + c). Through fp64 the product of two
            # fp32 values is exact: one rounding, as on the GPU. (fp64 has no wider type: not emulated.)
            r = (m.to(tl.float64) * t.to(tl.float64) + (w * s).to(tl.float64)).to(COMPUTE)
    return r


@triton.jit
def _ema_multi_tensor_kernel(tensors_ptr, chunks_ptr, m_ptr, m_hi, m_lo, w_hi, w_lo, chunk_size,
                             T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                             M_FROM_PTR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                             EMULATE_FMA: tl.constexpr = False):
    c = tl.program_id(0).to(tl.int64)
    idx = tl.load(chunks_ptr + 2 * c)
    start = tl.load(chunks_ptr + 2 * c + 1)
    t_addr = tl.load(tensors_ptr + 3 * idx)
    s_addr = tl.load(tensors_ptr + 3 * idx + 1)
    numel = tl.load(tensors_ptr + 3 * idx + 2)
    t_ptr = t_addr.to(tl.pointer_type(T_DTYPE))
    s_ptr = s_addr.to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        # The launcher checked that every address of the group is 16-byte aligned; chunk starts are
        # multiples of BLOCK. Telling the compiler lets it emit 16-byte vector accesses (the hint must sit
        # on the pointers: one on the int64 before the cast is not carried through it).
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    if M_FROM_PTR:
        # 1 - m in fp64 before rounding: m close to 1 keeps the full precision of its complement.
        m64 = tl.load(m_ptr).to(tl.float64)
        m = m64.to(COMPUTE)
        w = (1.0 - m64).to(COMPUTE)
    else:
        # A float momentum arrives as fp32 pairs hi + lo (Triton passes Python floats as fp32), so an fp64
        # target still gets m to ~1e-15. tl.cast, not .to(): the interpreter passes plain Python floats.
        m = tl.cast(m_hi, COMPUTE) + tl.cast(m_lo, COMPUTE)
        w = tl.cast(w_hi, COMPUTE) + tl.cast(w_lo, COMPUTE)
    n = tl.minimum(numel - start, chunk_size)
    n_full = (n // BLOCK) * BLOCK
    cols = tl.arange(0, BLOCK)
    # Whole blocks without a mask (a mask of unknown alignment would stop vectorization), then the tail.
    for off in range(0, n_full, BLOCK):
        p = start + off + cols
        t = tl.load(t_ptr + p).to(COMPUTE)
        s = tl.load(s_ptr + p).to(COMPUTE)
        tl.store(t_ptr + p, _ema_step(m, w, t, s, COMPUTE, EMULATE_FMA).to(T_DTYPE))
    if n_full < n:
        p = start + n_full + cols
        mask = cols < n - n_full
        t = tl.load(t_ptr + p, mask=mask, other=0.0).to(COMPUTE)
        s = tl.load(s_ptr + p, mask=mask, other=0.0).to(COMPUTE)
        tl.store(t_ptr + p, _ema_step(m, w, t, s, COMPUTE, EMULATE_FMA).to(T_DTYPE), mask=mask)


# ---------------------------------------------------------------------------------- pairs and tables


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill exactly ``numel`` consecutive slots (in some dimension order)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat_pair(t: torch.Tensor, s: torch.Tensor) -> bool:
    if t.is_contiguous() and s.is_contiguous():
        return True
    return t.stride() == s.stride() and _dense(t)


def _plan_indices(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], split_aligned: bool):
    """Kernel groups {(target dtype, source dtype[, aligned]): pair indices} and the indices for the eager path."""
    groups: Dict[tuple, List[int]] = {}
    rest: List[int] = []
    for i, (t, s) in enumerate(zip(targets, sources)):
        if t.numel() == 0:
            continue
        if t.dtype in _TL_DTYPE and s.dtype in _TL_DTYPE and _flat_pair(t, s):
            key = (t.dtype, s.dtype)
            if split_aligned:
                key += (t.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0,)
            groups.setdefault(key, []).append(i)
        else:
            rest.append(i)
    return groups, rest


# Plans by tensors_signature: a training loop updates the same parameters every step, and planning
# (dtype groups, layouts, alignment, table keys) costs more host time than a ViT-B-sized kernel. Only
# indices and keys are kept, never the tensors.
_plans: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def _plan(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], split_aligned: bool,
          device: Optional[torch.device] = None, chunk_size: int = 0):
    """(groups {(target dtype, source dtype[, aligned]): (pairs, table key)}, pairs for the eager path)."""
    sig = (split_aligned, device, chunk_size, tensors_signature(targets, sources))
    hit = _plans.get(sig)
    if hit is None:
        idx_groups, rest_idx = _plan_indices(targets, sources, split_aligned)
        keyed = {}
        for g, idx in idx_groups.items():
            keyed[g] = (idx, HashedKey((device, chunk_size) + tuple(
                (targets[i].data_ptr(), sources[i].data_ptr(), targets[i].numel()) for i in idx)))
        hit = (keyed, rest_idx)
        _plans[sig] = hit
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(sig)
    keyed, rest_idx = hit
    groups = {g: ([(targets[i], sources[i]) for i in idx], key) for g, (idx, key) in keyed.items()}
    return groups, [(targets[i], sources[i]) for i in rest_idx]


class _Tables(NamedTuple):
    buf: torch.Tensor  # int64 [3*n_tensors + 2*n_chunks] on the device (csrc/multi_tensor.h)
    tensors: torch.Tensor  # view: [n_tensors, 3] rows (target address, source address, numel)
    chunks: torch.Tensor  # view: [n_chunks, 2] rows (tensor index, first element)
    n_chunks: int
    stream: Optional[int]  # CUDA stream the buffer was made on (None on CPU)


_cache: "collections.OrderedDict[tuple, _Tables]" = collections.OrderedDict()
# Entries used inside a CUDA-graph capture: the graph keeps their address, so they are never evicted.
_graph_tables: Dict[tuple, _Tables] = {}


def build_tables(pairs: Sequence[Pair], chunk_size: int) -> Tuple[torch.Tensor, int]:
    """The metadata of one launch as a CPU int64 buffer (tensor table, then chunk table) and its chunk count."""
    n = len(pairs)
    numel = torch.tensor([t.numel() for t, _ in pairs], dtype=torch.int64)
    addrs = torch.tensor([[t.data_ptr(), s.data_ptr()] for t, s in pairs], dtype=torch.int64).reshape(n, 2)
    counts = (numel + chunk_size - 1) // chunk_size
    idx = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts  # chunk number of each tensor's first chunk
    start = (torch.arange(idx.numel(), dtype=torch.int64) - first[idx]) * chunk_size
    table = torch.cat([addrs, numel[:, None]], dim=1).reshape(-1)
    return torch.cat([table, torch.stack([idx, start], dim=1).reshape(-1)]), idx.numel()


def _tables(pairs: Sequence[Pair], device: torch.device, chunk_size: int, key: Optional[tuple] = None) -> _Tables:
    if key is None:
        key = (device, chunk_size) + tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in pairs)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    hit = _graph_tables.get(key)
    if hit is None:
        hit = _cache.get(key)
    if hit is None:
        if capturing:
            raise RuntimeError(
                "ema_update_: first call with these tensors is inside a CUDA-graph capture; run one eager "
                "ema_update_ with the same tensors before capturing (its device tables are built then)")
        cpu, n_chunks = build_tables(pairs, chunk_size)
        # A blocking copy: the buffer holds its final values on return, so any stream may read it.
        buf = cpu.to(device)
        n = len(pairs)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
        hit = _Tables(buf, buf[:3 * n].view(n, 3), buf[3 * n:].view(n_chunks, 2), n_chunks, stream)
        _cache[key] = hit
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    elif key in _cache:
        _cache.move_to_end(key)
    if capturing and key not in _graph_tables:
        _graph_tables[key] = hit
        _cache.pop(key, None)
    if hit.stream is not None and not capturing:
        current = torch.cuda.current_stream(device)
        if current.cuda_stream != hit.stream:
            # Keep the caching allocator from reusing the buffer (after eviction) while this stream reads it.
            # (Entries used in a capture are never freed: no bookkeeping needed there.)
            hit.buf.record_stream(current)
    return hit


def _fp32_split(x: float) -> Tuple[float, float]:
    """x as hi + lo with both exactly representable in fp32 (hi + lo equals x to ~1e-15)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def csrc_module():
    """sslkernels._C, or a RuntimeError saying how to build it."""
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("sslkernels._C is not built (install with nvcc present or SSLKERNELS_BUILD_CUDA=1)")
    return ext


def csrc_call(ext, name: str, *args):
    """``ext.name(*args)``; a CUDA error names the architectures and CUDA versions (the usual culprit)."""
    try:
        return getattr(ext, name)(*args)
    except RuntimeError as err:
        raise RuntimeError(
            f"{err} [sslkernels._C built for sm_{ext.cuda_arch_list()} with CUDA runtime "
            f"{ext.runtime_version()}; the driver supports CUDA {ext.driver_version()}]") from err


def _momentum_on(momentum: Scalar, device: torch.device) -> Scalar:
    """A tensor momentum on ``device`` in a dtype both kernels read (fp32/fp64/fp16/bf16); floats as they are."""
    if isinstance(momentum, torch.Tensor):
        if momentum.device != device:
            momentum = momentum.to(device)
        if momentum.dtype not in _C_CODE:
            momentum = momentum.float()  # e.g. a float8 momentum (a device op: no sync)
    return momentum


# ----------------------------------------------------------------------------------------- eager


def _lerp_mixed_(t: torch.Tensor, s: torch.Tensor, w: Scalar, ct: torch.dtype) -> None:
    # Low-precision or mixed-dtype pair: fp32 math, rounded once into t, in steps of bounded size.
    if t.is_contiguous() and t.numel() > _CPU_STEP:
        tf, sf = t.view(-1), s.reshape(-1)
        for i in range(0, tf.numel(), _CPU_STEP):
            seg = tf[i:i + _CPU_STEP]
            seg.copy_(seg.to(ct).lerp_(sf[i:i + _CPU_STEP].to(ct), w))
    else:
        t.copy_(t.to(ct).lerp_(s.to(ct), w))


def _eager_ema_(pairs: Sequence[Pair], momentum: Scalar) -> None:
    """t <- lerp(t, s, 1 - m) per pair (= m*t + (1-m)*s), in the compute dtype of t."""
    weights: Dict[torch.dtype, Scalar] = {}
    same: Dict[torch.dtype, List[Pair]] = {}
    for t, s in pairs:
        ct = compute_dtype(t.dtype)
        if ct not in weights:
            # A tensor momentum stays a tensor (no host read); 1 - m is formed in fp64 first.
            weights[ct] = ((1 - momentum.to(torch.float64)).to(device=t.device, dtype=ct)
                           if isinstance(momentum, torch.Tensor) else 1.0 - float(momentum))
        w = weights[ct]
        if t.dtype == ct and s.dtype == ct:
            same.setdefault(ct, []).append((t, s))
        else:
            _lerp_mixed_(t, s, w, ct)
    for ct, group in same.items():
        w = weights[ct]
        if isinstance(w, float):
            torch._foreach_lerp_([t for t, _ in group], [s for _, s in group], w)
        else:
            for t, s in group:
                t.lerp_(s, w)


@register("ema_update_", "cpu")
@torch.no_grad()
def ema_update_cpu(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: Scalar) -> None:
    if targets and not isinstance(momentum, torch.Tensor):
        dtypes = {t.dtype for t in targets}.union(s.dtype for s in sources)
        dtype = next(iter(dtypes))
        if len(dtypes) == 1 and compute_dtype(dtype) == dtype:
            # One dtype that computes as itself (an fp32 teacher of an fp32 student): _eager_ema_'s one group,
            # without its per-pair grouping (~0.1 ms of host time for ResNet-50's 161 pairs).
            torch._foreach_lerp_(targets, sources, 1.0 - float(momentum))
            return
    _eager_ema_(list(zip(targets, sources)), momentum)


# ------------------------------------------------------------------------------------- fused impls


def _bump_versions(groups) -> None:
    """Tell autograd the kernels wrote the targets (they write through raw addresses): a graph that saved a
    target raises the in-place error on backward, as on the eager paths, instead of using the new values.
    A host-side counter: no sync, fine under graph capture. (The eager pairs are bumped by their own ops.)"""
    torch.autograd.graph.increment_version([t for pairs, _ in groups.values() for t, _ in pairs])


@register("ema_update_", "triton")
@torch.no_grad()
def ema_update_triton(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: Scalar) -> None:
    if not targets:
        return
    device = targets[0].device
    if device.type != "cpu" and triton_interpreted():
        # The tables hold raw addresses, which the interpreter can only dereference in host memory.
        raise ValueError("ema_update_ with backend='triton' under TRITON_INTERPRET=1 needs CPU tensors; "
                         f"got tensors on {device}")
    groups, rest = _plan(targets, sources, True, device, CHUNK_SIZE)
    momentum = _momentum_on(momentum, device)
    with device_guard(device):
        for (t_dtype, s_dtype, aligned), (pairs, key) in groups.items():
            tables = _tables(pairs, device, CHUNK_SIZE, key)
            if isinstance(momentum, torch.Tensor):
                m_ptr, m_split, w_split, from_ptr = momentum, (0.0, 0.0), (0.0, 0.0), True
            else:
                m = float(momentum)
                m_ptr, m_split, w_split, from_ptr = tables.buf, _fp32_split(m), _fp32_split(1.0 - m), False
            _ema_multi_tensor_kernel[(tables.n_chunks,)](
                tables.tensors, tables.chunks, m_ptr, *m_split, *w_split, CHUNK_SIZE,
                T_DTYPE=_TL_DTYPE[t_dtype], S_DTYPE=_TL_DTYPE[s_dtype], COMPUTE=_TL_DTYPE[compute_dtype(t_dtype)],
                M_FROM_PTR=from_ptr, ALIGNED=aligned, BLOCK=_BLOCK, EMULATE_FMA=triton_interpreted(),
                num_warps=_NUM_WARPS)
        if groups:
            _bump_versions(groups)
    if rest:
        _eager_ema_(rest, momentum)


@register("ema_update_", "cuda")
@torch.no_grad()
def ema_update_cuda(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: Scalar) -> None:
    if not targets:
        return  # nothing to launch: no need for the extension
    ext = csrc_module()
    device = targets[0].device
    # The kernel checks alignment per tensor, so groups need not split on it.
    groups, rest = _plan(targets, sources, False, device, CHUNK_SIZE)
    momentum = _momentum_on(momentum, device)
    with device_guard(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        for (t_dtype, s_dtype), (pairs, key) in groups.items():
            tables = _tables(pairs, device, CHUNK_SIZE, key)
            if isinstance(momentum, torch.Tensor):
                m_addr, m_code, m_value = momentum.data_ptr(), _C_CODE[momentum.dtype], 0.0
            else:
                m_addr, m_code, m_value = 0, 0, float(momentum)
            csrc_call(ext, "ema_update", tables.tensors.data_ptr(), tables.chunks.data_ptr(), tables.n_chunks,
                      CHUNK_SIZE, _C_CODE[t_dtype], _C_CODE[s_dtype], m_addr, m_code, m_value, stream)
        if groups:
            _bump_versions(groups)
    if rest:
        _eager_ema_(rest, momentum)
