"""Wall-clock timing: median and p20/p80 spread of repeated calls.

GPU: triton.testing.do_bench (CUDA events, L2 flushed between calls, warm-up and repeat counts sized
from a time budget); CUDA events by hand when Triton is missing. CPU: time.perf_counter around each
call after warm-up calls, repeated until a time budget or a repeat cap is reached.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass(frozen=True)
class Budget:
    """How long to spend per measurement."""
    warmup_ms: float = 25.0     # GPU warm-up time (do_bench's ``warmup``)
    rep_ms: float = 100.0       # GPU measuring time (do_bench's ``rep``)
    cpu_s: float = 0.5          # CPU measuring time
    min_reps: int = 5
    max_reps: int = 100


QUICK = Budget(warmup_ms=5.0, rep_ms=20.0, cpu_s=0.04, min_reps=3, max_reps=30)
DEFAULT = Budget()


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(sorted_xs: List[float], q: float) -> float:
    # Linear interpolation between order statistics (numpy's default).
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _summarize(samples_ms: List[float]) -> Timing:
    xs = sorted(samples_ms)
    return Timing(statistics.median(xs), _quantile(xs, 0.2), _quantile(xs, 0.8), len(xs))


def time_cpu(fn: Callable[[], object], budget: Budget) -> Timing:
    fn()  # warm-up: caches, thread pools, allocator
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.cpu_s / max(first, 1e-9))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _summarize(samples)


def _time_cuda_events(fn: Callable[[], object], budget: Budget, first_ms: float) -> Timing:
    for _ in range(max(1, int(budget.warmup_ms / first_ms))):
        fn()
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.rep_ms / first_ms)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summarize([s.elapsed_time(e) for s, e in events])


def time_cuda(fn: Callable[[], object], budget: Budget) -> Timing:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first_ms = max(start.elapsed_time(end), 1e-3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is None or first_ms > budget.rep_ms / 5:
        # Long calls: do_bench would spend 5 estimation calls plus its warm-up; a few timed repeats do.
        return _time_cuda_events(fn, budget, first_ms)
    # do_bench flushes the L2 cache between calls and sizes its repeats from the budget.
    med, p20, p80 = do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, quantiles=[0.5, 0.2, 0.8])
    # do_bench does not report its repeat count; it picks rep / (its estimate of one call, L2 flush included), so
    # this is an upper bound (several times too high for calls of a few µs). Informational only.
    return Timing(float(med), float(p20), float(p80), max(1, int(budget.rep_ms / max(float(med), 1e-3))))


def measure(fn: Callable[[], object], device: torch.device, budget: Budget) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, budget)
    return time_cpu(fn, budget)
