"""MemoryQueue enqueue as one kernel: optional L2-normalization, dtype cast and the ring-buffer scatter in
a single pass over the keys, with the write position read from the device-side ``ptr`` (no host sync, so a
MoCo step can be captured in a CUDA graph).

Implementations of op "queue_enqueue_" (signature ``(queue, ptr, keys, normalize, cut=False) -> None``, in
place; ``cut``: lightly's memory-bank rule, see reference.queue_enqueue_):

  "triton"  one program per written row; ``ptr`` is advanced by a stream-ordered tensor op afterwards
  "cuda"    csrc/queue.cu (sslkernels._C): one warp per written row, and ``ptr`` advanced inside the same
            launch (see the comment at the top of queue.cu)
  "torch"   reference.queue_enqueue_ (index_copy_)

All compute in the keys' compute dtype (fp32, fp64 for fp64 keys) and round once into the queue's dtype.
A batch larger than the queue writes only its last ``size`` rows, where writing every row in order would
have left them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import _spans
from ..backends import device_guard, register
from ..reference import compute_dtype
from ._common import next_pow2
from .ema import _C_CODE, csrc_call, csrc_module

# Widest slice of a row one program holds (a step of its loop over D): 4 warps, 32 fp32 per thread.
_MAX_BLOCK_D = 4096


@triton.jit
def _enqueue_kernel(keys_ptr, queue_ptr, ptr_ptr, n_keys, size, dim, skip, stride_k, stride_q,
                    NORMALIZE: tl.constexpr, CUT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per kept row: row r of keys[skip:] lands at (ptr + skip + r) mod size; with CUT (lightly's
    # bank, skip = 0) at ptr + r, and not at all past the end. The row is walked in BLOCK_D-wide steps (a
    # whole row in registers spilled from D = 32768 on and does not compile past 2^20 elements).
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(ptr_ptr)
    cols = tl.arange(0, BLOCK_D)
    if CUT:
        dst = start + r
    else:
        dst = (start + skip + r) % size
    inside = dst < size  # (always on the ring)
    src_row = keys_ptr + (skip + r) * stride_k
    dst_row = queue_ptr + dst * stride_q
    if NORMALIZE:
        acc = tl.zeros([BLOCK_D], dtype=COMPUTE)
        for c0 in range(0, dim, BLOCK_D):
            x = tl.load(src_row + c0 + cols, mask=(c0 + cols < dim) & inside, other=0.0).to(COMPUTE)
            acc += x * x
        # F.normalize's convention: divide by max(||x||, 1e-12). IEEE-rounded sqrt and division, as
        # csrc/queue.cu and torch: fp32 tl.sqrt and / compile to approximate instructions (~2 ulp).
        norm = tl.sum(acc, axis=0)
        if COMPUTE == tl.float32:
            denom = tl.maximum(tl.sqrt_rn(norm), 1e-12)
        else:
            denom = tl.maximum(tl.sqrt(norm), 1e-12)  # fp64: IEEE already
    for c0 in range(0, dim, BLOCK_D):
        mask = (c0 + cols < dim) & inside
        x = tl.load(src_row + c0 + cols, mask=mask, other=0.0).to(COMPUTE)
        if NORMALIZE:
            if COMPUTE == tl.float32:
                x = tl.div_rn(x, tl.broadcast_to(denom, x.shape))
            else:
                x = x / denom
        tl.store(dst_row + c0 + cols, x.to(queue_ptr.dtype.element_ty), mask=mask)


def _keys_apart(queue: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``keys``, or a copy of them where they share memory with ``queue`` (e.g. a slice of it enqueued again):
    one program (block) would read a row another is overwriting, a race on the GPU. The copy is a device op
    (no sync). Under torch.compile there are no addresses to compare; keys made inside the graph are fresh."""
    if torch.compiler.is_compiling():
        return keys
    spans = _spans([queue, keys])  # (device, first byte, end byte, index), sorted by address
    return keys.clone() if len(spans) == 2 and spans[0][0] == spans[1][0] and spans[1][1] < spans[0][2] else keys


@register("queue_enqueue_", "triton")
@torch.no_grad()
def queue_enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool,
                   cut: bool = False) -> None:
    size, dim = queue.shape
    b = keys.shape[0]
    keep = min(b, size)
    skip = 0 if cut else b - keep
    keys = _keys_apart(queue, keys if keys.stride(1) == 1 else keys.contiguous())
    if queue.stride(1) != 1:
        raise ValueError("MemoryQueue.queue must have unit stride along its feature dimension")
    block_d = min(next_pow2(dim), _MAX_BLOCK_D)
    compute = tl.float64 if compute_dtype(keys.dtype) == torch.float64 else tl.float32
    with device_guard(queue.device):
        _enqueue_kernel[(keep,)](keys, queue, ptr, b, size, dim, skip, keys.stride(0), queue.stride(0),
                                 NORMALIZE=bool(normalize), CUT=bool(cut), COMPUTE=compute, BLOCK_D=block_d,
                                 num_warps=4 if block_d >= 1024 else 1)
        # Stream order puts this after the kernel: every program has read the old ptr before it moves.
        ptr.copy_(torch.where(ptr + b >= size, 0, ptr + b) if cut else (ptr + b) % size)


@register("queue_enqueue_", "cuda")
@torch.no_grad()
def queue_enqueue_cuda(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool,
                       cut: bool = False) -> None:
    ext = csrc_module()
    size, dim = queue.shape
    keys = _keys_apart(queue, keys if keys.stride(1) == 1 or keys.shape[1] == 1 else keys.contiguous())
    if queue.stride(1) != 1 and dim != 1:
        raise ValueError("MemoryQueue.queue must have unit stride along its feature dimension")
    if ptr.dtype != torch.int64 or ptr.numel() != 1:
        raise ValueError(f"ptr must be a one-element int64 tensor, got {ptr.dtype} of shape {tuple(ptr.shape)}")
    device = queue.device
    with device_guard(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        csrc_call(ext, "queue_enqueue", queue.data_ptr(), ptr.data_ptr(), keys.data_ptr(), size, dim, keys.shape[0],
                  queue.stride(0), keys.stride(0), _C_CODE[queue.dtype], _C_CODE[keys.dtype], bool(normalize), bool(cut),
                  stream)
