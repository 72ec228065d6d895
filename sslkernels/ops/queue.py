"""MemoryQueue enqueue as one Triton kernel: optional L2-normalization, dtype cast and the ring-buffer
scatter in a single pass over the keys, with the write position read from the device-side ``ptr``
(no host sync, so a MoCo step can be captured in a CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register


@triton.jit
def _enqueue_kernel(keys_ptr, queue_ptr, ptr_ptr, n_keys, size, dim, skip, stride_k, stride_q,
                    NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per kept row: row r of keys[skip:] lands at (ptr + skip + r) mod size.
    r = tl.program_id(0)
    start = tl.load(ptr_ptr)
    dst = (start + skip + r) % size
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(keys_ptr + (skip + r).to(tl.int64) * stride_k + cols, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        # F.normalize's convention: divide by max(||x||, 1e-12).
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        x = x / tl.maximum(norm, 1e-12)
    tl.store(queue_ptr + dst.to(tl.int64) * stride_q + cols, x.to(queue_ptr.dtype.element_ty), mask=mask)


@register("queue_enqueue_", "triton")
@torch.no_grad()
def queue_enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool) -> None:
    size, dim = queue.shape
    b = keys.shape[0]
    keep = min(b, size)
    keys = keys if keys.stride(1) == 1 else keys.contiguous()
    if queue.stride(1) != 1:
        raise ValueError("MemoryQueue.queue must have unit stride along its feature dimension")
    block_d = triton.next_power_of_2(dim)
    _enqueue_kernel[(keep,)](keys, queue, ptr, b, size, dim, b - keep, keys.stride(0), queue.stride(0),
                             NORMALIZE=bool(normalize), BLOCK_D=block_d, num_warps=4 if block_d >= 1024 else 1)
    # Stream order puts this after the kernel: every program has read the old ptr before it moves.
    ptr.copy_((ptr + b) % size)
