"""The device's ceilings, measured in the same run, and where each result sits under them.

Ceilings: the matmul rate of a large ``torch.matmul`` in the benchmark dtype (on CUDA, fp32 is also
measured with TF32 allowed and the faster of the two is the ceiling, so a kernel using TF32 is not
credited with more than 100%), and the copy bandwidth of a large ``Tensor.copy_`` (read + write bytes).

For a result with F FLOPs and B bytes taking t seconds:
  TFLOP/s = F / t,  GB/s = B / t,
  roofline time = max(F / matmul rate, B / bandwidth)   (the roofline model's lower bound on t),
  roofline fraction = roofline time / t,  bound = "compute" or "memory" (which term is larger).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch

from ..ops._common import tf32_matmul
from .timing import Budget, measure


@contextlib.contextmanager
def _tf32_matmul_set(on: bool):
    """TF32 for fp32 matmuls on or off inside the block, restored after. torch ≥ 2.9 through
    ``fp32_precision``: mixing it with the legacy ``allow_tf32`` makes reading either raise."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old, matmul.fp32_precision = matmul.fp32_precision, ("tf32" if on else "ieee")
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old, matmul.allow_tf32 = matmul.allow_tf32, on
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def _matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, budget: Budget) -> float:
    g = torch.Generator(device=device)
    g.manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    t = measure(lambda: torch.matmul(a, b), device, budget)
    return 2.0 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def copy_gbps(nbytes: int, device: torch.device, budget: Budget) -> float:
    """Copy bandwidth (read + write bytes per second) of a ``Tensor.copy_`` of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, budget)
    return 2.0 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool, budget: Budget,
                     copy: bool = True) -> Dict[str, Any]:
    if device.type == "cuda":
        n, nbytes = (4096, 256 << 20) if quick else (8192, 1 << 30)
    else:
        n, nbytes = (1024, 64 << 20) if quick else (2048, 256 << 20)
    out: Dict[str, Any] = {"matmul_n": n, "copy_bytes": nbytes, "dtype": str(dtype).replace("torch.", "")}
    out["matmul_tflops"] = _matmul_tflops(n, dtype, device, budget)
    out["matmul_note"] = "torch.matmul"
    if device.type == "cuda" and dtype == torch.float32:
        old = tf32_matmul()
        with _tf32_matmul_set(not old):
            other = _matmul_tflops(n, dtype, device, budget)
        out["matmul_tflops_tf32" if not old else "matmul_tflops_no_tf32"] = other
        if other > out["matmul_tflops"]:
            out["matmul_tflops"] = other
            out["matmul_note"] = "torch.matmul with TF32 allowed (the faster of TF32 on / off)"
    if copy:
        out["copy_gbps"] = copy_gbps(nbytes, device, budget)
    return out


def place(flops: float, nbytes: float, median_ms: Optional[float], ceilings: Dict[str, Any]) -> Dict[str, Any]:
    """TFLOP/s, GB/s, roofline fraction and bound of one result."""
    if not median_ms or median_ms <= 0:
        return {"tflops": None, "gbps": None, "roofline_frac": None, "bound": None}
    t = median_ms * 1e-3
    t_compute = flops / (ceilings["matmul_tflops"] * 1e12) if flops else 0.0
    t_memory = nbytes / (ceilings["copy_gbps"] * 1e9) if nbytes else 0.0
    return {
        "tflops": flops / t / 1e12,
        "gbps": nbytes / t / 1e9,
        "roofline_frac": max(t_compute, t_memory) / t,
        "bound": "compute" if t_compute >= t_memory else "memory",
    }
