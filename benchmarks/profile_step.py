"""Where a step's time goes: GPU kernels vs host (Python, launches, autograd) for one benchmark case.

The bench reports a median step time; when it is far above the kernels' own time (DINO's fwd+bwd was
0.77 ms against 0.27 + 0.20 ms for its fwd and bwd alone), this says whether the GPU waits on the host.
It builds the case exactly as ``python -m sslkernels.bench`` does (same inputs, same implementation
callables) and reports per step:

  step_ms    CUDA events around back-to-back steps (no L2 flush: the host may run ahead)
  host_ms    the host's time to issue a step (perf_counter, no synchronization)
  kernel_ms  the sum of the step's kernel times (torch.profiler), plus the top kernels
  graph_ms   (--graph, CUDA) the same step captured once in a CUDA graph and replayed: no host work at
             all, what torch.compile(mode="reduce-overhead") or a captured training step can reach
A step is host-bound when host_ms ≥ kernel_ms: the GPU then idles step_ms − kernel_ms per step.

    PYTHONPATH=. python benchmarks/profile_step.py dino_loss --sizes dino --dtype fp32 [--impl ours] [--mode fwd+bwd]
        [--steps 20] [--graph] [--out DIR]
On CPU tensors it runs too (kernel_ms is then the profiler's total of CPU op self times).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sslkernels.bench import cases, impls, memory, run  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _self_time_us(evt, device: torch.device) -> float:
    if device.type == "cuda":
        for name in ("self_device_time_total", "self_cuda_time_total"):  # renamed across torch versions
            if hasattr(evt, name):
                return float(getattr(evt, name))
        return 0.0
    return float(evt.self_cpu_time_total)


def _graph_ms(fn, steps: int, device: torch.device):
    """(ms per replay of one captured step, None) or (None, why it could not be captured)."""
    try:
        replay = impls.cuda_graph(fn)
        replay()
        _sync(device)
    except Exception as err:  # a host sync or an uncapturable op inside the step
        return None, f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:200]
    return _event_ms(replay, steps, device), None


def _event_ms(fn, steps: int, device: torch.device) -> float:
    """ms per call of ``fn`` over ``steps`` back-to-back calls, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    _sync(device)
    return start.elapsed_time(end) / steps


def profile(op: str, size_item: str, dtype: str, impl_name: str, mode: str, steps: int,
            device: torch.device, graph: bool = False) -> dict:
    spec = cases.resolve_op(op)
    sizes = run.sizes_for(spec, size_item.split(","), device)  # the first item that names a size of this op
    if not sizes:
        raise SystemExit(f"no size {size_item!r} for {op}")
    size, dt = sizes[0], cases.DTYPES[dtype]
    inputs = spec.build(size, dt, device, cases.generator(device, cases.case_seed(spec.name, size, dt)))
    found = [i for i in impls.discover(spec, device, [impl_name]) if i.name == impl_name]
    if not found or found[0].make is None:
        raise SystemExit(f"{impl_name} does not run here: {found[0].skip if found else 'unknown implementation'}")
    calls = impls.build_callables(spec, inputs, size, found[0], device)
    fn = calls.for_mode(mode if spec.grad else "fwd")
    for _ in range(3):
        fn()
    _sync(device)

    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3 / steps
    _sync(device)

    if device.type == "cuda":
        step_ms = _event_ms(fn, steps, device)
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        step_ms = (time.perf_counter() - t0) * 1e3 / steps

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with memory._quiet_stderr_fd(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    graph_ms, graph_error = _graph_ms(fn, steps, device) if graph and device.type == "cuda" else (None, None)
    rows = [(e.key, e.count / steps, _self_time_us(e, device) / steps) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[2] > 0), key=lambda r: -r[2])
    kernel_ms = sum(r[2] for r in rows) / 1e3
    return {"op": spec.name, "size": size.describe(), "dtype": dtype, "impl": impl_name, "mode": mode,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "steps": steps,
            "step_ms": step_ms, "host_ms": host_ms, "kernel_ms": kernel_ms,
            "host_bound": host_ms >= kernel_ms if device.type == "cuda" else None,
            "graph_ms": graph_ms, "graph_error": graph_error,
            "top": [{"name": k[:90], "calls_per_step": c, "us_per_step": t} for k, c, t in rows[:15]]}


def _print(r: dict) -> None:
    print(f"{r['op']} [{r['size']}] {r['dtype']} {r['impl']} {r['mode']} on {r['device']}, {r['steps']} steps")
    verdict = "" if r["host_bound"] is None else (
        f"   -> {'host-bound' if r['host_bound'] else 'device-bound'}"
        f" (GPU idle {max(0.0, r['step_ms'] - r['kernel_ms']):.3f} ms/step)")
    what = "kernels" if r["host_bound"] is not None else "ops under the profiler (slowed by it)"
    print(f"  step {r['step_ms']:.3f} ms   host issue {r['host_ms']:.3f} ms   {what} {r['kernel_ms']:.3f} ms{verdict}")
    if r["graph_ms"] is not None:
        print(f"  captured in a CUDA graph: {r['graph_ms']:.3f} ms per replay")
    elif r["graph_error"]:
        print(f"  not capturable: {r['graph_error']}")
    for t in r["top"]:
        print(f"  {t['us_per_step']:9.1f} us  x{t['calls_per_step']:<4.3g} {t['name']}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ops", nargs="+")
    p.add_argument("--sizes", default=None, help="presets, size labels or dims (B=64:P=65536), comma-separated: "
                   "each op takes the first that names one of its sizes; default: the first size of the "
                   "device's default preset")
    p.add_argument("--dtype", default="fp32", choices=sorted(cases.DTYPES))
    p.add_argument("--impl", default="ours")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "bwd", "fwd+bwd"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--graph", action="store_true", help="also time the step captured in a CUDA graph (CUDA only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for profile.json")
    return p


def cases_of(args, device: torch.device) -> list:
    """(op, size item) per op, every op and size checked before the first runs: profile.json is written at
    the end, so a later op's typo would lose the earlier ops' profiles (and a GPU call's time)."""
    out = []
    for op in args.ops:
        try:
            spec = cases.resolve_op(op)
        except ValueError as err:
            raise SystemExit(str(err)) from err
        item = args.sizes or spec.sizes[cases.default_preset(device)][0].label
        if not run.sizes_for(spec, item.split(","), device):
            raise SystemExit(f"no size {item!r} for {op}")
        out.append((op, item))
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    results = []
    for op, item in cases_of(args, device):
        r = profile(op, item, args.dtype, args.impl, args.mode, args.steps, device, args.graph)
        _print(r)
        results.append(r)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
