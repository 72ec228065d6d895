"""Peak extra memory of one call: what it allocates on top of what was held before it.

GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated()
before the call (inputs, and for "bwd" the saved forward graph, are not counted).

CPU: the growth of the resident set (VmHWM after resetting it through /proc/self/clear_refs, minus
VmRSS before the call). glibc keeps freed memory for reuse, which would hide later allocations, so
this runs in a worker process started with MALLOC_MMAP_THRESHOLD_=65536: every allocation of 64 KiB
or more is its own mmap and goes back to the OS when freed. One worker measures every case of a run
(``python -m sslkernels.bench.memory`` reads jobs as JSON on stdin), rebuilding the same seeded inputs.

Before each measurement the worker makes one untimed call of the same implementation in the same mode:
the first call of a code path pages in library code, grows the small-object heap, starts thread pools
and fills caches (about 120 MiB for a fresh libtorch process), none of which is the op's own memory.
The worker uses the parent's thread count (SSLKERNELS_BENCH_THREADS), as thread pools hold memory too.
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch

MMAP_THRESHOLD = 65536
RSS_METHOD = "RSS growth (VmHWM − VmRSS) in a worker process, after a warm-up call"


def peak_cuda(fn: Callable[[], Any]) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1))


def rss_tracking_available() -> Optional[str]:
    """None when peak-RSS tracking works here; otherwise why not."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (/proc/self/clear_refs)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError as err:
        return f"cannot reset the peak RSS: {err}"
    return None


def peak_rss(fn: Callable[[], Any]) -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM") - base
    del out
    return max(0, peak) * 1024


# ------------------------------------------------------------------------------------ the worker


def job(case_key: str, op: str, size: Dict[str, Any], dtype: str, impl: str, kind: str,
        modes: List[str]) -> Dict[str, Any]:
    return {"case": case_key, "op": op, "size": size, "dtype": dtype, "impl": impl, "kind": kind, "modes": modes}


def run_worker(jobs: List[Dict[str, Any]], idle_timeout_s: float = 600.0,
               on_result: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[tuple, Dict[str, Any]]:
    """Measure ``jobs`` in a fresh CPU worker; returns {(case, impl, mode): {"peak_bytes" | "error": ...}}.

    Results stream back one JSON line each (``on_result`` sees them as they come); the worker is
    stopped when ``idle_timeout_s`` pass without one.
    """
    if not jobs:
        return {}
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env["SSLKERNELS_BENCH_THREADS"] = str(torch.get_num_threads())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    results: Dict[tuple, Dict[str, Any]] = {}
    with tempfile.TemporaryFile(mode="w+") as err, tempfile.TemporaryFile(mode="w+") as inp:
        json.dump(jobs, inp)
        inp.seek(0)
        proc = subprocess.Popen([sys.executable, "-m", "sslkernels.bench.memory"], stdin=inp,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            proc.kill()
        timer = threading.Timer(idle_timeout_s, kill)
        timer.start()
        try:
            for line in proc.stdout:
                timer.cancel()
                timer = threading.Timer(idle_timeout_s, kill)
                timer.start()
                if line.startswith("{"):
                    r = json.loads(line)
                    results[(r["case"], r["impl"], r["mode"])] = r
                    if on_result is not None:
                        on_result(r)
            rc = proc.wait()
        finally:
            timer.cancel()
        err.seek(0)
        tail = (err.read().strip().splitlines() or ["no output"])[-1]
    if timed_out.is_set():
        why = f"memory worker stopped after {idle_timeout_s:.0f} s without a result"
    elif rc != 0:
        why = f"memory worker exited {rc}: {tail}"[:200]
    else:
        return results
    for key, r in _all_failed(jobs, why).items():
        results.setdefault(key, r)
    return results


def _all_failed(jobs, why: str) -> Dict[tuple, Dict[str, Any]]:
    return {(j["case"], j["impl"], m): {"error": why} for j in jobs for m in j["modes"]}


def _worker_main() -> None:
    from .cases import DTYPES, Size, case_seed, generator, resolve_op
    from .impls import build_callables, describe_error, discover

    why = rss_tracking_available()
    jobs = json.load(sys.stdin)
    if os.environ.get("SSLKERNELS_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["SSLKERNELS_BENCH_THREADS"]))
    device = torch.device("cpu")
    by_case: "OrderedDict[str, List[dict]]" = OrderedDict()
    for j in jobs:
        by_case.setdefault(j["case"], []).append(j)

    def emit(j, mode, **kw):
        print(json.dumps({"case": j["case"], "impl": j["impl"], "mode": mode, **kw}), flush=True)

    for case_jobs in by_case.values():
        first = case_jobs[0]
        spec = resolve_op(first["op"])
        size = Size(first["size"]["label"], first["size"]["dims"], first["size"].get("source", ""))
        dtype = DTYPES[first["dtype"]]
        inputs = None
        for j in case_jobs:
            if why:
                for m in j["modes"]:
                    emit(j, m, error=why)
                continue
            try:
                if inputs is None:
                    inputs = spec.build(size, dtype, device, generator(device, case_seed(spec.name, size, dtype)))
                impl = next(i for i in discover(spec, device, [j["impl"]]) if i.name == j["impl"])
                if impl.skip or impl.kind != j["kind"]:
                    # Registration differs from the timing process (a kernel module imported by hand there).
                    raise RuntimeError(f"the worker resolved {impl.name} to {impl.kind!r} ({impl.skip or 'runs'}), "
                                       f"not {j['kind']!r}")
                calls = build_callables(spec, inputs, size, impl, device)
            except Exception as err:  # noqa: BLE001 - recorded, the next job goes on
                for m in j["modes"]:
                    emit(j, m, error=describe_error(err))
                continue
            for m in j["modes"]:
                try:
                    # Warm-up: the same call once, unmeasured (library paging, heap growth, thread pools).
                    calls.reset()
                    calls.for_mode(m)()
                    calls.reset()  # gradients of the previous call would be freed inside the measured one
                    emit(j, m, peak_bytes=peak_rss(calls.for_mode(m)))
                except Exception as err:  # noqa: BLE001
                    emit(j, m, error=describe_error(err))
            del calls
            gc.collect()


if __name__ == "__main__":
    _worker_main()
