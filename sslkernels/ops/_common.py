"""Small host-side helpers shared by the kernel families (Triton and chunked PyTorch)."""
from __future__ import annotations

import functools
import os

import torch

from ..backends import triton_interpreted


def first_order_only(backward):
    """For an autograd.Function's backward built of kernels, whose gradients have no graph: under
    ``create_graph=True`` it raises instead of returning gradients that a second derivative would treat as
    constants (a gradient penalty ``loss + λ·‖∂loss/∂z‖²`` would silently lose its own gradient).

    torch's ``once_differentiable`` errs only when the incoming gradient requires grad, and then only when the
    engine reaches its node: neither holds for that penalty, whose incoming gradient is a constant 1.
    """
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # enabled inside a backward only under create_graph=True
            raise RuntimeError(
                "sslkernels: this op's backward is first-order only (its gradients come from kernels, without a "
                "graph), so create_graph=True (a second derivative, e.g. a gradient penalty) is not supported; "
                "use backend='torch' for that loss")
        return backward(ctx, *grads)

    return wrapper


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host-side grid math: plain Python (triton.cdiv is a constexpr function whose host call
    costs microseconds, and a loss makes a dozen such calls per step)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n, host side, as triton.next_power_of_2 (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    # Cached: the property read costs host time on every launch that sizes a grid from it.
    return torch.cuda.get_device_properties(index)


def _device_properties(device: torch.device):
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    """The device's SM count."""
    return _device_properties(device).multi_processor_count


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size (50 MB, an H100's, where torch does not report it)."""
    return getattr(_device_properties(device), "L2_cache_size", 50 << 20)


def poison_outputs() -> bool:
    """True when kernel outputs are pre-filled with NaN: always under the interpreter (the CPU tests),
    and on the GPU when ``SSLKERNELS_POISON=1`` (``scripts/gpu_check.sh`` sets it for the test run)."""
    return triton_interpreted() or os.environ.get("SSLKERNELS_POISON", "0") not in ("", "0")


def empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer a kernel must fully write: NaN-poisoned in tests so a missed element fails loudly."""
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def tf32_matmul() -> bool:
    """Whether fp32 matmuls may use TF32, as PyTorch's cuBLAS calls decide it. torch ≥ 2.9 keeps the setting
    as ``fp32_precision``, which resolves every way of setting it (allow_tf32, set_float32_matmul_precision,
    the new per-backend and global fp32_precision); reading the legacy ``allow_tf32`` raises RuntimeError once
    the new API has set TF32, so it is read only where ``fp32_precision`` does not exist."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def scalar_args(value):
    """(pointer tensor or None, float) for a float-or-0-d-tensor kernel argument."""
    if isinstance(value, torch.Tensor):
        return value.reshape(1), 1.0
    return None, float(value)


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous (rows may have any stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def row_scale(value, invert: bool, device, dtype=torch.float32) -> torch.Tensor:
    """[1] or [N] tensor of the logit scale s (1/value when ``invert``: s = 1/τ) in ``dtype``, kept
    differentiable w.r.t. a tensor ``value`` so that τ / logit_scale get their gradient through it."""
    if isinstance(value, torch.Tensor):
        v = value.to(dtype)
        return (1.0 / v if invert else v).reshape(-1)
    return torch.full((1,), 1.0 / value if invert else float(value), dtype=dtype, device=device)


def scaled_rows(x: torch.Tensor, factor) -> torch.Tensor:
    """x · factor row-wise in the compute dtype (fp32 for half inputs); factor a float, a 0-d tensor or a
    per-row vector. Folding 1/τ into the queries this way lets autograd give τ's gradient."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if isinstance(factor, torch.Tensor):
        f = factor.to(x.dtype)
        return x * (f[:, None] if f.dim() == 1 else f)
    return x * factor


# Programs a streaming kernel (one that walks a long row or column range per program) aims for: ~32 per
# SM of an H100, so that while some wait on their loads others compute. With ~4 per SM (one wave), DINO's
# forward read its logits at 30% of the copy bandwidth; its backward, a program per tile, at 72%.
STREAM_PROGRAMS = 32 * 132
MAX_SPLITS = 64  # the partials of a split range are merged per row: keep that merge one small tile


def stream_split(n_tiles: int, programs: int, target: int = STREAM_PROGRAMS) -> tuple:
    """(tiles per split, splits): cut a range of ``n_tiles`` tiles into splits so that ``programs``
    programs per split reach ``target`` programs in all, at most MAX_SPLITS splits."""
    want = max(1, min(n_tiles, MAX_SPLITS, cdiv(target, max(programs, 1))))
    per_split = cdiv(n_tiles, want)
    return per_split, cdiv(n_tiles, per_split)
