"""Peak extra memory of one call: what it allocates on top of what was held before it.

On both devices the call measured is the second of two: the first leaves the inputs' gradients behind,
and the measured one drops them before its backward writes new ones (the bench's step sets ``.grad`` to
None first), so the number is the memory beyond the inputs and the gradients the step returns, the same
for ours, eager and peers: what the issues call extra memory. For "bwd" the saved forward graph is held
before the call and not counted either.

GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated()
before the measured call.

CPU, two measurements:

* ``peak_mem_bytes`` (the number the tables and plots use): the peak of the bytes held by torch's CPU
  allocator during the call, from the allocation and free events the profiler records
  (``profile_memory=True``) summed in time order, less nothing: frees of memory held before the call
  count down, as on the GPU. Every tensor allocation is seen, so it is exact and does not depend
  on the C library or the kernel; it is measured in the timing process right after the timing (as on
  the GPU), so torch.compile is measured too. It does not see memory outside torch's allocator (a
  peer's numpy buffers, thread stacks).
* ``rss_growth_bytes``: the growth of the resident set (VmHWM after resetting it through
  /proc/self/clear_refs, minus VmRSS before the call) in a worker process started with
  MALLOC_MMAP_THRESHOLD_=65536, so every allocation of 64 KiB or more is its own mmap and goes back to
  the OS when freed. It sees everything the process touches, but the kernel counts RSS per CPU in
  batches (Linux >= 6.2: up to max(32, 2·CPUs) pages per CPU are not yet in the total), so growth under
  :func:`rss_resolution_bytes` can read low or 0 (2 MiB on a 16-core machine). One worker measures
  every case of a run (``python -m sslkernels.bench.memory`` reads jobs as JSON on stdin), rebuilding
  the same seeded inputs. Before each measurement the worker makes one unmeasured call of the same
  implementation in the same mode: the first call of a code path pages in library code, grows the
  small-object heap, starts thread pools and fills caches (about 120 MiB for a fresh libtorch
  process), none of which is the op's own memory. The worker uses the parent's thread count
  (SSLKERNELS_BENCH_THREADS), as thread pools hold memory too.
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
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

import torch

MMAP_THRESHOLD = 65536
RSS_METHOD = "RSS growth (VmHWM − VmRSS) in a worker process, after a warm-up call"
CPU_ALLOC_METHOD = "torch CPU allocator peak (profiler memory events)"
CUDA_METHOD = "cuda max_memory_allocated"
PAGE = 4096


def peak_cuda(fn: Callable[[], Any]) -> int:
    fn()  # the first of two calls (module docstring): it leaves the gradients the measured one drops
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


@contextmanager
def _quiet_stderr_fd():
    """fd 2 to /dev/null: Kineto prints two lines on every profiler start / stop, whatever its log level."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _event_time(e) -> float:
    return e.start_ns() if hasattr(e, "start_ns") else 1e3 * e.start_us()


def _event_end(e) -> float:
    return e.end_ns() if hasattr(e, "end_ns") else 1e3 * (e.start_us() + e.duration_us())


MARK = "sslkernels.bench.measured_call"


def peak_cpu_alloc(fn: Callable[[], Any]) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()`` beyond what was held before it.

    ``fn`` runs twice under one profiler session and only the second call is measured: the profiler
    knows the size of a block only if it saw its allocation, so the frees of blocks allocated before
    the session (an in-place op replacing ``p.data``, gradients of the previous call) would be lost and
    the peak overstated. After the first call, what the second frees was allocated under the profiler.
    """
    gc.collect()
    prof = torch.autograd.profiler.profile(profile_memory=True)
    with _quiet_stderr_fd():
        prof.__enter__()
    try:
        with _quiet_stderr_fd():  # c10 warns once about frees of blocks allocated before the session
            out = fn()
            del out
        gc.collect()
        with torch.autograd.profiler.record_function(MARK):
            out = fn()
        del out
    finally:
        with _quiet_stderr_fd():
            prof.__exit__(None, None, None)
    events = list(prof.kineto_results.events())
    mark = [e for e in events if e.name() == MARK]
    if not mark:
        raise RuntimeError("the profiler recorded no marker around the measured call")
    t0, t1 = _event_time(mark[-1]), _event_end(mark[-1])
    cpu = torch.autograd.DeviceType.CPU
    mem = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == cpu), key=_event_time)
    cur = 0
    for e in mem:  # what the session holds when the measured call starts
        if _event_time(e) < t0:
            cur += e.nbytes()
    base = peak = cur
    for e in mem:
        if t0 <= _event_time(e) <= t1:
            cur += e.nbytes()
            peak = max(peak, cur)
    return int(peak - base)


def rss_resolution_bytes(cpus: Optional[int] = None) -> int:
    """How much RSS growth the kernel may not have counted yet when it is read (per-CPU batched counters)."""
    n = cpus or os.cpu_count() or 1
    return PAGE * max(32, 2 * n) * n


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
    """Measure ``jobs`` in a fresh CPU worker; returns {(case, impl, mode): {"rss_bytes" | "error": ...}}.

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
                    # Warm-up: the same call once, unmeasured (library paging, heap growth, thread pools); the
                    # gradients it leaves are dropped inside the measured call, as in peak_cpu_alloc.
                    calls.reset()
                    calls.for_mode(m)()
                    emit(j, m, rss_bytes=peak_rss(calls.for_mode(m)))
                except Exception as err:  # noqa: BLE001
                    emit(j, m, error=describe_error(err))
            del calls
            gc.collect()


if __name__ == "__main__":
    _worker_main()
